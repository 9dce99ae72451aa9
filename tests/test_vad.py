"""The endpointing logic counts audio seconds: tested without sleeping."""

import pytest

from companion.settings import VadSettings
from companion.stages.vad import Endpointer, SegmentState, SpeechSegmenter
from tests.fakes import BLOCK, FakeVad, speech_block

CHUNK = 0.03
SETTINGS = VadSettings(speech_start_s=0.09, silence_end_s=0.6, max_utterance_s=5.0,
                       no_speech_timeout_s=2.0, pre_roll_s=0.3)


def feed(seg: SpeechSegmenter, seconds: float, speech: bool) -> SegmentState:
    state = seg.state
    for _ in range(round(seconds / CHUNK)):
        state = seg.process(CHUNK, speech)
    return state


def test_speech_starts_only_after_enough_speech():
    seg = SpeechSegmenter(SETTINGS)
    assert feed(seg, 0.06, True) is SegmentState.WAITING
    assert feed(seg, 0.03, True) is SegmentState.SPEECH
    assert seg.speech_start_s == pytest.approx(0.0)


def test_a_click_does_not_start_speech():
    seg = SpeechSegmenter(SETTINGS)
    feed(seg, 0.03, True)
    assert feed(seg, 0.3, False) is SegmentState.WAITING


def test_end_after_silence_window_and_end_time_is_where_speech_stopped():
    seg = SpeechSegmenter(SETTINGS)
    feed(seg, 0.5, False)
    feed(seg, 1.0, True)
    assert feed(seg, 0.57, False) is SegmentState.SPEECH  # not yet: 0.57 s < 0.6 s
    assert feed(seg, 0.03, False) is SegmentState.ENDED
    assert seg.speech_end_s == pytest.approx(1.5, abs=1e-6)


def test_a_short_pause_inside_speech_does_not_end_it():
    seg = SpeechSegmenter(SETTINGS)
    feed(seg, 0.5, True)
    feed(seg, 0.4, False)
    assert feed(seg, 0.3, True) is SegmentState.SPEECH
    assert seg.silence_s == 0.0


def test_no_speech_timeout_counts_audio_seconds():
    seg = SpeechSegmenter(SETTINGS)
    assert feed(seg, 1.98, False) is SegmentState.WAITING
    assert feed(seg, 0.03, False) is SegmentState.NO_SPEECH


def test_maximum_utterance_length_ends_speech():
    seg = SpeechSegmenter(SETTINGS)
    assert feed(seg, 5.1, True) is SegmentState.ENDED
    assert seg.hit_max_length


def test_final_states_are_sticky():
    seg = SpeechSegmenter(SETTINGS)
    feed(seg, 2.1, False)
    assert seg.process(CHUNK, True) is SegmentState.NO_SPEECH


def test_endpointer_keeps_pre_roll_so_the_first_syllable_survives():
    ep = Endpointer(SETTINGS, FakeVad())
    quiet = [bytes([i, 0]) + BLOCK[2:] for i in range(20)]  # distinguishable silent blocks
    for block in quiet:
        ep.feed(block)
    for _ in range(10):
        ep.feed(speech_block())
    for _ in range(25):
        ep.feed(BLOCK)
    result = ep.result()
    assert result.state is SegmentState.ENDED
    # at least 0.3 s (10 blocks) of what came before the speech is kept in front of it
    assert b"".join(quiet[-10:]) + speech_block() * 10 in result.audio
    # trailing silence is trimmed to about 0.2 s
    tail = len(result.audio) - result.audio.rindex(speech_block()) - len(speech_block())
    assert abs(tail - int(0.2 * 16000) * 2) <= 960


def test_endpointer_without_speech_has_no_audio():
    ep = Endpointer(SETTINGS, FakeVad())
    for _ in range(70):
        ep.feed(BLOCK)
    assert ep.result().state is SegmentState.NO_SPEECH
    assert ep.result().audio == b""


def test_real_webrtcvad_tells_speech_from_silence():
    """Real speech (espeak-ng, a voice the models never made) against digital silence, judged
    30 ms frame by 30 ms frame as the pipeline does."""
    from companion.stages.vad import WebRtcVad
    from scripts.make_utterance_wav import speak_espeak

    vad = WebRtcVad(2)
    speech = speak_espeak("The quick brown fox jumps over the lazy dog, then runs home.")
    frames = [speech[i : i + len(BLOCK)] for i in range(0, len(speech) - len(BLOCK) + 1, len(BLOCK))]
    voiced = sum(vad.is_speech(frame) for frame in frames) / len(frames)
    assert voiced > 0.6, f"only {voiced:.0%} of the sentence's frames were heard as speech"
    assert not any(vad.is_speech(BLOCK) for _ in range(10))
    # a longer block is judged by its 30 ms frames: speech when any frame is
    # (a fresh detector each time: webrtcvad keeps saying "speech" for a few frames after it)
    spoken = next(frame for frame in frames if WebRtcVad(2).is_speech(frame))
    assert WebRtcVad(2).is_speech(BLOCK * 2 + spoken) and not WebRtcVad(2).is_speech(BLOCK * 3)


def test_too_little_speech_is_noise_and_waiting_goes_on():
    """The tail of the wake word (a few blocks of speech) then the pause before the question
    must not end the utterance: it is discarded and the question is the utterance."""
    seg = SpeechSegmenter(SETTINGS.model_copy(update={"min_speech_s": 0.3}))
    feed(seg, 0.09, True)  # 90 ms: starts a segment...
    assert seg.state is SegmentState.SPEECH
    assert feed(seg, 0.6, False) is SegmentState.WAITING  # ...but it is too short: discarded
    assert seg.discarded == 1
    feed(seg, 0.9, True)
    assert feed(seg, 0.6, False) is SegmentState.ENDED
    assert seg.speech_start_s == pytest.approx(0.69, abs=1e-6)


def test_endpointer_drops_a_discarded_blip_from_the_utterance():
    ep = Endpointer(SETTINGS, FakeVad())
    blip = b"\x20\x20" * 480
    for block in [blip] * 3 + [BLOCK] * 25 + [speech_block()] * 20 + [BLOCK] * 25:
        ep.feed(block)
    result = ep.result()
    assert result.state is SegmentState.ENDED
    assert blip not in result.audio and speech_block() * 20 in result.audio
