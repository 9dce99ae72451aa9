"""The action core: every thing the device can be asked to do, declared once.

An ``Action`` is a name, a description, a pydantic request model and one async handler. The
``ActionRegistry`` (built once per App) runs them and lists them; voice intents, ``/v1/commands``,
control-plane commands and buttons are adapters that turn their input into a request and the
``Outcome`` back into their own answer. Because each request is a pydantic model, the same list
becomes an LLM tool list or MCP tools (``tool_specs``) and the OpenAPI/control-plane docs.

Errors are one type, ``ActionError``, whose ``code`` is a stable name (it goes to the fleet and to
HTTP clients), never an exception class name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from companion.events import EventType

if TYPE_CHECKING:
    from companion.app import App

log = structlog.get_logger(__name__)

Source = Literal["api", "voice", "control", "button", "tool"]
# who may reach an action: the local HTTP API, voice, the fleet, physical buttons, an LLM/MCP
Channel = Literal["api", "voice", "control", "button", "tool"]
ALL_CHANNELS: frozenset[str] = frozenset({"api", "voice", "control", "button", "tool"})

# stable code → HTTP status. FAILED and UNAVAILABLE mean "understood and allowed, but the device
# could not do it": /v1/commands reports them as a command with status "failed" (SPEC §3).
ERROR_STATUS: dict[str, int] = {
    "NOT_FOUND": 404,
    "FORBIDDEN": 403,
    "VALIDATION_ERROR": 422,
    "CONFLICT": 409,
    "UNAVAILABLE": 503,
    "FAILED": 502,
    "INTERRUPTED": 409,  # stopped by barge-in or a more urgent message
    "INTERNAL": 500,  # a bug: the reason is in the log, not in the answer
}
REPORTED_AS_FAILED = frozenset({"UNAVAILABLE", "FAILED"})


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ActionError(Exception):
    """An action that could not run; ``code`` is one of ``ERROR_STATUS``."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        if code not in ERROR_STATUS:
            raise ValueError(f"unknown action error code {code!r}")
        super().__init__(message)
        self.code, self.message, self.details = code, message, details or {}

    @property
    def status(self) -> int:
        return ERROR_STATUS[self.code]

    @classmethod
    def invalid(cls, exc: ValidationError, prefix: str = "args.") -> ActionError:
        fields = [{"field": prefix + (".".join(str(p) for p in e["loc"]) or "(body)"),
                   "error": e["msg"]} for e in exc.errors()]
        return cls("VALIDATION_ERROR", "the request is not valid", {"fields": fields})


class Request(BaseModel):
    """Base of every action request: unknown fields are errors (a typo is not ignored)."""

    model_config = ConfigDict(extra="forbid")


class NoArgs(Request):
    pass


@dataclass(frozen=True)
class Context:
    """Where a request came from; the action knows the device, the adapter its transport."""

    source: Source
    priority: int = 0  # speech priority: 0 polite, 1 after the current sentence, 2+ at once
    turn_id: str | None = None
    # the control plane's outbox, for actions that send a frame (a session handoff)
    deliver: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    trusted_caller: bool = False  # an operator's endpoint (POST /v1/personas/switch)
    text: str | None = None  # what was said, for a voice command (in the COMMAND event)

    @property
    def trusted(self) -> bool:
        """The fleet, an operator's endpoint and the person's own hand are not bound by the
        persona's allowed commands."""
        return self.trusted_caller or self.source in ("control", "button")


@dataclass
class Outcome:
    action: str
    result: dict[str, Any] = field(default_factory=dict)
    speak: str = ""  # what the device says when the request came by voice
    executed_at: str = field(default_factory=lambda: iso(time.time()))
    # work to run after the adapter has answered (speak a transition message after the ack)
    after: Callable[[], Awaitable[Any]] | None = None


Handler = Callable[["App", Any, Context], Awaitable[Outcome]]


@dataclass(frozen=True)
class Action:
    name: str
    description: str
    request: type[Request]
    handler: Handler
    channels: frozenset[str] = ALL_CHANNELS
    always_allowed: bool = False  # by every persona (help, status)
    confirm: str = ""  # "turn off the microphone": asked by voice when approval is needed

    def tool_spec(self) -> dict[str, Any]:
        """This action as an LLM tool / MCP tool: name, description, JSON schema of the input."""
        schema = self.request.model_json_schema()
        schema.pop("title", None)
        return {"name": self.name, "description": self.description, "input_schema": schema}


class ActionRegistry:
    """The App's actions (built once by ``build_registry``)."""

    def __init__(self, app: App, actions: Iterable[Action] = ()) -> None:
        self.app = app
        self._actions: dict[str, Action] = {}
        self._background: set[asyncio.Task[Any]] = set()
        for action in actions:
            self.register(action)

    def register(self, action: Action) -> None:
        if action.name in self._actions:
            raise ValueError(f"action {action.name!r} registered twice")
        self._actions[action.name] = action

    def get(self, name: str) -> Action | None:
        return self._actions.get(name)

    def names(self, channel: str | None = None) -> list[str]:
        return sorted(n for n, a in self._actions.items() if channel is None
                      or channel in a.channels)

    def actions(self, channel: str | None = None) -> list[Action]:
        return [self._actions[n] for n in self.names(channel)]

    def tool_specs(self) -> list[dict[str, Any]]:
        """The actions an LLM or an MCP client may call, as tool definitions."""
        return [a.tool_spec() for a in self.actions("tool")]

    def parse(self, name: str, args: dict[str, Any] | BaseModel | None, *,
              channel: str) -> tuple[Action, Request]:
        action = self._actions.get(name)
        if action is None or channel not in action.channels:
            raise ActionError("NOT_FOUND", f"unknown command {name!r}",
                              {"known_commands": self.names(channel)})
        if isinstance(args, action.request):
            return action, args
        try:
            data = args.model_dump() if isinstance(args, BaseModel) else (args or {})
            return action, action.request.model_validate(data)
        except ValidationError as exc:
            raise ActionError.invalid(exc) from exc

    async def run(self, name: str, args: dict[str, Any] | BaseModel | None = None, *,
                  context: Context, channel: str | None = None) -> Outcome:
        """Validate, check the persona's allowed commands, run; raises ``ActionError``."""
        action, request = self.parse(name, args, channel=channel or context.source)
        if not context.trusted and not action.always_allowed:
            persona = self.app.conversation.active_persona
            if not persona.behavior_config.allows(name):
                raise ActionError("FORBIDDEN",
                                  f"persona {persona.id!r} does not allow the {name!r} command",
                                  {"persona_id": persona.id,
                                   "allowed_commands": persona.behavior_config.allowed_commands})
        log.info("action", action=name, source=context.source, turn_id=context.turn_id)
        # the one COMMAND event of a command, whatever the channel (voice included)
        self.app.bus.emit(EventType.COMMAND, context.turn_id, command=name,
                          source=context.source, text=context.text)
        return await action.handler(self.app, request, context)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` past the request that started it; failures are logged, not lost."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background action failed", task=name, error=str(t.exception()))

        task.add_done_callback(done)
        return task

    async def aclose(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
