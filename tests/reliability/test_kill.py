"""SIGKILL of a real daemon process in the middle of a voice turn, a persona switch, a handoff
out, a handoff in and a summary, linked to the real dev control plane (a subprocess). After the
restart the store is consistent (`PRAGMA integrity_check`), the conversation holds every
completed turn and no half of one, and every frame the daemon had to send reaches the control
plane exactly once.

The daemon is tests/reliability/daemon.py: `companion run`'s own code with fake models that stop
at the phase under test (logged as "test hold") until the kill, so the kill lands in the middle
every time, never by timing. The faults here are about the process and its store, not the
models (tests/test_control_daemon.py kills a daemon on the real models)."""

from __future__ import annotations

import json

from tests.processes import Fleet, http, until
from tests.reliability.conftest import integrity, kv, outbox_rows, read_only, turns
from tests.reliability.daemon import DAEMON, HOLD

FAST_CHAT = {"message": "I take aspirin at noon."}


def start(fleet: Fleet, *names: str, **env: str) -> None:
    """Start these daemons (all at once: start-up is most of a test's time) and wait until
    each is ready (and linked, when the plane runs). ``env`` applies to the first only."""
    for i, name in enumerate(names):
        fleet.start_daemon(name, args=DAEMON, env=env if i == 0 else {})
    for name in names:
        fleet.wait_ready(name, 60, linked="plane" in fleet.procs)


def chat(fleet: Fleet, name: str, message: str, **extra) -> dict:
    status, body = http("POST", f"{fleet.api(name)}/v1/chat", {"message": message, **extra},
                        timeout=30, token=None)
    assert status == 200, body
    return body


def command(fleet: Fleet, name: str, command: str, **args) -> dict:
    status, body = http("POST", f"{fleet.api(name)}/v1/commands",
                        {"command": command, "args": args}, timeout=30, token=None)
    assert status == 200 and body["status"] == "completed", body
    return body["result"]


def pending(fleet: Fleet, name: str) -> list[dict]:
    return [json.loads(row) for row in outbox_rows(fleet.db(name))]


def plane_down(fleet: Fleet, name: str) -> None:
    """SIGKILL the control plane; wait until the daemon knows (its frames now stay in the
    outbox)."""
    downs = len(fleet.log(name, "control link down"))
    fleet.kill("plane")
    fleet.wait_log(name, "control link down", count=downs + 1, limit_s=20)


def delivered_once(fleet: Fleet, name: str, frames: list[dict]) -> None:
    """Each frame reaches the plane, once: by frame id (the plane keeps one copy per id) and
    by what it says (a frame made again under a new id would be a duplicate too)."""
    def arrived() -> bool:
        ids = {m["id"] for m in fleet.messages(name, "") if "id" in m}
        return all(f["id"] in ids for f in frames)

    until(arrived, 60, f"{[f['type'] for f in frames]} delivered")
    for frame in frames:
        same = [m for m in fleet.messages(name, frame["type"]) if m["payload"] == frame["payload"]]
        assert len(same) == 1, same
    until(lambda: not pending(fleet, name), 30, "the outbox drained")


def consistent(fleet: Fleet, name: str) -> None:
    assert integrity(fleet.db(name)) == "ok"


def roles(rows: list[tuple[str, str, str]]) -> list[str]:
    return [role for _, role, _ in rows]


