"""Overload: chats past `api.max_concurrent_chats` are refused at once with 503 BUSY and a
Retry-After instead of queueing until the turn timeout. (The real-daemon version, 50 chats and
1,000 `/v1/state` with a voice turn during the burst, is on branch s6-ops-unverified: it could not
be seen green on the loaded shared machine.)"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.fakes import FakeChatModel
from tests.http_helpers import start_api


async def test_chats_past_the_cap_are_refused_at_once_with_retry_after(aiohttp_client, tmp_path):
    """The cap itself, in-process (fake model, one delta every 0.1 s): the extra chats hear 503
    BUSY at once, plain and streamed, and the admitted ones are answered."""
    client, _ = await start_api(aiohttp_client, tmp_path, api={"max_concurrent_chats": 2},
                                parts={"llm": FakeChatModel(delay_s=0.1)})

    async def chat(path: str) -> tuple[int, str | None, dict | None]:
        response = await client.post(path, json={"message": "hello"})
        body = await response.json() if response.status == 503 else None
        await response.read()
        return response.status, response.headers.get("Retry-After"), body

    async with asyncio.timeout(30):
        results = await asyncio.gather(*(chat("/v1/chat" if n % 2 else "/v1/chat/stream")
                                         for n in range(6)))
    assert sorted(status for status, _, _ in results) == [200, 200, 503, 503, 503, 503]
    for status, after, body in results:
        if status == 503:
            assert int(after) >= 1 and body["error"]["code"] == "BUSY"
            assert body["error"]["details"]["limit"] == 2
    assert (await client.post("/v1/chat", json={"message": "again"})).status == 200




async def _burst(base: str) -> tuple[list[tuple[int, str | None]], list[tuple[int, str | None]]]:
    timeout = aiohttp.ClientTimeout(total=330)  # the daemon's turn timeout is 300 s
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def one(method: str, path: str, body: dict | None = None) -> tuple[int, str | None]:
            async with session.request(method, base + path, json=body) as response:
                await response.read()
                return response.status, response.headers.get("Retry-After")

        chats = [asyncio.create_task(one("POST", "/v1/chat", {"message": f"Say a word, {n}."}))
                 for n in range(50)]
        await asyncio.sleep(0.2)
        states = await asyncio.gather(*(one("GET", "/v1/state") for _ in range(1000)))
        return list(await asyncio.gather(*chats)), list(states)
