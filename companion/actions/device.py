"""Actions on the device itself: speaking, listening, mute, volume, LED, time, help, status."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from companion.actions import clips, speaking
from companion.actions.core import Action, ActionError, Context, NoArgs, Outcome, Request
from companion.events import EventType

if TYPE_CHECKING:
    from companion.app import App

# the channels most actions are offered on
LOCAL = frozenset({"api", "voice", "tool"})
NAMED_COLORS = {"red": "#FF0000", "green": "#00FF00", "blue": "#0000FF", "white": "#FFFFFF",
                "yellow": "#FFFF00", "orange": "#FF8000", "purple": "#8000FF", "off": "#000000"}


class SayRequest(Request):
    text: str = Field(min_length=1, max_length=1000)
    interrupt: bool = Field(False, description="Stop current speech first.")
    wait: bool = Field(False, description="Answer when it has been said (else at once).")


class VolumeRequest(Request):
    level: int | None = Field(None, ge=0, le=100, description="Percent.")
    change: Literal["up", "down"] | None = None
    step: int = Field(10, ge=1, le=50, description="Percent per up/down.")


class TimeRequest(Request):
    date: bool = False


class LedRequest(Request):
    pattern: Literal["solid", "blink", "pulse", "off"] = "solid"
    color: str = Field("#FFFFFF", description="#RRGGBB or a colour name.")
    duration_ms: int = Field(3000, ge=1, le=3_600_000)

    @field_validator("color")
    @classmethod
    def _color(cls, value: str) -> str:
        value = NAMED_COLORS.get(value.lower(), value)
        stripped = value.lstrip("#")
        if len(stripped) != 6 or any(c not in "0123456789abcdefABCDEF" for c in stripped):
            raise ValueError("must be #RRGGBB or a colour name " + ", ".join(NAMED_COLORS))
        return "#" + stripped.upper()


class AnnounceRequest(Request):
    text: str | None = Field(None, max_length=4000, description="Said after any audio.")
    audio_b64: str | None = Field(None, description="A WAV file (16-bit PCM), base64.")
    audio_url: str | None = Field(None, pattern=r"^https?://", description="A WAV over HTTP(S).")
    event_type: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _one_source(self) -> AnnounceRequest:
        if self.audio_b64 and self.audio_url:
            raise ValueError("give audio_b64 or audio_url, not both")
        return self


# --- help and status ---------------------------------------------------------------------------


async def help_(app: App, req: NoArgs, ctx: Context) -> Outcome:
    allowed = app.conversation.active_persona.behavior_config
    commands = [{"command": a.name, "description": a.description,
                 "allowed": a.always_allowed or allowed.allows(a.name),
                 "args": a.request.model_json_schema().get("properties", {})}
                for a in app.actions.actions(ctx.source)]
    speak = ("I can set timers, tell you the time, change my volume, stop talking, "
             "and switch who you are talking to.")
    return Outcome("help", {"commands": commands}, speak)


def problems(app: App) -> list[str]:
    """What is not working right now, in words a person understands."""
    found = []
    for name, component in sorted(app.status.components.items()):
        if not component.get("healthy"):
            found.append(f"my {name.replace('_', ' ')} is not working")
    if app.settings.control_plane.enabled:
        if app.control is None or not app.control.status.connected:
            found.append("I am not connected to the control plane")
    return found


async def status(app: App, req: NoArgs, ctx: Context) -> Outcome:
    s = app.status
    issues = problems(app)
    result = {"pipeline_state": str(s.pipeline_state), "muted": s.muted,
              "volume": round(s.volume, 3), "speaking": app.speech.speaking,
              "persona_id": app.conversation.active_persona_id,
              "session_id": app.conversation.active_session_id,
              "voice_loop": app.voice is not None,
              "components": {k: bool(v.get("healthy")) for k, v in s.components.items()},
              "problems": issues,
              "timers": [t.as_dict() for t in app.timers.all()]}
    parts = (["I'm muted."] if s.muted else []) + [f"{p[0].upper()}{p[1:]}." for p in issues]
    return Outcome("status", result, " ".join(parts) or "Everything is working.")


# --- speaking and listening ----------------------------------------------------------------------


async def say(app: App, req: SayRequest, ctx: Context) -> Outcome:
    if app.sink is None:
        raise ActionError("UNAVAILABLE", "no audio output device")
    voice = speaking.voice_of(app)
    if req.wait:
        async with asyncio.timeout(300):
            await app.speech.say(req.text, voice, interrupt=req.interrupt)
        return Outcome("say", {"text": req.text, "spoken": True})
    app.actions.spawn(app.speech.say(req.text, voice, interrupt=req.interrupt), "say")
    return Outcome("say", {"text": req.text, "spoken": False, "queued": True})


async def stop(app: App, req: NoArgs, ctx: Context) -> Outcome:
    voice = app.voice
    if voice is not None and ctx.source != "voice":
        stopped = voice.barge_in()  # speech and the turn behind it
    else:  # from inside a voice turn: stop other speech (a ringing timer), not this turn
        stopped = app.speech.stop()
    return Outcome("stop", {"stopped": stopped})


async def listen(app: App, req: NoArgs, ctx: Context) -> Outcome:
    voice = app.voice
    if voice is None:
        raise ActionError("UNAVAILABLE", "no microphone: the voice loop is off")
    if app.status.muted:
        raise ActionError("UNAVAILABLE", "the microphone is muted")
    return Outcome("listen", {"turn_id": voice.start_turn(trigger=ctx.source)})


def set_muted(app: App, muted: bool) -> bool:
    """Mute or unmute (one MUTE_CHANGED event either way); returns the previous state."""
    previous = app.status.muted
    if app.voice is not None:
        app.voice.set_muted(muted)
    elif previous != muted:
        app.status.muted = muted
        app.bus.emit(EventType.MUTE_CHANGED, muted=muted)
    return previous


async def mute(app: App, req: NoArgs, ctx: Context) -> Outcome:
    previous = set_muted(app, True)
    return Outcome("mute", {"muted": True, "was_muted": previous}, "Microphone off.")


async def unmute(app: App, req: NoArgs, ctx: Context) -> Outcome:
    previous = set_muted(app, False)
    return Outcome("unmute", {"muted": False, "was_muted": previous}, "I'm listening again.")


def set_volume(app: App, volume: float) -> float:
    """Set the speaker volume (0..1, clamped); returns the previous one."""
    status = app.status
    previous, new = status.volume, round(min(1.0, max(0.0, volume)), 3)
    status.volume = new
    if app.sink is not None and hasattr(app.sink, "volume"):
        app.sink.volume = new
    if new != previous:
        app.bus.emit(EventType.VOLUME_CHANGED, volume=new, previous=previous)
    return previous


async def volume(app: App, req: VolumeRequest, ctx: Context) -> Outcome:
    previous = app.status.volume
    if req.level is not None:
        target = req.level / 100
    elif req.change is not None:
        target = previous + req.step / 100 * (1 if req.change == "up" else -1)
    else:
        return Outcome("volume", {"volume": round(previous * 100)})
    set_volume(app, target)
    new = app.status.volume
    speak = "This is as loud as I go." if new >= 1.0 and req.change == "up" else (
        "This is as quiet as I go." if new <= 0.05 and req.change == "down" else "Okay.")
    return Outcome("volume", {"volume": round(new * 100), "previous": round(previous * 100)},
                   speak)


async def time_(app: App, req: TimeRequest, ctx: Context) -> Outcome:
    now = datetime.now().astimezone()
    hour = now.strftime("%I").lstrip("0") or "12"
    spoken = f"It is {hour}:{now:%M} {now:%p}."
    if req.date:
        spoken = f"Today is {now:%A}, {now.day} {now:%B} {now.year}."
    return Outcome("time", {"iso": now.isoformat(timespec="seconds"), "time": f"{now:%H:%M}",
                            "date": now.date().isoformat(), "weekday": f"{now:%A}",
                            "timezone": now.tzname() or "", "spoken": spoken}, spoken)


# --- LED and announcements -----------------------------------------------------------------------


async def led(app: App, req: LedRequest, ctx: Context) -> Outcome:
    if app.led is None:
        raise ActionError("UNAVAILABLE", "no LED on this device (GPIO unavailable)")
    app.led.override(req.color, req.pattern, req.duration_ms)
    app.bus.emit(EventType.LED_OVERRIDE, color=req.color, pattern=req.pattern,
                 duration_ms=req.duration_ms)
    return Outcome("led", {"color": req.color, "pattern": req.pattern,
                           "duration_ms": req.duration_ms})


async def announce(app: App, req: AnnounceRequest, ctx: Context) -> Outcome:
    """Play the audio (if any), then say the text, at the request's priority."""
    result: dict[str, Any] = {} if req.event_type is None else {"event_type": req.event_type}
    if req.audio_b64 or req.audio_url:
        clip = (clips.decode_wav(req.audio_b64) if req.audio_b64
                else await clips.fetch_wav(
                    req.audio_url or "",
                    allowed_hosts=app.settings.control_plane.audio_url_hosts))
        await speaking.play_clip(app, clip, ctx.priority)
        result["played_s"] = round(clip.duration_s, 3)
    if req.text:
        stats = await speaking.speak(app, req.text, ctx.priority)
        result["spoken_s"] = round(stats.audio_s, 3)
    if not (req.text or req.audio_b64 or req.audio_url):
        result["spoken_s"] = 0.0
        result["note"] = "nothing to say (no text or audio in the payload)"
    return Outcome("announce", result)