def test_kill_in_the_middle_of_a_voice_turn(fleet: Fleet):
    fleet.start_plane()
    start(fleet, "kitchen", RELIABILITY_HOLD_LLM="voice")
    done = chat(fleet, "kitchen", FAST_CHAT["message"])  # a completed turn, acknowledged
    session = done["conversation_id"]
    assert kv(fleet.db("kitchen"), "active_session_id") == session
    plane_down(fleet, "kitchen")

    turn_id = command(fleet, "kitchen", "listen")["turn_id"]
    fleet.wait_log("kitchen", HOLD, what="llm voice")  # the reply is half-way through
    transcript = until(lambda: [f for f in pending(fleet, "kitchen") if f["type"] == "transcript"
                                and f["payload"]["turn_id"] == turn_id], 10, "transcript queued")
    fleet.kill("kitchen")

    consistent(fleet, "kitchen")
    kept = turns(fleet.db("kitchen"), session)
    assert roles(kept) == ["user", "assistant"] and kept[0][2] == FAST_CHAT["message"]
    assert turn_id not in {t for t, _, _ in kept}  # the cut turn: not there, not half there
    waiting = pending(fleet, "kitchen")
    assert transcript[0] in waiting

    fleet.restart("plane")
    fleet.restart("kitchen")
    fleet.wait_ready("kitchen", 60, linked=True)
    delivered_once(fleet, "kitchen", waiting)
    consistent(fleet, "kitchen")
    assert turns(fleet.db("kitchen"), session) == kept
    again = chat(fleet, "kitchen", "What do I take at noon?")  # the conversation carries on
    assert again["conversation_id"] == session
    assert roles(turns(fleet.db("kitchen"), session)) == ["user", "assistant"] * 2


def persona(fleet: Fleet, name: str) -> str:
    return kv(fleet.db(name), "active_persona_id")


def test_kill_in_the_middle_of_a_persona_switch(fleet: Fleet):
    """Killed while the transition message is spoken: the switch (acknowledged before it) stays,
    the ack reaches the plane once, and the command does not run again."""
    fleet.start_plane()
    start(fleet, "kitchen", RELIABILITY_HOLD_TTS="Nurse here")
    session = chat(fleet, "kitchen", FAST_CHAT["message"])["conversation_id"]
    cid = fleet.send("kitchen", "persona_switch", {"persona_id": "medication_nurse",
                                                   "transition_message": "Nurse here."})
    fleet.wait_log("kitchen", HOLD, what="tts")
    fleet.kill("kitchen")

    consistent(fleet, "kitchen")
    assert persona(fleet, "kitchen") == "medication_nurse"
    kept = turns(fleet.db("kitchen"), session)
    assert roles(kept) == ["user", "assistant"]
    fleet.restart("kitchen")
    fleet.wait_ready("kitchen", 60, linked=True)
    until(lambda: fleet.original_acks("kitchen", cid), 30, "the switch acked")
    ack = fleet.original_acks("kitchen", cid)
    assert len(ack) == 1 and ack[0]["ok"] and ack[0]["new_persona_id"] == "medication_nurse"
    until(lambda: not pending(fleet, "kitchen"), 30, "the outbox drained")
    assert len(fleet.log("kitchen", "persona switched")) == 1  # ran once, before the kill
    status, state = fleet.get("kitchen", "/v1/state")
    assert status == 200 and state["active_persona_id"] == "medication_nurse"
    assert state["active_session_id"] == session and turns(fleet.db("kitchen"), session) == kept


def test_kill_in_the_middle_of_a_handoff_out(fleet: Fleet):
    """Killed while saying goodbye, before the export was sent: the session stays here whole
    and active, the plane hears once that the handoff was interrupted, nothing is exported."""
    fleet.start_plane()
    start(fleet, "kitchen", "bedroom", RELIABILITY_HOLD_TTS="passing our conversation")
    session = chat(fleet, "kitchen", FAST_CHAT["message"])["conversation_id"]
    status, body = http("POST", f"{fleet.plane}/handoff", {
        "from_device_id": "kitchen", "to_device_id": "bedroom", "notify_user": True}, timeout=10)
    assert status == 202, body
    fleet.wait_log("kitchen", HOLD, what="tts")
    fleet.kill("kitchen")

    consistent(fleet, "kitchen")
    kept = turns(fleet.db("kitchen"), session)
    assert roles(kept) == ["user", "assistant"]
    fleet.restart("kitchen")
    fleet.wait_ready("kitchen", 60, linked=True)
    cid = body["command_id"]
    until(lambda: fleet.original_acks("kitchen", cid), 30, "the handoff acked")
    ack = fleet.original_acks("kitchen", cid)
    assert len(ack) == 1 and not ack[0]["ok"] and "interrupted" in ack[0]["error"], ack
    until(lambda: not pending(fleet, "kitchen"), 30, "the outbox drained")
    assert not fleet.messages("kitchen", "session_export")
    assert kv(fleet.db("kitchen"), "active_session_id") == session
    assert turns(fleet.db("kitchen"), session) == kept
    assert fleet.get("bedroom", f"/v1/sessions/{session}")[0] == 404


