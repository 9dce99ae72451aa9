"""The local HTTP API on port 3000 (SPEC §3), served inside the daemon's own event loop.

``serve_http(app)`` runs an aiohttp ``AppRunner``/``TCPSite`` until cancelled; it starts before
the models load, so /health answers at once and /v1 says 503 until ``app.ready``. Every route is
declared once, in ``ROUTES``, with its pydantic request/response models: the handlers validate
with them and ``/api-docs/openapi.json`` is generated from them.

Middleware, outermost first: request id + process time + JSON errors for everything (404, 405,
413, tracebacks) + HTTP metrics; per-IP rate limit (/v1); Bearer key (/v1, constant-time);
readiness gate (/v1).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psutil
import structlog
from aiohttp import web
from aiohttp_sse import sse_response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from companion.actions import ALL_ACTIONS, ActionError, Context, iso
from companion.actions.core import REPORTED_AS_FAILED
from companion.api import schemas as s
from companion.api.openapi import Route, add_commands, build_openapi
from companion.conversation import Reply, SessionNotFoundError
from companion.events import PipelineState
from companion.intents import parse as parse_intent
from companion.metrics import STAGES, Metrics
from companion.stages.sentences import SentenceSplitter
from companion.version import VERSION

if TYPE_CHECKING:
    from companion.app import App

log = structlog.get_logger(__name__)

APP: web.AppKey[Any] = web.AppKey("companion_app", object)
METRICS: web.AppKey[Metrics] = web.AppKey("companion_metrics", Metrics)
LIMITER: web.AppKey[RateLimiter] = web.AppKey("companion_rate_limiter", object)
OPENAPI: web.AppKey[dict] = web.AppKey("companion_openapi", dict)
PROCESS: web.AppKey[psutil.Process] = web.AppKey("companion_process", psutil.Process)
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
STARTED: web.RequestKey[float] = web.RequestKey("started", float)
EXTRA_HEADERS: web.RequestKey[dict] = web.RequestKey("extra_headers", dict)
SPEAKER: web.RequestKey[Any] = web.RequestKey("speaker", object)

REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
COMPONENTS = ("wake_word", "vad", "stt", "llm", "tts", "audio_in", "audio_out", "gpio",
              "control_plane", "storage")


class ApiError(Exception):
    """An error answer: status, code and message in the SPEC §3 shape."""

    def __init__(self, status: int, code: str, message: str,
                 details: dict[str, Any] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or {}
        self.headers = headers or {}


def validation_error(exc: ValidationError, prefix: str = "") -> ApiError:
    fields = [{"field": prefix + (".".join(str(p) for p in e["loc"]) or "(body)"),
               "error": e["msg"]} for e in exc.errors()]
    return ApiError(422, "VALIDATION_ERROR", "the request is not valid", {"fields": fields})


def error_response(request: web.Request, status: int, code: str, message: str,
                   details: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = s.ErrorResponse(error=s.ErrorBody(code=code, message=message, details=details or {},
                                             request_id=request.get(REQUEST_ID, "")))
    return web.json_response(body.model_dump(mode="json"), status=status, headers=headers)


# --- rate limiting -----------------------------------------------------------------------------------


class RateLimiter:
    """Fixed one-minute window per client IP: cheap, bounded in memory, easy to explain in a
    header (X-RateLimit-Reset = seconds until the window ends)."""

    def __init__(self, limit: int, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_clients: int = 4096) -> None:
        self.limit, self.window_s, self.clock, self.max_clients = limit, window_s, clock, max_clients
        self._windows: dict[str, tuple[float, int]] = {}

    def hit(self, client: str) -> tuple[bool, int, int]:
        """Count one request: (allowed, remaining, seconds until reset)."""
        now = self.clock()
        start, count = self._windows.get(client, (now, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        allowed = count < self.limit
        if allowed:
            count += 1
        if client not in self._windows and len(self._windows) >= self.max_clients:
            self._prune(now)
        self._windows[client] = (start, count)
        reset = max(1, math.ceil(start + self.window_s - now))
        return allowed, max(0, self.limit - count), reset

    def _prune(self, now: float) -> None:
        for key, (start, _) in list(self._windows.items()):
            if now - start >= self.window_s:
                del self._windows[key]
        while len(self._windows) >= self.max_clients:  # all live: forget the oldest
            del self._windows[min(self._windows, key=lambda k: self._windows[k][0])]


# --- middleware ----------------------------------------------------------------------------------------


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Request id, timing and metrics for every request; every failure as the JSON error."""
    given = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = given if REQUEST_ID_OK.match(given) else uuid.uuid4().hex
    request[STARTED] = time.perf_counter()
    metrics = request.app[METRICS]
    metrics.http_active.inc()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as exc:
        status = exc.status
        return error_response(request, exc.status, exc.code, exc.message, exc.details,
                              exc.headers)
    except web.HTTPException as exc:  # the router's 404/405, the body reader's 413
        status = exc.status
        return _from_http_exception(request, exc)
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    except Exception as exc:
        log.exception("request failed", path=request.path, request_id=request[REQUEST_ID])
        return error_response(request, 500, "INTERNAL_ERROR", "internal error",
                              {"type": type(exc).__name__})
    finally:
        metrics.http_active.dec()
        metrics.observe_http(request.method, _route_name(request), status,
                             time.perf_counter() - request[STARTED])


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    if exc.status == 404:
        return error_response(request, 404, "NOT_FOUND", f"no route {request.path}",
                              {"path": request.path}, headers)
    if exc.status == 405:
        allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
        return error_response(request, 405, "METHOD_NOT_ALLOWED",
                              f"{request.method} is not allowed on {request.path}",
                              {"allowed_methods": allowed}, headers)
    if exc.status == 413:
        return _too_large(request)
    code = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 429: "RATE_LIMITED",
            503: "SERVICE_UNAVAILABLE"}.get(exc.status, "BAD_REQUEST" if exc.status < 500
                                            else "INTERNAL_ERROR")
    return error_response(request, exc.status, code, exc.reason or code, {}, headers)


