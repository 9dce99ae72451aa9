"""Frames from a hostile or broken control plane, against the real client over a real WebSocket
(the dev control plane on 127.0.0.1): not JSON, wrong types, huge, deeply nested, unknown types,
replayed and out-of-order ids, a flood of 1,000 frames a second. Each refused frame is answered
by one ``error`` frame; nothing changes; the link stays up and the next command still runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from companion.control.protocol import SERVER_PAYLOADS, ProtocolError, parse_server_frame
from tests.conftest import until
from tests.control_helpers import control_plane, linked_device, url

MAX_FRAME = 64 * 1024  # control_plane.max_frame_bytes for these tests (the socket's cap is 4×)
CRASHES = ("command crashed", "control link session failed", "after-ack action failed")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)


def _field_names(type_: str) -> list[str]:
    model = SERVER_PAYLOADS.get(type_)
    return sorted(model.model_fields) if model is not None else ["x"]


@st.composite
def payload_of_a_known_type(draw) -> str:
    """A known frame type whose payload has the model's field names with arbitrary values."""
    type_ = draw(st.sampled_from(sorted(SERVER_PAYLOADS)))
    fields = draw(st.lists(st.sampled_from(_field_names(type_)), max_size=4, unique=True))
    payload = {name: draw(json_values) for name in fields}
    return json.dumps({"id": draw(st.text(min_size=1, max_size=20)), "type": type_,
                       "payload": payload, "priority": draw(st.integers(-3, 12))})


envelopes = st.fixed_dictionaries({}, optional={
    "id": json_values, "type": json_values | st.text(max_size=70), "payload": json_values,
    "priority": json_values}).map(json.dumps)
not_json = st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
hostile = (not_json | json_values.map(json.dumps) | envelopes | payload_of_a_known_type()
           | st.integers(1, 5000).map(lambda depth: '{"id":"n","type":"ping","payload":'
                                      + "[" * depth + "]" * depth + "}"))


def refused(raw: str) -> str | None:
    """The error code the device must answer ``raw`` with, or None when the frame is valid."""
    try:
        parse_server_frame(raw, max_bytes=MAX_FRAME)
    except ProtocolError as exc:
        return exc.code
    return None


def snapshot(app) -> dict[str, Any]:
    """Everything a refused frame must leave as it was."""
    return {"persona": app.conversation.active_persona_id,
            "session": app.conversation.active_session_id, "volume": app.status.volume,
            "muted": app.status.muted, "settings": app.settings,
            "sessions": app.store.query("SELECT COUNT(*) FROM sessions")[0][0],
            "commands": app.store.query("SELECT COUNT(*) FROM control_commands")[0][0]}


@contextlib.asynccontextmanager
async def device():
    with tempfile.TemporaryDirectory() as tmp:
        async with control_plane() as plane, linked_device(
                Path(tmp), url(plane), cp={"max_frame_bytes": MAX_FRAME}) as (app, link):
            await plane.wait_connected("dev-a")
            yield plane, app, link


async def still_works(plane, link, connections: int = 1) -> None:
    ack = await plane.wait_ack(await plane.send("dev-a", "ping", {"server_time": 1.0}))
    assert ack["ok"] and ack["pong"]
    assert link.status.connections == connections  # the link never dropped


def crashes(logs: list[dict]) -> list[dict]:
    return [e for e in logs if any(c in e["event"] for c in CRASHES)]


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(hostile, min_size=1, max_size=30))
async def test_refused_frames_each_get_one_error_and_change_nothing(frames):
    frames = [f for f in frames if refused(f) is not None]  # valid ones are not this test's
    with capture_logs() as logs:
        async with device() as (plane, app, link):
            before = snapshot(app)
            for raw in frames:
                await plane.send_raw("dev-a", raw)
            try:
                errors = await plane.wait_for(
                    lambda: len(plane.messages("dev-a", "error")) >= len(frames) and
                    plane.messages("dev-a", "error"), within_s=30)
            except TimeoutError:
                got = [e["payload"]["code"] for e in plane.messages("dev-a", "error")]
                raise AssertionError(f"sent {frames!r}, answered {got}") from None
            assert [e["payload"]["code"] for e in errors] == [refused(f) for f in frames]
            assert all(e["payload"]["message"] for e in errors)
            assert snapshot(app) == before
            await still_works(plane, link)
    assert crashes(logs) == []


