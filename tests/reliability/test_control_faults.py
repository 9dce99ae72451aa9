"""The control plane refusing a frame as too big (close 1009) must not start a loop: close,
reconnect, resend the same frame, close again, for ever. Both ends set the frame aside instead,
with a log line (and on the device an event and a metric), and everything else still flows."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from companion.control.protocol import REPLY, device_frame
from companion.events import EventType
from tests.conftest import until
from tests.control_helpers import control_plane, linked_device, url


async def test_a_device_frame_the_server_refuses_is_dead_lettered_not_resent(tmp_path: Path):
    async with control_plane(max_msg_bytes=64 * 1024) as plane, \
            linked_device(tmp_path, url(plane)) as (app, link):
        await plane.wait_connected("dev-a")
        refused = []
        app.bus.add_callback(lambda e: refused.append(e.data)
                             if e.type is EventType.CONTROL_FRAME_REFUSED else None)
        with capture_logs() as logs:
            big = device_frame(REPLY, {"text": "x" * 200_000})
            await link.enqueue(device_frame(REPLY, {"text": "before"}))
            await link.enqueue(big)
            await link.enqueue(device_frame(REPLY, {"text": "after"}))
            await until(lambda: link.status.dead_letters == 1 and link.status.outbox_depth == 0, 10)
            texts = await plane.wait_for(lambda: (t := [m["payload"]["text"] for m in
                                                        plane.messages("dev-a", REPLY)])
                                         and "after" in t and t)
        assert texts == ["before", "after"]
        assert refused == [{"frame_id": big["id"], "frame_type": REPLY,
                            "bytes": refused[0]["bytes"], "reason": "too_big"}]
        assert refused[0]["bytes"] > 200_000
        assert [d["frame_id"] for d in await app.store.run(link.outbox.dead_letters)] == [big["id"]]
        assert app.metrics.total("companion_control_frames_refused_total") == 1
        assert any("refused a frame" in e["event"] for e in logs)
        # one drop, one reconnect: no loop
        await asyncio.sleep(0)
        assert link.status.connections == 2
        ack = await plane.wait_ack(await plane.send("dev-a", "ping", {}))
        assert ack["ok"] and link.status.connections == 2


async def test_a_command_the_device_refuses_is_not_resent_by_the_dev_control_plane(tmp_path):
    async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (_app, link):
        await plane.wait_connected("dev-a")
        with capture_logs() as logs:
            # beyond the device socket's cap (4× max_frame_bytes, at least 4 MiB): it closes 1009
            huge = await plane.send("dev-a", "audio_response", {"text": "y" * (5 << 20)})
            await plane.wait_for(lambda: plane.command(huge)["refused_at"], 10)
            await plane.wait_connected("dev-a", within_s=10)
            ack = await plane.wait_ack(await plane.send("dev-a", "ping", {}))
        assert ack["ok"]
        assert plane.command(huge)["sent_count"] == 1  # not resent on the hello that followed
        assert plane.device_info("dev-a")["pending_commands"] == 0
        assert link.status.connections == 2
        assert any("refused a command as too big" in e["event"] for e in logs)
