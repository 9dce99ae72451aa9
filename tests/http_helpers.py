"""Helpers shared by the HTTP API tests: an App (fakes unless told) behind aiohttp's test
client, and a Server-Sent Events parser."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from companion.api.http import make_http_app
from tests.conftest import fake_app, make_settings


async def start_api(aiohttp_client, tmp_path, *, start: bool = True, parts: dict | None = None,
                    **overrides):
    """(client, app): the App built from fakes (plus ``parts``), started unless told not to."""
    settings = make_settings(tmp_path, **overrides)
    app = fake_app(settings, **(parts or {}))
    if start:
        async with asyncio.timeout(10):
            await app.start()
    client = await aiohttp_client(make_http_app(app),
                                  server_kwargs={"handler_cancellation": True})
    return client, app


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """[(event, data as JSON)] of a whole SSE body."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((event, json.loads("\n".join(data))))
    return events


async def sse_events(response) -> AsyncIterator[tuple[str, Any]]:
    """Events as they arrive on an open streaming response."""
    event, data = "message", []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


@contextlib.asynccontextmanager
async def file_server(files: dict[str, bytes], *, chunk: int = 16384) -> AsyncIterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``files`` (path → body) in ``chunk``-byte pieces
    without a Content-Length; yields its base URL."""

    async def serve(request: web.Request) -> web.StreamResponse:
        if request.path not in files:
            raise web.HTTPNotFound()
        body = files[request.path]
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(0, len(body), chunk):
            await response.write(body[i:i + chunk])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
