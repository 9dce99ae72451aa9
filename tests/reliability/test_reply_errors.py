"""The LLM or the TTS failing in the middle of a reply: the user hears a short apology in the
persona's voice, the failure is an event (``turn-error``) and a metric
(``companion_voice_turns_total{outcome="error"}``), and the next turn works.

The real-process case runs ``companion simulate`` on the real STT, TTS and wake word, with the
remote LLM backend (fallback off) pointing at a loopback server that dies in the middle of its
first streamed reply and answers the next one; its twin below runs in-process with a synthesizer
that fails on a reply's second sentence (a TTS cannot be made to fail mid-reply from outside)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from aiohttp import web

from companion.devices.audio import read_wav_16k_mono, write_wav
from companion.events import EventType
from companion.settings import PROJECT_ROOT
from scripts.make_utterance_wav import make, silence
from tests.conftest import fake_app, make_settings
from tests.fakes import BLOCK, FakeChatModel, FakeMic, FakeSynthesizer, speech_block, wake_block

APOLOGY = "Sorry, something went wrong."
SECOND_ANSWER = "Two plus two is four."


class DyingLLMServer:
    """An OpenAI-compatible chat endpoint on 127.0.0.1: a reply about the sea breaks off after a
    sentence and a half (the connection is cut, as when the server is killed); others are whole."""

    def __init__(self) -> None:
        self.requests = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{self.port}/v1"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @staticmethod
    def _chunk(text: str, finish: str | None = None) -> bytes:
        data = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": {"content": text} if text else {},
                             "finish_reason": finish}]}
        return f"data: {json.dumps(data)}\n\n".encode()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests += 1
        asked = str(body["messages"][-1]["content"]).lower()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if "sea" in asked:  # every answer about the sea breaks off (a speculative one too)
            for piece in ("The sea is ", "very big. ", "It covers "):
                await response.write(self._chunk(piece))
                await asyncio.sleep(0.05)
            request.transport.abort()  # type: ignore[union-attr]  # killed mid-reply
            return response
        for piece in ("Two plus two ", "is four."):
            await response.write(self._chunk(piece))
        await response.write(self._chunk("", "stop") + b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.mark.models
async def test_the_llm_dying_mid_reply_is_an_apology_then_the_next_turn_works(tmp_path: Path):
    questions = [make(tmp_path / f"q{i}.wav", wake="Hey Jarvis.", text=text) for i, text in
                 enumerate(["Tell me about the sea.", "What is two plus two?"])]
    pcm = b"".join(read_wav_16k_mono(q) + silence(3.0) for q in questions)
    write_wav(tmp_path / "mic.wav", pcm)
    server = DyingLLMServer()
    base_url = await server.start()
    env = {**os.environ, "COMPANION_LOG_FORMAT": "json", "COMPANION_LLM__BACKEND": "openai",
           "COMPANION_LLM__BASE_URL": base_url, "COMPANION_LLM__FALLBACK": "false",
           "COMPANION_LLM__REMOTE_FIRST_TOKEN_S": "30", "COMPANION_PIPELINE__FOLLOW_UP_WINDOW_S": "0"}
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "companion", "simulate", "--input", str(tmp_path / "mic.wav"),
            "--output", str(tmp_path / "out.wav"), "--events", str(tmp_path / "events.jsonl"),
            "--fast", "--data-dir", str(tmp_path / "data"), env=env, cwd=PROJECT_ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(240):
            stdout, stderr = await process.communicate()
    finally:
        await server.stop()
    assert process.returncode == 0, stderr.decode()[-3000:]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    starts = [e["turn_id"] for e in events if e["type"] == "turn-start"]
    assert len(starts) == 2 and server.requests >= 2, (starts, server.requests)
    first = [e for e in events if e["turn_id"] == starts[0]]
    second = [e for e in events if e["turn_id"] == starts[1]]
    errors = [e for e in first if e["type"] == "turn-error"]
    assert len(errors) == 1 and errors[0]["code"] == "turn-failed", first
    spoken = [e["text"] for e in first if e["type"] == "tts-start"]
    assert spoken[0] == "The sea is very big." and spoken[-1] == APOLOGY  # mid-reply, then sorry
    assert "turn-end" in [e["type"] for e in second]
    assert [e["text"] for e in second if e["type"] == "llm-end"] == [SECOND_ANSWER]
    assert json.loads(stdout)["output_audio_s"] > 1.0


STORY = "First the waves. Then the whales. Then the deep."


class FailingSecondSentence(FakeSynthesizer):
    """Synthesis that fails once, on the second sentence of the first reply."""

    failed = False

    async def synthesize(self, text, voice=None):
        if text == "Then the whales." and not self.failed:
            self.failed = True
            raise RuntimeError("piper: voice model unreadable")
        return await super().synthesize(text, voice)


async def test_the_tts_failing_mid_reply_apologises_in_the_personas_voice(tmp_path: Path):
    turn = [BLOCK] * 5 + [wake_block()] + [speech_block()] * 20 + [BLOCK] * 40
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    tts = FailingSecondSentence()
    app = fake_app(settings, source=FakeMic(turn + [BLOCK] * 100 + turn, delay_s=0.01),
                   llm=FakeChatModel(STORY), tts=tts)
    events = []
    app.bus.add_callback(events.append)
    await app.start()
    voice = app.conversation.active_persona.voice_config.params()
    async with asyncio.timeout(15):  # the fake microphone's end ends the loop
        await app.voice.run()
        await app.voice.wait_idle()
    # the first sentence was said, then the apology, in the persona's voice; then a whole reply
    assert tts.spoken[:2] == [("First the waves.", voice), (APOLOGY, voice)]
    assert [text for text, _ in tts.spoken[2:]] == ["First the waves.", "Then the whales.",
                                                    "Then the deep."]
    errors = [e for e in events if e.type is EventType.TURN_ERROR]
    assert len(errors) == 1 and "voice model unreadable" in errors[0].data["message"]
    assert app.metrics.total("companion_voice_turns_total", outcome="error") == 1
    assert app.metrics.total("companion_voice_turns_total", outcome="completed") == 1
    await app.aclose()
