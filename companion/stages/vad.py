"""Endpointing: where an utterance starts and ends.

``SpeechSegmenter`` is pure and counts *audio* seconds, so it is tested without sleeping and
behaves the same on a slow or fast machine. ``WebRtcVad`` is the real speech/non-speech
classifier; ``Endpointer`` joins the two and keeps a pre-roll so the first syllable survives.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np

from companion.settings import VadSettings

SAMPLE_RATE = 16000
BYTES_PER_SAMPLE = 2
PERCENTILE = 50


class SegmentState(StrEnum):
    WAITING = "waiting"  # no speech yet
    SPEECH = "speech"  # inside an utterance
    ENDED = "ended"  # speech followed by enough silence (or the maximum length)
    NO_SPEECH = "no-speech"  # nothing was said before the timeout


class SpeechSegmenter:
    """Decides, chunk by chunk, whether an utterance has started and ended."""

    def __init__(self, settings: VadSettings) -> None:
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        self.state = SegmentState.WAITING
        self.audio_s = 0.0  # audio seen so far
        self.speech_start_s: float | None = None  # audio time where the utterance began
        self.speech_end_s: float | None = None
        self._speech_run_s = 0.0
        self._silence_run_s = 0.0
        self._speech_total_s = 0.0  # speech inside the current utterance
        self.hit_max_length = False
        self.discarded = 0  # utterances thrown away as too short

    def process(self, chunk_s: float, is_speech: bool) -> SegmentState:
        if self.state in (SegmentState.ENDED, SegmentState.NO_SPEECH):
            return self.state
        self.audio_s += chunk_s
        s = self.settings
        if self.state is SegmentState.WAITING:
            self._speech_run_s = self._speech_run_s + chunk_s if is_speech else 0.0
            if self._speech_run_s >= max(s.speech_start_s, chunk_s):
                self.state = SegmentState.SPEECH
                self.speech_start_s = self.audio_s - self._speech_run_s
                self._speech_total_s = self._speech_run_s
                self._silence_run_s = 0.0
            elif self.audio_s >= s.no_speech_timeout_s:
                self.state = SegmentState.NO_SPEECH
            return self.state
        # inside speech
        self._silence_run_s = 0.0 if is_speech else self._silence_run_s + chunk_s
        if is_speech:
            self._speech_total_s += chunk_s
        assert self.speech_start_s is not None
        if self._silence_run_s >= s.silence_end_s and self._speech_total_s < s.min_speech_s:
            # too little speech to be an utterance: wait on (the no-speech timeout still runs)
            self.state = SegmentState.WAITING
            self.speech_start_s = None
            self._speech_run_s = self._silence_run_s = self._speech_total_s = 0.0
            self.discarded += 1
            if self.audio_s >= s.no_speech_timeout_s:
                self.state = SegmentState.NO_SPEECH
        elif self._silence_run_s >= s.silence_end_s:
            self.state = SegmentState.ENDED
            self.speech_end_s = self.audio_s - self._silence_run_s
        elif self.audio_s - self.speech_start_s >= s.max_utterance_s:
            self.state = SegmentState.ENDED
            self.hit_max_length = True
            self.speech_end_s = self.audio_s
        return self.state

    def end(self) -> SegmentState:
        """End the utterance now (the turn detector judged it complete): speech ended where
        the current silence began. Too little speech is not an utterance: nothing changes."""
        if self.state is SegmentState.SPEECH and self._speech_total_s >= self.settings.min_speech_s:
            self.state = SegmentState.ENDED
            self.speech_end_s = self.audio_s - self._silence_run_s
        return self.state

    def resume(self) -> SegmentState:
        """The user went on after the end (``turn.resume_window_s``): the utterance is open
        again and its silence is counted anew from here. An utterance cut at its maximum
        length stays ended."""
        if self.state is SegmentState.ENDED and not self.hit_max_length:
            self.state = SegmentState.SPEECH
            self.speech_end_s = None
            self._silence_run_s = 0.0
        return self.state

    @property
    def silence_s(self) -> float:
        """Silence since the last speech inside an utterance (0 when not in speech)."""
        return self._silence_run_s if self.state is SegmentState.SPEECH else 0.0


class SpeechClassifier(Protocol):
    def is_speech(self, frame: bytes) -> bool: ...


class WebRtcVad:
    """webrtcvad on 10/20/30 ms frames of 16 kHz 16-bit mono; a longer block is judged by its
    30 ms frames (speech when any frame is)."""

    FRAME_BYTES = SAMPLE_RATE * 30 // 1000 * BYTES_PER_SAMPLE

    def __init__(self, aggressiveness: int = 2) -> None:
        import webrtcvad  # from webrtcvad-wheels

        self._vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: bytes) -> bool:
        n = self.FRAME_BYTES
        if len(frame) in (n // 3, 2 * n // 3, n):
            return self._vad.is_speech(frame, SAMPLE_RATE)
        whole = len(frame) - len(frame) % n
        return any(self._vad.is_speech(frame[i : i + n], SAMPLE_RATE) for i in range(0, whole, n))


class NoiseFloor:
    """The room's background level: the median level of 3 s of microphone blocks heard while
    idle, leaving out the last 1.5 s (the wake word). webrtcvad calls babble (a television,
    people talking) speech at any level, so in such a room an utterance never ended before
    ``max_utterance_s`` and ``no_speech_timeout_s`` never fired (measured with the simulated
    room's babble at SNR 5-20 dB); a block must also stand ``margin_db`` above this floor to
    count as the user's speech."""

    def __init__(self, window_s: float = 3.0, block_s: float = 0.03,
                 recent_s: float = 1.5) -> None:
        # the last ``recent_s`` before a turn hold the wake word itself: not the room
        self._recent = round(recent_s / block_s)
        self._levels: deque[float] = deque(maxlen=max(1, round(window_s / block_s)) + self._recent)

    def observe(self, block: bytes) -> None:
        self._levels.append(block_level_db(block))

    def above(self, block: bytes, margin_db: float) -> bool:
        """Whether ``block`` stands ``margin_db`` above the floor (always, until the room has
        been heard for the whole window: a short file in a quiet simulation is never gated)."""
        if margin_db <= 0 or len(self._levels) < (self._levels.maxlen or 0):
            return True
        older = list(self._levels)[: len(self._levels) - self._recent]
        floor = float(np.percentile(older, PERCENTILE))
        return block_level_db(block) >= floor + margin_db


def block_level_db(block: bytes) -> float:
    x = np.frombuffer(block, np.int16).astype(np.float64)
    return float(10 * np.log10((x**2).mean() + 1.0)) if len(x) else 0.0


class GatedClassifier:
    """Speech by the classifier *and* above the room's noise floor."""

    def __init__(self, classifier: SpeechClassifier, floor: NoiseFloor, margin_db: float) -> None:
        self.classifier, self.floor, self.margin_db = classifier, floor, margin_db

    def is_speech(self, frame: bytes) -> bool:
        return self.floor.above(frame, self.margin_db) and self.classifier.is_speech(frame)


class RecentAudio:
    """The last ``limit_bytes`` of audio, kept as whole blocks (the oldest dropped once the
    rest still holds the limit): the pre-roll before an utterance, the context before a wake
    word."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._blocks: deque[bytes] = deque()
        self._bytes = 0

    def append(self, block: bytes) -> None:
        self._blocks.append(block)
        self._bytes += len(block)
        while self._blocks and self._bytes - len(self._blocks[0]) >= self.limit_bytes:
            self._bytes -= len(self._blocks.popleft())

    def take(self) -> bytes:
        """All of it, joined; then it is empty."""
        audio = b"".join(self._blocks)
        self.clear()
        return audio

    def clear(self) -> None:
        self._blocks.clear()
        self._bytes = 0


@dataclass
class EndpointResult:
    state: SegmentState
    audio: bytes  # the utterance with its pre-roll (empty when no speech)
    speech_start_s: float | None
    speech_end_s: float | None
    audio_s: float  # all audio seen


class Endpointer:
    """Feeds blocks to the classifier and the segmenter and collects the utterance."""

    def __init__(self, settings: VadSettings, classifier: SpeechClassifier) -> None:
        self.settings = settings
        self.classifier = classifier
        self.segmenter = SpeechSegmenter(settings)
        # the speech that starts an utterance is itself still in the pre-roll when it starts
        window_s = settings.pre_roll_s + settings.speech_start_s
        self._pre_roll = RecentAudio(int(window_s * SAMPLE_RATE) * BYTES_PER_SAMPLE)
        self._utterance = bytearray()

    def reset(self) -> None:
        self.segmenter.reset()
        self._pre_roll.clear()
        self._utterance.clear()

    def feed(self, block: bytes) -> SegmentState:
        chunk_s = len(block) / (SAMPLE_RATE * BYTES_PER_SAMPLE)
        before = self.segmenter.state
        state = self.segmenter.process(chunk_s, self.classifier.is_speech(block))
        if before is SegmentState.WAITING:
            if state is SegmentState.SPEECH:
                self._utterance.extend(self._pre_roll.take())
                self._utterance.extend(block)
            else:
                self._pre_roll.append(block)
        elif before is SegmentState.SPEECH:
            if state is SegmentState.SPEECH or state is SegmentState.ENDED:
                self._utterance.extend(block)
            else:  # discarded as too short: back to collecting pre-roll
                self._utterance.clear()
        return state

    def result(self) -> EndpointResult:
        seg = self.segmenter
        audio = bytes(self._utterance)
        if seg.state is SegmentState.ENDED and seg.speech_end_s is not None and not seg.hit_max_length:
            # drop the trailing silence that ended the utterance: whisper needs none of it
            trailing = int(seg._silence_run_s * SAMPLE_RATE) * BYTES_PER_SAMPLE
            keep = max(len(audio) - trailing + int(0.2 * SAMPLE_RATE) * BYTES_PER_SAMPLE, 0)
            audio = audio[:keep]
        return EndpointResult(seg.state, audio, seg.speech_start_s, seg.speech_end_s, seg.audio_s)
