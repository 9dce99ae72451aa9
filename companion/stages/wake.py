"""Wake word detection: openWakeWord on onnxruntime, several words at once.

The detector is fed 16 kHz 16-bit mono blocks of any length; it buffers them into the 80 ms
chunks openWakeWord wants. Thresholds are per word; a refractory period, counted in audio
seconds, stops one utterance of the word firing twice.
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from companion.models import ModelRegistry
from companion.settings import WakeSettings
from companion.stages.vad import RecentAudio, SpeechClassifier, WebRtcVad

CHUNK_SAMPLES = 1280  # 80 ms at 16 kHz, openWakeWord's frame
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Detection:
    word: str
    score: float
    audio_time_s: float  # audio seconds since the detector started, at the chunk that fired


class WakeDetector(Protocol):
    words: list[str]

    async def process(self, block: bytes) -> Detection | None: ...

    def reset(self) -> None: ...


class WakeScorer:
    """Pure part: per-word thresholds and the refractory period over a stream of scores."""

    def __init__(self, settings: WakeSettings) -> None:
        self.settings = settings
        self._last_fired: dict[str, float] = {}

    def forget(self) -> None:
        self._last_fired.clear()

    def decide(self, scores: dict[str, float], audio_time_s: float) -> Detection | None:
        best: Detection | None = None
        for word, score in scores.items():
            if score < self.settings.threshold_for(word):
                continue
            last = self._last_fired.get(word)
            if last is not None and audio_time_s - last < self.settings.refractory_s:
                continue
            if best is None or score > best.score:
                best = Detection(word, float(score), audio_time_s)
        if best is not None:
            self._last_fired[best.word] = audio_time_s
        return best


class SpeechGate:
    """When the wake word detector needs to score at all: around speech.

    openWakeWord scores every 80 ms whatever it hears; in a quiet room that is all of the
    daemon's idle CPU. A wake word is speech, so the gate keeps the last ``context_s`` of audio
    and, once speech is heard (webrtcvad, lenient), hands over that context and then every
    block, until ``hold_s`` without speech. The context lets the detector fill its
    feature window from the room's audio before the word, as it does at start-up."""

    # speech in 8 of the last 12 blocks (0.24 of 0.36 s): a knock is 4-5 blocks to webrtcvad,
    # "hey jarvis" 30 or more; the context holds the word's start, so opening mid-word is in time
    START_BLOCKS, WINDOW_BLOCKS = 8, 12

    def __init__(self, classifier: SpeechClassifier, *, context_s: float, hold_s: float) -> None:
        self.classifier = classifier
        self.hold_s = hold_s
        self._context = RecentAudio(int(context_s * SAMPLE_RATE) * 2)
        self._recent: deque[bool] = deque(maxlen=self.WINDOW_BLOCKS)
        self.open = False
        self._quiet_s = 0.0

    def feed(self, block: bytes) -> tuple[bytes | None, bool]:
        """The audio to score now (None: rest) and whether it starts afresh (the context)."""
        seconds = len(block) / (2 * SAMPLE_RATE)
        speech = self.classifier.is_speech(block)
        if self.open:
            self._quiet_s = 0.0 if speech else self._quiet_s + seconds
            if self._quiet_s >= self.hold_s:
                self.reset()
            return block, False
        self._context.append(block)
        self._recent.append(speech)
        if sum(self._recent) < self.START_BLOCKS:
            return None, False
        audio = self._context.take()
        self.reset()
        self.open = True
        return audio, True

    def reset(self) -> None:
        self.open = False
        self._context.clear()
        self._recent.clear()
        self._quiet_s = 0.0


def _import_openwakeword_model() -> type:
    """openWakeWord's ``Model``, without the custom-verifier trainer its package imports.

    ``openwakeword/__init__`` imports ``custom_verifier_model`` (to train verifiers), which
    imports scikit-learn and SciPy: 9.8 s of a 10 s import on the loaded 2-core machine, 1.0-1.7
    s without (``python -c "import openwakeword.model"``), and the wake word was the slowest
    model to load, so start-up waited on it. The daemon never trains or loads verifiers
    (``Model`` only unpickles the ones it is given), so the trainer module is a stand-in that
    says so when called. Pinned openwakeword 0.5.1; a real import made earlier is kept."""
    name = "openwakeword.custom_verifier_model"
    if "openwakeword" not in sys.modules and name not in sys.modules:
        stand_in = types.ModuleType(name, "not loaded by the companion daemon")

        def train_custom_verifier(*args, **kwargs):
            raise RuntimeError("openWakeWord's verifier training is not loaded in the companion "
                               "daemon; run it in a separate Python")

        stand_in.train_custom_verifier = train_custom_verifier  # type: ignore[attr-defined]
        sys.modules[name] = stand_in
    from openwakeword.model import Model

    return Model


