"""The voice loop with fakes: event order, cancellation, mute, follow-up, failures."""

import asyncio

from companion.actions import buttons
from companion.events import Event, EventType, PipelineState
from companion.pipeline import LocalAction
from companion.stages.llm import Priority
from tests.conftest import fake_app, make_settings, until
from tests.fakes import BLOCK, FakeChatModel, FakeMic, FakeSpeaker, FakeTranscriber, speech_block, wake_block

UTTERANCE = [BLOCK] * 5 + [wake_block()] + [speech_block()] * 20 + [BLOCK] * 40


def collect(app) -> list[Event]:
    events: list[Event] = []
    app.bus.add_callback(events.append)
    return events


def types(events: list[Event]) -> list[EventType]:
    wanted = {EventType.WAKE_DETECTED, EventType.TURN_START, EventType.SPEECH_START,
              EventType.SPEECH_END, EventType.STT_START, EventType.STT_END, EventType.LLM_START,
              EventType.LLM_FIRST_TOKEN, EventType.LLM_SENTENCE, EventType.LLM_END,
              EventType.TTS_START, EventType.TTS_END, EventType.PLAYBACK_START,
              EventType.PLAYBACK_END, EventType.TURN_END, EventType.NO_SPEECH,
              EventType.TURN_CANCELLED, EventType.TURN_ERROR, EventType.COMMAND}
    return [e.type for e in events if e.type in wanted]


async def until_seen(events: list[Event], kind: EventType, limit_s: float = 5.0) -> None:
    await until(lambda: any(e.type is kind for e in events), limit_s, what=f"{kind} event")


async def run_mic(app, limit_s: float = 15.0) -> None:
    """Pump the fake microphone to its end and wait for the last turn (the bound is generous:
    a loaded CI machine renders a failing turn's traceback slowly)."""
    async with asyncio.timeout(limit_s):
        await app.voice.run()
        await app.voice.wait_idle()


async def test_a_turn_emits_every_stage_in_order(tmp_path):
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    llm = FakeChatModel("Paris is the capital. It is lovely.")
    app = fake_app(settings, source=FakeMic(UTTERANCE), llm=llm)
    events = collect(app)
    await app.start()
    await run_mic(app)
    assert llm.priorities == [Priority.VOICE]  # a person is waiting: ahead of other LLM work
    T = EventType
    seen = types(events)
    assert seen[:7] == [T.WAKE_DETECTED, T.TURN_START, T.SPEECH_START, T.SPEECH_END, T.STT_START,
                        T.STT_END, T.LLM_START]
    assert seen[-1] is T.TURN_END
    sentences = [e.data["text"] for e in events if e.type is T.LLM_SENTENCE]
    assert sentences == ["Paris is the capital.", "It is lovely."]
    # the first sentence is spoken before the LLM has finished the second one
    first_tts = seen.index(T.TTS_START)
    assert first_tts < seen.index(T.LLM_END)
    assert [e.data["text"] for e in events if e.type is T.PLAYBACK_START] == sentences
    # every event of the turn carries the turn's id
    turn_ids = {e.turn_id for e in events if e.type in (T.TURN_START, T.STT_END, T.TURN_END)}
    assert len(turn_ids) == 1 and None not in turn_ids
    timings = next(e for e in events if e.type is T.TURN_END).data["timings"]
    assert timings["end_of_speech_to_first_audio_s"] is not None
    assert app.status.pipeline_state is PipelineState.IDLE
    # the turn is remembered
    session = app.store.get_session(app.conversation.active_session_id)
    assert [m.role for m in session.messages] == ["user", "assistant"]
    await app.aclose()


async def test_the_transcriber_gets_the_utterance_with_pre_roll(tmp_path):
    stt = FakeTranscriber()
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    blocks = [wake_block()] + [BLOCK] * 15 + [speech_block()] * 20 + [BLOCK] * 40
    app = fake_app(settings, source=FakeMic(blocks), stt=stt)
    await app.start()
    await run_mic(app)
    audio = stt.received[-1]
    assert speech_block() * 20 in audio
    assert audio.index(speech_block()) > 0  # pre-roll in front
    await app.aclose()


async def test_silence_after_the_wake_word_ends_with_no_speech(tmp_path):
    settings = make_settings(tmp_path, vad={"no_speech_timeout_s": 1.0})
    app = fake_app(settings, source=FakeMic([wake_block()] + [BLOCK] * 60))
    events = collect(app)
    await app.start()
    await run_mic(app)
    assert EventType.NO_SPEECH in types(events)
    assert EventType.LLM_START not in types(events)
    assert EventType.TURN_ERROR not in types(events)
    assert not app.sink.played
    await app.aclose()


