"""`companion run` as a real process on this machine (no sound card, no GPIO): it starts, says
what is missing, serves the API, reloads personas on SIGHUP and stops cleanly on SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from companion.settings import PROJECT_ROOT
from tests.conftest import until_blocking

pytestmark = pytest.mark.models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_until(predicate, limit_s: float, what: str = "") -> None:
    """The daemon answers HTTP only once it is up: a refused connection means "not yet"."""
    until_blocking(predicate, limit_s, what, every_s=0.1, ignore=(OSError,))


@pytest.fixture
def daemon(tmp_path):
    port = free_port()
    env = {**os.environ, "COMPANION_API__PORT": str(port), "COMPANION_DATA_DIR": str(tmp_path),
           "COMPANION_LOG_FORMAT": "json", "COMPANION_GPIO__PIN_FACTORY": "nonexistent",
           "COMPANION_AUDIO__INPUT_DEVICE": "no-such-microphone",
           "COMPANION_AUDIO__OUTPUT_DEVICE": "no-such-speaker"}
    log = (tmp_path / "daemon.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "companion", "run"], env=env, cwd=PROJECT_ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process, port, tmp_path / "daemon.log"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()


def test_the_daemon_runs_without_sound_card_and_stops_cleanly(daemon):
    process, port, log_path = daemon
    wait_until(lambda: get(port, "/health")[0] == 200, 30)
    wait_until(lambda: get(port, "/ready")[0] == 200, 60)
    status, body = get(port, "/ready/all")
    assert status in (200, 503)
    assert body["components"]["audio_in"]["healthy"] is False
    assert body["components"]["llm"]["healthy"] is True
    process.send_signal(signal.SIGHUP)  # persona reload must not disturb the daemon
    wait_until(lambda: "personas reloaded" in log_path.read_text(), 10, "the reload logged")
    assert get(port, "/health")[0] == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    events = [line.get("event") for line in lines]
    assert "audio device unavailable" in events
    assert "personas reloaded" in events
    assert "companion stopping" in events
    assert not any(line.get("level") == "error" for line in lines), lines
    assert "Traceback" not in log_path.read_text()
