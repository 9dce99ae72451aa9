"""The whole daemon on the real models in simulated rooms (companion/room.py): barge-in over
the device's own voice, and the device saying its wake word."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from companion.app import Features, build_app
from companion.devices.audio import read_wav_16k_mono, write_wav
from companion.events import EventType
from companion.room import Room, RoomConfig
from scripts.make_utterance_wav import make
from tests.conftest import make_settings
from tests.test_simulate_real import companion

pytestmark = pytest.mark.models


def events_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_wake_word_over_the_reply_cuts_it_and_starts_a_new_turn(tmp_path):
    first = read_wav_16k_mono(make(tmp_path / "a.wav", wake="Hey Jarvis.",
                                   text="What is the capital of France?", tail_s=0.0))
    second = read_wav_16k_mono(make(tmp_path / "b.wav", wake="Hey Jarvis.",
                                    text="What time is it?", lead_s=0.0, tail_s=2.0))
    # in a fast simulation the room's clock stands still while the device thinks, so the
    # reply starts ~0.6 s (the end-of-speech window) after the question: the second wake word
    # begins 0.3 s into the reply
    wav = tmp_path / "barge.wav"
    write_wav(wav, first + bytes(2 * int(0.9 * 16000)) + second)
    events_path = tmp_path / "events.jsonl"
    result = companion("simulate", "--input", str(wav), "--output", str(tmp_path / "out.wav"),
                       "--events", str(events_path), "--fast", "--room-echo-db", "6",
                       "--room-seed", "3", timeout=420)  # a loaded CI machine warms personas slowly
    assert result.returncode == 0, result.stderr[-2000:]
    events = events_of(events_path)
    kinds = [e["type"] for e in events]
    assert kinds.count("wake-detected") == 2 and "turn-cancelled" in kinds
    cut = next(e for e in events if e["type"] == "reply-interrupted")
    reply = next(e for e in events if e["type"] == "llm-sentence" and e["turn_id"] == cut["turn_id"])
    assert cut["played"] and reply["text"].startswith(cut["played"].rstrip("…").split("…")[0])
    last = [e for e in events if e["type"] == "stt-end"][-1]
    assert "time" in last["text"].lower() and last["turn_id"] != cut["turn_id"]


async def test_the_device_saying_its_wake_word_does_not_wake_it(tmp_path):
    settings = make_settings(tmp_path, audio={"echo_cancel": "off"})  # no AEC: the worst case
    room = Room(RoomConfig(echo_db=6.0, seed=2), bytes(2 * 16000), realtime=False)
    app = build_app(settings, source=room.source(), sink=room.speaker, features=Features(
        audio_devices=False, http=False, control=False, gpio=False, warm_personas=False))
    seen: list = []
    app.bus.add_callback(seen.append)
    await app.start()
    app.voice.hears_itself = True
    room.linger = lambda: app.speech.speaking
    voice = app.conversation.active_persona.voice_config.params()
    pump = asyncio.create_task(app.voice.run())
    try:
        async with asyncio.timeout(60):
            await app.speech.say("To wake me, say hey Jarvis. Hey Jarvis, what time is it?", voice)
            await pump
    finally:
        pump.cancel()
        await app.aclose()
    kinds = [e.type for e in seen]
    assert EventType.WAKE_DETECTED not in kinds and EventType.TURN_START not in kinds
    assert EventType.SELF_WAKE_IGNORED in kinds  # it did hear it, and knew it was itself


def test_a_question_in_a_noisy_room_is_heard_transcribed_and_answered(tmp_path):
    """The whole daemon (real wake word, VAD, Whisper, LLM, piper) in a room with pink noise
    15 dB under the user and the echo path on: the question is transcribed and answered."""
    clip = make(tmp_path / "q.wav", wake="Hey Jarvis.", text="What is the capital of France?")
    events_path = tmp_path / "events.jsonl"
    result = companion("simulate", "--input", str(clip), "--output", str(tmp_path / "out.wav"),
                       "--events", str(events_path), "--fast", "--room-noise", "pink",
                       "--room-snr-db", "15", "--room-seed", "4",
                       env={"COMPANION_PIPELINE__FOLLOW_UP_WINDOW_S": "0"}, timeout=420)
    assert result.returncode == 0, result.stderr[-2000:]
    events = events_of(events_path)
    heard = [e for e in events if e["type"] == "stt-end"]
    assert len(heard) == 1 and {"capital", "france"} <= set(
        heard[0]["text"].lower().replace("?", " ").replace(",", " ").split()), heard
    ends = [e for e in events if e["type"] == "speech-end"]
    assert ends and ends[0]["speech_s"] < 6.0, ends  # the noise did not hold the turn open
    assert any(e["type"] == "playback-start" for e in events)
    assert any(e["type"] == "exchange-recorded" for e in events)
