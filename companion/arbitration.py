"""Several devices hear one wake word: exactly one answers (SPEC §9, docs/control-plane.md).

On a wake word the device measures the word's speech level and its signal-to-noise ratio (the
word against the noise floor heard just before it), starts listening at once and opens a
``Round``: a ``wake_detected`` claim goes to the control plane (when the link is up) and, in
peer mode, to the other devices of the room over UDP multicast (``companion.peers``). The round
ends with a ``Verdict``: the control plane's ``wake_arbitration`` or the peer rule, whenever it
comes before the answer starts; when the answer is due, it waits for the verdict at most until
``Round.deadline_s`` after the wake, then answers (or follows the peer rule). A device that
loses stops at once, silently.

One rule everywhere (the control plane, peers, the simulation): the best SNR wins, then the
level, then the wake score, then the device id (so every peer that saw the same claims picks
the same winner). The claims carry values rounded as on the wire, for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from companion.events import EventBus, EventType
from companion.settings import ArbitrationSettings

log = structlog.get_logger(__name__)

SILENCE_DBFS = -120.0  # the level of digital silence (log of zero is not a number)
WORD_S = 1.0  # the wake word's audio: the last second before the detector fired
# one frame's delivery on the control link, allowed for on top of the window: a frame whose TCP
# segment is lost waits a retransmission (Linux's minimum RTO, 200 ms: a lone frame has no later
# segment to trigger a fast retransmit) plus jitter. The plane waits this long for the claims of
# the window; a device waits up to twice (its claim and then its verdict may each be the one)
DELIVERY_S = 0.25
ROUND_MEMORY_S = 10.0
# claims of one room this close are one wake word, even when the window says otherwise: a busy
# device hears (detects) late; the verdict still counts until its answer starts
LATE_CLAIM_S = 1.0


# --- the signal ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WakeSignal:
    level_dbfs: float
    snr_db: float


def measure_wake(pcm: bytes, *, sample_rate: int = 16000, word_s: float = WORD_S,
                 frame_ms: int = 30) -> WakeSignal:
    """The wake word's level and SNR from the audio heard up to the detection (16-bit mono).

    The word is the last ``word_s``; its level is the 90th percentile of its 30 ms frame
    energies (the vowels, not the gaps between syllables). The noise floor is the 20th
    percentile of the frames before it: the room between words, whatever the gain. A nearer
    device hears the same room noise of its own but a louder word, so its SNR is higher."""
    samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype=np.int16)
    frame = max(1, sample_rate * frame_ms // 1000)
    count = len(samples) // frame
    if count == 0:
        return WakeSignal(SILENCE_DBFS, 0.0)
    frames = samples[len(samples) - count * frame:].astype(np.float64).reshape(count, frame)
    power = np.mean((frames / 32768.0) ** 2, axis=1)
    db = np.maximum(10.0 * np.log10(np.maximum(power, 1e-30)), SILENCE_DBFS)
    word_frames = max(1, min(count, round(word_s * 1000 / frame_ms)))
    word, before = db[-word_frames:], db[:-word_frames]
    level = float(np.percentile(word, 90))
    noise = float(np.percentile(before if len(before) >= 3 else db, 20))
    return WakeSignal(round(level, 1), round(max(0.0, level - noise), 1))


class AudioClock:
    """When the audio now being processed was heard, on the wall clock.

    A loaded device detects late: the wake word model runs behind the microphone, and the time
    of the detection can be a second after the word (measured: 1.2 s between two daemons on a
    loaded 2-core machine). Blocks come at a fixed rate, so block n was captured at
    ``t0 + n·block_s``; every arrival gives ``arrival − n·block_s ≥ t0`` (queueing only adds),
    and the smallest value over the last ``window_blocks`` (a sliding minimum, so the sound
    card's clock drift does not accumulate) is the estimate of ``t0``."""

    MAX_LAG_S = 5.0  # more than this is not lag but audio faster than real time (a WAV file)

    def __init__(self, block_s: float, *, window_blocks: int = 1000,
                 clock: Callable[[], float] = time.time) -> None:
        self.block_s = block_s
        self.window = window_blocks
        self.clock = clock
        self.blocks = 0
        self._minima: deque[tuple[int, float]] = deque()  # (block, offset), offsets increasing

    def tick(self) -> None:
        """A block has arrived."""
        self.blocks += 1
        offset = self.clock() - self.blocks * self.block_s
        while self._minima and self._minima[-1][1] >= offset:
            self._minima.pop()
        self._minima.append((self.blocks, offset))
        while self._minima[0][0] <= self.blocks - self.window:
            self._minima.popleft()

    def lag_s(self, behind_blocks: int = 0) -> float:
        """How long ago the block ``behind_blocks`` before the latest one was heard."""
        if not self._minima:
            return 0.0
        heard = self._minima[0][1] + (self.blocks - behind_blocks) * self.block_s
        lag = self.clock() - heard
        return lag if 0.0 <= lag <= self.MAX_LAG_S else 0.0


# --- the rule ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One device's ``wake_detected``: the fields of SPEC §9 plus who and where."""

    device_id: str
    room: str
    turn_id: str
    word: str
    score: float
    level_dbfs: float
    snr_db: float
    at: float  # control-plane clock (epoch seconds)
    window_ms: int = 200

    def __post_init__(self) -> None:
        # as on the wire: every peer must compare the very numbers the others compare
        object.__setattr__(self, "score", round(float(self.score), 4))
        object.__setattr__(self, "level_dbfs", round(float(self.level_dbfs), 1))
        object.__setattr__(self, "snr_db", round(float(self.snr_db), 1))
        object.__setattr__(self, "at", round(float(self.at), 4))

    def payload(self) -> dict[str, Any]:
        data = asdict(self)
        del data["device_id"]
        return data

    @classmethod
    def from_payload(cls, device_id: str, payload: dict[str, Any]) -> Claim:
        """From a validated ``wake_detected`` payload (a dict or the pydantic model)."""
        data = payload if isinstance(payload, dict) else payload.model_dump()
        return cls(device_id=device_id, **{k: data[k] for k in (
            "room", "turn_id", "word", "score", "level_dbfs", "snr_db", "at", "window_ms")})

    @property
    def rank(self) -> tuple[float, float, float, str]:
        return (self.snr_db, self.level_dbfs, self.score, self.device_id)


def winner(claims: list[Claim]) -> Claim:
    """The best SNR, then level, then score, then device id."""
    return max(claims, key=lambda c: c.rank)


# --- the device ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    won: bool
    winner_device_id: str | None
    source: str  # control | peer | alone | timeout
    waited_ms: float


class ControlChannel(Protocol):
    """What the arbiter needs of the control link (companion.control.client.ControlLink)."""

    @property
    def connected(self) -> bool: ...

    def plane_time(self) -> float: ...

    async def send_wake(self, payload: dict[str, Any]) -> bool: ...


class PeerChannel(Protocol):
    """What the arbiter needs of the peer transport (companion.peers.PeerTransport)."""

    def announce(self, claim: Claim) -> None: ...

    def peers_in(self, room: str) -> set[str]: ...


@dataclass
class Round:
    """One wake word on this device, from the claim to the verdict."""

    claim: Claim
    started: float  # monotonic
    window_s: float
    control: bool  # the control plane decides (its link was up when the word was heard)
    expected: set[str]  # peers of the room known when the word was heard
    result: asyncio.Future[Verdict]
    arbiter: Arbiter
    peer_claims: dict[str, Claim] = field(default_factory=dict)

    @property
    def deadline_s(self) -> float:
        """How long after the wake the gate waits for the verdict: the window; with the control
        plane deciding, plus its wait for the window's claims and the verdict's delivery (each
        may wait a TCP retransmission). The gate comes after the command, so this rarely holds
        the winner; it keeps a loser whose verdict is late from answering too."""
        return self.window_s + (2 * DELIVERY_S if self.control else 0.0)

    async def commit(self) -> Verdict:
        """The verdict when the answer is about to start (the gate): wait for it until
        ``deadline_s`` after the wake, then take the best available (the peer rule, else
        "answer"). A result that arrives after the window but before this moment still counts:
        the answer has not started, and a late "you lost" keeps a second device quiet."""
        remaining = self.started + self.deadline_s - self.arbiter.monotonic()
        if not self.result.done() and remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.result), remaining)
        if not self.result.done():
            self.arbiter.fall_back(self)
        return self.result.result()


