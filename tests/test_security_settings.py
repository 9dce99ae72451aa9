"""Security of the settings and of what the control plane may ask for (issue 8 fault 10)."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from companion.__main__ import main
from companion.control.client import ControlLink
from companion.control.protocol import ProtocolError, parse_server_frame
from companion.settings import ControlPlaneSettings, describe_validation_error, is_loopback_host
from tests.conftest import fake_app, make_settings, until


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LocalHost", True), ("0.0.0.0", False), ("10.0.0.2", False),
    ("cp.example", False), ("127.example.com", False), ("", False), (None, False),
])
def test_loopback_is_decided_in_one_place(host, loopback):
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize("url", ["ws://cp.example:8080", "ws://10.0.0.5", "ws://0.0.0.0:1"])
def test_clear_text_ws_to_another_host_is_refused(url):
    with pytest.raises(ValidationError) as info:
        ControlPlaneSettings(url=url, token="tok-SECRET-42")
    message = describe_validation_error(info.value)
    assert "clear text" in message and "wss://" in message and "allow_insecure_ws" in message
    assert "tok-SECRET-42" not in message and "tok-SECRET-42" not in str(info.value)


@pytest.mark.parametrize("url", ["wss://cp.example", "ws://127.0.0.1:8080", "ws://localhost:1",
                                 "ws://[::1]:9"])
def test_wss_and_loopback_ws_are_accepted(url):
    assert ControlPlaneSettings(url=url).url == url


@pytest.mark.parametrize("url", ["http://cp.example", "cp.example:8080", "wss://", "file:///x"])
def test_a_url_that_is_not_a_websocket_is_refused(url):
    with pytest.raises(ValidationError):
        ControlPlaneSettings(url=url)


def test_a_clear_text_url_from_the_environment_stops_start_up(monkeypatch, capsys):
    monkeypatch.setenv("COMPANION_CONTROL_PLANE__URL", "ws://cp.example:8080")
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "control_plane" in err and "clear text" in err and len(err.strip().splitlines()) == 1


async def test_an_allowed_clear_text_link_says_so_in_the_log(tmp_path):
    settings = make_settings(tmp_path, control_plane={
        "url": "ws://192.0.2.7:9", "token": "t", "allow_insecure_ws": True,
        "backoff_initial_s": 5, "backoff_max_s": 5})
    assert settings.control_plane.clear_text

    async def unreachable(*args, **kwargs):
        raise OSError("no route (test)")

    app = fake_app(settings)
    async with asyncio.timeout(5):
        await app.start()
    try:
        with capture_logs() as logs:
            link = ControlLink(app, connect=unreachable)
            task = asyncio.create_task(link.run())
            await until(lambda: link.status.retries >= 1)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        warnings = [e for e in logs if e["log_level"] == "warning" and "clear text" in e["event"]]
        assert warnings and warnings[0]["host"] == "192.0.2.7"
    finally:
        await app.aclose()


def _activity(config: dict, activity_type: str = "story") -> str:
    return json.dumps({"id": "c1", "type": "group_activity",
                       "payload": {"activity_type": activity_type, "config": config}})


@pytest.mark.parametrize("activity_type, config, field", [
    ("story", {"sentences": 10**9}, "config.sentences"),
    ("story", {"sentences": 0}, "config.sentences"),
    ("story", {"sentences": "many"}, "config.sentences"),
    ("story", {"answer_timeout_s": 1e9}, "config.answer_timeout_s"),
    ("trivia", {"answer_timeout_s": -1}, "config.answer_timeout_s"),
    ("trivia", {"answer_timeout_s": float("inf")}, "config.answer_timeout_s"),
    ("trivia", {"question": "q" * 5000}, "config.question"),
    ("story", {"story_so_far": "s" * 5000}, "config.story_so_far"),
])
def test_unbounded_activity_values_are_refused_before_anything_runs(activity_type, config, field):
    with pytest.raises(ProtocolError) as info:
        parse_server_frame(_activity(config, activity_type), max_bytes=1 << 20)
    assert info.value.code == "invalid_payload"
    assert field in info.value.message


def test_bounded_activity_values_arrive_checked_with_their_defaults():
    command = parse_server_frame(_activity({"sentences": 3, "theme": "a boat", "extra": 1}),
                                 max_bytes=1 << 20)
    assert command.payload.config == {"sentences": 3, "theme": "a boat", "listen": True,
                                      "answer_timeout_s": 8.0}
