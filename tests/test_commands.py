"""Actions on the daemon (fakes), and the voice pipeline's local-command hook."""

from __future__ import annotations

import asyncio

import pytest

from companion.actions import ActionError, Context
from companion.actions.voice import make_intent_handler
from companion.events import EventType
from companion.settings import PROJECT_ROOT
from tests.conftest import fake_app, make_settings, until
from tests.fakes import BLOCK, FakeMic, FakeTranscriber, speech_block, wake_block


@pytest.fixture
def app(started_app):
    return started_app


class Runner:
    """``await run("timer", {...})`` as the HTTP API would."""

    def __init__(self, app, source="api"):
        self.app, self.source = app, source

    async def execute(self, name, args=None):
        return await self.app.actions.run(name, args, context=Context(self.source))


def commands_for(app):
    return Runner(app)


def collect(app, *types):
    events = []
    app.bus.add_callback(lambda e: events.append(e) if e.type in types else None)
    return events


async def test_timer_rings_speaks_and_emits(app):
    events = collect(app, EventType.TIMER_SET, EventType.TIMER_RANG)
    commands = commands_for(app)
    async with asyncio.timeout(5):
        out = await commands.execute("timer", {"seconds": 0.05, "label": "tea"})
        assert out.result["label"] == "tea"
        assert out.speak.startswith("Timer set for")
        await app.timers.by_id[out.result["id"]].task
    assert [e.type for e in events] == [EventType.TIMER_SET, EventType.TIMER_RANG]
    assert events[1].data["label"] == "tea"
    assert ("The tea timer is done.", app.conversation.active_persona.voice_config.params()) \
        in app.tts.spoken
    assert app.sink.played and not app.timers.by_id


async def test_timer_list_and_cancel(app):
    commands = commands_for(app)
    async with asyncio.timeout(5):
        a = await commands.execute("timer", {"minutes": 5})
        b = await commands.execute("timer", {"seconds": 30, "label": "eggs"})
        listed = await commands.execute("timer", {"action": "list"})
        assert [t["id"] for t in listed.result["timers"]] == [b.result["id"], a.result["id"]]
        assert "eggs timer has 30 seconds left" in listed.speak
        out = await commands.execute("timer", {"action": "cancel", "id": a.result["id"]})
        assert out.result["cancelled"] == [a.result["id"]]
        with pytest.raises(ActionError) as err:
            await commands.execute("timer", {"action": "cancel", "id": "tmr_nope"})
        assert err.value.status == 404 and err.value.code == "NOT_FOUND"
        await commands.execute("timer", {"action": "cancel"})
    assert app.timers.by_id == {}
    for bad in ({}, {"seconds": 90000}):
        with pytest.raises(ActionError) as err:
            await commands.execute("timer", bad)
        assert err.value.code == "VALIDATION_ERROR" and err.value.status == 422


async def test_volume_mute_and_events(app):
    events = collect(app, EventType.VOLUME_CHANGED, EventType.MUTE_CHANGED)
    commands = commands_for(app)
    async with asyncio.timeout(5):
        out = await commands.execute("volume", {"change": "up"})
        assert out.result == {"volume": 90, "previous": 80}
        assert app.sink.volume == pytest.approx(0.9)
        out = await commands.execute("volume", {"change": "up", "step": 50})
        assert out.result["volume"] == 100 and "loud as I go" in out.speak
        await commands.execute("volume", {"change": "down"})
        assert (await commands.execute("volume", {})).result == {"volume": 90}
        await commands.execute("mute")
        assert app.status.muted
        await commands.execute("unmute")
        assert not app.status.muted
    assert [e.type for e in events] == [EventType.VOLUME_CHANGED] * 3 + [EventType.MUTE_CHANGED] * 2


async def test_say_stop_help_status_time(app):
    commands = commands_for(app)
    async with asyncio.timeout(5):
        out = await commands.execute("say", {"text": "Lunch is ready. Come down.", "wait": True})
        assert out.result["spoken"] is True
        assert [t for t, _ in app.tts.spoken] == ["Lunch is ready.", "Come down."]
        stop = await commands.execute("stop")
        assert stop.result == {"stopped": False}
        help_ = await commands.execute("help")
        assert {c["command"] for c in help_.result["commands"]} >= {"timer", "say", "persona"}
        status = await commands.execute("status")
        assert status.result["persona_id"] == "companion" and status.result["muted"] is False
        now = await commands.execute("time", {"date": True})
        assert now.speak.startswith("Today is") and len(now.result["time"]) == 5


async def test_stop_cuts_speech_in_progress(settings):
    from tests.fakes import FakeSpeaker

    app = fake_app(settings, sink=FakeSpeaker(realtime=True))
    commands = commands_for(app)
    async with asyncio.timeout(5):
        await app.start()
        await commands.execute("say", {"text": "This is a long announcement " * 10})
        await until(lambda: app.speech.speaking)
        out = await commands.execute("stop")
        assert out.result["stopped"] is True
        await asyncio.gather(*app.actions._background, return_exceptions=True)
    assert not app.speech.speaking
    await app.aclose()


