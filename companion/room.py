"""A simulated room: what a microphone beside the device's own speaker hears.

The microphone signal is the user's speech (a WAV, reverberated), plus the device's own output
fed back through an echo path (delay + reverberant impulse response, ``echo_db`` louder or
quieter than the user), plus noise at ``snr_db``. The echo is made from the audio the device
*really* plays, at the moment it plays it: :class:`RoomSpeaker` is the device's sink and hands
its audio to the room's clock block by block, so a barge-in that stops playback stops the echo.

The room's clock is the microphone's sample count. In real time it is paced by the wall clock;
as fast as possible (``realtime=False``) it runs at whatever pace the pipeline reads it, and
playback waits for it, so echo and speech keep their places on one timeline either way. The
same ``seed`` gives the same room (impulse responses, noise) byte for byte.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from companion.devices.audio import PIPELINE_RATE, AudioFileError, apply_volume, read_wav_16k_mono, resample
from companion.devices.echo import PlaybackReference
from companion.stages.tts import AudioClip

NOISE_KINDS = ("white", "pink", "babble")
USER_LEVEL_DBFS = -26.0  # the user's active speech level at the microphone
NOISE_LOOP_S = 20.0  # generated noise is this long, then loops
MAX_LINGER_S = 180.0  # after the WAV ends the room keeps running while the device talks


class RoomError(ValueError):
    """A room option that cannot be used (out of range, unknown noise, unreadable WAV)."""


@dataclass(frozen=True)
class RoomConfig:
    echo_db: float = 6.0  # echo level relative to the user's speech at the microphone
    delay_ms: float = 30.0  # speaker → microphone delay
    rt60: float = 0.3  # reverberation time of the room (0 = anechoic)
    noise: str | None = None  # white | pink | babble | a WAV path
    snr_db: float = 10.0  # user's speech level over the noise
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [("echo-db", self.echo_db, -60.0, 30.0), ("delay-ms", self.delay_ms, 0.0, 500.0),
                  ("rt60", self.rt60, 0.0, 2.0), ("snr-db", self.snr_db, -20.0, 80.0),
                  ("seed", self.seed, 0, 2**32 - 1)]
        for name, value, low, high in checks:
            if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
                raise RoomError(f"--room-{name} {value} is out of range ({low}..{high})")
        if self.noise is not None and self.noise not in NOISE_KINDS:
            path = Path(self.noise)
            if path.suffix.lower() != ".wav":
                raise RoomError(f"--room-noise {self.noise!r}: not one of {', '.join(NOISE_KINDS)} "
                                "and not a .wav path")
            if not path.is_file():
                raise RoomError(f"--room-noise {self.noise!r}: no such WAV file")


# --- signals ----------------------------------------------------------------------------------


def active_level_db(x: np.ndarray, *, frame: int = 480) -> float | None:
    """Level of the speech in ``x`` (dBFS over its 30 ms frames within 35 dB of the loudest),
    so pauses do not dilute it; None for silence."""
    n = len(x) // frame
    if n == 0:
        return None
    power = (x[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(axis=1)
    if power.max() <= 1e-3:
        return None
    active = power[power >= power.max() * 10 ** (-35 / 10)]
    return float(10 * np.log10(active.mean() / 32768.0**2))


def impulse_response(rng: np.random.Generator, *, rt60: float, delay_ms: float,
                     direct_to_reverb_db: float) -> np.ndarray:
    """A room impulse response: a direct path after ``delay_ms``, then exponentially decaying
    noise reaching -60 dB at ``rt60``; unit energy, so the level calibration stays put."""
    delay = round(delay_ms * PIPELINE_RATE / 1000)
    if rt60 <= 0:
        ir = np.zeros(delay + 1)
        ir[delay] = 1.0
        return ir
    tail_n = int(rt60 * PIPELINE_RATE)
    t = np.arange(tail_n) / PIPELINE_RATE
    tail = rng.standard_normal(tail_n) * np.exp(-6.908 * t / rt60)  # ln(1000): -60 dB at rt60
    tail[: int(0.002 * PIPELINE_RATE)] = 0.0  # first reflections arrive after the direct path
    tail *= math.sqrt(10 ** (-direct_to_reverb_db / 10) / (tail**2).sum())
    ir = np.zeros(delay + tail_n)
    ir[delay] = 1.0
    ir[delay:] += tail
    return ir / math.sqrt((ir**2).sum())


def fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Full linear convolution through the FFT (numpy only; a WAV × 0.3 s response is fast)."""
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:n]


