"""The endpoint decides in a noisy room (companion/room.py's noise kinds): steady noise alone
gives up at ``no_speech_timeout_s``; a question in noise ends after its last word, neither
running on to ``max_utterance_s`` nor cut short. The real webrtcvad, gated by the room's noise
floor as the pipeline does (companion/stages/vad.py: NoiseFloor)."""

from __future__ import annotations

import numpy as np
import pytest

from companion.room import Room, RoomConfig
from companion.settings import VadSettings
from companion.stages.vad import Endpointer, GatedClassifier, NoiseFloor, SegmentState, WebRtcVad

RATE = 16000
IDLE_S = 5.0  # the room heard while waiting for the wake word (the floor's whole window)


def endpoint(kind: str, snr_db: float, speech: np.ndarray | None, *, speak=None,
             margin_db: float = 6.0):
    """(final state, audio seconds it took, speech end) for ``speech`` said 0.3 s into a turn."""
    settings = VadSettings(no_speech_timeout_s=4.0, max_utterance_s=10.0, noise_margin_db=margin_db)
    user = np.zeros(int((IDLE_S + 12) * RATE))
    if speech is not None:
        at = int((IDLE_S + 0.3) * RATE)
        user[at:at + len(speech)] = speech
    room = Room(RoomConfig(noise=kind, snr_db=snr_db, seed=5), user.astype(np.int16).tobytes(),
                realtime=False, speak=speak)
    floor = NoiseFloor()
    for _ in range(round(IDLE_S / 0.03)):
        floor.observe(room.next_block())
    endpointer = Endpointer(settings, GatedClassifier(WebRtcVad(2), floor, margin_db))
    state, took = SegmentState.WAITING, 0.0
    while state in (SegmentState.WAITING, SegmentState.SPEECH) and not room.finished:
        state = endpointer.feed(room.next_block())
        took += 0.03
    return state, took, endpointer.result().speech_end_s


@pytest.mark.parametrize("kind", ["white", "pink"])
@pytest.mark.parametrize("snr_db", [20.0, 5.0])
def test_no_speech_timeout_holds_in_steady_noise(kind, snr_db) -> None:
    state, took, _ = endpoint(kind, snr_db, None)
    assert state is SegmentState.NO_SPEECH and took == pytest.approx(4.0, abs=0.05)


@pytest.fixture(scope="module")
def speak():
    """Piper, each line synthesized once (every babble room says the same lines)."""
    from functools import lru_cache

    from companion.__main__ import piper_speaker
    from companion.settings import CompanionSettings

    return lru_cache(maxsize=None)(piper_speaker(CompanionSettings(log_level="warning")))


@pytest.mark.models
@pytest.mark.parametrize("kind", ["pink", "babble"])
def test_a_question_in_noise_ends_after_its_last_word(kind, speak) -> None:
    question = speak("What is the capital of France?", 1.0)
    voiced = np.flatnonzero(np.abs(question) > 500)
    last_word_end = 0.3 + voiced[-1] / RATE
    for snr_db in (20.0, 10.0, 5.0):
        state, took, end = endpoint(kind, snr_db, question, speak=speak)
        assert state is SegmentState.ENDED, (kind, snr_db, state)
        assert took < last_word_end + 1.5, (kind, snr_db, took)  # not run on to the maximum
        assert end is not None and end > last_word_end - 0.5, (kind, snr_db, end)  # not cut


@pytest.mark.models
def test_babble_alone_gives_up_at_the_timeout(speak) -> None:
    """webrtcvad alone calls babble speech: without the noise floor the endpoint never gave up."""
    assert endpoint("babble", 10.0, None, speak=speak)[0] is SegmentState.NO_SPEECH
    assert endpoint("babble", 10.0, None, speak=speak, margin_db=0.0)[0] is not SegmentState.NO_SPEECH