class Arbiter:
    """This device's side of the arbitration: opens rounds, takes results, decides as a peer."""

    def __init__(self, settings: Callable[[], ArbitrationSettings], device_id: str, bus: EventBus,
                 *, control: Callable[[], ControlChannel | None] = lambda: None,
                 peer: PeerChannel | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self.device_id = device_id
        self.bus = bus
        self._control = control
        self.peer = peer
        self.clock = clock
        self.monotonic = monotonic
        self.rounds: dict[str, Round] = {}
        # peer claims heard lately: a peer may hear the word a little before this device does
        self._recent: deque[tuple[float, Claim]] = deque(maxlen=256)
        self._used: deque[tuple[str, str]] = deque(maxlen=256)  # peer claims a round has taken
        self._sends: set[asyncio.Task] = set()

    @property
    def settings(self) -> ArbitrationSettings:
        return self._settings()  # re-read: config_update may move the device to another room

    @property
    def peers_on(self) -> bool:
        return self.peer is not None and self.settings.peer

    def begin(self, turn_id: str, word: str, score: float, signal: WakeSignal, *,
              lag_s: float = 0.0) -> Round | None:
        """Open the round of a wake word heard ``lag_s`` ago (AudioClock); None when there is
        nobody to arbitrate with (no link, no peers): the device answers as it always did."""
        s = self.settings
        control = self._control()
        linked = control is not None and control.connected
        if not s.enabled or not (linked or self.peers_on):
            return None
        now = self.monotonic() - lag_s
        at = (control.plane_time() if control is not None else self.clock()) - lag_s
        claim = Claim(self.device_id, s.room, turn_id, word, score, signal.level_dbfs,
                      signal.snr_db, at, s.window_ms)
        expected = self.peer.peers_in(s.room) if self.peer is not None and s.peer else set()
        round_ = Round(claim, now, s.window_ms / 1000, linked, expected,
                       asyncio.get_running_loop().create_future(), self)
        self._forget_old(now)
        self.rounds[turn_id] = round_
        if linked:
            assert control is not None
            self._spawn(self._send_control(control, round_))
        if self.peers_on:
            assert self.peer is not None
            self.peer.announce(claim)
            for received, other in self._recent:
                if (other.device_id, other.turn_id) not in self._used:  # not an earlier word's
                    self._match(round_, other, received)
        if not linked and not expected:
            self._resolve(round_, True, self.device_id, "alone")
        else:
            self._peer_progress(round_)
        return round_

    async def _send_control(self, control: ControlChannel, round_: Round) -> None:
        try:
            sent = await control.send_wake(round_.claim.payload())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the link dropped under us: the peers or the window decide
            log.info("wake claim not sent", error=str(exc), turn_id=round_.claim.turn_id)
            sent = False
        if not sent and not round_.result.done():
            round_.control = False
            self._peer_progress(round_)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    # --- results --------------------------------------------------------------------------------------

    def on_control_result(self, turn_id: str, winner_device_id: str) -> None:
        round_ = self.rounds.get(turn_id)
        if round_ is None or round_.result.done():
            log.info("late or unknown wake arbitration ignored", turn_id=turn_id,
                     winner=winner_device_id)
            return
        self._resolve(round_, winner_device_id == self.device_id, winner_device_id, "control")

    def on_peer_claim(self, claim: Claim) -> None:
        """A verified claim from a peer (companion.peers checked its HMAC and freshness)."""
        now = self.monotonic()
        self._recent.append((now, claim))
        for round_ in list(self.rounds.values()):
            if not round_.result.done():
                self._match(round_, claim, now)

    def _match(self, round_: Round, claim: Claim, received: float) -> None:
        # peers compare arrival times, not clocks: without a control plane there is no common
        # clock, and a LAN delivers in milliseconds. A busy device detects late: a claim up to
        # LATE_CLAIM_S away still counts, until this device commits.
        if claim.room != round_.claim.room or claim.device_id == self.device_id:
            return
        if abs(received - round_.started) > max(round_.window_s, LATE_CLAIM_S):
            return
        round_.peer_claims[claim.device_id] = claim
        self._used.append((claim.device_id, claim.turn_id))
        self._peer_progress(round_)

    def _peer_progress(self, round_: Round) -> None:
        """Without the control plane: a better claim loses at once; claims from every known
        peer of the room (all worse) win before the window closes."""
        if round_.control or round_.result.done():
            return
        best = winner([round_.claim, *round_.peer_claims.values()])
        if best.device_id != self.device_id:
            self._resolve(round_, False, best.device_id, "peer")
        elif round_.expected <= set(round_.peer_claims):
            self._resolve(round_, True, self.device_id, "peer")

    def fall_back(self, round_: Round) -> None:
        """No result by the time the answer is due: the peer rule over the claims heard, or,
        without peers, answer (a silent control plane must not silence every device)."""
        if round_.result.done():
            return
        if self.peers_on:
            best = winner([round_.claim, *round_.peer_claims.values()])
            self._resolve(round_, best.device_id == self.device_id, best.device_id, "peer")
        else:
            self._resolve(round_, True, None, "timeout")

    def _resolve(self, round_: Round, won: bool, winner_id: str | None, source: str) -> None:
        waited_ms = round((self.monotonic() - round_.started) * 1000, 1)
        verdict = Verdict(won, winner_id, source, waited_ms)
        round_.result.set_result(verdict)
        claim = round_.claim
        log.info("wake arbitration", turn_id=claim.turn_id, won=won, winner=winner_id,
                 source=source, waited_ms=waited_ms, room=claim.room, snr_db=claim.snr_db,
                 level_dbfs=claim.level_dbfs, peers=sorted(round_.peer_claims))
        self.bus.emit(EventType.WAKE_ARBITRATION, claim.turn_id, won=won, winner=winner_id,
                      source=source, waited_ms=waited_ms, room=claim.room,
                      snr_db=claim.snr_db, level_dbfs=claim.level_dbfs)

    def _forget_old(self, now: float) -> None:
        """Stop taking results for old rounds (a turn that reaches its gate later, after a long
        command, falls back as with no result)."""
        for turn_id, round_ in list(self.rounds.items()):
            if now - round_.started > ROUND_MEMORY_S:
                del self.rounds[turn_id]

    async def aclose(self) -> None:
        for round_ in self.rounds.values():
            if not round_.result.done():
                round_.result.cancel()
        for task in list(self._sends):
            task.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)


