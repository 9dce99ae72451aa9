"""WAV files and clips from outside: truncated, wrong header, zero length, 8-bit, 48 kHz stereo,
10 minutes long, and whatever hypothesis makes of the bytes."""

from __future__ import annotations

import base64
import io
import struct
import tempfile
import wave
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from companion import wav
from companion.actions.clips import MAX_AUDIO_S, wav_bytes_to_clip
from companion.actions.core import ActionError
from companion.devices.audio import AudioFileError, read_wav_16k_mono
from tests.control_helpers import control_plane, linked_device, url

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_wav(seconds: float = 0.5, rate: int = 16000, channels: int = 1, width: int = 2) -> bytes:
    frames = int(seconds * rate)
    t = np.arange(frames) / rate
    tone = (np.sin(2 * np.pi * 440 * t) * 0.3)
    if width == 1:
        samples = ((tone + 1) * 127.5).astype(np.uint8)
    else:
        samples = (tone * (2 ** (8 * width - 1) - 1)).astype({2: "<i2", 4: "<i4"}[width])
    data = np.repeat(samples[:, None], channels, axis=1).tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(data)
    return buffer.getvalue()


GOOD = make_wav()


def _patched(offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(GOOD)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


@pytest.mark.parametrize("data, reason", [
    (b"", "not a readable PCM WAV"),
    (GOOD[:30], "not a readable PCM WAV"),                        # cut inside the header
    (GOOD[:1000], "truncated"),                                   # cut inside the data
    (GOOD[:44], "truncated"),                                     # a header and no data
    (b"RIFX" + GOOD[4:], "not a readable PCM WAV"),               # wrong byte order mark
    (GOOD[:8] + b"AVI " + GOOD[12:], "not a readable PCM WAV"),   # not WAVE
    (_patched(20, "<H", 3), "not a readable PCM WAV"),            # IEEE float, not PCM
    (_patched(24, "<I", 0), "sample rate 0"),                     # a zero rate
    (_patched(24, "<I", 4_000_000), "sample rate 4000000"),
    (_patched(22, "<H", 0), "channels"),                          # no channels
    (make_wav(0.0), "no audio"),                                  # a valid header, 0 frames
    (b"\x00" * 5000, "not a readable PCM WAV"),
])
def test_bad_wavs_end_in_one_clear_error(tmp_path, data, reason):
    with pytest.raises(wav.WavError, match=reason):
        wav.decode(data)
    path = tmp_path / "in.wav"
    path.write_bytes(data)
    with pytest.raises(AudioFileError, match=reason):  # `companion simulate --input`
        read_wav_16k_mono(path)
    with pytest.raises(ActionError, match=reason):  # a control-plane clip
        wav_bytes_to_clip(data)


@pytest.mark.parametrize("rate, channels, width", [(16000, 1, 1), (48000, 2, 2), (44100, 6, 4),
                                                    (8000, 1, 2)])
def test_other_pcm_formats_are_converted(rate, channels, width):
    pcm, got_rate = wav.decode(make_wav(0.25, rate, channels, width))
    assert got_rate == rate and len(pcm) == 2 * int(0.25 * rate)
    assert np.abs(np.frombuffer(pcm, np.int16)).max() > 5000  # the tone survived
    assert len(read_wav_16k_mono_bytes(make_wav(0.25, rate, channels, width))) == 2 * 4000


def read_wav_16k_mono_bytes(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.wav"
        path.write_bytes(data)
        return read_wav_16k_mono(path)


def test_ten_minutes_from_the_control_plane_is_refused_but_a_file_is_read():
    long_clip = make_wav(600, 8000, 1, 1)  # 4.8 MB: under the byte cap, far over the time cap
    with pytest.raises(ActionError, match=f"longer than {MAX_AUDIO_S} s"):
        wav_bytes_to_clip(long_clip)
    with pytest.raises(ActionError, match="larger than"):
        wav_bytes_to_clip(make_wav(600, 16000, 1, 2))  # 19 MB
    assert len(read_wav_16k_mono_bytes(long_clip)) == 2 * 16000 * 600  # a simulation may be long


@FAST
@given(st.binary(max_size=400))
def test_any_bytes_decode_or_fail_cleanly(data):
    try:
        pcm, rate = wav.decode(data)
    except wav.WavError as exc:
        assert str(exc)
        return
    assert 8000 <= rate <= 192000 and pcm and len(pcm) % 2 == 0


@FAST
@given(st.integers(0, len(GOOD) - 1), st.integers(0, 255), st.integers(0, len(GOOD)))
@example(16, 127, len(GOOD))  # a fmt chunk size past the end: wave raised a bare RuntimeError
def test_a_damaged_wav_decodes_or_fails_cleanly(position, value, cut):
    data = bytearray(GOOD)
    data[position] = value
    try:
        pcm, rate = wav.decode(bytes(data[:cut]))
    except wav.WavError:
        return
    assert 8000 <= rate <= 192000 and len(pcm) % 2 == 0


async def test_hostile_clips_over_the_link_fail_the_command_and_play_nothing(tmp_path):
    # (a 10-minute clip cannot even arrive: its frame is over control_plane.max_frame_bytes)
    bad = [GOOD[:30], GOOD[:1000], b"RIFX" + GOOD[4:], _patched(24, "<I", 0), make_wav(0.0),
           make_wav(20, 8000, 1, 1)[:-10]]
    async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (app, _):
        await plane.wait_connected("dev-a")
        for data in bad:
            ack = await plane.wait_ack(await plane.send("dev-a", "audio_response", {
                "audio_b64": base64.b64encode(data).decode()}))
            assert ack["ok"] is False and ack["error"], ack
            assert "Error" not in ack["error"].split(":")[0]  # a sentence, not an exception name
        assert app.sink.played == []
        ack = await plane.wait_ack(await plane.send("dev-a", "audio_response", {
            "audio_b64": base64.b64encode(make_wav(0.2, 48000, 2)).decode()}))
        assert ack["ok"] and ack["played_s"] == pytest.approx(0.2, abs=0.01)
