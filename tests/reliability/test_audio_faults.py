"""The sound devices failing while the daemon runs: the PulseAudio server it records from and
plays to is killed (the microphone and the speaker vanish), then comes back at another sample
rate. The daemon shows the error (``/ready/all``, the log, an ``audio-device`` event, the LED)
and recovers by itself: same process, no crash loop, and the next voice turn is answered."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from companion.devices.audio import SoundDeviceSink
from companion.events import EventType, PipelineState
from companion.stages.tts import AudioClip
from scripts.make_utterance_wav import make
from tests.conftest import make_settings
from tests.processes import Fleet, http, until
from tests.pulse import private_pulseaudio
from tests.reliability.pulse_daemon import say, start_pulse_daemon
from tests.test_gpio import GPIO_FEATURES, fake_app


async def test_a_failing_sound_device_turns_the_led_to_the_error_look_until_it_recovers(tmp_path):
    settings = make_settings(tmp_path, gpio={"enabled": True, "pin_factory": "mock"})
    app = fake_app(settings, features=GPIO_FEATURES)
    await app.start()
    app._start_gpio()
    led, report = app.led, app._audio_health("audio_in")  # what a real SoundDeviceSource calls
    events = []
    app.bus.add_callback(lambda e: events.append(e.data) if e.type is EventType.AUDIO_DEVICE
                         else None)
    idle = led.last_look
    report(False, "gone")
    assert led.state is PipelineState.ERROR and led.last_look != idle
    assert app.status.components["audio_in"] == {"healthy": False, "detail": "gone",
                                                  "latency_ms": None}
    report(True, "back")
    assert led.state is PipelineState.IDLE and led.last_look == idle
    assert events == [{"component": "audio_in", "healthy": False, "detail": "gone"},
                      {"component": "audio_in", "healthy": True, "detail": "back"}]
    await app.aclose()


class DeadStream:
    """A PortAudio output stream whose device went away: its callback never comes again."""

    latency = 0.0

    def close(self) -> None:
        raise OSError("device gone")


@pytest.mark.audio
def test_a_speaker_that_stops_playing_is_reported_and_reopened(tmp_path):
    with private_pulseaudio(tmp_path):
        sink = SoundDeviceSink("pulse")
        sink.stall_s = 1.5
        seen: list[tuple[bool, str]] = []
        sink.on_health = lambda healthy, detail: seen.append((healthy, detail))
        clip = AudioClip(b"\x00\x10" * 1600, 16000)

        async def scenario() -> None:
            async with asyncio.timeout(20):
                await sink.play(clip)  # a working stream
                sink._stream.close()  # its callback stops, as when the device goes away
                sink._stream, sink._requested_rate = DeadStream(), 16000
                await sink.play(clip)  # the callback never comes: not a wait for ever
                assert seen == [(False, f"speaker {sink.name!r} stopped playing; reopening it")]
                assert sink._stream is None
                await sink.play(clip)  # a new stream

        try:
            asyncio.run(scenario())
            assert seen[-1][0] and not isinstance(sink._stream, DeadStream), seen
        finally:
            sink.close()


def _restart_pulse(env: dict[str, str], rate: int) -> None:
    subprocess.run(["pulseaudio", "--daemonize=yes", "--exit-idle-time=-1", "--disallow-exit", "-n",
                    "--load=module-native-protocol-unix",
                    f"--load=module-null-sink sink_name=vspeaker rate={rate} channels=1",
                    f"--load=module-null-sink sink_name=room rate={rate} channels=1",
                    "--load=module-always-sink"], env=env, check=True, capture_output=True,
                   timeout=20)
    until(lambda: subprocess.run(["pactl", "info"], env=env,
                                          capture_output=True).returncode == 0, 10, "pulseaudio")


@pytest.mark.models
@pytest.mark.audio
def test_the_sound_server_dying_and_returning_at_another_rate_is_survived(tmp_path: Path,
                                                                          fleet: Fleet):
    question = make(tmp_path / "q.wav", wake="Hey Jarvis.", text="What time is it?",
                    gap_s=0.6, tail_s=2.0)
    with private_pulseaudio(tmp_path) as env:
        start_pulse_daemon(fleet, env)
        process = fleet.procs["dev"]
        base = fleet.api("dev")

        def audio_in() -> dict:
            return http("GET", f"{base}/ready/all", timeout=10)[1]["components"]["audio_in"]

        def answered() -> int:
            return len(fleet.log("dev", "local command"))

        try:
            until(lambda: fleet.ready("dev") and audio_in()["healthy"], 150, "ready")
            subprocess.run(["pulseaudio", "--kill"], env=env, check=True, timeout=20)
            until(lambda: not audio_in()["healthy"], 30, "the microphone seen down")
            assert http("GET", f"{base}/ready/all", timeout=10)[1]["status"] == "degraded"
            assert fleet.log("dev", "microphone failed")
            assert http("GET", f"{base}/health", timeout=10)[0] == 200  # serving meanwhile

            _restart_pulse(env, 48000)  # back, at another sample rate
            until(lambda: audio_in()["healthy"], 60, "the microphone back")
            assert fleet.log("dev", "microphone working again")
            failures = len(fleet.log("dev", "microphone failed"))
            assert failures <= 3, failures  # each retry is not a new line (no log flood)
            for _ in range(3):  # a loaded machine can drop the wake word's blocks: say it again
                say(env, question)
                try:
                    until(lambda: answered() >= 1, 60, "the voice turn after recovery")
                    break
                except TimeoutError:
                    continue
            assert answered() >= 1, "no voice turn answered after the microphone came back"
            assert process.poll() is None and fleet.procs["dev"] is process  # never restarted
        finally:
            fleet.stop_all()


async def test_the_watchdog_leaves_a_microphone_being_reopened_to_its_source(tmp_path):
    """systemd's watchdog restarts a daemon whose microphone went quiet unnoticed; one whose
    source says it is down and reopening it is not restarted (that would loop without the
    device)."""
    import time

    from companion import systemd
    from tests.fakes import FakeMic

    mic = FakeMic([])
    app = fake_app(make_settings(tmp_path), source=mic)
    await app.start()
    mic.last_block_at = time.monotonic() - 3600
    assert not systemd.healthy(app, 0.0)[0]  # quiet, and nobody knows why
    mic.healthy = False
    assert systemd.healthy(app, 0.0) == (True, "the microphone is down and being reopened")
    await app.aclose()
