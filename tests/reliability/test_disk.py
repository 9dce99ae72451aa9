"""The daemon's disk refusing writes while it runs: first every write refused (its files made
immutable), then the disk full. Its data directory is a small ext4 file system of its own (a
loop-mounted image: as root here and in CI). Expected each time: a clear error state (`/ready/all`
storage, the LED's error state as `pipeline_state`, one log line), HTTP and the control link
still up, nothing acknowledged lost, and recovery by itself once the disk takes writes again,
with no restart.

Why immutable files rather than `mount -o remount,ro`: the kernel refuses a read-only remount
while a process holds files open for writing (the daemon always does), and the emergency
read-only switch of a failing card (ext4 errors=remount-ro) cannot be undone without an fsck.
`chattr +i` makes the kernel refuse the writes on the daemon's open files, and `chattr -i`
gives them back. The daemon runs fake models (tests/reliability/daemon.py): the fault is
about the store, not the models."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import Fleet, http, run_companion, until
from tests.reliability.conftest import integrity, turns
from tests.reliability.daemon import DAEMON


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB ext4 file system mounted at tmp/kitchen (the daemon's data dir)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to loop-mount a file system (CI and the dev VM run as root)")
    image, mount = tmp_path / "disk.img", tmp_path / "kitchen"
    mount.mkdir()
    made = _run("mkfs.ext4", "-q", "-F", str(image), "16M") if shutil.which("mkfs.ext4") else None
    if made is None or made.returncode != 0:
        pytest.skip(f"cannot make an ext4 image: {(made and made.stderr.strip()) or 'no mkfs.ext4'}")
    mounted = _run("mount", "-o", "loop", str(image), str(mount))
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount a file system here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        _run("chattr", "-R", "-i", str(mount))
        _run("umount", "-l", str(mount))


def writes_refused(data: Path, refused: bool) -> None:
    """The directory, the database and its WAL immutable (or not). Not the -shm file: SQLite
    maps it into memory, and the kernel answers a write to a mapped page of an immutable file
    with SIGBUS, a fault that no real disk produces (a full one makes SQLite's own allocation
    of the page fail cleanly)."""
    flag = "+i" if refused else "-i"
    for path in [data, *data.iterdir()]:
        if path.name not in ("lost+found", "companion.db-shm"):
            done = _run("chattr", flag, str(path))
            assert done.returncode == 0, done.stderr


def chat(fleet: Fleet, message: str) -> tuple[int, dict]:
    return http("POST", f"{fleet.api('kitchen')}/v1/chat", {"message": message}, timeout=30,
                token=None)


def storage(fleet: Fleet) -> dict:
    return fleet.get("kitchen", "/ready/all")[1]["components"]["storage"]


def state(fleet: Fleet) -> str:
    return fleet.get("kitchen", "/v1/state")[1]["pipeline_state"]


def refused_clearly(fleet: Fleet, words: str, acknowledged: list[str], *,
                    every_write: bool) -> None:
    """Chats go on until the disk refuses one (a full disk still takes what fits in the space
    SQLite already has; each chat answered 200 goes in ``acknowledged``); it is refused with
    503 and the reason; storage, LED state and log say so; the link stays up and answers a
    command (not run: it could not be recorded)."""
    for _ in range(200):
        status, body = chat(fleet, "Remember this please. " + "x" * 3900)
        if status != 200:
            break
        acknowledged.append(body["id"])
    assert status == 503 and body["error"]["code"] == "SERVICE_UNAVAILABLE", body
    assert words in body["error"]["message"], body
    until(lambda: not storage(fleet)["healthy"], 10, "storage shown unhealthy")
    assert words in storage(fleet)["detail"]
    until(lambda: state(fleet) == "error", 10, "the error state (LED)")
    assert any(words in r["problem"] for r in fleet.log("kitchen", "storage failing: replies are "
                                                        "not kept until it is fixed"))
    ack = fleet.command("kitchen", "ping", {}, wait=20)
    if not ack["ok"] or every_write:  # a full disk may still take a write as small as its claim
        assert not ack["ok"] and ack["error_code"] == "STORAGE_UNAVAILABLE", ack
    assert fleet.get("kitchen", "/health")[0] == 200


def recovered(fleet: Fleet, acknowledged: list[str]) -> None:
    """Back to normal by itself: healthy, idle, chats kept, commands run; nothing lost."""
    until(lambda: storage(fleet)["healthy"], 20, "storage healthy again")
    until(lambda: state(fleet) == "idle", 10, "the LED back to idle")
    status, body = chat(fleet, "And one more thing.")
    assert status == 200, body
    acknowledged.append(body["id"])
    assert fleet.command("kitchen", "ping", {}, wait=20)["ok"]
    assert kept_turns(fleet, body["conversation_id"]) == acknowledged


def kept_turns(fleet: Fleet, session: str) -> list[str]:
    """The turn ids in the store, each with its question and its answer."""
    rows = turns(fleet.db("kitchen"), session)
    ids = list(dict.fromkeys(turn for turn, _, _ in rows))
    assert [role for _, role, _ in rows] == ["user", "assistant"] * len(ids)
    return ids


def test_the_disk_refusing_writes_then_full_and_back(fleet: Fleet, small_disk: Path):
    fleet.start_plane()
    fleet.start_daemon("kitchen", args=DAEMON)
    fleet.wait_ready("kitchen", 60, linked=True)
    status, first = chat(fleet, "I take aspirin at noon.")
    assert status == 200, first
    acknowledged = [first["id"]]

    writes_refused(small_disk, True)
    refused_clearly(fleet, "I/O error", acknowledged, every_write=True)
    writes_refused(small_disk, False)
    recovered(fleet, acknowledged)

    filler = small_disk / "filler"
    _run("dd", "if=/dev/zero", f"of={filler}", "bs=1M")  # until the disk is full
    refused_clearly(fleet, "the disk is full", acknowledged, every_write=False)
    filler.unlink()
    recovered(fleet, acknowledged)

    assert fleet.procs["kitchen"].poll() is None  # the same process all along: no crash loop
    assert len(fleet.log("kitchen", "companion starting")) == 1
    assert not [r for r in fleet.log("kitchen") if r.get("event") == "control link session failed"]
    fleet.stop("kitchen")
    assert integrity(fleet.db("kitchen")) == "ok"
    assert kept_turns(fleet, first["conversation_id"]) == acknowledged


def test_a_read_only_data_dir_at_start_is_one_clear_line(tmp_path: Path):
    """Started on a data directory mounted read-only (a card the kernel switched to read-only
    before a reboot): one line naming the directory and the fix, exit 1, no traceback.
    (systemd restarts it with its back-off; serving without a store is not built yet.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only file system (CI and the dev VM run as root)")
    data = tmp_path / "data"
    data.mkdir()
    mounted = _run("mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(data))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        done = run_companion("run", env={"COMPANION_DATA_DIR": str(data),
                                         "COMPANION_GPIO__ENABLED": "false"}, timeout=120)
    finally:
        _run("umount", "-l", str(data))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert str(data) in line and "read-only" in line and "make it writable" in line, done.stderr
