"""The device's memory: one SQLite file (WAL, synchronous=FULL) under the data directory.

Sessions and their turns, summaries and small key/value state (active persona and session).
A turn's user and assistant messages are written in one transaction, so after a power cut a
turn is either wholly there or not at all. Calls go through one connection guarded by a lock;
the async wrappers run them in a worker thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

EXPORT_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    persona_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    summary TEXT NOT NULL DEFAULT '',
    summarized_upto INTEGER NOT NULL DEFAULT 0,  -- messages.id of the last message folded in
    origin TEXT                                   -- device the session was imported from
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    turn_id TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    persona_id TEXT NOT NULL,
    source TEXT NOT NULL,          -- voice | http | control | import
    tokens INTEGER NOT NULL DEFAULT 0,
    latency_json TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_session ON messages(session_id, id);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Message:
    id: int
    session_id: str
    turn_id: str
    role: str
    content: str
    persona_id: str
    source: str
    tokens: int
    created_at: float
    latency: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "turn_id": self.turn_id, "role": self.role,
                "content": self.content, "persona_id": self.persona_id, "source": self.source,
                "created_at": self.created_at, "latency": self.latency}


@dataclass(frozen=True)
class Session:
    id: str
    persona_id: str
    created_at: float
    updated_at: float
    summary: str = ""
    summarized_upto: int = 0
    origin: str | None = None
    messages: list[Message] = field(default_factory=list)


class StorageError(sqlite3.OperationalError):
    """The disk refused a write (full, read-only, failing): nothing was written. The daemon
    keeps running, shows the fault (storage component, LED) and goes on when writes work."""


# SQLite's messages for a disk that refuses writes, and what to tell the user
_DISK_FAULTS = {"database or disk is full": "the disk is full",
                "readonly database": "the data directory is read-only",
                "disk i/o error": "the disk failed a write (I/O error)",
                "unable to open database file": "the database file cannot be opened"}


_OPEN_FAULTS = {errno.EROFS: "the data directory is read-only",
                errno.ENOSPC: "the disk is full",
                errno.EACCES: "no permission to write the data directory",
                errno.EPERM: "no permission to write the data directory"}


def disk_fault(exc: BaseException) -> str | None:
    text = str(exc).lower()
    return next((fault for key, fault in _DISK_FAULTS.items() if key in text), None)


PROBE_FREE_BYTES = 1 << 20  # free space that counts as "room again" after a full disk

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_private(path: Path) -> None:
    """Create ``path`` (the database) readable by the daemon's user only, whatever the umask:
    the directory 0700, the file 0600. SQLite creates its -wal and -shm files with the
    database file's mode; files left by an older install are tightened here too."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    _tighten(directory, PRIVATE_DIR_MODE)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        _tighten(file, PRIVATE_FILE_MODE)


