"""Audio in and out: sounddevice for real devices, WAV files for simulation.

Capture runs in PortAudio's thread; each block is handed to the event loop with
``call_soon_threadsafe`` into a bounded queue, and dropped (and counted) when the queue is full,
so a busy loop never stalls the microphone. Devices are chosen by name, never by index; a device
whose rate is not 16 kHz is resampled with soxr.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import structlog

from companion import wav
from companion.devices.echo import PlaybackReference
from companion.stages.tts import AudioClip

log = structlog.get_logger(__name__)

T = TypeVar("T")
PIPELINE_RATE = 16000
STALL_S = 3.0  # a device stream with no audio this long is dead (PortAudio says nothing)
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0  # reopening a dead device: backoff
OPEN_TIMEOUT_S = 10.0  # opening or closing a stream on a sick sound server: given up after
FIRST_CALLBACK_S = 5.0  # a new stream's first callback may take this long (a busy server)


class AudioUnavailableError(RuntimeError):
    """No usable sound device (or the named one is missing)."""


class AudioFileError(ValueError):
    """A WAV file that cannot be read or converted."""


class AudioSource(Protocol):
    name: str
    dropped_blocks: int
    last_block_at: float  # monotonic time of the newest block; the watchdog looks at it

    def blocks(self) -> AsyncIterator[bytes]:
        """16 kHz 16-bit mono blocks until the source ends (a file) or forever (a device)."""
        ...


class AudioSink(Protocol):
    name: str
    volume: float

    async def play(self, clip: AudioClip) -> None:
        """Return when ``clip`` has been played; cancelling stops it within a block."""
        ...


def resample(pcm: bytes, from_rate: int, to_rate: int) -> bytes:
    if from_rate == to_rate or not pcm:
        return pcm
    import soxr

    samples = np.frombuffer(pcm, dtype=np.int16)
    return soxr.resample(samples, from_rate, to_rate).astype(np.int16).tobytes()


def apply_volume(pcm: bytes, volume: float) -> bytes:
    if volume >= 0.999:
        return pcm
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) * volume
    return samples.astype(np.int16).tobytes()


# --- real devices ---------------------------------------------------------------------------


def find_device(name: str | None, kind: str) -> tuple[int | None, dict]:
    """The device index for a name (case-insensitive substring) that has ``kind`` channels.
    ``None`` picks the system default. Raises AudioUnavailableError with the names it knows."""
    import sounddevice as sd

    channels_key = "max_input_channels" if kind == "input" else "max_output_channels"
    try:
        devices = list(sd.query_devices())
    except Exception as exc:  # PortAudio could not start at all
        raise AudioUnavailableError(f"no audio system: {exc}") from exc
    usable = [(i, d) for i, d in enumerate(devices) if d[channels_key] > 0]
    if not usable:
        raise AudioUnavailableError(f"no {kind} audio device found")
    if name is None:
        try:
            default = sd.query_devices(kind=kind)
        except Exception as exc:
            raise AudioUnavailableError(f"no default {kind} device: {exc}") from exc
        index = next((i for i, d in usable if d["name"] == default["name"]), usable[0][0])
        return None, dict(default) | {"index": index}
    for i, d in usable:
        if name.lower() in d["name"].lower():
            return i, dict(d) | {"index": i}
    names = ", ".join(repr(d["name"]) for _, d in usable)
    raise AudioUnavailableError(f"{kind} device {name!r} not found; available: {names}")


class DeviceHealth:
    """A sound device's health, told to the App (``on_health``: status, event, LED) and the log
    when it changes; the same failure again (each retry) is not repeated."""

    kind = "device"
    name = ""
    stall_s = STALL_S
    healthy = True
    _last_problem: str | None = None
    on_health: Callable[[bool, str], None] | None = None

    def _report(self, healthy: bool, detail: str) -> None:
        if healthy == self.healthy and (healthy or detail == self._last_problem):
            return
        self.healthy = healthy
        self._last_problem = None if healthy else detail
        if healthy:
            log.info(f"{self.kind} working again", device=self.name, detail=detail)
        else:
            log.error(f"{self.kind} failed", device=self.name, error=detail)
        if self.on_health is not None:
            self.on_health(healthy, detail)


class SoundDeviceSource(DeviceHealth):
    kind = "microphone"

    def __init__(self, device: str | None, *, block_ms: int = 30, queue_blocks: int = 200) -> None:
        self.device_index, info = find_device(device, "input")
        self.name = str(info["name"])
        self.block_ms = block_ms
        self.queue_blocks = queue_blocks
        self.dropped_blocks = 0
        self.last_block_at = time.monotonic()
        self.last_block_time_s: float | None = None  # monotonic time the block left the ADC
        self._last_block_s = 0.0
        self.device_rate = PIPELINE_RATE

    async def blocks(self) -> AsyncIterator[bytes]:
        """Blocks for ever. A microphone that stops delivering (unplugged, the sound server
        gone or restarted at another rate) is reported unhealthy and reopened with backoff until
        it delivers again: the daemon neither restarts nor waits for ever on a dead stream."""
        import sounddevice as sd

        loop = asyncio.get_running_loop()
        retry_s = RETRY_FIRST_S
        while True:
            queue: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue(self.queue_blocks)
            try:
                stream = await _in_own_thread(
                    functools.partial(self._start, sd, self._callback_into(queue, loop)),
                    OPEN_TIMEOUT_S)
            except TimeoutError:
                self._report(False, f"microphone {self.name!r} did not open within "
                                    f"{OPEN_TIMEOUT_S:g} s")
            except AudioUnavailableError as exc:
                self._report(False, str(exc))
            else:
                try:
                    async for block in self._read(stream, queue):
                        retry_s = RETRY_FIRST_S
                        yield block
                    self._report(False, f"microphone {self.name!r} delivered nothing for "
                                        f"{self.stall_s:g} s; reopening it")
                finally:
                    # a dead server's stream can hang in close(): its own thread, not waited out
                    with contextlib.suppress(TimeoutError):
                        await asyncio.shield(_in_own_thread(
                            functools.partial(_close_quietly, stream), OPEN_TIMEOUT_S))
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, RETRY_MAX_S)

    def _callback_into(self, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop):
        def enqueue(item: tuple[bytes, float]) -> None:
            if queue.full():
                self.dropped_blocks += 1
                return
            queue.put_nowait(item)

        def callback(indata, frames, time_info, status) -> None:  # PortAudio's thread
            # the echo canceller lines this block up with what the speaker played at that time
            age = time_info.currentTime - time_info.inputBufferAdcTime
            if not 0 <= age < 1 or not time_info.inputBufferAdcTime:
                age = frames / self.device_rate
            loop.call_soon_threadsafe(enqueue, (bytes(indata), time.monotonic() - age))

        return callback

    def _start(self, sd, callback):
        stream = self._open(sd, callback)
        try:
            stream.start()
        except sd.PortAudioError as exc:
            stream.close()
            raise AudioUnavailableError(f"cannot start microphone {self.name!r}: {exc}") from exc
        return stream

    async def _read(self, stream, queue: asyncio.Queue) -> AsyncIterator[bytes]:
        """The stream's blocks until it stalls."""
        resampler = None
        if self.device_rate != PIPELINE_RATE:
            import soxr

            resampler = soxr.ResampleStream(self.device_rate, PIPELINE_RATE, 1, dtype="int16")
        log.info("microphone open", device=self.name, rate=self.device_rate)
        wait_s = FIRST_CALLBACK_S + self.stall_s  # a new stream may take a while to start
        while True:
            try:
                async with asyncio.timeout(wait_s):
                    block, captured_at = await queue.get()
            except TimeoutError:
                return
            wait_s = self.stall_s
            self._report(True, f"{self.name} at {self.device_rate} Hz")
            self.last_block_at = time.monotonic()
            self.last_block_time_s = self._steady(captured_at, len(block) / 2 / self.device_rate)
            if resampler is not None:
                block = resampler.resample_chunk(np.frombuffer(block, np.int16)).tobytes()
            yield block

    def _steady(self, captured_at: float, block_s: float) -> float:
        """The capture clock is continuous: a block starts where the last one ended, unless
        the callback's own stamp is more than 20 ms off (dropped blocks, an xrun). Callback
        scheduling jitters by milliseconds; the echo canceller's alignment must not."""
        expected = (self.last_block_time_s + self._last_block_s
                    if self.last_block_time_s is not None else captured_at)
        self._last_block_s = block_s
        return expected if abs(captured_at - expected) < 0.02 else captured_at

    def _open(self, sd, callback):
        for rate in (PIPELINE_RATE, None):
            try:
                if rate is None:
                    rate = int(sd.query_devices(self.device_index, "input")["default_samplerate"])
                stream = sd.RawInputStream(
                    samplerate=rate, blocksize=rate * self.block_ms // 1000,
                    device=self.device_index, channels=1, dtype="int16", callback=callback,
                )
                self.device_rate = rate
                return stream
            except sd.PortAudioError as exc:
                last = exc
        raise AudioUnavailableError(f"cannot open microphone {self.name!r}: {last}")