async def test_wake_word_while_speaking_barges_in(tmp_path):
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    sink = FakeSpeaker(realtime=True)  # one word = 0.1 s of playback
    long_reply = " ".join(["This is a long sentence that takes a while to say."] * 6)
    blocks = UTTERANCE[:-40] + [BLOCK] * 30 + [wake_block()] + [BLOCK] * 80
    app = fake_app(settings, source=FakeMic(blocks, delay_s=0.005), sink=sink,
                   llm=FakeChatModel(long_reply))
    events = collect(app)
    await app.start()
    await run_mic(app, limit_s=10)
    seen = types(events)
    assert seen.count(EventType.WAKE_DETECTED) == 2
    cancelled = next(e for e in events if e.type is EventType.TURN_CANCELLED)
    first_turn = cancelled.turn_id
    after = events[events.index(cancelled):]
    # nothing more of the first turn is played once it is cancelled
    assert not [e for e in after if e.type is EventType.PLAYBACK_START and e.turn_id == first_turn]
    # far less was played than the whole reply (6 sentences of 11 words, 0.1 s a word)
    assert sink.played_s < 6 * 11 * 0.1 / 2
    await app.aclose()


async def test_button_starts_a_turn_without_the_wake_word(tmp_path):
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    mic = FakeMic([BLOCK] * 3 + [speech_block()] * 20 + [BLOCK] * 40, delay_s=0.002)
    app = fake_app(settings, source=mic)
    events = collect(app)
    await app.start()
    buttons.talk(app, "short")
    await run_mic(app)
    start = next(e for e in events if e.type is EventType.TURN_START)
    assert start.data["trigger"] == "button"
    assert EventType.TURN_END in types(events)
    await app.aclose()


async def test_follow_up_window_listens_again_without_the_wake_word(tmp_path):
    settings = make_settings(tmp_path)
    blocks = UTTERANCE[:-40] + [BLOCK] * 25 + [speech_block()] * 20 + [BLOCK] * 40
    app = fake_app(settings, source=FakeMic(blocks, delay_s=0.002))
    events = collect(app)
    await app.start()
    await run_mic(app)
    starts = [e.data for e in events if e.type is EventType.TURN_START]
    assert [s["trigger"] for s in starts][:2] == ["wake", "follow-up"]
    assert types(events).count(EventType.LLM_START) == 2
    assert types(events).count(EventType.WAKE_DETECTED) == 1
    await app.aclose()


async def test_mute_cuts_the_microphone(tmp_path):
    settings = make_settings(tmp_path)
    app = fake_app(settings, source=FakeMic(UTTERANCE))
    events = collect(app)
    await app.start()
    app.voice.set_muted(True)
    await run_mic(app)
    assert EventType.WAKE_DETECTED not in types(events)
    assert app.status.pipeline_state is PipelineState.MUTED
    assert app.voice.wake.seen == 0
    await app.aclose()


async def test_local_command_skips_the_llm(tmp_path):
    async def handler(text: str, turn_id: str):
        return LocalAction(speak="Stopping.", name="stop")

    llm = FakeChatModel()
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    app = fake_app(settings, source=FakeMic(UTTERANCE), llm=llm, intent_handler=handler)
    events = collect(app)
    await app.start()
    await run_mic(app)
    assert EventType.STT_END in types(events)
    assert EventType.LLM_START not in types(events)
    assert llm.prompts == []
    assert app.tts.spoken[-1][0] == "Stopping."
    await app.aclose()


async def test_a_failing_stage_is_reported_and_the_loop_goes_on(tmp_path):
    class BrokenTranscriber(FakeTranscriber):
        async def transcribe(self, pcm, *, language=None):
            raise RuntimeError("decoder exploded")

    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    app = fake_app(settings, source=FakeMic(UTTERANCE + UTTERANCE), stt=BrokenTranscriber())
    events = collect(app)
    await app.start()
    await run_mic(app, limit_s=30)  # each failure's traceback is rendered with its locals: slow
    errors = [e for e in events if e.type is EventType.TURN_ERROR]
    assert len(errors) == 2 and "decoder exploded" in errors[0].data["message"]
    assert app.tts.spoken[0][0] == "Sorry, something went wrong."
    assert app.status.pipeline_state is PipelineState.IDLE
    await app.aclose()