def test_kill_in_the_middle_of_a_handoff_in(fleet: Fleet):
    """The receiving daemon killed while it greets: the imported session is there whole and
    active, every ack and the export reach the plane once, nothing is imported twice."""
    fleet.start_plane()
    start(fleet, "bedroom", "kitchen", RELIABILITY_HOLD_TTS="Hello again")
    session = chat(fleet, "kitchen", FAST_CHAT["message"])["conversation_id"]
    chat(fleet, "kitchen", "And vitamin D in the morning.")
    handed = turns(fleet.db("kitchen"), session)
    status, body = http("POST", f"{fleet.plane}/handoff", {
        "from_device_id": "kitchen", "to_device_id": "bedroom", "notify_user": True}, timeout=10)
    assert status == 202, body
    fleet.wait_log("bedroom", HOLD, what="tts")
    fleet.kill("bedroom")

    consistent(fleet, "bedroom")
    assert [(r, c) for _, r, c in turns(fleet.db("bedroom"), session)] == \
        [(r, c) for _, r, c in handed]
    fleet.restart("bedroom")
    fleet.wait_ready("bedroom", 60, linked=True)
    handoff_in = until(lambda: [c for c in http("GET", f"{fleet.plane}/devices/bedroom/commands",
                                                timeout=10)[1]["commands"]
                                if c["type"] == "session_handoff_in" and c["ack"]], 30,
                       "the handoff in acked")
    ack = fleet.original_acks("bedroom", handoff_in[0]["id"])
    assert len(ack) == 1 and ack[0]["ok"] and ack[0]["session_id"] == session, ack
    until(lambda: not pending(fleet, "bedroom") and not pending(fleet, "kitchen"), 30,
          "both outboxes drained")
    assert len(fleet.messages("kitchen", "session_export")) == 1
    assert kv(fleet.db("bedroom"), "active_session_id") == session
    assert [(r, c) for _, r, c in turns(fleet.db("bedroom"), session)] == \
        [(r, c) for _, r, c in handed]
    again = chat(fleet, "bedroom", "What do I take in the morning?")
    assert again["conversation_id"] == session


def summary_row(fleet: Fleet, name: str, session: str) -> tuple[str, int]:
    with read_only(fleet.db(name)) as conn:
        return tuple(conn.execute("SELECT summary, summarized_upto FROM sessions WHERE id = ?",
                                  (session,)).fetchone())


def test_kill_in_the_middle_of_a_summary(fleet: Fleet):
    """Killed while the LLM writes a summary of the older turns: no half summary, every turn
    still there; after the restart the next turn gets the summary written."""
    small = {"COMPANION_LLM__HISTORY_TOKEN_BUDGET": "64"}
    start(fleet, "kitchen", RELIABILITY_HOLD_LLM="summary", **small)
    session = None
    for i in range(12):
        body = chat(fleet, "kitchen", f"Note number {i}: the spare key is under pot {i}.")
        session = session or body["conversation_id"]
        if fleet.log("kitchen", HOLD):
            break
    fleet.wait_log("kitchen", HOLD, what="llm summary")
    kept = turns(fleet.db("kitchen"), session)
    fleet.kill("kitchen")

    consistent(fleet, "kitchen")
    assert turns(fleet.db("kitchen"), session) == kept and len(kept) >= 4
    assert roles(kept) == ["user", "assistant"] * (len(kept) // 2)
    assert summary_row(fleet, "kitchen", session) == ("", 0)

    fleet.start_daemon("kitchen", args=DAEMON, env=small)  # this time the summary finishes
    fleet.wait_ready("kitchen", 60)
    chat(fleet, "kitchen", "One more note.")
    fleet.wait_log("kitchen", "session summarized", session_id=session)
    consistent(fleet, "kitchen")
    summary, upto = summary_row(fleet, "kitchen", session)
    assert summary and upto > 0
    assert turns(fleet.db("kitchen"), session)[: len(kept)] == kept  # summarized, not deleted
