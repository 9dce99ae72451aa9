"""The SQLite memory: whole turns or nothing (also under kill -9), export/import, real deletion,
retention."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from companion.settings import PROJECT_ROOT
from companion.store import EXPORT_VERSION, StorageError, Store


def _turns(store: Store, session_id: str) -> dict[str, list[str]]:
    by_turn: dict[str, list[str]] = {}
    for m in store.messages(session_id):
        by_turn.setdefault(m.turn_id, []).append(m.role)
    return by_turn


def test_a_turn_is_written_whole_with_who_when_persona_and_latency(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    session = store.create_session("companion")
    assert store.record_turn(session.id, "t1", "hello", "hi there", persona_id="companion",
                             source="voice", latency={"llm_ms": 120.5, "stt_ms": 80.0})
    user, assistant = store.messages(session.id)
    assert (user.role, user.content, assistant.role, assistant.content) == (
        "user", "hello", "assistant", "hi there")
    assert user.persona_id == assistant.persona_id == "companion"
    assert assistant.latency == {"llm_ms": 120.5, "stt_ms": 80.0}
    assert abs(assistant.created_at - time.time()) < 5
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    assert store.query("PRAGMA synchronous")[0][0] == 2  # FULL


def test_a_failing_transaction_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    session = store.create_session("companion")

    def half_a_turn(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO messages(session_id, turn_id, role, content, persona_id, source, "
                     "created_at) VALUES(?, 't', 'user', 'x', 'companion', 'voice', 0)", (session.id,))
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        store.transaction(half_a_turn)
    assert store.messages(session.id) == []


def test_a_turn_for_a_forgotten_session_is_not_written(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    session = store.create_session("companion")
    store.delete_session(session.id)
    assert not store.record_turn(session.id, "t", "a", "b", persona_id="companion", source="http")
    assert store.query("SELECT COUNT(*) FROM messages")[0][0] == 0


def test_export_import_round_trip_on_a_second_store(tmp_path: Path) -> None:
    first = Store(tmp_path / "a.db")
    session = first.create_session("medication_nurse")
    for i in range(4):
        first.record_turn(session.id, f"t{i}", f"question {i}", f"answer {i}",
                          persona_id="medication_nurse", source="voice")
    messages = first.messages(session.id)
    first.set_summary(session.id, "The user is Anna; she takes pills at 8.", messages[3].id)
    doc = json.loads(json.dumps(first.export_session(session.id)))  # as it travels
    assert doc["version"] == EXPORT_VERSION and doc["summarized_upto_index"] == 4

    second = Store(tmp_path / "b.db")
    imported = second.import_session(doc, origin="device-a")
    assert imported.id == session.id and imported.origin == "device-a"
    assert imported.summary == "The user is Anna; she takes pills at 8."
    assert [(m.role, m.content) for m in imported.messages] == [(m.role, m.content) for m in messages]
    assert imported.summarized_upto == imported.messages[3].id
    assert second.messages(session.id, after_id=imported.summarized_upto)[0].content == "question 2"
    # importing again replaces, it does not duplicate
    second.import_session(doc)
    assert len(second.messages(session.id)) == 8
    # the conversation continues there
    assert second.record_turn(session.id, "t9", "and now?", "now this", persona_id="medication_nurse",
                              source="voice")
    assert second.export_session(session.id)["turns"][-1]["content"] == "now this"


@pytest.mark.parametrize("doc", [
    {"version": 99, "session_id": "s", "persona_id": "p"},
    {"version": EXPORT_VERSION, "persona_id": "p"},
    {"version": EXPORT_VERSION, "session_id": "s", "persona_id": "p", "turns": [{"role": "user"}]},
    {"version": EXPORT_VERSION, "session_id": "s", "persona_id": "p",
     "turns": [{"turn_id": "t", "role": "system", "content": "x"}]},
    ["not", "a", "dict"],
])
def test_import_rejects_malformed_documents(tmp_path: Path, doc) -> None:
    store = Store(tmp_path / "c.db")
    with pytest.raises(ValueError):
        store.import_session(doc)
    assert store.query("SELECT COUNT(*) FROM sessions")[0][0] == 0


def test_delete_removes_the_words_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = Store(path)
    keep = store.create_session("companion")
    store.record_turn(keep.id, "k", "keep this", "kept", persona_id="companion", source="voice")
    forget = store.create_session("companion")
    secret = "my-secret-pin-is-4711-" * 20
    for i in range(20):
        store.record_turn(forget.id, f"f{i}", f"{secret} {i}", f"noted {secret}", persona_id="companion",
                          source="voice")
    store.set_summary(forget.id, f"summary with {secret}", 0)
    store.checkpoint()  # the words are in the main file now
    assert secret.encode() in path.read_bytes()

    assert store.delete_session(forget.id)
    assert store.get_session(forget.id) is None
    assert store.query("SELECT COUNT(*) FROM messages WHERE session_id = ?", (forget.id,))[0][0] == 0
    on_disk = b"".join(Path(str(path) + s).read_bytes() for s in ("", "-wal")
                       if Path(str(path) + s).exists())
    assert b"my-secret-pin-is-4711" not in on_disk
    assert store.messages(keep.id)[0].content == "keep this"
    assert not store.delete_session(forget.id)


def test_retention_expires_old_sessions_but_keeps_the_active_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    old = store.create_session("companion")
    active = store.create_session("companion")
    fresh = store.create_session("companion")
    long_ago = time.time() - 40 * 86400
    store.query("UPDATE sessions SET updated_at = ? WHERE id IN (?, ?)", (long_ago, old.id, active.id))
    assert store.expire_sessions(30 * 86400, keep={active.id}) == 1
    assert store.get_session(old.id) is None
    assert store.get_session(active.id) is not None and store.get_session(fresh.id) is not None


def test_store_survives_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    session = store.create_session("companion")
    store.record_turn(session.id, "t", "remember the milk", "I will", persona_id="companion",
                      source="voice")
    store.set_value("active_session_id", session.id)
    store.close()
    again = Store(tmp_path / "c.db")
    assert again.get_value("active_session_id") == session.id
    assert [m.content for m in again.messages(session.id)] == ["remember the milk", "I will"]


# --- kill -9 -----------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from companion.store import Store
    mode, path = sys.argv[1], Path(sys.argv[2])
    store = Store(path)
    sid = store.get_value("sid") or store.create_session("companion").id
    store.set_value("sid", sid)
    if mode == "store":
        i = 0
        while True:  # whole turns, as fast as the disk allows, until killed
            store.record_turn(sid, f"t{{i}}", "u" * 3000 + str(i), "a" * 5000 + str(i),
                              persona_id="companion", source="voice")
            print(i, flush=True)
            i += 1
    else:  # a whole conversation turn with a slow (fake) LLM: killed while it streams
        from companion.conversation import ConversationManager
        from companion.events import EventBus
        from companion.personas import PersonaLibrary
        from companion.settings import LlmSettings
        from tests.fakes import FakeChatModel
        lib = PersonaLibrary(Path({root!r}) / "personas"); lib.load()
        async def aenumerate(items):
            i = 0
            async for item in items:
                yield i, item
                i += 1
        async def main():
            cm = ConversationManager(llm=FakeChatModel("word " * 200, delay_s=0.01, chunk=5),
                                     store=store, personas=lib, settings=LlmSettings(),
                                     bus=EventBus(), default_persona="companion")
            cm.active_session_id = sid
            n = 0
            while True:
                print("turn-start", n, flush=True)
                async for i, _ in aenumerate(cm.respond(f"question {{n}}")):
                    if i == 5:
                        print("streaming", n, flush=True)
                print("turn-done", n, flush=True)
                n += 1
        asyncio.run(main())
""")


