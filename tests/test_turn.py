"""End of turn with fakes: the decision logic in audio seconds, streaming transcription, and
the voice loop ending complete questions soon and incomplete ones late (never cut off)."""

import pytest

from companion.events import Event, EventType
from companion.settings import TurnSettings
from companion.stages.stt import StreamingTranscription, Word, agreed_prefix
from companion.stages.turn import TurnPolicy, is_instant_command, normalize_transcript
from tests.conftest import fake_app, make_settings
from tests.fakes import BLOCK, BlockWordsTranscriber, FakeMic, FakeTurnChatModel, speech_block, wake_block
from tests.test_pipeline import run_mic

WORDS = ["what", "is", "the", "capital", "of", "germany"]


def test_policy_waits_short_when_complete_long_when_not_and_not_at_all_for_commands():
    policy = TurnPolicy(TurnSettings(), fixed_silence_s=0.6)
    assert policy.decide(0.9).reason == "complete"
    assert policy.decide(0.9).silence_needed_s == 0.25
    assert policy.decide(0.01).reason == "incomplete"
    assert policy.decide(0.01).silence_needed_s == 1.1
    assert policy.decide(None).silence_needed_s == 1.1  # the model failed: the safe window
    command = policy.decide(None, command=True)
    assert command.reason == "command" and command.silence_needed_s == 0.15
    assert policy.longest_silence_s == 1.1


def test_policy_switched_off_or_without_a_model_is_the_fixed_window():
    for policy in (TurnPolicy(TurnSettings(semantic=False), 0.6),
                   TurnPolicy(TurnSettings(), 0.6, model_available=False)):
        assert not policy.semantic
        assert policy.decide(0.99) == policy.decide(0.01)
        assert policy.decide(0.99).silence_needed_s == 0.6 == policy.longest_silence_s


def test_policy_settings_are_tunable():
    policy = TurnPolicy(TurnSettings(complete_threshold=0.8, complete_silence_s=0.3,
                                     incomplete_silence_s=1.5), 0.6)
    assert policy.decide(0.7).reason == "incomplete"
    assert policy.decide(0.85).silence_needed_s == 0.3
    assert policy.decide(0.7).silence_needed_s == 1.5


def test_instant_commands_and_normalized_words():
    assert is_instant_command("Stop.") and is_instant_command("louder") and \
        is_instant_command("Turn it down")
    assert not is_instant_command("how do I stop snoring")
    assert not is_instant_command("set a timer for five")  # "...minutes" may follow
    assert normalize_transcript("What is the capital of...") == "What is the capital of"
    assert normalize_transcript("How many legs? Does it have, 2.5?") == "How many legs Does it have, 2.5"


def test_two_passes_agree_on_a_prefix_ignoring_case_and_punctuation():
    a = [Word("What", 0, 0.2), Word("is", 0.2, 0.3), Word("the", 0.3, 0.4)]
    b = [Word("what", 0, 0.2), Word("is", 0.2, 0.3), Word("a", 0.3, 0.4)]
    assert agreed_prefix(a, b) == 2
    assert agreed_prefix([], b) == 0


async def test_streaming_commits_stable_words_and_decodes_only_the_rest():
    stt = BlockWordsTranscriber(WORDS)
    streaming = StreamingTranscription(stt)
    pcm = b""
    for word in range(len(WORDS)):
        pcm += speech_block() * 5 + BLOCK * 3
        transcript = await streaming.update(pcm)
        assert transcript.text == " ".join(WORDS[: word + 1])
    assert streaming.committed[:3] == WORDS[:3]  # agreed by two passes, not at the very end
    assert streaming.cut_s > 0
    final = await streaming.update(pcm + BLOCK * 10, final=True)
    assert final.text == " ".join(WORDS)
    # each pass decoded only what followed the committed words
    whole = sum(len(pcm[: (i + 1) * 8 * len(BLOCK)]) / 32000 for i in range(len(WORDS)))
    assert streaming.decoded_s < 0.75 * whole


