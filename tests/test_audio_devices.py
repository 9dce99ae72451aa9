"""The real sounddevice path, through a private PulseAudio null sink started by the test."""

import asyncio
import time

import numpy as np
import pytest

from companion.devices.audio import AudioUnavailableError, SoundDeviceSink, SoundDeviceSource, find_device
from companion.stages.tts import AudioClip
from tests.conftest import until
from tests.pulse import private_pulseaudio

pytestmark = pytest.mark.audio


@pytest.fixture
def pulse(tmp_path):
    with private_pulseaudio(tmp_path) as env:
        yield env


def tone(rate: int, seconds: float, freq: float = 440.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (12000 * np.sin(2 * np.pi * freq * t)).astype(np.int16).tobytes()


def dominant_frequency(pcm: bytes, rate: int = 16000) -> float:
    samples = np.frombuffer(pcm, np.int16).astype(np.float32)
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def test_devices_are_found_by_name_never_by_index(pulse):
    _, info = find_device("pulse", "output")
    assert "pulse" in info["name"]
    with pytest.raises(AudioUnavailableError, match="not found; available"):
        find_device("no-such-card", "input")


async def test_what_the_speaker_plays_the_microphone_hears(pulse):
    """Play a 22.05 kHz tone (a piper voice's rate) to the sink; capture 16 kHz from the monitor."""
    source = SoundDeviceSource("pulse", block_ms=30)
    sink = SoundDeviceSink("pulse", volume=1.0)
    captured = bytearray()

    async def record() -> None:
        async for block in source.blocks():
            captured.extend(block)

    recorder = asyncio.create_task(record())
    try:
        async with asyncio.timeout(10):
            await until(lambda: captured, what="the microphone delivers audio")
            await sink.play(AudioClip(tone(22050, 1.0, 440.0), 22050))
            # the monitor hands over what was played with some latency: take 0.5 s more
            played_at = len(captured)
            await until(lambda: len(captured) >= played_at + 2 * 8000, what="0.5 s more audio")
    finally:
        recorder.cancel()
        await asyncio.gather(recorder, return_exceptions=True)
        sink.close()
    assert len(captured) > 2 * 16000  # more than a second of 16 kHz audio
    loud = np.abs(np.frombuffer(bytes(captured), np.int16)).max()
    assert loud > 3000
    assert abs(dominant_frequency(bytes(captured)) - 440) < 10


async def test_cancelling_playback_stops_it_quickly(pulse):
    sink = SoundDeviceSink("pulse")
    play = asyncio.create_task(sink.play(AudioClip(tone(16000, 5.0), 16000)))
    sizes = [0]

    def playing() -> bool:  # the device has started taking the clip from the sink's buffer
        sizes.append(len(sink._pending))
        return 0 < sizes[-1] < max(sizes)

    await until(playing, what="playback under way")
    loop = asyncio.get_running_loop()
    started = loop.time()
    play.cancel()
    with pytest.raises(asyncio.CancelledError):
        await play
    assert loop.time() - started < 0.5
    sink.close()


@pytest.mark.models
async def test_the_daemon_voice_loop_runs_on_real_devices(pulse, tmp_path):
    """Real microphone and speaker (PulseAudio), real models: a question played into the room
    is heard, answered and spoken."""
    import subprocess

    from companion.app import Features, build_app
    from companion.events import EventType
    from scripts.make_utterance_wav import make
    from tests.conftest import make_settings

    wav = await asyncio.to_thread(make, tmp_path / "q.wav", wake="Hey Jarvis.",
                                  text="What is the capital of France?")
    settings = make_settings(tmp_path, audio={"input_device": "pulse", "output_device": "pulse"},
                             pipeline={"follow_up_window_s": 0})
    app = build_app(settings, features=Features(http=False, control=False, gpio=False))
    events = []
    turn_over = asyncio.Event()

    def on_event(event) -> None:
        events.append(event)
        if event.type in (EventType.TURN_END, EventType.TURN_ERROR):
            turn_over.set()

    app.bus.add_callback(on_event)
    await app.start()
    assert app.voice is not None and app.status.components["audio_in"]["healthy"]
    opened = time.monotonic()
    pump = asyncio.create_task(app.voice.run())
    try:
        await until(lambda: app.voice.source.last_block_at > opened, what="the microphone is open")
        await asyncio.to_thread(subprocess.run, ["paplay", str(wav)], check=True, env=pulse)
        async with asyncio.timeout(30):
            await turn_over.wait()
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        await app.aclose()
    kinds = [e.type for e in events]
    assert EventType.WAKE_DETECTED in kinds
    transcript = next(e for e in events if e.type is EventType.STT_END).data["text"].lower()
    assert "france" in transcript
    assert EventType.PLAYBACK_START in kinds and EventType.TURN_END in kinds
