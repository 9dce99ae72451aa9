"""Text to speech: piper, one sentence at a time, voices kept loaded in a small LRU cache."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from companion.compute import ComputeGate, quiet_onnx_session_options
from companion.models import ModelRegistry
from companion.settings import TtsSettings


@dataclass(frozen=True)
class VoiceParams:
    """How to speak: which voice and how. Personas carry one of these."""

    voice: str = "en_US-joe-medium"
    speaker_id: int | None = None
    length_scale: float = 1.0  # > 1 slower
    volume: float = 1.0


@dataclass(frozen=True)
class AudioClip:
    pcm: bytes  # 16-bit mono
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate

    @classmethod
    def silence(cls, seconds: float, sample_rate: int) -> AudioClip:
        return cls(bytes(2 * int(seconds * sample_rate)), sample_rate)


class Synthesizer(Protocol):
    async def synthesize(self, text: str, voice: VoiceParams) -> AudioClip: ...

    def has_voice(self, voice: str) -> bool: ...


class PiperSynthesizer:
    def __init__(self, settings: TtsSettings, registry: ModelRegistry, *,
                 gate: ComputeGate | None = None) -> None:
        import piper  # noqa: F401  heavy; fail here, at start, if it is missing

        self.settings = settings
        self.gate = gate or ComputeGate()
        self._registry = registry
        self._voices: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self.load_voice(settings.voice)

    def has_voice(self, voice: str) -> bool:
        return self._registry.has(voice, kind="tts")

    def load_voice(self, name: str):
        """The loaded voice, from the cache or from disk (the oldest unused one is dropped)."""
        with self._lock:
            if name in self._voices:
                self._voices.move_to_end(name)
                return self._voices[name]
        resolved = self._registry.resolve(name, kind="tts")
        config = resolved.config_file
        voice = _load_piper(resolved.file, config, threads=self.settings.threads)
        with self._lock:
            self._voices[name] = voice
            while len(self._voices) > self.settings.voice_cache_size:
                self._voices.popitem(last=False)
        return voice

    @property
    def loaded_voices(self) -> list[str]:
        return list(self._voices)

    async def synthesize(self, text: str, voice: VoiceParams) -> AudioClip:
        return await asyncio.to_thread(self._run, text, voice)

    def _run(self, text: str, params: VoiceParams) -> AudioClip:
        from piper import SynthesisConfig

        voice = self.load_voice(params.voice)
        config = SynthesisConfig(
            speaker_id=params.speaker_id, length_scale=params.length_scale,
            volume=params.volume, normalize_audio=True,
        )
        sample_rate = voice.config.sample_rate  # type: ignore[attr-defined]
        with self.gate.priority():  # the user is waiting for this sentence: the LLM steps aside
            parts = [chunk.audio_int16_bytes
                     for chunk in voice.synthesize(text, syn_config=config)]  # type: ignore[attr-defined]
        pcm = b"".join(parts)
        if not pcm:
            pcm = np.zeros(0, dtype=np.int16).tobytes()
        return AudioClip(pcm, sample_rate)


def _load_piper(model: Path, config: Path | None, *, threads: int):
    """PiperVoice.load, but with an onnxruntime session that does not spin (see compute.py)."""
    import json

    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig
    from piper.voice import ESPEAK_DATA_DIR

    config_path = config or Path(f"{model}.json")
    with open(config_path, encoding="utf-8") as fh:
        config_dict = json.load(fh)
    session = onnxruntime.InferenceSession(
        str(model), sess_options=quiet_onnx_session_options(threads),
        providers=["CPUExecutionProvider"],
    )
    return PiperVoice(config=PiperConfig.from_dict(config_dict), session=session,
                      espeak_data_dir=Path(ESPEAK_DATA_DIR), download_dir=Path.cwd())
