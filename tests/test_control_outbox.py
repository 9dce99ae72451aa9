"""The durable outbox and the link's behaviour across outages: nothing the device must say is
lost, nothing the server asked runs twice."""

from __future__ import annotations

import asyncio

from companion.control.outbox import Outbox
from companion.control.protocol import device_frame
from companion.events import EventType
from companion.store import Store
from tests.conftest import until
from tests.control_helpers import control_plane, linked_device, url


def test_outbox_is_ordered_bounded_and_drops_non_essential_first(tmp_path):
    store = Store(tmp_path / "c.db")
    box = Outbox(store, max_items=10)
    box.setup()
    acks = [device_frame("ack", {"command_id": f"c{i}"}) for i in range(4)]
    presses = [device_frame("button_press", {"n": i}) for i in range(8)]
    for frame in [presses[0], acks[0], presses[1], acks[1], *presses[2:], *acks[2:]]:
        box.put(frame)
    kept = [p.frame_id for p in box.pending()]
    assert len(kept) == 10 and box.dropped == 2
    assert presses[0]["id"] not in kept and presses[1]["id"] not in kept  # oldest presses went
    assert all(a["id"] in kept for a in acks)
    seqs = [p.seq for p in box.pending()]
    assert seqs == sorted(seqs)
    store.close()
    # survives a restart, counter included
    store = Store(tmp_path / "c.db")
    again = Outbox(store, max_items=10)
    again.setup()
    assert [p.frame_id for p in again.pending()] == kept
    assert again.depth == 10 and again.dropped == 2
    again.remove(kept[:3])
    assert again.depth == 7
    store.close()


def test_commands_run_once_and_a_crash_mid_command_is_acked_as_interrupted(tmp_path):
    store = Store(tmp_path / "c.db")
    box = Outbox(store, max_items=100)
    box.setup()
    assert box.begin("c1", "ping") == ("new", None)
    assert box.begin("c1", "ping") == ("running", None)
    ack = device_frame("ack", {"command_id": "c1", "ok": True, "pong": True})
    box.finish("c1", ack, extra_acks=1)
    assert box.begin("c1", "ping") == ("done", ack["payload"])
    assert [p.type for p in box.pending()] == ["ack", "ack"]
    assert box.last_acked_command_id() == "c1"
    assert box.begin("c2", "persona_switch")[0] == "new"
    store.close()  # crash while c2 runs
    store = Store(tmp_path / "c.db")
    box = Outbox(store, max_items=100)
    assert box.setup() == ["c2"]
    state, result = box.begin("c2", "persona_switch")
    assert state == "done" and not result["ok"] and "interrupted" in result["error"]
    assert box.last_acked_command_id() == "c2"
    store.close()


async def test_frames_made_while_offline_are_delivered_in_order_on_connect(tmp_path):
    async with control_plane() as plane:
        port = plane.port
    async with linked_device(tmp_path, f"ws://127.0.0.1:{port}") as (app, link):
        for i in range(20):
            app.bus.emit(EventType.BUTTON, button="talk", kind=f"k{i}")
        await until(lambda: link.status.outbox_depth >= 20, 3, what="20 frames in the outbox")
        assert not link.status.connected
        async with control_plane(port=port) as plane:
            presses = await plane.wait_for(
                lambda: len(m := plane.messages("dev-a", "button_press")) == 20 and m)
            assert [p["payload"]["kind"] for p in presses] == [f"k{i}" for i in range(20)]
            await until(lambda: not link.status.outbox_depth, 3, what="the outbox emptied")


async def test_control_plane_restarts_mid_stream_nothing_lost_nothing_twice(tmp_path):
    state = tmp_path / "plane.db"
    async with control_plane(state_path=state) as plane:
        port = plane.port
        async with linked_device(tmp_path, url(plane)) as (app, link):
            await plane.wait_connected("dev-a")
            sent: list[str] = []
            for round_ in range(3):
                for i in range(15):
                    kind = ("ping", {}) if i % 3 else ("audio_response", {"text": f"n{round_}-{i}."})
                    sent.append(await plane.send("dev-a", *kind))
                    await asyncio.sleep(0.002)  # pacing, so some commands run before the kill
                # kill it mid-stream, bring it back on the same port with the same state
                await plane.stop()
                plane.close()
                await until(lambda: not link.status.connected, what="the device saw the link drop")
                plane = type(plane)(token=plane.token, state_path=state)
                await plane.start("127.0.0.1", port)
            try:
                async with asyncio.timeout(10):
                    await plane.wait_for(lambda: all(plane.command(c)["ack"] for c in sent),
                                         within_s=10)
                # every ack the device will send has reached the plane once its outbox is empty
                await until(lambda: not link.status.outbox_depth, 5, what="the outbox emptied")
                originals = [a for a in plane.acks("dev-a") if not a.get("duplicate")]
                per_command = {c: [a for a in originals if a["command_id"] == c] for c in sent}
                assert all(len(v) == 1 for v in per_command.values()), "an ack lost or doubled"
                assert all(v[0]["ok"] for v in per_command.values())
                assert sorted(link.executed) == sorted(sent)  # each ran exactly once
                spoken = [t for t, _ in app.tts.spoken]
                assert len(spoken) == len(set(spoken)) == 15
                assert link.status.connections >= 3
            finally:
                await plane.stop()
                plane.close()
