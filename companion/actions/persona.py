"""The persona switch: one action for voice, /v1/commands, /v1/personas/switch and the fleet."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from companion.actions import speaking
from companion.actions.core import Action, ActionError, Context, Outcome, Request
from companion.conversation import PersonaNotFoundError

if TYPE_CHECKING:
    from companion.app import App


class PersonaRequest(Request):
    id: str | None = Field(None, min_length=1, max_length=64)
    name: str | None = Field(None, min_length=1, max_length=64, description="As a user says it.")
    preserve_context: bool = True
    transition_message: str | None = Field(None, min_length=1, max_length=2000,
                                           description="Said in the new persona's voice.")


async def persona(app: App, req: PersonaRequest, ctx: Context) -> Outcome:
    """Without id or name: which persona is active. Otherwise switch; a transition message is
    said afterwards (after the ack / the HTTP answer) in the new voice."""
    conv = app.conversation
    if req.id is None and req.name is None:
        active = conv.active_persona
        return Outcome("persona", {"persona_id": active.id, "name": active.name,
                                   "available": app.personas.ids()})
    target = app.personas.get(req.id) if req.id is not None else \
        app.personas.find_by_name(req.name or "")
    if target is None:
        raise ActionError("NOT_FOUND", f"no persona {req.id or req.name!r}",
                          {"available": app.personas.ids()})
    try:
        result = await conv.switch_persona(target.id, preserve_context=req.preserve_context)
    except PersonaNotFoundError as exc:  # removed by a reload meanwhile
        raise ActionError("NOT_FOUND", str(exc), {"available": app.personas.ids()}) from None
    outcome = Outcome("persona", {
        "previous_persona_id": result.previous_persona_id,
        "new_persona_id": result.new_persona_id, "session_id": result.session_id,
        "preserved_context": result.preserved_context,
        "switch_latency_ms": round(result.switch_latency_ms, 2)},
        "" if req.transition_message else f"Hello, this is {target.name}.")
    if req.transition_message:
        message, voice_of, priority = req.transition_message, conv.active_persona, ctx.priority
        outcome.after = lambda: speaking.speak(app, message, priority, persona=voice_of)
    return outcome


ACTIONS = [
    Action("persona", "Show or switch the active persona (id or spoken name).", PersonaRequest,
           persona, channels=frozenset({"api", "voice", "control", "tool"}),
           confirm="switch persona"),
]
