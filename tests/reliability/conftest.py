"""Shared helpers of the fault-injection suite: every test here starts real processes
(`python -m companion run`, the dev control plane `companion_dev.controlplane serve`) and
injects a fault into them (SIGKILL, a full or read-only disk, missing models, a dead link).

The process plumbing lives in tests/processes.py (also used by the other process tests):
`Fleet` starts, SIGKILLs (`kill`), stops and `restart`s processes, each with its own data dir,
API port and JSON log; `wait_ready`, `wait_log` wait for readiness and for a log line that marks
the phase to inject the fault in (never a sleep). The store helpers open a daemon's SQLite file
read-only, so looking at what a crash left changes nothing.

    fleet.start_plane(); fleet.start_daemon("kitchen"); fleet.wait_ready("kitchen", linked=True)
    fleet.wait_log("kitchen", "persona switched"); fleet.kill("kitchen")
    assert integrity(fleet.db("kitchen")) == "ok"; fleet.restart("kitchen")
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import Fleet, integrity, kv, outbox_rows, read_only, turns

__all__ = ["Fleet", "integrity", "kv", "outbox_rows", "read_only", "turns"]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The processes of one test; whatever still runs at the end is stopped (SIGTERM, then
    SIGKILL after 15 s)."""
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop_all()
