"""The action core: one registry, its errors and channels, tool specs, generated docs, and the
voice adapter's approval of flagged commands."""

from __future__ import annotations

import asyncio
import json

import pytest

from companion.actions import ALL_ACTIONS, ActionError, Context
from companion.actions.core import ERROR_STATUS
from companion.actions.voice import VoiceCommands
from companion.api.http import openapi_document
from companion.events import EventType
from scripts import gen_action_docs
from tests.conftest import fake_app, until


@pytest.fixture
def app(started_app):
    return started_app


def test_tool_specs_describe_each_tool_action_with_its_request_schema(settings):
    registry = fake_app(settings).actions
    specs = registry.tool_specs()
    names = [s["name"] for s in specs]
    assert names == sorted(set(names)) and {"timer", "volume", "persona", "time"} <= set(names)
    assert "handoff_out" not in names and "listen" not in names  # not offered to a model
    timer = next(s for s in specs if s["name"] == "timer")
    assert timer["description"].startswith("Set a timer")
    schema = timer["input_schema"]
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert {"action", "seconds", "minutes", "label", "id"} == set(schema["properties"])
    assert schema["properties"]["action"]["enum"] == ["set", "list", "cancel"]
    for spec in specs:  # every schema is plain JSON Schema a model or an MCP client can read
        assert spec["input_schema"]["type"] == "object" and spec["description"]


async def test_unknown_or_not_offered_actions_are_not_found_with_the_known_list(app):
    with pytest.raises(ActionError) as err:
        await app.actions.run("fly", context=Context("api"))
    assert err.value.code == "NOT_FOUND" and err.value.status == 404
    assert "handoff_out" not in err.value.details["known_commands"]
    with pytest.raises(ActionError) as err:  # the fleet's action is not on the local API
        await app.actions.run("handoff_out", {}, context=Context("api"))
    assert err.value.code == "NOT_FOUND"
    with pytest.raises(ActionError) as err:
        await app.actions.run("volume", {"level": 300}, context=Context("api"))
    assert err.value.code == "VALIDATION_ERROR"
    assert err.value.details["fields"][0]["field"] == "args.level"
    assert app.status.volume == pytest.approx(0.8)  # nothing changed


def test_error_codes_are_stable_names_with_a_status():
    assert ActionError("UNAVAILABLE", "no speaker").status == 503
    assert all(code.isupper() and 400 <= status < 600 for code, status in ERROR_STATUS.items())
    with pytest.raises(ValueError):
        ActionError("ValueError", "class names are not codes")


async def test_every_adapter_switches_persona_through_the_one_action(app):
    commands = []
    app.bus.add_callback(lambda e: commands.append(e.data) if e.type is EventType.COMMAND else None)
    voice = VoiceCommands(app)
    async with asyncio.timeout(5):
        said = await voice.handle("switch to the nurse", "turn_1")
        await app.actions.run("persona", {"id": "companion"}, context=Context("api"))
        await app.actions.run("persona", {"id": "medication_nurse", "preserve_context": False},
                              context=Context("control"))
    assert said is not None and said.speak == "Hello, this is Nora."
    assert [(c["command"], c["source"]) for c in commands] == [
        ("persona", "voice"), ("persona", "api"), ("persona", "control")]
    assert app.conversation.active_persona_id == "medication_nurse"


async def test_a_flagged_voice_command_runs_only_after_a_yes(app):
    voice = VoiceCommands(app)
    async with asyncio.timeout(5):
        asked = await voice.handle("Mute yourself.", "t1")
        assert asked is not None and asked.expect_reply
        assert asked.speak == "Do you want me to turn off the microphone?"
        assert not app.status.muted  # not before the yes
        done = await voice.handle("Yes.", "t2")
        assert app.status.muted and done is not None and done.speak == "Microphone off."
        await app.actions.run("unmute", context=Context("api"))
        await voice.handle("mute the microphone", "t3")
        refused = await voice.handle("no", "t4")
        assert refused is not None and refused.speak == "Okay, I won't."
        assert not app.status.muted
        await voice.handle("mute", "t5")  # something else instead of an answer drops it
        assert await voice.handle("what is the capital of france", "t6") is None
        assert await voice.handle("yes", "t7") is None and not app.status.muted


async def test_an_old_question_is_not_answered_by_a_late_yes(app):
    now = [0.0]
    voice = VoiceCommands(app, clock=lambda: now[0])
    async with asyncio.timeout(5):
        await voice.handle("mute yourself", "t1")
        now[0] = 60.0
        await voice.handle("yes", "t2")
    assert not app.status.muted


def test_the_docs_list_the_registry_actions():
    assert gen_action_docs.outdated() == []
    assert "| timer |" in gen_action_docs.render("api")
    assert "`persona_switch`" in gen_action_docs.render("control")


