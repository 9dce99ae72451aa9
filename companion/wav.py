"""WAV files and bytes from outside (a simulated microphone file, a control-plane clip) as mono
16-bit PCM, or one clear error.

One decoder for every WAV that enters the daemon, because each hostile shape must end the same
way: a truncated file, a header with no audio, a rate or channel count no device has, a sample
width PCM does not have, a frame cut in half. ``wave`` checks the RIFF structure; the rest is
checked here, before numpy sees the bytes (a partial frame would otherwise be a ValueError from
``reshape`` deep in a command, or a division by a zero rate later).
"""

from __future__ import annotations

import io
import struct
import wave
from pathlib import Path

import numpy as np

RATES = (8000, 192000)  # the sample rates accepted, inclusive
MAX_CHANNELS = 8


class WavError(ValueError):
    """Not a PCM WAV the daemon can play or hear; the message says what is wrong."""


def decode(source: Path | bytes) -> tuple[bytes, int]:
    """(16-bit mono PCM, sample rate) of a PCM WAV file or its bytes; WavError otherwise."""
    try:
        opened = wave.open(str(source) if isinstance(source, Path) else io.BytesIO(source), "rb")
        with opened as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.getnframes()
            raw = wav.readframes(frames)
    except FileNotFoundError:
        raise WavError("no such file") from None
    except (wave.Error, EOFError, OSError, RuntimeError, ValueError, struct.error) as exc:
        # RuntimeError: wave's chunk reader on a chunk size that points outside the file
        raise WavError(f"not a readable PCM WAV ({exc or type(exc).__name__})") from None
    if not 1 <= channels <= MAX_CHANNELS:
        raise WavError(f"{channels} channels (1 to {MAX_CHANNELS} are accepted)")
    if not RATES[0] <= rate <= RATES[1]:
        raise WavError(f"sample rate {rate} Hz (accepted: {RATES[0]} to {RATES[1]} Hz)")
    if width not in (1, 2, 3, 4):
        raise WavError(f"unsupported sample width {width * 8} bits")
    frame = width * channels
    if len(raw) < frames * frame:
        raise WavError(f"truncated: the header promises {frames} frames, the data holds "
                       f"{len(raw) // frame}")
    if not raw:
        raise WavError("holds no audio (0 frames)")
    return _to_mono16(raw, width, channels), rate


def encode(pcm: bytes, rate: int) -> bytes:
    """16-bit mono PCM as the bytes of a WAV file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)
    return buffer.getvalue()


def _to_mono16(raw: bytes, width: int, channels: int) -> bytes:
    if width == 2:
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float32)
    elif width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128) * 256
    elif width == 4:
        samples = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 65536
    else:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        ints = (b[:, 0].astype(np.int32) | (b[:, 1].astype(np.int32) << 8)
                | (b[:, 2].astype(np.int32) << 16))
        samples = (np.where(ints >= 1 << 23, ints - (1 << 24), ints) / 256).astype(np.float32)
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return np.clip(samples, -32768, 32767).astype(np.int16).tobytes()
