"""The simulated room: deterministic, levels as asked, and an echo that is what was played."""

from __future__ import annotations

import asyncio
import wave

import numpy as np
import pytest

from companion.__main__ import main
from companion.room import (
    PLAYBACK_LEVEL_DBFS,
    USER_LEVEL_DBFS,
    Room,
    RoomConfig,
    RoomError,
    active_level_db,
)
from companion.stages.tts import AudioClip

RATE = 16000


def tone_speech(seconds: float, freq: float = 300.0, amp: float = 8000.0) -> bytes:
    """A stand-in for speech: a tone switched on and off four times a second."""
    t = np.arange(int(seconds * RATE)) / RATE
    gate = (np.sin(2 * np.pi * 2 * t) > 0).astype(float)
    return (amp * gate * np.sin(2 * np.pi * freq * t)).astype(np.int16).tobytes()


def speechlike(seconds: float, seed: int) -> bytes:
    """Modulated, band-limited noise: broadband like a voice (a room's response to one tone
    is one point of its comb of modes, far from its average)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    env = 0.3 + 0.7 * (np.sin(2 * np.pi * 3 * np.arange(n) / RATE) > -0.3)
    x = np.convolve(rng.standard_normal(n) * env, np.ones(6) / 6, "same")
    return (x / np.abs(x).max() * 12000).astype(np.int16).tobytes()


def run_mic(room: Room, blocks: int) -> np.ndarray:
    async def collect() -> list[bytes]:
        out = []
        async for block in room.source().blocks():
            out.append(block)
            if len(out) == blocks:
                break
        return out

    pcm = b"".join(asyncio.run(collect()))
    return np.frombuffer(pcm, np.int16).astype(np.float64)


def test_same_seed_same_room_byte_for_byte() -> None:
    user = tone_speech(1.0)
    make = lambda seed: Room(RoomConfig(noise="pink", seed=seed), user, realtime=False)  # noqa: E731
    a, b, c = (run_mic(make(s), 30) for s in (7, 7, 8))
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


@pytest.mark.parametrize("kind", ["white", "pink"])
def test_noise_at_the_asked_snr(kind: str) -> None:
    room = Room(RoomConfig(noise=kind, snr_db=10.0, rt60=0.0), tone_speech(2.0), realtime=False,
                record=True)
    run_mic(room, 66)
    parts = room.components()
    user_db = active_level_db(parts["user"])
    noise_db = 10 * np.log10((parts["noise"] ** 2).mean() / 32768**2)
    assert user_db is not None and abs((user_db - noise_db) - 10.0) < 1.0


async def _play_and_hear(room: Room, clip: AudioClip, *, stop_after_blocks: int | None):
    """Play ``clip`` on the room's speaker while reading the microphone; optionally stop
    playback (barge-in) after some blocks. Returns the echo the microphone heard."""
    mic = room.source().blocks()
    play = asyncio.create_task(room.speaker.play(clip))
    await asyncio.sleep(0)
    n = 0
    async with asyncio.timeout(10):
        while n < 60:
            await anext(mic)
            n += 1
            if stop_after_blocks is not None and n == stop_after_blocks:
                play.cancel()
        await asyncio.gather(play, return_exceptions=True)
    await mic.aclose()
    return room.components()["echo"]


def test_echo_is_what_was_played_at_its_level_and_stops_with_playback() -> None:
    user = tone_speech(3.0)
    voice = AudioClip(speechlike(1.2, 3), RATE)
    voice_db = active_level_db(np.frombuffer(voice.pcm, np.int16))
    assert voice_db is not None
    cfg = RoomConfig(echo_db=6.0, delay_ms=30.0, rt60=0.2)
    full = asyncio.run(_play_and_hear(Room(cfg, user, realtime=False, record=True), voice,
                                      stop_after_blocks=None))
    cut = asyncio.run(_play_and_hear(Room(cfg, user, realtime=False, record=True), voice,
                                     stop_after_blocks=10))
    # nothing before the delay (FFT round-off aside), then the played audio
    assert np.abs(full[: int(0.029 * RATE)]).max() < 1e-6
    echo_db = active_level_db(full)
    assert echo_db is not None
    # +6 dB over the user (-26 dBFS) for the nominal voice (-19 dBFS), following the volume
    expected = USER_LEVEL_DBFS + 6 + (voice_db - PLAYBACK_LEVEL_DBFS)
    assert abs(echo_db - expected) < 1.5
    # barge-in after 10 blocks (0.3 s): the echo dies out with the room's reverb tail
    after = cut[int(0.3 * RATE) + int(0.03 * RATE) + int(0.2 * RATE) + 500:]
    assert np.abs(after).max() < 1.0
    assert np.abs(full[int(0.7 * RATE):int(1.0 * RATE)]).max() > 100


@pytest.mark.parametrize("argv, message", [
    (["--room-noise", "traffic"], "--room-noise 'traffic'"),
    (["--room-echo-db", "loud"], "--room-echo-db 'loud'"),
    (["--room-rt60", "9"], "--room-rt60 9.0 is out of range"),
    (["--room-snr-db", "nan"], "--room-snr-db nan is out of range"),
    (["--room-seed", "-1"], "--room-seed -1 is out of range"),
    (["--room-noise", "missing.wav"], "no such WAV file"),
])
def test_bad_room_options_one_line_exit_2(tmp_path, capsys, argv, message) -> None:
    wav = tmp_path / "in.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(tone_speech(0.5))
    code = main(["simulate", "--input", str(wav), "--output", str(tmp_path / "o.wav"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err


def test_unreadable_noise_wav_is_a_room_error(tmp_path) -> None:
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"not a wav")
    with pytest.raises(RoomError, match="not a readable PCM WAV"):
        Room(RoomConfig(noise=str(bad)), tone_speech(0.5), realtime=False)