class SoundDeviceSink(DeviceHealth):
    """One output stream kept open (opening one per reply costs first-audio latency), fed by
    PortAudio's callback from a buffer: stopping (barge-in) just empties the buffer, so no
    thread is ever writing to a stream that is being aborted or closed."""

    kind = "speaker"

    def __init__(self, device: str | None, *, volume: float = 0.8) -> None:
        self.device_index, info = find_device(device, "output")
        self.name = str(info["name"])
        self.volume = volume
        self._stream = None
        self._rate = 0  # the rate the stream runs at
        self._requested_rate = 0  # the clip rate it was opened for (may differ: fallback)
        self._latency = 0.0  # output latency PortAudio reports (when the callback's timing is 0)
        self._lock = threading.Lock()
        self._pending = bytearray()  # PCM waiting for the callback
        self._drained: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reference: PlaybackReference | None = None  # the echo canceller's far end
        self._pending16 = bytearray()  # the same audio at 16 kHz, for the reference
        self._carry16 = 0.0  # fractional 16 kHz samples owed by the last callback
        self._last_callback = self._opened_at = 0.0  # monotonic: liveness of the stream

    def _silent_for(self) -> float:
        """Seconds since the stream last asked for audio; a new stream gets ``FIRST_CALLBACK_S``
        to start (a sound server under load can take over a second)."""
        return time.monotonic() - max(self._last_callback, self._opened_at + FIRST_CALLBACK_S)

    def _callback(self, outdata, frames, time_info, status) -> None:  # PortAudio's thread
        self._last_callback = time.monotonic()
        wanted = len(outdata)
        with self._lock:
            chunk = bytes(self._pending[:wanted])
            del self._pending[:wanted]
            ref = self._take_reference(len(chunk) // 2) if self.reference is not None else b""
            if not self._pending:
                self._pending16.clear()  # rounding leftovers of the clip that just ended
            done = self._drained if not self._pending else None
            if done is not None:
                self._drained = None
        outdata[:] = chunk + bytes(wanted - len(chunk))
        if self.reference is not None:
            # when this buffer reaches the DAC, by the stream's own clock: the reference is
            # stamped with it, so the canceller needs no delay guess
            ahead = time_info.outputBufferDacTime - time_info.currentTime
            if not 0 <= ahead < 1 or not time_info.outputBufferDacTime:
                ahead = self._latency
            self.reference.write(time.monotonic() + ahead, np.frombuffer(ref, np.int16))
        if done is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(done.set)

    def _take_reference(self, device_samples: int) -> bytes:
        """The 16 kHz twin of the ``device_samples`` just handed to the device (lock held)."""
        exact = device_samples * PIPELINE_RATE / (self._rate or PIPELINE_RATE) + self._carry16
        n = int(exact)
        self._carry16 = exact - n
        ref = bytes(self._pending16[:2 * n])
        del self._pending16[:2 * n]
        return ref

    def _ensure_stream(self, rate: int):
        import sounddevice as sd

        if self._stream is not None and self._requested_rate == rate:
            return self._stream
        self.close()
        self._requested_rate = rate
        for candidate in (rate, None):
            try:
                if candidate is None:
                    candidate = int(sd.query_devices(self.device_index, "output")["default_samplerate"])
                self._stream = sd.RawOutputStream(
                    samplerate=candidate, device=self.device_index, channels=1, dtype="int16",
                    callback=self._callback, latency="low",
                )
                self._rate = candidate
                self._latency = float(self._stream.latency or 0.0)
                break
            except sd.PortAudioError as exc:
                last = exc
        else:
            raise AudioUnavailableError(f"cannot open speaker {self.name!r}: {last}")
        try:
            self._stream.start()
            self._opened_at = time.monotonic()
        except sd.PortAudioError as exc:
            self.close()
            raise AudioUnavailableError(f"cannot start speaker {self.name!r}: {exc}") from exc
        return self._stream

    async def play(self, clip: AudioClip) -> None:
        def prepare() -> bytes:  # resampling a sentence takes milliseconds: not on the loop
            self._ensure_stream(clip.sample_rate)
            return apply_volume(resample(clip.pcm, clip.sample_rate, self._rate), self.volume)

        try:
            pcm = await _in_own_thread(prepare, OPEN_TIMEOUT_S)
        except TimeoutError:
            self._report(False, f"speaker {self.name!r} did not open within {OPEN_TIMEOUT_S:g} s")
            return
        except AudioUnavailableError as exc:  # the device is gone: said, and tried next clip
            self._report(False, str(exc))
            return
        if not pcm:
            return
        self._loop = asyncio.get_running_loop()
        drained = asyncio.Event()
        ref16 = resample(clip.pcm, clip.sample_rate, PIPELINE_RATE) if self.reference else b""
        with self._lock:
            self._pending.extend(pcm)
            self._pending16.extend(apply_volume(ref16, self.volume))
            self._drained = drained
        try:
            while not drained.is_set():
                try:
                    async with asyncio.timeout(0.25):
                        await drained.wait()
                except TimeoutError:
                    if self._silent_for() > self.stall_s:
                        # the device stopped taking audio (unplugged, the sound server gone):
                        # report it, drop the clip and the stream; the next clip opens a new one
                        with contextlib.suppress(TimeoutError):
                            await _in_own_thread(self.close, OPEN_TIMEOUT_S)
                        self._report(False, f"speaker {self.name!r} stopped playing; reopening it")
                        return
        except asyncio.CancelledError:
            self.stop()
            raise
        self._report(True, f"{self.name} at {self._rate} Hz")

    def stop(self) -> None:
        """Silence at once: what has not been handed to the device yet is dropped."""
        with self._lock:
            self._pending.clear()
            self._pending16.clear()
            self._carry16 = 0.0
            self._drained = None

    def close(self) -> None:
        self.stop()
        stream, self._stream = self._stream, None  # detached first: a close that hangs keeps no
        if stream is not None:                     # dead stream for the next clip
            _close_quietly(stream)


async def _in_own_thread(fn: Callable[[], T], timeout_s: float) -> T:
    """``fn()`` in a thread of its own, waited for at most ``timeout_s``: PortAudio can hang for
    good on a sound server that died (open, close), and a hung call must not hold a thread of
    the shared pool (the store and the models use it) nor the caller."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=run, name="audio-device", daemon=True).start()
    async with asyncio.timeout(timeout_s):
        return await asyncio.shield(future)


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():  # the waiter gave up; close what arrived late
        if exc is None and hasattr(result, "close"):
            _close_quietly(result)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # the device or the server is gone already
        log.debug("closing an audio stream failed", exc_info=True)


# --- simulation: WAV files ------------------------------------------------------------------


def read_wav_16k_mono(path: Path) -> bytes:
    """The file as 16 kHz 16-bit mono PCM, converted when it is another rate or has more
    channels; AudioFileError when it is not a readable PCM WAV."""
    try:
        pcm, rate = wav.decode(path)
    except wav.WavError as exc:
        raise AudioFileError(f"{path}: {exc}") from None
    return resample(pcm, rate, PIPELINE_RATE)


def write_wav(path: Path, pcm: bytes, rate: int = PIPELINE_RATE) -> None:
    """16-bit mono PCM to a WAV file (its directory made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav.encode(pcm, rate))


class WavFileSource:
    """A WAV file as the microphone: paced in real time, or as fast as the pipeline takes it."""

    def __init__(self, path: Path, *, block_ms: int = 30, realtime: bool = True,
                 tail_silence_s: float = 1.0) -> None:
        pcm = read_wav_16k_mono(path)
        self.name = f"wav:{path.name}"
        self._pcm = pcm + bytes(2 * int(tail_silence_s * PIPELINE_RATE))
        self._block = 2 * PIPELINE_RATE * block_ms // 1000
        self.realtime = realtime
        self.dropped_blocks = 0
        self.last_block_at = time.monotonic()
        self.duration_s = len(self._pcm) / 2 / PIPELINE_RATE

    async def blocks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        block_s = self._block / 2 / PIPELINE_RATE
        for n, start in enumerate(range(0, len(self._pcm), self._block)):
            if self.realtime:
                delay = started + n * block_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
            self.last_block_at = time.monotonic()
            block = self._pcm[start : start + self._block]
            if len(block) < self._block:
                block += bytes(self._block - len(block))
            yield block


class WavFileSink:
    """The speaker as a WAV file (16-bit mono at ``sample_rate``); ``realtime`` also takes as
    long as the audio lasts, like a real speaker."""

    def __init__(self, path: Path, *, sample_rate: int = 22050, realtime: bool = False,
                 volume: float = 1.0) -> None:
        self.name = f"wav:{path.name}"
        self.path = path
        self.sample_rate = sample_rate
        self.realtime = realtime
        self.volume = volume
        self.played_s = 0.0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._wav = wave.open(str(path), "wb")
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(sample_rate)

    async def play(self, clip: AudioClip) -> None:
        def write() -> bytes:  # resampling and the file: not on the event loop
            pcm = apply_volume(resample(clip.pcm, clip.sample_rate, self.sample_rate), self.volume)
            self._wav.writeframes(pcm)
            return pcm

        pcm = await asyncio.to_thread(write)
        self.played_s += len(pcm) / 2 / self.sample_rate
        if self.realtime:
            await asyncio.sleep(len(pcm) / 2 / self.sample_rate)

    def close(self) -> None:
        self._wav.close()
