"""What each server → device command does in the daemon (SPEC §4).

Each ``on_<type>`` gets the validated payload and returns an ``Outcome``: the fields of its ack
and, optionally, an action to run *after* the ack is stored (a persona switch acks as soon as the
switch is done and speaks its transition message afterwards). Raising ``CommandFailed`` acks
``ok: false`` with the reason; nothing else changes.

Speaking follows the frame's priority: 0 waits for whatever the device is saying, 1 cuts in after
the current sentence, 2 and more at once. Audio arrives as a base64 WAV (``audio_b64``) or an
``audio_url`` fetched over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import time
import wave
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
from pydantic import ValidationError

from companion.control.protocol import (
    SESSION_EXPORT,
    Announce,
    AudioResponse,
    Command,
    ConfigUpdate,
    GroupActivity,
    LedControl,
    PersonaSwitch,
    Ping,
    SessionHandoffIn,
    SessionHandoffOut,
    SyncEvent,
    device_frame,
)
from companion.conversation import PersonaNotFoundError
from companion.events import Event, EventType
from companion.personas import Persona
from companion.stages.llm import ChatMessage, Priority, SamplingParams
from companion.stages.tts import AudioClip, VoiceParams

if TYPE_CHECKING:
    from companion.app import App
    from companion.control.client import ControlLink

log = structlog.get_logger(__name__)

# commands that do not wait in the ordered queue: instant ones, and ones that wait for long
CONCURRENT_TYPES = frozenset({"ping", "led_control", "config_update", "group_activity",
                              "sync_event"})
SPEECH_TYPES = frozenset({"audio_response", "announce", "broadcast"})
PRIORITY_AFTER_SENTENCE = 1
PRIORITY_NOW = 2
MAX_AUDIO_BYTES = 10 << 20

# settings a config_update may change while running, and who must hear about it
RUNTIME_SETTINGS = frozenset({
    "control_plane.heartbeat_s", "control_plane.backoff_initial_s", "control_plane.backoff_max_s",
    "control_plane.backoff_fatal_s", "control_plane.reconnect_spread_s",
    "control_plane.outbox_max", "control_plane.max_frame_bytes", "control_plane.send_audio",
    "audio.output_volume", "pipeline.turn_timeout_s", "pipeline.follow_up_window_s",
    "pipeline.local_commands", "vad.no_speech_timeout_s", "vad.silence_end_s",
    "tts.sentence_silence_s", "storage.retention_days", "log_level",
    "arbitration.enabled", "arbitration.room", "arbitration.window_ms",
})


class CommandFailed(Exception):
    """The command could not be done; the message goes into the ack's ``error``."""


@dataclass
class Outcome:
    result: dict[str, Any] = field(default_factory=dict)
    after: Callable[[], Awaitable[Any]] | None = None


