"""Faults found by review (issue 8): a chat timeout is a coded 504 (and an `error` event on the
stream) counted as a failure; /ready reports the last real inference, not the load time;
/v1/state shows since when the control link is up, read from the real ControlLink."""

from __future__ import annotations

import asyncio

import pytest

from companion.api.http import make_http_app
from tests.conftest import until
from tests.control_helpers import control_plane, linked_device, url
from tests.fakes import FakeChatModel
from tests.http_helpers import parse_sse, start_api
from tests.test_http_api import error_of


@pytest.fixture
async def slow_api(aiohttp_client, tmp_path):
    """An LLM far slower than the turn timeout (1.05 s)."""
    client, app = await start_api(aiohttp_client, tmp_path,
                                  parts={"llm": FakeChatModel("word " * 400, delay_s=0.05)},
                                  pipeline={"turn_timeout_s": 1.05})
    yield client, app
    await app.aclose()


async def test_a_chat_that_times_out_is_a_coded_504_and_counts_as_a_failure(slow_api):
    client, _ = slow_api
    async with asyncio.timeout(10):
        error = await error_of(await client.post("/v1/chat", json={"message": "hi"}), 504,
                               "UPSTREAM_TIMEOUT")
        metrics = await (await client.get("/metrics")).json()
    assert error["details"] == {"timeout_s": 1.05} and "traceback" not in str(error).lower()
    assert metrics["inference"]["failures"] == 1


async def test_a_stream_that_times_out_ends_with_an_error_event(slow_api):
    client, _ = slow_api
    async with asyncio.timeout(10):
        response = await client.post("/v1/chat/stream", json={"message": "hi"})
        events = parse_sse(await response.text())
        metrics = await (await client.get("/metrics")).json()
    assert events[0][0] == "message"
    assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "UPSTREAM_TIMEOUT"
    assert "done" not in [name for name, _ in events]
    assert metrics["inference"]["failures"] == 1


async def test_ready_reports_the_last_inference_not_the_load_time(aiohttp_client, tmp_path):
    client, app = await start_api(aiohttp_client, tmp_path)
    app.status.set_component("llm", True, "fake-llm", latency_ms=4321.0)  # a slow load
    async with asyncio.timeout(5):
        before = await (await client.get("/ready")).json()
        await client.post("/v1/chat", json={"message": "hi"})
        after = await (await client.get("/ready")).json()
    assert before["inference"]["latency_ms"] is None
    assert after["inference"]["latency_ms"] is not None
    assert after["inference"]["latency_ms"] < 4321.0
    await app.aclose()


async def test_state_shows_since_when_the_real_control_link_is_up(aiohttp_client, tmp_path):
    async with control_plane() as plane, linked_device(tmp_path, url(plane)) as (app, link):
        await plane.wait_connected("dev-a")
        client = await aiohttp_client(make_http_app(app))
        async with asyncio.timeout(5):
            body = await (await client.get("/v1/state")).json()
        cp = body["control_plane"]
        assert cp["configured"] and cp["connected"] and body["status"] == "online"
        assert cp["since"] is not None and cp["since"].endswith("Z")
        assert cp["retries"] == 0 and cp["outbox_depth"] == link.status.outbox_depth
        await plane.stop()  # the link goes down: offline, since cleared
        await until(lambda: not link.status.connected, what="the link down")
        async with asyncio.timeout(5):
            body = await (await client.get("/v1/state")).json()
        assert body["status"] == "offline" and body["control_plane"]["since"] is None
