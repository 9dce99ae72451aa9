"""audio_url clips (issue 8, fault 3): the whole body is read up to the limit and refused above
it; only http(s) to public hosts unless allow-listed; only the URL's origin is logged."""

from __future__ import annotations

import asyncio
import io
import wave

import pytest
from structlog.testing import capture_logs

from companion.actions.clips import fetch_wav, origin
from companion.actions.core import ActionError
from tests.control_helpers import control_plane, linked_device, url
from tests.http_helpers import file_server

RATE = 16000


def wav_bytes(seconds: float) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(b"\x01\x00" * int(RATE * seconds))
    return buffer.getvalue()


@pytest.fixture
async def media():
    async with file_server({"/long.wav": wav_bytes(30.0)}) as base:
        yield base


async def test_a_long_clip_is_read_whole(media):
    async with asyncio.timeout(10):
        clip = await fetch_wav(f"{media}/long.wav", allowed_hosts=["127.0.0.1"])
    assert clip.duration_s == pytest.approx(30.0)


async def test_a_clip_over_the_limit_is_refused(media):
    async with asyncio.timeout(10):
        with pytest.raises(ActionError) as err:
            await fetch_wav(f"{media}/long.wav", allowed_hosts=["127.0.0.1"], max_bytes=100_000)
    assert err.value.code == "VALIDATION_ERROR" and "larger than 100000" in err.value.message


@pytest.mark.parametrize("where", ["http://127.0.0.1:9/a.wav", "http://localhost:9/a.wav",
                                   "http://169.254.169.254/latest", "http://10.0.0.5/a.wav",
                                   "http://192.168.1.2/a.wav", "http://[::1]:9/a.wav"])
async def test_this_machine_and_the_local_network_are_refused(where):
    async with asyncio.timeout(10):
        with pytest.raises(ActionError) as err:
            await fetch_wav(where)
    assert err.value.code == "FORBIDDEN" and "audio_url_hosts" in err.value.message


async def test_only_http_urls():
    with pytest.raises(ActionError) as err:
        await fetch_wav("file:///etc/passwd")
    assert err.value.code == "VALIDATION_ERROR"


async def test_only_the_origin_is_logged(media):
    secret_url = f"{media}/long.wav?signature=TOPSECRET"
    with capture_logs() as logs:
        async with asyncio.timeout(10):
            await fetch_wav(secret_url, allowed_hosts=["127.0.0.1"])
            with pytest.raises(ActionError) as err:
                await fetch_wav(f"{media}/missing.wav?signature=TOPSECRET",
                                allowed_hosts=["127.0.0.1"])
    assert "TOPSECRET" not in repr(logs) and "TOPSECRET" not in err.value.message
    assert logs[0]["origin"] == media == origin(secret_url)
    assert origin("https://user:pw@host.example:8443/x?t=1") == "https://host.example:8443"


async def test_audio_response_acks_the_whole_clip_or_refuses(tmp_path, media):
    async with control_plane() as plane, linked_device(
            tmp_path, url(plane), cp={"audio_url_hosts": ["127.0.0.1"]}) as (app, _):
        await plane.wait_connected("dev-a")
        ack = await plane.wait_ack(await plane.send("dev-a", "audio_response",
                                                    {"audio_url": f"{media}/long.wav"}))
        assert ack["ok"] and ack["played_s"] == pytest.approx(30.0)
        app.settings = app.settings.model_copy(update={
            "control_plane": app.settings.control_plane.model_copy(
                update={"audio_url_hosts": []})})
        ack = await plane.wait_ack(await plane.send("dev-a", "audio_response",
                                                    {"audio_url": f"{media}/long.wav"}))
        assert not ack["ok"] and ack["error_code"] == "FORBIDDEN"
