"""Two real daemons (`companion run`: real models, real sounddevice on a private PulseAudio) hear
the same spoken clip at different gains, each through its own microphone (one channel of a
stereo null sink's monitor, so both hear it at the same instant): exactly one answers, first
through the dev control plane, then, with the control plane killed, peer to peer over real UDP
multicast on loopback."""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from scripts.make_utterance_wav import make
from tests.processes import Fleet, http, until
from tests.pulse import private_pulseaudio
from tests.test_arbitration import free_udp_port

pytestmark = [pytest.mark.models, pytest.mark.audio]

GAINS_DB = {"hall": 0.0, "kitchen": -8.0}  # hall is nearer the speaker


CHANNELS = {"hall": "front-left", "kitchen": "front-right"}  # one stereo room, two microphones


def room_clip(source: Path, out: Path) -> Path:
    """The clip as a stereo WAV, one channel per device at its gain, over room noise of -60 dBFS
    (the floor the SNR is measured against), with 2 s of that noise first. One player plays
    both channels: the devices hear the word at the same instant."""
    with wave.open(str(source)) as wav:
        rate = wav.getframerate()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), np.int16).astype(np.float64)
    rng = np.random.default_rng(0)
    channels = []
    for name in CHANNELS:
        audio = np.concatenate([np.zeros(2 * rate), pcm * 10 ** (GAINS_DB[name] / 20)])
        channels.append(audio + rng.normal(0, 33, len(audio)))
    with wave.open(str(out), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.clip(np.stack(channels, axis=1), -32768, 32767).astype(np.int16)
                        .tobytes())
    return out


def log_events(fleet: Fleet, device: str, event: str) -> list[dict]:
    return fleet.log(device, event)


def play(env: dict[str, str], clip: Path) -> None:
    subprocess.run(["paplay", "--device=room", str(clip)], env=env, check=True, timeout=60)


def test_two_real_daemons_one_answers_via_the_plane_then_peer_to_peer(tmp_path: Path):
    # a local command: the answer needs no LLM (its warm-up can take a minute on a loaded CI)
    question = make(tmp_path / "q.wav", wake="Hey Jarvis.", text="What time is it?",
                    gap_s=0.6, tail_s=2.0)
    clip = room_clip(question, tmp_path / "room.wav")
    udp_port = free_udp_port()
    with private_pulseaudio(tmp_path) as env:
        subprocess.run(["pactl", "load-module", "module-null-sink", "sink_name=room",
                        "rate=16000", "channels=2"], env=env, check=True, capture_output=True)
        for name, channel in CHANNELS.items():  # each device's microphone: one channel of it
            subprocess.run(["pactl", "load-module", "module-remap-source", "master=room.monitor",
                            f"source_name={name}_mic", "channels=1",
                            f"master_channel_map={channel}", "channel_map=mono"],
                           env=env, check=True, capture_output=True)
        fleet = Fleet(tmp_path)
        try:
            fleet.start_plane()
            for name in GAINS_DB:
                _start(fleet, name, env, udp_port)
            for name in GAINS_DB:
                until(lambda d=name: fleet.ready(d) and fleet.connected(d), 150, f"{name} linked")
            until(lambda: all(log_events(fleet, d, "peer arbitration on") for d in GAINS_DB), 10,
                  "peer transports up")

            # 1. with the control plane: it decides, one stops, the other answers
            winner = _one_answers(fleet, env, clip, 1)
            claims = {d: _messages(fleet, d, "wake_detected") for d in GAINS_DB}
            assert all(len(c) == 1 for c in claims.values()), claims
            snr = {d: c[0]["payload"]["snr_db"] for d, c in claims.items()}
            assert snr["hall"] > snr["kitchen"] + 3, snr  # measured from the real audio
            decision = http("GET", f"{fleet.plane}/arbitration", timeout=10)[1]["decisions"][-1]
            assert decision["winner_device_id"] == winner
            if set(decision["claims"]) == set(GAINS_DB):  # both claims in time: the nearer
                assert winner == "hall"
            assert {v["source"] for d in GAINS_DB for v in _verdicts(fleet, d)} == {"control"}
            assert _messages(fleet, winner, "transcript")
            assert not _messages(fleet, _other(winner), "transcript")  # stopped before STT

            # 2. the control plane dies: the daemons arbitrate over multicast
            fleet.kill("plane")
            for name in GAINS_DB:
                until(lambda d=name: not http("GET", f"{fleet.api(d)}/v1/state", timeout=5)[1][
                    "control_plane"]["connected"], 30, f"{name} sees the plane down")
            winner = _one_answers(fleet, env, clip, 2)
            verdicts = {d: _verdicts(fleet, d)[-1] for d in GAINS_DB}
            assert {v["source"] for v in verdicts.values()} == {"peer"}, verdicts
            if _other(winner) in verdicts[winner]["peers"]:  # it heard the other's claim
                assert winner == "hall"
        finally:
            fleet.stop_all()


