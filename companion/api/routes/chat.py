"""/v1/chat and /v1/chat/stream: the same LLM, persona and conversation store as voice turns."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from aiohttp_sse import sse_response

from companion.actions import iso
from companion.api import schemas as s
from companion.api.common import (
    CHAT_SLOTS,
    METRICS,
    REQUEST_ID,
    SPEAKER,
    ApiError,
    app_of,
    route,
    timed,
)
from companion.conversation import Reply, SessionNotFoundError
from companion.stages.sentences import SentenceSplitter
from companion.store import StorageError

if TYPE_CHECKING:
    from companion.app import App

log = structlog.get_logger(__name__)


def _check_model(app: App, model: str | None) -> None:
    if model is None:
        return
    loaded = getattr(app.llm, "model_name", "")
    names = {loaded, app.settings.llm.model}
    with contextlib.suppress(Exception):
        entry = app.registry.entry(loaded)
        names |= {entry.name, *entry.aliases}
    if model not in names:
        raise ApiError(422, "VALIDATION_ERROR", "the request is not valid", {"fields": [
            {"field": "model", "error": f"model {model!r} is not loaded; the loaded LLM is "
                                       f"{loaded!r}"}]})


async def _require_session(app: App, session_id: str | None) -> None:
    if session_id is None:
        return
    session = await timed(lambda: app.store.run(app.store.get_session, session_id,
                                                 with_messages=False))
    if session is None:
        raise ApiError(404, "NOT_FOUND", f"no conversation {session_id!r}",
                       {"conversation_id": session_id})


class SpeakAlong:
    """Says a reply sentence by sentence while it is generated (like a voice turn), in the voice
    of the persona that answers. Speech outlives the request; a client that goes away mid-reply
    stops it."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.splitter = SentenceSplitter()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.task: asyncio.Task[Any] | None = None

    def feed(self, delta: str, persona_id: str) -> None:
        if self.task is None:
            persona = self.app.personas.get(persona_id) or self.app.conversation.active_persona
            self.task = self.app.actions.spawn(
                self.app.speech.speak(self._sentences(), persona.voice_config.params()),
                "chat-speech")
        for sentence in self.splitter.feed(delta):
            self.queue.put_nowait(sentence)

    def finish(self) -> None:
        for sentence in self.splitter.flush():
            self.queue.put_nowait(sentence)
        self.queue.put_nowait(None)

    def abort(self) -> None:
        self.queue.put_nowait(None)
        if self.task is not None:
            self.task.cancel()

    async def _sentences(self):
        while (sentence := await self.queue.get()) is not None:
            yield sentence


def _tokens(reply: Reply) -> s.TokenCounts:
    st = reply.stats
    return s.TokenCounts(prompt=st.prompt_tokens, completion=st.completion_tokens,
                         total=st.prompt_tokens + st.completion_tokens)


async def _generate(request: web.Request, body: s.ChatRequest, reply: Reply,
                    on_delta: Callable[[str], Awaitable[None]]) -> None:
    """Run one chat turn, handing each delta to ``on_delta``; records metrics; maps failures to
    ApiError. Cancellation (client gone) closes the LLM stream and is re-raised."""
    app = app_of(request)
    metrics = request.app[METRICS]
    speaker = SpeakAlong(app) if body.speak and app.sink is not None else None
    request[SPEAKER] = speaker
    app.status.last_activity = time.time()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(app.settings.pipeline.turn_timeout_s):
            stream = app.conversation.respond(
                body.message, reply=reply, session_id=body.conversation_id, source="http",
                new_session=body.new_conversation and body.conversation_id is None,
                system_prompt=body.system_prompt, temperature=body.temperature,
                max_tokens=body.max_tokens)
            async with contextlib.aclosing(stream) as deltas:
                try:
                    async for delta in deltas:
                        if speaker is not None:
                            speaker.feed(delta, reply.persona_id)
                        await on_delta(delta)
                except BaseException:  # whatever ends the turn early stops its speech too
                    if speaker is not None:
                        speaker.abort()
                    raise
    except asyncio.CancelledError:
        raise
    except SessionNotFoundError as exc:
        raise ApiError(404, "NOT_FOUND", str(exc), {"conversation_id": body.conversation_id}) from exc
    except TimeoutError as exc:  # before OSError: TimeoutError is one
        metrics.observe_inference("http", time.perf_counter() - started, failed=True)
        log.warning("chat timed out", timeout_s=app.settings.pipeline.turn_timeout_s)
        raise ApiError(504, "UPSTREAM_TIMEOUT", "the model did not finish in time",
                       {"timeout_s": app.settings.pipeline.turn_timeout_s}) from exc
    except StorageError as exc:  # the reply was made but could not be kept: say so, not 502
        raise ApiError(503, "SERVICE_UNAVAILABLE", f"{exc}; try again once it is fixed",
                       {"storage": app.store.problem}, headers={"Retry-After": "5"}) from exc
    except (ConnectionError, OSError):
        raise  # the client went away (its socket), not the model
    except Exception as exc:
        metrics.observe_inference("http", time.perf_counter() - started, failed=True)
        log.exception("chat failed")
        raise ApiError(502, "UPSTREAM_ERROR", "the model failed to answer") from exc
    if speaker is not None:
        speaker.finish()
    metrics.observe_inference("http", time.perf_counter() - started,
                              prompt_tokens=reply.stats.prompt_tokens,
                              completion_tokens=reply.stats.completion_tokens)


