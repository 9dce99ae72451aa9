"""Two daemons (App, fakes for the models) hear one wake word at different levels, linked to
the real dev control plane on loopback: exactly one answers, the other stops silently."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np

from companion.events import EventType, PipelineState
from tests.conftest import until
from tests.control_helpers import control_plane, linked_device, url
from tests.fakes import BLOCK, FakeChatModel, FakeSpeaker, speech_block

BLOCK_SAMPLES = 480
ADMIN = "room-admin"


def clip(gain_db: float, seed: int) -> list[bytes]:
    """Room noise, a 0.8 s 'wake word' ending in the block FakeWake fires on, a question,
    then silence that ends it."""
    rng = np.random.default_rng(seed)
    amplitude = 0.3 * 10 ** (gain_db / 20) * 32767
    t = np.arange(BLOCK_SAMPLES) / 16000

    def noisy(signal: np.ndarray) -> bytes:
        return np.clip(signal + rng.normal(0, 30, BLOCK_SAMPLES), -32768, 32767).astype(
            np.int16).tobytes()

    noise = [noisy(np.zeros(BLOCK_SAMPLES)) for _ in range(40)]
    word = [noisy(amplitude * np.sin(2 * np.pi * 440 * (t + i * 0.03))) for i in range(27)]
    word[-1] = b"WAKE" + word[-1][4:]
    return noise + word + [speech_block()] * 20 + [BLOCK] * 40


class GatedMic:
    """A microphone that starts when the test opens the gate (both devices hear at once)."""

    def __init__(self, blocks: list[bytes], gate: asyncio.Event) -> None:
        self._blocks, self._gate = blocks, gate
        self.name, self.dropped_blocks, self.last_block_at = "gated-mic", 0, 0.0

    async def blocks(self) -> AsyncIterator[bytes]:
        await self._gate.wait()
        for block in self._blocks:
            await asyncio.sleep(0.002)
            yield block


@contextlib.asynccontextmanager
async def device(stack: contextlib.AsyncExitStack, tmp_path: Path, plane, name: str,
                 gain_db: float, gate: asyncio.Event, *, room: str = "hall",
                 window_ms: int = 200):
    app, _link = await stack.enter_async_context(linked_device(
        tmp_path, url(plane), name, source=GatedMic(clip(gain_db, len(name)), gate),
        llm=FakeChatModel(), sink=FakeSpeaker(),
        settings_extra={"arbitration": {"room": room, "window_ms": window_ms}}))
    await app.start_arbitration()
    events = []
    app.bus.add_callback(events.append)
    yield app, events


def types(events) -> list[EventType]:
    return [e.type for e in events]


async def test_two_daemons_one_wake_word_exactly_one_answers(tmp_path: Path):
    gate = asyncio.Event()
    async with control_plane(admin_token=ADMIN) as plane, contextlib.AsyncExitStack() as stack:
        devices = {}
        for name, gain in (("kitchen", -6.0), ("hall", 0.0)):
            devices[name] = await stack.enter_async_context(
                device(stack, tmp_path, plane, name, gain, gate))
        await plane.wait_for(lambda: plane.room_members("hall") == {"kitchen", "hall"}, 5)
        gate.set()
        (_hall, hall_events), (kitchen, kitchen_events) = devices["hall"], devices["kitchen"]
        await until(lambda: EventType.TURN_END in types(hall_events), 10)
        await until(lambda: EventType.TURN_CANCELLED in types(kitchen_events), 10)
        verdicts = {name: next(e.data for e in ev if e.type is EventType.WAKE_ARBITRATION)
                    for name, (_, ev) in devices.items()}
        assert verdicts["hall"]["won"] and not verdicts["kitchen"]["won"]
        assert verdicts["kitchen"]["winner"] == "hall" and verdicts["hall"]["source"] == "control"
        assert verdicts["hall"]["snr_db"] > verdicts["kitchen"]["snr_db"] + 3
        # the winner answered; the loser never thought, spoke or recorded anything
        assert EventType.PLAYBACK_START in types(hall_events)
        for silent in (EventType.LLM_START, EventType.PLAYBACK_START, EventType.STT_START,
                       EventType.EXCHANGE_RECORDED):
            assert silent not in types(kitchen_events)
        assert kitchen.status.pipeline_state is PipelineState.IDLE
        decision = plane.wake_rounds.decisions[-1]
        assert decision["winner_device_id"] == "hall" and set(decision["claims"]) == {
            "hall", "kitchen"}
        await _announcements_go_to_the_nearest_or_all(plane)
        # both claims reached the plane with the fields of SPEC §9, on its clock
        for name in ("hall", "kitchen"):
            message = plane.messages(name, "wake_detected")[0]
            sent = message["payload"]
            assert {"turn_id", "word", "score", "level_dbfs", "snr_db", "at"} <= set(sent)
            assert abs(sent["at"] - message["received_at"]) < 5


async def test_a_device_alone_in_its_room_is_not_held_by_the_window(tmp_path: Path):
    gate = asyncio.Event()
    async with control_plane() as plane, contextlib.AsyncExitStack() as stack:
        _, attic_events = await stack.enter_async_context(
            device(stack, tmp_path, plane, "attic", 0.0, gate, room="attic", window_ms=2000))
        await stack.enter_async_context(  # another room hears it too: not a rival
            device(stack, tmp_path, plane, "porch", 6.0, gate, room="porch", window_ms=2000))
        await plane.wait_for(lambda: plane.room_members("attic") == {"attic"}, 5)
        gate.set()
        await until(lambda: EventType.TURN_END in types(attic_events), 10)
        verdict = next(e.data for e in attic_events if e.type is EventType.WAKE_ARBITRATION)
        # a 2 s window: waiting for it (on the device or the plane) would show as ≥ 1000 ms
        assert verdict["won"] and verdict["source"] == "control" and verdict["waited_ms"] < 1000


async def _announcements_go_to_the_nearest_or_all(plane) -> None:
    """POST /rooms/{room}/announce: the nearest is the device that last won a wake word."""
    base = f"http://127.0.0.1:{plane.port}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as http:
        async def announce(room: str, body: dict) -> tuple[int, dict]:
            async with http.post(f"{base}/rooms/{room}/announce", json=body) as response:
                return response.status, await response.json()

        status, sent = await announce("hall", {"payload": {"text": "Lunch!"}})
        assert status == 202 and sent["target"] == "nearest" and set(sent["commands"]) == {"hall"}
        status, sent = await announce("hall", {"payload": {"text": "Fire drill."},
                                               "target": "all", "type": "broadcast"})
        assert status == 202 and set(sent["commands"]) == {"hall", "kitchen"}
        assert (await announce("hall", {"target": "some"}))[0] == 422
        assert (await announce("attic", {"payload": {"text": "hi"}}))[0] == 404
    assert [c["type"] for c in plane.commands("kitchen")] == ["broadcast"]