async def test_turn_timeout_ends_a_stuck_turn(tmp_path):
    settings = make_settings(tmp_path, pipeline={"turn_timeout_s": 1.5, "follow_up_window_s": 0})
    app = fake_app(settings, source=FakeMic(UTTERANCE), llm=FakeChatModel(delay_s=10))
    events = collect(app)
    await app.start()
    await run_mic(app, limit_s=5)
    error = next(e for e in events if e.type is EventType.TURN_ERROR)
    assert error.data["code"] == "turn-timeout"
    await app.aclose()


async def test_speculative_transcription_is_used_when_the_pause_was_the_end(tmp_path):
    stt = FakeTranscriber(delay_s=0.05)
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    # paced like a real microphone: 30 ms blocks every 5 ms is enough for the fake STT
    app = fake_app(settings, source=FakeMic(UTTERANCE, delay_s=0.01), stt=stt)
    events = collect(app)
    await app.start()
    await run_mic(app, limit_s=5)
    stt_end = next(e for e in events if e.type is EventType.STT_END)
    assert stt_end.data["speculative"] is True
    assert len(stt.received) == 1
    await app.aclose()


async def test_speech_resuming_after_a_pause_discards_the_speculation(tmp_path):
    stt = FakeTranscriber()
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    blocks = ([wake_block()] + [speech_block()] * 10 + [BLOCK] * 12 + [speech_block()] * 10
              + [BLOCK] * 40)
    app = fake_app(settings, source=FakeMic(blocks, delay_s=0.003), stt=stt)
    await app.start()
    await run_mic(app, limit_s=5)
    # the transcript used covers both halves of the utterance
    assert stt.received[-1].count(speech_block()) == 20
    await app.aclose()


async def test_listen_once_returns_a_transcript_without_answering(tmp_path):
    llm = FakeChatModel()
    settings = make_settings(tmp_path)
    blocks = [BLOCK] * 3 + [speech_block()] * 20 + [BLOCK] * 40
    app = fake_app(settings, source=FakeMic(blocks, delay_s=0.002), llm=llm,
                   stt=FakeTranscriber("paris"))
    await app.start()
    pump = asyncio.create_task(app.voice.run())
    async with asyncio.timeout(3):
        text = await app.voice.listen_once()
    assert text == "paris"
    assert llm.prompts == []
    await pump
    await app.aclose()


async def test_the_wake_words_tail_and_a_pause_do_not_swallow_the_question(tmp_path):
    stt = FakeTranscriber()
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    blocks = [wake_block()] + [speech_block()] * 2 + [BLOCK] * 25 + [speech_block()] * 20 + [BLOCK] * 40
    app = fake_app(settings, source=FakeMic(blocks), stt=stt)
    events = collect(app)
    await app.start()
    await run_mic(app)
    assert speech_block() * 20 in stt.received[-1]
    assert EventType.LLM_START in types(events)
    await app.aclose()


async def test_follow_ups_can_be_turned_off_device_wide(tmp_path):
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    blocks = UTTERANCE[:-40] + [BLOCK] * 25 + [speech_block()] * 20 + [BLOCK] * 40
    app = fake_app(settings, source=FakeMic(blocks, delay_s=0.002))
    events = collect(app)
    await app.start()
    await run_mic(app)
    assert [e.data["trigger"] for e in events if e.type is EventType.TURN_START] == ["wake"]
    await app.aclose()


async def test_a_wake_phrase_said_in_a_follow_up_is_not_answered_as_a_question(tmp_path):
    llm = FakeChatModel()
    stt = FakeTranscriber("Hey Jarvis, what is the time in Paris?")
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    app = fake_app(settings, source=FakeMic(UTTERANCE), stt=stt, llm=llm)
    await app.start()
    await run_mic(app)
    assert llm.prompts[-1][-1]["content"] == "what is the time in Paris?"
    await app.aclose()


async def test_only_the_wake_phrase_means_listen_again(tmp_path):
    llm = FakeChatModel()
    settings = make_settings(tmp_path)
    app = fake_app(settings, source=FakeMic(UTTERANCE, delay_s=0.002),
                   stt=FakeTranscriber("Hey Jarvis."), llm=llm)
    events = collect(app)
    await app.start()
    await run_mic(app)
    assert llm.prompts == []
    no_speech = [e for e in events if e.type is EventType.NO_SPEECH]
    assert no_speech[0].data["reason"] == "wake word only"
    await app.aclose()


# --- regressions found in review ---------------------------------------------------------------


