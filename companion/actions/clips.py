"""Recorded audio that actions play: base64 WAVs and WAVs fetched from a URL."""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import socket
import time
from collections.abc import Collection
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp.resolver import ThreadedResolver

from companion import wav
from companion.actions.core import ActionError
from companion.stages.tts import AudioClip

log = structlog.get_logger(__name__)

MAX_AUDIO_BYTES = 10 << 20
MAX_AUDIO_S = 300  # a clip the control plane sends is a message, not a programme


def decode_wav(audio_b64: str) -> AudioClip:
    """A base64 WAV (16-bit PCM, any rate, mono or more channels) as a mono clip."""
    try:
        data = base64.b64decode(audio_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ActionError("VALIDATION_ERROR", "audio_b64 is not valid base64") from None
    return wav_bytes_to_clip(data)


def wav_bytes_to_clip(data: bytes, *, max_bytes: int = MAX_AUDIO_BYTES) -> AudioClip:
    if len(data) > max_bytes:
        raise ActionError("VALIDATION_ERROR",
                          f"audio of {len(data)} bytes is larger than {max_bytes}")
    try:
        pcm, rate = wav.decode(data)
    except wav.WavError as exc:
        raise ActionError("VALIDATION_ERROR", f"audio is not a usable WAV: {exc}") from None
    clip = AudioClip(pcm, rate)
    if clip.duration_s > MAX_AUDIO_S:
        raise ActionError("VALIDATION_ERROR",
                          f"audio of {clip.duration_s:.0f} s is longer than {MAX_AUDIO_S} s")
    return clip


def clip_to_wav_b64(clip: AudioClip) -> str:
    return base64.b64encode(wav.encode(clip.pcm, clip.sample_rate)).decode()


def origin(url: str) -> str:
    """scheme://host[:port] of a URL: what may be logged (a path or query may carry a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_global and not ip.is_multicast


class _PublicResolver(ThreadedResolver):
    """Resolves like aiohttp's default but refuses names that lead to this machine or the local
    network (checked at connect time, so a name cannot change its answer in between)."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        results = await super().resolve(host, port, family)
        if not results or not all(_public(r["host"]) for r in results):
            raise _Refused(f"{host} is on this machine or the local network")
        return results


class _Refused(aiohttp.ClientConnectionError):
    pass


async def fetch_wav(url: str, *, allowed_hosts: Collection[str] = (), timeout_s: float = 15.0,
                    max_bytes: int = MAX_AUDIO_BYTES) -> AudioClip:
    """GET a WAV over http(s), whole, up to ``max_bytes``. Hosts on loopback, link-local or
    private addresses are refused unless listed in ``allowed_hosts``; redirects are not
    followed (one could lead there). Only the URL's origin is ever logged or reported."""
    parts, where = urlsplit(url), origin(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ActionError("VALIDATION_ERROR", "audio_url must be an http(s) URL with a host")
    host = parts.hostname
    allowed = host in set(allowed_hosts)
    if not allowed:
        with contextlib.suppress(ValueError):  # a name, not an address: the resolver checks it
            if not _public(host):
                raise ActionError("FORBIDDEN", f"audio_url {where} is on this machine or the "
                                  "local network (allow it in control_plane.audio_url_hosts)")
    connector = aiohttp.TCPConnector(resolver=None if allowed else _PublicResolver())
    started = time.perf_counter()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                         connector=connector) as http, \
                http.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise ActionError("FAILED", f"audio_url {where} answered HTTP {response.status}")
            if (response.content_length or 0) > max_bytes:
                raise _too_large(where, response.content_length or 0, max_bytes)
            data = bytearray()
            async for chunk in response.content.iter_chunked(64 << 10):
                data += chunk
                if len(data) > max_bytes:
                    raise _too_large(where, len(data), max_bytes)
    except _Refused:
        raise ActionError("FORBIDDEN", f"audio_url {where} is on this machine or the local "
                          "network (allow it in control_plane.audio_url_hosts)") from None
    except TimeoutError:
        raise ActionError("FAILED", f"audio_url {where} did not answer within {timeout_s} s") \
            from None
    except aiohttp.ClientError:
        raise ActionError("FAILED", f"cannot fetch audio_url {where}") from None
    log.info("fetched audio", origin=where, bytes=len(data),
             took_ms=round((time.perf_counter() - started) * 1000, 1))
    return wav_bytes_to_clip(bytes(data), max_bytes=max_bytes)


def _too_large(where: str, size: int, limit: int) -> ActionError:
    return ActionError("VALIDATION_ERROR", f"audio_url {where} is larger than {limit} bytes "
                       f"({size} or more)", {"max_bytes": limit})
