"""Real daemons (`companion run`, real models, no sound card) against the dev control plane
(`companion-controlplane serve`), both as subprocesses on 127.0.0.1: every command reaches the
daemon, a session moves from one daemon to the other and continues there, and SIGKILLs of the
control plane and of a daemon lose nothing and run nothing twice."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import until_blocking

pytestmark = pytest.mark.models

TOKEN = "fleet-token"
ADMIN = "fleet-admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN}"}
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


# the daemons answer HTTP only once they are up: a refused connection means "not yet"
until = partial(until_blocking, every_s=0.1, ignore=(OSError,))


class Fleet:
    """The control plane and the daemons of one test, as subprocesses."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.plane_port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.api_ports: dict[str, int] = {}

    @property
    def plane(self) -> str:
        return f"http://127.0.0.1:{self.plane_port}"

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = (self.tmp / f"{name}.log").open("a")
        self.procs[name] = subprocess.Popen(
            [sys.executable, *args], env={**os.environ, **env}, cwd=self.tmp, stdout=log,
            stderr=subprocess.STDOUT)

    def start_plane(self) -> None:
        self._spawn("plane", ["-m", "companion_dev.controlplane", "serve", "--port",
                              str(self.plane_port), "--token", TOKEN, "--admin-token", ADMIN, "--state",
                              str(self.tmp / "plane.db"), "--heartbeat", "2"], {})
        until(lambda: http("GET", f"{self.plane}/health", timeout=2)[0] == 200, 20, "the plane")

    def start_daemon(self, device_id: str) -> None:
        port = self.api_ports.setdefault(device_id, free_port())
        self._spawn(device_id, ["-m", "companion", "run"], {
            "COMPANION_DEVICE_ID": device_id, "COMPANION_DATA_DIR": str(self.tmp / device_id),
            "COMPANION_API__PORT": str(port), "COMPANION_GPIO__ENABLED": "false",
            "COMPANION_LOG_FORMAT": "json",
            "COMPANION_CONTROL_PLANE__URL": f"ws://127.0.0.1:{self.plane_port}",
            "COMPANION_CONTROL_PLANE__TOKEN": TOKEN, "COMPANION_CONTROL_PLANE__HEARTBEAT_S": "1",
            "COMPANION_CONTROL_PLANE__BACKOFF_INITIAL_S": "0.05",
            "COMPANION_CONTROL_PLANE__BACKOFF_MAX_S": "0.5",
            "COMPANION_CONTROL_PLANE__RECONNECT_SPREAD_S": "0.3"})

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def connected(self, device_id: str) -> bool:
        status, info = http("GET", f"{self.plane}/devices/{device_id}", timeout=2)
        return status == 200 and info["connected"] and info["hello"] is not None

    def api(self, device_id: str) -> str:
        return f"http://127.0.0.1:{self.api_ports[device_id]}"

    def ready(self, device_id: str) -> bool:
        return http("GET", f"{self.api(device_id)}/ready", timeout=2)[0] == 200

    def command(self, device_id: str, type_: str, payload: dict, wait: float = 60) -> dict:
        status, result = http("POST", f"{self.plane}/devices/{device_id}/commands?wait={wait}",
                              {"type": type_, "payload": payload}, timeout=wait + 10)
        assert status == 200, result
        return result["ack"]

    def send(self, device_id: str, type_: str, payload: dict) -> str:
        return http("POST", f"{self.plane}/devices/{device_id}/commands",
                    {"type": type_, "payload": payload}, timeout=10)[1]["id"]

    def acks(self, device_id: str) -> list[dict]:
        _, result = http("GET", f"{self.plane}/devices/{device_id}/messages?type=ack", timeout=10)
        return [m["payload"] for m in result["messages"]]

    def original_acks(self, device_id: str, command_id: str) -> list[dict]:
        return [a for a in self.acks(device_id)
                if a["command_id"] == command_id and not a.get("duplicate")]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop_all()


def outbox_rows(db: Path) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        try:
            return [r[0] for r in conn.execute("SELECT frame FROM control_outbox ORDER BY seq")]
        except sqlite3.OperationalError:
            return []