async def test_persona_by_id_or_spoken_name(app):
    commands = commands_for(app)
    async with asyncio.timeout(5):
        out = await commands.execute("persona", {"name": "the nurse"})
        assert out.result["new_persona_id"] == "medication_nurse"
        assert out.speak == "Hello, this is Nora."
        out = await commands.execute("persona", {})
        assert out.result["persona_id"] == "medication_nurse"
        with pytest.raises(ActionError) as err:
            await commands.execute("persona", {"id": "pirate"})
        assert err.value.status == 404


async def test_unknown_command_lists_known(app):
    with pytest.raises(ActionError) as err:
        await commands_for(app).execute("fly")
    assert err.value.status == 404 and "timer" in err.value.details["known_commands"]


async def test_persona_can_forbid_commands(tmp_path):
    library = tmp_path / "personas"
    library.mkdir()
    text = (PROJECT_ROOT / "personas" / "companion.toml").read_text()
    (library / "companion.toml").write_text(
        text.replace('allowed_commands = ["*"]', 'allowed_commands = ["time"]'))
    app = fake_app(make_settings(tmp_path, personas={"dir": library, "default": "companion"}))
    async with asyncio.timeout(5):
        await app.start()
        commands = commands_for(app)
        assert (await commands.execute("time")).result["time"]
        assert (await commands.execute("help")).result["commands"]  # always allowed
        with pytest.raises(ActionError) as err:
            await commands.execute("say", {"text": "hi"})
        assert err.value.status == 403 and err.value.details["allowed_commands"] == ["time"]
        handler = make_intent_handler(app)
        action = await handler("be quieter", "turn_1")
    assert action is not None and "can't" in action.speak
    await app.aclose()


async def test_listen_starts_a_turn_like_the_button(settings):
    mic = FakeMic([BLOCK] * 200, delay_s=0.005)
    app = fake_app(settings, source=mic)
    events = collect(app, EventType.TURN_START)
    async with asyncio.timeout(5):
        await app.start()
        pump = asyncio.create_task(app.voice.run())
        out = await commands_for(app).execute("listen")
        assert out.result["turn_id"]
        await app.voice.wait_idle()
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
    assert events[0].data["trigger"] == "api" and events[0].turn_id == out.result["turn_id"]
    await app.aclose()


async def test_intent_handler_keeps_questions_for_the_llm(app):
    handler = make_intent_handler(app)
    async with asyncio.timeout(5):
        assert await handler("what is the capital of france", "t1") is None
        assert await handler("say hello", "t1") is None  # not confident enough by voice
        action = await handler("what time is it", "t1")
    assert action is not None and action.name == "time" and action.speak.startswith("It is")


@pytest.mark.parametrize(("said", "check"), [
    ("set a timer for five minutes", "timer"),
    ("switch to the nurse", "persona"),
    ("be quieter", "volume"),
])
async def test_voice_turn_runs_local_commands_without_the_llm(settings, said, check):
    mic = FakeMic([BLOCK] * 5 + [wake_block()] + [speech_block()] * 20 + [BLOCK] * 40)
    app = fake_app(settings, source=mic, stt=FakeTranscriber(said))
    events = collect(app, EventType.COMMAND, EventType.TIMER_SET)
    async with asyncio.timeout(5):
        await app.start()
        await app.voice.run()
        await app.voice.wait_idle()
    assert app.llm.prompts == []  # the LLM was never asked
    commands = [e.data for e in events if e.type is EventType.COMMAND]
    # one command, one event (the registry's; the pipeline once emitted a second one)
    assert [(c["command"], c["source"], c["text"]) for c in commands] == [(check, "voice", said)]
    spoken = " ".join(t for t, _ in app.tts.spoken)
    if check == "timer":
        assert "Timer set for 5 minutes." in spoken
        assert len(app.timers) == 1
    elif check == "persona":
        assert app.conversation.active_persona_id == "medication_nurse"
        assert "Hello, this is Nora." in spoken
    else:
        assert app.status.volume == pytest.approx(0.7)
    await app.aclose()


class ScriptedTranscriber(FakeTranscriber):
    """Hears each utterance in turn from a script."""

    def __init__(self, *texts: str) -> None:
        super().__init__(texts[0])
        self.script = list(texts)

    async def transcribe(self, pcm, *, language=None):
        self.text = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return await super().transcribe(pcm, language=language)


async def test_a_voice_mute_asks_first_and_mutes_after_yes_in_the_follow_up(settings):
    mic = FakeMic([BLOCK] * 5 + [wake_block()] + [speech_block()] * 20 + [BLOCK] * 40
                  + [speech_block()] * 20 + [BLOCK] * 60, delay_s=0.002)
    app = fake_app(settings, source=mic, stt=ScriptedTranscriber("Mute yourself.", "Yes."))
    events = collect(app, EventType.COMMAND)
    async with asyncio.timeout(10):
        await app.start()
        await app.voice.run()
        await app.voice.wait_idle()
    spoken = [t for t, _ in app.tts.spoken]
    assert spoken[:2] == ["Do you want me to turn off the microphone?", "Microphone off."]
    assert app.status.muted and app.llm.prompts == []
    # the question ran nothing; the yes ran the command once
    assert [(e.data["command"], e.data["text"]) for e in events] == [("mute", "Yes.")]
    await app.aclose()
