"""The event loop never waits on blocking work: SQLite, tokenizing, sound devices, resampling
and persona files run in worker threads. Each test records the thread every such call runs on
(the real call still happens) and fails if one ran on the event loop's thread."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from companion import app as app_module
from companion.app import Features, install_signal_handlers
from companion.devices import audio
from companion.stages.tts import AudioClip
from tests.conftest import fake_app, make_settings, until
from tests.fakes import FakeChatModel


class LoopThreadCalls:
    """Wraps methods so that each call made on the event loop's thread is recorded by name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loop_thread = threading.get_ident()  # built inside the test's event loop
        self.on_loop: list[str] = []
        self.seen: list[str] = []
        self._monkeypatch = monkeypatch

    def watch(self, owner: object, *names: str) -> None:
        for name in names:
            self._monkeypatch.setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            self.seen.append(name)
            if threading.get_ident() == self.loop_thread:
                self.on_loop.append(name)
            return fn(*args, **kwargs)

        return call


STORE_READS_AND_WRITES = ("get_value", "set_value", "get_session", "create_session", "messages",
                          "record_turn", "set_summary", "set_session_persona")


async def test_conversations_read_sqlite_and_count_tokens_in_worker_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = LoopThreadCalls(monkeypatch)
    llm = FakeChatModel("short answer here")
    settings = make_settings(tmp_path, llm={"history_token_budget": 100})
    app = fake_app(settings, llm=llm)
    calls.watch(app.store, *STORE_READS_AND_WRITES)
    calls.watch(llm, "count_tokens")
    async with asyncio.timeout(10):
        await app.start()  # the conversation takes up the stored persona and session here
        for i in range(12):  # enough turns for a summary
            await app.conversation.reply_text(f"question number {i} about things")
        await app.conversation.wait_for_summaries()
        await app.conversation.switch_persona("entertainer")
    assert {"get_value", "record_turn", "count_tokens", "set_summary"} <= set(calls.seen)
    assert calls.on_loop == []
    await app.aclose()


async def test_sighup_rereads_the_personas_in_a_worker_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = LoopThreadCalls(monkeypatch)
    app = fake_app(make_settings(tmp_path))
    async with asyncio.timeout(5):
        await app.start()
    calls.watch(app, "reload_personas")
    install_signal_handlers(app, asyncio.current_task())
    loop = asyncio.get_running_loop()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: calls.seen)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    assert calls.on_loop == []
    await app.aclose()


async def test_sound_devices_are_probed_in_a_thread_once_the_api_listens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = LoopThreadCalls(monkeypatch)
    listening_when_probed: list[bool] = []
    settings = make_settings(tmp_path, api={"port": 0})
    app = fake_app(settings, features=Features(control=False, gpio=False, warm_personas=False),
                   sink=None)

    def probe(_settings):  # stands in for PortAudio: no sound card here (the audio tests
        listening_when_probed.append(app.http_listening.is_set())  # open real devices)
        raise audio.AudioUnavailableError("no sound card in this test")

    monkeypatch.setattr(app_module, "_real_sink", probe)
    monkeypatch.setattr(app_module, "_real_source", probe)
    calls.watch(app_module, "_real_sink", "_real_source")
    running = asyncio.create_task(app.run())
    try:
        await until(app.ready.is_set, 10)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert sorted(calls.seen) == ["_real_sink", "_real_source"] and calls.on_loop == []
    assert listening_when_probed == [True, True]
    assert not app.status.components["audio_out"]["healthy"]
    await app.aclose()


async def test_the_speaker_resamples_each_sentence_in_a_worker_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = LoopThreadCalls(monkeypatch)
    calls.watch(audio, "resample")
    sink = audio.WavFileSink(tmp_path / "out.wav", sample_rate=16000)
    tone = (8000 * np.sin(np.arange(22050) / 22050 * 2 * np.pi * 440)).astype(np.int16)
    async with asyncio.timeout(5):
        await sink.play(AudioClip(tone.tobytes(), 22050))
    sink.close()
    with wave.open(str(tmp_path / "out.wav")) as wav:
        assert wav.getnframes() == 16000  # one second, at the sink's rate
    assert calls.seen == ["resample"] and calls.on_loop == []



@pytest.fixture
def pulse(tmp_path: Path):
    from tests.pulse import private_pulseaudio

    with private_pulseaudio(tmp_path) as env:
        yield env


@pytest.mark.audio
async def test_the_real_speaker_resamples_and_opens_its_stream_in_a_worker_thread(
        pulse, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = LoopThreadCalls(monkeypatch)
    calls.watch(audio, "resample")
    sink = await asyncio.to_thread(audio.SoundDeviceSink, "pulse")
    calls.watch(sink, "_ensure_stream")
    tone = (8000 * np.sin(np.arange(4410) / 22050 * 2 * np.pi * 440)).astype(np.int16)
    try:
        async with asyncio.timeout(10):
            await sink.play(AudioClip(tone.tobytes(), 22050))  # a piper voice's rate
    finally:
        sink.close()
    assert calls.seen == ["_ensure_stream", "resample"] and calls.on_loop == []


async def test_a_second_stop_signal_does_not_cancel_the_shutdown(tmp_path: Path) -> None:
    """SIGTERM stops the daemon; a second one (Ctrl-C twice, `timeout` forwarding SIGTERM)
    arriving while it shuts down must let the shutdown finish, not cancel it."""
    app = fake_app(make_settings(tmp_path))
    loop = asyncio.get_running_loop()
    shut_down = asyncio.Event()

    async def daemon() -> None:
        install_signal_handlers(app, asyncio.current_task())
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            os.kill(os.getpid(), signal.SIGTERM)  # the second signal, during the shutdown
            await asyncio.sleep(0.2)  # the shutdown's own work
            shut_down.set()
            raise

    task = asyncio.create_task(daemon())
    try:
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(5):
            await asyncio.gather(task, return_exceptions=True)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    assert shut_down.is_set()