class OpenWakeWordDetector:
    def __init__(self, settings: WakeSettings, registry: ModelRegistry) -> None:
        model_class = _import_openwakeword_model()  # heavy; imported only when used

        paths = []
        for word in settings.models:
            resolved = registry.resolve(word, kind="wake")
            paths.append(str(resolved.file))
        self._model = model_class(wakeword_models=paths, inference_framework="onnx")
        # openWakeWord names each model after its file stem ("hey_jarvis_v0.1"); map back.
        self._names = {stem: word for stem, word in zip(self._model.models, settings.models, strict=True)}
        self.words = list(settings.models)
        self._scorer = WakeScorer(settings)
        features = self._model.preprocessor
        self._clean_features = (features.melspectrogram_buffer.copy(), features.feature_buffer.copy())
        self._pending = np.zeros(0, dtype=np.int16)
        self._samples_seen = 0  # audio time of the next chunk scored
        self._samples_heard = 0  # audio time of all blocks given, scored or not
        self.chunks_scored = 0  # what openWakeWord cost: 80 ms chunks it scored
        self._gate = None
        if settings.speech_gate:
            # lenient (mode 1): a quiet "hey" must open the gate; noise only costs CPU
            self._gate = SpeechGate(WebRtcVad(1), context_s=settings.gate_context_s,
                                    hold_s=settings.gate_hold_s)
        # one thread of its own: openWakeWord's state is not shared, and the same thread's
        # warm caches score the next chunk cheaper than a pool's next free thread does
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wake")

    async def process(self, block: bytes) -> Detection | None:
        self._samples_heard += len(block) // 2
        if self._gate is not None:
            scored, afresh = self._gate.feed(block)
            if scored is None:
                return None
            if afresh:  # from the state at start-up, on the audio just before the speech
                self._clear_buffers()
                self._samples_seen = self._samples_heard - len(scored) // 2
            block = scored
        self._pending = np.concatenate([self._pending, np.frombuffer(block, dtype=np.int16)])
        if len(self._pending) < CHUNK_SAMPLES:
            return None
        usable = len(self._pending) - len(self._pending) % CHUNK_SAMPLES
        audio, self._pending = self._pending[:usable], self._pending[usable:]
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._predict_chunks,
                                                                audio)

    def _predict_chunks(self, audio: np.ndarray) -> Detection | None:
        found = None
        for start in range(0, len(audio), CHUNK_SAMPLES):
            raw = self._model.predict(audio[start : start + CHUNK_SAMPLES])
            self._samples_seen += CHUNK_SAMPLES
            self.chunks_scored += 1
            scores = {self._names.get(k, k): float(v) for k, v in raw.items()}
            detection = self._scorer.decide(scores, self._samples_seen / SAMPLE_RATE)
            if detection is not None and found is None:
                found = detection
        return found

    def reset(self) -> None:
        """Forget the audio heard so far, so the word that started a turn cannot fire again
        when the turn ends. openWakeWord's own reset() clears only the score history; its audio,
        mel and embedding buffers still hold the word (measured: a second, spurious turn right
        after many turns), so they are put back to their state at start too."""
        self._clear_buffers()
        self._scorer.forget()  # the buffers are clear: the refractory period has no more use
        if self._gate is not None:
            self._gate.reset()

    def _clear_buffers(self) -> None:
        self._model.reset()
        features = self._model.preprocessor
        features.raw_data_buffer.clear()
        features.accumulated_samples = 0
        features.melspectrogram_buffer = self._clean_features[0].copy()
        features.feature_buffer = self._clean_features[1].copy()
        self._pending = np.zeros(0, dtype=np.int16)
