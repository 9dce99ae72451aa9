"""The local HTTP API on port 3000 (SPEC §3), served inside the daemon's own event loop.

``serve_http(app)`` runs an aiohttp ``AppRunner``/``TCPSite`` until cancelled; it starts before
the models load, so /health answers at once and /v1 says 503 until ``app.ready``. Every route is
declared once, in ``ROUTES`` (``api.common``), with its pydantic request/response models: the
handlers validate with them and ``/api-docs/openapi.json`` is generated from them.

Where things are: ``middleware`` (errors, auth, readiness), ``ratelimit``, ``routes/*`` (one
module per domain), ``schemas`` (bodies), ``openapi`` (the document).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import psutil
import structlog
from aiohttp import web

from companion.actions import ALL_ACTIONS
from companion.api import routes
from companion.api.common import APP, CHAT_SLOTS, LIMITER, METRICS, OPENAPI, PROCESS, bind
from companion.api.middleware import auth_middleware, errors_middleware, on_prepare, ready_middleware
from companion.api.openapi import add_commands, build_openapi
from companion.api.ratelimit import ChatSlots, RateLimiter, rate_limit_middleware
from companion.version import VERSION

if TYPE_CHECKING:
    from companion.app import App

log = structlog.get_logger(__name__)

ROUTES = routes.ordered()

__all__ = ["ROUTES", "RateLimiter", "make_http_app", "openapi_document", "serve_http"]


def openapi_document() -> dict[str, Any]:
    doc = build_openapi(ROUTES, title="companion local API", version=VERSION,
                        description="The device's local HTTP API (SPEC §3). Errors: "
                                    "{\"error\": {code, message, details, request_id}}.")
    return add_commands(doc, sorted((a for a in ALL_ACTIONS if "api" in a.channels),
                                    key=lambda a: a.name))


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
    web_app[CHAT_SLOTS] = ChatSlots(api.max_concurrent_chats)
    web_app[OPENAPI] = openapi_document()
    process = psutil.Process()
    process.cpu_percent(interval=None)  # start the CPU measurement window
    web_app[PROCESS] = process
    for r in ROUTES:
        web_app.router.add_route(r.method, r.path, bind(r), name=r.operation_id)
    web_app.on_response_prepare.append(on_prepare)
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
        app.http_listening.set()
        log.info("http api listening", host=api.host, port=api.port,
                 addresses=[str(a) for a in runner.addresses], auth=bool(api.keys))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
