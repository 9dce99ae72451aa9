"""Speech to text: faster-whisper on CTranslate2, Whisper tiny.en by default."""

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

    def _run(self, audio: np.ndarray, language: str) -> Transcript:
        with self._lock, self.gate.priority():  # the user is waiting: background LLM work yields
            segments, info = self._model.transcribe(
                audio, language=language,
                beam_size=self.settings.beam_size, vad_filter=False,
                condition_on_previous_text=False, without_timestamps=True,
            )
            text = " ".join(s.text.strip() for s in segments).strip()
        return Transcript(text=text, language=info.language, audio_s=len(audio) / 16000)