def pausy(first: int, second: int, pause_blocks: int, tail_blocks: int = 60) -> list[bytes]:
    """The wake word, `first` words, a pause, `second` words, then silence (30 ms blocks)."""
    return ([BLOCK] * 3 + [wake_block()] + [BLOCK] * 3 + [speech_block()] * (5 * first)
            + [BLOCK] * pause_blocks + [speech_block()] * (5 * second) + [BLOCK] * tail_blocks)


async def run_turn(tmp_path, blocks, **settings) -> tuple[list[Event], FakeTurnChatModel]:
    llm = FakeTurnChatModel("Berlin.")
    app = fake_app(make_settings(tmp_path, pipeline={"follow_up_window_s": 0}, **settings),
                   source=FakeMic(blocks), stt=BlockWordsTranscriber(WORDS), llm=llm)
    events: list[Event] = []
    app.bus.add_callback(events.append)
    await app.start()
    await run_mic(app, limit_s=10)
    await app.aclose()
    return events, llm


def only(events: list[Event], kind: EventType) -> list[dict]:
    return [e.data for e in events if e.type is kind]


async def test_a_mid_sentence_pause_is_not_the_end_and_the_whole_question_comes_through(tmp_path):
    events, llm = await run_turn(tmp_path, pausy(5, 1, pause_blocks=25))  # a 0.75 s pause
    assert [e["text"] for e in only(events, EventType.STT_END)] == ["what is the capital of germany"]
    judged = only(events, EventType.END_OF_TURN)
    assert judged[0]["end_reason"] == "incomplete" and judged[0]["end_probability"] < 0.1
    end = only(events, EventType.SPEECH_END)
    assert len(end) == 1 and end[0]["end_reason"] == "complete"
    assert end[0]["end_probability"] == 0.9
    assert 0.24 <= end[0]["silence_s"] <= 0.3  # a complete question ends after a short silence
    assert llm.prompts[-1][-1]["content"] == "what is the capital of germany"


async def test_an_incomplete_utterance_ends_after_the_long_silence(tmp_path):
    events, _ = await run_turn(tmp_path, pausy(5, 0, pause_blocks=0, tail_blocks=60))
    end = only(events, EventType.SPEECH_END)[0]
    assert end["end_reason"] == "incomplete"
    assert 1.1 <= end["silence_s"] <= 1.15
    assert only(events, EventType.STT_END)[0]["text"] == "what is the capital of"


async def test_a_local_command_ends_at_once(tmp_path):
    llm = FakeTurnChatModel()
    app = fake_app(make_settings(tmp_path, pipeline={"follow_up_window_s": 0}),
                   source=FakeMic([wake_block()] + [speech_block()] * 12 + [BLOCK] * 60),
                   stt=BlockWordsTranscriber(["stop"], blocks_per_word=12), llm=llm)
    events: list[Event] = []
    app.bus.add_callback(events.append)
    await app.start()
    await run_mic(app, limit_s=10)
    await app.aclose()
    end = only(events, EventType.SPEECH_END)[0]
    assert end["end_reason"] == "command" and end["silence_s"] <= 0.18
    assert only(events, EventType.COMMAND)[0]["command"] == "stop"
    assert llm.judged == []  # no model call for a command


@pytest.mark.parametrize("turn", [{"semantic": False}, {"streaming_stt": False}])
async def test_switched_off_parts_fall_back(tmp_path, turn):
    events, llm = await run_turn(tmp_path, pausy(5, 1, pause_blocks=25),
                                 turn=turn, vad={"silence_end_s": 0.6})
    end = only(events, EventType.SPEECH_END)
    texts = [e["text"] for e in only(events, EventType.STT_END)]
    if turn.get("semantic") is False:
        # the fixed 0.6 s window: the 0.75 s pause cuts the question (what semantic ends fix)
        assert end[0]["end_reason"] == "silence" and texts[0] == "what is the capital of"
        assert llm.judged == []
    else:
        assert texts == ["what is the capital of germany"]
        assert only(events, EventType.STT_END)[0]["passes"] is None  # no streaming passes
