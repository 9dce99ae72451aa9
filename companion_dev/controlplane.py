"""A small control plane for development and tests: ``companion-controlplane``.

It accepts devices on ``/ws/{device_id}`` (Bearer token), records everything they send (in
SQLite, so a restarted server still knows it), confirms each stored frame with a ``received``
receipt, resends commands that were not acked when a device says ``hello``, and forwards a
``session_export`` to the device it names as a ``session_handoff_in``. A person or a test drives
it over a small HTTP API on the same port, which answers only with the admin token
(``Authorization: Bearer <admin token>``; 401 without it: the API sends commands to devices):

    GET  /devices                               who is (or was) connected
    POST /devices/{id}/commands?wait=5          {"type", "payload", "priority"?, "id"?}
    GET  /devices/{id}/commands                 sent commands and their acks
    GET  /commands/{command_id}                 one command and its ack
    GET  /devices/{id}/messages?type=&after=    what the device sent
    POST /devices/{id}/raw                      send a raw text frame (protocol testing)
    POST /handoff?wait=10                       {"from_device_id", "to_device_id", "session_id"?,
                                                 "notify_user"?}
    POST /broadcast                             {"type", "payload"} to every connected device
    POST /rooms/{room}/announce                 {"type"?, "payload", "target": "nearest"|"all"}
    GET  /arbitration                           recent wake word decisions, per room

Wake words heard by several devices of one room are arbitrated by ``companion.arbitration``'s
``WakeRounds`` (docs/control-plane.md, "Several devices, one wake word").

    export COMPANION_CONTROLPLANE_ADMIN_TOKEN=$(openssl rand -hex 16)
    companion-controlplane serve --port 8765 --token secret --state cp.db
    companion-controlplane send kitchen persona_switch '{"persona_id": "entertainer"}' --wait 5

It lives outside the ``companion`` package: the device's daemon never imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import signal
import sqlite3
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog
from aiohttp import WSMsgType, web
from pydantic import ValidationError

from companion.arbitration import Claim, WakeRounds
from companion.control.protocol import (
    ACK,
    COMMAND_TYPES,
    HEARTBEAT,
    HELLO,
    RECEIPTS_HEADER,
    RECEIVED,
    SESSION_EXPORT,
    WAKE_ARBITRATION,
    WAKE_DETECTED,
    WakeDetected,
    server_frame,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")
DEFAULT_PORT = 8765
TOKEN_ENV = "COMPANION_CONTROLPLANE_TOKEN"
ADMIN_TOKEN_ENV = "COMPANION_CONTROLPLANE_ADMIN_TOKEN"

SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL,
    type TEXT NOT NULL,
    frame TEXT NOT NULL,
    created_at REAL NOT NULL,
    sent_count INTEGER NOT NULL DEFAULT 0,
    first_sent_at REAL,
    acked_at REAL,
    ack TEXT,
    ack_count INTEGER NOT NULL DEFAULT 0,
    refused_at REAL             -- the device closed the link with 1009 on it: never resent
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands(device_id, acked_at, seq);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    frame_id TEXT NOT NULL,
    type TEXT NOT NULL,
    frame TEXT NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE(device_id, frame_id)
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    hello TEXT,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
"""


@dataclass
class DeviceConn:
    device_id: str
    ws: web.WebSocketResponse
    since: float = field(default_factory=time.time)
    hello: dict[str, Any] | None = None
    last_heartbeat: dict[str, Any] | None = None
    last_heartbeat_at: float | None = None
    room: str | None = None  # arbitration.room, from hello, heartbeats and wake claims
    unacked: dict[str, int] = field(default_factory=dict)  # command id → bytes, sent on this link


