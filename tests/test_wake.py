"""Wake word: per-word thresholds and a refractory period in audio seconds."""

import asyncio

import pytest

from companion.settings import WakeSettings
from companion.stages.wake import SpeechGate, WakeScorer


def test_per_word_threshold():
    scorer = WakeScorer(WakeSettings(models=["hey_jarvis", "alexa"], threshold=0.5,
                                     thresholds={"alexa": 0.9}))
    assert scorer.decide({"hey_jarvis": 0.2, "alexa": 0.8}, 1.0) is None
    detection = scorer.decide({"hey_jarvis": 0.6, "alexa": 0.95}, 2.0)
    assert detection.word == "alexa" and detection.score == 0.95


def test_refractory_period_counts_audio_seconds():
    scorer = WakeScorer(WakeSettings(refractory_s=2.0))
    assert scorer.decide({"hey_jarvis": 0.9}, 1.0) is not None
    assert scorer.decide({"hey_jarvis": 0.9}, 2.5) is None
    assert scorer.decide({"hey_jarvis": 0.9}, 3.1) is not None


class BlockVad:
    """Speech when the block's first byte is 1."""

    def is_speech(self, block: bytes) -> bool:
        return block[:1] == b"\x01"


QUIET, SPEECH = b"\x00" * 960, b"\x01" * 960  # 30 ms blocks


def test_the_speech_gate_rests_in_quiet_and_opens_with_the_audio_before_speech():
    gate = SpeechGate(BlockVad(), context_s=0.6, hold_s=0.15)
    for _ in range(40):
        assert gate.feed(QUIET) == (None, False)
    for _ in range(3):  # knocks: five blocks of "speech" each, apart
        for block in [SPEECH] * 5 + [QUIET] * 8:
            assert gate.feed(block) == (None, False)
    for _ in range(7):
        assert gate.feed(SPEECH) == (None, False)
    audio, afresh = gate.feed(SPEECH)  # the eighth block of speech in twelve
    assert afresh and len(audio) == 20 * 960  # 0.6 s: the context, ending with this block
    assert audio.endswith(SPEECH * 8)
    assert gate.feed(QUIET) == (QUIET, False)  # open: every block, until 0.15 s of quiet
    assert gate.feed(SPEECH) == (SPEECH, False)
    for _ in range(4):
        assert gate.feed(QUIET) == (QUIET, False)
    assert gate.feed(QUIET) == (QUIET, False)  # the fifth quiet block closes it
    assert not gate.open and gate.feed(QUIET) == (None, False)


@pytest.mark.models
async def test_real_openwakeword_behind_the_speech_gate_hears_the_word_after_a_quiet_room(tmp_path):
    """Ten seconds of room noise, then "Hey Jarvis": heard with the gate as without it, at the
    same audio time, while the gate let openWakeWord rest through most of the room."""
    from companion.devices.audio import read_wav_16k_mono
    from companion.models import ModelRegistry
    from companion.settings import PROJECT_ROOT
    from companion.stages.wake import OpenWakeWordDetector
    from scripts.bench_startup import room_noise
    from scripts.make_utterance_wav import make

    room = read_wav_16k_mono(await asyncio.to_thread(room_noise, 10.0, tmp_path / "room.wav"))
    word = read_wav_16k_mono(await asyncio.to_thread(make, tmp_path / "w.wav", wake="Hey Jarvis.",
                                                     text=None, lead_s=0.0))
    pcm = room + word
    heard, scored_in_room = {}, {}
    for gated in (True, False):
        detector = OpenWakeWordDetector(WakeSettings(speech_gate=gated),
                                        ModelRegistry(PROJECT_ROOT / "models"))
        detections = []
        async with asyncio.timeout(30):
            for i in range(0, len(pcm), 960):
                if i == len(room) // 960 * 960:
                    scored_in_room[gated] = detector.chunks_scored
                if found := await detector.process(pcm[i : i + 960]):
                    detections.append(found)
        assert [d.word for d in detections] == ["hey_jarvis"], gated
        heard[gated] = detections[0].audio_time_s
    assert 10.0 < heard[True] < 11.5 and abs(heard[True] - heard[False]) <= 0.16, heard
    chunks_in_room = len(room) // 2560
    assert scored_in_room[False] >= chunks_in_room - 1
    assert scored_in_room[True] < 0.5 * chunks_in_room, scored_in_room