def colored_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """White or pink (1/f power, shaped in the frequency domain) noise, unit RMS."""
    white = rng.standard_normal(n)
    if kind == "pink":
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(n, 1 / PIPELINE_RATE)
        spectrum[1:] /= np.sqrt(freqs[1:] / freqs[1])
        spectrum[0] = 0
        white = np.fft.irfft(spectrum, n)
    return white / (np.sqrt((white**2).mean()) or 1.0)


BABBLE_LINES = (
    "I think we should leave a little earlier tomorrow because of the traffic.",
    "Did you see the match last night? It went to extra time.",
    "The soup needs more salt, and maybe some pepper as well.",
    "My sister is coming to visit next week with the children.",
    "They are building a new supermarket near the station.",
    "Could you pass me the newspaper when you are done with it?",
)


def babble(rng: np.random.Generator, n: int, speak: Callable[[str, float], np.ndarray],
           *, talkers: int = 4) -> np.ndarray:
    """Several people talking at once, made from the project's own TTS voice: the lines are
    synthesized once; each talker says them in its own order, speed and pitch (resampling
    shifts both), staggered."""
    lines = [speak(line, 1.0) for line in BABBLE_LINES]
    out = np.zeros(n)
    for talker in range(talkers):
        rate = 0.86 + 0.09 * talker  # < 1: slower and lower; > 1: faster and higher
        parts: list[np.ndarray] = []
        while sum(map(len, parts)) < n:
            for i in rng.permutation(len(lines)):
                voice = lines[i]
                parts.append(np.interp(np.arange(0, len(voice) - 1, rate), np.arange(len(voice)),
                                       voice))
                parts.append(np.zeros(int(rng.uniform(0.1, 0.5) * PIPELINE_RATE)))
        track = np.roll(np.concatenate(parts)[:n], int(rng.uniform(0, 2.0) * PIPELINE_RATE))
        out += track / (np.sqrt((track**2).mean()) or 1.0)
    return out / (np.sqrt((out**2).mean()) or 1.0)


def make_noise(config: RoomConfig, rng: np.random.Generator,
               speak: Callable[[str, float], np.ndarray] | None) -> np.ndarray | None:
    """The noise loop at unit RMS, or None for a quiet room."""
    if config.noise is None:
        return None
    n = int(NOISE_LOOP_S * PIPELINE_RATE)
    if config.noise in ("white", "pink"):
        return colored_noise(config.noise, n, rng)
    if config.noise == "babble":
        if speak is None:
            raise RoomError("--room-noise babble needs the TTS voice (is piper installed?)")
        return babble(rng, n, speak)
    try:
        pcm = np.frombuffer(read_wav_16k_mono(Path(config.noise)), np.int16).astype(np.float64)
    except AudioFileError as exc:
        raise RoomError(f"--room-noise: {exc}") from exc
    rms = np.sqrt((pcm**2).mean()) if len(pcm) else 0.0
    if rms < 1.0:
        raise RoomError(f"--room-noise {config.noise!r}: the WAV is silent")
    return pcm / rms