class ControlPlane:
    """The dev control plane; usable in-process by tests (``start``/``stop``) or as a CLI."""

    def __init__(self, *, token: str | None = None, tokens: dict[str, str] | None = None,
                 state_path: Path | None = None, admin_token: str | None = None,
                 receipts: bool = True, heartbeat_s: float = 20.0,
                 max_msg_bytes: int = 16 << 20) -> None:
        self.token = token
        self.tokens = tokens or {}
        self.admin_token = admin_token
        self.receipts = receipts
        self.heartbeat_s = heartbeat_s
        self.max_msg_bytes = max_msg_bytes
        self.state_path = state_path
        self.db = sqlite3.connect(str(state_path) if state_path else ":memory:",
                                  isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        if state_path:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        try:  # a state file from before refused_at existed
            self.db.execute("ALTER TABLE commands ADD COLUMN refused_at REAL")
        except sqlite3.OperationalError:
            pass
        self.devices: dict[str, DeviceConn] = {}
        self.connect_log: list[tuple[str, float]] = []  # (device_id, time) of every connection
        self.frame_log: list[tuple[str, str, float]] = []  # (device_id, type, time), memory only
        self._changed = asyncio.Event()
        self.wake_rounds = WakeRounds(self._send_wake_result, self.room_members)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.app = self._make_app()

    # --- lifecycle ---------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._admin_auth])
        app.add_routes([
            web.get("/ws/{device_id}", self.ws_handler),
            web.get("/health", self.http_health),
            web.get("/devices", self.http_devices),
            web.get("/devices/{device_id}", self.http_device),
            web.post("/devices/{device_id}/commands", self.http_send),
            web.get("/devices/{device_id}/commands", self.http_commands),
            web.get("/devices/{device_id}/messages", self.http_messages),
            web.post("/devices/{device_id}/raw", self.http_raw),
            web.get("/commands/{command_id}", self.http_command),
            web.post("/handoff", self.http_handoff),
            web.post("/broadcast", self.http_broadcast),
            web.post("/rooms/{room}/announce", self.http_room_announce),
            web.get("/arbitration", self.http_arbitration),
        ])
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server  # the bound port when port=0
        self.port = server.sockets[0].getsockname()[1] if server else port  # type: ignore[union-attr]
        log.info("control plane listening", host=host, port=self.port, receipts=self.receipts,
                 state=str(self.state_path) if self.state_path else ":memory:")
        return self.port

    async def stop(self) -> None:
        """Stop serving; device links are dropped (they reconnect when it is back)."""
        for conn in list(self.devices.values()):
            await conn.ws.close(code=1012, message=b"control plane restarting")
        self.devices.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def close(self) -> None:
        self.db.close()

    # --- the device side -----------------------------------------------------------------------------

    def _token_ok(self, device_id: str, header: str) -> bool | None:
        """True = accepted, False = wrong token (401), None = device not allowed (403)."""
        expected = self.tokens.get(device_id, self.token)
        if self.tokens and device_id not in self.tokens and self.token is None:
            return None
        if expected is None:
            return True
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), expected.encode())

    async def ws_handler(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device_id"]
        verdict = self._token_ok(device_id, request.headers.get("Authorization", ""))
        if verdict is None:
            raise web.HTTPForbidden(text="device not allowed")
        if not verdict:
            raise web.HTTPUnauthorized(text="bad or missing device token")
        ws = web.WebSocketResponse(heartbeat=self.heartbeat_s, max_msg_size=self.max_msg_bytes)
        if self.receipts:
            ws.headers[RECEIPTS_HEADER] = "1"
        await ws.prepare(request)
        old = self.devices.get(device_id)
        if old is not None:
            await old.ws.close(code=1008, message=b"replaced by a newer connection")
        conn = DeviceConn(device_id, ws)
        self.devices[device_id] = conn
        self.connect_log.append((device_id, time.time()))
        log.info("device connected", device_id=device_id)
        self._notify()
        errored = False
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_frame(conn, msg.data)
                elif msg.type is WSMsgType.ERROR:
                    errored = True
                    log.warning("device link error", device_id=device_id,
                                error=str(ws.exception()), close_code=ws.close_code)
                    break
        finally:
            if ws.close_code == 1009 and not errored:  # the device closed: our frame too big
                self._refused_by_device(conn)
            if self.devices.get(device_id) is conn:
                del self.devices[device_id]
            log.info("device disconnected", device_id=device_id)
            self._notify()
        return ws

    async def _on_frame(self, conn: DeviceConn, text: str) -> None:
        now = time.time()
        try:
            frame = json.loads(text)
            type_, frame_id = str(frame["type"]), str(frame["id"])
            payload = frame.get("payload") or {}
        except (ValueError, KeyError, TypeError):
            log.warning("bad frame from device", device_id=conn.device_id, bytes=len(text))
            log.debug("bad frame content", device_id=conn.device_id, frame=text[:200])
            return
        self.frame_log.append((conn.device_id, type_, now))
        if type_ in (HELLO, HEARTBEAT) and isinstance(payload.get("room"), str):
            conn.room = payload["room"]
        if type_ == WAKE_DETECTED:  # first: the devices are waiting for the result
            await self._on_wake(conn, payload)
        if type_ == HEARTBEAT:
            conn.last_heartbeat, conn.last_heartbeat_at = payload, now
        elif type_ == HELLO:
            conn.hello = payload
            self.db.execute(
                "INSERT INTO devices(device_id, hello, first_seen, last_seen) VALUES(?,?,?,?) "
                "ON CONFLICT(device_id) DO UPDATE SET hello = excluded.hello, "
                "last_seen = excluded.last_seen", (conn.device_id, json.dumps(payload), now, now))
        else:
            fresh = self.db.execute(
                "INSERT OR IGNORE INTO messages(device_id, frame_id, type, frame, received_at) "
                "VALUES(?,?,?,?,?)", (conn.device_id, frame_id, type_, text, now)).rowcount
            if type_ == ACK and payload.get("command_id"):
                conn.unacked.pop(str(payload["command_id"]), None)
                self.db.execute(
                    "UPDATE commands SET ack_count = ack_count + ?, acked_at = COALESCE(acked_at, ?),"
                    " ack = COALESCE(ack, ?) WHERE id = ?",
                    (fresh, now, json.dumps(payload), payload["command_id"]))
            if type_ == SESSION_EXPORT and fresh and payload.get("to_device_id"):
                await self._forward_handoff(conn.device_id, payload)
        if self.receipts:
            try:
                await conn.ws.send_str(json.dumps(server_frame(
                    RECEIVED, {"ids": [frame_id], "server_time": time.time()},
                    frame_id=f"rcv_{uuid.uuid4().hex[:16]}")))
            except (ConnectionError, RuntimeError):
                pass
        if type_ == HELLO:
            await self._resend_pending(conn)
        self._notify()

    async def _on_wake(self, conn: DeviceConn, payload: dict[str, Any]) -> None:
        try:
            claim = Claim.from_payload(conn.device_id, WakeDetected.model_validate(payload))
        except ValidationError as exc:
            log.warning("bad wake_detected", device_id=conn.device_id, error=str(exc)[:300])
            return
        conn.room = claim.room
        await self.wake_rounds.claim(claim)

    def room_members(self, room: str) -> set[str]:
        """Connected devices of a room group."""
        return {d for d, c in self.devices.items() if c.room == room}

    async def _send_wake_result(self, device_id: str, payload: dict[str, Any]) -> None:
        """A result is not a command: not stored, not resent (useless after its window)."""
        conn = self.devices.get(device_id)
        if conn is None:
            return
        try:
            await conn.ws.send_str(json.dumps(server_frame(WAKE_ARBITRATION, payload)))
        except (ConnectionError, RuntimeError):
            pass

    async def _forward_handoff(self, from_device: str, export: dict[str, Any]) -> None:
        target = str(export["to_device_id"])
        log.info("handing a session over", from_device_id=from_device, to_device_id=target,
                 session_id=export.get("session_id"))
        await self.send(target, "session_handoff_in", {
            "session": export.get("session"), "from_device_id": from_device,
            "notify_user": bool(export.get("notify_user", True))})

    def _refused_by_device(self, conn: DeviceConn) -> None:
        """The device closed with 1009 (message too big): the largest command it had not acked
        is the one it could not take. Resending it on the next hello would loop for ever (close,
        reconnect, resend), so it is marked refused and never sent again."""
        if not conn.unacked:
            return
        command_id = max(conn.unacked, key=conn.unacked.__getitem__)
        size = conn.unacked.pop(command_id)
        self.db.execute("UPDATE commands SET refused_at = ? WHERE id = ?", (time.time(), command_id))
        log.error("the device refused a command as too big; it will not be resent",
                  device_id=conn.device_id, command_id=command_id, bytes=size)

    async def _resend_pending(self, conn: DeviceConn) -> None:
        rows = self.db.execute("SELECT id, frame FROM commands WHERE device_id = ? AND acked_at IS "
                               "NULL AND refused_at IS NULL ORDER BY seq",
                               (conn.device_id,)).fetchall()
        for row in rows:
            await self._transmit(conn, row["id"], row["frame"])
        if rows:
            log.info("resent unacked commands", device_id=conn.device_id, count=len(rows))

    async def _transmit(self, conn: DeviceConn, command_id: str, text: str) -> bool:
        conn.unacked[command_id] = len(text)
        try:
            await conn.ws.send_str(text)
        except (ConnectionError, RuntimeError):
            return False
        self.db.execute("UPDATE commands SET sent_count = sent_count + 1, "
                        "first_sent_at = COALESCE(first_sent_at, ?) WHERE id = ?",
                        (time.time(), command_id))
        return True

    # --- the operator side (used by the HTTP API and by tests) ----------------------------------------

    async def send(self, device_id: str, type_: str, payload: dict[str, Any] | None = None, *,
                   priority: int = 0, command_id: str | None = None) -> str:
        """Record a command and send it now if the device is connected (else on its hello)."""
        frame = server_frame(type_, payload or {}, frame_id=command_id, priority=priority)
        text = json.dumps(frame)
        self.db.execute("INSERT OR IGNORE INTO commands(id, device_id, type, frame, created_at) "
                        "VALUES(?,?,?,?,?)", (frame["id"], device_id, type_, text, time.time()))
        conn = self.devices.get(device_id)
        if conn is not None:
            await self._transmit(conn, frame["id"], text)
        return frame["id"]

    async def send_raw(self, device_id: str, text: str) -> None:
        conn = self.devices.get(device_id)
        if conn is None:
            raise LookupError(f"device {device_id!r} is not connected")
        await conn.ws.send_str(text)

    async def handoff(self, from_device: str, to_device: str, *, session_id: str | None = None,
                      notify_user: bool = True) -> str:
        return await self.send(from_device, "session_handoff_out", {
            "session_id": session_id, "to_device_id": to_device, "notify_user": notify_user})

    def command(self, command_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM commands WHERE id = ?", (command_id,)).fetchone()
        return _command_row(row) if row else None

    def commands(self, device_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM commands WHERE device_id = ? ORDER BY seq",
                               (device_id,)).fetchall()
        return [_command_row(r) for r in rows]

    def messages(self, device_id: str, type_: str | None = None,
                 after: int = 0) -> list[dict[str, Any]]:
        sql = "SELECT seq, frame, received_at FROM messages WHERE device_id = ? AND seq > ?"
        params: list[Any] = [device_id, after]
        if type_:
            sql += " AND type = ?"
            params.append(type_)
        rows = self.db.execute(sql + " ORDER BY seq", params).fetchall()
        return [{"seq": r["seq"], "received_at": r["received_at"], **json.loads(r["frame"])}
                for r in rows]

    def acks(self, device_id: str) -> list[dict[str, Any]]:
        return [m["payload"] for m in self.messages(device_id, ACK)]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], T], within_s: float = 5.0) -> T:
        """Wait until ``predicate()`` is truthy (checked after every frame); returns it."""
        async with asyncio.timeout(within_s):
            while True:
                changed = self._changed
                result = predicate()
                if result:
                    return result
                await changed.wait()

    async def wait_ack(self, command_id: str, within_s: float = 5.0) -> dict[str, Any]:
        def acked() -> dict[str, Any] | None:
            command = self.command(command_id)
            return command["ack"] if command and command["ack"] else None

        return await self.wait_for(acked, within_s)

    async def wait_connected(self, device_id: str, within_s: float = 5.0) -> DeviceConn:
        return await self.wait_for(
            lambda: (c := self.devices.get(device_id)) is not None and c.hello is not None and c,
            within_s)  # type: ignore[return-value]

    def device_info(self, device_id: str) -> dict[str, Any]:
        conn = self.devices.get(device_id)
        row = self.db.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        pending = self.db.execute("SELECT COUNT(*) FROM commands WHERE device_id = ? AND acked_at "
                                  "IS NULL AND refused_at IS NULL", (device_id,)).fetchone()[0]
        hello = conn.hello if conn and conn.hello else (json.loads(row["hello"]) if row and
                                                        row["hello"] else None)
        return {"device_id": device_id, "connected": conn is not None,
                "connected_since": conn.since if conn else None, "hello": hello,
                "last_heartbeat": conn.last_heartbeat if conn else None,
                "last_heartbeat_at": conn.last_heartbeat_at if conn else None,
                "last_seen": row["last_seen"] if row else None, "pending_commands": pending}

    # --- HTTP ------------------------------------------------------------------------------------------

    @web.middleware
    async def _admin_auth(self, request: web.Request, handler):
        """The admin API answers only with the admin token; with none configured it is closed
        (devices use their own token on /ws/, /health is open)."""
        if not request.path.startswith("/ws/") and request.path != "/health":
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if (self.admin_token is None or scheme.lower() != "bearer"
                    or not hmac.compare_digest(given.encode(), self.admin_token.encode())):
                return _error(401, "UNAUTHORIZED", "admin token required",
                              {"header": "Authorization: Bearer <admin token>"})
        return await handler(request)

    async def http_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "devices_connected": len(self.devices)})

    async def http_devices(self, request: web.Request) -> web.Response:
        known = {r[0] for r in self.db.execute("SELECT device_id FROM devices")} | set(self.devices)
        return web.json_response({"devices": [self.device_info(d) for d in sorted(known)]})

    async def http_device(self, request: web.Request) -> web.Response:
        return web.json_response(self.device_info(request.match_info["device_id"]))

    async def http_send(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        body = await _json_body(request)
        type_ = body.get("type")
        if type_ not in COMMAND_TYPES and not request.query.get("force"):
            return _error(422, "VALIDATION_ERROR", f"unknown command type {type_!r}",
                          {"known": sorted(COMMAND_TYPES), "hint": "?force=1 sends it anyway"})
        if not isinstance(body.get("payload", {}), dict):
            return _error(422, "VALIDATION_ERROR", "payload must be an object")
        command_id = await self.send(device_id, str(type_), body.get("payload") or {},
                                     priority=int(body.get("priority", 0)),
                                     command_id=body.get("id"))
        return await self._maybe_wait(request, command_id)

    async def _maybe_wait(self, request: web.Request, command_id: str) -> web.Response:
        wait = float(request.query.get("wait", 0) or 0)
        if wait > 0:
            try:
                await self.wait_ack(command_id, within_s=min(wait, 300))
            except TimeoutError:
                return web.json_response({**(self.command(command_id) or {}), "timed_out": True},
                                         status=202)
            return web.json_response(self.command(command_id))
        return web.json_response(self.command(command_id), status=202)

    async def http_commands(self, request: web.Request) -> web.Response:
        return web.json_response({"commands": self.commands(request.match_info["device_id"])})

    async def http_command(self, request: web.Request) -> web.Response:
        command = self.command(request.match_info["command_id"])
        if command is None:
            return _error(404, "NOT_FOUND", "no such command")
        return web.json_response(command)

    async def http_messages(self, request: web.Request) -> web.Response:
        messages = self.messages(request.match_info["device_id"], request.query.get("type"),
                                 int(request.query.get("after", 0)))
        return web.json_response({"messages": messages})

    async def http_raw(self, request: web.Request) -> web.Response:
        try:
            await self.send_raw(request.match_info["device_id"], await request.text())
        except LookupError as exc:
            return _error(404, "NOT_FOUND", str(exc))
        return web.json_response({"sent": True}, status=202)

    async def http_handoff(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not body.get("from_device_id") or not body.get("to_device_id"):
            return _error(422, "VALIDATION_ERROR", "from_device_id and to_device_id are required")
        command_id = await self.handoff(body["from_device_id"], body["to_device_id"],
                                        session_id=body.get("session_id"),
                                        notify_user=bool(body.get("notify_user", True)))
        wait = float(request.query.get("wait", 0) or 0)
        if wait <= 0:
            return web.json_response({"command_id": command_id}, status=202)
        target = body["to_device_id"]

        def handed_in() -> dict[str, Any] | None:
            for command in reversed(self.commands(target)):
                if command["type"] == "session_handoff_in" and command["ack"]:
                    return command
            return None

        try:
            out_ack = await self.wait_ack(command_id, within_s=min(wait, 300))
            into = await self.wait_for(handed_in, within_s=min(wait, 300))
        except TimeoutError:
            return web.json_response({"command_id": command_id, "timed_out": True}, status=202)
        return web.json_response({"command_id": command_id, "out": out_ack, "in": into})

    async def http_broadcast(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        ids = {d: await self.send(d, str(body.get("type", "broadcast")), body.get("payload") or {},
                                  priority=int(body.get("priority", 0)))
               for d in list(self.devices)}
        return web.json_response({"commands": ids}, status=202)


    async def http_room_announce(self, request: web.Request) -> web.Response:
        """An announcement for a room group: to the device nearest the user (the one that last
        won a wake word there; else the first connected member) or to all of them."""
        room = request.match_info["room"]
        body = await _json_body(request)
        target = body.get("target", "nearest")
        type_ = str(body.get("type", "announce"))
        if target not in ("nearest", "all"):
            return _error(422, "VALIDATION_ERROR", "target must be 'nearest' or 'all'")
        if type_ not in ("announce", "broadcast", "audio_response"):
            return _error(422, "VALIDATION_ERROR", "type must be announce, broadcast or "
                          "audio_response")
        if not isinstance(body.get("payload", {}), dict):
            return _error(422, "VALIDATION_ERROR", "payload must be an object")
        members = sorted(self.room_members(room))
        if not members:
            return _error(404, "NOT_FOUND", f"no connected device in room {room!r}")
        if target == "nearest":
            nearest = self.wake_rounds.nearest(room)
            members = [nearest if nearest in members else members[0]]
        ids = {d: await self.send(d, type_, body.get("payload") or {},
                                  priority=int(body.get("priority", 0))) for d in members}
        return web.json_response({"room": room, "target": target, "commands": ids}, status=202)

    async def http_arbitration(self, request: web.Request) -> web.Response:
        rounds = self.wake_rounds
        return web.json_response({"decisions": rounds.decisions, "nearest": {
            room: device for room, (device, _) in rounds.last_winner.items()}})


def _command_row(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "device_id": row["device_id"], "type": row["type"],
            "frame": json.loads(row["frame"]), "created_at": row["created_at"],
            "sent_count": row["sent_count"], "first_sent_at": row["first_sent_at"],
            "acked_at": row["acked_at"], "ack": json.loads(row["ack"]) if row["ack"] else None,
            "ack_count": row["ack_count"], "refused_at": row["refused_at"]}


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


def _error(status: int, code: str, message: str, details: dict | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message,
                                        "details": details or {}}}, status=status)


# --- command line -----------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="companion-controlplane", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the control plane")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                       help=f"device token (default ${TOKEN_ENV}; unset = any token)")
    serve.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV),
                       help=f"Bearer token of the HTTP API (default ${ADMIN_TOKEN_ENV}; required)")
    serve.add_argument("--state", type=Path, help="SQLite file that survives restarts")
    serve.add_argument("--no-receipts", action="store_true", help="do not send 'received'")
    serve.add_argument("--heartbeat", type=float, default=20.0, help="WebSocket ping period")
    for name, help_ in (("devices", "list devices"), ("send", "send a command"),
                        ("messages", "what a device sent"), ("handoff", "hand a session over"),
                        ("command", "one command and its ack")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--url", default=os.environ.get("COMPANION_CONTROLPLANE_HTTP",
                                                       f"http://127.0.0.1:{DEFAULT_PORT}"))
        p.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV),
                       help=f"the server's admin token (default ${ADMIN_TOKEN_ENV})")
        if name == "send":
            p.add_argument("device_id")
            p.add_argument("type")
            p.add_argument("payload", nargs="?", default="{}", help="JSON object")
            p.add_argument("--priority", type=int, default=0)
            p.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the ack")
        elif name == "messages":
            p.add_argument("device_id")
            p.add_argument("--type")
        elif name == "handoff":
            p.add_argument("from_device_id")
            p.add_argument("to_device_id")
            p.add_argument("--session")
            p.add_argument("--quiet", action="store_true", help="no goodbye / greeting")
            p.add_argument("--wait", type=float, default=20.0)
        elif name == "command":
            p.add_argument("command_id")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    plane = ControlPlane(token=args.token, admin_token=args.admin_token, state_path=args.state,
                         receipts=not args.no_receipts, heartbeat_s=args.heartbeat)
    if args.token is None:
        log.warning("no device token set: any device is accepted", env=TOKEN_ENV)
    await plane.start(args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await plane.stop()
        plane.close()


def _call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> int:
    request = urllib.request.Request(args.url.rstrip("/") + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    if args.admin_token:
        request.add_header("Authorization", f"Bearer {args.admin_token}")
    try:
        with urllib.request.urlopen(request, timeout=330) as response:
            print(json.dumps(json.loads(response.read()), indent=2))
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode(), file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"companion-controlplane: cannot reach {args.url}: {exc.reason}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command == "serve" and not args.admin_token:
        print(f"companion-controlplane: set --admin-token or ${ADMIN_TOKEN_ENV} (the HTTP API "
              "sends commands to devices)", file=sys.stderr)
        return 2
    from companion.log import configure_logging

    configure_logging("info")
    if args.command == "serve":
        try:
            asyncio.run(_serve(args))
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "devices":
        return _call(args, "GET", "/devices")
    if args.command == "command":
        return _call(args, "GET", f"/commands/{args.command_id}")
    if args.command == "messages":
        query = f"?type={args.type}" if args.type else ""
        return _call(args, "GET", f"/devices/{args.device_id}/messages{query}")
    if args.command == "send":
        try:
            payload = json.loads(args.payload)
        except ValueError as exc:
            print(f"companion-controlplane: payload is not JSON: {exc}", file=sys.stderr)
            return 2
        return _call(args, "POST", f"/devices/{args.device_id}/commands?wait={args.wait}",
                     {"type": args.type, "payload": payload, "priority": args.priority})
    if args.command == "handoff":
        return _call(args, "POST", f"/handoff?wait={args.wait}", {
            "from_device_id": args.from_device_id, "to_device_id": args.to_device_id,
            "session_id": args.session, "notify_user": not args.quiet})
    return 2


if __name__ == "__main__":
    sys.exit(main())