def _too_large(request: web.Request) -> web.Response:
    limit = request.app[APP].settings.api.max_body_bytes
    return error_response(request, 413, "PAYLOAD_TOO_LARGE",
                          f"the request body is larger than {limit} bytes",
                          {"max_body_bytes": limit})


@web.middleware
async def rate_limit_middleware(request: web.Request, handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)  # probes and metrics are never throttled
    allowed, remaining, reset = request.app[LIMITER].hit(request.remote or "unknown")
    headers = {"X-RateLimit-Limit": str(request.app[LIMITER].limit),
               "X-RateLimit-Remaining": str(remaining), "X-RateLimit-Reset": str(reset)}
    request[EXTRA_HEADERS] = headers
    if not allowed:
        raise ApiError(429, "RATE_LIMITED", "too many requests; slow down",
                       {"retry_after": reset, "limit": request.app[LIMITER].limit},
                       {**headers, "Retry-After": str(reset)})
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    keys = request.app[APP].settings.api.keys
    if not keys or not request.path.startswith("/v1/"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "UNAUTHORIZED", "missing Authorization: Bearer <api key>",
                       headers={"WWW-Authenticate": "Bearer"})
    given = token.strip().encode()
    ok = False
    for key in keys:  # every key is compared: the time does not say which one nearly matched
        ok |= hmac.compare_digest(given, key.encode())
    if not ok:
        raise ApiError(401, "UNAUTHORIZED", "invalid API key",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return await handler(request)


@web.middleware
async def ready_middleware(request: web.Request, handler) -> web.StreamResponse:
    app = request.app[APP]
    if request.path.startswith("/v1/") and not app.ready.is_set():
        if app.load_error:
            raise ApiError(503, "SERVICE_UNAVAILABLE", "a component failed to load",
                           {"status": "failed", "load_error": app.load_error},
                           {"Retry-After": "30"})
        raise ApiError(503, "SERVICE_UNAVAILABLE", "the models are still loading",
                       {"status": "loading"}, {"Retry-After": "2"})
    return await handler(request)


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response carries, streams included (they are sent at prepare)."""
    response.headers["X-Request-Id"] = request.get(REQUEST_ID) or uuid.uuid4().hex
    started = request.get(STARTED)
    if started is not None:
        response.headers["X-Process-Time"] = f"{time.perf_counter() - started:.6f}"
    for key, value in request.get(EXTRA_HEADERS, {}).items():
        response.headers.setdefault(key, value)


# --- the route table ---------------------------------------------------------------------------------

ROUTES: list[Route] = []


def route(method: str, path: str, *, summary: str, tag: str, body: type[BaseModel] | None = None,
          response: type[BaseModel] | None = None, media_type: str = "application/json",
          errors: tuple[int, ...] = (), description: str = "", response_description: str = "",
          events: tuple[tuple[str, type[BaseModel]], ...] = ()):
    def register(fn: Callable[..., Awaitable[Any]]):
        params = tuple(re.findall(r"{(\w+)}", path))
        ROUTES.append(Route(method, path, fn, summary, tag, body, response, media_type, errors,
                            description or (fn.__doc__ or "").strip(), response_description,
                            params, events))
        return fn
    return register


def _bind(r: Route):
    async def handler(request: web.Request) -> web.StreamResponse:
        args: list[Any] = [request]
        if r.body is not None:
            args.append(await read_body(request, r.body))
        result = await r.handler(*args)
        if isinstance(result, BaseModel):
            return web.json_response(result.model_dump(mode="json"))
        return result
    handler.__name__ = r.handler.__name__
    return handler


async def read_body(request: web.Request, model: type[BaseModel]) -> Any:
    limit = request.app[APP].settings.api.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "PAYLOAD_TOO_LARGE", f"the request body is larger than {limit} bytes",
                       {"max_body_bytes": limit})
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(413, "PAYLOAD_TOO_LARGE", f"the request body is larger than {limit} bytes",
                       {"max_body_bytes": limit}) from exc
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "BAD_REQUEST", "the body is not valid JSON",
                       {"reason": str(exc)[:200]}) from exc
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def _app(request: web.Request) -> App:
    return request.app[APP]


async def _timed(coro_fn: Callable[[], Awaitable[Any]], seconds: float = 10.0) -> Any:
    async with asyncio.timeout(seconds):
        return await coro_fn()


# --- health and readiness ------------------------------------------------------------------------------


@route("GET", "/health", summary="Liveness", tag="health", response=s.HealthResponse)
async def health(request: web.Request) -> s.HealthResponse:
    """Answers while the models load: the process and its event loop are alive."""
    return s.HealthResponse()


@route("GET", "/ready", summary="Readiness of the inference stack", tag="health",
       response=s.ReadyResponse, errors=(503,))
async def ready(request: web.Request) -> s.ReadyResponse:
    """503 while the models load or when one failed (details say which)."""
    app = _app(request)
    if app.load_error:
        raise ApiError(503, "SERVICE_UNAVAILABLE", "a component failed to load",
                       {"status": "failed", "load_error": app.load_error}, {"Retry-After": "30"})
    if not app.ready.is_set():
        raise ApiError(503, "SERVICE_UNAVAILABLE", "the models are still loading",
                       {"status": "loading"}, {"Retry-After": "2"})
    llm = app.status.components.get("llm", {})
    return s.ReadyResponse(inference=s.InferenceHealth(
        healthy=bool(llm.get("healthy")), model=getattr(app.llm, "model_name", None),
        latency_ms=_last_inference_ms(request)))


def _last_inference_ms(request: web.Request) -> float | None:
    """The last real inference (HTTP or voice), never the model's load time."""
    last = request.app[METRICS].last_inference_ms
    return round(last, 1) if last is not None else None


async def _storage_health(app: App) -> s.ComponentHealth:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(5):
            await app.store.run(app.store.query, "SELECT 1")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return s.ComponentHealth(healthy=False, enabled=True, detail=str(exc))
    took = (time.perf_counter() - started) * 1000
    return s.ComponentHealth(healthy=True, enabled=True, detail=str(app.store.path),
                             latency_ms=round(took, 2))


def _control_health(app: App) -> s.ComponentHealth:
    if not app.settings.control_plane.enabled:
        return s.ComponentHealth(healthy=True, enabled=False, detail="no control plane configured")
    if app.control is None:
        return s.ComponentHealth(healthy=False, enabled=True, detail="not started")
    link = app.control.status
    detail = "connected" if link.connected else (
        f"disconnected (retries {link.retries}, outbox {link.outbox_depth})")
    return s.ComponentHealth(healthy=link.connected, enabled=True, detail=detail,
                             latency_ms=link.latency_ms)


def _absent_reason(app: App, name: str) -> str:
    st = app.settings
    if not app.ready.is_set() and not app.load_error:
        return "loading"
    if name == "wake_word" and not st.wake.enabled:
        return "wake word disabled in settings"
    if name == "gpio" and not (st.gpio.enabled and app.features.gpio):
        return "GPIO disabled"
    if name in ("wake_word", "vad", "stt", "audio_in"):
        return "voice loop off (no microphone)"
    if name == "audio_out":
        return "no audio output"
    return "not in use"


def percentiles(values: list[float]) -> s.Percentiles:
    if not values:
        return s.Percentiles(count=0, p50=None, p90=None, p99=None)
    ordered = sorted(values)

    def rank(q: float) -> float:  # nearest rank
        return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 2)

    return s.Percentiles(count=len(ordered), p50=rank(0.5), p90=rank(0.9), p99=rank(0.99))