class BlockConvolver:
    """Streaming linear convolution, one block at a time (FFT overlap-add): the echo of each
    played block rings on into the next ones. A direct convolution of a 0.3 s response per
    30 ms block cost 0.2 of a core, which made an hour of simulated speech take hours."""

    def __init__(self, ir: np.ndarray, block: int) -> None:
        self.block = block
        self._size = 1 << (block + len(ir) - 2).bit_length()
        self._ir = np.fft.rfft(ir, self._size)
        self._tail = np.zeros(self._size)  # what earlier blocks still add to the coming ones

    def push(self, x: np.ndarray) -> np.ndarray:
        """The next ``block`` output samples, ``x`` (``block`` samples) being the next input."""
        if x.any():
            self._tail += np.fft.irfft(np.fft.rfft(x, self._size) * self._ir, self._size)
        out = self._tail[: self.block].copy()
        self._tail[: -self.block] = self._tail[self.block:]
        self._tail[-self.block:] = 0.0
        return out


# --- the room -------------------------------------------------------------------------------


class Room:
    """The acoustic scene. ``source()`` is the microphone, ``speaker`` the device's output."""

    def __init__(self, config: RoomConfig, user_pcm: bytes, *, block_ms: int = 30,
                 realtime: bool = True, tail_silence_s: float = 1.0,
                 speak: Callable[[str, float], np.ndarray] | None = None,
                 record: bool = False) -> None:
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.user_ir = impulse_response(rng, rt60=config.rt60, delay_ms=0.0, direct_to_reverb_db=0.0)
        self.echo_ir = impulse_response(rng, rt60=config.rt60, delay_ms=config.delay_ms,
                                        direct_to_reverb_db=6.0)
        user = np.frombuffer(user_pcm, np.int16).astype(np.float64)
        user = fft_convolve(user, self.user_ir)[: len(user)] if len(user) else user
        level = active_level_db(user)
        if level is not None:
            user *= 10 ** ((USER_LEVEL_DBFS - level) / 20)
        self.user = np.concatenate([user, np.zeros(int(tail_silence_s * PIPELINE_RATE))])
        self.user_level_dbfs = USER_LEVEL_DBFS
        noise = make_noise(config, rng, speak)
        self.noise = None if noise is None else noise * 32768 * 10 ** ((USER_LEVEL_DBFS - config.snr_db) / 20)
        # the device's voice (piper, normalised) speaks at about PLAYBACK_LEVEL_DBFS; the echo is
        # scaled so that it reaches the mic echo_db above the user, and follows the volume
        self.echo_gain = 10 ** ((USER_LEVEL_DBFS + config.echo_db - PLAYBACK_LEVEL_DBFS) / 20)
        self.block = PIPELINE_RATE * block_ms // 1000
        self.realtime = realtime
        self.speaker = RoomSpeaker(self)
        self.samples = 0  # the clock: microphone samples produced so far
        self.linger: Callable[[], bool] = lambda: False  # keep the mic on after the WAV ends
        self._echo = BlockConvolver(self.echo_ir, self.block)
        self._record = record
        self._tap: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.duration_s = len(self.user) / PIPELINE_RATE

    @property
    def now_s(self) -> float:
        return self.samples / PIPELINE_RATE

    def source(self) -> RoomMicrophone:
        return RoomMicrophone(self)

    def next_block(self) -> bytes:
        """Advance the clock by one block: play it, and return what the microphone hears."""
        start, n = self.samples, self.block
        played = self.speaker.consume(n)
        if self.speaker.reference is not None:  # the echo canceller's far end, on this clock
            self.speaker.reference.write(start / PIPELINE_RATE, played)
        echo = self._echo.push(played) * self.echo_gain
        user = self.user[start:start + n]
        user = np.pad(user, (0, n - len(user)))
        mic = user + echo
        noise = np.zeros(n)
        if self.noise is not None:
            idx = np.arange(start, start + n) % len(self.noise)
            noise = self.noise[idx]
            mic = mic + noise
        self.samples += n
        if self._record:
            self._tap.append((user, echo, noise))
        return np.clip(np.round(mic), -32768, 32767).astype(np.int16).tobytes()

    def components(self) -> dict[str, np.ndarray]:
        """What the microphone heard, by part (when built with ``record``): user, echo, noise."""
        if not self._tap:
            return {k: np.zeros(0) for k in ("user", "echo", "noise")}
        user, echo, noise = (np.concatenate(p) for p in zip(*self._tap, strict=True))
        return {"user": user, "echo": echo, "noise": noise}

    @property
    def finished(self) -> bool:
        return self.samples >= len(self.user)


