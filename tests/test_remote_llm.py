"""The remote LLM and its fallback against a misbehaving OpenAI-compatible server on loopback.

The server (aiohttp, in the test's loop) speaks the real chat-completions SSE format and can
stall, never start, fail with HTTP 500, send garbage JSON or drip forever; a closed port plays
the unreachable server. The local model here is the fake; tests/test_remote_llm_real.py runs
the same paths on llama-cpp-python's own server and the real GGUF.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from aiohttp import web

from companion.events import EventType
from companion.settings import LlmSettings
from companion.stages.fallback_llm import BreakerState, FallbackChatModel
from companion.stages.llm import GenerationStats, Priority, SamplingParams
from companion.stages.remote_llm import RemoteChatModel, RemoteLLMError
from tests.conftest import fake_app, until
from tests.fakes import FakeChatModel

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PARAMS = SamplingParams(temperature=0.0, max_tokens=32)


def chunk(content: str | None = None, finish: str | None = None) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"content": content} if content else {},
                         "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n".encode()


class MisbehavingServer:
    """``/{mode}/v1/chat/completions``: good, stall, silent, error500, garbage, drip."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.disconnected: list[str] = []
        self.forever = asyncio.Event()  # never set: a stalled server waits on it

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{mode}/v1/chat/completions", self.complete)
        app.router.add_get("/good/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "m", "object": "model", "created": 0, "owned_by": "test"}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        mode = request.match_info["mode"]
        self.requests.append(mode)
        await request.json()
        if mode == "error500":
            return web.json_response({"error": {"message": "model crashed"}}, status=500)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            if mode == "good":
                for word in ("Paris ", "is ", "the ", "capital."):
                    await response.write(chunk(word))
                await response.write(chunk(finish="stop") + b"data: [DONE]\n\n")
            elif mode == "stall":  # a few words, then nothing
                await response.write(chunk("Paris ") + chunk("is "))
                await self.forever.wait()
            elif mode == "silent":  # headers, never a word
                await self.forever.wait()
            elif mode == "garbage":
                await response.write(b"data: {this is not json\n\n")
            elif mode == "drip":  # words forever, until the client goes away
                while True:
                    await response.write(chunk("la "))
                    await asyncio.sleep(0.02)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.append(mode)
            raise
        return response


@pytest.fixture
async def server(aiohttp_server):
    served = MisbehavingServer()
    running = await aiohttp_server(served.app())
    served.base = f"http://127.0.0.1:{running.port}"  # type: ignore[attr-defined]
    return served


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# short limits only where the server is made to fall silent: elsewhere a loaded machine's slow
# loopback must not look like a stalled server
QUIET_MODES = {"stall", "silent"}


def remote(base: str, mode: str = "good", **overrides) -> RemoteChatModel:
    limits = {"remote_first_token_s": 0.5, "remote_stall_s": 0.3} if mode in QUIET_MODES \
        else {"remote_first_token_s": 4.0, "remote_stall_s": 4.0}
    settings = LlmSettings(backend="openai", base_url=f"{base}/{mode}/v1", remote_model="m",
                           api_key="secret-key", **(limits | overrides))
    return RemoteChatModel(settings)


def fallback(base: str, mode: str, **kwargs) -> tuple[FallbackChatModel, FakeChatModel, list]:
    local = FakeChatModel("Paris is the capital of France.")
    model = FallbackChatModel(remote(base, mode), local, **kwargs)
    seen: list[tuple[str, dict]] = []
    model.add_observer(lambda kind, **data: seen.append((kind, data)))
    return model, local, seen


async def reply(model, **kwargs) -> str:
    async with asyncio.timeout(5):
        return "".join([d async for d in model.stream(QUESTION, PARAMS, **kwargs)])


async def test_remote_streams_the_server_reply(server):
    stats = GenerationStats()
    text = await reply(remote(server.base), stats=stats)
    assert text == "Paris is the capital."
    assert stats.first_token_s is not None and stats.finish_reason == "stop"


@pytest.mark.parametrize(("mode", "reason"), [
    ("error500", "http"), ("garbage", "protocol"), ("silent", "first_token_timeout"),
])
async def test_a_failing_remote_is_answered_by_the_local_model(server, mode, reason):
    model, local, seen = fallback(server.base, mode)
    text = await reply(model, priority=Priority.VOICE)
    assert text == "Paris is the capital of France."
    assert local.priorities == [Priority.VOICE]  # the priority is passed through
    assert seen[0] == ("fallback", {"reason": reason, "detail": seen[0][1]["detail"],
                                    "partial_chars": 0, "breaker": "closed"})
    assert model.last_source == "local"


async def test_an_unreachable_remote_is_answered_by_the_local_model():
    model, _, seen = fallback(f"http://127.0.0.1:{closed_port()}", "good")
    assert await reply(model) == "Paris is the capital of France."
    assert seen[0][1]["reason"] == "connect"


async def test_a_stall_mid_reply_goes_on_with_the_local_answer_without_repeating(server):
    model, _, seen = fallback(server.base, "stall")
    text = await reply(model)
    # the remote said "Paris is ", the local model's answer begins the same way: no repeat
    assert text == "Paris is the capital of France."
    assert seen[0][1]["reason"] == "stall" and seen[0][1]["partial_chars"] == len("Paris is ")
    await until(lambda: "stall" in server.disconnected)  # the stalled stream was closed


async def test_a_diverging_local_answer_starts_after_a_sentence_break(server):
    model, local, _ = fallback(server.base, "stall")
    local.reply = "The capital is Paris."
    assert await reply(model) == "Paris is …\nThe capital is Paris."


class ContinuingFakeChatModel(FakeChatModel):
    """A local model that goes on from a begun reply (as LlamaCppChatModel does)."""

    continues_replies = True

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.max_tokens: list[int] = []

    def stream(self, messages, params, stats=None, **kwargs):
        self.max_tokens.append(params.max_tokens)
        return super().stream(messages, params, stats, **kwargs)


async def test_a_local_model_that_continues_goes_on_from_the_remote_partial_reply(server):
    local = ContinuingFakeChatModel("the capital of France.")
    model = FallbackChatModel(remote(server.base, "stall"), local)
    assert await reply(model) == "Paris is the capital of France."
    # it was handed what the remote said as the start of its own reply
    assert local.prompts == [[*QUESTION, {"role": "assistant", "content": "Paris is "}]]
    assert local.max_tokens == [PARAMS.max_tokens - 2]  # the remote's two words count


async def test_with_nothing_said_a_continuing_local_model_answers_from_scratch(server):
    local = ContinuingFakeChatModel("Paris.")
    model = FallbackChatModel(remote(server.base, "error500"), local)
    assert await reply(model) == "Paris."
    assert local.prompts == [QUESTION]


async def test_the_breaker_opens_skips_the_remote_and_recovers(server):
    now = [0.0]
    model, _, seen = fallback(server.base, "error500", failures=2, reset_s=30.0,
                              clock=lambda: now[0])
    await reply(model)
    await reply(model)
    assert model.breaker.state is BreakerState.OPEN
    asked = len(server.requests)
    await reply(model)  # open: straight to the local model, no request
    assert len(server.requests) == asked
    assert seen[-1] == ("fallback", {"reason": "breaker_open", "detail": seen[-1][1]["detail"],
                                     "partial_chars": 0, "breaker": "open"})

    model.remote = remote(server.base, "good")  # the server is back
    now[0] += 31.0
    assert await reply(model) == "Paris is the capital."  # the half-open trial succeeds
    assert model.breaker.state is BreakerState.CLOSED
    states = [data["state"] for kind, data in seen if kind == "breaker"]
    assert states == ["open", "half-open", "closed"]


async def test_a_failed_trial_opens_the_breaker_again(server):
    now = [0.0]
    model, _, _ = fallback(server.base, "error500", failures=1, reset_s=10.0, clock=lambda: now[0])
    await reply(model)
    now[0] += 11.0
    await reply(model)  # the trial fails
    assert model.breaker.state is BreakerState.OPEN and model.breaker.opened_at == 11.0


async def test_cancelling_stops_the_server_and_is_not_a_failure(server):
    model, _, seen = fallback(server.base, "drip", failures=1)
    got = []

    async def consume():
        async for delta in model.stream(QUESTION, PARAMS):
            got.append(delta)

    task = asyncio.create_task(consume())
    await until(lambda: len(got) >= 2)
    task.cancel()  # barge-in
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: "drip" in server.disconnected)  # the HTTP stream was closed
    assert model.breaker.state is BreakerState.CLOSED and seen == []


