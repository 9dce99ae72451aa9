"""`companion run` as a real process on this machine (no sound card, no GPIO): it starts, says
what is missing, serves the API, reloads personas on SIGHUP and stops cleanly on SIGTERM."""

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import Fleet, until

pytestmark = pytest.mark.models


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop_all()


def test_the_daemon_runs_without_sound_card_and_stops_cleanly(fleet: Fleet):
    process = fleet.start_daemon("device", plane=False, env={
        "COMPANION_GPIO__ENABLED": "true", "COMPANION_GPIO__PIN_FACTORY": "nonexistent",
        "COMPANION_AUDIO__INPUT_DEVICE": "no-such-microphone",
        "COMPANION_AUDIO__OUTPUT_DEVICE": "no-such-speaker"})
    log_path = fleet.log_path("device")
    until(lambda: fleet.get("device", "/health")[0] == 200, 30)
    fleet.wait_ready("device", 60)
    status, body = fleet.get("device", "/ready/all")
    assert status in (200, 503)
    assert body["components"]["audio_in"]["healthy"] is False
    assert body["components"]["llm"]["healthy"] is True
    process.send_signal(signal.SIGHUP)  # persona reload must not disturb the daemon
    fleet.wait_log("device", "personas reloaded", limit_s=10)
    assert fleet.get("device", "/health")[0] == 200
    assert fleet.stop("device") == 0
    lines = fleet.log("device")
    events = [line.get("event") for line in lines]
    assert "audio device unavailable" in events
    assert "personas reloaded" in events
    assert "companion stopping" in events
    assert not any(line.get("level") == "error" for line in lines), lines
    assert "Traceback" not in log_path.read_text()
