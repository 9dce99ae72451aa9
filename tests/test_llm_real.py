"""The real LLM (SmolLM2-135M through llama.cpp): voice turns go before other LLM work, and the
model's thread ends with the app. Twins of test_compute.py and test_conversation.py."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from companion.stages.llm import GenerationStats, Priority, SamplingParams
from tests.conftest import fake_app, make_settings, until

pytestmark = pytest.mark.models

LONG = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and his cat."}]
SHORT = [{"role": "user", "content": "What is the capital of France?"}]


def _load_llm():
    from companion.models import ModelRegistry
    from companion.settings import CompanionSettings
    from companion.stages.llm import LlamaCppChatModel

    # one thread, not niced: these tests check order, and a shared CI machine starves a niced
    # two-thread OpenMP team (its spinning barriers) far more than one thread
    settings = CompanionSettings(device_id="t", llm={"threads": 1, "nice": 0})
    return LlamaCppChatModel(settings.llm, ModelRegistry(settings.models_dir))


@pytest.fixture(scope="module")
def real_llm():
    llm = _load_llm()
    yield llm
    llm.close()


async def test_a_voice_turn_goes_ahead_of_a_long_http_generation(real_llm) -> None:
    events: list[str] = []
    long_stats = GenerationStats()
    long_started = asyncio.Event()

    async def long_http_chat() -> None:
        params = SamplingParams(temperature=0.0, max_tokens=120)
        async for _ in real_llm.stream(LONG, params, long_stats, priority=Priority.INTERACTIVE):
            events.append("http-token")
            long_started.set()
        events.append("http-end")

    async def voice_turn() -> str:
        parts = []
        async for delta in real_llm.stream(SHORT, SamplingParams(temperature=0.0, max_tokens=24),
                                           priority=Priority.VOICE):
            if not parts:
                events.append("voice-first-token")
            parts.append(delta)
        events.append("voice-end")
        return "".join(parts)

    async with asyncio.timeout(120):
        http = asyncio.create_task(long_http_chat())
        await long_started.wait()
        answer = await voice_turn()
        await http
    first_voice = events.index("voice-first-token")
    assert first_voice < events.index("http-end")
    assert events.index("voice-end") < events.index("http-end")  # the whole voice turn, even
    assert "http-token" in events[events.index("voice-end"):]  # then the chat goes on
    assert long_stats.finish_reason in ("stop", "length") and long_stats.completion_tokens > 20
    assert "paris" in answer.lower()


async def test_a_preempted_generation_continues_the_same_text(real_llm) -> None:
    """Greedy decoding: the chat's text is the same whether or not a voice turn cut in."""
    params = SamplingParams(temperature=0.0, max_tokens=40)
    alone = "".join([d async for d in real_llm.stream(LONG, params)])
    parts: list[str] = []
    async with asyncio.timeout(120):
        stream = real_llm.stream(LONG, params)
        parts.append(await anext(stream))
        voice = [d async for d in real_llm.stream(SHORT, SamplingParams(max_tokens=8),
                                                  priority=Priority.VOICE)]
        parts.extend([d async for d in stream])
    assert voice and "".join(parts) == alone


async def test_warm_up_steps_aside_for_a_voice_turn(real_llm) -> None:
    persona = [{"role": "system", "content": "You are Ada, a patient tutor. " * 30}]
    async with asyncio.timeout(120):
        warming = asyncio.create_task(real_llm.warm_prefix("tutor", persona))
        await until(lambda: real_llm.busy_with is Priority.BACKGROUND)  # it is evaluating
        voice = [d async for d in real_llm.stream(SHORT, SamplingParams(max_tokens=8),
                                                  priority=Priority.VOICE)]
        assert voice and not warming.done()  # the voice turn did not wait for the warm-up
        await warming
    assert real_llm.has_prefix("tutor")


async def test_app_aclose_ends_the_llama_thread_and_frees_the_model(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    app = fake_app(make_settings(tmp_path, llm={"threads": 1, "nice": 0}), llm=None)
    async with asyncio.timeout(120):
        await app.start()  # builds the real model (llm=None): so aclose closes it
        (thread,) = [t for t in set(threading.enumerate()) - before if t.name == "llama"]
        assert (await app.conversation.reply_text("Hello!")).completed
        await app.aclose()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        await anext(app.llm.stream(SHORT, SamplingParams()))


async def test_an_injected_model_is_left_to_its_owner(tmp_path: Path, real_llm) -> None:
    app = fake_app(make_settings(tmp_path), llm=real_llm)
    async with asyncio.timeout(30):
        await app.start()
        await app.aclose()
        assert [d async for d in real_llm.stream(SHORT, SamplingParams(max_tokens=2))]


async def test_a_switch_right_after_start_does_not_wait_for_the_warm_up(
        tmp_path: Path, real_llm) -> None:
    app = fake_app(make_settings(tmp_path), llm=real_llm)
    async with asyncio.timeout(120):
        await app.start()
        warming = asyncio.create_task(app.conversation.warm_personas())  # as `run` does
        await until(lambda: real_llm.busy_with is Priority.BACKGROUND)
        result = await app.conversation.switch_persona("medication_nurse")
        assert not result.prefix_was_warm and not warming.done()
        await app.conversation.wait_prepared()  # its prompt, ahead of the other personas'
        assert app.conversation.prefix_ready("medication_nurse") and not warming.done()
        await warming
        await app.aclose()
