"""Handing a conversation to another device and taking one over (through the fleet)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import Field, field_validator

from companion.actions import speaking
from companion.actions.core import Action, ActionError, Context, Outcome, Request

if TYPE_CHECKING:
    from companion.app import App

log = structlog.get_logger(__name__)

CONTROL_ONLY = frozenset({"control"})


class HandoffOutRequest(Request):
    session_id: str | None = Field(None, description="Default: the active session.")
    to_device_id: str | None = None
    notify_user: bool = True
    goodbye_message: str | None = Field(None, max_length=2000)


class HandoffInRequest(Request):
    session: dict[str, Any] = Field(description="A session export (store.export_session).")
    from_device_id: str | None = None
    notify_user: bool = True
    greeting: str | None = Field(None, max_length=2000)

    @field_validator("session")
    @classmethod
    def _export(cls, value: dict[str, Any]) -> dict[str, Any]:
        missing = [k for k in ("version", "session_id", "persona_id", "turns") if k not in value]
        if missing:
            raise ValueError(f"session export lacks {', '.join(missing)}")
        if not isinstance(value["turns"], list):
            raise ValueError("session.turns must be a list")
        return value


async def handoff_out(app: App, req: HandoffOutRequest, ctx: Context) -> Outcome:
    """Export the session, say goodbye, send it up the link, end it here."""
    from companion.control.protocol import SESSION_EXPORT, device_frame  # (imports actions)

    if ctx.deliver is None:
        raise ActionError("UNAVAILABLE", "no control-plane link to hand the session to")
    conv, store = app.conversation, app.store
    session_id = req.session_id or conv.active_session_id
    if session_id is None:
        raise ActionError("NOT_FOUND", "no active session to hand off")
    doc = await store.run(store.export_session, session_id)
    if doc is None:
        raise ActionError("NOT_FOUND", f"no session {session_id!r} on this device")
    if req.notify_user and app.speech.sink is not None:
        where = f" to {req.to_device_id}" if req.to_device_id else ""
        message = req.goodbye_message or (
            f"I'm passing our conversation over{where}. See you there!")
        await _say_best_effort(app, message, ctx.priority)
    await ctx.deliver(device_frame(SESSION_EXPORT, {
        "session_id": session_id, "to_device_id": req.to_device_id,
        "from_device_id": app.settings.device_id, "persona_id": doc["persona_id"],
        "notify_user": req.notify_user, "session": doc}))
    if session_id == conv.active_session_id:
        await conv.end_active_session()
    return Outcome("handoff_out", {"session_id": session_id, "to_device_id": req.to_device_id,
                                   "turns": len(doc["turns"]), "exported": True})


async def handoff_in(app: App, req: HandoffInRequest, ctx: Context) -> Outcome:
    """Import a session export, adopt it (with its persona when known here), greet."""
    store, conv = app.store, app.conversation
    try:
        session = await store.run(lambda: store.import_session(req.session,
                                                               origin=req.from_device_id))
    except (ValueError, KeyError, TypeError) as exc:
        raise ActionError("VALIDATION_ERROR", f"cannot import the session: {exc}") from None
    persona_id = session.persona_id if session.persona_id in app.personas \
        else conv.active_persona_id
    await conv.adopt_session(session.id, persona_id)
    outcome = Outcome("handoff_in", {"session_id": session.id,
                                     "persona_id": conv.active_persona_id,
                                     "turns": len(session.messages),
                                     "from_device_id": req.from_device_id})
    if session.id != str(req.session["session_id"]):  # a different history here has that id
        outcome.result["renamed_from"] = str(req.session["session_id"])
    if req.notify_user and app.speech.sink is not None:
        greeting = req.greeting or "Hello again! I have our conversation here. Let's carry on."
        priority = ctx.priority
        outcome.after = lambda: speaking.speak(app, greeting, priority)
    return outcome


async def _say_best_effort(app: App, text: str, priority: int) -> None:
    try:
        await speaking.speak(app, text, priority)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("could not speak", error=str(exc))


ACTIONS = [
    Action("handoff_out", "Hand the conversation to another device through the control plane.",
           HandoffOutRequest, handoff_out, channels=CONTROL_ONLY),
    Action("handoff_in", "Take over a conversation handed over by another device.",
           HandoffInRequest, handoff_in, channels=CONTROL_ONLY),
]
