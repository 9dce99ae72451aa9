"""Fakes for the stage Protocols. They are injected through build_app's keyword arguments;
every fake-backed test has a twin with the real component (marked `models` or `audio`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from companion.stages.llm import ChatMessage, GenerationStats, Priority, SamplingParams
from companion.stages.stt import Transcript, Word
from companion.stages.tts import AudioClip, VoiceParams
from companion.stages.wake import Detection

RATE = 16000
BLOCK = b"\x00\x00" * 480  # 30 ms of silence


def speech_block() -> bytes:
    """30 ms that FakeVad calls speech."""
    return b"\x10\x10" * 480


def wake_block() -> bytes:
    return b"WAKE" + speech_block()[4:]


class FakeMic:
    """Yields the given blocks (paced by `delay_s`), then ends like a WAV file does."""

    def __init__(self, blocks: list[bytes], *, delay_s: float = 0.0) -> None:
        self._blocks = blocks
        self.delay_s = delay_s
        self.name = "fake-mic"
        self.dropped_blocks = 0
        self.last_block_at = 0.0

    async def blocks(self) -> AsyncIterator[bytes]:
        for block in self._blocks:
            await asyncio.sleep(self.delay_s)
            yield block


class FakeWake:
    def __init__(self) -> None:
        self.words = ["hey_jarvis"]
        self.seen = 0

    async def process(self, block: bytes) -> Detection | None:
        self.seen += 1
        if block.startswith(b"WAKE"):
            return Detection("hey_jarvis", 0.99, self.seen * 0.03)
        return None

    def reset(self) -> None:
        pass


class FakeVad:
    def is_speech(self, frame: bytes) -> bool:
        return frame[4:6] != b"\x00\x00"


class FakeTranscriber:
    model_name = "fake-stt"

    def __init__(self, text: str = "what is the capital of france", *, delay_s: float = 0.0):
        self.text = text
        self.delay_s = delay_s
        self.received: list[bytes] = []

    async def transcribe(self, pcm: bytes, *, language: str | None = None) -> Transcript:
        self.received.append(pcm)
        await asyncio.sleep(self.delay_s)
        return Transcript(self.text, "en", len(pcm) / 2 / RATE)


class FakeChatModel:
    """Streams a scripted reply a few characters at a time; records every prompt."""

    model_name = "fake-llm"
    context_length = 2048

    def __init__(self, reply: str = "Paris is the capital. It is lovely.", *,
                 delay_s: float = 0.0, chunk: int = 4) -> None:
        self.reply = reply
        self.delay_s = delay_s
        self.chunk = chunk
        self.prompts: list[list[ChatMessage]] = []
        self.prefixes: dict[str, list[ChatMessage]] = {}
        self.cancelled = 0
        self.priorities: list[Priority] = []  # of each stream() call, in call order
        self.warm_priorities: dict[str, Priority] = {}  # of each warm_prefix() call, by key
        self.warm_release: asyncio.Event | None = None  # set: warm-ups wait for it (a busy LLM)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def stream(self, messages: list[ChatMessage], params: SamplingParams,
                     stats: GenerationStats | None = None, *,
                     priority: Priority = Priority.INTERACTIVE) -> AsyncIterator[str]:
        self.prompts.append(list(messages))
        self.priorities.append(priority)
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = sum(len(m["content"].split()) for m in messages)
        text = self.reply[: params.max_tokens * 8]
        try:
            for i in range(0, len(text), self.chunk):
                await asyncio.sleep(self.delay_s)
                piece = text[i : i + self.chunk]
                stats.completion_tokens += 1
                yield piece
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        stats.finish_reason = "stop"

    async def warm_prefix(self, key: str, messages: list[ChatMessage], *,
                          priority: Priority = Priority.BACKGROUND) -> None:
        self.warm_priorities[key] = priority
        if self.warm_release is not None:
            await self.warm_release.wait()
        self.prefixes[key] = list(messages)

    def has_prefix(self, key: str) -> bool:
        return key in self.prefixes


class FakeSynthesizer:
    """0.1 s of 16 kHz audio per word."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.spoken: list[tuple[str, VoiceParams]] = []

    def has_voice(self, voice: str) -> bool:
        return voice.startswith("en_US")

    async def synthesize(self, text: str, voice: VoiceParams) -> AudioClip:
        self.spoken.append((text, voice))
        await asyncio.sleep(self.delay_s)
        return AudioClip(b"\x01\x00" * int(0.1 * RATE * len(text.split())), RATE)


class FakeSpeaker:
    """Records what is played; `realtime` sleeps for the audio's duration like a speaker."""

    def __init__(self, *, realtime: bool = False, speed: float = 1.0) -> None:
        self.name = "fake-speaker"
        self.volume = 1.0
        self.realtime = realtime
        self.speed = speed
        self.played: list[AudioClip] = []

    async def play(self, clip: AudioClip) -> None:
        self.played.append(clip)
        if self.realtime:
            await asyncio.sleep(clip.duration_s / self.speed)

    @property
    def played_s(self) -> float:
        return sum(c.duration_s for c in self.played)


class FakeTurnChatModel(FakeChatModel):
    """A chat model that also judges end of turn: complete when the words end with one of
    ``complete_endings``. Records what it judged."""

    def __init__(self, *args, complete_endings: tuple[str, ...] = ("germany", "france"),
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.complete_endings = complete_endings
        self.judged: list[str] = []

    async def end_of_turn_probability(self, messages: list[ChatMessage], *,
                                      priority: Priority = Priority.VOICE) -> float:
        words = messages[-1]["content"]
        self.judged.append(words)
        return 0.9 if words.rstrip(" .?!").lower().endswith(self.complete_endings) else 0.001


class BlockWordsTranscriber(FakeTranscriber):
    """Hears one word per ``blocks_per_word`` speech blocks (``speech_block()``), in order, with
    the times of those blocks in the audio it is given; a prompt of N words means the audio
    starts at word N. Counts the audio it decoded, like a real model's cost."""

    def __init__(self, words: list[str], *, blocks_per_word: int = 5) -> None:
        super().__init__(" ".join(words))
        self.words = words
        self.blocks_per_word = blocks_per_word
        self.decoded_s = 0.0

    def _hear(self, pcm: bytes, first_word: int) -> list[Word]:
        block = len(speech_block())
        speech = [i for i in range(0, len(pcm) - block + 1, block)
                  if pcm[i : i + block] == speech_block()]
        heard = []
        for k in range(len(speech) // self.blocks_per_word):
            index = first_word + k
            if index >= len(self.words):
                break
            first, last = speech[k * self.blocks_per_word], speech[(k + 1) * self.blocks_per_word - 1]
            heard.append(Word(self.words[index], first / 2 / RATE, (last + block) / 2 / RATE))
        return heard

    async def transcribe(self, pcm: bytes, *, language: str | None = None) -> Transcript:
        self.received.append(pcm)
        self.decoded_s += len(pcm) / 2 / RATE
        return Transcript(" ".join(w.text for w in self._hear(pcm, 0)), "en", len(pcm) / 2 / RATE)

    async def transcribe_words(self, pcm: bytes, *, prompt: str = "",
                               language: str | None = None) -> list[Word]:
        self.received.append(pcm)
        self.decoded_s += len(pcm) / 2 / RATE
        return self._hear(pcm, len(prompt.split()))