async def test_a_consumer_that_stops_reading_closes_the_stream(server):
    model = remote(server.base, "drip")
    stream = model.stream(QUESTION, PARAMS)
    async with asyncio.timeout(5):
        assert await anext(stream) == "la "
        await stream.aclose()  # the HTTP client of /v1/chat/stream went away
    await until(lambda: "drip" in server.disconnected)


async def test_the_remote_error_names_the_host_not_the_key(server):
    with pytest.raises(RemoteLLMError) as info:
        await reply(remote(server.base, "error500"))
    assert "HTTP 500" in str(info.value) and "secret-key" not in str(info.value)
    assert "secret-key" not in repr(LlmSettings(backend="openai", base_url="http://x/v1",
                                                api_key="secret-key"))


async def test_fallbacks_show_in_events_ready_all_and_metrics(settings, server, aiohttp_client):
    from companion.api.http import make_http_app

    model, _, _ = fallback(server.base, "error500", failures=1)
    app = fake_app(settings, llm=model)
    await app.start()
    events = []
    app.bus.add_callback(events.append)
    client = await aiohttp_client(make_http_app(app))
    ready = await (await client.get("/ready/all")).json()
    assert ready["components"]["llm_remote"]["healthy"] is True

    reply_ = await app.conversation.reply_text("What is the capital of France?", source="cli")
    assert reply_.text == "Paris is the capital of France."
    kinds = [e.type for e in events]
    assert EventType.LLM_FALLBACK in kinds and EventType.LLM_BACKEND in kinds
    ready = await (await client.get("/ready/all")).json()
    assert ready["status"] == "degraded"
    assert ready["components"]["llm_remote"]["healthy"] is False
    assert "breaker open" in ready["components"]["llm_remote"]["detail"]
    metrics = await (await client.get("/metrics")).json()
    assert metrics["inference"]["fallbacks"] == 1
    assert metrics["inference"]["remote_breaker"] == "open"
    prometheus = await (await client.get("/metrics/prometheus")).text()
    assert 'companion_llm_fallbacks_total{reason="http"} 1.0' in prometheus
    assert "companion_llm_remote_up 0.0" in prometheus
    await app.aclose()
    await model.aclose()  # injected: the caller's to close