@pytest.mark.models
async def test_real_openwakeword_hears_hey_jarvis_from_two_voices(tmp_path):
    """The real detector on speech made by piper and by espeak-ng."""
    from companion.devices.audio import read_wav_16k_mono
    from companion.models import ModelRegistry
    from companion.settings import PROJECT_ROOT
    from companion.stages.wake import OpenWakeWordDetector
    from scripts.make_utterance_wav import make

    registry = ModelRegistry(PROJECT_ROOT / "models")
    for engine in ("piper", "espeak"):
        wav = await asyncio.to_thread(make, tmp_path / f"{engine}.wav", wake="Hey Jarvis.",
                                      text=None, engine=engine)
        pcm = read_wav_16k_mono(wav)
        detector = OpenWakeWordDetector(WakeSettings(models=["hey_jarvis", "alexa"]), registry)
        detections = []
        async with asyncio.timeout(20):
            for i in range(0, len(pcm), 960):
                found = await detector.process(pcm[i : i + 960])
                if found:
                    detections.append(found)
        assert [d.word for d in detections] == ["hey_jarvis"], engine
        assert detections[0].score > 0.5


@pytest.mark.models
async def test_real_openwakeword_stays_quiet_on_other_speech(tmp_path):
    from companion.devices.audio import read_wav_16k_mono
    from companion.models import ModelRegistry
    from companion.settings import PROJECT_ROOT
    from companion.stages.wake import OpenWakeWordDetector
    from scripts.make_utterance_wav import make

    wav = await asyncio.to_thread(make, tmp_path / "q.wav", wake=None,
                                  text="What is the weather like in Paris today?")
    pcm = read_wav_16k_mono(wav)
    detector = OpenWakeWordDetector(WakeSettings(), ModelRegistry(PROJECT_ROOT / "models"))
    async with asyncio.timeout(20):
        for i in range(0, len(pcm), 960):
            assert await detector.process(pcm[i : i + 960]) is None


@pytest.mark.models
async def test_after_reset_the_same_word_does_not_fire_again(tmp_path):
    """The turn the word started takes the audio; when it ends, the detector must not fire
    on what it heard before (openWakeWord keeps that audio in its feature buffers)."""
    from companion.devices.audio import read_wav_16k_mono
    from companion.models import ModelRegistry
    from companion.settings import PROJECT_ROOT
    from companion.stages.wake import OpenWakeWordDetector
    from scripts.make_utterance_wav import make

    wav = await asyncio.to_thread(make, tmp_path / "w.wav", wake="Hey Jarvis.", text=None,
                                  tail_s=0.0)
    pcm = read_wav_16k_mono(wav)
    detector = OpenWakeWordDetector(WakeSettings(refractory_s=0.0), ModelRegistry(PROJECT_ROOT / "models"))
    async with asyncio.timeout(20):
        fired_at = None
        for i in range(0, len(pcm), 1280):
            if await detector.process(pcm[i : i + 1280]):
                fired_at = i
                break
        assert fired_at is not None
        detector.reset()
        silence = bytes(1280 * 2)
        for _ in range(25):  # 2 s of quiet after the turn
            assert await detector.process(silence) is None


@pytest.mark.models
def test_the_detector_loads_without_scikit_learn_and_scipy(tmp_path):
    """openWakeWord's package imports its verifier trainer (scikit-learn, SciPy: most of its
    import time, the longest step of start-up); the daemon's detector does not, and hears."""
    import subprocess
    import sys

    from scripts.make_utterance_wav import make

    wav = make(tmp_path / "w.wav", wake="Hey Jarvis.", text=None)
    code = f"""
import asyncio, sys
from pathlib import Path
from companion.devices.audio import read_wav_16k_mono
from companion.models import ModelRegistry
from companion.settings import PROJECT_ROOT, WakeSettings
from companion.stages.wake import OpenWakeWordDetector

detector = OpenWakeWordDetector(WakeSettings(), ModelRegistry(PROJECT_ROOT / "models"))
pcm = read_wav_16k_mono(Path({str(wav)!r}))

async def hear():
    return [d for i in range(0, len(pcm), 960) if (d := await detector.process(pcm[i:i + 960]))]

print([d.word for d in asyncio.run(hear())], sorted({{"sklearn", "scipy"}} & set(sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "['hey_jarvis'] []"