def _error_codes(plane) -> list[str]:
    return [m["payload"]["code"] for m in plane.messages("dev-a", "error")]


async def test_binary_frames_and_huge_frames():
    async with device() as (plane, app, link):
        before = snapshot(app)
        ws = plane.devices["dev-a"].ws
        await ws.send_bytes(b"\xff\xfe\x00garbage")
        await ws.send_bytes(json.dumps({"id": "b1", "type": "ping", "payload": {}}).encode())
        await plane.send_raw("dev-a", json.dumps({"id": "h1", "type": "ping",
                                                  "payload": {"x": "y" * (2 * MAX_FRAME)}}))
        await plane.wait_for(lambda: len(_error_codes(plane)) >= 2)
        assert _error_codes(plane) == ["malformed_json", "frame_too_large"]
        ack = await plane.wait_for(lambda: [a for a in plane.acks("dev-a")
                                            if a["command_id"] == "b1"])
        assert ack[0]["ok"]  # bytes holding a good frame are a frame
        await still_works(plane, link)
        # beyond the socket's own cap (4× the frame limit, at least 4 MiB) it closes (1009); the link
        # comes back by itself and nothing was lost or changed
        await plane.send_raw("dev-a", "x" * (5 << 20))
        await until(lambda: link.status.connections == 2, 10)
        await plane.wait_connected("dev-a")
        await still_works(plane, link, connections=2)
        assert snapshot(app) == {**before, "commands": 3}  # b1 and two pings, nothing else


async def test_replayed_and_out_of_order_ids_run_once():
    async with device() as (plane, app, link):
        for cid in ("c5", "c3", "c5", "c1", "c3", "c9"):
            await plane.send_raw("dev-a", json.dumps({"id": cid, "type": "ping", "payload": {}}))
        await plane.wait_for(lambda: len(plane.acks("dev-a")) >= 6)
        assert link.executed == ["c5", "c3", "c1", "c9"]
        assert sum(1 for a in plane.acks("dev-a") if a.get("duplicate")) == 2
        # a replayed old setting does not undo a newer one
        volume = {"id": "v1", "type": "config_update",
                  "payload": {"settings": {"audio.output_volume": 0.3}}}
        await plane.send_raw("dev-a", json.dumps(volume))
        await until(lambda: app.status.volume == 0.3)
        await plane.send_raw("dev-a", json.dumps({**volume, "id": "v2", "payload": {
            "settings": {"audio.output_volume": 0.5}}}))
        await until(lambda: app.status.volume == 0.5)
        await plane.send_raw("dev-a", json.dumps(volume))  # v1 again, late
        await plane.wait_for(lambda: sum(1 for a in plane.acks("dev-a")
                                         if a.get("duplicate")) == 3)
        assert app.status.volume == 0.5 and link.executed.count("v1") == 1


async def test_a_flood_of_1000_frames_a_second_is_answered_and_the_link_survives():
    with capture_logs() as logs:
        async with device() as (plane, app, link):
            before = snapshot(app)
            loop = asyncio.get_running_loop()
            started = loop.time()
            for n in range(1000):
                frame = ("{not json" if n % 10 else  # 900 refused, 100 commands among them
                         json.dumps({"id": f"f{n}", "type": "ping", "payload": {}}))
                await plane.send_raw("dev-a", frame)
                if n % 100 == 99:  # 1,000 a second: 100 frames, then wait for the next 0.1 s
                    await asyncio.sleep(max(0.0, started + (n + 1) / 1000 - loop.time()))
            await plane.wait_for(lambda: len(plane.acks("dev-a")) >= 100
                                 and len(plane.messages("dev-a", "error")) >= 900, within_s=60)
            assert len(set(link.executed)) == 100
            await still_works(plane, link)
            assert {k: v for k, v in snapshot(app).items() if k != "commands"} == \
                {k: v for k, v in before.items() if k != "commands"}
    assert crashes(logs) == []
