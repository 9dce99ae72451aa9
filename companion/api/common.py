"""What every route module shares: the aiohttp keys, the error type and its JSON shape, the
route table (``ROUTES``, from which the router and the OpenAPI document are built), body reading
and small helpers."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psutil
from aiohttp import web
from pydantic import BaseModel, ValidationError

from companion.api import schemas as s
from companion.api.openapi import Route
from companion.metrics import Metrics

if TYPE_CHECKING:
    from companion.api.ratelimit import ChatSlots, RateLimiter
    from companion.app import App

APP: web.AppKey[Any] = web.AppKey("companion_app", object)
METRICS: web.AppKey[Metrics] = web.AppKey("companion_metrics", Metrics)
LIMITER: web.AppKey[RateLimiter] = web.AppKey("companion_rate_limiter", object)
CHAT_SLOTS: web.AppKey[ChatSlots] = web.AppKey("companion_chat_slots", object)
OPENAPI: web.AppKey[dict] = web.AppKey("companion_openapi", dict)
PROCESS: web.AppKey[psutil.Process] = web.AppKey("companion_process", psutil.Process)
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
STARTED: web.RequestKey[float] = web.RequestKey("started", float)
EXTRA_HEADERS: web.RequestKey[dict] = web.RequestKey("extra_headers", dict)
SPEAKER: web.RequestKey[Any] = web.RequestKey("speaker", object)

REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


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


def bind(r: Route):
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


def app_of(request: web.Request) -> App:
    return request.app[APP]


async def timed(coro_fn: Callable[[], Awaitable[Any]], seconds: float = 10.0) -> Any:
    async with asyncio.timeout(seconds):
        return await coro_fn()


def _midnight() -> float:
    now = datetime.now().astimezone()
    return now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


async def turns_today(app: App) -> int:
    return await timed(lambda: app.store.run(app.store.count_turns_since, _midnight()))
