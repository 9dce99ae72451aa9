"""/v1/state and the conversation history (/v1/sessions/{id})."""

from __future__ import annotations

from aiohttp import web

from companion.actions import iso
from companion.api import schemas as s
from companion.api.common import METRICS, ApiError, app_of, route, timed, turns_today
from companion.events import PipelineState


@route("GET", "/v1/state", summary="Device state", tag="state", response=s.StateResponse)
async def state(request: web.Request) -> s.StateResponse:
    """status: busy while listening, thinking or speaking; offline when a configured control
    plane is not connected; online otherwise."""
    app = app_of(request)
    st = app.status
    link = app.control.status if app.control is not None else None
    configured = app.settings.control_plane.enabled
    busy = st.pipeline_state in (PipelineState.LISTENING, PipelineState.THINKING,
                                 PipelineState.SPEAKING) or app.speech.speaking
    connected = link.connected if link is not None else None
    status = "busy" if busy else ("offline" if configured and not connected else "online")
    metrics = request.app[METRICS].as_json()
    return s.StateResponse(
        device_id=app.settings.device_id, status=status, pipeline_state=str(st.pipeline_state),
        active_persona_id=app.conversation.active_persona.id,
        active_session_id=app.conversation.active_session_id,
        last_activity=iso(st.last_activity) if st.last_activity else None,
        muted=st.muted, volume=round(st.volume, 3), speaking=app.speech.speaking,
        control_plane=s.ControlLink(
            configured=configured, connected=connected,
            since=iso(link.connected_since) if link and link.connected_since else None,
            retries=link.retries if link else None,
            outbox_depth=link.outbox_depth if link else None),
        metrics=s.StateMetrics(uptime_hours=round(st.uptime_s / 3600, 4),
                               interactions_today=await turns_today(app),
                               avg_response_latency_ms=metrics["inference"]["time_avg_ms"]))


@route("GET", "/v1/sessions/{id}", summary="A conversation's history", tag="sessions",
       response=s.SessionResponse)
async def get_session(request: web.Request) -> s.SessionResponse:
    app = app_of(request)
    session_id = request.match_info["id"]
    session = await timed(lambda: app.store.run(app.store.get_session, session_id))
    if session is None:
        raise ApiError(404, "NOT_FOUND", f"no conversation {session_id!r}",
                       {"conversation_id": session_id})
    return s.SessionResponse(
        id=session.id, persona_id=session.persona_id, created_at=iso(session.created_at),
        updated_at=iso(session.updated_at), summary=session.summary or None,
        origin=session.origin, active=session.id == app.conversation.active_session_id,
        messages=[s.SessionMessage(role=m.role, content=m.content, turn_id=m.turn_id,
                                   persona_id=m.persona_id, source=m.source,
                                   created_at=iso(m.created_at)) for m in session.messages])


@route("DELETE", "/v1/sessions/{id}", summary="Forget a conversation", tag="sessions",
       response=s.SessionDeleted)
async def delete_session(request: web.Request) -> s.SessionDeleted:
    """Deletes the messages and summary for real; the device starts a new conversation if it
    was the active one."""
    app = app_of(request)
    session_id = request.match_info["id"]
    deleted = await timed(lambda: app.store.run(app.store.delete_session, session_id))
    if not deleted:
        raise ApiError(404, "NOT_FOUND", f"no conversation {session_id!r}",
                       {"conversation_id": session_id})
    if app.conversation.active_session_id == session_id:
        await timed(app.conversation.end_active_session)
    return s.SessionDeleted(id=session_id, deleted=True)
