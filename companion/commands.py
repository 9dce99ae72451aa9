"""Commands that act on the running daemon: the same for HTTP (/v1/commands), the voice
pipeline (via ``make_intent_handler``) and anything else that holds the App.

Each command checks its arguments with a small pydantic model, respects the active persona's
``behavior_config.allowed_commands``, and returns a result plus what to say when it came by
voice. Timers are real asyncio tasks that ring: they speak and emit TIMER_RANG.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from companion.events import EventType
from companion.intents import VOICE_CONFIDENCE, describe_duration, parse
from companion.pipeline import IntentHandler, LocalAction
from companion.store import new_id

if TYPE_CHECKING:
    from companion.app import App

log = structlog.get_logger(__name__)

MAX_TIMERS = 20
ALWAYS_ALLOWED = frozenset({"help", "status"})


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class CommandError(Exception):
    """A command that cannot run at all; the HTTP layer maps ``code``/``status`` to an error."""

    def __init__(self, code: str, status: int, message: str,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.message, self.details = code, status, message, details or {}


@dataclass
class Outcome:
    command: str
    status: Literal["completed", "failed"]
    result: dict[str, Any]
    executed_at: str
    speak: str = ""  # what the device says when the command came by voice


# --- arguments -------------------------------------------------------------------------------------


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoArgs(_Args):
    pass


class SayArgs(_Args):
    text: str = Field(min_length=1, max_length=1000)
    interrupt: bool = Field(False, description="Stop current speech first.")
    wait: bool = Field(False, description="Answer when it has been said (else at once).")


class VolumeArgs(_Args):
    level: int | None = Field(None, ge=0, le=100, description="Percent.")
    change: Literal["up", "down"] | None = None
    step: int = Field(10, ge=1, le=50, description="Percent per up/down.")


class PersonaArgs(_Args):
    id: str | None = Field(None, min_length=1, max_length=64)
    name: str | None = Field(None, min_length=1, max_length=64, description="As a user says it.")
    preserve_context: bool = True


class TimerArgs(_Args):
    action: Literal["set", "list", "cancel"] = "set"
    seconds: float | None = Field(None, gt=0, le=86400)
    minutes: float | None = Field(None, gt=0, le=1440)
    label: str | None = Field(None, min_length=1, max_length=64)
    id: str | None = Field(None, max_length=64, description="Timer to cancel (default: all).")

    @model_validator(mode="after")
    def _duration(self) -> TimerArgs:
        if self.action == "set":
            total = (self.seconds or 0) + (self.minutes or 0) * 60
            if total <= 0:
                raise ValueError("a timer needs seconds or minutes")
            if total > 86400:
                raise ValueError("a timer can run at most 24 hours")
        return self

    @property
    def total_s(self) -> float:
        return (self.seconds or 0) + (self.minutes or 0) * 60


class TimeArgs(_Args):
    date: bool = False


@dataclass(frozen=True)
class CommandSpec:
    description: str
    args: type[_Args]
    run: Callable[[Commands, Any, str], Awaitable[Outcome]]


@dataclass
class Timer:
    id: str
    seconds: float
    label: str | None
    due: float  # time.time()
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "seconds": self.seconds, "label": self.label,
                "due_at": iso(self.due), "remaining_s": round(max(0.0, self.due - time.time()), 1)}


class Commands:
    """The command set of one App (``commands_for(app)``)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.timers: dict[str, Timer] = {}
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def known(self) -> list[str]:
        return sorted(SPECS)

    async def execute(self, command: str, args: dict[str, Any] | None = None, *,
                      source: str = "api") -> Outcome:
        spec = SPECS.get(command)
        if spec is None:
            raise CommandError("NOT_FOUND", 404, f"unknown command {command!r}",
                               {"known_commands": self.known})
        persona = self.app.conversation.active_persona
        if command not in ALWAYS_ALLOWED and not persona.behavior_config.allows(command):
            raise CommandError("FORBIDDEN", 403,
                               f"persona {persona.id!r} does not allow the {command!r} command",
                               {"persona_id": persona.id,
                                "allowed_commands": persona.behavior_config.allowed_commands})
        parsed = spec.args.model_validate(args or {})  # ValidationError → 422 upstream
        log.info("command", command=command, source=source)
        self.app.bus.emit(EventType.COMMAND, command=command, source=source)
        return await spec.run(self, parsed, source)

    # --- helpers ------------------------------------------------------------------------------

    def _done(self, command: str, result: dict[str, Any], speak: str = "") -> Outcome:
        return Outcome(command, "completed", result, iso(time.time()), speak)

    def _failed(self, command: str, error: str, **extra: Any) -> Outcome:
        return Outcome(command, "failed", {"error": error, **extra}, iso(time.time()))

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` past the request that started it; failures are logged, not lost."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background command failed", task=name, error=str(t.exception()))

        task.add_done_callback(done)
        return task

    def voice(self):
        return self.app.conversation.active_persona.voice_config.params()

    async def say(self, text: str, *, interrupt: bool = False) -> None:
        await self.app.speech.say(text, self.voice(), interrupt=interrupt)

    async def aclose(self) -> None:
        """Cancel timers and background speech (tests, shutdown)."""
        tasks = [t.task for t in self.timers.values() if t.task] + list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.timers.clear()

    # --- the commands -------------------------------------------------------------------------

    async def help(self, args: NoArgs, source: str) -> Outcome:
        allowed = self.app.conversation.active_persona.behavior_config
        commands = [{"command": name, "description": spec.description,
                     "allowed": name in ALWAYS_ALLOWED or allowed.allows(name),
                     "args": spec.args.model_json_schema().get("properties", {})}
                    for name, spec in sorted(SPECS.items())]
        speak = ("I can set timers, tell you the time, change my volume, stop talking, "
                 "and switch who you are talking to.")
        return self._done("help", {"commands": commands}, speak)

    async def status(self, args: NoArgs, source: str) -> Outcome:
        s = self.app.status
        result = {"pipeline_state": str(s.pipeline_state), "muted": s.muted,
                  "volume": round(s.volume, 3), "speaking": self.app.speech.speaking,
                  "persona_id": self.app.conversation.active_persona_id,
                  "session_id": self.app.conversation.active_session_id,
                  "voice_loop": self.app.voice is not None,
                  "timers": [t.as_dict() for t in self.timers.values()]}
        speak = "I'm muted." if s.muted else "Everything is working."
        return self._done("status", result, speak)

    async def say_cmd(self, args: SayArgs, source: str) -> Outcome:
        if self.app.sink is None:
            return self._failed("say", "no audio output device")
        if args.wait:
            async with asyncio.timeout(300):
                await self.say(args.text, interrupt=args.interrupt)
            return self._done("say", {"text": args.text, "spoken": True})
        self.spawn(self.say(args.text, interrupt=args.interrupt), "say")
        return self._done("say", {"text": args.text, "spoken": False, "queued": True})

    async def stop(self, args: NoArgs, source: str) -> Outcome:
        voice = self.app.voice
        if voice is not None and source != "voice":
            stopped = voice.barge_in()  # speech and the turn behind it
        else:  # from inside a voice turn: stop other speech (a ringing timer), not this turn
            stopped = self.app.speech.stop()
        return self._done("stop", {"stopped": stopped})

    async def listen(self, args: NoArgs, source: str) -> Outcome:
        voice = self.app.voice
        if voice is None:
            return self._failed("listen", "no microphone: the voice loop is off")
        if self.app.status.muted:
            return self._failed("listen", "the microphone is muted")
        turn_id = voice.start_turn(trigger=source)
        return self._done("listen", {"turn_id": turn_id})

    def _set_muted(self, muted: bool) -> bool:
        previous = self.app.status.muted
        if self.app.voice is not None:
            self.app.voice.set_muted(muted)
        elif previous != muted:
            self.app.status.muted = muted
            self.app.bus.emit(EventType.MUTE_CHANGED, muted=muted)
        return previous

    async def mute(self, args: NoArgs, source: str) -> Outcome:
        previous = self._set_muted(True)
        return self._done("mute", {"muted": True, "was_muted": previous}, "Microphone off.")

    async def unmute(self, args: NoArgs, source: str) -> Outcome:
        previous = self._set_muted(False)
        return self._done("unmute", {"muted": False, "was_muted": previous}, "I'm listening again.")

    async def volume(self, args: VolumeArgs, source: str) -> Outcome:
        status = self.app.status
        previous = status.volume
        if args.level is not None:
            new = args.level / 100
        elif args.change is not None:
            delta = args.step / 100 * (1 if args.change == "up" else -1)
            new = previous + delta
        else:
            return self._done("volume", {"volume": round(previous * 100)})
        new = round(min(1.0, max(0.0, new)), 3)
        status.volume = new
        if self.app.sink is not None and hasattr(self.app.sink, "volume"):
            self.app.sink.volume = new
        if new != previous:
            self.app.bus.emit(EventType.VOLUME_CHANGED, volume=new, previous=previous)
        speak = "This is as loud as I go." if new >= 1.0 and args.change == "up" else (
            "This is as quiet as I go." if new <= 0.05 and args.change == "down" else "Okay.")
        return self._done("volume", {"volume": round(new * 100), "previous": round(previous * 100)},
                          speak)

    async def persona(self, args: PersonaArgs, source: str) -> Outcome:
        conv = self.app.conversation
        target = None
        if args.id is not None:
            target = self.app.personas.get(args.id)
        elif args.name is not None:
            target = self.app.personas.find_by_name(args.name)
        else:
            active = conv.active_persona
            return self._done("persona", {"persona_id": active.id, "name": active.name,
                                          "available": self.app.personas.ids()})
        if target is None:
            raise CommandError("NOT_FOUND", 404, f"no persona {args.id or args.name!r}",
                               {"available": self.app.personas.ids()})
        result = await conv.switch_persona(target.id, preserve_context=args.preserve_context)
        return self._done("persona", {
            "previous_persona_id": result.previous_persona_id,
            "new_persona_id": result.new_persona_id, "session_id": result.session_id,
            "switch_latency_ms": round(result.switch_latency_ms, 1)},
            f"Hello, this is {target.name}.")

    async def timer(self, args: TimerArgs, source: str) -> Outcome:
        if args.action == "list":
            timers = sorted(self.timers.values(), key=lambda t: t.due)
            if not timers:
                speak = "You have no timers."
            else:
                speak = " ".join(f"{_timer_name(t).capitalize()} has "
                                 f"{describe_duration(t.due - time.time())} left." for t in timers)
            return self._done("timer", {"timers": [t.as_dict() for t in timers]}, speak)
        if args.action == "cancel":
            ids = [args.id] if args.id else list(self.timers)
            if args.id and args.id not in self.timers:
                raise CommandError("NOT_FOUND", 404, f"no timer {args.id!r}",
                                   {"timers": list(self.timers)})
            for timer_id in ids:
                timer = self.timers.pop(timer_id)
                if timer.task is not None:
                    timer.task.cancel()
            speak = "Timer cancelled." if ids else "There is no timer."
            return self._done("timer", {"cancelled": ids}, speak)
        if len(self.timers) >= MAX_TIMERS:
            return self._failed("timer", f"at most {MAX_TIMERS} timers at once")
        timer = Timer(new_id("tmr"), args.total_s, args.label, time.time() + args.total_s)
        timer.task = asyncio.create_task(self._ring(timer), name=f"timer-{timer.id}")
        self.timers[timer.id] = timer
        self.app.bus.emit(EventType.TIMER_SET, timer_id=timer.id, seconds=timer.seconds,
                          label=timer.label)
        log.info("timer set", timer_id=timer.id, seconds=timer.seconds, label=timer.label)
        return self._done("timer", timer.as_dict(),
                          f"Timer set for {describe_duration(timer.seconds)}.")

    async def _ring(self, timer: Timer) -> None:
        await asyncio.sleep(max(0.0, timer.due - time.time()))
        self.timers.pop(timer.id, None)
        self.app.bus.emit(EventType.TIMER_RANG, timer_id=timer.id, seconds=timer.seconds,
                          label=timer.label)
        log.info("timer rang", timer_id=timer.id, label=timer.label)
        if self.app.sink is not None:
            try:
                async with asyncio.timeout(60):
                    await self.say(f"{_timer_name(timer).capitalize()} is done.")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the ring was still emitted; speech is best effort
                log.warning("could not announce the timer", timer_id=timer.id, error=str(exc))

    async def time_cmd(self, args: TimeArgs, source: str) -> Outcome:
        now = datetime.now().astimezone()
        hour = now.strftime("%I").lstrip("0") or "12"
        spoken = f"It is {hour}:{now:%M} {now:%p}."
        if args.date:
            spoken = f"Today is {now:%A}, {now.day} {now:%B} {now.year}."
        return self._done("time", {"iso": now.isoformat(timespec="seconds"),
                                   "time": f"{now:%H:%M}", "date": now.date().isoformat(),
                                   "weekday": f"{now:%A}", "timezone": now.tzname() or "",
                                   "spoken": spoken}, spoken)


def _timer_name(timer: Timer) -> str:
    return f"the {timer.label} timer" if timer.label else \
        f"your {describe_duration(timer.seconds)} timer"


SPECS: dict[str, CommandSpec] = {
    "help": CommandSpec("List the commands and their arguments.", NoArgs, Commands.help),
    "status": CommandSpec("Pipeline state, mute, volume, persona, timers.", NoArgs,
                          Commands.status),
    "say": CommandSpec("Say a text aloud in the active persona's voice.", SayArgs,
                       Commands.say_cmd),
    "stop": CommandSpec("Stop speaking and the turn in progress (barge-in).", NoArgs,
                        Commands.stop),
    "listen": CommandSpec("Start listening for an utterance, as the talk button does.", NoArgs,
                          Commands.listen),
    "mute": CommandSpec("Cut the microphone (software).", NoArgs, Commands.mute),
    "unmute": CommandSpec("Turn the microphone back on.", NoArgs, Commands.unmute),
    "volume": CommandSpec("Read or set the speaker volume: level 0-100 or change up/down.",
                          VolumeArgs, Commands.volume),
    "persona": CommandSpec("Show or switch the active persona (id or spoken name).", PersonaArgs,
                           Commands.persona),
    "timer": CommandSpec("Set a timer that rings (seconds/minutes, label), list or cancel them.",
                         TimerArgs, Commands.timer),
    "time": CommandSpec("The local time (and date).", TimeArgs, Commands.time_cmd),
}


def commands_for(app: App) -> Commands:
    """The App's command set, created on first use (its timers live as long as the App)."""
    commands = app.extensions.get("commands")
    if commands is None:
        commands = Commands(app)
        app.extensions["commands"] = commands
    return commands


def make_intent_handler(app: App) -> IntentHandler:
    """The voice pipeline's local-command hook: confident matches run here, the rest (None)
    goes to the LLM."""

    async def handle(text: str, turn_id: str) -> LocalAction | None:
        intent = parse(text, app.personas)
        if (not intent.parsed or intent.confidence < VOICE_CONFIDENCE
                or intent.command in ("say", "listen")):
            return None
        assert intent.command is not None
        try:
            outcome = await commands_for(app).execute(intent.command, intent.args, source="voice")
        except CommandError as exc:
            if exc.code == "FORBIDDEN":
                return LocalAction(speak="Sorry, I can't do that here.", name=intent.command)
            return None
        except ValidationError:
            return None
        log.info("local command", command=intent.command, turn_id=turn_id,
                 status=outcome.status)
        if outcome.status == "failed":
            return LocalAction(speak="Sorry, I couldn't do that.", name=intent.command)
        return LocalAction(speak=outcome.speak, name=intent.command)

    return handle


__all__ = ["CommandError", "Commands", "Outcome", "commands_for", "make_intent_handler"]