ACTIONS = [
    Action("help", "List the commands and their arguments.", NoArgs, help_,
           channels=LOCAL, always_allowed=True),
    Action("status", "Pipeline state, mute, volume, persona, timers, what is not working.",
           NoArgs, status, channels=LOCAL, always_allowed=True),
    Action("say", "Say a text aloud in the active persona's voice.", SayRequest, say,
           channels=LOCAL),
    Action("stop", "Stop speaking and the turn in progress (barge-in).", NoArgs, stop,
           channels=LOCAL | {"button"}),
    Action("listen", "Start listening for an utterance, as the talk button does.", NoArgs,
           listen, channels=frozenset({"api", "voice", "button"})),
    Action("mute", "Cut the microphone (software).", NoArgs, mute,
           channels=LOCAL | {"button"}, confirm="turn off the microphone"),
    Action("unmute", "Turn the microphone back on.", NoArgs, unmute,
           channels=LOCAL | {"button"}),
    Action("volume", "Read or set the speaker volume: level 0-100 or change up/down.",
           VolumeRequest, volume, channels=LOCAL | {"button"}),
    Action("time", "The local time (and date).", TimeRequest, time_, channels=LOCAL),
    Action("led", "Show a colour on the LED for a while, then the state display again.",
           LedRequest, led, channels=frozenset({"control"})),
    Action("announce", "Play a WAV clip and/or say a text, by speech priority.",
           AnnounceRequest, announce, channels=frozenset({"control"})),
]