def test_real_daemons_commands_handoff_and_kills(fleet: Fleet):
    fleet.start_plane()
    fleet.start_daemon("kitchen")
    fleet.start_daemon("bedroom")
    for device in ("kitchen", "bedroom"):
        until(lambda d=device: fleet.ready(d) and fleet.connected(d), 120, f"{device} linked")

    # commands do the real thing in the real daemon
    ack = fleet.command("kitchen", "persona_switch", {"persona_id": "medication_nurse",
                                                      "transition_message": "Nurse here."})
    assert ack["ok"] and ack["switch_complete"] and ack["new_persona_id"] == "medication_nurse"
    # the first switch may wait for the start-up warming of persona prompts; later ones do not
    for persona in ("companion", "medication_nurse"):
        ack = fleet.command("kitchen", "persona_switch", {"persona_id": persona})
        assert ack["ok"] and ack["new_persona_id"] == persona
        assert ack["latency_ms"] < 1500, ack
    ack = fleet.command("kitchen", "config_update", {"settings": {"pipeline.follow_up_window_s": 2,
                                                                  "api.port": 1}})
    assert ack["applied"] == {"pipeline.follow_up_window_s": 2.0} and "api.port" in ack["refused"]
    ack = fleet.command("kitchen", "audio_response", {"text": "Hello."})
    assert not ack["ok"] and "no audio output" in ack["error"]  # this machine has no speaker
    assert fleet.command("kitchen", "ping", {})["pong"]

    # a conversation on the kitchen daemon moves to the bedroom daemon and continues there
    status, chat = http("POST", f"{fleet.api('kitchen')}/v1/chat",
                        {"message": "My name is Ada and I take aspirin at noon."}, timeout=120)
    assert status == 200, chat
    session = chat["conversation_id"]
    status, handoff = http("POST", f"{fleet.plane}/handoff?wait=60", {
        "from_device_id": "kitchen", "to_device_id": "bedroom", "notify_user": False}, timeout=90)
    assert status == 200, handoff
    assert handoff["out"]["ok"] and handoff["out"]["session_id"] == session
    assert handoff["in"]["ack"]["ok"] and handoff["in"]["ack"]["session_id"] == session
    status, chat = http("POST", f"{fleet.api('bedroom')}/v1/chat",
                        {"message": "What do I take at noon?"}, timeout=120)
    assert status == 200, chat
    assert chat["conversation_id"] == session
    status, history = http("GET", f"{fleet.api('bedroom')}/v1/sessions/{session}", timeout=10)
    assert status == 200, history
    assert "aspirin at noon" in json.dumps(history) and "What do I take at noon?" in json.dumps(history)

    # SIGKILL the control plane mid-stream: nothing acknowledged is lost, nothing runs twice
    sent = []
    for i in range(12):
        sent.append(fleet.send("kitchen", "ping", {}))
        if i == 6:
            fleet.kill("plane")
            fleet.start_plane()
    until(lambda: all(fleet.original_acks("kitchen", c) for c in sent), 60, "every ping acked")
    assert all(len(fleet.original_acks("kitchen", c)) == 1 for c in sent)

    # SIGKILL the daemon with an ack in its outbox: after the restart it is delivered, not re-run
    at = time.time() + 1.5
    cid = fleet.send("kitchen", "sync_event", {"at": at, "action": "led",
                                                "led": {"color": "blue", "duration_ms": 100}})
    until(lambda: http("GET", f"{fleet.plane}/commands/{cid}", timeout=5)[1]["sent_count"], 10,
          "the command sent")
    fleet.kill("plane")
    db = fleet.tmp / "kitchen" / "companion.db"
    until(lambda: any(cid in row for row in outbox_rows(db)), 30, "the ack waiting in the outbox")
    fleet.kill("kitchen")
    fleet.start_plane()
    fleet.start_daemon("kitchen")
    until(lambda: fleet.original_acks("kitchen", cid), 120, "the ack from before the kill")
    original = fleet.original_acks("kitchen", cid)
    assert len(original) == 1 and "no LED" in original[0]["error"]  # ran once, before the kill
    until(lambda: not outbox_rows(db), 30, "the outbox drained")
