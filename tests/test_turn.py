"""End of turn with fakes: the decision logic in audio seconds, streaming transcription, and
the voice loop ending complete questions soon and incomplete ones late (never cut off)."""

import asyncio
from types import SimpleNamespace

import pytest

from companion.events import Event, EventType, PipelineState
from companion.settings import TurnSettings
from companion.stages.sentences import split_sentences
from companion.stages.stt import StreamingTranscription, Word, agreed_prefix
from companion.stages.turn import TurnPolicy, is_instant_command, normalize_transcript
from tests.conftest import fake_app, make_settings, until
from tests.fakes import (
    BLOCK,
    BlockWordsTranscriber,
    FakeMic,
    FakeSynthesizer,
    FakeTurnChatModel,
    speech_block,
    wake_block,
)
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


class GatedMic(FakeMic):
    """Blocks, and conditions (callables) the microphone waits for before it goes on."""

    async def blocks(self):
        for item in self._blocks:
            if callable(item):
                await until(item, what="the microphone's condition")
            else:
                yield item


async def run_turn(tmp_path, blocks, *, words=WORDS, keep_app: list | None = None,
                   llm: FakeTurnChatModel | None = None, tts: FakeSynthesizer | None = None,
                   **settings) -> tuple[list[Event], FakeTurnChatModel]:
    llm = llm or FakeTurnChatModel("Berlin. It is big.")
    app = fake_app(make_settings(tmp_path, pipeline={"follow_up_window_s": 0}, **settings),
                   source=GatedMic(blocks), stt=BlockWordsTranscriber(words), llm=llm,
                   tts=tts or FakeSynthesizer())
    events: list[Event] = []
    app.bus.add_callback(events.append)
    await app.start()
    await run_mic(app, limit_s=10)
    if keep_app is not None:
        keep_app.append(app)  # the caller reads its store and speaker, and closes it
    else:
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


def history(app) -> list[tuple[str, str]]:
    session = app.store.get_session(app.conversation.active_session_id)
    return [(m.role, m.content) for m in session.messages]


async def test_a_pause_judged_complete_begins_the_answer_and_the_endpoint_plays_it(tmp_path):
    apps: list = []
    events, llm = await run_turn(tmp_path, pausy(6, 0, pause_blocks=0), keep_app=apps)
    app = apps[0]
    starts = only(events, EventType.LLM_START)
    assert len(starts) == 1 and starts[0]["speculative"] is True and starts[0]["ahead_s"] >= 0
    assert len(llm.prompts) == 1  # the answer begun ahead is the answer: written once
    # its events and playback come after the endpoint, in the usual order
    kinds = [e.type for e in events]
    assert kinds.index(EventType.SPEECH_END) < kinds.index(EventType.LLM_START) \
        < kinds.index(EventType.LLM_SENTENCE) < kinds.index(EventType.PLAYBACK_START)
    assert [e["text"] for e in only(events, EventType.PLAYBACK_START)] == ["Berlin.", "It is big."]
    assert history(app) == [("user", "what is the capital of germany"),
                            ("assistant", "Berlin. It is big.")]
    await app.aclose()


async def test_speech_resuming_discards_the_answer_begun_at_the_pause(tmp_path):
    """ "what is the capital of germany" (judged complete: the answer begins), 0.21 s of
    silence, then "please": the first answer leaves no trace; the whole utterance is answered."""
    apps: list = []
    reply = "Berlin. It is big. It is old. It has a river."
    llm, tts = FakeTurnChatModel(reply, delay_s=0.05), FakeSynthesizer()
    blocks = pausy(6, 1, pause_blocks=7)
    resume = blocks.index(BLOCK, 7 + 30)  + 6  # the 7th silent block after "germany"
    # the microphone goes on once the answer begun at the pause has its first sentence's audio
    blocks.insert(resume, lambda: tts.spoken)
    events, llm = await run_turn(tmp_path, blocks, words=[*WORDS, "please"], keep_app=apps,
                                 llm=llm, tts=tts)
    app = apps[0]
    judged = only(events, EventType.END_OF_TURN)
    assert judged[0]["end_reason"] == "complete"  # an answer was begun at that pause ...
    assert llm.prompts[0][-1]["content"] == "what is the capital of germany"
    assert tts.spoken[0][0] == "Berlin."
    assert llm.cancelled == 1  # ... and stopped when speech resumed
    starts = only(events, EventType.LLM_START)
    assert len(starts) == 1 and starts[0]["speculative"] is False
    assert [e["user_text"] for e in only(events, EventType.EXCHANGE_RECORDED)] == [
        "what is the capital of germany please"]
    assert history(app)[0] == ("user", "what is the capital of germany please")
    assert len(history(app)) == 2
    played = [e["text"] for e in only(events, EventType.PLAYBACK_START)]
    assert played == split_sentences(reply)  # the whole reply, once
    assert len(app.sink.played) == 2 * len(played)  # each sentence and the silence after it
    await app.aclose()