def _tighten(path: Path, mode: int) -> None:
    """chmod what this user owns (a directory someone else owns is theirs to set)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_uid == os.geteuid() and st.st_mode & 0o777 != mode:
        path.chmod(mode)


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            if str(path) != ":memory:":
                make_private(path)
            self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA user_version")  # opens the file now, not at first use
        except (OSError, sqlite3.OperationalError) as exc:
            fault = _OPEN_FAULTS.get(getattr(exc, "errno", None)) or disk_fault(exc)
            if fault is None:
                raise
            raise StorageError(f"storage: cannot open {path}: {fault}; make it writable (or "
                               "set data_dir) and start again") from exc
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self.problem: str | None = None  # why the disk refuses writes, None while it takes them
        # told of each change of ``problem``, in the thread that wrote (the App forwards it)
        self.on_problem: Callable[[str | None], None] | None = None
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            # forgetting is real: deleted rows are overwritten with zeros, not just unlinked
            self._conn.execute("PRAGMA secure_delete=ON")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._conn.executescript(SCHEMA)

    # --- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Around every write (holding the lock): a write the disk refuses is rolled back
        whole and raised as StorageError, and ``problem`` says why until `probe` finds the
        disk healthy. (A failed COMMIT leaves SQLite's transaction open: without the rollback
        every later write would fail, even once the disk has room again.)"""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            fault = disk_fault(exc)
            if fault is None:
                raise
            self._set_problem(f"{fault} ({self.path.parent})")
            raise StorageError(f"storage: {self.problem}; nothing was written") from exc

    def _set_problem(self, problem: str | None) -> None:
        changed, self.problem = problem != self.problem, problem
        if changed and self.on_problem is not None:
            self.on_problem(problem)

    def probe(self) -> bool:
        """True (and ``problem`` cleared) when the disk takes writes again: a small write
        works and there is room for more than that (a full disk can still take a write that
        fits in the database's free pages, and a device that flips between "full" and "fine"
        with every small write helps no one)."""
        try:
            self.set_value("storage_probe", time.time())
        except StorageError:
            return False
        if shutil.disk_usage(self.path.parent).free < PROBE_FREE_BYTES:
            return False
        self._set_problem(None)
        return True

    def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one IMMEDIATE transaction (all or nothing)."""
        with self._lock, self._writing():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._conn)
            except BaseException:
                if self._conn.in_transaction:  # SQLITE_FULL has already rolled it back
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def add_schema(self, sql: str) -> None:
        """Let another module (the control link's outbox) keep its tables in the same file."""
        with self._lock:
            self._conn.executescript(sql)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a store method in a worker thread (the event loop never waits on the disk)."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @property
    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    # --- key/value --------------------------------------------------------------------------

    def get_value(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM kv WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_value(self, key: str, value: Any) -> None:
        with self._lock, self._writing():
            self._conn.execute(
                "INSERT INTO kv(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    # --- sessions ---------------------------------------------------------------------------

    def create_session(self, persona_id: str, *, session_id: str | None = None) -> Session:
        now = time.time()
        sid = session_id or new_id("ses")
        with self._lock, self._writing():
            self._conn.execute(
                "INSERT INTO sessions(id, persona_id, created_at, updated_at) VALUES(?,?,?,?)",
                (sid, persona_id, now, now),
            )
        return Session(sid, persona_id, now, now)

    def get_session(self, session_id: str, *, with_messages: bool = True) -> Session | None:
        rows = self.query("SELECT * FROM sessions WHERE id = ?", (session_id,))
        if not rows:
            return None
        row = rows[0]
        messages = self.messages(session_id) if with_messages else []
        return Session(row["id"], row["persona_id"], row["created_at"], row["updated_at"],
                       row["summary"], row["summarized_upto"], row["origin"], messages)

    def set_session_persona(self, session_id: str, persona_id: str) -> None:
        with self._lock, self._writing():
            self._conn.execute("UPDATE sessions SET persona_id = ?, updated_at = ? WHERE id = ?",
                               (persona_id, time.time(), session_id))

    def messages(self, session_id: str, *, after_id: int = 0) -> list[Message]:
        rows = self.query(
            "SELECT * FROM messages WHERE session_id = ? AND id > ? ORDER BY id",
            (session_id, after_id),
        )
        return [_message(r) for r in rows]

    def record_turn(
        self, session_id: str, turn_id: str, user_text: str, reply: str, *, persona_id: str,
        source: str, user_tokens: int = 0, reply_tokens: int = 0,
        latency: dict[str, float] | None = None,
    ) -> bool:
        """The user's words and the reply, together or not at all. False (nothing written)
        when the session no longer exists."""
        now = time.time()
        latency_json = json.dumps(latency) if latency else None

        def work(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is None:
                return False  # forgotten (DELETE) while the turn ran: do not bring it back
            conn.executemany(
                "INSERT INTO messages(session_id, turn_id, role, content, persona_id, source, "
                "tokens, latency_json, created_at) VALUES(?,?,?,?,?,?,?,?,?)",
                [(session_id, turn_id, "user", user_text, persona_id, source, user_tokens, None,
                  now),
                 (session_id, turn_id, "assistant", reply, persona_id, source, reply_tokens,
                  latency_json, now)],
            )
            conn.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, session_id))
            return True

        return self.transaction(work)

    def keep_played(self, session_id: str, turn_id: str, user_text: str, played: str, *,
                    persona_id: str, source: str) -> bool:
        """After a barge-in: the turn's reply becomes only what was played, marked
        ``interrupted`` (written now, or replacing the whole reply recorded when the LLM
        finished first). Nothing played: the turn is not kept at all."""
        now = time.time()

        def work(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is None:
                return False
            row = conn.execute("SELECT id, latency_json FROM messages WHERE session_id = ? AND "
                               "turn_id = ? AND role = 'assistant'", (session_id, turn_id)).fetchone()
            if not played:
                conn.execute("DELETE FROM messages WHERE session_id = ? AND turn_id = ?",
                             (session_id, turn_id))
                return True
            meta = {**json.loads(row["latency_json"] or "{}"), "interrupted": 1} if row else \
                {"interrupted": 1}
            if row is not None:
                conn.execute("UPDATE messages SET content = ?, latency_json = ? WHERE id = ?",
                             (played, json.dumps(meta), row["id"]))
            else:
                conn.executemany(
                    "INSERT INTO messages(session_id, turn_id, role, content, persona_id, source, "
                    "tokens, latency_json, created_at) VALUES(?,?,?,?,?,?,?,?,?)",
                    [(session_id, turn_id, "user", user_text, persona_id, source, 0, None, now),
                     (session_id, turn_id, "assistant", played, persona_id, source, 0,
                      json.dumps(meta), now)])
            conn.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, session_id))
            return True

        return self.transaction(work)

    def set_summary(self, session_id: str, summary: str, summarized_upto: int) -> None:
        with self._lock, self._writing():
            self._conn.execute(
                "UPDATE sessions SET summary = ?, summarized_upto = ? WHERE id = ?",
                (summary, summarized_upto, session_id),
            )

    def delete_session(self, session_id: str) -> bool:
        """Forget a session for real: its messages and summary are deleted, not hidden."""

        def work(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            return conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount

        deleted = self.transaction(work)
        if deleted:
            self.checkpoint()
        return bool(deleted)

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate it, so old copies of deleted
        pages do not linger in the WAL (secure_delete has zeroed them in the database)."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def vacuum(self) -> None:
        """Rebuild the file (returns free pages to the file system)."""
        with self._lock:
            self._conn.execute("VACUUM")
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def expire_sessions(self, older_than_s: float, *, keep: set[str] = frozenset()) -> int:
        cutoff = time.time() - older_than_s
        ids = [r["id"] for r in self.query("SELECT id FROM sessions WHERE updated_at < ?",
                                           (cutoff,)) if r["id"] not in keep]
        return sum(self.delete_session(sid) for sid in ids)

    def count_turns_since(self, since: float) -> int:
        rows = self.query("SELECT COUNT(*) AS n FROM messages WHERE role = 'assistant' "
                          "AND created_at >= ?", (since,))
        return int(rows[0]["n"])

    # --- export / import for handoff ---------------------------------------------------------

    def export_session(self, session_id: str) -> dict[str, Any] | None:
        session = self.get_session(session_id)
        if session is None:
            return None
        return {
            "version": EXPORT_VERSION,
            "session_id": session.id,
            "persona_id": session.persona_id,
            "created_at": session.created_at,
            "summary": session.summary,
            "summarized_upto_index": sum(m.id <= session.summarized_upto for m in session.messages),
            "turns": [
                {"turn_id": m.turn_id, "role": m.role, "content": m.content,
                 "persona_id": m.persona_id, "source": m.source, "created_at": m.created_at}
                for m in session.messages
            ],
        }

    def import_session(self, doc: dict[str, Any], *, origin: str | None = None) -> Session:
        """Recreate an exported session so the conversation continues here.

        The session keeps its id unless a session with that id already holds history here that
        the export does not contain (the export is not a continuation of it): then the import
        gets a new id and the local history stays as it was. A replayed export, or a session
        that went away and comes back grown (kitchen → bedroom → kitchen), replaces the local
        copy, since everything the local copy holds is in it."""
        if not isinstance(doc, dict) or doc.get("version") != EXPORT_VERSION:
            version = doc.get("version") if isinstance(doc, dict) else None
            raise ValueError(f"unsupported session export version {version!r}")
        try:
            sid = str(doc["session_id"])
            persona_id = str(doc["persona_id"])
            turns = [{"turn_id": str(t["turn_id"]), "role": t["role"], "content": str(t["content"]),
                      "persona_id": t.get("persona_id") or persona_id,
                      "created_at": t.get("created_at")} for t in doc.get("turns") or []]
            folded = int(doc.get("summarized_upto_index") or 0)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed session export: {exc!r}") from exc
        if any(t["role"] not in ("user", "assistant") for t in turns):
            raise ValueError("malformed session export: a turn's role is not user or assistant")

        def work(conn: sqlite3.Connection) -> str:
            # never over a different local history: beside it, under a new id
            target = sid if _continues(conn, sid, turns) else new_id("ses")
            conn.execute("DELETE FROM messages WHERE session_id = ?", (target,))
            conn.execute("DELETE FROM sessions WHERE id = ?", (target,))
            now = time.time()
            conn.execute(
                "INSERT INTO sessions(id, persona_id, created_at, updated_at, summary, origin) "
                "VALUES(?,?,?,?,?,?)",
                (target, persona_id, float(doc.get("created_at") or now), now,
                 doc.get("summary") or "", origin),
            )
            last_folded = 0
            for index, t in enumerate(turns, start=1):
                cur = conn.execute(
                    "INSERT INTO messages(session_id, turn_id, role, content, persona_id, source,"
                    " created_at) VALUES(?,?,?,?,?,?,?)",
                    (target, t["turn_id"], t["role"], t["content"], t["persona_id"], "import",
                     float(t["created_at"] or now)),
                )
                if index <= folded:
                    last_folded = int(cur.lastrowid or 0)
            conn.execute("UPDATE sessions SET summarized_upto = ? WHERE id = ?",
                         (last_folded, target))
            return target

        session = self.get_session(self.transaction(work))
        assert session is not None
        return session


def _continues(conn: sqlite3.Connection, sid: str, turns: list[dict[str, Any]]) -> bool:
    """True when session ``sid`` does not exist here, or every message it holds here is, in
    order, at the start of ``turns`` (so replacing it loses nothing)."""
    local = conn.execute("SELECT turn_id, role, content FROM messages WHERE session_id = ? "
                         "ORDER BY id", (sid,)).fetchall()
    incoming = [(t["turn_id"], t["role"], t["content"]) for t in turns[:len(local)]]
    return len(local) <= len(turns) and [tuple(row) for row in local] == incoming


def _message(row: sqlite3.Row) -> Message:
    latency = json.loads(row["latency_json"]) if row["latency_json"] else None
    return Message(row["id"], row["session_id"], row["turn_id"], row["role"], row["content"],
                   row["persona_id"], row["source"], row["tokens"], row["created_at"], latency)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"