def test_the_openapi_document_lists_the_commands_from_the_registry():
    doc = openapi_document()
    command = doc["components"]["schemas"]["CommandRequest"]["properties"]["command"]
    assert command["enum"] == sorted(a.name for a in ALL_ACTIONS if "api" in a.channels)
    assert "TimerRequest" in doc["components"]["schemas"]


async def test_status_says_what_is_not_working(app):
    async with asyncio.timeout(5):
        fine = await app.actions.run("status", context=Context("voice"))
        assert fine.speak == "Everything is working." and fine.result["problems"] == []
        app.status.set_component("audio_in", False, "no input audio device found")
        app.status.muted = True
        bad = await app.actions.run("status", context=Context("voice"))
    assert bad.result["components"]["audio_in"] is False
    assert bad.speak == "I'm muted. My audio in is not working."


async def test_status_reports_a_control_link_that_is_down(app):
    from companion.control.client import ControlLink

    app.settings = app.settings.model_copy(update={"control_plane": app.settings.control_plane
                                                   .model_copy(update={"url": "ws://cp"})})
    ControlLink(app)  # configured but never connected
    async with asyncio.timeout(5):
        out = await app.actions.run("status", context=Context("api"))
    assert "I am not connected to the control plane" in out.result["problems"]


async def test_a_retention_change_from_the_control_plane_expires_sessions_at_once(tmp_path):
    from tests.control_helpers import control_plane, linked_device, url

    async with control_plane() as plane, linked_device(
            tmp_path, url(plane), settings_extra={"storage": {"retention_days": 0}}) as (app, _):
        store = app.store
        old = await store.run(store.create_session, "companion")
        await store.run(store.query, "UPDATE sessions SET updated_at = 0 WHERE id = ?", (old.id,))
        housekeeping = asyncio.create_task(app.housekeeping())
        try:
            await plane.wait_connected("dev-a")
            ack = await plane.wait_ack(await plane.send("dev-a", "config_update", {
                "settings": {"storage.retention_days": 1}}))
            assert ack["ok"] and ack["applied"] == {"storage.retention_days": 1}
            async def expired() -> bool:  # the housekeeping task removes it
                return await store.run(store.get_session, old.id) is None

            await until(expired, 5, what="the expired session removed")
        finally:
            housekeeping.cancel()
            await asyncio.gather(housekeeping, return_exceptions=True)


def test_app_parts_are_typed_attributes_not_a_dict(settings):
    app = fake_app(settings)
    assert app.control is None and app.led is None and app.buttons is None
    with pytest.raises(AttributeError):
        app.contrl  # noqa: B018  a misspelt part is an error, not a silent None
    assert not hasattr(app, "extensions")


class RecordingRegistry:
    """A fake registry: records what an adapter asks for (an adapter test needs no device)."""

    def __init__(self):
        self.calls = []

    async def run(self, name, args=None, *, context, channel=None):
        from companion.actions import Outcome

        self.calls.append((name, args, context))
        return Outcome(name, {"ran": name})


@pytest.mark.parametrize(("frame", "payload", "action", "args"), [
    ("persona_switch", {"persona_id": "medication_nurse", "transition_message": ""}, "persona",
     {"id": "medication_nurse", "preserve_context": True, "transition_message": None}),
    ("led_control", {"color": "red", "pattern": "blink"}, "led",
     {"pattern": "blink", "color": "#FF0000", "duration_ms": 3000}),
    ("broadcast", {"payload": {"text": "Dinner!"}}, "announce",
     {"event_type": "announcement", "text": "Dinner!", "audio_b64": None}),
    ("audio_response", {"text": "Hi."}, "announce",
     {"text": "Hi.", "audio_b64": None, "audio_url": None}),
])
async def test_the_control_adapter_only_translates_frames_into_actions(frame, payload, action,
                                                                       args):
    from types import SimpleNamespace

    from companion.control.handlers import CommandHandlers
    from companion.control.protocol import parse_server_frame, server_frame

    registry = RecordingRegistry()
    sent = []

    async def enqueue(frame_):
        sent.append(frame_)

    handlers = CommandHandlers(SimpleNamespace(actions=registry), SimpleNamespace(enqueue=enqueue))
    command = parse_server_frame(json.dumps(server_frame(frame, payload, priority=2)),
                                 max_bytes=1 << 20)
    outcome = await handlers.handle(command)
    [(name, got, context)] = registry.calls
    assert (name, got) == (action, args)
    assert context.source == "control" and context.priority == 2 and context.trusted
    assert context.deliver is enqueue
    assert outcome.result["ran"] == action
    assert outcome.result.get("switch_complete") is (True if frame == "persona_switch" else None)
