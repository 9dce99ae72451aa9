"""The durable outbox and the record of processed commands, in the daemon's SQLite store.

Everything the device must tell the control plane (acks, transcripts, replies, button presses,
session exports) is written here *before* it is sent and deleted only once the server has it,
so a dropped link, a restarted control plane or a SIGKILLed daemon loses nothing. Rows keep
their insertion order (``seq``) and are sent in that order. The outbox is bounded: when full,
the oldest non-essential row goes first (acks and session exports are essential) and a counter
says how many were dropped.

``control_commands`` makes commands idempotent: a command id is recorded as ``running`` before
it runs and ``done`` (with its ack) in the same transaction that queues the ack, so a duplicate
is acked again with the stored result and never runs twice. A command still ``running`` at start
was cut short by a crash: it is acked as interrupted, not run again (at most once).

All methods are blocking; call them through ``await store.run(...)``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from companion.control.protocol import ACK, ESSENTIAL_TYPES, device_frame
from companion.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS control_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    frame_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    essential INTEGER NOT NULL,
    frame TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS control_outbox_essential ON control_outbox(essential, seq);
CREATE TABLE IF NOT EXISTS control_commands (
    command_id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done')),
    result TEXT,                -- the ack payload (JSON) once done
    received_at REAL NOT NULL,
    done_at REAL,
    done_seq INTEGER            -- order of completion (for the hello's last acked id)
);
CREATE INDEX IF NOT EXISTS control_commands_done ON control_commands(done_seq);
CREATE TABLE IF NOT EXISTS control_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS control_dead_letters (
    frame_id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    frame TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    dead_at REAL NOT NULL
);
"""

KEEP_COMMANDS = 20_000  # processed command ids remembered for duplicate detection


@dataclass(frozen=True)
class Pending:
    seq: int
    frame_id: str
    type: str
    text: str  # the frame, serialized once