@route("GET", "/ready/all", summary="Every component's health and recent turn latencies",
       tag="health", response=s.ReadyAllResponse)
async def ready_all(request: web.Request) -> s.ReadyAllResponse:
    app = _app(request)
    components: dict[str, s.ComponentHealth] = {}
    for name in COMPONENTS:
        if name == "storage":
            components[name] = await _storage_health(app)
        elif name == "control_plane":
            components[name] = _control_health(app)
        elif name in app.status.components:
            c = app.status.components[name]
            components[name] = s.ComponentHealth(healthy=bool(c["healthy"]), enabled=True,
                                                 detail=str(c.get("detail") or ""),
                                                 latency_ms=c.get("latency_ms"))
        else:
            components[name] = s.ComponentHealth(healthy=True, enabled=False,
                                                 detail=_absent_reason(app, name))
    turns = list(app.status.recent_turns)
    latency = {stage.removesuffix("_s"): percentiles(
        [v * 1000 for t in turns if (v := getattr(t, stage, None)) is not None])
        for stage in STAGES}
    if app.load_error:
        status = "failed"
    elif not app.ready.is_set():
        status = "loading"
    elif any(c.enabled and not c.healthy for c in components.values()):
        status = "degraded"
    else:
        status = "ready"
    return s.ReadyAllResponse(status=status, components=components, latency_ms=latency,
                              load_error=app.load_error)


