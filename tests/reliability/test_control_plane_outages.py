"""A real daemon (`companion run`, real models) behind a misbehaving control plane: garbage on
the socket, close frames with error codes, a frame stalled for 5 s in the middle, 401 and then
acceptance again, the control plane stopped and a new one started on the same state. The link
sits behind a TCP proxy on 127.0.0.1 that injects each fault into the real byte stream. Through
all of it the daemon answers HTTP chats, and nothing is lost: every chat's reply reaches the
control plane, every command is acked once, and the outbox ends empty."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from companion_dev.controlplane import ControlPlane
from tests.conftest import until
from tests.processes import TOKEN, Fleet, free_port

pytestmark = pytest.mark.models


class FaultProxy:
    """Forwards 127.0.0.1:port ↔ the control plane, and on command breaks the link."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.refuse_401 = False
        self.stall_s = 0.0  # the next server → device chunk: half, a pause, the rest
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse_401:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close"
                         b"\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()  # the control plane is down: the device sees a dropped connection
            return
        self.links.append((writer, up_writer))
        await asyncio.gather(self._pump(reader, up_writer, False),
                             self._pump(up_reader, writer, True), return_exceptions=True)

    async def _pump(self, reader, writer, to_device: bool) -> None:
        try:
            while chunk := await reader.read(65536):
                if to_device and self.stall_s and len(chunk) > 4:
                    stall, self.stall_s = self.stall_s, 0.0
                    writer.write(chunk[: len(chunk) // 2])
                    await writer.drain()
                    await asyncio.sleep(stall)
                    chunk = chunk[len(chunk) // 2:]
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()

    def to_device(self, data: bytes) -> None:
        """Raw bytes to every device connection, then close them."""
        for device, upstream in self.links:
            device.write(data)
            device.close()
            upstream.close()
        self.links.clear()

    def drop_all(self) -> None:
        for device, upstream in self.links:
            device.transport.abort()
            upstream.transport.abort()
        self.links.clear()


def close_frame(code: int) -> bytes:
    return b"\x88\x02" + code.to_bytes(2, "big")  # server → client: unmasked


async def test_the_daemon_rides_out_a_misbehaving_control_plane(tmp_path: Path, fleet: Fleet):
    plane = ControlPlane(token=TOKEN, state_path=tmp_path / "plane.db", heartbeat_s=2)
    plane_port = await plane.start("127.0.0.1", free_port())
    proxy = FaultProxy(plane_port)
    await proxy.start()
    fleet.start_daemon("dev", plane=False, env={
        "COMPANION_CONTROL_PLANE__URL": f"ws://127.0.0.1:{proxy.port}",
        "COMPANION_CONTROL_PLANE__TOKEN": TOKEN, "COMPANION_CONTROL_PLANE__HEARTBEAT_S": "1",
        "COMPANION_CONTROL_PLANE__BACKOFF_INITIAL_S": "0.05",
        "COMPANION_CONTROL_PLANE__BACKOFF_MAX_S": "0.5",
        "COMPANION_CONTROL_PLANE__RECONNECT_SPREAD_S": "0.3",
        "COMPANION_CONTROL_PLANE__BACKOFF_FATAL_S": "1", "COMPANION_LLM__MAX_TOKENS": "16",
        "COMPANION_PIPELINE__TURN_TIMEOUT_S": "300"})  # a loaded CI machine can be slow
    base = fleet.api("dev")
    chats = 0
    commands: list[str] = []
    timeout = aiohttp.ClientTimeout(total=330)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def chat() -> None:
            nonlocal chats
            async with http.post(f"{base}/v1/chat", json={"message": "Say hi."}) as response:
                assert response.status == 200, await response.text()
            chats += 1

        async def linked() -> None:
            await plane.wait_connected("dev", within_s=120)

        try:
            await until(lambda: fleet.ready("dev"), 150, what="the daemon ready", every_s=0.5,
                        ignore=(OSError,))
            await linked()
            faults = [lambda: proxy.to_device(b"\x00\xff not a websocket frame"),  # garbage
                      lambda: proxy.to_device(close_frame(1011)),  # closed: internal error
                      lambda: proxy.to_device(close_frame(4000)),  # closed: an app's own code
                      proxy.drop_all]  # killed: no close frame at all
            for fault in faults:
                fault()
                await chat()  # served while the link is down or coming back
                await linked()
                commands.append(await plane.send("dev", "ping", {}))

            # a frame stalled for 5 s in the middle: it arrives whole, and runs once
            proxy.stall_s = 5.0
            commands.append(await plane.send("dev", "ping", {}))
            await chat()
            await plane.wait_ack(commands[-1], within_s=60)

            # 401, then accepted again
            proxy.refuse_401 = True
            proxy.drop_all()
            await until(lambda: fleet.log(
                "dev", "control plane refused the device token; check control_plane.token"), 60,
                        what="the 401 seen", every_s=0.2)
            await chat()
            proxy.refuse_401 = False
            await linked()

            # the control plane stopped; a new one on the same state
            await plane.stop()
            plane.close()
            await chat()
            await chat()
            plane = ControlPlane(token=TOKEN, state_path=tmp_path / "plane.db", heartbeat_s=2)
            await plane.start("127.0.0.1", plane_port)
            await linked()

            # nothing lost, nothing twice
            for command in commands:
                await plane.wait_ack(command, within_s=60)
                assert plane.command(command)["ack_count"] == 1, plane.command(command)
            await plane.wait_for(lambda: len(plane.messages("dev", "reply")) >= chats, 60)
            assert len(plane.messages("dev", "reply")) == chats

            async def outbox_empty() -> bool:
                async with http.get(f"{base}/v1/state") as response:
                    return (await response.json())["control_plane"]["outbox_depth"] == 0

            await until(outbox_empty, 30, what="the outbox drained", every_s=0.2)
            assert fleet.procs["dev"].poll() is None
        finally:
            fleet.stop_all()
            proxy.drop_all()
            if proxy.server is not None:
                proxy.server.close()
            await plane.stop()
            plane.close()
