"""The persona library: list, detail, switch (an adapter over the persona action), reload."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web

from companion.actions import ActionError, Context
from companion.api import schemas as s
from companion.api.common import ApiError, app_of, route, timed

if TYPE_CHECKING:
    from companion.app import App


def _summary(app: App, persona) -> dict[str, Any]:
    return {**persona.summary(), "active": persona.id == app.conversation.active_persona_id}


@route("GET", "/v1/personas", summary="The persona library", tag="personas",
       response=s.PersonaListResponse)
async def list_personas(request: web.Request) -> s.PersonaListResponse:
    app = app_of(request)
    return s.PersonaListResponse(
        personas=[s.PersonaSummary(**_summary(app, p)) for p in app.personas.all()],
        active_persona_id=app.conversation.active_persona.id)


@route("GET", "/v1/personas/{id}", summary="One persona in detail", tag="personas",
       response=s.PersonaDetail)
async def get_persona(request: web.Request) -> s.PersonaDetail:
    app = app_of(request)
    persona = app.personas.get(request.match_info["id"])
    if persona is None:
        raise ApiError(404, "NOT_FOUND", f"no persona {request.match_info['id']!r}",
                       {"available": app.personas.ids()})
    return s.PersonaDetail(**_summary(app, persona), aliases=list(persona.aliases),
                           system_prompt=persona.system_prompt,
                           character=persona.character.model_dump(mode="json"),
                           voice_config=persona.voice_config.model_dump(mode="json"),
                           behavior_config=persona.behavior_config.model_dump(mode="json"))


@route("POST", "/v1/personas/switch", summary="Switch the active persona", tag="personas",
       body=s.SwitchRequest, response=s.SwitchResponse, errors=(404,))
async def switch_persona(request: web.Request, body: s.SwitchRequest) -> s.SwitchResponse:
    """Keeps the conversation when preserve_context is true; a transition_message is said in
    the new persona's voice."""
    app = app_of(request)
    try:
        async with asyncio.timeout(60):
            outcome = await app.actions.run(
                "persona", {"id": body.target_persona_id,
                            "preserve_context": body.preserve_context,
                            "transition_message": body.transition_message},
                context=Context("api", trusted_caller=True))
    except ActionError as exc:
        raise ApiError(exc.status, exc.code, exc.message, exc.details) from exc
    if outcome.after is not None and app.sink is not None:
        app.actions.spawn(outcome.after(), "transition-message")
    r = outcome.result
    return s.SwitchResponse(success=True, previous_persona_id=r["previous_persona_id"],
                            new_persona_id=r["new_persona_id"],
                            switch_latency_ms=round(r["switch_latency_ms"], 1),
                            session_id=r["session_id"])


@route("POST", "/v1/personas/reload", summary="Re-read the persona files", tag="personas",
       response=s.ReloadResponse)
async def reload_personas(request: web.Request) -> s.ReloadResponse:
    """A bad file is reported and never replaces the good persona already loaded."""
    app = app_of(request)
    errors = await timed(lambda: asyncio.to_thread(app.reload_personas), 30)
    return s.ReloadResponse(personas=app.personas.ids(), errors=errors)