def _verdicts(fleet: Fleet, device: str) -> list[dict]:
    return log_events(fleet, device, "wake arbitration")


def _other(device: str) -> str:
    return next(d for d in GAINS_DB if d != device)


def _answers(fleet: Fleet) -> dict[str, tuple[int, int]]:
    """Per device: how many local commands it answered and utterances it transcribed."""
    return {d: (len(log_events(fleet, d, "local command")), len(log_events(fleet, d, "transcript")))
            for d in GAINS_DB}


def _one_answers(fleet: Fleet, env: dict[str, str], clip: Path, turns: int) -> str:
    """Play the clip to both; exactly one device answers (the other stops silently before it
    transcribes). Returns the one that answered."""
    before = _answers(fleet)
    play(env, clip)
    until(lambda: all(len(_verdicts(fleet, d)) == turns for d in GAINS_DB), 90, "both verdicts")
    won = [d for d in GAINS_DB if _verdicts(fleet, d)[-1]["won"]]
    assert len(won) == 1, {d: _verdicts(fleet, d)[-1] for d in GAINS_DB}
    winner, loser = won[0], _other(won[0])
    until(lambda: _answers(fleet)[winner][0] == before[winner][0] + 1, 120, f"{winner}'s answer")
    seen: dict[str, str | None] = {}

    def idle() -> bool:
        seen.update({d: _state(fleet, d) for d in GAINS_DB})
        return all(state == "idle" for state in seen.values())

    try:
        until(idle, 120, "both idle")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {seen}") from None
    assert _answers(fleet)[loser] == before[loser]
    assert _verdicts(fleet, loser)[-1]["winner"] == winner
    return winner


def _start(fleet: Fleet, name: str, env: dict[str, str], udp_port: int) -> None:
    fleet.start_daemon(name, env={
        **env, "PULSE_SOURCE": f"{name}_mic", "PULSE_SINK": "vspeaker",
        "COMPANION_AUDIO__INPUT_DEVICE": "pulse",
        "COMPANION_AUDIO__OUTPUT_DEVICE": "pulse", "COMPANION_API__RATE_LIMIT_PER_MINUTE": "100000",
        "COMPANION_PIPELINE__FOLLOW_UP_WINDOW_S": "0",
        "COMPANION_CONTROL_PLANE__BACKOFF_MAX_S": "0.5",
        "COMPANION_ARBITRATION__ROOM": "living", "COMPANION_ARBITRATION__PEER": "true",
        "COMPANION_ARBITRATION__SECRET": "test-group-secret-0123",
        "COMPANION_ARBITRATION__PEER_INTERFACE": "127.0.0.1",
        "COMPANION_ARBITRATION__PEER_PORT": str(udp_port)})


def _messages(fleet: Fleet, device: str, type_: str) -> list[dict]:
    return fleet.messages(device, type_)


def _state(fleet: Fleet, device: str) -> str | None:
    try:
        status, state = http("GET", f"{fleet.api(device)}/v1/state", timeout=10)
    except OSError as exc:
        return f"unreachable: {exc}"
    return state["pipeline_state"] if status == 200 else f"HTTP {status}"