PLAYBACK_LEVEL_DBFS = -18.5  # active level of the piper voice at volume 1 (joe-medium, 3 sentences)


class RoomMicrophone:
    """The room as an AudioSource."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.name = "room"
        self.dropped_blocks = 0
        self.last_block_at = time.monotonic()
        self.last_block_time_s: float | None = None  # the block's start on the room clock
        self.duration_s = room.duration_s

    async def blocks(self) -> AsyncIterator[bytes]:
        room = self.room
        loop = asyncio.get_running_loop()
        started = loop.time()
        limit = room.duration_s + MAX_LINGER_S
        while not room.finished or ((room.linger() or room.speaker.pending) and room.now_s < limit):
            if room.realtime:
                delay = started + room.now_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
            self.last_block_time_s = room.now_s
            block = room.next_block()
            self.last_block_at = time.monotonic()
            yield block


class RoomSpeaker:
    """The device's speaker in the room: ``play`` queues audio that the room's clock plays,
    and returns when it has been played. Cancelling drops what has not played yet."""

    def __init__(self, room: Room, *, volume: float = 1.0) -> None:
        self.room = room
        self.name = "room-speaker"
        self.volume = volume
        self.played_s = 0.0
        self._queue: list[np.ndarray] = []
        self._offset = 0
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._queued_total = 0  # samples ever queued
        self._consumed_total = 0  # samples ever played
        self.out: list[np.ndarray] = []  # what was played, block by block (the output WAV)
        self.reference: PlaybackReference | None = None
        self.stopped_at: float | None = None  # perf_counter of the last stop that cut playback

    def clock(self) -> float:
        """Playback time is the room's time (in a fast simulation it is not the wall clock)."""
        return self.room.now_s

    @property
    def pending(self) -> bool:
        return self._queued_total > self._consumed_total

    def enqueue(self, samples: np.ndarray) -> int:
        """Queue 16 kHz samples to play from the next block on; returns the playback mark
        (samples ever queued) at which they will have been played."""
        self._queue.append(np.asarray(samples, dtype=np.float64))
        self._queued_total += len(samples)
        return self._queued_total

    async def play(self, clip: AudioClip) -> None:
        pcm = apply_volume(resample(clip.pcm, clip.sample_rate, PIPELINE_RATE), self.volume)
        if not pcm:
            return
        mark = self.enqueue(np.frombuffer(pcm, np.int16))
        done = asyncio.get_running_loop().create_future()
        self._waiters.append((mark, done))
        try:
            await done
        except asyncio.CancelledError:
            self.stop()
            raise

    def stop(self) -> None:
        """Silence from the next block on (barge-in): the echo stops with it."""
        if self.pending:
            self.stopped_at = time.perf_counter()
        self._queued_total = self._consumed_total
        self._queue.clear()
        self._offset = 0
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def consume(self, n: int) -> np.ndarray:
        """The next ``n`` samples of playback (zeros where nothing is queued)."""
        out = np.zeros(n)
        filled = 0
        while filled < n and self._queue:
            head = self._queue[0]
            take = min(n - filled, len(head) - self._offset)
            out[filled:filled + take] = head[self._offset:self._offset + take]
            filled += take
            self._offset += take
            if self._offset >= len(head):
                self._queue.pop(0)
                self._offset = 0
        self._consumed_total += filled
        self.played_s += filled / PIPELINE_RATE
        self.out.append(out)
        still = []
        for mark, waiter in self._waiters:
            if mark <= self._consumed_total:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                still.append((mark, waiter))
        self._waiters = still
        return out

    def output_pcm(self) -> bytes:
        if not self.out:
            return b""
        return np.clip(np.concatenate(self.out), -32768, 32767).astype(np.int16).tobytes()
