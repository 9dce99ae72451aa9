"""Acoustic echo cancellation: take the device's own voice out of what the microphone hears.

The reference is the audio the speaker really played, stamped with the time it reached the
DAC (the playback stream's own timing; see ``SoundDeviceSink``); each microphone block is
stamped with the time it left the ADC. :class:`PlaybackReference` lines the two up on one
clock, so WebRTC's AEC3 (``pywebrtc-audio``) only has to find the acoustic path's delay.

Modes (``audio.echo_cancel``): ``webrtc`` in-process; ``system`` the sound server's echo-cancel
source (PulseAudio/PipeWire ``module-echo-cancel``, which then is the default source);
``auto`` system when there is one, else webrtc; ``off``. A missing package or a system source
that vanishes is a warning and a fallback, never a dead microphone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import structlog

from companion.devices.echo_linear import LinearEchoFilter

log = structlog.get_logger(__name__)

RATE = 16000
FRAME = RATE // 100  # AEC3 works on 10 ms frames
CONVERGE_FAR_S = 1.5  # far-end speech the filter needs before its output is trusted
CONVERGED_ERLE_DB = 12.0
SNAP = RATE * 20 // 1000  # timing jitter between two output buffers that is smoothed over


class PlaybackReference:
    """What the speaker played, on the microphone's clock (seconds), for the last ~16 s.

    The sink writes from its audio thread, the canceller reads from its own: one lock."""

    SIZE = 1 << 18  # samples (16.4 s at 16 kHz)

    def __init__(self) -> None:
        self._buf = np.zeros(self.SIZE, dtype=np.int16)
        self._end: int | None = None  # absolute sample index after the newest written sample
        self._lock = threading.Lock()
        self.last_write_s: float | None = None

    def write(self, t_s: float, samples: np.ndarray) -> None:
        """``samples`` (16 kHz) started playing at ``t_s``."""
        samples = np.asarray(samples)
        if samples.dtype != np.int16:
            samples = np.clip(np.round(samples), -32768, 32767).astype(np.int16)
        start = round(t_s * RATE)
        with self._lock:
            if self._end is not None and abs(start - self._end) <= SNAP:
                start = self._end  # the next buffer of the same stream: keep it seamless
            if self._end is not None and start > self._end:  # a gap: nothing played there
                self._put(self._end, np.zeros(min(start - self._end, self.SIZE), np.int16))
            self._put(start, samples[-self.SIZE:])
            end = start + len(samples)
            self._end = end if self._end is None else max(self._end, end)
            self.last_write_s = t_s

    def _put(self, start: int, samples: np.ndarray) -> None:
        idx = (start + np.arange(len(samples))) % self.SIZE
        self._buf[idx] = samples

    def read(self, t_s: float, n: int) -> np.ndarray:
        """The ``n`` samples played from ``t_s`` on; zeros where nothing was (or is not yet)."""
        start = round(t_s * RATE)
        out = np.zeros(n, dtype=np.int16)
        with self._lock:
            if self._end is None:
                return out
            lo, hi = max(start, self._end - self.SIZE), min(start + n, self._end)
            if hi > lo:
                out[lo - start:hi - start] = self._buf[(np.arange(lo, hi)) % self.SIZE]
        return out


@dataclass
class EchoStats:
    blocks: int = 0
    far_active_s: float = 0.0
    mic_energy: float = 0.0  # while the far end was active
    out_energy: float = 0.0
    wake_energy: float = 0.0  # of the linear filter's output (the wake word's stream)
    process_s: float = 0.0  # CPU time spent cancelling

    @property
    def erle_db(self) -> float | None:
        if self.mic_energy <= 0 or self.out_energy <= 0:
            return None
        return float(10 * np.log10(self.mic_energy / self.out_energy))

    @property
    def wake_erle_db(self) -> float | None:
        if self.mic_energy <= 0 or self.wake_energy <= 0:
            return None
        return float(10 * np.log10(self.mic_energy / self.wake_energy))


class Cleaned(NamedTuple):
    """One microphone block, cleaned twice: ``block`` by AEC3 (echo and residual suppressed:
    for VAD and speech recognition), ``wake`` by the linear filter alone (the echo taken out,
    the user's voice kept while the device talks: for the wake word)."""

    block: bytes
    wake: bytes


class EchoCanceller:
    """AEC3 (and optionally WebRTC's noise suppressor) over 16 kHz microphone blocks, and
    beside it the linear filter whose output the wake word detector hears.

    Not thread-safe (nor is the WebRTC processor): call it from one thread."""

    def __init__(self, reference: PlaybackReference, *, noise_suppression: bool = False,
                 echo_cancellation: bool = True, ns_level: int = 1,
                 echo_path_file: Path | None = None) -> None:
        from pywebrtc_audio import AudioProcessor

        self.reference = reference
        # the linear filter's echo path, kept across restarts (None: learnt anew each start)
        self.echo_path_file = echo_path_file
        self.noise_suppression = noise_suppression
        self.echo_cancellation = echo_cancellation
        self._apm = AudioProcessor(RATE, 1, echo_cancellation=echo_cancellation,
                                   noise_suppression=noise_suppression, ns_level=ns_level,
                                   high_pass_filter=echo_cancellation or noise_suppression,
                                   stream_delay_ms=0)
        self._linear: LinearEchoFilter | None = None  # made for the first block's length
        self.stats = EchoStats()
        self._recent: list[tuple[float, float]] = []  # (mic, out) energy of recent far-active blocks
        self.converged = False

    def process(self, block: bytes, captured_at_s: float | None) -> bytes:
        """The block without the device's voice (AEC3's output)."""
        return self.split(block, captured_at_s).block

    def split(self, block: bytes, captured_at_s: float | None) -> Cleaned:
        """The block cleaned for speech recognition and for the wake word. ``captured_at_s`` is
        the block's start on the reference's clock; None (a source without timing) cancels
        against silence."""
        import time

        started = time.thread_time()
        near = np.frombuffer(block, np.int16)
        n = len(near) - len(near) % FRAME
        if captured_at_s is None:
            far = np.zeros(len(near), np.int16)
        else:
            far = self.reference.read(captured_at_s, len(near))
        out = near.copy()
        if n:
            out[:n] = self._apm.process(near[:n], far[:n] if self.echo_cancellation else None)
        wake = out
        if self.echo_cancellation and len(near):
            if self._linear is None:
                self._linear = LinearEchoFilter(frame=linear_frame(len(near)))
                self._load_echo_path(self._linear)
            linear = self._linear.process(near.astype(np.float64), far.astype(np.float64))
            wake = np.clip(np.round(linear), -32768, 32767).astype(np.int16)
        self._account(near, out, far, wake)
        self.stats.process_s += time.thread_time() - started
        self.stats.blocks += 1
        return Cleaned(out.tobytes(), wake.tobytes())

    def _account(self, near: np.ndarray, out: np.ndarray, far: np.ndarray,
                 wake: np.ndarray) -> None:
        """ERLE while the device speaks; convergence once the filter has had enough of it."""
        far_power = float((far.astype(np.float64) ** 2).mean())
        if far_power < 1e4:  # ~-50 dBFS: the speaker is quiet
            return
        mic, cleaned, linear = (float((x.astype(np.float64) ** 2).mean())
                                for x in (near, out, wake))
        self.stats.far_active_s += len(near) / RATE
        self.stats.mic_energy += mic
        self.stats.out_energy += cleaned
        self.stats.wake_energy += linear
        self._recent = [*self._recent, (mic, cleaned)][-50:]
        if not self.converged and self.stats.far_active_s >= CONVERGE_FAR_S:
            m, o = (sum(v) for v in zip(*self._recent, strict=True))
            if o > 0 and 10 * np.log10(m / o) >= CONVERGED_ERLE_DB:
                self.converged = True
                log.info("echo canceller converged", far_s=round(self.stats.far_active_s, 1))
                self.save_echo_path()

    def _load_echo_path(self, linear: LinearEchoFilter) -> None:
        if self.echo_path_file is None:
            return
        try:
            with self.echo_path_file.open("rb") as file:
                learnt = np.load(file, allow_pickle=False)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("the learnt echo path is unreadable; learning anew",
                        file=str(self.echo_path_file), error=str(exc))
            return
        if linear.start_from(learnt):
            log.info("echo path learnt before loaded", file=str(self.echo_path_file))

    def save_echo_path(self) -> None:
        """Keep the linear filter's echo path for the next start (written whole, then renamed:
        a crash leaves the old file or the new one). A disk that refuses is a warning."""
        if self.echo_path_file is None or self._linear is None:
            return
        partial = self.echo_path_file.with_name(self.echo_path_file.name + ".partial")
        try:
            with partial.open("wb") as file:
                np.save(file, self._linear.echo_path, allow_pickle=False)
            os.replace(partial, self.echo_path_file)
        except OSError as exc:
            log.warning("could not keep the learnt echo path", error=str(exc))

    def reset(self) -> None:
        self._apm.reset()
        if self._linear is not None:
            self._linear.reset()
        self.converged = False
        self._recent.clear()


def linear_frame(block: int) -> int:
    """The linear filter's frame for microphone blocks of ``block`` samples: the whole block
    up to 30 ms (fewer, larger FFTs: a third of the cost of 10 ms frames, measured, for the
    same convergence), else its largest divisor that is not longer."""
    return next(f for f in range(min(block, 480), 0, -1) if block % f == 0)


def webrtc_available() -> str | None:
    """None when pywebrtc-audio imports, else why not."""
    try:
        import pywebrtc_audio  # noqa: F401
    except Exception as exc:  # ImportError, or a wheel built for another CPU
        return f"pywebrtc-audio not usable: {exc}"
    return None


def system_echo_source() -> str | None:
    """The sound server's echo-cancelled source when it is the default source (PulseAudio or
    PipeWire's pulse server with ``module-echo-cancel``), else None."""
    if shutil.which("pactl") is None:
        return None
    try:
        default = subprocess.run(["pactl", "get-default-source"], capture_output=True, text=True,
                                 timeout=3).stdout.strip()
        listing = subprocess.run(["pactl", "list", "short", "sources"], capture_output=True,
                                 text=True, timeout=3).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    names = {line.split("\t")[1] for line in listing.splitlines() if "\t" in line}
    if default in names and "echo" in default.lower():
        return default
    return None


def resolve_mode(requested: str, *, system_source: str | None, webrtc_error: str | None
                 ) -> tuple[str, str]:
    """(active mode, why) for ``audio.echo_cancel``: a wish that cannot be met falls back with
    a warning, never to a dead microphone."""
    if requested == "off":
        return "off", "echo cancellation off (audio.echo_cancel = off)"
    if requested in ("system", "auto") and system_source is not None:
        return "system", f"sound server echo-cancel source {system_source!r}"
    if requested == "system":
        log.warning("audio.echo_cancel = system but the default source is not an echo-cancel "
                    "source; cancelling in-process instead")
    if webrtc_error is None:
        return "webrtc", "in-process WebRTC AEC3 (pywebrtc-audio)"
    log.warning("no echo cancellation", reason=webrtc_error)
    return "off", f"none available ({webrtc_error})"


class EchoControl:
    """The echo cancellation in force (``mode``: webrtc | system | off) and, for webrtc, the
    canceller, run on one thread of its own (it is not thread-safe, and model inference must
    not delay the microphone). ``watch()`` falls back when a system source vanishes."""

    def __init__(self, requested: str, reference: PlaybackReference | None, *,
                 noise_suppression: bool = False, probe_system=system_echo_source,
                 on_change=None, echo_path_file: Path | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.requested = requested
        self.echo_path_file = echo_path_file
        self.reference = reference
        self.noise_suppression = noise_suppression
        self._probe_system = probe_system
        self._on_change = on_change
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="echo")
        self.canceller: EchoCanceller | None = None
        self.mode, self.detail = "off", ""
        self._choose(probe_system() if requested in ("auto", "system") else None)

    def _choose(self, system_source: str | None) -> None:
        error = webrtc_available()
        if error is None and self.reference is None:
            error = "the speaker gives no playback reference"
        self.mode, self.detail = resolve_mode(self.requested, system_source=system_source,
                                              webrtc_error=error)
        aec = self.mode == "webrtc"
        ns = self.noise_suppression and webrtc_available() is None
        self.canceller = (EchoCanceller(self.reference or PlaybackReference(),
                                        echo_cancellation=aec, noise_suppression=ns,
                                        echo_path_file=self.echo_path_file)
                          if aec or ns else None)
        if ns:
            self.detail += "; WebRTC noise suppression on"
        log.info("echo cancellation", mode=self.mode, detail=self.detail)
        if self._on_change is not None:
            self._on_change(self)

    @property
    def converged(self) -> bool:
        """Whether the microphone can be trusted to hold no echo (barge-in by voice alone)."""
        if self.mode == "system":
            return True
        return self.canceller is not None and self.canceller.converged

    async def process(self, block: bytes, captured_at_s: float | None) -> Cleaned:
        """The block for speech recognition and the one for the wake word (the same block when
        nothing, or the sound server, cancels)."""
        if self.canceller is None:
            return Cleaned(block, block)
        import asyncio

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.canceller.split, block,
                                          captured_at_s)

    async def watch(self, period_s: float = 5.0) -> None:
        """While the sound server cancels, check that its source is still the default one."""
        import asyncio

        while True:
            await asyncio.sleep(period_s)
            if self.mode != "system":
                continue
            source = await asyncio.to_thread(self._probe_system)
            if source is None:
                log.warning("the system echo-cancel source is gone; falling back")
                self.requested = "webrtc"
                self._choose(None)

    def close(self) -> None:
        """Keep what the canceller learnt of the room (on its own thread: it is not
        thread-safe), then stop that thread."""
        if self.canceller is not None:
            self._executor.submit(self.canceller.save_echo_path)
        self._executor.shutdown(wait=True)