async def test_answering_ahead_can_be_turned_off(tmp_path):
    events, llm = await run_turn(tmp_path, pausy(6, 0, pause_blocks=0),
                                 turn={"speculative_answer": False})
    starts = only(events, EventType.LLM_START)
    assert len(starts) == 1 and starts[0]["speculative"] is False
    assert len(llm.prompts) == 1


class HeldRound:
    """A wake-word round whose verdict (this device answers) waits for the test."""

    def __init__(self) -> None:
        self.result = asyncio.get_running_loop().create_future()
        self.release = asyncio.Event()

    async def commit(self) -> SimpleNamespace:
        await self.release.wait()
        return SimpleNamespace(won=True)


class HeldArbiter:
    def __init__(self) -> None:
        self.rounds: list[HeldRound] = []

    def begin(self, *args, **kwargs) -> HeldRound:
        self.rounds.append(HeldRound())
        return self.rounds[-1]


async def test_an_answer_begun_ahead_plays_only_once_the_turn_is_committed(tmp_path):
    llm, tts = FakeTurnChatModel("Berlin. It is big."), FakeSynthesizer()
    app = fake_app(make_settings(tmp_path, pipeline={"follow_up_window_s": 0}),
                   source=GatedMic(pausy(6, 0, pause_blocks=0)), stt=BlockWordsTranscriber(WORDS),
                   llm=llm, tts=tts)
    events: list[Event] = []
    app.bus.add_callback(events.append)
    await app.start()
    app.voice.arbiter = arbiter = HeldArbiter()
    async with asyncio.timeout(10):
        pump = asyncio.create_task(app.voice.run())
        await until(lambda: only(events, EventType.SPEECH_END) and tts.spoken)
        await pump
        assert app.sink.played == [] and not only(events, EventType.LLM_START)
        assert app.status.pipeline_state is not PipelineState.SPEAKING
        arbiter.rounds[0].release.set()
        await app.voice.wait_idle()
    assert only(events, EventType.LLM_START)[0]["speculative"] is True
    assert [e["text"] for e in only(events, EventType.PLAYBACK_START)] == ["Berlin.", "It is big."]
    await app.aclose()


def resumed_after_endpoint(events: list[Event]):
    """A microphone condition: the utterance has ended once (the answer is being prepared)."""
    return lambda: any(e.type is EventType.SPEECH_END for e in events)


async def run_resuming(tmp_path, *, tts: FakeSynthesizer, gate=None,
                       events: list[Event] | None = None, **settings):
    """ "what is the capital of germany" (complete), 0.6 s of silence (the endpoint falls at
    0.25 s), then "please": the microphone goes on past the pause once ``gate`` holds."""
    llm = FakeTurnChatModel("Berlin. It is big.")
    blocks = pausy(6, 1, pause_blocks=20)
    events = [] if events is None else events
    resume = blocks.index(BLOCK, 7 + 30) + 20  # the first block of "please"
    blocks.insert(resume, gate or resumed_after_endpoint(events))
    app = fake_app(make_settings(tmp_path, pipeline={"follow_up_window_s": 0}, **settings),
                   source=GatedMic(blocks), stt=BlockWordsTranscriber([*WORDS, "please"]),
                   llm=llm, tts=tts)
    app.bus.add_callback(events.append)
    await app.start()
    await run_mic(app, limit_s=10)
    return app, events, llm


