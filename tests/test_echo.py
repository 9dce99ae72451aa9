"""Echo cancellation: the reference lines up with the microphone, AEC3 takes the echo out,
and every way it can be missing falls back with a warning instead of a dead microphone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from companion.devices import echo as echo_mod
from companion.devices.echo import EchoCanceller, EchoControl, PlaybackReference, resolve_mode
from companion.room import Room, RoomConfig
from companion.stages.tts import AudioClip
from tests.test_room import speechlike, tone_speech

RATE = 16000


def test_reference_returns_what_played_when_it_played() -> None:
    ref = PlaybackReference()
    ref.write(10.0, np.arange(1, 161, dtype=np.int16))
    ref.write(10.01 + 0.0001, np.full(160, 7, np.int16))  # jitter: snapped to the end
    got = ref.read(10.0 - 0.005, 400)
    assert (got[:80] == 0).all()
    assert (got[80:240] == np.arange(1, 161)).all()
    assert (got[240:400] == 7).all()
    assert (ref.read(11.0, 160) == 0).all()  # nothing played then
    ref.write(12.0, np.full(160, 3, np.int16))  # a gap is silence, not stale audio
    assert (ref.read(11.5, 160) == 0).all()


async def _cancel_in_room(echo_db: float) -> tuple[np.ndarray, np.ndarray]:
    room = Room(RoomConfig(echo_db=echo_db, rt60=0.25, delay_ms=30), b"", realtime=False,
                tail_silence_s=6.0)
    room.speaker.reference = PlaybackReference()
    canceller = EchoCanceller(room.speaker.reference)
    mic = room.source()
    play = asyncio.create_task(room.speaker.play(AudioClip(speechlike(5.0, 1), RATE)))
    raw, cleaned = [], []
    async with asyncio.timeout(20):
        async for block in mic.blocks():
            raw.append(np.frombuffer(block, np.int16))
            cleaned.append(np.frombuffer(canceller.process(block, mic.last_block_time_s), np.int16))
            if play.done():
                break
    return np.concatenate(raw).astype(float), np.concatenate(cleaned).astype(float)


def test_aec_takes_the_echo_out_after_convergence() -> None:
    raw, cleaned = asyncio.run(_cancel_in_room(6.0))
    late = slice(2 * RATE, 5 * RATE)  # after convergence
    erle = 10 * np.log10((raw[late] ** 2).mean() / ((cleaned[late] ** 2).mean() + 1e-9))
    assert erle >= 20


def _double_talk(echo_db: float, user_at_s: float) -> tuple[dict, np.ndarray, np.ndarray]:
    """The device talks for 4 s (echo ``echo_db`` over the user); the user talks 1 s from
    ``user_at_s``. Returns the room's components and both cleaned streams."""
    user = np.zeros(int(4 * RATE))
    start = int(user_at_s * RATE)
    user[start:start + RATE] = np.frombuffer(speechlike(1.0, 9), np.int16)
    room = Room(RoomConfig(echo_db=echo_db, rt60=0.2, delay_ms=30, seed=4),
                user.astype(np.int16).tobytes(), realtime=False, record=True)
    room.speaker.reference = PlaybackReference()
    room.speaker.enqueue(np.frombuffer(speechlike(4.0, 1), np.int16))
    canceller = EchoCanceller(room.speaker.reference)
    blocks, wake = [], []
    while not room.finished:
        at = room.now_s
        cleaned = canceller.split(room.next_block(), at)
        blocks.append(np.frombuffer(cleaned.block, np.int16))
        wake.append(np.frombuffer(cleaned.wake, np.int16))
    return (room.components(), np.concatenate(blocks).astype(float),
            np.concatenate(wake).astype(float))


def test_the_wake_stream_keeps_the_user_while_the_device_talks() -> None:
    """AEC3's residual suppressor takes the user out with the echo during double talk; the
    linear canceller's output (what the wake word hears) keeps the user well above the echo
    left in it, and takes the echo out alone."""
    parts, _aec3, wake = _double_talk(6.0, 2.5)
    word = slice(int(2.5 * RATE), int(3.5 * RATE))
    echo_only = slice(int(1.5 * RATE), int(2.5 * RATE))
    mic = parts["user"] + parts["echo"]
    level = lambda x: 10 * np.log10((x**2).mean() + 1e-9)  # noqa: E731
    assert level(mic[echo_only]) - level(wake[echo_only]) >= 15  # the echo goes
    left = wake[word] - parts["user"][word]  # what is not the user: the echo left, distortion
    assert level(parts["user"][word]) - level(left) >= 10  # user over what is left: was -6 dB


def test_linear_frame_fits_the_block() -> None:
    assert [echo_mod.linear_frame(n) for n in (480, 320, 160, 1600, 400)] == [480, 320, 160, 400, 400]


