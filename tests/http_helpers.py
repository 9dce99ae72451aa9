"""Helpers shared by the HTTP API tests: an App (fakes unless told) behind aiohttp's test
client, and a Server-Sent Events parser."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

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


async def wait_for(predicate, within_s: float = 2.0) -> None:
    """Poll a condition that no event announces (a fake's counter), bounded in time."""
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
