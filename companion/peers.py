"""Peer-to-peer wake arbitration over UDP multicast, signed (issue 13; docs/control-plane.md).

Each datagram is one JSON object: ``kind`` (``wake``: a claim with the fields of SPEC §9;
``hello``: "I am here, in this room"), ``device_id``, ``room``, ``ts`` (the sender's wall clock),
``nonce`` and ``mac``, the HMAC-SHA256 of everything else (canonical JSON) under the group secret
(``arbitration.secret``). A receiver drops a datagram whose MAC is wrong (a stranger cannot
silence a device), whose ``ts`` is more than ``MAX_SKEW_S`` from its own clock, or whose nonce it
has already seen (a replay; also the redundant copies, see below).

UDP loses datagrams, and a lost claim can make two devices answer, so every claim is sent
``COPIES`` times ``COPY_GAP_S`` apart (same nonce: the copies after the first are dropped as
duplicates). Hellos go out every ``peer_beacon_s`` and in reply to a hello from a device not
yet known, so a device knows which peers of its room to expect and a device alone in its room
does not wait the window.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog
from pydantic import ValidationError

from companion.arbitration import Claim
from companion.control.protocol import WakeDetected
from companion.settings import ArbitrationSettings

log = structlog.get_logger(__name__)

VERSION = 1
MAX_SKEW_S = 30.0  # clocks of devices without a control plane may differ this much
NONCE_MEMORY_S = 2 * MAX_SKEW_S  # a nonce older than this fails the time check anyway
COPIES = 3
COPY_GAP_S = 0.02
PEER_TTL_BEACONS = 3.5  # a peer not heard for this many beacon periods is gone
MAX_DATAGRAM = 2048

Impair = Callable[[], float | None]  # seam for simulations: a delay in seconds, None = lost


def sign(secret: bytes, message: dict[str, Any]) -> str:
    body = json.dumps(message, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


class PeerTransport(asyncio.DatagramProtocol):
    """One device's multicast socket: sends claims and hellos, verifies what arrives."""

    def __init__(self, settings: Callable[[], ArbitrationSettings], device_id: str, *,
                 on_claim: Callable[[Claim], None] = lambda claim: None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 impair: Impair | None = None) -> None:
        secret = settings().secret
        if secret is None:
            raise ValueError("peer arbitration needs arbitration.secret")
        self._settings = settings  # re-read: config_update may move the device to another room
        self.device_id = device_id
        self.on_claim = on_claim
        self.clock = clock
        self.monotonic = monotonic
        self._impair = impair
        self._secret = secret.get_secret_value().encode()
        self._transport: asyncio.DatagramTransport | None = None
        self._nonces: dict[str, float] = {}  # nonce → monotonic time first seen
        self.peers: dict[str, tuple[str, float]] = {}  # device → (room, monotonic last heard)
        self.rejected: Counter[str] = Counter()  # why datagrams were dropped (tests, metrics)
        self._beacons: asyncio.Task | None = None

    @property
    def settings(self) -> ArbitrationSettings:
        return self._settings()

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):  # several daemons on one machine (tests, simulation)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("", s.peer_port))
        iface = socket.inet_aton(s.peer_interface)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        struct.pack("4s4s", socket.inet_aton(s.peer_group), iface))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)  # this network only
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, sock=sock)
        self._beacons = asyncio.create_task(self._beacon_loop(), name="peer-beacons")
        log.info("peer arbitration on", group=s.peer_group, port=s.peer_port, room=s.room,
                 interface=s.peer_interface)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def close(self) -> None:
        if self._beacons is not None:
            self._beacons.cancel()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def _beacon_loop(self) -> None:
        while True:
            self.hello()
            await asyncio.sleep(self.settings.peer_beacon_s)

    # --- sending ------------------------------------------------------------------------------------

    def _message(self, kind: str, **fields: Any) -> bytes:
        message = {"v": VERSION, "kind": kind, "device_id": self.device_id,
                   "room": self.settings.room, "ts": round(self.clock(), 3),
                   "nonce": os.urandom(12).hex(), **fields}
        message["mac"] = sign(self._secret, message)
        return json.dumps(message, separators=(",", ":")).encode()

    def _send(self, data: bytes, copies: int = 1) -> None:
        loop = asyncio.get_running_loop()
        for copy in range(copies):
            delay = copy * COPY_GAP_S
            if self._impair is not None:
                extra = self._impair()
                if extra is None:
                    continue  # lost (simulation)
                delay += extra
            if delay <= 0:
                self._sendto(data)
            else:
                loop.call_later(delay, self._sendto, data)

    def _sendto(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.sendto(data, (self.settings.peer_group, self.settings.peer_port))

    def announce(self, claim: Claim) -> None:
        payload = claim.payload()
        payload.pop("room")
        self._send(self._message("wake", **payload), copies=COPIES)

    def hello(self) -> None:
        self._send(self._message("hello"))

    def peers_in(self, room: str) -> set[str]:
        ttl = PEER_TTL_BEACONS * self.settings.peer_beacon_s
        now = self.monotonic()
        return {d for d, (r, seen) in self.peers.items() if r == room and now - seen <= ttl}

    # --- receiving ----------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = self.verify(data)
        if message is None or message["device_id"] == self.device_id:
            return
        device, room = message["device_id"], message["room"]
        known = device in self.peers
        self.peers[device] = (room, self.monotonic())
        if message["kind"] == "hello":
            if not known:
                self.hello()  # a newcomer learns of this device now, not a beacon period later
            return
        if message["kind"] == "wake":
            try:
                payload = WakeDetected.model_validate({**message, "room": room})
            except ValidationError as exc:
                self.rejected["invalid"] += 1
                log.info("invalid peer claim dropped", device_id=device, error=str(exc)[:200])
                return
            self.on_claim(Claim.from_payload(device, payload))

    def verify(self, data: bytes) -> dict[str, Any] | None:
        """The message if it is signed with the group secret, fresh and new; else None."""
        if len(data) > MAX_DATAGRAM:
            return self._reject("too_large")
        try:
            message = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            return self._reject("malformed")
        if not isinstance(message, dict) or not isinstance(message.get("mac"), str):
            return self._reject("malformed")
        mac = message.pop("mac")
        if not hmac.compare_digest(mac, sign(self._secret, message)):
            return self._reject("bad_mac")
        if (message.get("v") != VERSION or message.get("kind") not in ("wake", "hello")
                or not isinstance(message.get("device_id"), str)
                or not isinstance(message.get("room"), str)
                or not isinstance(message.get("nonce"), str)
                or not isinstance(message.get("ts"), int | float)):
            return self._reject("malformed")
        if abs(self.clock() - message["ts"]) > MAX_SKEW_S:
            return self._reject("stale")
        now = self.monotonic()
        for nonce, seen in list(self._nonces.items()):
            if now - seen > NONCE_MEMORY_S:
                del self._nonces[nonce]
        if message["nonce"] in self._nonces:
            self.rejected["duplicate"] += 1  # a replay, or one of our own redundant copies
            return None
        self._nonces[message["nonce"]] = now
        return message

    def _reject(self, why: str) -> None:
        self.rejected[why] += 1
        if why != "duplicate":
            log.info("peer datagram dropped", reason=why)
        return None

    def error_received(self, exc: Exception) -> None:
        log.info("peer socket error", error=str(exc))