def test_resolve_mode_falls_back_with_a_warning(caplog) -> None:
    assert resolve_mode("off", system_source="ec", webrtc_error=None)[0] == "off"
    assert resolve_mode("auto", system_source="echo-cancel-source", webrtc_error=None)[0] == "system"
    assert resolve_mode("auto", system_source=None, webrtc_error=None)[0] == "webrtc"
    assert resolve_mode("system", system_source=None, webrtc_error=None)[0] == "webrtc"
    mode, detail = resolve_mode("webrtc", system_source=None,
                                webrtc_error="pywebrtc-audio not usable: No module")
    assert mode == "off" and "pywebrtc-audio" in detail


def test_missing_package_means_no_canceller_not_a_crash(monkeypatch) -> None:
    monkeypatch.setattr(echo_mod, "webrtc_available", lambda: "pywebrtc-audio not usable: gone")
    control = EchoControl("auto", PlaybackReference(), probe_system=lambda: None)
    assert control.mode == "off" and control.canceller is None
    block = tone_speech(0.03)
    assert asyncio.run(control.process(block, 0.0)) == (block, block)
    control.close()


def test_vanishing_system_source_falls_back_to_webrtc() -> None:
    sources = ["echo-cancel-source"]
    changes: list[str] = []
    control = EchoControl("auto", PlaybackReference(),
                          probe_system=lambda: sources[0] if sources else None,
                          on_change=lambda c: changes.append(c.mode))
    assert control.mode == "system" and control.converged

    async def go() -> None:
        watcher = asyncio.create_task(control.watch(period_s=0.01))
        sources.clear()
        try:
            async with asyncio.timeout(5):
                while control.mode == "system":  # noqa: ASYNC110  state the watcher changes
                    await asyncio.sleep(0.01)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    asyncio.run(go())
    assert changes == ["system", "webrtc"] and control.canceller is not None
    assert not control.converged
    control.close()


@pytest.mark.parametrize("requested", ["webrtc", "auto"])
def test_no_reference_no_aec(requested) -> None:
    control = EchoControl(requested, None, probe_system=lambda: None)
    assert control.mode == "off" and "reference" in control.detail
    control.close()


def test_the_linear_filter_stays_converged_over_a_pause_between_sentences() -> None:
    """Between two sentences the speaker is silent for longer than the filter's tail (the
    next one still being synthesized). The filter learnt on the first must cancel the second
    from its first word: it once kept the first sentence's spectra as the second's history and
    threw the converged filter away."""
    from companion.devices.echo_linear import LinearEchoFilter

    rng = np.random.default_rng(7)
    path = np.zeros(int(0.12 * RATE))  # 30 ms delay, a decaying tail
    path[480:] = rng.standard_normal(len(path) - 480) * np.exp(-np.arange(len(path) - 480) / 600)
    path *= 0.5 / np.abs(path).max()
    sentence = lambda seed: np.frombuffer(speechlike(2.4, seed), np.int16).astype(float)  # noqa: E731
    far = np.concatenate([sentence(1), np.zeros(int(0.6 * RATE)), sentence(2)])
    near = np.convolve(far, path)[: len(far)]
    flt = LinearEchoFilter(frame=480)
    out = np.concatenate([flt.process(near[i:i + 480], far[i:i + 480])
                          for i in range(0, len(far), 480)])
    resumed = int(3.0 * RATE)  # the second sentence's first 400 ms
    second = slice(resumed, resumed + int(0.4 * RATE))
    erle = 10 * np.log10((near[second] ** 2).mean() / ((out[second] ** 2).mean() + 1e-9))
    assert erle >= 15


def _first_words_erle(echo_path_file) -> float:
    """ERLE of the wake word's stream over the first 0.5 s of a reply in a fresh canceller."""
    room = Room(RoomConfig(echo_db=6.0, rt60=0.2, delay_ms=30, seed=4), bytes(2 * 3 * RATE),
                realtime=False)
    room.speaker.reference = PlaybackReference()
    room.speaker.enqueue(np.frombuffer(speechlike(3.0, 1), np.int16))
    canceller = EchoCanceller(room.speaker.reference, echo_path_file=echo_path_file)
    mic, wake = [], []
    while not room.finished:
        at = room.now_s
        block = room.next_block()
        mic.append(np.frombuffer(block, np.int16))
        wake.append(np.frombuffer(canceller.split(block, at).wake, np.int16))
    canceller.save_echo_path()
    first = slice(int(0.05 * RATE), int(0.55 * RATE))
    raw, out = (np.concatenate(x).astype(float)[first] for x in (mic, wake))
    return 10 * np.log10((raw**2).mean() / ((out**2).mean() + 1e-9))


def test_the_echo_path_learnt_is_kept_across_restarts(tmp_path) -> None:
    """A device's speaker and microphone do not move: the echo path learnt in one run cancels
    the first words of the next run's first reply, which a filter learning anew cannot."""
    path_file = tmp_path / "echo_path.npy"
    first_run = _first_words_erle(path_file)
    assert path_file.exists()
    second_run = _first_words_erle(path_file)
    assert first_run < 10 and second_run >= 20, (first_run, second_run)
    path_file.write_bytes(b"not an array")  # a damaged file: learnt anew, no crash
    assert _first_words_erle(path_file) < 10
