"""The voice adapter: an utterance → a local action, or None (the LLM answers it).

Confident matches run at once, unless the parser says a person should approve them (muting: a
muted device cannot hear "unmute"); then the device asks "Do you want me to …?", keeps the
request for ``APPROVAL_TTL_S``, and runs it only after a yes (a no, or anything else, drops it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from companion.actions.core import ActionError, Context
from companion.intents import VOICE_CONFIDENCE, is_no, is_yes, parse
from companion.pipeline import IntentHandler, LocalAction

if TYPE_CHECKING:
    from companion.app import App

log = structlog.get_logger(__name__)

APPROVAL_TTL_S = 30.0
NOT_BY_VOICE = frozenset({"say", "listen"})  # too easily triggered by ordinary speech


@dataclass
class _Pending:
    command: str
    args: dict[str, Any]
    asked_at: float


class VoiceCommands:
    """``handle`` is the voice pipeline's IntentHandler."""

    def __init__(self, app: App, *, clock=time.monotonic) -> None:
        self.app = app
        self.clock = clock
        self.pending: _Pending | None = None

    async def handle(self, text: str, turn_id: str) -> LocalAction | None:
        pending, self.pending = self.pending, None
        if pending is not None and self.clock() - pending.asked_at <= APPROVAL_TTL_S:
            if is_yes(text):
                return await self._run(pending.command, pending.args, turn_id, text)
            if is_no(text):
                return LocalAction(speak="Okay, I won't.", name=pending.command)
        intent = parse(text, self.app.personas)
        if (not intent.parsed or intent.confidence < VOICE_CONFIDENCE
                or intent.command in NOT_BY_VOICE):
            return None
        assert intent.command is not None
        if intent.needs_approval:
            action = self.app.actions.get(intent.command)
            what = action.confirm if action is not None and action.confirm else intent.command
            self.pending = _Pending(intent.command, intent.args, self.clock())
            log.info("local command awaits approval", command=intent.command, turn_id=turn_id)
            return LocalAction(speak=f"Do you want me to {what}?", name=intent.command,
                               expect_reply=True)
        return await self._run(intent.command, intent.args, turn_id, text)

    async def _run(self, command: str, args: dict[str, Any], turn_id: str,
                   text: str) -> LocalAction | None:
        try:
            outcome = await self.app.actions.run(
                command, args, context=Context("voice", turn_id=turn_id, text=text))
        except ActionError as exc:
            log.info("local command refused", command=command, code=exc.code, turn_id=turn_id)
            if exc.code == "FORBIDDEN":
                return LocalAction(speak="Sorry, I can't do that here.", name=command)
            if exc.code in ("UNAVAILABLE", "FAILED"):
                return LocalAction(speak="Sorry, I couldn't do that.", name=command)
            return None  # not something we can do locally after all: the LLM answers
        log.info("local command", command=command, turn_id=turn_id)
        return LocalAction(speak=outcome.speak, name=command)


def make_intent_handler(app: App) -> IntentHandler:
    return VoiceCommands(app).handle
