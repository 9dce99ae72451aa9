"""Recorded audio that actions play: base64 WAVs and WAVs fetched from a URL."""

from __future__ import annotations

import base64
import binascii
import io
import time
import wave

import numpy as np
import structlog

from companion.actions.core import ActionError
from companion.stages.tts import AudioClip

log = structlog.get_logger(__name__)

MAX_AUDIO_BYTES = 10 << 20


def decode_wav(audio_b64: str) -> AudioClip:
    """A base64 WAV (16-bit PCM, any rate, mono or more channels) as a mono clip."""
    try:
        data = base64.b64decode(audio_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ActionError("VALIDATION_ERROR", "audio_b64 is not valid base64") from None
    return wav_bytes_to_clip(data)


def wav_bytes_to_clip(data: bytes) -> AudioClip:
    if len(data) > MAX_AUDIO_BYTES:
        raise ActionError("VALIDATION_ERROR",
                          f"audio of {len(data)} bytes is larger than {MAX_AUDIO_BYTES}")
    try:
        with wave.open(io.BytesIO(data)) as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ActionError("VALIDATION_ERROR", f"audio is not a WAV file: {exc}") from None
    if width != 2:
        raise ActionError("VALIDATION_ERROR", f"WAV must be 16-bit PCM, not {8 * width}-bit")
    if channels > 1:
        samples = np.frombuffer(frames, dtype=np.int16).reshape(-1, channels)
        frames = samples.mean(axis=1).astype(np.int16).tobytes()
    return AudioClip(frames, rate)


def clip_to_wav_b64(clip: AudioClip) -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(clip.sample_rate)
        wav.writeframes(clip.pcm)
    return base64.b64encode(buffer.getvalue()).decode()


async def fetch_wav(url: str, *, timeout_s: float = 15.0) -> AudioClip:
    import aiohttp

    started = time.perf_counter()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http, \
                http.get(url) as response:
            if response.status != 200:
                raise ActionError("FAILED", f"audio_url answered HTTP {response.status}")
            data = await response.content.read(MAX_AUDIO_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ActionError("FAILED",
                          f"cannot fetch audio_url: {type(exc).__name__}: {exc}") from None
    log.info("fetched audio", url=url, bytes=len(data),
             took_ms=round((time.perf_counter() - started) * 1000, 1))
    return wav_bytes_to_clip(data)