# --- the control plane ------------------------------------------------------------------------------------


@dataclass
class PlaneRound:
    room: str
    first_at: float  # control-plane time of the earliest wake
    window_s: float
    first_arrival: float  # control-plane time the first claim arrived
    claims: dict[str, Claim] = field(default_factory=dict)
    winner: Claim | None = None
    timer: asyncio.TimerHandle | None = None


class WakeRounds:
    """The control plane's side: groups claims of one room whose wake times fall within the
    window (or LATE_CLAIM_S: a busy device detects late), decides by the rule and tells each
    claimant. It answers at once when every connected member of the room has claimed (a device
    alone in its room waits for nothing); otherwise at ``decide_at``: the earliest wake plus the
    window (every wake of the round) plus DELIVERY_S (a claim that waits a TCP retransmission
    still counts: deciding sooner made the nearest device lose when its claim was the delayed
    one). A claim that comes after the decision is told the same winner: one answer matters
    more than the best one."""

    def __init__(self, send: Callable[[str, dict[str, Any]], Awaitable[None]],
                 members: Callable[[str], set[str]], *,
                 clock: Callable[[], float] = time.time) -> None:
        self._send = send
        self._members = members
        self.clock = clock
        self.rounds: list[PlaneRound] = []
        self.last_winner: dict[str, tuple[str, float]] = {}  # room → (device, time)
        self.decisions: list[dict[str, Any]] = []  # recent decisions (diagnostics, tests)
        self._tasks: set[asyncio.Task] = set()

    async def claim(self, claim: Claim) -> None:
        now = self.clock()
        self.rounds = [r for r in self.rounds if now - r.first_at < ROUND_MEMORY_S]
        # one claim per device and round: a device's second claim is a new wake word
        round_ = next((r for r in self.rounds if r.room == claim.room
                       and claim.device_id not in r.claims
                       and abs(claim.at - r.first_at) <= max(r.window_s, LATE_CLAIM_S)), None)
        if round_ is None:
            round_ = PlaneRound(claim.room, claim.at, claim.window_ms / 1000, now)
            self.rounds.append(round_)
        round_.first_at = min(round_.first_at, claim.at)
        round_.claims[claim.device_id] = claim
        if round_.winner is not None:
            await self._tell(round_, claim)
            return
        if self._members(claim.room) <= set(round_.claims):
            await self._decide(round_)
            return
        if round_.timer is None:
            round_.timer = asyncio.get_running_loop().call_later(
                max(0.0, self.decide_at(round_) - now), lambda: self._spawn(self._decide(round_)))

    @staticmethod
    def decide_at(round_: PlaneRound) -> float:
        """When a round with a silent member is decided (control-plane clock). The earliest
        wake is taken from the claims' ``at`` but kept within DELIVERY_S before the first
        arrival: a device's estimate of this clock can be off (110 ms seen on a loaded
        machine), and a wake cannot come after its claim arrived."""
        earliest = min(round_.first_arrival,
                       max(round_.first_at, round_.first_arrival - DELIVERY_S))
        return earliest + round_.window_s + DELIVERY_S

    async def _decide(self, round_: PlaneRound) -> None:
        if round_.winner is not None:
            return
        if round_.timer is not None:
            round_.timer.cancel()
        round_.winner = best = winner(list(round_.claims.values()))
        self.last_winner[round_.room] = (best.device_id, self.clock())
        decision = {"room": round_.room, "winner_device_id": best.device_id,
                    "claims": {d: c.rank[:3] for d, c in round_.claims.items()},
                    "decided_at": self.clock()}
        self.decisions.append(decision)
        del self.decisions[:-100]
        log.info("wake arbitration", **decision)
        for claim in list(round_.claims.values()):
            await self._tell(round_, claim)

    async def _tell(self, round_: PlaneRound, claim: Claim) -> None:
        assert round_.winner is not None
        await self._send(claim.device_id, {"turn_id": claim.turn_id,
                                           "winner_device_id": round_.winner.device_id})

    def nearest(self, room: str) -> str | None:
        """The device that last won a wake word in the room: the one nearest the user."""
        last = self.last_winner.get(room)
        return last[0] if last else None

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
