"""Real daemons (`companion run`, real models, no sound card) against the dev control plane
(`companion-controlplane serve`), both as subprocesses on 127.0.0.1: every command reaches the
daemon, a session moves from one daemon to the other and continues there, and SIGKILLs of the
control plane and of a daemon lose nothing and run nothing twice."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import Fleet, http, outbox_rows, until

pytestmark = pytest.mark.models


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop_all()


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
