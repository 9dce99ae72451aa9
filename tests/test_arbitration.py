"""Several devices, one wake word (issue 13): the signal measure, the rule, the control plane's
rounds, the signed peer transport over real UDP multicast on loopback, and daemons (fakes for
the models) linked to the real dev control plane where exactly one answers."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np
import pytest

from companion.arbitration import (
    DELIVERY_S,
    SILENCE_DBFS,
    Arbiter,
    Claim,
    WakeRounds,
    WakeSignal,
    measure_wake,
    winner,
)
from companion.events import EventBus, EventType
from companion.peers import PeerTransport, sign
from companion.settings import ArbitrationSettings
from tests.conftest import until

RATE = 16000
SECRET = "a-shared-group-secret"


def tone(seconds: float, amplitude: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return amplitude * np.sin(2 * np.pi * freq * t)


def pcm(signal: np.ndarray) -> bytes:
    return np.clip(signal * 32768, -32768, 32767).astype(np.int16).tobytes()


def heard(gain_db: float, noise: float = 0.001, seed: int = 0) -> bytes:
    """2 s of room noise, then a 0.8 s 'word' 3 dB apart per gain step, noise throughout."""
    rng = np.random.default_rng(seed)
    word = np.concatenate([np.zeros(2 * RATE), tone(0.8, 0.3 * 10 ** (gain_db / 20)),
                           np.zeros(int(0.2 * RATE))])
    return pcm(word + rng.normal(0, noise, len(word)))


# --- the signal ------------------------------------------------------------------------------------


def test_level_follows_the_gain_and_snr_the_distance_to_the_noise_floor():
    near, far = measure_wake(heard(0)), measure_wake(heard(-6))
    assert near.level_dbfs == pytest.approx(-13.5, abs=1.0)  # a 0.3 sine: 20·log10(0.3/√2)
    assert near.level_dbfs - far.level_dbfs == pytest.approx(6.0, abs=0.5)
    assert near.snr_db - far.snr_db == pytest.approx(6.0, abs=1.0)
    assert near.snr_db == pytest.approx(near.level_dbfs - (-60), abs=2.0)  # noise σ 0.001: -60 dBFS
    noisy = measure_wake(heard(0, noise=0.01))
    assert noisy.level_dbfs == pytest.approx(near.level_dbfs, abs=0.5)
    assert noisy.snr_db == pytest.approx(near.snr_db - 20, abs=2.0)


def test_silence_and_short_audio_measure_without_errors():
    assert measure_wake(b"") == measure_wake(b"\x00") == measure_wake(b"\x00" * 10)
    assert measure_wake(b"").level_dbfs == SILENCE_DBFS and measure_wake(b"").snr_db == 0.0
    silent = measure_wake(bytes(2 * RATE * 2))
    assert silent.level_dbfs == SILENCE_DBFS and silent.snr_db == 0.0
    word_only = measure_wake(pcm(tone(0.5, 0.3)))  # no audio before the word: its own floor
    assert word_only.level_dbfs > -20


# --- the rule --------------------------------------------------------------------------------------


def claim(device: str, snr: float, level: float = -20.0, score: float = 0.9, *, at: float = 100.0,
          room: str = "hall", turn: str | None = None) -> Claim:
    return Claim(device, room, turn or f"turn_{device}", "hey_jarvis", score, level, snr, at)


def test_best_snr_wins_then_level_then_score_then_device_id():
    assert winner([claim("a", 30), claim("b", 31, level=-40)]).device_id == "b"
    assert winner([claim("a", 30, level=-20), claim("b", 30, level=-25)]).device_id == "a"
    assert winner([claim("a", 30, score=0.7), claim("b", 30, score=0.8)]).device_id == "b"
    assert winner([claim("a", 30), claim("b", 30)]).device_id == "b"
    # compared as sent on the wire: a difference lost in rounding is a tie, for every peer alike
    assert claim("a", 30.04).snr_db == claim("b", 29.96).snr_db == 30.0


def test_a_claim_round_trips_through_its_payload():
    original = claim("kitchen", 31.26, level=-22.44, score=0.91234)
    assert Claim.from_payload("kitchen", original.payload()) == original


# --- the control plane's rounds --------------------------------------------------------------------


class Plane:
    """WakeRounds with its sends recorded and a settable room membership and clock."""

    def __init__(self, members: dict[str, set[str]]) -> None:
        self.members = members
        self.now = 100.0
        self.sent: list[tuple[str, dict]] = []
        self.rounds = WakeRounds(self.send, lambda room: self.members.get(room, set()),
                                 clock=lambda: self.now)

    async def send(self, device: str, payload: dict) -> None:
        self.sent.append((device, payload))


async def test_a_device_alone_in_its_room_is_answered_at_once():
    plane = Plane({"hall": {"a"}, "kitchen": {"b", "c"}})
    await plane.rounds.claim(claim("a", 20))
    assert plane.sent == [("a", {"turn_id": "turn_a", "winner_device_id": "a"})]


async def test_the_round_closes_when_every_member_has_claimed():
    plane = Plane({"hall": {"a", "b", "c"}})
    await plane.rounds.claim(claim("a", 20, at=100.00))
    await plane.rounds.claim(claim("b", 26, at=100.05))
    assert plane.sent == []
    await plane.rounds.claim(claim("c", 23, at=100.03))
    assert sorted(plane.sent, key=lambda s: s[0]) == [
        (d, {"turn_id": f"turn_{d}", "winner_device_id": "b"}) for d in ("a", "b", "c")]
    assert plane.rounds.nearest("hall") == "b"


async def test_a_silent_member_costs_the_window_and_a_delivery_and_a_later_claim_loses():
    plane = Plane({"hall": {"a", "b", "c"}})
    plane.now = 100.0
    await plane.rounds.claim(claim("a", 20, at=100.0))  # decided at 100 + 0.2 + DELIVERY_S
    assert plane.rounds.decide_at(plane.rounds.rounds[0]) == pytest.approx(100.0 + 0.2 + DELIVERY_S)
    await until(lambda: plane.sent, 2, what="the round's timer decided")
    assert plane.sent == [("a", {"turn_id": "turn_a", "winner_device_id": "a"})]
    await plane.rounds.claim(claim("b", 40, at=100.18))  # better, but after the decision
    assert plane.sent[-1] == ("b", {"turn_id": "turn_b", "winner_device_id": "a"})
    plane.members["hall"] = {"c"}
    await plane.rounds.claim(claim("c", 10, at=101.5))  # 1.5 s later: another wake word
    assert plane.sent[-1] == ("c", {"turn_id": "turn_c", "winner_device_id": "c"})


async def test_a_claim_that_waited_a_tcp_retransmission_still_wins():
    """The nearest device's claim lost a segment: it arrives 300 ms after the first, its wake
    within the window. Deciding at 3/4 of the window (as once) made it lose."""
    plane = Plane({"hall": {"a", "b", "c"}})  # c never hears the word
    plane.now = 100.0
    await plane.rounds.claim(claim("a", 20, at=100.0))
    plane.now = 100.3
    await plane.rounds.claim(claim("b", 32, at=100.05))
    assert plane.sent == []
    await until(lambda: len(plane.sent) == 2, 2, what="the round's timer decided")
    assert {p["winner_device_id"] for _, p in plane.sent} == {"b"}


async def test_a_clock_estimate_off_by_half_a_second_does_not_close_the_round_early():
    plane = Plane({"hall": {"a", "b", "c"}})
    plane.now = 100.0
    await plane.rounds.claim(claim("a", 20, at=99.5))  # a's idea of the plane's clock is early
    assert plane.rounds.decide_at(plane.rounds.rounds[0]) == pytest.approx(
        100.0 - DELIVERY_S + 0.2 + DELIVERY_S)  # at most one delivery before its arrival
    plane.now = 100.1
    await plane.rounds.claim(claim("b", 32, at=100.05))
    await until(lambda: len(plane.sent) == 2, 2, what="the round's timer decided")
    assert {p["winner_device_id"] for _, p in plane.sent} == {"b"}


async def test_rooms_are_arbitrated_apart():
    plane = Plane({"hall": {"a"}, "kitchen": {"b"}})
    await plane.rounds.claim(claim("a", 20, room="hall"))
    await plane.rounds.claim(claim("b", 10, room="kitchen"))
    assert {d: p["winner_device_id"] for d, p in plane.sent} == {"a": "a", "b": "b"}


# --- peers over real UDP multicast on loopback -----------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_settings(port: int, room: str = "hall", **extra) -> ArbitrationSettings:
    return ArbitrationSettings(room=room, peer=True, secret=SECRET, peer_port=port,
                               peer_interface="127.0.0.1", **extra)


async def peer_device(name: str, settings: ArbitrationSettings, *, control=None,
                      impair=None) -> tuple[Arbiter, PeerTransport, EventBus]:
    bus = EventBus()
    arbiter = Arbiter(lambda: settings, name, bus, control=lambda: control)
    peer = PeerTransport(lambda: settings, name, on_claim=arbiter.on_peer_claim, impair=impair)
    await peer.start()
    arbiter.peer = peer
    return arbiter, peer, bus


@pytest.fixture
async def peer_pair():
    port = free_udp_port()
    devices = [await peer_device(name, peer_settings(port)) for name in ("kitchen", "hall")]
    try:
        # each learns of the other from the hellos sent at start
        await until(lambda: all(p.peers_in("hall") for _, p, _ in devices), 5)
        yield devices, port
    finally:
        for arbiter, peer, _ in devices:
            peer.close()
            await arbiter.aclose()


async def test_peers_pick_the_better_device_and_the_loser_knows_at_once(peer_pair):
    (kitchen, _, _), (hall, _, _) = peer_pair[0]
    async with asyncio.timeout(2):
        k = kitchen.begin("t-k", "hey_jarvis", 0.9, WakeSignal(-20.0, 35.0))
        h = hall.begin("t-h", "hey_jarvis", 0.9, WakeSignal(-26.0, 29.0))
        assert k is not None and h is not None
        won, lost = await k.commit(), await h.commit()
    assert won.won and won.source == "peer" and won.winner_device_id == "kitchen"
    assert not lost.won and lost.winner_device_id == "kitchen"
    assert won.waited_ms < 150 and lost.waited_ms < 150  # both heard all known peers


async def test_forged_replayed_and_stale_announcements_are_ignored(peer_pair):
    devices, port = peer_pair
    (_kitchen, kitchen_peer, _), (_hall, hall_peer, _) = devices
    got: list[Claim] = []
    hall_peer.on_claim = got.append
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    group = (hall_peer.settings.peer_group, port)

    def claim_message(secret: str, **changes) -> bytes:
        message = {"v": 1, "kind": "wake", "device_id": "intruder", "room": "hall",
                   "ts": kitchen_peer.clock(), "nonce": "n-" + str(len(changes)) + secret[:3],
                   "turn_id": "t-x", "word": "hey_jarvis", "score": 1.0, "level_dbfs": 0.0,
                   "snr_db": 99.0, "at": 0.0, "window_ms": 200, **changes}
        message["mac"] = sign(secret.encode(), message)
        return json.dumps(message).encode()

    before = dict(hall_peer.rejected)
    sender.sendto(claim_message("not-the-group-secret"), group)  # a stranger
    genuine = claim_message(SECRET)
    sender.sendto(genuine, group)
    sender.sendto(genuine, group)  # replayed
    sender.sendto(claim_message(SECRET, ts=kitchen_peer.clock() - 120, nonce="old"), group)
    tampered = json.loads(genuine)
    tampered["snr_db"] = 120.0
    sender.sendto(json.dumps(tampered).encode(), group)
    sender.sendto(b"\xff not json", group)
    sender.close()
    await until(lambda: sum(hall_peer.rejected.values()) - sum(before.values()) >= 5, 5)
    assert [c.device_id for c in got] == ["intruder"]  # only the genuine one, once
    gained = {k: v - before.get(k, 0) for k, v in hall_peer.rejected.items()}
    assert gained["bad_mac"] == 2 and gained["stale"] == 1 and gained["malformed"] == 1
    assert gained["duplicate"] >= 1


async def test_a_device_alone_in_its_room_answers_with_no_wait(peer_pair):
    (_kitchen, _, _), _ = peer_pair[0]
    settings = peer_settings(peer_pair[1], room="attic")
    attic, peer, _ = await peer_device("attic", settings)
    try:
        attic.monotonic = lambda: 7.0  # time stands still: any wait would be a later call
        round_ = attic.begin("t-a", "hey_jarvis", 0.9, WakeSignal(-30.0, 20.0))
        assert round_ is not None and round_.result.done()  # decided inside begin()
        verdict = round_.result.result()
        assert verdict.won and verdict.source == "alone" and verdict.waited_ms == 0
    finally:
        peer.close()
        await attic.aclose()


async def test_without_link_or_peers_there_is_no_round():
    settings = ArbitrationSettings(room="hall")
    arbiter = Arbiter(lambda: settings, "solo", EventBus())
    assert arbiter.begin("t", "hey_jarvis", 0.9, WakeSignal(-20.0, 30.0)) is None


def test_peer_mode_needs_a_secret():
    with pytest.raises(ValueError, match=r"arbitration\.secret"):
        ArbitrationSettings(peer=True)
    assert "a-shared" not in repr(peer_settings(1))


async def test_a_bus_event_and_log_record_every_verdict(peer_pair):
    (kitchen, _, bus), _ = peer_pair[0]
    events = []
    bus.add_callback(lambda e: events.append(e) if e.type is EventType.WAKE_ARBITRATION else None)
    round_ = kitchen.begin("t-e", "hey_jarvis", 0.9, WakeSignal(-20.0, 30.0))
    assert round_ is not None
    async with asyncio.timeout(2):
        await round_.commit()
    assert events and events[0].turn_id == "t-e" and events[0].data["won"] is True


class QuietLink:
    """A connected control link whose plane answers only when the test says so."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def plane_time(self) -> float:
        return 1000.0

    async def send_wake(self, payload: dict) -> bool:
        self.sent.append(payload)
        return True