# --- chat ------------------------------------------------------------------------------------------------


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
    session = await _timed(lambda: app.store.run(app.store.get_session, session_id,
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
    app = _app(request)
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
       response=s.ChatResponse, errors=(404, 502, 504))
async def chat(request: web.Request, body: s.ChatRequest) -> s.ChatResponse:
    """The same LLM, persona and conversation store as voice turns: without conversation_id
    the device's active conversation continues (voice can pick it up), with one that
    conversation does."""
    app = _app(request)
    _check_model(app, body.model)
    await _require_session(app, body.conversation_id)
    reply = Reply("", "", "", body.message)

    async def nothing(delta: str) -> None:
        return None

    await _generate(request, body, reply, nothing)
    return s.ChatResponse(
        id=reply.turn_id, conversation_id=reply.session_id, content=reply.text,
        persona_id=reply.persona_id, model=getattr(app.llm, "model_name", "unknown"),
        tokens=_tokens(reply), latency_ms=round(reply.latency_ms, 1),
        created_at=iso(reply.started_at), spoken=request.get(SPEAKER) is not None)


@route("POST", "/v1/chat/stream", summary="One chat turn as Server-Sent Events", tag="chat",
       body=s.ChatRequest, media_type="text/event-stream", errors=(404,),
       events=(("message", s.StreamDelta), ("done", s.StreamDone), ("error", s.ErrorResponse)),
       response_description="`event: message` with `data: {\"delta\": ...}` per piece of the "
       "reply, then `event: done` with `data:` a StreamDone object (or `event: error` with an "
       "ErrorResponse object).")
async def chat_stream(request: web.Request, body: s.ChatRequest) -> web.StreamResponse:
    """Deltas as the LLM produces them. A client that disconnects cancels the generation."""
    app = _app(request)
    _check_model(app, body.model)
    await _require_session(app, body.conversation_id)
    reply = Reply("", "", "", body.message)
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


# --- commands ------------------------------------------------------------------------------------------


@route("POST", "/v1/commands", summary="Run a device command", tag="commands",
       body=s.CommandRequest, response=s.CommandResponse, errors=(403, 404))
async def run_command(request: web.Request, body: s.CommandRequest) -> s.CommandResponse:
    """An unknown command is a 404 whose details list the known ones; a persona may forbid
    some (403); one the device could not do (no microphone, no speaker) is ``failed``."""
    app = _app(request)
    try:
        async with asyncio.timeout(330):
            outcome = await app.actions.run(body.command, body.args, context=Context("api"))
    except ActionError as exc:
        if exc.code not in REPORTED_AS_FAILED:
            raise ApiError(exc.status, exc.code, exc.message, exc.details) from exc
        return s.CommandResponse(command=body.command, status="failed",
                                 result={"error": exc.message, "code": exc.code, **exc.details},
                                 executed_at=iso(time.time()))
    if outcome.after is not None:
        app.actions.spawn(outcome.after(), f"{body.command}-after")
    return s.CommandResponse(command=body.command, status="completed", result=outcome.result,
                             executed_at=outcome.executed_at)


@route("POST", "/v1/commands/parse", summary="Plain language to a command, without running it",
       tag="commands", body=s.ParseRequest, response=s.ParseResponse)
async def parse_command(request: web.Request, body: s.ParseRequest) -> s.ParseResponse:
    """The parser the voice pipeline uses before the LLM."""
    intent = parse_intent(body.input, _app(request).personas)
    command = (s.ParsedCommand(command=intent.command, args=intent.args)
               if intent.command is not None else None)
    return s.ParseResponse(input=body.input, parsed=intent.parsed, command=command,
                           confidence=intent.confidence,
                           requires_approval=intent.needs_approval)


# --- system ----------------------------------------------------------------------------------------------


def _midnight() -> float:
    now = datetime.now().astimezone()
    return now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


async def _turns_today(app: App) -> int:
    return await _timed(lambda: app.store.run(app.store.count_turns_since, _midnight()))


@route("GET", "/v1/system/status", summary="Version, uptime, resources, statistics", tag="system",
       response=s.SystemStatusResponse)
async def system_status(request: web.Request) -> s.SystemStatusResponse:
    app = _app(request)
    process = request.app[PROCESS]
    db_bytes = await _timed(lambda: app.store.run(lambda: app.store.size_bytes))
    metrics = request.app[METRICS]
    counts = metrics.as_json()
    return s.SystemStatusResponse(
        version=VERSION, device_id=app.settings.device_id,
        uptime_seconds=round(app.status.uptime_s, 1),
        resources=s.Resources(memory_used_mb=round(process.memory_info().rss / 2**20, 1),
                              cpu_percent=process.cpu_percent(interval=None),
                              database_size_mb=round(db_bytes / 2**20, 3)),
        statistics=s.Statistics(
            requests_total=counts["http"]["requests_total"],
            inference_requests=counts["inference"]["requests"],
            inference_failures=counts["inference"]["failures"],
            turns_today=await _turns_today(app),
            voice_turns=int(metrics.total("companion_voice_turns_total", outcome="completed")),
            active_timers=len(app.timers), events_dropped=app.bus.dropped))


def _model_infos(app: App) -> list[s.ModelInfo]:
    st = app.settings
    loaded_llm = getattr(getattr(app, "llm", None), "model_name", None)
    voices = {st.tts.voice, *(p.voice_config.voice for p in app.personas.all())}
    out = []
    for entry in app.registry.entries:
        names = {entry.name, *entry.aliases}
        try:
            resolved = app.registry.resolve(entry.name)
            size: int | None = resolved.file.stat().st_size
            installed = True
        except Exception:
            size, installed = None, False
        active = {
            "llm": entry.name == loaded_llm or st.llm.model in names,
            "stt": st.stt.model in names and "stt" in app.status.components,
            "tts": bool(voices & names),
            "wake": bool(set(st.wake.models) & names) and "wake_word" in app.status.components,
        }[entry.kind]
        out.append(s.ModelInfo(id=entry.name, name=entry.display_name, kind=entry.kind,
                               parameters=entry.parameters, size_bytes=size,
                               context_length=(getattr(app.llm, "context_length", None)
                                               if active and entry.kind == "llm"
                                               else entry.context_length),
                               default=entry.default, installed=installed, active=active))
    return out


@route("GET", "/v1/system/models", summary="Installed STT, LLM, TTS and wake word models",
       tag="system", response=s.ModelsResponse)
async def system_models(request: web.Request) -> s.ModelsResponse:
    app = _app(request)
    infos = await _timed(lambda: asyncio.to_thread(_model_infos, app))
    return s.ModelsResponse(models=infos)


# --- personas --------------------------------------------------------------------------------------------


def _summary(app: App, persona) -> dict[str, Any]:
    return {**persona.summary(), "active": persona.id == app.conversation.active_persona_id}


@route("GET", "/v1/personas", summary="The persona library", tag="personas",
       response=s.PersonaListResponse)
async def list_personas(request: web.Request) -> s.PersonaListResponse:
    app = _app(request)
    return s.PersonaListResponse(
        personas=[s.PersonaSummary(**_summary(app, p)) for p in app.personas.all()],
        active_persona_id=app.conversation.active_persona.id)


@route("GET", "/v1/personas/{id}", summary="One persona in detail", tag="personas",
       response=s.PersonaDetail)
async def get_persona(request: web.Request) -> s.PersonaDetail:
    app = _app(request)
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
    app = _app(request)
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
    app = _app(request)
    errors = await _timed(lambda: asyncio.to_thread(app.reload_personas), 30)
    return s.ReloadResponse(personas=app.personas.ids(), errors=errors)


# --- state and sessions --------------------------------------------------------------------------------


@route("GET", "/v1/state", summary="Device state", tag="state", response=s.StateResponse)
async def state(request: web.Request) -> s.StateResponse:
    """status: busy while listening, thinking or speaking; offline when a configured control
    plane is not connected; online otherwise."""
    app = _app(request)
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
                               interactions_today=await _turns_today(app),
                               avg_response_latency_ms=metrics["inference"]["time_avg_ms"]))


