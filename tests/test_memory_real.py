"""Personas and memory through the real LLM (SmolLM2-135M, llama.cpp) and TTS (piper).

Marked ``models``: run with ``pytest -m models tests/test_memory_real.py``. The 135M model is
too small to recall facts reliably, so these tests check what the device controls: what the
model is given, what llama.cpp re-uses, and how the reply is spoken.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from companion.conversation import announce_switch
from tests.conftest import fake_app, make_settings
from tests.fakes import FakeSpeaker

pytestmark = pytest.mark.models


class Recording:
    """The real LLM, with every prompt it is given recorded (nothing else changed)."""

    def __init__(self, llm: Any) -> None:
        self.real = llm
        self.prompts: list[list[dict]] = []

    def stream(self, messages, params, stats=None, **kwargs):
        self.prompts.append(list(messages))
        return self.real.stream(messages, params, stats, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture(scope="module")
def real_llm():
    from companion.models import ModelRegistry
    from companion.settings import CompanionSettings
    from companion.stages.llm import LlamaCppChatModel

    settings = CompanionSettings(device_id="t")
    return LlamaCppChatModel(settings.llm, ModelRegistry(settings.models_dir))


@pytest.fixture(scope="module")
def real_tts():
    from companion.models import ModelRegistry
    from companion.settings import CompanionSettings
    from companion.stages.tts import PiperSynthesizer

    settings = CompanionSettings(device_id="t")
    return PiperSynthesizer(settings.tts, ModelRegistry(settings.models_dir))


async def _app(tmp_path: Path, real_llm, tts, **settings):
    sink = FakeSpeaker()
    app = fake_app(make_settings(tmp_path, **settings), llm=Recording(real_llm), tts=tts, sink=sink)
    async with asyncio.timeout(30):
        await app.start()
    return app, sink


async def test_switching_with_and_without_context(tmp_path: Path, real_llm, real_tts) -> None:
    app, sink = await _app(tmp_path, real_llm, real_tts)
    llm = app.llm
    async with asyncio.timeout(60):
        await app.conversation.warm_personas()
        first = await app.conversation.reply_text("My name is Anna and I live in Leeds.")
        assert first.text and first.completed

        result = await app.conversation.switch_persona(
            "medication_nurse", preserve_context=True, transition_message="Hello, this is Nora.")
        assert result.prefix_was_warm and result.switch_latency_ms < 500
        await announce_switch(app.speech, result)
        nurse_clip = sink.played_s
        companion_clip = await real_tts.synthesize(
            "Hello, this is Nora.", app.personas.get("companion").voice_config.params())
        assert nurse_clip > companion_clip.duration_s * 1.1  # length_scale 1.2 vs 1.0: slower

        second = await app.conversation.reply_text("What is my name?")
        prompt = llm.prompts[-1]
        assert prompt[0]["content"].startswith("You are Nora")
        assert {"role": "user", "content": "My name is Anna and I live in Leeds."} in prompt
        nurse_prefix = real_llm.prefix_tokens(app.conversation.persona_messages(
            app.personas.get("medication_nurse")))
        assert second.stats.cached_prompt_tokens >= len(nurse_prefix)  # not read again
        assert second.text and second.session_id == first.session_id

        result = await app.conversation.switch_persona("entertainer", preserve_context=False)
        third = await app.conversation.reply_text("Tell me a very short joke.")
        assert third.session_id == result.session_id != first.session_id
        assert not any("Anna" in m["content"] for m in llm.prompts[-1])
        assert llm.prompts[-1][0]["content"].startswith("You are Max")
        assert third.stats.prompt_tokens < second.stats.prompt_tokens
    app.store.close()


async def test_the_persona_prefix_is_restored_not_re_read(tmp_path: Path, real_llm, real_tts) -> None:
    app, _ = await _app(tmp_path, real_llm, real_tts)
    async with asyncio.timeout(60):
        await app.conversation.warm_personas()
        for persona_id in ("entertainer", "companion", "medication_nurse"):
            await app.conversation.switch_persona(persona_id, preserve_context=False)
            reply = await app.conversation.reply_text("What is the capital of France?")
            prefix = real_llm.prefix_tokens(app.conversation.persona_messages(
                app.personas.get(persona_id)))
            assert reply.stats.cached_prompt_tokens >= len(prefix), persona_id
            # only the new user message (as the persona words it) and the template around it
            behavior = app.personas.get(persona_id).behavior_config
            user_turn = behavior.user_turn("What is the capital of France?")
            uncached = reply.stats.prompt_tokens - reply.stats.cached_prompt_tokens
            assert uncached <= real_llm.count_tokens(user_turn) + 12, persona_id
        # the restored state answers as a cold evaluation of the whole prompt does (greedy; a
        # question with one right answer, since llama.cpp's float sums differ by batch split)
        await app.conversation.switch_persona("companion", preserve_context=False)
        question = "What is the capital of France?"
        cached = await app.conversation.reply_text(question, temperature=0.0, new_session=True)
        assert cached.stats.cached_prompt_tokens > 0
        kept = dict(real_llm._prefix_states)
        real_llm._prefix_states.clear()
        real_llm._llama.reset()
        try:
            cold = await app.conversation.reply_text(question, temperature=0.0, new_session=True)
        finally:
            real_llm._prefix_states.update(kept)
        assert cold.stats.cached_prompt_tokens == 0
        assert cached.text == cold.text and "Paris" in cold.text
    app.store.close()


async def test_summary_written_by_the_real_model(tmp_path: Path, real_llm, real_tts) -> None:
    app, _ = await _app(tmp_path, real_llm, real_tts, llm={"history_token_budget": 64})
    llm = app.llm
    async with asyncio.timeout(120):
        for text in ("My name is Anna.", "I take a blue pill at eight every morning.",
                     "My daughter Claire visits on Sundays.", "I like gardening."):
            await app.conversation.reply_text(text)
        await app.conversation.wait_for_summaries()
        sid = app.conversation.active_session_id
        session = app.store.get_session(sid)
        assert session is not None and session.summary and session.summarized_upto > 0
        left = app.store.messages(sid, after_id=session.summarized_upto)
        assert len(left) < len(app.store.messages(sid))
        await app.conversation.reply_text("What do you know about me?")
        persona_part = len(app.conversation.persona_messages(app.conversation.active_persona))
        assert llm.prompts[-1][persona_part]["content"] == (
            f"Earlier in this conversation: {session.summary}")
    app.store.close()


async def test_restart_keeps_the_conversation_with_real_models(tmp_path: Path, real_llm,
                                                              real_tts) -> None:
    app, _ = await _app(tmp_path, real_llm, real_tts)
    async with asyncio.timeout(60):
        await app.conversation.switch_persona("medication_nurse")
        first = await app.conversation.reply_text("Please remember: the blue pill at eight.")
    await app.aclose()
    again, _ = await _app(tmp_path, real_llm, real_tts)
    assert again.conversation.active_persona_id == "medication_nurse"
    async with asyncio.timeout(60):
        reply = await again.conversation.reply_text("Which pill, and when?")
    assert reply.session_id == first.session_id
    assert {"role": "user", "content": "Please remember: the blue pill at eight."} in again.llm.prompts[-1]
    await again.aclose()
