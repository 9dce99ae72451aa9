"""Real processes for the process-level tests: `companion run` daemons and the dev control plane
(`companion_dev.controlplane serve`) as subprocesses on 127.0.0.1, their JSON logs, their HTTP
APIs, and SIGKILL / restart. Used by tests/test_daemon_process.py, tests/test_control_daemon.py,
tests/test_arbitration_real.py and the fault-injection suite in tests/reliability/.

A daemon here has no sound card and no GPIO unless the caller's ``env`` gives it some (a
private PulseAudio from tests/pulse.py, ``COMPANION_GPIO__PIN_FACTORY=mock``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from companion.settings import PROJECT_ROOT
from tests.conftest import until_blocking

TOKEN = "fleet-token"  # the devices' token on the dev control plane
ADMIN = "fleet-admin"  # the control plane's operator API

# the processes answer HTTP only once they are up: a refused connection means "not yet"
until = partial(until_blocking, every_s=0.1, ignore=(OSError,))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 60, *,
         token: str | None = ADMIN) -> tuple[int, Any]:
    """One JSON request; (status, decoded body) also for 4xx/5xx answers."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def get(port: int, path: str, timeout: float = 5) -> tuple[int, Any]:
    """GET on a daemon's local API (no key)."""
    return http("GET", f"http://127.0.0.1:{port}{path}", timeout=timeout, token=None)


