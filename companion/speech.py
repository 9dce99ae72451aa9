"""Speaking: synthesize sentence n+1 while sentence n plays, and stop at once when asked.

Everything that speaks (a turn's reply, `say`, announcements, timers) goes through here, one
utterance at a time, so two voices never talk over each other. ``stop()`` cancels whatever is
speaking (barge-in, the stop command, a button).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog

from companion.devices.audio import AudioSink, AudioUnavailableError
from companion.events import EventBus, EventType
from companion.stages.sentences import split_sentences
from companion.stages.tts import AudioClip, Synthesizer, VoiceParams

log = structlog.get_logger(__name__)


@dataclass
class SpeechStats:
    sentences: int = 0
    first_tts_s: float | None = None  # synthesis time of the first sentence
    first_audio_at: float | None = None  # perf_counter when the first audio started playing
    audio_s: float = 0.0
    completed: bool = False
    played: list[str] = field(default_factory=list)  # what the user heard (a cut sentence: its start)

    @property
    def played_text(self) -> str:
        return " ".join(self.played)


class SpeechOutput:
    def __init__(self, tts: Synthesizer, sink: AudioSink | None, bus: EventBus, *,
                 sentence_silence_s: float = 0.15) -> None:
        self.tts = tts
        self.sink = sink
        self.bus = bus
        self.sentence_silence_s = sentence_silence_s
        self._lock = asyncio.Lock()
        self._speaking: set[asyncio.Task] = set()
        self.playing = asyncio.Event()  # set while audio is being handed to the speaker
        # sentences on the speaker now or lately: (text, start, end) on the sink's clock; the
        # wake word said by the device itself is recognised by them
        self.recent: deque[list] = deque(maxlen=4)  # [text, start, end or None]

    @property
    def speaking(self) -> bool:
        return bool(self._speaking)

    def stop(self) -> bool:
        """Cancel everything that is speaking now (not the caller). True if anything was."""
        me = asyncio.current_task()
        stopped = False
        for task in list(self._speaking):
            if task is not me and not task.done():
                task.cancel()
                stopped = True
        return stopped

    async def say(self, text: str, voice: VoiceParams, *, turn_id: str | None = None,
                  interrupt: bool = False) -> SpeechStats:
        """Speak ``text`` (split into sentences). ``interrupt`` stops current speech first;
        otherwise it waits for it to finish."""
        async def sentences() -> AsyncIterator[str]:
            for sentence in split_sentences(text):
                yield sentence

        return await self.speak(sentences(), voice, turn_id=turn_id, interrupt=interrupt)

    def clock(self) -> float:
        """The speaker's clock (a simulated room has its own)."""
        clock = getattr(self.sink, "clock", None)
        return clock() if clock is not None else time.monotonic()

    def said_lately(self, words: set[str], within_s: float) -> bool:
        """Whether a sentence playing now, or ended less than ``within_s`` ago, has any of
        ``words`` (lower case)."""
        now = self.clock()
        for text, _, ended in self.recent:
            if ended is None or now - ended <= within_s:
                heard = {w.strip(".,!?;:'\"").lower() for w in text.split()}
                if heard & words:
                    return True
        return False

    async def speak(self, sentences: AsyncIterable[str], voice: VoiceParams, *,
                    turn_id: str | None = None, interrupt: bool = False,
                    on_first_audio=None, stats: SpeechStats | None = None,
                    prepared: dict[str, Awaitable[AudioClip]] | None = None) -> SpeechStats:
        """Speak the sentences; ``stats`` (if given) is filled in even when cut short.
        ``prepared``: sentences already being synthesized (a speculative answer's first one)."""
        stats = stats if stats is not None else SpeechStats()
        async with self._turn_at_the_speaker(interrupt):
            await self._pipeline(sentences, voice, turn_id, stats, on_first_audio,
                                 dict(prepared or {}))
        stats.completed = True
        return stats

    async def play_clip(self, clip: AudioClip, *, turn_id: str | None = None,
                        interrupt: bool = False, label: str = "(audio)") -> None:
        """Play recorded audio (a control-plane clip) the way speech is played: one at a time,
        stoppable, with playback events."""
        async with self._turn_at_the_speaker(interrupt):
            assert self.sink is not None
            self.bus.emit(EventType.PLAYBACK_START, turn_id, text=label,
                          audio_s=round(clip.duration_s, 3))
            try:
                await self._play(clip)
            finally:
                self.bus.emit(EventType.PLAYBACK_END, turn_id, text=label)

    async def _play_sentence(self, sentence: str, clip: AudioClip, stats: SpeechStats) -> None:
        started = self.clock()
        entry: list = [sentence, started, None]
        self.recent.append(entry)
        try:
            await self._play(clip)
        except asyncio.CancelledError:
            heard = (self.clock() - started) / clip.duration_s if clip.duration_s else 0.0
            words = sentence.split()
            kept = words[:int(len(words) * min(1.0, heard))]
            if kept:
                stats.played.append(" ".join(kept) + "…")
            raise
        finally:
            entry[2] = self.clock()
        stats.played.append(sentence)

    async def _play(self, clip: AudioClip) -> None:
        assert self.sink is not None
        self.playing.set()
        try:
            await self.sink.play(clip)
        finally:
            self.playing.clear()

    @asynccontextmanager
    async def _turn_at_the_speaker(self, interrupt: bool):
        """Wait for the speaker (or take it, with ``interrupt``); ``stop()`` can cancel us."""
        if self.sink is None:
            raise AudioUnavailableError("no audio output device: cannot speak")
        if interrupt:
            self.stop()
        task = asyncio.current_task()
        assert task is not None
        self._speaking.add(task)
        try:
            async with self._lock:
                yield
        finally:
            self._speaking.discard(task)

    async def _pipeline(self, sentences: AsyncIterable[str], voice: VoiceParams,
                        turn_id: str | None, stats: SpeechStats, on_first_audio,
                        prepared: dict[str, Awaitable[AudioClip]]) -> None:
        # synthesis runs at most two sentences ahead of playback; the queue itself is unbounded
        # so the end marker can always be put, even by a cancelled producer
        clips: asyncio.Queue[tuple[str, AudioClip] | None] = asyncio.Queue()
        ahead = asyncio.Semaphore(2)

        async def synthesize_all() -> None:
            try:
                async for sentence in sentences:
                    await ahead.acquire()
                    started = time.perf_counter()
                    self.bus.emit(EventType.TTS_START, turn_id, text=sentence)
                    ready = prepared.pop(sentence, None)
                    clip = await (ready if ready is not None else self.tts.synthesize(sentence, voice))
                    took = time.perf_counter() - started
                    if stats.first_tts_s is None:
                        stats.first_tts_s = took
                    self.bus.emit(EventType.TTS_END, turn_id, text=sentence,
                                  audio_s=round(clip.duration_s, 3), took_s=round(took, 4))
                    clips.put_nowait((sentence, clip))
            finally:
                clips.put_nowait(None)
                close = getattr(sentences, "aclose", None)
                if close is not None:  # barge-in: the LLM behind the sentences stops now
                    await close()

        producer = asyncio.create_task(synthesize_all(), name="tts-producer")
        try:
            while (item := await clips.get()) is not None:
                sentence, clip = item
                if stats.first_audio_at is None:
                    stats.first_audio_at = time.perf_counter()
                    if on_first_audio is not None:
                        on_first_audio()
                self.bus.emit(EventType.PLAYBACK_START, turn_id, text=sentence,
                              audio_s=round(clip.duration_s, 3))
                await self._play_sentence(sentence, clip, stats)
                if self.sentence_silence_s:
                    await self._play(AudioClip.silence(self.sentence_silence_s, clip.sample_rate))
                ahead.release()
                stats.sentences += 1
                stats.audio_s += clip.duration_s
                self.bus.emit(EventType.PLAYBACK_END, turn_id, text=sentence)
            await producer  # re-raise a synthesis error
        finally:
            if not producer.done():
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