def test_openai_backend_needs_a_base_url():
    with pytest.raises(ValueError, match=r"needs llm\.base_url"):
        LlmSettings(backend="openai")


async def test_an_http_client_that_goes_away_stops_the_remote_generation(settings, server,
                                                                       aiohttp_client):
    from companion.api.http import make_http_app

    model, _, seen = fallback(server.base, "drip")
    app = fake_app(settings, llm=model)
    await app.start()
    client = await aiohttp_client(make_http_app(app))
    async with asyncio.timeout(10):
        response = await client.post("/v1/chat/stream", json={"message": "Sing forever."})
        assert b'"delta":"la ' in await response.content.readany()  # the first delta arrived
        response.close()  # the client goes away mid-reply
        await until(lambda: "drip" in server.disconnected)
    assert seen == []  # neither a failure nor a fallback
    await app.aclose()
    await model.aclose()


async def test_check_says_whether_the_remote_server_answers(server):
    from companion.check import Report, _check_remote_llm
    from companion.settings import CompanionSettings

    report = Report()
    for base in (f"{server.base}/good/v1", f"http://127.0.0.1:{closed_port()}/v1"):
        settings = CompanionSettings(device_id="t", llm={"backend": "openai", "base_url": base})
        await asyncio.to_thread(_check_remote_llm, settings, report)
    up, down = report.lines
    assert up.ok and "serves m" in up.detail
    assert not down.ok and "the local model answers until it is back" in down.detail