class CommandHandlers:
    def __init__(self, app: App, link: ControlLink) -> None:
        self.app = app
        self.link = link

    async def handle(self, command: Command) -> Outcome:
        handler = getattr(self, f"on_{command.type}")
        return await handler(command.payload, command)

    def is_urgent(self, command: Command) -> bool:
        """Speech that must cut in does not queue behind earlier speech."""
        return command.type in SPEECH_TYPES and command.priority >= PRIORITY_AFTER_SENTENCE

    # --- personas ------------------------------------------------------------------------------

    async def on_persona_switch(self, p: PersonaSwitch, command: Command) -> Outcome:
        try:
            result = await self.app.conversation.switch_persona(
                p.persona_id, preserve_context=p.preserve_context)
        except PersonaNotFoundError as exc:
            raise CommandFailed(f"{exc}; known: {', '.join(self.app.personas.ids())}") from None
        outcome = Outcome({"switch_complete": True,
                           "previous_persona_id": result.previous_persona_id,
                           "new_persona_id": result.new_persona_id,
                           "session_id": result.session_id,
                           "preserved_context": result.preserved_context,
                           "switch_latency_ms": round(result.switch_latency_ms, 2)})
        if p.transition_message:
            persona = self.app.conversation.active_persona  # speak in the new voice
            message = p.transition_message
            outcome.after = lambda: self.speak(message, command.priority, persona=persona)
        return outcome

    # --- speaking --------------------------------------------------------------------------------

    async def on_audio_response(self, p: AudioResponse, command: Command) -> Outcome:
        result: dict[str, Any] = {}
        if p.audio_b64 or p.audio_url:
            clip = decode_wav(p.audio_b64) if p.audio_b64 else await fetch_wav(p.audio_url or "")
            await self.play_clip(clip, command.priority)
            result["played_s"] = round(clip.duration_s, 3)
        if p.text:
            stats = await self.speak(p.text, command.priority)
            result["spoken_s"] = round(stats.audio_s, 3)
        return Outcome(result)

    async def on_announce(self, p: Announce, command: Command) -> Outcome:
        result: dict[str, Any] = {"event_type": p.event_type}
        audio = p.audio_b64 or p.payload.get("audio_b64")
        if audio:
            clip = decode_wav(str(audio))
            await self.play_clip(clip, command.priority)
            result["played_s"] = round(clip.duration_s, 3)
        text = p.spoken_text
        if text:
            stats = await self.speak(text, command.priority)
            result["spoken_s"] = round(stats.audio_s, 3)
        if not text and not audio:
            result["spoken_s"] = 0.0
            result["note"] = "nothing to say (no text or audio in the payload)"
        return Outcome(result)

    on_broadcast = on_announce

    def _voice(self, persona: Persona | None) -> VoiceParams:
        return (persona or self.app.conversation.active_persona).voice_config.params()

    async def speak(self, text: str, priority: int = 0, *, persona: Persona | None = None):
        speech = self.app.speech
        if speech.sink is None:
            raise CommandFailed("no audio output device: cannot speak")
        if priority >= PRIORITY_NOW:
            return await speech.say(text, self._voice(persona), interrupt=True)
        if priority >= PRIORITY_AFTER_SENTENCE and speech.speaking:
            await self._end_of_sentence()
            return await speech.say(text, self._voice(persona), interrupt=True)
        await self._wait_quiet(300)  # polite: not queued on the speaker, so urgent ones go first
        return await speech.say(text, self._voice(persona))

    async def _end_of_sentence(self, timeout_s: float = 15.0) -> None:
        """Wait until the sentence being played ends (or nothing is speaking any more)."""
        ended = asyncio.get_running_loop().create_future()

        def on_event(event: Event) -> None:
            if event.type is EventType.PLAYBACK_END and not ended.done():
                ended.set_result(None)

        remove = self.app.bus.add_callback(on_event)
        try:
            async with asyncio.timeout(timeout_s):
                while self.app.speech.speaking and not ended.done():
                    await asyncio.wait([ended], timeout=0.05)
        except TimeoutError:
            pass
        finally:
            remove()

    async def play_clip(self, clip: AudioClip, priority: int = 0) -> None:
        """Play recorded audio through the same speaker, politely or not by priority."""
        sink, speech = self.app.speech.sink, self.app.speech
        if sink is None:
            raise CommandFailed("no audio output device: cannot play audio")
        cut_in = priority >= PRIORITY_AFTER_SENTENCE and speech.speaking
        if cut_in and priority < PRIORITY_NOW:
            await self._end_of_sentence()
        if not cut_in:
            await self._wait_quiet(120)
        await speech.play_clip(clip, interrupt=cut_in)

    # --- LEDs --------------------------------------------------------------------------------------

    async def on_led_control(self, p: LedControl, command: Command) -> Outcome:
        led = self.app.extensions.get("led")
        if led is None:
            raise CommandFailed("no LED on this device (GPIO unavailable)")
        led.override(p.color, p.pattern, p.duration_ms)
        self.app.bus.emit(EventType.LED_OVERRIDE, color=p.color, pattern=p.pattern,
                          duration_ms=p.duration_ms)
        return Outcome({"color": p.color, "pattern": p.pattern, "duration_ms": p.duration_ms})

    # --- handoff -------------------------------------------------------------------------------------

    async def on_session_handoff_out(self, p: SessionHandoffOut, command: Command) -> Outcome:
        conv, store = self.app.conversation, self.app.store
        session_id = p.session_id or conv.active_session_id
        if session_id is None:
            raise CommandFailed("no active session to hand off")
        doc = await store.run(store.export_session, session_id)
        if doc is None:
            raise CommandFailed(f"no session {session_id!r} on this device")
        if p.notify_user and self.app.speech.sink is not None:
            where = f" to {p.to_device_id}" if p.to_device_id else ""
            message = p.goodbye_message or (
                f"I'm passing our conversation over{where}. See you there!")
            await self._say_best_effort(message, command.priority)
        await self.link.enqueue(device_frame(SESSION_EXPORT, {
            "session_id": session_id, "to_device_id": p.to_device_id,
            "from_device_id": self.app.settings.device_id, "persona_id": doc["persona_id"],
            "notify_user": p.notify_user, "session": doc}))
        if session_id == conv.active_session_id:
            await conv.end_active_session()
        return Outcome({"session_id": session_id, "to_device_id": p.to_device_id,
                        "turns": len(doc["turns"]), "exported": True})

    async def on_session_handoff_in(self, p: SessionHandoffIn, command: Command) -> Outcome:
        store, conv = self.app.store, self.app.conversation
        try:
            session = await store.run(lambda: store.import_session(p.session,
                                                                   origin=p.from_device_id))
        except (ValueError, KeyError, TypeError) as exc:
            raise CommandFailed(f"cannot import the session: {exc}") from None
        persona_id = session.persona_id if session.persona_id in self.app.personas \
            else conv.active_persona_id
        await conv.adopt_session(session.id, persona_id)
        outcome = Outcome({"session_id": session.id, "persona_id": conv.active_persona_id,
                           "turns": len(session.messages), "from_device_id": p.from_device_id})
        if p.notify_user and self.app.speech.sink is not None:
            greeting = p.greeting or "Hello again! I have our conversation here. Let's carry on."
            outcome.after = lambda: self.speak(greeting, command.priority)
        return outcome

    async def _say_best_effort(self, text: str, priority: int) -> None:
        try:
            await self.speak(text, priority)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("could not speak", text=text, error=str(exc))

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
        return Outcome({"activity_type": "trivia", "question": question,
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
        return Outcome({"activity_type": "story", "story_part": part, "user_part": user_part,
                        **({"no_answer_reason": why} if user_part is None else {})})

    async def _sync_playback(self, config: dict[str, Any], command: Command) -> Outcome:
        try:
            event = SyncEvent.model_validate({"action": "play", **config})
        except ValidationError as exc:
            raise CommandFailed(f"sync_playback config: {exc.errors()[0]['msg']}") from None
        result = await self.at_server_time(event)
        return Outcome({"activity_type": "sync_playback", **result})

    async def listen(self, config: dict[str, Any]) -> tuple[str | None, str | None]:
        """One utterance from the user, or None and why not."""
        voice = self.app.voice
        if voice is None:
            return None, "no microphone"
        if self.app.status.muted:
            return None, "muted"
        await self._wait_quiet()
        timeout = float(config.get("answer_timeout_s", 8.0))
        text = await voice.listen_once(no_speech_timeout_s=timeout)
        return (text, None) if text else (None, "nobody answered")

    async def _wait_quiet(self, timeout_s: float = 60.0) -> None:
        # SpeechOutput offers no "quiet" event; poll briefly (bounded)
        async with asyncio.timeout(timeout_s):
            while self.app.speech.speaking:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

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
        return Outcome(await self.at_server_time(p))

    async def at_server_time(self, event: SyncEvent) -> dict[str, Any]:
        """Prepare (synthesize) first, then act when the server's clock reads ``event.at``."""
        clip: AudioClip | None = None
        if event.action == "play" and event.audio_b64:
            clip = decode_wav(event.audio_b64)
        elif event.action in ("say", "play"):
            if self.app.speech.sink is None:
                raise CommandFailed("no audio output device")
            clip = await self.app.tts.synthesize(event.text or "", self._voice(None))
        target = self.link.device_time_for(event.at)
        wait_s = target - self.link.clock()
        if wait_s > 3600:
            raise CommandFailed(f"'at' is {wait_s:.0f} s away (more than an hour)")
        late_ms = None
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        started = self.link.clock()
        late_ms = round((started - target) * 1000, 2)
        if clip is not None:
            await self.play_clip(clip, priority=PRIORITY_NOW)
        elif event.led is not None:
            await self.on_led_control(event.led, None)  # type: ignore[arg-type]
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
            except CommandFailed as exc:
                refused[key] = str(exc)
                continue
            applied[key] = _get(settings, key)
        if applied:
            self._apply(settings, applied)
        result = {"applied": applied, "refused": refused}
        if refused:
            raise CommandFailedWith(f"refused: {', '.join(f'{k} ({v})' for k, v in refused.items())}",
                                    result)
        return Outcome(result)

    def _apply(self, settings, applied: dict[str, Any]) -> None:
        app = self.app
        app.settings = settings
        if app.voice is not None:
            app.voice.settings = settings
        if "audio.output_volume" in applied:
            app.status.volume = settings.audio.output_volume
            if app.sink is not None and hasattr(app.sink, "volume"):
                app.sink.volume = settings.audio.output_volume
            app.bus.emit(EventType.VOLUME_CHANGED, volume=app.status.volume)
        if "tts.sentence_silence_s" in applied:
            app.speech.sentence_silence_s = settings.tts.sentence_silence_s
        if "control_plane.outbox_max" in applied:
            self.link.outbox.max_items = settings.control_plane.outbox_max
        if "log_level" in applied:
            from companion.log import configure_logging

            configure_logging(settings.log_level, settings.log_format)
        log.info("settings changed by the control plane", applied=applied)

    async def on_ping(self, p: Ping, command: Command) -> Outcome:
        now = self.link.clock()
        return Outcome({"pong": True, "device_time": now, "server_time": p.server_time,
                        "pipeline_state": str(self.app.status.pipeline_state)})


class CommandFailedWith(CommandFailed):
    """A failure that still reports what it did (a partly refused config_update)."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


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
            raise CommandFailed(f"log_level must be one of {', '.join(levels)}")
        return settings.model_copy(update={name: value})
    section = getattr(settings, section_name)
    new_section = type(section).model_validate({**section.model_dump(), name: value})
    return settings.model_copy(update={section_name: new_section})


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def first_question(text: str) -> str | None:
    match = re.search(r"[^.!?\n]*\?", text)
    return match.group(0).strip() if match else (text.strip() or None)


def decode_wav(audio_b64: str) -> AudioClip:
    """A base64 WAV (16-bit PCM, any rate, mono or more channels) as a mono clip."""
    try:
        data = base64.b64decode(audio_b64, validate=True)
    except (binascii.Error, ValueError):
        raise CommandFailed("audio_b64 is not valid base64") from None
    return wav_bytes_to_clip(data)


def wav_bytes_to_clip(data: bytes) -> AudioClip:
    if len(data) > MAX_AUDIO_BYTES:
        raise CommandFailed(f"audio of {len(data)} bytes is larger than {MAX_AUDIO_BYTES}")
    try:
        with wave.open(io.BytesIO(data)) as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise CommandFailed(f"audio is not a WAV file: {exc}") from None
    if width != 2:
        raise CommandFailed(f"WAV must be 16-bit PCM, not {8 * width}-bit")
    if channels > 1:
        samples = np.frombuffer(frames, dtype=np.int16).reshape(-1, channels)
        frames = samples.mean(axis=1).astype(np.int16).tobytes()
    return AudioClip(frames, rate)


def clip_to_wav_b64(clip: AudioClip) -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(clip.sample_rate)
        wav.writeframes(clip.pcm)
    return base64.b64encode(buffer.getvalue()).decode()


async def fetch_wav(url: str, *, timeout_s: float = 15.0) -> AudioClip:
    import aiohttp

    started = time.perf_counter()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http, \
                http.get(url) as response:
            if response.status != 200:
                raise CommandFailed(f"audio_url answered HTTP {response.status}")
            data = await response.content.read(MAX_AUDIO_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CommandFailed(f"cannot fetch audio_url: {type(exc).__name__}: {exc}") from None
    log.info("fetched audio", url=url, bytes=len(data),
             took_ms=round((time.perf_counter() - started) * 1000, 1))
    return wav_bytes_to_clip(data)