class Outbox:
    def __init__(self, store: Store, *, max_items: int) -> None:
        self.store = store
        self.max_items = max_items
        self.depth = 0
        self.dropped = 0

    # --- set-up -----------------------------------------------------------------------------------

    def setup(self) -> list[str]:
        """Create the tables, ack commands a crash interrupted; returns their ids."""
        self.store.add_schema(SCHEMA)

        def work(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT command_id, type FROM control_commands "
                                "WHERE status = 'running'").fetchall()
            for row in rows:
                ack = {"command_id": row["command_id"], "command_type": row["type"], "ok": False,
                       "error": "interrupted: the device restarted while running it; not re-run",
                       "latency_ms": None}
                self._finish(conn, row["command_id"], device_frame(ACK, ack))
            return [r["command_id"] for r in rows]

        interrupted = self.store.transaction(work)
        self.refresh()
        return interrupted

    def refresh(self) -> None:
        self.depth = int(self.store.query("SELECT COUNT(*) AS n FROM control_outbox")[0]["n"])
        rows = self.store.query("SELECT value FROM control_meta WHERE key = 'dropped'")
        self.dropped = int(rows[0]["value"]) if rows else 0

    # --- the outbox ---------------------------------------------------------------------------------

    def put(self, frame: dict[str, Any]) -> int:
        """Store a frame to send; returns its sequence number."""
        return self.store.transaction(lambda conn: self._put(conn, frame))

    def _put(self, conn: sqlite3.Connection, frame: dict[str, Any]) -> int:
        essential = frame["type"] in ESSENTIAL_TYPES
        cur = conn.execute(
            "INSERT INTO control_outbox(frame_id, type, essential, frame, created_at) "
            "VALUES(?,?,?,?,?)",
            (frame["id"], frame["type"], int(essential), json.dumps(frame), time.time()))
        seq = int(cur.lastrowid or 0)
        count = conn.execute("SELECT COUNT(*) FROM control_outbox").fetchone()[0]
        excess = count - self.max_items
        if excess > 0:
            # oldest non-essential first; essential ones only when nothing else is left
            victims = [r[0] for r in conn.execute(
                "SELECT seq FROM control_outbox WHERE seq != ? ORDER BY essential, seq LIMIT ?",
                (seq, excess))]
            conn.executemany("DELETE FROM control_outbox WHERE seq = ?", [(v,) for v in victims])
            conn.execute("INSERT INTO control_meta(key, value) VALUES('dropped', ?) ON CONFLICT(key)"
                         " DO UPDATE SET value = CAST(value AS INTEGER) + ?",
                         (len(victims), len(victims)))
            self.dropped += len(victims)
            count -= len(victims)
        self.depth = count
        return seq

    def pending(self, after_seq: int = 0, limit: int = 200) -> list[Pending]:
        rows = self.store.query(
            "SELECT seq, frame_id, type, frame FROM control_outbox WHERE seq > ? "
            "ORDER BY seq LIMIT ?", (after_seq, limit))
        return [Pending(r["seq"], r["frame_id"], r["type"], r["frame"]) for r in rows]

    def remove(self, frame_ids: list[str]) -> int:
        """Delivered: forget these frames. Returns how many were still there."""
        if not frame_ids:
            return 0

        def work(conn: sqlite3.Connection) -> int:
            removed = 0
            for chunk in range(0, len(frame_ids), 500):
                part = frame_ids[chunk : chunk + 500]
                marks = ",".join("?" * len(part))
                removed += conn.execute(
                    f"DELETE FROM control_outbox WHERE frame_id IN ({marks})", part).rowcount
            return removed

        removed = self.store.transaction(work)
        self.depth = max(0, self.depth - removed)
        return removed

    def remove_upto(self, seq: int) -> int:
        """Delivered (no receipts from this server): everything sent up to ``seq``."""
        removed = self.store.transaction(
            lambda conn: conn.execute("DELETE FROM control_outbox WHERE seq <= ?", (seq,)).rowcount)
        self.depth = max(0, self.depth - removed)
        return removed

    def dead_letter(self, frame_id: str, reason: str) -> Pending | None:
        """The server refused this frame (it closed the link with 1009, too big): move it out of
        the outbox into ``control_dead_letters`` so it is not resent for ever. None if gone."""

        def work(conn: sqlite3.Connection) -> Pending | None:
            row = conn.execute("SELECT seq, frame_id, type, frame, created_at FROM control_outbox "
                               "WHERE frame_id = ?", (frame_id,)).fetchone()
            if row is None:
                return None
            conn.execute("INSERT OR REPLACE INTO control_dead_letters(frame_id, type, frame, "
                         "reason, created_at, dead_at) VALUES(?,?,?,?,?,?)",
                         (row["frame_id"], row["type"], row["frame"], reason, row["created_at"],
                          time.time()))
            conn.execute("DELETE FROM control_outbox WHERE seq = ?", (row["seq"],))
            return Pending(row["seq"], row["frame_id"], row["type"], row["frame"])

        dead = self.store.transaction(work)
        if dead is not None:
            self.depth = max(0, self.depth - 1)
        return dead

    def dead_letters(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.store.query(
            "SELECT frame_id, type, reason, dead_at, length(frame) AS bytes "
            "FROM control_dead_letters ORDER BY dead_at")]

    # --- processed commands -----------------------------------------------------------------------

    def begin(self, command_id: str, command_type: str) -> tuple[str, dict[str, Any] | None]:
        """Claim a command: ("new", None) to run it, ("running", None) if it is running now,
        ("done", ack payload) if it already ran."""

        def work(conn: sqlite3.Connection) -> tuple[str, dict[str, Any] | None]:
            row = conn.execute("SELECT status, result FROM control_commands WHERE command_id = ?",
                               (command_id,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO control_commands(command_id, type, status, received_at)"
                             " VALUES(?,?, 'running', ?)", (command_id, command_type, time.time()))
                return "new", None
            if row["status"] == "running":
                return "running", None
            return "done", json.loads(row["result"])

        return self.store.transaction(work)

    def finish(self, command_id: str, ack: dict[str, Any], *, extra_acks: int = 0) -> None:
        """Record the command's result and queue its ack (and one more per duplicate that came
        while it ran), all in one transaction."""

        def work(conn: sqlite3.Connection) -> None:
            self._finish(conn, command_id, ack)
            for _ in range(extra_acks):
                self._put(conn, device_frame(ACK, {**ack["payload"], "duplicate": True}))

        self.store.transaction(work)

    def _finish(self, conn: sqlite3.Connection, command_id: str, ack: dict[str, Any]) -> None:
        done_seq = conn.execute("SELECT COALESCE(MAX(done_seq), 0) + 1 FROM control_commands"
                                ).fetchone()[0]
        conn.execute("UPDATE control_commands SET status = 'done', result = ?, done_at = ?, "
                     "done_seq = ? WHERE command_id = ?",
                     (json.dumps(ack["payload"]), time.time(), done_seq, command_id))
        self._put(conn, ack)

    def last_acked_command_id(self) -> str | None:
        rows = self.store.query("SELECT command_id FROM control_commands WHERE status = 'done' "
                                "ORDER BY done_seq DESC LIMIT 1")
        return rows[0]["command_id"] if rows else None

    def executions(self) -> dict[str, str]:
        """command id → status (tests and diagnostics)."""
        return {r["command_id"]: r["status"]
                for r in self.store.query("SELECT command_id, status FROM control_commands")}

    def prune(self, keep: int = KEEP_COMMANDS) -> int:
        """Forget the oldest processed command ids beyond ``keep``."""
        return self.store.transaction(lambda conn: conn.execute(
            "DELETE FROM control_commands WHERE status = 'done' AND done_seq <= "
            "(SELECT COALESCE(MAX(done_seq), 0) FROM control_commands) - ?", (keep,)).rowcount)