def _spawn(tmp_path: Path, mode: str, db: Path) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(PROJECT_ROOT)))
    return subprocess.Popen([sys.executable, str(script), mode, str(db)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=PROJECT_ROOT)


def _check_consistent(db: Path) -> tuple[int, dict[str, list[str]]]:
    store = Store(db)
    assert store.query("PRAGMA integrity_check")[0][0] == "ok"
    sid = store.get_value("sid")
    turns = _turns(store, sid)
    assert all(roles == ["user", "assistant"] for roles in turns.values()), turns
    store.close()
    return len(turns), turns


@pytest.mark.parametrize("after_turns", [3, 17, 40])
def test_kill_9_while_writing_turns_leaves_whole_turns(tmp_path: Path, after_turns: int) -> None:
    db = tmp_path / "c.db"
    proc = _spawn(tmp_path, "store", db)
    assert proc.stdout is not None
    committed = -1
    try:
        for line in proc.stdout:
            committed = int(line)
            if committed >= after_turns:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    count, _ = _check_consistent(db)
    assert count >= committed + 1  # every turn reported as written is there


def test_kill_9_during_a_conversation_turn(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    for round_ in range(2):  # kill, restart, kill again: history accumulates, never half a turn
        proc = _spawn(tmp_path, "conversation", db)
        assert proc.stdout is not None
        done = []
        try:
            for line in proc.stdout:
                kind, n = line.split()
                if kind == "turn-done":
                    done.append(int(n))
                if kind == "streaming" and len(done) == 2:
                    break  # in the middle of streaming the third reply
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        count, turns = _check_consistent(db)
        assert count == 2 * (round_ + 1), turns


def _two_turn_export(store: Store, session_id: str, words: str) -> dict:
    session = store.create_session("companion", session_id=session_id)
    store.record_turn(session.id, "t1", f"{words}?", f"{words}!", persona_id="companion",
                      source="voice")
    return json.loads(json.dumps(store.export_session(session.id)))


def test_a_handoff_never_overwrites_a_different_local_history(tmp_path: Path) -> None:
    here = Store(tmp_path / "here.db")
    local = _two_turn_export(here, "ses_same", "my own words")
    other = _two_turn_export(Store(tmp_path / "there.db"), "ses_same", "someone else")
    imported = here.import_session(other, origin="hall")
    assert imported.id != "ses_same"  # beside it, under a new id
    assert [m.content for m in imported.messages] == ["someone else?", "someone else!"]
    kept = here.export_session("ses_same")
    assert kept["turns"] == local["turns"]  # the local history is untouched


def test_a_handoff_that_continues_the_local_history_replaces_it(tmp_path: Path) -> None:
    here, there = Store(tmp_path / "here.db"), Store(tmp_path / "there.db")
    doc = _two_turn_export(here, "ses_trip", "kitchen")
    there.import_session(doc, origin="kitchen")  # kitchen → bedroom
    there.record_turn("ses_trip", "t2", "bedroom?", "bedroom!", persona_id="companion",
                      source="voice")
    back = json.loads(json.dumps(there.export_session("ses_trip")))
    imported = here.import_session(back, origin="bedroom")  # … → kitchen, grown
    assert imported.id == "ses_trip" and len(imported.messages) == 4
    assert here.import_session(back).id == "ses_trip"  # a replay changes nothing
    assert len(here.messages("ses_trip")) == 4
    stale = json.loads(json.dumps(doc))  # an older copy than what is here now
    assert here.import_session(stale).id != "ses_trip"
    assert len(here.messages("ses_trip")) == 4


def test_a_full_database_refuses_whole_turns_and_recovers(tmp_path: Path) -> None:
    """SQLITE_FULL (here from max_page_count; tests/reliability/test_disk.py fills a real
    disk): the write is refused whole as StorageError, ``problem`` says why, nothing is left
    half-open, and writes work again once ``probe`` finds room."""
    changes: list[str | None] = []
    store = Store(tmp_path / "c.db")
    store.on_problem = changes.append
    sid = store.create_session("companion").id
    store.record_turn(sid, "t0", "kept", "yes", persona_id="companion", source="http")
    pages = store.query("PRAGMA page_count")[0][0]
    store.query(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StorageError, match="disk is full"):
        store.record_turn(sid, "t1", "x" * 50_000, "y", persona_id="companion", source="http")
    assert store.problem and "full" in store.problem and changes == [store.problem]
    assert not store._conn.in_transaction
    assert [m.turn_id for m in store.messages(sid)] == ["t0", "t0"]
    store.query(f"PRAGMA max_page_count = {pages * 100}")
    assert store.probe() and store.problem is None and changes[-1] is None
    store.record_turn(sid, "t2", "x" * 50_000, "y", persona_id="companion", source="http")
    assert [m.turn_id for m in store.messages(sid)] == ["t0", "t0", "t2", "t2"]
    store.close()