async def test_barge_in_releases_a_listen_once_instead_of_leaving_it_waiting(tmp_path):
    settings = make_settings(tmp_path, vad={"no_speech_timeout_s": 60})
    app = fake_app(settings, source=FakeMic([BLOCK] * 10_000, delay_s=0.01))
    await app.start()
    pump = asyncio.create_task(app.voice.run())
    listener = asyncio.create_task(app.voice.listen_once())
    await until(lambda: app.status.pipeline_state is PipelineState.LISTENING)
    app.voice.barge_in()  # e.g. the stop command during a trivia answer
    async with asyncio.timeout(1):
        assert await listener is None
    assert app.status.pipeline_state is PipelineState.IDLE
    pump.cancel()
    await asyncio.gather(pump, return_exceptions=True)
    await app.aclose()


async def test_a_follow_up_window_does_not_cancel_speech_queued_behind_the_reply(tmp_path):
    settings = make_settings(tmp_path)
    sink = FakeSpeaker(realtime=True, speed=4)
    mic = FakeMic(UTTERANCE + [BLOCK] * 400, delay_s=0.005)
    app = fake_app(settings, source=mic, sink=sink)
    events = collect(app)
    await app.start()
    pump = asyncio.create_task(app.voice.run())
    await until_seen(events, EventType.PLAYBACK_START)
    voice = app.conversation.active_persona.voice_config.params()
    alarm = asyncio.create_task(app.speech.say("Your timer is done.", voice))  # waits its turn
    async with asyncio.timeout(10):
        await alarm
    assert "Your timer is done." in [text for text, _ in app.tts.spoken]
    pump.cancel()
    await asyncio.gather(pump, return_exceptions=True)
    await app.aclose()


async def test_barge_in_stops_the_llm_not_just_the_speaker(tmp_path):
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    llm = FakeChatModel("One sentence here. " * 200, delay_s=0.01)
    app = fake_app(settings, source=FakeMic(UTTERANCE + [BLOCK] * 200, delay_s=0.005), llm=llm,
                   sink=FakeSpeaker(realtime=True))
    events = collect(app)
    await app.start()
    pump = asyncio.create_task(app.voice.run())
    await until_seen(events, EventType.PLAYBACK_START)
    buttons.talk(app, "short")  # barge-in
    await until(lambda: llm.cancelled, 1, what="the LLM cancelled")
    pump.cancel()
    await asyncio.gather(pump, return_exceptions=True)
    await app.aclose()


async def test_the_talk_button_does_nothing_while_muted(tmp_path):
    app = fake_app(make_settings(tmp_path), source=FakeMic([BLOCK] * 50, delay_s=0.005))
    events = collect(app)
    await app.start()
    app.voice.set_muted(True)
    buttons.talk(app, "short")
    await run_mic(app)
    assert EventType.TURN_START not in types(events)
    assert app.status.pipeline_state is PipelineState.MUTED
    await app.aclose()


async def test_the_turn_timeout_does_not_cut_a_long_reply(tmp_path):
    settings = make_settings(tmp_path, pipeline={"turn_timeout_s": 1.5, "follow_up_window_s": 0})
    long_reply = "This reply takes a good while to say out loud. " * 4  # ~4 s of audio
    app = fake_app(settings, source=FakeMic(UTTERANCE), llm=FakeChatModel(long_reply),
                   sink=FakeSpeaker(realtime=True))
    events = collect(app)
    await app.start()
    await run_mic(app, limit_s=10)
    assert EventType.TURN_END in types(events) and EventType.TURN_ERROR not in types(events)
    await app.aclose()


async def test_closing_the_app_stops_a_running_turn(tmp_path):
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    app = fake_app(settings, source=FakeMic(UTTERANCE), llm=FakeChatModel(delay_s=10))
    await app.start()
    await app.voice.run()
    assert app.voice.busy
    async with asyncio.timeout(2):
        await app.aclose()
    assert not app.voice.busy


async def test_a_wake_word_said_while_thinking_is_caught_when_the_reply_starts(tmp_path):
    settings = make_settings(tmp_path, pipeline={"follow_up_window_s": 0})
    llm = FakeChatModel("Paris is the capital. It is lovely.", delay_s=0.05)
    blocks = UTTERANCE[:-40] + [BLOCK] * 25 + [wake_block()] + [BLOCK] * 200
    app = fake_app(settings, source=FakeMic(blocks, delay_s=0.005), llm=llm,
                   sink=FakeSpeaker(realtime=True))
    events = collect(app)
    await app.start()
    await run_mic(app, limit_s=10)
    wakes = [i for i, e in enumerate(events) if e.type is EventType.WAKE_DETECTED]
    first_audio = next(i for i, e in enumerate(events) if e.type is EventType.PLAYBACK_START)
    assert len(wakes) == 2 and wakes[1] > first_audio  # deferred, not lost
    assert EventType.TURN_CANCELLED in types(events)  # and it barged in
    await app.aclose()