def log_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a process log (anything else, e.g. a C library's chatter, skipped)."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a SIGKILL
    return records


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    return [r for r in log_records(path) if r.get("event") == event]


# no sound card, no GPIO: what a daemon on a build machine has
NO_DEVICES = {"COMPANION_GPIO__ENABLED": "false", "COMPANION_LOG_FORMAT": "json"}


class Fleet:
    """The control plane and the daemons of one test, as subprocesses. Each process logs to
    ``tmp/<name>.log`` (appended across restarts); a daemon keeps its data in ``tmp/<name>/``
    and its API port across restarts."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.plane_port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.api_ports: dict[str, int] = {}
        self._argv: dict[str, tuple[list[str], dict[str, str]]] = {}

    @property
    def plane(self) -> str:
        return f"http://127.0.0.1:{self.plane_port}"

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        self._argv[name] = (args, env)
        # the code under test (a worktree's, not an installed copy's), also for `-m tests...`
        path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
        with (self.tmp / f"{name}.log").open("a") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, *args], env={**os.environ, "PYTHONPATH": path, **env},
                cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)
        return self.procs[name]

    def start_plane(self) -> None:
        self._spawn("plane", ["-m", "companion_dev.controlplane", "serve", "--port",
                              str(self.plane_port), "--token", TOKEN, "--admin-token", ADMIN, "--state",
                              str(self.tmp / "plane.db"), "--heartbeat", "2"], {})
        until(lambda: http("GET", f"{self.plane}/health", timeout=2)[0] == 200, 60, "the plane")

    def daemon_env(self, device_id: str, *, plane: bool = True) -> dict[str, str]:
        """The environment of `companion run` for ``device_id``: its data dir and API port, no
        devices, and (``plane``) linked to this fleet's control plane with fast reconnects."""
        port = self.api_ports.setdefault(device_id, free_port())
        env = {**NO_DEVICES, "COMPANION_DEVICE_ID": device_id,
               "COMPANION_DATA_DIR": str(self.data_dir(device_id)), "COMPANION_API__PORT": str(port)}
        if plane:
            env.update({
                "COMPANION_CONTROL_PLANE__URL": f"ws://127.0.0.1:{self.plane_port}",
                "COMPANION_CONTROL_PLANE__TOKEN": TOKEN, "COMPANION_CONTROL_PLANE__HEARTBEAT_S": "1",
                "COMPANION_CONTROL_PLANE__BACKOFF_INITIAL_S": "0.05",
                "COMPANION_CONTROL_PLANE__BACKOFF_MAX_S": "0.5",
                "COMPANION_CONTROL_PLANE__RECONNECT_SPREAD_S": "0.3"})
        return env

    def start_daemon(self, device_id: str, *, plane: bool = True, env: dict[str, str] | None = None,
                     args: list[str] | None = None) -> subprocess.Popen:
        """`python -m companion run` (or ``args``: another entry point, e.g. a test's daemon
        with fakes) for ``device_id``; ``env`` adds to / overrides `daemon_env`."""
        return self._spawn(device_id, args or ["-m", "companion", "run"],
                           {**self.daemon_env(device_id, plane=plane), **(env or {})})

    def restart(self, name: str) -> subprocess.Popen:
        """Start ``name`` again exactly as it was last started (after `kill` or `stop`)."""
        assert name not in self.procs or self.procs[name].poll() is not None, f"{name} still runs"
        args, env = self._argv[name]
        return self._spawn(name, args, env)

    def kill(self, name: str) -> None:
        """SIGKILL: no handler runs, nothing is flushed or closed (a crash, a power cut)."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self, name: str, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit status."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    # --- what the processes say -------------------------------------------------------------------

    def data_dir(self, device_id: str) -> Path:
        return self.tmp / device_id

    def db(self, device_id: str) -> Path:
        return self.data_dir(device_id) / "companion.db"

    def log_path(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def log(self, name: str, event: str | None = None) -> list[dict[str, Any]]:
        path = self.log_path(name)
        return log_records(path) if event is None else log_events(path, event)

    def wait_log(self, name: str, event: str, count: int = 1, limit_s: float = 60,
                 **fields: Any) -> dict[str, Any]:
        """Wait until ``name`` has logged ``event`` (with these ``fields``) ``count`` times; the
        last such record. Fails at once when the process has died."""

        def seen() -> dict[str, Any] | None:
            found = [r for r in self.log(name, event)
                     if all(r.get(k) == v for k, v in fields.items())]
            if len(found) >= count:
                return found[-1]
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}) before logging {event!r}")
            return None

        return until(seen, limit_s, f"{name} logs {event!r} x{count} {fields or ''}")

    def connected(self, device_id: str) -> bool:
        status, info = http("GET", f"{self.plane}/devices/{device_id}", timeout=2)
        return status == 200 and info["connected"] and info["hello"] is not None

    def api(self, device_id: str) -> str:
        return f"http://127.0.0.1:{self.api_ports[device_id]}"

    def get(self, device_id: str, path: str, timeout: float = 10) -> tuple[int, Any]:
        return get(self.api_ports[device_id], path, timeout)

    def ready(self, device_id: str) -> bool:
        return self.get(device_id, "/ready", timeout=2)[0] == 200

    def wait_ready(self, device_id: str, limit_s: float = 120, *, linked: bool = False) -> None:
        """Until /ready is 200 (and, with ``linked``, the control plane sees its hello)."""
        until(lambda: self.ready(device_id) and (not linked or self.connected(device_id)),
              limit_s, f"{device_id} ready{' and linked' if linked else ''}")

    # --- the control plane's side ---------------------------------------------------------------

    def command(self, device_id: str, type_: str, payload: dict, wait: float = 60) -> dict:
        status, result = http("POST", f"{self.plane}/devices/{device_id}/commands?wait={wait}",
                              {"type": type_, "payload": payload}, timeout=wait + 10)
        assert status == 200, result
        return result["ack"]

    def send(self, device_id: str, type_: str, payload: dict) -> str:
        return http("POST", f"{self.plane}/devices/{device_id}/commands",
                    {"type": type_, "payload": payload}, timeout=10)[1]["id"]

    def messages(self, device_id: str, type_: str) -> list[dict]:
        status, result = http("GET", f"{self.plane}/devices/{device_id}/messages?type={type_}",
                              timeout=10)
        return result["messages"] if status == 200 else []

    def acks(self, device_id: str) -> list[dict]:
        return [m["payload"] for m in self.messages(device_id, "ack")]

    def original_acks(self, device_id: str, command_id: str) -> list[dict]:
        return [a for a in self.acks(device_id)
                if a["command_id"] == command_id and not a.get("duplicate")]


def run_companion(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
                  cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess:
    """`python -m companion ARGS` to completion (a CLI command: check, models, chat)."""
    return subprocess.run([sys.executable, "-m", "companion", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


# --- a daemon's store, read from outside (the daemon may be running, or dead) ----------------------


@contextmanager
def read_only(db: Path) -> Iterator[sqlite3.Connection]:
    """The SQLite store opened read-only (``mode=ro``): looking never changes what a crash left.
    A WAL left by a SIGKILL is read as SQLite's recovery would read it."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        yield conn
    finally:
        conn.close()


def integrity(db: Path) -> str:
    """``PRAGMA integrity_check``: "ok" for a consistent file."""
    with read_only(db) as conn:
        return "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))


def outbox_rows(db: Path) -> list[str]:
    """The frames (JSON text) waiting in the control outbox, oldest first; [] before the
    daemon created the table."""
    with read_only(db) as conn:
        try:
            return [r[0] for r in conn.execute("SELECT frame FROM control_outbox ORDER BY seq")]
        except sqlite3.OperationalError:
            return []


def turns(db: Path, session_id: str) -> list[tuple[str, str, str]]:
    """(turn_id, role, content) of a session's messages, in order."""
    with read_only(db) as conn:
        return [tuple(r) for r in conn.execute(
            "SELECT turn_id, role, content FROM messages WHERE session_id = ? ORDER BY id",
            (session_id,))]


def kv(db: Path, key: str) -> Any:
    """A value of the store's key/value table (active persona, active session), or None."""
    with read_only(db) as conn:
        row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return json.loads(row[0]) if row else None
