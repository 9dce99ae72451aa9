"""The control-plane adapter: what each server → device command does in the daemon (SPEC §4).

Commands that are device actions (persona switch, speech and audio, LED, handoff) are translated
into requests to the App's action registry (``ACTION_COMMANDS``); the rest belong to the fleet
link itself (group activities, synchronised events, settings, ping) and are ``on_<type>``
methods here. Each returns an ``Outcome``: the fields of its ack and, optionally, work to run
*after* the ack is stored (a persona switch acks as soon as the switch is done and speaks its
transition message afterwards). An ``ActionError`` acks ``ok: false`` with its stable code and
reason; nothing else changes.

Speaking follows the frame's priority: 0 waits for whatever the device is saying, 1 cuts in after
the current sentence, 2 and more at once (``companion.actions.speaking``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

from companion.actions import speaking
from companion.actions.clips import decode_wav
from companion.actions.core import ActionError, Context, Outcome
from companion.actions.device import set_volume
from companion.actions.speaking import PRIORITY_AFTER_SENTENCE, PRIORITY_NOW
from companion.control.protocol import (
    Command,
    ConfigUpdate,
    GroupActivity,
    Ping,
    SyncEvent,
)
from companion.intents import normalize
from companion.personas import Persona
from companion.stages.llm import ChatMessage, Priority, SamplingParams
from companion.stages.tts import AudioClip

if TYPE_CHECKING:
    from companion.app import App
    from companion.control.client import ControlLink

log = structlog.get_logger(__name__)

# commands that do not wait in the ordered queue: instant ones, and ones that wait for long
CONCURRENT_TYPES = frozenset({"ping", "led_control", "config_update", "group_activity",
                              "sync_event"})
SPEECH_TYPES = frozenset({"audio_response", "announce", "broadcast"})

# settings a config_update may change while running, and who must hear about it
RUNTIME_SETTINGS = frozenset({
    "control_plane.heartbeat_s", "control_plane.backoff_initial_s", "control_plane.backoff_max_s",
    "control_plane.backoff_fatal_s", "control_plane.reconnect_spread_s",
    "control_plane.outbox_max", "control_plane.max_frame_bytes", "control_plane.send_audio",
    "audio.output_volume", "pipeline.turn_timeout_s", "pipeline.follow_up_window_s",
    "pipeline.local_commands", "vad.no_speech_timeout_s", "vad.silence_end_s",
    "tts.sentence_silence_s", "storage.retention_days", "log_level",
    "arbitration.enabled", "arbitration.room", "arbitration.window_ms",
    "turn.semantic", "turn.complete_threshold", "turn.complete_silence_s",
    "turn.incomplete_silence_s", "turn.streaming_stt", "turn.partial_every_s",
})


# control-plane command type → the action it runs, and how its payload becomes the request
ACTION_COMMANDS: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "persona_switch": ("persona", lambda p: {
        "id": p.persona_id, "preserve_context": p.preserve_context,
        "transition_message": p.transition_message or None}),
    "audio_response": ("announce", lambda p: {
        "text": p.text, "audio_b64": p.audio_b64, "audio_url": p.audio_url}),
    "announce": ("announce", lambda p: {
        "event_type": p.event_type, "text": p.spoken_text,
        "audio_b64": p.audio_b64 or _str_or_none(p.payload.get("audio_b64"))}),
    "led_control": ("led", lambda p: p.model_dump()),
    "session_handoff_out": ("handoff_out", lambda p: p.model_dump()),
    "session_handoff_in": ("handoff_in", lambda p: p.model_dump()),
}
ACTION_COMMANDS["broadcast"] = ACTION_COMMANDS["announce"]
ACK_EXTRA = {"persona_switch": {"switch_complete": True}}


def _str_or_none(value: Any) -> str | None:
    return str(value) if value else None


class CommandHandlers:
    def __init__(self, app: App, link: ControlLink) -> None:
        self.app = app
        self.link = link

    async def handle(self, command: Command) -> Outcome:
        """Run the command; raises ``ActionError`` (acked ``ok: false`` with its code)."""
        mapped = ACTION_COMMANDS.get(command.type)
        if mapped is None:
            handler = getattr(self, f"on_{command.type}")
            return await handler(command.payload, command)
        name, to_request = mapped
        outcome = await self.app.actions.run(name, to_request(command.payload),
                                             context=self.context(command.priority))
        outcome.result = {**ACK_EXTRA.get(command.type, {}), **outcome.result}
        return outcome

    def context(self, priority: int = 0) -> Context:
        return Context("control", priority=priority, deliver=self.link.enqueue)

    def is_urgent(self, command: Command) -> bool:
        """Speech that must cut in does not queue behind earlier speech."""
        return command.type in SPEECH_TYPES and command.priority >= PRIORITY_AFTER_SENTENCE

    async def speak(self, text: str, priority: int = 0, *, persona: Persona | None = None):
        return await speaking.speak(self.app, text, priority, persona=persona)

    # --- group activities --------------------------------------------------------------------------

    async def on_group_activity(self, p: GroupActivity, command: Command) -> Outcome:
        persona = self.app.conversation.active_persona
        if p.persona_id:
            persona = self.app.personas.get(p.persona_id) or persona
        if p.activity_type == "trivia":
            return await self._trivia(p.config, persona, command.priority)
        if p.activity_type == "story":
            return await self._story(p.config, persona, command.priority)
        return await self._sync_playback(p.config, command)

    async def _trivia(self, config: dict[str, Any], persona: Persona, priority: int) -> Outcome:
        topic = str(config.get("topic") or "general knowledge")
        question, source = config.get("question"), "server"
        if not question:
            source = "llm"
            text = await self.generate(persona, f"Ask one short trivia question about {topic}. "
                                       "Reply with the question only.", max_tokens=48)
            question = first_question(text) or f"Here is a question about {topic}: what do you know?"
        await self.speak(str(question), priority, persona=persona)
        answer, why = await self.listen(config)
        expected = config.get("answer")
        correct = None
        if expected and answer is not None:
            correct = normalize(str(expected)) in normalize(answer)
        if expected and config.get("announce_result", True) and answer is not None:
            reply = "That's right!" if correct else f"Good try! The answer was {expected}."
            await self.speak(reply, priority, persona=persona)
        return Outcome("group_activity", {"activity_type": "trivia", "question": question,
                        "question_source": source, "answer": answer, "correct": correct,
                        **({"no_answer_reason": why} if why else {})})

    async def _story(self, config: dict[str, Any], persona: Persona, priority: int) -> Outcome:
        so_far = str(config.get("story_so_far") or "")
        theme = str(config.get("theme") or config.get("prompt") or "a friendly adventure")
        sentences = int(config.get("sentences", 2))
        instruction = (f"We are telling a story about {theme} together, taking turns. "
                       + (f"The story so far: {so_far} " if so_far else "Start the story. ")
                       + f"Add the next {sentences} short sentences. Reply with them only.")
        part = (await self.generate(persona, instruction, max_tokens=40 * sentences)).strip()
        if not part:
            part = "And then something surprising happened."
        await self.speak(part, priority, persona=persona)
        user_part, why = (None, "not asked to listen")
        if config.get("listen", True):
            user_part, why = await self.listen(config)
        return Outcome("group_activity", {"activity_type": "story", "story_part": part,
                                          "user_part": user_part,
                        **({"no_answer_reason": why} if user_part is None else {})})

    async def _sync_playback(self, config: dict[str, Any], command: Command) -> Outcome:
        try:
            event = SyncEvent.model_validate({"action": "play", **config})
        except ValidationError as exc:
            raise ActionError("VALIDATION_ERROR",
                              f"sync_playback config: {exc.errors()[0]['msg']}") from None
        result = await self.at_server_time(event)
        return Outcome("group_activity", {"activity_type": "sync_playback", **result})

    async def listen(self, config: dict[str, Any]) -> tuple[str | None, str | None]:
        """One utterance from the user, or None and why not."""
        voice = self.app.voice
        if voice is None:
            return None, "no microphone"
        if self.app.status.muted:
            return None, "muted"
        await speaking.wait_quiet(self.app)
        timeout = float(config.get("answer_timeout_s", 8.0))
        text = await voice.listen_once(no_speech_timeout_s=timeout)
        return (text, None) if text else (None, "nobody answered")

    async def generate(self, persona: Persona, instruction: str, *, max_tokens: int) -> str:
        """Text from the device's LLM in the persona's character (not part of a conversation)."""
        conv = self.app.conversation
        messages: list[ChatMessage] = [*conv.persona_messages(persona),
                                       {"role": "user", "content": instruction}]
        params = SamplingParams(temperature=max(0.5, persona.behavior_config.temperature),
                                max_tokens=max_tokens)
        parts = [delta async for delta in conv.llm.stream(messages, params,
                                                           priority=Priority.BACKGROUND)]
        return "".join(parts).strip()

    # --- timing ---------------------------------------------------------------------------------------

    async def on_sync_event(self, p: SyncEvent, command: Command) -> Outcome:
        return Outcome("sync_event", await self.at_server_time(p))

    async def at_server_time(self, event: SyncEvent) -> dict[str, Any]:
        """Prepare (synthesize) first, then act when the server's clock reads ``event.at``."""
        clip: AudioClip | None = None
        if event.action == "play" and event.audio_b64:
            clip = decode_wav(event.audio_b64)
        elif event.action in ("say", "play"):
            if self.app.speech.sink is None:
                raise ActionError("UNAVAILABLE", "no audio output device")
            clip = await self.app.tts.synthesize(event.text or "", speaking.voice_of(self.app))
        target = self.link.device_time_for(event.at)
        wait_s = target - self.link.clock()
        if wait_s > 3600:
            raise ActionError("VALIDATION_ERROR",
                              f"'at' is {wait_s:.0f} s away (more than an hour)")
        late_ms = None
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        started = self.link.clock()
        late_ms = round((started - target) * 1000, 2)
        if clip is not None:
            await speaking.play_clip(self.app, clip, PRIORITY_NOW)
        elif event.led is not None:
            await self.app.actions.run("led", event.led.model_dump(), context=self.context())
        return {"action": event.action, "at": event.at, "started_device_time": started,
                "started_server_time": started + self.link.clock_offset_s,
                "late_ms": late_ms, "clock_offset_ms": self.link.status.clock_offset_ms}

    # --- settings and liveness ------------------------------------------------------------------------

    async def on_config_update(self, p: ConfigUpdate, command: Command) -> Outcome:
        changes = flatten(p.settings)
        applied: dict[str, Any] = {}
        refused: dict[str, str] = {}
        settings = self.app.settings
        for key, value in changes.items():
            if key not in RUNTIME_SETTINGS:
                refused[key] = ("not a setting" if not _exists(settings, key)
                                else "cannot change while running (needs a restart)")
                continue
            try:
                settings = _with(settings, key, value)
            except ValidationError as exc:
                refused[key] = exc.errors()[0]["msg"]
                continue
            except ActionError as exc:
                refused[key] = exc.message
                continue
            applied[key] = _get(settings, key)
        if applied:
            self._apply(settings, applied)
        result = {"applied": applied, "refused": refused}
        if refused:
            raise ActionError("VALIDATION_ERROR",
                              f"refused: {', '.join(f'{k} ({v})' for k, v in refused.items())}",
                              result)
        return Outcome("config_update", result)

    def _apply(self, settings, applied: dict[str, Any]) -> None:
        app = self.app
        app.settings = settings
        if app.voice is not None:
            app.voice.settings = settings
        if "audio.output_volume" in applied:
            set_volume(app, settings.audio.output_volume)
        if "tts.sentence_silence_s" in applied:
            app.speech.sentence_silence_s = settings.tts.sentence_silence_s
        if "storage.retention_days" in applied:
            app.housekeeping_now()  # expire by the new rule now, not at the next hourly pass
        if "control_plane.outbox_max" in applied:
            self.link.outbox.max_items = settings.control_plane.outbox_max
        if "log_level" in applied:
            from companion.log import configure_logging

            configure_logging(settings.log_level, settings.log_format)
        log.info("settings changed by the control plane", applied=applied)

    async def on_ping(self, p: Ping, command: Command) -> Outcome:
        now = self.link.clock()
        return Outcome("ping", {"pong": True, "device_time": now, "server_time": p.server_time,
                        "pipeline_state": str(self.app.status.pipeline_state)})


# --- helpers ----------------------------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"control_plane": {"heartbeat_s": 5}} and {"control_plane.heartbeat_s": 5} alike."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name.count(".") == 0 and "." not in key:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _exists(settings, key: str) -> bool:
    obj = settings
    for part in key.split("."):
        if part not in type(obj).model_fields:
            return False
        obj = getattr(obj, part)
    return True


def _get(settings, key: str) -> Any:
    obj = settings
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _with(settings, key: str, value: Any):
    """A validated copy of ``settings`` with one key changed (raises ValidationError)."""
    section_name, _, name = key.rpartition(".")
    if not section_name:  # only log_level is changeable at the top level
        levels = ("debug", "info", "warning", "error")
        if value not in levels:
            raise ActionError("VALIDATION_ERROR", f"log_level must be one of {', '.join(levels)}")
        return settings.model_copy(update={name: value})
    section = getattr(settings, section_name)
    new_section = type(section).model_validate({**section.model_dump(), name: value})
    return settings.model_copy(update={section_name: new_section})


def first_question(text: str) -> str | None:
    match = re.search(r"[^.!?\n]*\?", text)
    return match.group(0).strip() if match else (text.strip() or None)
