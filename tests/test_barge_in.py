"""While the device speaks: barge-in keeps only what was heard, the device's own wake word
does not wake it, and barge-in by voice waits for a converged canceller (fakes; the real
models do the same in tests/test_room_real.py)."""

from __future__ import annotations

import asyncio

from companion.devices.echo import EchoControl, PlaybackReference
from companion.events import EventType
from tests.conftest import fake_app, make_settings, until
from tests.fakes import BLOCK, FakeChatModel, FakeMic, FakeSpeaker, speech_block, wake_block
from tests.test_pipeline import UTTERANCE, collect, run_mic

LONG = " ".join(f"Sentence number {n} has a few more words." for n in range(1, 17))


async def test_barge_in_keeps_only_what_was_played_marked_interrupted(tmp_path):
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    mic = FakeMic(UTTERANCE[:-40] + [BLOCK] * 4000, delay_s=0.005)
    app = fake_app(settings, source=mic, sink=FakeSpeaker(realtime=True, speed=2),
                   llm=FakeChatModel(LONG))
    events = collect(app)
    await app.start()
    pump = asyncio.create_task(app.voice.run())
    try:
        # the talk button while the second sentence plays (the wake word does the same)
        await until(lambda: sum(e.type is EventType.PLAYBACK_START for e in events) >= 2, 10)
        app.voice.start_turn(trigger="button")  # what the talk button does
        await until(lambda: any(e.type is EventType.REPLY_INTERRUPTED for e in events), 10)
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
    cut = next(e for e in events if e.type is EventType.REPLY_INTERRUPTED)
    played = cut.data["played"]
    session = app.store.get_session(cut.data["session_id"])
    reply = [m for m in session.messages if m.turn_id == cut.turn_id and m.role == "assistant"]
    assert len(reply) == 1 and reply[0].content == played
    assert reply[0].latency["interrupted"] == 1
    first = LONG.split(". ")[0] + "."
    assert played.startswith(first) and len(played) < len(LONG) / 2
    assert LONG.startswith(played.rstrip("…"))
    await app.aclose()


async def test_the_device_saying_the_wake_word_does_not_wake_it(tmp_path):
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    # the microphone "hears" the wake word while the reply that says it plays
    blocks = UTTERANCE[:-40] + [BLOCK] * 30 + [wake_block()] + [BLOCK] * 80
    reply = "Just say hey Jarvis whenever you need me. " * 3
    app = fake_app(settings, source=FakeMic(blocks, delay_s=0.005),
                   sink=FakeSpeaker(realtime=True, speed=2), llm=FakeChatModel(reply))
    events = collect(app)
    await app.start()
    await run_mic(app, limit_s=10)
    kinds = [e.type for e in events]
    assert kinds.count(EventType.WAKE_DETECTED) == 1
    assert EventType.SELF_WAKE_IGNORED in kinds and EventType.TURN_CANCELLED not in kinds
    await app.aclose()


def _system_echo(converged: bool) -> EchoControl:
    """The sound server's canceller (converged), or none (never trusted)."""
    if converged:
        return EchoControl("system", PlaybackReference(), probe_system=lambda: "echo-cancel-source")
    return EchoControl("off", PlaybackReference(), probe_system=lambda: None)


async def _speech_over_reply(tmp_path, *, barge_in: str, converged: bool):
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0, "barge_in": barge_in})
    blocks = UTTERANCE[:-40] + [BLOCK] * 60 + [speech_block()] * 25 + [BLOCK] * 60
    app = fake_app(settings, source=FakeMic(blocks, delay_s=0.005),
                   sink=FakeSpeaker(realtime=True, speed=4), llm=FakeChatModel(LONG))
    events = collect(app)
    await app.start()
    app.voice.echo = _system_echo(converged)
    await run_mic(app, limit_s=10)
    app.voice.echo.close()
    await app.aclose()
    return [e.data.get("trigger") for e in events if e.type is EventType.TURN_START]


async def test_speech_barges_in_once_the_canceller_has_converged(tmp_path):
    assert await _speech_over_reply(tmp_path, barge_in="speech", converged=True) == ["wake", "speech"]


async def test_speech_does_not_barge_in_before_convergence_or_in_wake_mode(tmp_path):
    assert await _speech_over_reply(tmp_path, barge_in="speech", converged=False) == ["wake"]
    assert await _speech_over_reply(tmp_path / "w", barge_in="wake", converged=True) == ["wake"]
