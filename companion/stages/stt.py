"""Speech to text: faster-whisper on CTranslate2, Whisper tiny.en by default.

``StreamingTranscription`` transcribes while the person talks: each pass decodes only the audio
after the words already agreed on (LocalAgreement of two passes), with those words as Whisper's
prompt, so when speech ends only the last piece is left to decode.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from companion.compute import ComputeGate
from companion.models import ModelRegistry
from companion.settings import SttSettings


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    audio_s: float


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds into the audio given
    end: float


class Transcriber(Protocol):
    model_name: str

    async def transcribe(self, pcm: bytes, *, language: str | None = None) -> Transcript:
        """``pcm``: 16 kHz 16-bit mono."""
        ...


class FasterWhisperTranscriber:
    def __init__(self, settings: SttSettings, registry: ModelRegistry, *,
                 gate: ComputeGate | None = None) -> None:
        from faster_whisper import WhisperModel  # heavy; import only when used

        resolved = registry.resolve(settings.model, kind="stt")
        self.model_name = resolved.entry.name
        self.settings = settings
        self.gate = gate or ComputeGate()
        self._model = WhisperModel(
            str(resolved.directory), device="cpu", compute_type=settings.compute_type,
            cpu_threads=settings.threads, local_files_only=True,
        )
        self._lock = threading.Lock()  # one transcription at a time on the shared model
        # one thread owns CTranslate2, so its OpenMP team is made once (see stages/llm.py)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisper")

    def close(self) -> None:
        """Stop the worker thread (App.aclose)."""
        self._thread.shutdown(wait=True, cancel_futures=True)

    async def transcribe(self, pcm: bytes, *, language: str | None = None) -> Transcript:
        audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._run, audio,
                                          language or self.settings.language)

    async def transcribe_words(self, pcm: bytes, *, prompt: str = "",
                               language: str | None = None) -> list[Word]:
        """The words of ``pcm`` with their times; ``prompt``: the words said just before."""
        audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._run_words, audio, prompt,
                                          language or self.settings.language)

    def _run_words(self, audio: np.ndarray, prompt: str, language: str) -> list[Word]:
        with self._lock, self.gate.priority():
            segments, _ = self._model.transcribe(
                audio, language=language, beam_size=self.settings.beam_size, vad_filter=False,
                condition_on_previous_text=False, word_timestamps=True,
                initial_prompt=prompt or None,
            )
            return [Word(w.word.strip(), w.start, w.end) for s in segments for w in (s.words or [])
                    if w.word.strip()]

    def _run(self, audio: np.ndarray, language: str) -> Transcript:
        # with timestamps: without them Whisper writes one segment and stops, and can drop what
        # follows a pause after a whole question ("What is the capital of Germany … and of
        # France?" heard as "What is the capital of Germany?"; scripts/bench_stt_timestamps.py)
        with self._lock, self.gate.priority():  # the user is waiting: background LLM work yields
            segments, info = self._model.transcribe(
                audio, language=language,
                beam_size=self.settings.beam_size, vad_filter=False,
                condition_on_previous_text=False, without_timestamps=False,
            )
            text = " ".join(s.text.strip() for s in segments).strip()
        return Transcript(text=text, language=info.language, audio_s=len(audio) / 16000)


class WordTranscriber(Transcriber, Protocol):
    async def transcribe_words(self, pcm: bytes, *, prompt: str = "",
                               language: str | None = None) -> list[Word]: ...


BYTES_PER_S = 32000  # 16 kHz, 16-bit mono
COMMIT_MARGIN_S = 0.3  # words ending this close to the end of the audio may still change


def _key(word: str) -> str:
    return "".join(c for c in word.lower() if c.isalnum())


def agreed_prefix(previous: list[Word], current: list[Word]) -> int:
    """How many leading words two passes agree on (ignoring case and punctuation)."""
    n = 0
    for a, b in zip(previous, current, strict=False):
        if _key(a.text) != _key(b.text):
            break
        n += 1
    return n


class StreamingTranscription:
    """One utterance, transcribed pass by pass while it grows (LocalAgreement-2).

    A word is committed once two consecutive passes agree on it and it ends more than
    ``COMMIT_MARGIN_S`` before the end of the audio; committed audio is cut off and the
    committed words become Whisper's prompt, so every pass (and the last one) is short."""

    def __init__(self, transcriber: WordTranscriber, *, language: str | None = None) -> None:
        self.transcriber = transcriber
        self.language = language
        self.committed: list[str] = []
        self.cut_s = 0.0  # audio before this (seconds into the utterance) is committed
        self._previous: list[Word] = []  # the last pass's uncommitted words, utterance times
        self._lock = asyncio.Lock()  # passes run one after the other, in order
        self.passes = 0
        self.decoded_s = 0.0  # audio seconds decoded over all passes (the CPU it costs)

    @property
    def committed_text(self) -> str:
        return " ".join(self.committed)

    async def update(self, pcm: bytes, *, final: bool = False) -> Transcript:
        """Decode what follows the committed words in ``pcm`` (the whole utterance so far) and
        return the best transcript of all of it. ``final``: nothing more will come."""
        async with self._lock:
            cut = round(self.cut_s * 16000) * 2
            tail = pcm[cut:]
            audio_s = len(pcm) / BYTES_PER_S
            words: list[Word] = []
            if len(tail) >= BYTES_PER_S // 10:  # Whisper invents words for a sliver of audio
                found = await self.transcriber.transcribe_words(
                    tail, prompt=self.committed_text, language=self.language)
                words = [Word(w.text, w.start + self.cut_s, w.end + self.cut_s) for w in found]
                self.passes += 1
                self.decoded_s += len(tail) / BYTES_PER_S
            if not final:
                agreed = agreed_prefix(self._previous, words)
                stable = [w for w in words[:agreed] if w.end <= audio_s - COMMIT_MARGIN_S]
                if stable:
                    self.committed.extend(w.text for w in stable)
                    self.cut_s = stable[-1].end
                    words = words[len(stable):]
                self._previous = words
            text = " ".join([*self.committed, *(w.text for w in words)]).strip()
            return Transcript(text=text, language=self.language or "", audio_s=audio_s)