@route("GET", "/v1/sessions/{id}", summary="A conversation's history", tag="sessions",
       response=s.SessionResponse)
async def get_session(request: web.Request) -> s.SessionResponse:
    app = _app(request)
    session_id = request.match_info["id"]
    session = await _timed(lambda: app.store.run(app.store.get_session, session_id))
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
    app = _app(request)
    session_id = request.match_info["id"]
    deleted = await _timed(lambda: app.store.run(app.store.delete_session, session_id))
    if not deleted:
        raise ApiError(404, "NOT_FOUND", f"no conversation {session_id!r}",
                       {"conversation_id": session_id})
    if app.conversation.active_session_id == session_id:
        await _timed(app.conversation.end_active_session)
    return s.SessionDeleted(id=session_id, deleted=True)


# --- metrics and docs --------------------------------------------------------------------------------


@route("GET", "/metrics", summary="Counters as JSON", tag="metrics", response=s.MetricsResponse)
async def metrics_json(request: web.Request) -> s.MetricsResponse:
    return s.MetricsResponse.model_validate(request.app[METRICS].as_json())


@route("GET", "/metrics/prometheus", summary="The same in Prometheus text format", tag="metrics",
       media_type="text/plain")
async def metrics_prometheus(request: web.Request) -> web.Response:
    response = web.Response(body=request.app[METRICS].prometheus_text())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


