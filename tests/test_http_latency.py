"""The event loop stays responsive: /health answers about as fast while a chat streams as when
idle. Measured as a ratio of medians in one test (no absolute timing), with fakes and with the
real LLM (`models`)."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from tests.fakes import FakeChatModel
from tests.http_helpers import sse_events, start_api

SAMPLES = 40


async def health_latencies(client, n: int = SAMPLES) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        r = await client.get("/health")
        await r.read()
        out.append(time.perf_counter() - started)
    return out


async def measure(client, body: dict) -> tuple[float, float, int]:
    """(idle median, median while streaming, deltas seen meanwhile)."""
    await health_latencies(client, 5)  # warm up
    idle = statistics.median(await health_latencies(client))
    first = asyncio.Event()
    deltas = 0

    async def stream() -> None:
        nonlocal deltas
        r = await client.post("/v1/chat/stream", json=body)
        async for event, _ in sse_events(r):
            if event == "message":
                deltas += 1
                first.set()

    task = asyncio.create_task(stream())
    await first.wait()
    during = await health_latencies(client)
    seen = deltas
    assert not task.done(), "the reply finished before the measurement: make it longer"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return idle, statistics.median(during), seen


async def test_health_stays_fast_while_a_chat_streams(aiohttp_client, tmp_path):
    llm = FakeChatModel("la " * 5000, delay_s=0.002, chunk=1)
    client, app = await start_api(aiohttp_client, tmp_path, parts={"llm": llm})
    async with asyncio.timeout(30):
        idle, during, deltas = await measure(client, {"message": "sing", "max_tokens": 4000})
    assert deltas > 1  # it really was streaming meanwhile
    assert during <= 3 * idle + 0.005, (idle, during)
    await app.aclose()


@pytest.mark.models
async def test_health_stays_fast_while_the_real_llm_streams(aiohttp_client, tmp_path):
    client, app = await start_api(aiohttp_client, tmp_path, parts={"llm": None, "tts": None})
    async with asyncio.timeout(120):
        idle, during, deltas = await measure(
            client, {"message": "Tell me a long story about a lighthouse keeper.",
                     "max_tokens": 400, "temperature": 0.8})
    assert deltas > 0
    assert during <= 3 * idle + 0.005, (idle, during)
    await app.aclose()