@route("POST", "/v1/chat", summary="One chat turn", tag="chat", body=s.ChatRequest,
       response=s.ChatResponse, errors=(404, 502, 503, 504))
async def chat(request: web.Request, body: s.ChatRequest) -> s.ChatResponse:
    """The same LLM, persona and conversation store as voice turns: without conversation_id
    the device's active conversation continues (voice can pick it up), with one that
    conversation does."""
    app = app_of(request)
    _check_model(app, body.model)
    await _require_session(app, body.conversation_id)
    reply = Reply("", "", "", body.message)

    async def nothing(delta: str) -> None:
        return None

    with request.app[CHAT_SLOTS].take():
        await _generate(request, body, reply, nothing)
    return s.ChatResponse(
        id=reply.turn_id, conversation_id=reply.session_id, content=reply.text,
        persona_id=reply.persona_id, model=getattr(app.llm, "model_name", "unknown"),
        tokens=_tokens(reply), latency_ms=round(reply.latency_ms, 1),
        created_at=iso(reply.started_at), spoken=request.get(SPEAKER) is not None)


@route("POST", "/v1/chat/stream", summary="One chat turn as Server-Sent Events", tag="chat",
       body=s.ChatRequest, media_type="text/event-stream", errors=(404, 503),
       events=(("message", s.StreamDelta), ("done", s.StreamDone), ("error", s.ErrorResponse)),
       response_description="`event: message` with `data: {\"delta\": ...}` per piece of the "
       "reply, then `event: done` with `data:` a StreamDone object (or `event: error` with an "
       "ErrorResponse object).")
async def chat_stream(request: web.Request, body: s.ChatRequest) -> web.StreamResponse:
    """Deltas as the LLM produces them. A client that disconnects cancels the generation."""
    app = app_of(request)
    _check_model(app, body.model)
    await _require_session(app, body.conversation_id)
    reply = Reply("", "", "", body.message)
    with request.app[CHAT_SLOTS].take():  # 503 before the stream starts
        async with sse_response(request, allow_all_methods=True, ping_interval=10,
                                headers={"Cache-Control": "no-cache",
                                         "X-Accel-Buffering": "no"}) as sse:
            async def send(delta: str) -> None:
                await sse.send(s.StreamDelta(delta=delta).model_dump_json(), event="message")

            try:
                await _generate(request, body, reply, send)
            except ApiError as exc:
                error = s.ErrorResponse(error=s.ErrorBody(
                    code=exc.code, message=exc.message, details=exc.details,
                    request_id=request[REQUEST_ID]))
                with contextlib.suppress(ConnectionError, OSError):
                    await sse.send(error.model_dump_json(), event="error")
                return sse
            except (ConnectionError, OSError):
                log.info("chat stream client went away", request_id=request[REQUEST_ID])
                return sse
            done = s.StreamDone(id=reply.turn_id, tokens=_tokens(reply),
                                conversation_id=reply.session_id, persona_id=reply.persona_id,
                                model=getattr(app.llm, "model_name", "unknown"),
                                latency_ms=round(reply.latency_ms, 1),
                                spoken=request.get(SPEAKER) is not None)
            with contextlib.suppress(ConnectionError, OSError):
                await sse.send(done.model_dump_json(), event="done")
    return sse