@route("GET", "/api-docs/openapi.json", summary="This document", tag="docs")
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


def openapi_document() -> dict[str, Any]:
    doc = build_openapi(ROUTES, title="companion local API", version=VERSION,
                        description="The device's local HTTP API (SPEC §3). Errors: "
                                    "{\"error\": {code, message, details, request_id}}.")
    return add_commands(doc, sorted((a for a in ALL_ACTIONS if "api" in a.channels),
                                    key=lambda a: a.name))


# --- the application -------------------------------------------------------------------------------------


def make_http_app(app: App) -> web.Application:
    """The aiohttp application over a (possibly still loading) App."""
    api = app.settings.api
    web_app = web.Application(
        middlewares=[errors_middleware, rate_limit_middleware, auth_middleware, ready_middleware],
        client_max_size=api.max_body_bytes,
    )
    web_app[APP] = app
    web_app[METRICS] = app.metrics
    web_app[LIMITER] = RateLimiter(api.rate_limit_per_minute)
    web_app[OPENAPI] = openapi_document()
    process = psutil.Process()
    process.cpu_percent(interval=None)  # start the CPU measurement window
    web_app[PROCESS] = process
    for r in ROUTES:
        web_app.router.add_route(r.method, r.path, _bind(r), name=r.operation_id)
    web_app.on_response_prepare.append(_on_prepare)
    web_app.on_cleanup.append(_cleanup)
    return web_app


async def _cleanup(web_app: web.Application) -> None:
    await web_app[APP].timers.aclose()
    await web_app[APP].actions.aclose()


async def serve_http(app: App) -> None:
    """Serve until cancelled, then close the listener and open connections (2 s grace)."""
    api = app.settings.api
    if api.unprotected:
        raise RuntimeError(f"{api.unprotected}: refusing to serve the API unauthenticated")
    runner = web.AppRunner(make_http_app(app), handler_cancellation=True, access_log=None,
                           shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, api.host, api.port)
        await site.start()
        app.http_addresses = list(runner.addresses)
        log.info("http api listening", host=api.host, port=api.port,
                 addresses=[str(a) for a in runner.addresses], auth=bool(api.keys))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
