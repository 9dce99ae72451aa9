"""The device's one WebSocket to the fleet control plane (SPEC §4), kept up for ever.

``run_control_link(app)`` dials ``{url}/ws/{device_id}`` with the device token, says ``hello``
(with the last command it acknowledged, so the server can resend what it lost), sends
heartbeats with the device state, and pumps the durable outbox in order. Commands are handed to
``handlers.CommandHandlers`` through an idempotency check (a duplicate id runs once, is acked
again). When the link drops it reconnects with exponential backoff and full jitter, capped; the
first retry after a working link spreads over ``reconnect_spread_s`` so a fleet does not stampede
a restarted control plane; a 401/403 waits ``backoff_fatal_s`` and says so clearly in the log.

The device works the same with the link down: frames wait in the outbox (SQLite) and go out on
reconnect. Seams for tests are keyword arguments whose defaults are the real thing: ``connect``
(websockets), ``sleep`` (the backoff waits), ``clock`` (wall time) and ``rng`` (the jitter).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException
from websockets.frames import CloseCode

from companion.actions.core import ActionError, Outcome
from companion.control.handlers import CONCURRENT_TYPES, CommandHandlers
from companion.control.outbox import Outbox
from companion.control.protocol import (
    ACK,
    AUDIO_STREAM,
    BUTTON_PRESS,
    COMMAND_TYPES,
    ERROR,
    HEARTBEAT,
    HELLO,
    PROTOCOL_VERSION,
    RECEIPTS_HEADER,
    RECEIVED,
    REPLY,
    TEXT_INPUT,
    TRANSCRIPT,
    WAKE_ARBITRATION,
    WAKE_DETECTED,
    Command,
    ProtocolError,
    device_frame,
    error_frame,
    parse_server_frame,
)
from companion.control.tls import client_ssl, connect_without_redirects
from companion.events import Event, EventType, PipelineState
from companion.settings import ControlPlaneSettings
from companion.store import StorageError
from companion.version import VERSION

if TYPE_CHECKING:
    from companion.app import App

log = structlog.get_logger(__name__)
T = TypeVar("T")

FATAL_STATUS = frozenset({401, 403})
EVENT_RETRY_S = 1.0  # a frame the disk refused is offered to it again this often
GOOD_LINK_S = 10.0  # a link that stayed up this long counts as good even without a server frame
CLOCK_SAMPLES = 8


@dataclass
class LinkStatus:
    """What /v1/state, /ready/all and `companion check` show about the link."""

    url: str | None = None
    connected: bool = False
    connected_since: float | None = None  # epoch seconds
    retries: int = 0  # failed attempts since the last good connection
    connections: int = 0  # successful connections since start
    outbox_depth: int = 0
    outbox_dropped: int = 0
    dead_letters: int = 0  # frames the server refused (closed with 1009), set aside, not resent
    clock_offset_ms: float | None = None  # server clock minus device clock
    rtt_ms: float | None = None
    last_error: str | None = None
    fatal: bool = False  # the server refused the token (401/403)
    next_retry_s: float | None = None
    receipts: bool = False

    @property
    def latency_ms(self) -> float | None:
        """The link's round trip (what /ready/all shows as the component's latency)."""
        return self.rtt_ms

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backoff:
    """Exponential backoff with full jitter: attempt n waits U(0, min(max, initial·2^n)). After a
    good link drops, the window starts at ``reconnect_spread_s`` instead, so devices that lost
    the same server at the same moment come back spread out."""

    def __init__(self, settings: Callable[[], ControlPlaneSettings],
                 rng: Callable[[], float] = random.random) -> None:
        self._settings = settings
        self._rng = rng
        self.attempt = 0
        self.after_drop = False

    def reset(self, *, dropped: bool) -> None:
        self.attempt = 0
        self.after_drop = dropped

    def next_delay(self) -> float:
        s = self._settings()
        cap = s.backoff_initial_s * 2 ** min(self.attempt, 30)
        if self.after_drop:
            cap = max(cap, s.reconnect_spread_s)
        self.attempt += 1
        return self._rng() * min(cap, s.backoff_max_s)

    def fatal_delay(self) -> float:
        return self._settings().backoff_fatal_s * (0.5 + 0.5 * self._rng())


class _ClockEstimator:
    """Server-minus-device clock offset from request/receipt round trips (NTP's idea): of the
    recent samples, trust the one with the shortest round trip."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=CLOCK_SAMPLES)  # (rtt, offset)

    def add(self, sent: float, server_time: float, received: float) -> None:
        rtt = max(0.0, received - sent)
        self.samples.append((rtt, server_time - (sent + received) / 2))

    @property
    def best(self) -> tuple[float, float] | None:
        return min(self.samples) if self.samples else None


class ControlLink:
    def __init__(
        self, app: App, *,
        connect: Callable[..., Awaitable[ClientConnection]] = connect_without_redirects,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.app = app
        self._connect = connect
        self._sleep = sleep
        self.clock = clock
        self.status = LinkStatus(url=app.settings.control_plane.url)
        self.outbox = Outbox(app.store, max_items=app.settings.control_plane.outbox_max)
        self.backoff = Backoff(lambda: self.settings, rng)
        self.handlers = CommandHandlers(app, self)
        self._clock = _ClockEstimator()
        self._sent_at: OrderedDict[str, float] = OrderedDict()  # frame id → device send time
        self._outbox_changed = asyncio.Event()
        self._event_frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._commands: asyncio.Queue[tuple[Command, float]] = asyncio.Queue()
        self._duplicates: dict[str, int] = {}
        self._claims = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._ws: ClientConnection | None = None
        self._tls: dict[str, Any] = {}  # {"ssl": context} for wss:// (made in run, off the loop)
        self._got_frame = False
        self._unconfirmed: dict[str, tuple[int, int]] = {}  # frame id → (seq, bytes), this link
        self.executed: list[str] = []  # command ids run by this process, in order (diagnostics)
        app.control = self
        # subscribe now: what happens before run() is scheduled is kept too
        self._unsubscribe = app.bus.add_callback(self._on_event)
        if app.voice is not None:  # control_plane.send_audio: utterances go up as audio_stream
            app.voice.utterance_listeners.append(self._on_utterance)

    @property
    def settings(self) -> ControlPlaneSettings:
        return self.app.settings.control_plane  # re-read: config_update may replace it

    # --- the long-running parts ---------------------------------------------------------------------

    async def run(self) -> None:
        if self.settings.clear_text:
            log.warning("control plane link is NOT encrypted: the device token and every frame "
                        "cross the network in clear text (control_plane.allow_insecure_ws)",
                        host=self.settings.host)
        context = await asyncio.to_thread(client_ssl, self.settings)
        self._tls = {"ssl": context} if context is not None else {}
        interrupted = await self.app.store.run(self.outbox.setup)
        if interrupted:
            log.warning("commands interrupted by a restart are acked as failed", ids=interrupted)
        self._sync_depth()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._event_writer(), name="control-events")
                group.create_task(self._command_worker(), name="control-commands")
                group.create_task(self._connect_loop(), name="control-connect")
        finally:
            self._unsubscribe()
            if self._on_utterance in getattr(self.app.voice, "utterance_listeners", []):
                self.app.voice.utterance_listeners.remove(self._on_utterance)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connect_loop(self) -> None:
        while True:
            cp = self.settings
            uri = f"{(cp.url or '').rstrip('/')}/ws/{self.app.settings.device_id}"
            delay: float | None = None
            try:
                ws = await self._connect(
                    uri, additional_headers=_auth_header(cp), **self._tls,
                    max_size=max(4 * cp.max_frame_bytes, 4 << 20), proxy=None,
                    open_timeout=10, ping_interval=min(20.0, cp.heartbeat_s), ping_timeout=20,
                    close_timeout=2, user_agent_header="companion/" + VERSION)
            except asyncio.CancelledError:
                raise
            except InvalidStatus as exc:
                code = exc.response.status_code
                if code in FATAL_STATUS:
                    delay = self.backoff.fatal_delay()
                    self.status.fatal = True
                    self._failed(f"HTTP {code}: the control plane refused this device's token")
                    log.error("control plane refused the device token; check control_plane.token",
                              status=code, url=uri, retry_in_s=round(delay, 1))
                elif 300 <= code < 400:
                    where = exc.response.headers.get("Location", "?")
                    self._failed(f"HTTP {code}: the control plane redirected to {where}; "
                                 "redirects are not followed (the token goes to "
                                 "control_plane.url only)")
                    log.error("control plane answered with a redirect, not followed; "
                              "update control_plane.url", status=code, location=where)
                else:
                    self._failed(f"HTTP {code} from the control plane")
            except InvalidURI as exc:
                delay = self.backoff.fatal_delay()
                self._failed(f"invalid control_plane.url: {exc}")
                log.error("invalid control_plane.url", url=uri, error=str(exc))
            except (OSError, TimeoutError, WebSocketException) as exc:
                self._failed(f"{type(exc).__name__}: {exc}")
            else:
                good = False
                try:
                    good = await self._session(ws)
                except asyncio.CancelledError:
                    raise
                except (ConnectionClosed, OSError, TimeoutError) as exc:
                    self.status.last_error = f"link lost: {type(exc).__name__}: {exc}"
                    good = self._got_frame
                except Exception as exc:  # a bug must not take the daemon down: log, reconnect
                    self.status.last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("control link session failed")
                finally:
                    await self._closed(ws)
                if _server_refused_a_frame(ws):
                    await self._dead_letter_refused()
                if good:
                    self.backoff.reset(dropped=True)
                    self.status.retries = 0
            if delay is None:
                delay = self.backoff.next_delay()
            self.status.next_retry_s = round(delay, 3)
            await self._sleep(delay)
            self.status.next_retry_s = None

    def _failed(self, error: str) -> None:
        self.status.retries += 1
        self.status.last_error = error
        self.app.status.set_component("control_plane", False, error)
        log.info("control plane unreachable", error=error, retries=self.status.retries)

    async def _session(self, ws: ClientConnection) -> bool:
        """One connection, until it closes. True when it was a good one (resets the backoff)."""
        self._ws = ws
        self._got_frame = False
        self._unconfirmed.clear()
        receipts = (ws.response is not None
                    and ws.response.headers.get(RECEIPTS_HEADER, "") == "1")
        started = time.monotonic()
        self.status.connected, self.status.connected_since = True, self.clock()
        self.status.connections += 1
        self.status.receipts, self.status.fatal = receipts, False
        self.app.status.set_component("control_plane", True, f"connected to {self.status.url}")
        self.app.bus.emit(EventType.CONTROL_LINK, connected=True, url=self.status.url)
        log.info("control link up", url=self.status.url, receipts=receipts,
                 outbox_depth=self.outbox.depth)
        await self._send_now(ws, device_frame(HELLO, await self._hello_payload()))
        tasks = [asyncio.create_task(self._reader(ws), name="control-reader"),
                 asyncio.create_task(self._sender(ws, receipts), name="control-sender"),
                 asyncio.create_task(self._heartbeats(ws), name="control-heartbeat")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self._got_frame or time.monotonic() - started >= GOOD_LINK_S

    async def _closed(self, ws: ClientConnection) -> None:
        self._ws = None
        was = self.status.connected
        self.status.connected, self.status.connected_since = False, None
        try:
            async with asyncio.timeout(3):
                await ws.close()
        except (TimeoutError, OSError, WebSocketException):
            pass
        if was:
            self.app.status.set_component("control_plane", False,
                                          self.status.last_error or "link closed")
            self.app.bus.emit(EventType.CONTROL_LINK, connected=False, error=self.status.last_error)
            log.warning("control link down", error=self.status.last_error,
                        outbox_depth=self.outbox.depth)

    async def _reader(self, ws: ClientConnection) -> None:
        async for raw in ws:
            await self._on_raw(ws, raw)

    async def _sender(self, ws: ClientConnection, receipts: bool) -> None:
        """Send the outbox in order. With receipts the server's ``received`` frames delete rows;
        without, a ping/pong after a batch proves the server read it."""
        last_seq = 0
        while True:
            self._outbox_changed.clear()
            batch = await self.app.store.run(self.outbox.pending, last_seq, 200)
            if not batch:
                await self._outbox_changed.wait()
                continue
            for item in batch:
                self._unconfirmed[item.frame_id] = (item.seq, len(item.text))
                await ws.send(item.text)
                last_seq = item.seq
            if not receipts:
                pong = await ws.ping()
                async with asyncio.timeout(30):
                    await pong
                await self.app.store.run(self.outbox.remove_upto, last_seq)
                self._unconfirmed.clear()
                self._sync_depth()

    async def _dead_letter_refused(self) -> None:
        """The server closed the link with 1009 (message too big): one of the frames it had not
        confirmed is too big for it, and resending it would loop for ever (close, reconnect,
        resend). Set the largest aside; if it was another, the next 1009 takes that one."""
        if not self._unconfirmed:
            return
        frame_id = max(self._unconfirmed, key=lambda f: self._unconfirmed[f][1])
        size = self._unconfirmed.pop(frame_id)[1]
        reason = "too_big"
        dead = await self.app.store.run(self.outbox.dead_letter, frame_id, reason)
        self._unconfirmed.clear()
        if dead is None:
            return
        self.status.dead_letters += 1
        self._sync_depth()
        log.error("the control plane refused a frame (closed 1009, too big); set aside in "
                  "control_dead_letters, not resent", frame_id=frame_id, type=dead.type, bytes=size)
        self.app.bus.emit(EventType.CONTROL_FRAME_REFUSED, frame_id=frame_id, frame_type=dead.type,
                          bytes=size, reason=reason)

    async def _heartbeats(self, ws: ClientConnection) -> None:
        while True:
            await self._send_now(ws, device_frame(HEARTBEAT, self.heartbeat_payload()))
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _send_now(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        """Send outside the outbox (hello, heartbeats, protocol errors): nothing to keep."""
        self._sent_at[frame["id"]] = self.clock()
        while len(self._sent_at) > 64:
            self._sent_at.popitem(last=False)
        await ws.send(json.dumps(frame))

    # --- frames from the server ----------------------------------------------------------------------

    async def _on_raw(self, ws: ClientConnection, raw: str | bytes) -> None:
        received_at = time.monotonic()
        try:
            command = parse_server_frame(raw, max_bytes=self.settings.max_frame_bytes)
        except ProtocolError as exc:
            log.warning("refused a frame from the control plane", code=exc.code,
                        error=exc.message, ref_id=exc.ref_id)
            await self._send_now(ws, error_frame(exc))
            return
        self._got_frame = True
        if command.type == RECEIVED:
            await self._on_receipt(command.payload.ids, command.payload.server_time)
            return
        if command.type == WAKE_ARBITRATION:  # a result for the pipeline, not a command
            if self.app.arbiter is not None:
                self.app.arbiter.on_control_result(command.payload.turn_id,
                                          command.payload.winner_device_id)
            return
        # the claim (a row in SQLite) and the start of the command must not be split by the
        # link dropping: shielded, a claimed command always runs
        accepting = asyncio.create_task(self.accept(command, received_at))
        self._tasks.add(accepting)
        accepting.add_done_callback(self._tasks.discard)
        await asyncio.shield(accepting)

    async def _on_receipt(self, ids: list[str], server_time: float | None) -> None:
        now = self.clock()
        if server_time is not None:
            for frame_id in ids:
                sent = self._sent_at.pop(frame_id, None)
                if sent is not None:
                    self._clock.add(sent, server_time, now)
            best = self._clock.best
            if best is not None:
                self.status.rtt_ms = round(best[0] * 1000, 2)
                self.status.clock_offset_ms = round(best[1] * 1000, 2)
        for frame_id in ids:
            self._unconfirmed.pop(frame_id, None)
        try:
            await self.app.store.run(self.outbox.remove, ids)
        except StorageError:
            return  # kept a while longer: sent again later, the server drops what it has
        self._sync_depth()

    async def accept(self, command: Command, received_at: float | None = None) -> None:
        """Run a command once: a duplicate is acked again with the stored result."""
        received_at = time.monotonic() if received_at is None else received_at
        try:
            async with self._claims:  # a duplicate is counted, or sees "done": never both, never neither
                state, result = await self.app.store.run(self.outbox.begin, command.id,
                                                         command.type)
                if state == "running":
                    self._duplicates[command.id] = self._duplicates.get(command.id, 0) + 1
        except StorageError as exc:
            # it cannot be recorded, so it does not run (a resend after the fault would run
            # it again): refused, and the server may send it again later
            log.warning("command refused: storage failing", command_id=command.id,
                        type=command.type, error=str(exc))
            await self._ack_unkept({"command_id": command.id, "command_type": command.type,
                                    "ok": False, "error_code": "STORAGE_UNAVAILABLE",
                                    "error": f"{exc}; not run", "latency_ms": None})
            return
        if state == "done":
            log.info("duplicate command: acking again", command_id=command.id, type=command.type)
            await self.enqueue(device_frame(ACK, {**(result or {}), "duplicate": True}))
            return
        if state == "running":
            return
        if command.type in CONCURRENT_TYPES or self.handlers.is_urgent(command):
            task = asyncio.create_task(self._execute(command, received_at),
                                       name=f"command-{command.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._commands.put_nowait((command, received_at))

    async def _command_worker(self) -> None:
        """Commands that speak or change the conversation run one at a time, in order."""
        while True:
            command, received_at = await self._commands.get()
            await self._execute(command, received_at)

    async def _execute(self, command: Command, received_at: float) -> None:
        log.info("command", command_id=command.id, type=command.type, priority=command.priority)
        self.executed.append(command.id)
        outcome = Outcome(command.type)
        ack: dict[str, Any] = {"command_id": command.id, "command_type": command.type, "ok": True}
        try:
            outcome = await _child(self.handlers.handle(command))
            ack.update(outcome.result)
        except _Interrupted:
            ack.update(ok=False, error_code="INTERRUPTED",
                       error="interrupted: stopped by barge-in or a more urgent message")
        except ActionError as exc:
            ack.update(exc.details)
            ack.update(ok=False, error=exc.message, error_code=exc.code)
            log.warning("command failed", command_id=command.id, type=command.type,
                        code=exc.code, error=exc.message)
        except Exception:
            ack.update(ok=False, error="internal error", error_code="INTERNAL")
            log.exception("command crashed", command_id=command.id, type=command.type)
        ack["latency_ms"] = round((time.monotonic() - received_at) * 1000, 2)
        async with self._claims:
            extra = self._duplicates.pop(command.id, 0)
            try:
                await self.app.store.run(lambda: self.outbox.finish(
                    command.id, device_frame(ACK, ack), extra_acks=extra))
            except StorageError:  # ran, but its ack cannot be kept: sent as it is, once
                await self._ack_unkept(ack)
        self._sync_depth()
        if outcome.after is not None:
            try:
                await _child(outcome.after())
            except _Interrupted:
                pass
            except Exception:
                log.warning("after-ack action failed", command_id=command.id, exc_info=True)

    # --- frames to the server ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ws is not None and self.status.connected

    def plane_time(self) -> float:
        """Now on the control plane's clock (the offset measured from receipts)."""
        return self.clock() + self.clock_offset_s

    async def send_wake(self, payload: dict[str, Any]) -> bool:
        """Send a ``wake_detected`` now, outside the outbox: after its window it is useless."""
        ws = self._ws
        if ws is None or not self.status.connected:
            return False
        await self._send_now(ws, device_frame(WAKE_DETECTED, payload))
        return True

    async def enqueue(self, frame: dict[str, Any]) -> None:
        """Keep a frame durably and send it when the link is up."""
        await self.app.store.run(self.outbox.put, frame)
        self._sync_depth()

    def _sync_depth(self) -> None:
        self.status.outbox_depth = self.outbox.depth
        self.status.outbox_dropped = self.outbox.dropped
        self._outbox_changed.set()

    def _on_utterance(self, turn_id: str, pcm: bytes) -> None:
        if not self.settings.send_audio:
            return
        self._event_frames.put_nowait(device_frame(AUDIO_STREAM, {
            "turn_id": turn_id, "format": "pcm_s16le", "sample_rate": 16000, "channels": 1,
            "audio_b64": base64.b64encode(pcm).decode("ascii")}))

    def _on_event(self, event: Event) -> None:
        """Turn bus events into frames (synchronously, in order; written by _event_writer)."""
        data, conv = event.data, self.app.conversation
        common = {"turn_id": event.turn_id, "persona_id": conv.active_persona_id,
                  "session_id": conv.active_session_id}
        if event.type is EventType.STT_END:
            frame = device_frame(TRANSCRIPT, {"text": data.get("text", ""), **common})
        elif event.type is EventType.LLM_END:
            frame = device_frame(REPLY, {"text": data.get("text", ""),
                                         "tokens": data.get("tokens"), **common})
        elif event.type is EventType.EXCHANGE_RECORDED and data.get("source") != "voice":
            # typed turns (HTTP, CLI, control): voice turns were sent from STT_END and LLM_END
            common = {**common, "session_id": data.get("session_id"),
                      "persona_id": data.get("persona_id"), "source": data.get("source")}
            self._event_frames.put_nowait(device_frame(TEXT_INPUT, {"text": data.get("user_text", ""),
                                                                    **common}))
            frame = device_frame(REPLY, {"text": data.get("reply", ""), "tokens": data.get("tokens"),
                                         **common})
        elif event.type is EventType.BUTTON:
            frame = device_frame(BUTTON_PRESS, {"button": data.get("button"),
                                                "kind": data.get("kind")})
        elif event.type is EventType.TURN_ERROR:
            frame = device_frame(ERROR, {"code": data.get("code", "turn_error"),
                                         "message": data.get("message", ""), "source": "turn",
                                         "turn_id": event.turn_id})
        else:
            return
        self._event_frames.put_nowait(frame)

    async def _ack_unkept(self, ack: dict[str, Any]) -> None:
        """An ack the disk would not keep: straight to the server if the link is up."""
        ws = self._ws
        if ws is not None and self.status.connected:
            with contextlib.suppress(ConnectionClosed, OSError):
                await self._send_now(ws, device_frame(ACK, ack))

    async def _event_writer(self) -> None:
        while True:
            frame = await self._event_frames.get()
            while True:  # in order: a frame the disk refuses waits (in memory) until it takes it
                try:
                    await self.enqueue(frame)
                    break
                except StorageError:
                    await asyncio.sleep(EVENT_RETRY_S)

    async def _hello_payload(self) -> dict[str, Any]:
        app = self.app
        last = await app.store.run(self.outbox.last_acked_command_id)
        return {
            "device_id": app.settings.device_id, "version": VERSION,
            "protocol": PROTOCOL_VERSION,
            "room": app.settings.arbitration.room,
            "capabilities": sorted(COMMAND_TYPES | {"receipts", WAKE_ARBITRATION}
                                   | ({"speaker"} if app.speech.sink is not None else set())
                                   | ({"microphone"} if app.voice is not None else set())
                                   | ({"led"} if app.led is not None else set())),
            "active_persona_id": app.conversation.active_persona_id,
            "active_session_id": app.conversation.active_session_id,
            "last_acked_command_id": last, "outbox_depth": self.outbox.depth,
            "pipeline_state": str(app.status.pipeline_state), "device_time": self.clock(),
        }

    def heartbeat_payload(self) -> dict[str, Any]:
        app, status = self.app, self.app.status
        busy = status.pipeline_state in (PipelineState.LISTENING, PipelineState.THINKING,
                                         PipelineState.SPEAKING)
        recent = [t.total_s for t in status.recent_turns if t.total_s is not None]
        return {
            "status": "busy" if busy else "online",
            "pipeline_state": str(status.pipeline_state), "muted": status.muted,
            "room": app.settings.arbitration.room,
            "volume": status.volume, "active_persona_id": app.conversation.active_persona_id,
            "active_session_id": app.conversation.active_session_id,
            "device_time": self.clock(),
            "metrics": {
                "uptime_s": round(status.uptime_s, 1), "turns_recent": len(recent),
                "avg_turn_ms": round(sum(recent) / len(recent) * 1000, 1) if recent else None,
                "outbox_depth": self.outbox.depth, "outbox_dropped": self.outbox.dropped,
                "clock_offset_ms": self.status.clock_offset_ms, "rtt_ms": self.status.rtt_ms,
            },
        }

    # --- time -----------------------------------------------------------------------------------------

    @property
    def clock_offset_s(self) -> float:
        best = self._clock.best
        return best[1] if best is not None else 0.0

    def device_time_for(self, server_time: float) -> float:
        """The device-clock moment that is ``server_time`` on the server's clock."""
        return server_time - self.clock_offset_s


class _Interrupted(Exception):
    """A command's work was cancelled from outside (speech.stop: barge-in, an urgent message)
    while the link itself keeps running."""


async def _child(work: Awaitable[T]) -> T:
    """Run ``work`` in its own task, so that cancelling it (speech.stop cancels whatever is
    speaking) ends that command, not the worker; cancelling the worker still cancels it."""
    task = asyncio.ensure_future(work)
    try:
        return await task
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if task.cancelled() and me is not None and not me.cancelling():
            raise _Interrupted() from None
        raise


def _server_refused_a_frame(ws: ClientConnection) -> bool:
    """The server (not this device) closed the link with 1009: a frame we sent was too big."""
    protocol = ws.protocol
    rcvd = protocol.close_rcvd
    return (rcvd is not None and rcvd.code == CloseCode.MESSAGE_TOO_BIG
            and bool(protocol.close_rcvd_then_sent))


def _auth_header(cp: ControlPlaneSettings) -> dict[str, str]:
    token = cp.token.get_secret_value() if cp.token is not None else ""
    return {"Authorization": f"Bearer {token}"}


async def run_control_link(app: App, **seams: Any) -> None:
    """Keep the control-plane link up until cancelled (started by ``App.run``)."""
    await ControlLink(app, **seams).run()
