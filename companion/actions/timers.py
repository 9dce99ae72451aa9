"""Timers: real asyncio tasks that ring (they speak and emit TIMER_RANG)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import Field, model_validator

from companion.actions import speaking
from companion.actions.core import Action, ActionError, Context, Outcome, Request, iso
from companion.events import EventType
from companion.intents import describe_duration
from companion.store import new_id

if TYPE_CHECKING:
    from companion.app import App

log = structlog.get_logger(__name__)

MAX_TIMERS = 20


class TimerRequest(Request):
    action: Literal["set", "list", "cancel"] = "set"
    seconds: float | None = Field(None, gt=0, le=86400)
    minutes: float | None = Field(None, gt=0, le=1440)
    label: str | None = Field(None, min_length=1, max_length=64)
    id: str | None = Field(None, max_length=64, description="Timer to cancel (default: all).")

    @model_validator(mode="after")
    def _duration(self) -> TimerRequest:
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

    @property
    def spoken_name(self) -> str:
        return f"the {self.label} timer" if self.label else \
            f"your {describe_duration(self.seconds)} timer"


class Timers:
    """The App's running timers (they live as long as the App)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.by_id: dict[str, Timer] = {}

    def all(self) -> list[Timer]:
        return sorted(self.by_id.values(), key=lambda t: t.due)

    def __len__(self) -> int:
        return len(self.by_id)

    def start(self, seconds: float, label: str | None) -> Timer:
        if len(self.by_id) >= MAX_TIMERS:
            raise ActionError("UNAVAILABLE", f"at most {MAX_TIMERS} timers at once")
        timer = Timer(new_id("tmr"), seconds, label, time.time() + seconds)
        timer.task = asyncio.create_task(self._ring(timer), name=f"timer-{timer.id}")
        self.by_id[timer.id] = timer
        self.app.bus.emit(EventType.TIMER_SET, timer_id=timer.id, seconds=timer.seconds,
                          label=timer.label)
        log.info("timer set", timer_id=timer.id, seconds=timer.seconds)
        return timer

    def cancel(self, timer_id: str | None) -> list[str]:
        if timer_id is not None and timer_id not in self.by_id:
            raise ActionError("NOT_FOUND", f"no timer {timer_id!r}", {"timers": list(self.by_id)})
        ids = [timer_id] if timer_id else list(self.by_id)
        for tid in ids:
            timer = self.by_id.pop(tid)
            if timer.task is not None:
                timer.task.cancel()
        return ids

    async def _ring(self, timer: Timer) -> None:
        await asyncio.sleep(max(0.0, timer.due - time.time()))
        self.by_id.pop(timer.id, None)
        app = self.app
        app.bus.emit(EventType.TIMER_RANG, timer_id=timer.id, seconds=timer.seconds,
                     label=timer.label)
        log.info("timer rang", timer_id=timer.id)
        if app.sink is not None:
            try:
                async with asyncio.timeout(60):
                    await app.speech.say(f"{timer.spoken_name.capitalize()} is done.",
                                         speaking.voice_of(app))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the ring was still emitted; speech is best effort
                log.warning("could not announce the timer", timer_id=timer.id, error=str(exc))

    async def aclose(self) -> None:
        tasks = [t.task for t in self.by_id.values() if t.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.by_id.clear()


async def timer(app: App, req: TimerRequest, ctx: Context) -> Outcome:
    timers = app.timers
    if req.action == "list":
        listed = timers.all()
        speak = " ".join(f"{t.spoken_name.capitalize()} has "
                         f"{describe_duration(t.due - time.time())} left." for t in listed)
        return Outcome("timer", {"timers": [t.as_dict() for t in listed]},
                       speak or "You have no timers.")
    if req.action == "cancel":
        ids = timers.cancel(req.id)
        return Outcome("timer", {"cancelled": ids},
                       "Timer cancelled." if ids else "There is no timer.")
    started = timers.start(req.total_s, req.label)
    return Outcome("timer", started.as_dict(),
                   f"Timer set for {describe_duration(started.seconds)}.")


ACTIONS = [
    Action("timer", "Set a timer that rings (seconds/minutes, label), list or cancel them.",
           TimerRequest, timer, channels=frozenset({"api", "voice", "tool"})),
]
