"""Ids from the network that look like paths stay ids: a dictionary key or an SQL parameter,
never a file to open (issue 12: nothing reaches a path outside the data and persona dirs)."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import quote

from tests.http_helpers import start_api

TRAVERSALS = ["../../../../etc/passwd", "..", "companion/../companion", "/etc/hostname",
              "~root", "companion.toml", "%2e%2e%2f", "companion\x00.toml"]


async def test_path_like_ids_are_unknown_ids(aiohttp_client, tmp_path):
    client, app = await start_api(aiohttp_client, tmp_path)
    before = app.conversation.active_persona_id
    async with contextlib.aclosing(app), asyncio.timeout(10):
        for bad in TRAVERSALS:
            for path in (f"/v1/personas/{quote(bad, safe='')}", f"/v1/sessions/{quote(bad, safe='')}"):
                response = await client.get(path)
                assert response.status == 404, path
                assert (await response.json())["error"]["code"] == "NOT_FOUND"
            response = await client.post("/v1/personas/switch", json={"target_persona_id": bad})
            assert response.status in (404, 422)
            assert (await client.delete(f"/v1/sessions/{quote(bad, safe='')}")).status == 404
    assert app.conversation.active_persona_id == before
