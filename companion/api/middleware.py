"""Middleware, outermost first: request id + process time + JSON errors for everything (404,
405, 413, tracebacks) + HTTP metrics; per-IP rate limit (/v1, in ``ratelimit``); Bearer key
(constant-time; /v1 and, outside it, the detail that ``openapi.needs_key`` names: /ready/all,
/metrics, /api-docs; /health and /ready stay open); readiness gate (/v1). ``on_prepare`` sets
the headers every response carries, streams included."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid

import structlog
from aiohttp import web

from companion.api.common import (
    APP,
    EXTRA_HEADERS,
    METRICS,
    REQUEST_ID,
    REQUEST_ID_OK,
    STARTED,
    ApiError,
    error_response,
)
from companion.api.openapi import needs_key

log = structlog.get_logger(__name__)


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
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    keys = request.app[APP].settings.api.keys
    if not keys or not needs_key(request.path):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "UNAUTHORIZED", "missing Authorization: Bearer <api key>",
                       headers={"WWW-Authenticate": "Bearer"})
    given = token.strip().encode("utf-8", "surrogateescape")  # a Latin-1 byte is a wrong key, not a 500
    ok = False
    for key in keys:  # every key is compared: the time does not say which one nearly matched
        ok |= hmac.compare_digest(given, key.get_secret_value().encode())
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


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response carries, streams included (they are sent at prepare)."""
    response.headers["X-Request-Id"] = request.get(REQUEST_ID) or uuid.uuid4().hex
    started = request.get(STARTED)
    if started is not None:
        response.headers["X-Process-Time"] = f"{time.perf_counter() - started:.6f}"
    for key, value in request.get(EXTRA_HEADERS, {}).items():
        response.headers.setdefault(key, value)