def linked_arbiter() -> tuple[list[float], QuietLink, Arbiter]:
    """An arbiter whose claims go to a control plane that never answers, on a clock the test
    moves (``now[0]``)."""
    now = [50.0]
    link = QuietLink()
    settings = ArbitrationSettings(room="hall", window_ms=200)
    arbiter = Arbiter(lambda: settings, "hall-1", EventBus(), control=lambda: link,
                      monotonic=lambda: now[0])
    return now, link, arbiter


async def test_a_late_result_counts_until_the_gate_and_no_result_means_answer():
    now, link, arbiter = linked_arbiter()
    late = arbiter.begin("t-late", "hey_jarvis", 0.9, WakeSignal(-20.0, 30.0))
    silent = arbiter.begin("t-silent", "hey_jarvis", 0.9, WakeSignal(-20.0, 30.0))
    assert late is not None and silent is not None and not late.result.done()
    # the plane decides up to window + DELIVERY_S after the first wake, its verdict may wait
    # a retransmission: the gate waits that long for it
    assert late.deadline_s == pytest.approx(0.2 + 2 * DELIVERY_S)
    await until(lambda: len(link.sent) == 2)  # the claims went out at once
    now[0] += 0.5  # the window has closed; the user is still speaking: no gate yet
    arbiter.on_control_result("t-late", "kitchen-1")
    assert late.result.done()  # the loser's turn stops now, before it answers
    now[0] += 0.25  # past the deadline: no more waiting
    async with asyncio.timeout(2):
        lost, answered = await late.commit(), await silent.commit()
    assert (lost.won, lost.source, lost.winner_device_id) == (False, "control", "kitchen-1")
    assert (answered.won, answered.source) == (True, "timeout")
    arbiter.on_control_result("t-silent", "kitchen-1")  # after the commit: ignored
    assert (await silent.commit()).won
    assert [p["turn_id"] for p in link.sent] == ["t-late", "t-silent"]
    assert link.sent[0]["at"] == 1000.0 and link.sent[0]["room"] == "hall"


