"""A linear echo canceller with no residual suppression: what the wake word detector hears.

WebRTC's AEC3 (``echo.py``) follows its linear filter with a residual echo suppressor that,
while the device speaks, also takes out the user's voice: measured in the simulated room with
the echo 6 dB above the user, "Hey Jarvis" over the reply scored < 0.5 after AEC3 (0 of 4 hits)
and 1.0 (4 of 4) after this filter alone. pywebrtc-audio exposes neither AEC3's linear output
nor a setting for its suppressor, and no maintained wheel of another canceller (speexdsp) is on
PyPI for both x86_64 and aarch64, so this small filter is the project's own.

It is a partitioned-block frequency-domain adaptive filter (overlap-save, NLMS normalised per
frequency bin), in two paths: a background filter adapts all the time; the foreground, whose
output is used, takes the background's coefficients only while they cancel clearly better.
The user's voice during double talk derails the background's adaptation, never the output.
"""

from __future__ import annotations

import numpy as np

RATE = 16000
COMPARE_S = 0.08  # the two paths are compared over the last 80 ms
ADOPT_RATIO = 0.5  # the background must leave half the foreground's residual to be adopted
DIVERGED_RATIO = 8.0  # a background this much worse (double talk) restarts from the foreground
QUIET_POWER = 1e4  # mean square of ~-50 dBFS: a speaker below it is not playing
MOVED_S = 0.25  # a filter worse than none for this long while the speaker plays is stale


class LinearEchoFilter:
    """``process(near, far)`` → ``near`` minus the estimated echo of ``far``.

    ``tail_s`` must cover the acoustic path after the reference's alignment (delay plus the
    room's reverberation). Not thread-safe: one thread calls it."""

    def __init__(self, *, frame: int = 160, tail_s: float = 0.25, step: float = 1.0) -> None:
        self.frame = frame
        self._tail_s = tail_s
        self.partitions = max(1, int(np.ceil(tail_s * RATE / frame)))
        self._compare = max(1, round(COMPARE_S * RATE / frame))
        self._quiet_frames = self.partitions  # far-end frames of silence in a row
        shape = (self.partitions, frame + 1)
        # far-end spectra, newest first: written twice, at head and head + partitions, so
        # that rows head .. head + partitions are the history in order without a copy
        self._far = np.zeros((2 * self.partitions, frame + 1), np.complex128)
        self._head = 0
        self._far_power = np.zeros(frame + 1)  # per bin, summed over the partitions
        # [0] background, [1] foreground
        self._weights = np.zeros((2, *shape), np.complex128)
        self._window = np.zeros(2 * frame)  # previous far frame, this far frame
        self._padded = np.zeros(2 * frame)  # zeros, this frame's error
        self._residuals: list[tuple[float, float, float, float]] = []  # back, fore, mic, far
        self._constrain_next = 0
        self._worse_frames = 0  # frames in a row the output held more than the microphone
        self._step = step
        # regularisation: a far end below ~-50 dBFS does not move the filter much
        self._floor = 1e4 * 2 * frame * self.partitions
        self.adoptions = 0

    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        """Both float arrays of the same length, a multiple of ``frame`` (the rest passes
        through)."""
        out = np.empty(len(near))
        frame = self.frame
        for start in range(0, len(near) - len(near) % frame, frame):
            part = slice(start, start + frame)
            out[part] = self._frame(near[part], far[part])
        rest = len(near) % frame
        if rest:
            out[-rest:] = near[-rest:]
        return out

    def _frame(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        # a speaker silent for the whole tail leaves no echo to estimate: the device listens
        # far more than it talks, and this keeps the filter's cost to its speaking time
        self._quiet_frames = self._quiet_frames + 1 if not far.any() else 0
        if self._quiet_frames > self.partitions:
            if self._quiet_frames == self.partitions + 1:
                # every partition holds silence now: the history too, or the next sentence
                # would be matched against the last one's spectra (and, with the power sum
                # gone below zero, take a huge step that throws the converged filter away)
                self._far[:] = 0.0
                self._far_power[:] = 0.0
                self._window[:] = 0.0
            return near
        self._window[:self.frame] = self._window[self.frame:]
        self._window[self.frame:] = far
        spectrum = np.fft.rfft(self._window)
        p = self.partitions
        self._head = (self._head - 1) % p
        oldest = self._far[self._head]
        self._far_power += (spectrum.real**2 + spectrum.imag**2
                            - oldest.real**2 - oldest.imag**2)
        self._far[self._head] = self._far[self._head + p] = spectrum
        history = self._far[self._head:self._head + p]  # row i: the far end i frames ago
        estimates = np.fft.irfft(np.einsum("wpk,pk->wk", self._weights, history))[:, self.frame:]
        background, foreground = near - estimates[0], near - estimates[1]
        self._adapt(background, history)
        self._choose(background, foreground, near, far)
        return foreground

    def _adapt(self, error: np.ndarray, history: np.ndarray) -> None:
        self._padded[self.frame:] = error
        spectrum = np.fft.rfft(self._padded)
        gain = self._step * spectrum / (np.maximum(self._far_power, 0.0) + self._floor)
        background = self._weights[0]
        background += gain * np.conj(history)
        # the gradient constraint (each partition a causal filter of one frame), one partition
        # per frame in turn, as Speex's MDF does: half the cost, the same convergence
        i = self._constrain_next
        self._constrain_next = (i + 1) % self.partitions
        taps = np.fft.irfft(background[i])
        taps[self.frame:] = 0.0
        background[i] = np.fft.rfft(taps)

    def _choose(self, background: np.ndarray, foreground: np.ndarray, near: np.ndarray,
                far: np.ndarray) -> None:
        self._residuals.append((float(background @ background), float(foreground @ foreground),
                                float(near @ near), float(far @ far)))
        if len(self._residuals) < self._compare:
            return
        self._residuals = self._residuals[-self._compare:]
        back, fore, mic, speaker = (sum(v) for v in zip(*self._residuals, strict=True))
        if back < ADOPT_RATIO * fore and back < mic:
            self._weights[1] = self._weights[0]
            self.adoptions += 1
        elif back > DIVERGED_RATIO * fore:
            self._weights[0] = self._weights[1]
        # the echo path moved: a stale filter adds echo instead of removing it. Judged only
        # while the speaker plays and for a while: as the echo dies away after a sentence, and
        # in the first frame of the next (before its echo arrives), the filter's leftover of
        # almost nothing beats a silent microphone; that once threw the converged filter
        # away before every sentence
        playing = speaker > QUIET_POWER * self.frame * len(self._residuals)
        self._worse_frames = self._worse_frames + 1 if fore > mic and playing else 0
        if self._worse_frames * self.frame >= MOVED_S * RATE:
            self._weights[1] = 0.0
            self._worse_frames = 0

    @property
    def echo_path(self) -> np.ndarray:
        """The filter in use (the foreground): what the room does to the speaker's sound."""
        return self._weights[1].copy()

    def start_from(self, echo_path: np.ndarray) -> bool:
        """Begin with an echo path learnt before (a device's speaker and microphone do not
        move): the first words of its first reply are cancelled too. False (and nothing
        changed) when it was learnt for another frame or tail."""
        if echo_path.shape != self._weights.shape[1:] or not np.isfinite(echo_path).all():
            return False
        self._weights[0] = self._weights[1] = echo_path
        return True

    def reset(self) -> None:
        self.__init__(frame=self.frame, tail_s=self._tail_s, step=self._step)
