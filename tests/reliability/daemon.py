"""`companion run` (the same `cmd_run`: HTTP API, control link, voice loop, store, signal
handlers) with fake models and a fake microphone, for the faults that are about the process
and its store rather than the models: the kill tests need a reply, a summary or a spoken
message to stop at a known point and stay there until the SIGKILL, which the real models cannot
be told to do. Started by `Fleet.start_daemon(name, args=DAEMON)`; configured like the daemon
(COMPANION_* variables) plus:

    RELIABILITY_HOLD_LLM   voice | summary: that generation streams its first words, logs
                           "test hold" and then waits for ever (until the kill)
    RELIABILITY_HOLD_TTS   words: synthesizing a text that contains them logs "test hold" and
                           waits for ever
    RELIABILITY_HEARD      what the fake speech recognizer hears in every utterance

The microphone is endless and real-time: 0.6 s of "speech" then 1.2 s of silence, over and over
(the fake wake word never fires); a turn starts with `POST /v1/commands {"command": "listen"}`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog

from companion.__main__ import EXIT_CONFIG, cmd_run
from companion.conversation import SUMMARY_PROMPT
from companion.log import configure_logging
from companion.settings import describe_validation_error, load_settings
from companion.stages.llm import ChatMessage, GenerationStats, Priority, SamplingParams
from companion.stages.tts import AudioClip, VoiceParams
from tests.fakes import (
    BLOCK,
    FakeChatModel,
    FakeSpeaker,
    FakeSynthesizer,
    FakeTranscriber,
    FakeVad,
    FakeWake,
    speech_block,
)

log = structlog.get_logger("tests.reliability.daemon")

DAEMON = ["-m", "tests.reliability.daemon"]  # Fleet.start_daemon(..., args=DAEMON)
HOLD = "test hold"  # the log line that says the process is now where the test wants it


async def hold(what: str) -> None:
    log.warning(HOLD, what=what)
    await asyncio.Event().wait()  # only the SIGKILL (or a cancellation) ends this


class HoldingChatModel(FakeChatModel):
    """A fake LLM whose voice replies or summaries stop half-way (``hold``)."""

    def __init__(self, hold: str) -> None:
        super().__init__("I will remember that. It is a lovely name. Tell me more.", delay_s=0.005)
        self.hold = hold

    def holds(self, messages: list[ChatMessage], priority: Priority) -> bool:
        if self.hold == "voice":
            return priority == Priority.VOICE
        return self.hold == "summary" and messages[0]["content"] == SUMMARY_PROMPT

    async def stream(self, messages: list[ChatMessage], params: SamplingParams,
                     stats: GenerationStats | None = None, *,
                     priority: Priority = Priority.INTERACTIVE) -> AsyncIterator[str]:
        sent = 0
        async for piece in super().stream(messages, params, stats, priority=priority):
            yield piece
            sent += 1
            if sent == 3 and self.holds(messages, priority):
                await hold(f"llm {self.hold}")


class HoldingSynthesizer(FakeSynthesizer):
    def __init__(self, hold: str) -> None:
        super().__init__()
        self.hold = hold

    async def synthesize(self, text: str, voice: VoiceParams) -> AudioClip:
        if self.hold and self.hold in text:
            await hold("tts")
        return await super().synthesize(text, voice)


class LoopMic:
    """An endless real-time microphone: speech then silence, over and over."""

    name = "loop-mic"

    def __init__(self, speech_blocks: int = 20, silence_blocks: int = 40) -> None:
        self.pattern = [speech_block()] * speech_blocks + [BLOCK] * silence_blocks
        self.dropped_blocks = 0
        self.last_block_at = 0.0

    async def blocks(self) -> AsyncIterator[bytes]:
        block_s = len(BLOCK) / 2 / 16000
        next_at = time.monotonic()
        while True:
            for block in self.pattern:
                next_at += block_s
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                self.last_block_at = time.monotonic()
                yield block


def parts() -> dict[str, Any]:
    env = os.environ.get
    return {"llm": HoldingChatModel(env("RELIABILITY_HOLD_LLM", "")),
            "tts": HoldingSynthesizer(env("RELIABILITY_HOLD_TTS", "")),
            "stt": FakeTranscriber(env("RELIABILITY_HEARD", "my name is Ada")),
            "wake": FakeWake(), "vad": FakeVad(), "source": LoopMic(), "sink": FakeSpeaker()}


def main() -> int:
    try:
        settings = load_settings(None)
    except Exception as exc:
        print(f"companion: invalid settings: {describe_validation_error(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(cmd_run(settings, **parts()))


if __name__ == "__main__":
    sys.exit(main())