async def test_going_on_after_the_endpoint_drops_the_answer_and_answers_the_whole(tmp_path):
    """The answer to "what is the capital of germany" is being prepared (its first sentence
    takes 0.5 s to synthesize) when "please" comes: nothing of it is played or kept."""
    app, events, llm = await run_resuming(tmp_path, tts=FakeSynthesizer(delay_s=0.5))
    resumed = only(events, EventType.SPEECH_RESUMED)
    assert len(resumed) == 1 and 0.3 <= resumed[0]["after_endpoint_s"] <= 0.4, resumed
    assert [e["text"] for e in only(events, EventType.STT_END)] == [
        "what is the capital of germany", "what is the capital of germany please"]
    assert [p[-1]["content"] for p in llm.prompts] == [  # the first answer was only written
        "what is the capital of germany", "what is the capital of germany please"]
    assert [e["user_text"] for e in only(events, EventType.EXCHANGE_RECORDED)] == [
        "what is the capital of germany please"]
    assert history(app) == [("user", "what is the capital of germany please"),
                            ("assistant", "Berlin. It is big.")]
    assert [e["text"] for e in only(events, EventType.PLAYBACK_START)] == ["Berlin.", "It is big."]
    assert not only(events, EventType.REPLY_INTERRUPTED)
    kinds = [e.type for e in events]
    assert kinds.count(EventType.TURN_START) == 1 and EventType.TURN_CANCELLED not in kinds
    await app.aclose()


async def test_speech_after_the_answer_is_heard_is_not_the_same_utterance(tmp_path):
    events: list[Event] = []
    app, events, _ = await run_resuming(
        tmp_path, tts=FakeSynthesizer(), events=events,
        gate=lambda: any(e.type is EventType.PLAYBACK_START for e in events))
    assert not only(events, EventType.SPEECH_RESUMED)
    assert [e["user_text"] for e in only(events, EventType.EXCHANGE_RECORDED)] == [
        "what is the capital of germany"]
    await app.aclose()


async def test_going_on_after_the_endpoint_can_be_turned_off(tmp_path):
    app, events, _ = await run_resuming(tmp_path, tts=FakeSynthesizer(delay_s=0.5),
                                        turn={"resume_window_s": 0})
    assert not only(events, EventType.SPEECH_RESUMED)
    assert [e["user_text"] for e in only(events, EventType.EXCHANGE_RECORDED)] == [
        "what is the capital of germany"]
    await app.aclose()


async def test_muting_past_the_endpoint_lets_the_answer_play(tmp_path):
    """The microphone goes off (the mute button) while the answer is being prepared: the
    device stops listening for the user going on, and still answers what was said."""
    events: list[Event] = []
    apps: list = []

    def mute_at_the_endpoint() -> bool:
        if not any(e.type is EventType.SPEECH_END for e in events):
            return False
        apps[0].voice.set_muted(True)
        return True

    llm = FakeTurnChatModel("Berlin. It is big.")
    blocks = pausy(6, 1, pause_blocks=20)
    blocks.insert(blocks.index(BLOCK, 7 + 30) + 12, mute_at_the_endpoint)
    app = fake_app(make_settings(tmp_path, pipeline={"follow_up_window_s": 0}),
                   source=GatedMic(blocks), stt=BlockWordsTranscriber([*WORDS, "please"]),
                   llm=llm, tts=FakeSynthesizer(delay_s=0.3))
    apps.append(app)
    app.bus.add_callback(events.append)
    await app.start()
    await run_mic(app, limit_s=10)
    assert not only(events, EventType.SPEECH_RESUMED)  # "please" was never heard
    assert EventType.TURN_CANCELLED not in [e.type for e in events]
    assert [e["text"] for e in only(events, EventType.PLAYBACK_START)] == ["Berlin.", "It is big."]
    assert [e["user_text"] for e in only(events, EventType.EXCHANGE_RECORDED)] == [
        "what is the capital of germany"]
    await app.aclose()