def test_the_audio_clock_dates_a_word_heard_by_a_detector_running_behind():
    from companion.arbitration import AudioClock

    now = [0.0]
    clock = AudioClock(0.03, window_blocks=100, clock=lambda: now[0])
    for _ in range(50):  # on time: a block every 30 ms
        now[0] += 0.03
        clock.tick()
    assert clock.lag_s() == pytest.approx(0.0, abs=1e-9)
    now[0] += 1.0  # the detector stalls for a second; the blocks wait in the queue
    for _ in range(10):  # then drains them quickly
        now[0] += 0.001
        clock.tick()
    assert clock.lag_s() == pytest.approx(now[0] - 60 * 0.03)  # block 60 was heard at 1.8 s
    assert clock.lag_s() > 0.7
    assert clock.lag_s(behind_blocks=2) == pytest.approx(clock.lag_s() + 0.06)
    for _ in range(500):  # a WAV read as fast as possible: no lag to speak of, never negative
        now[0] += 0.0001
        clock.tick()
    assert 0.0 <= clock.lag_s() <= AudioClock.MAX_LAG_S


async def test_a_verdict_after_the_window_but_before_the_deadline_keeps_the_loser_quiet():
    """The gate comes 0.45 s after the wake (a short command): the window has closed, the
    plane's verdict is on its way (a retransmission). The loser waits for it instead of
    answering as if alone."""
    now, _link, arbiter = linked_arbiter()
    round_ = arbiter.begin("t1", "hey_jarvis", 0.9, WakeSignal(-30.0, 20.0))
    assert round_ is not None
    now[0] += 0.45
    gate = asyncio.create_task(round_.commit())
    for _ in range(3):  # let the gate run until it waits (it would have answered at once)
        await asyncio.sleep(0)
    assert not gate.done()
    arbiter.on_control_result("t1", "kitchen-1")
    async with asyncio.timeout(2):
        verdict = await gate
    assert (verdict.won, verdict.source) == (False, "control")
