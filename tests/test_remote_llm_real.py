"""The remote backend against a REAL OpenAI-compatible server: llama-cpp-python's own
(`python -m llama_cpp.server`) on loopback, serving the same SmolLM2 GGUF the device runs.

One server per module (starting one costs a few seconds); the kill-and-recover test starts its
own, since it kills it.
"""

from __future__ import annotations

import asyncio

import pytest

from companion.models import ModelRegistry
from companion.settings import PROJECT_ROOT, LlmSettings
from companion.stages.fallback_llm import BreakerState, FallbackChatModel
from companion.stages.llm import GenerationStats, LlamaCppChatModel, SamplingParams
from companion.stages.remote_llm import RemoteChatModel
from scripts.llama_server import LlamaServer
from tests.conftest import until

pytestmark = pytest.mark.models

GREEDY = SamplingParams(temperature=0.0, max_tokens=32)
THREADS = 1  # one thread each side: a shared 2-core CI machine spins 2-thread llama.cpp badly
QUESTIONS = ["What is the capital of France?", "Which animal says moo?"]


@pytest.fixture(scope="module")
def llama_server():
    server = LlamaServer(threads=THREADS).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def local_model():
    return LlamaCppChatModel(LlmSettings(threads=THREADS), ModelRegistry(PROJECT_ROOT / "models"))


def remote_settings(base_url: str) -> LlmSettings:
    # generous: a shared CI machine can be slow; the fast tests cover the timeouts themselves
    return LlmSettings(backend="openai", base_url=base_url, remote_first_token_s=30.0,
                       remote_stall_s=15.0)


async def answer(model, question: str, stats: GenerationStats | None = None) -> str:
    async with asyncio.timeout(60):
        messages = [{"role": "user", "content": question}]
        return "".join([d async for d in model.stream(messages, GREEDY, stats)])


async def test_streams_a_reply_from_the_real_server(llama_server):
    stats = GenerationStats()
    text = await answer(RemoteChatModel(remote_settings(llama_server.base_url)), QUESTIONS[0], stats)
    assert "Paris" in text
    assert stats.first_token_s is not None and stats.completion_tokens > 1


async def test_the_same_gguf_answers_the_same_locally_and_remotely(llama_server, local_model):
    remote = RemoteChatModel(remote_settings(llama_server.base_url))
    # one question here (CI time); scripts/bench_quality.py --backend both compares all 44
    assert await answer(remote, QUESTIONS[1]) == await answer(local_model, QUESTIONS[1])


async def test_cancelling_a_remote_reply_frees_the_server(llama_server):
    remote = RemoteChatModel(remote_settings(llama_server.base_url))
    long = [{"role": "user", "content": "Count from one to three hundred, in words."}]
    stream = remote.stream(long, SamplingParams(temperature=0.0, max_tokens=200))
    async with asyncio.timeout(30):
        await anext(stream)
        await stream.aclose()  # barge-in
    assert "Paris" in await answer(remote, QUESTIONS[0])  # the server answers the next one


async def test_killed_mid_reply_the_local_model_answers_then_the_remote_comes_back(local_model):
    server = LlamaServer(threads=THREADS).start()
    now = [0.0]
    model = FallbackChatModel(RemoteChatModel(remote_settings(server.base_url)), local_model,
                              failures=1, reset_s=5.0, clock=lambda: now[0])
    seen: list[tuple[str, dict]] = []
    model.add_observer(lambda kind, **data: seen.append((kind, data)))
    try:
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        deltas: list[str] = []
        async with asyncio.timeout(60):
            async for delta in model.stream(messages, GREEDY):
                deltas.append(delta)
                if len(deltas) == 2:
                    server.kill()  # in the middle of the reply
        text = "".join(deltas)
        # the local model went on from the remote's last word: the listener hears the one
        # answer this GGUF gives, nothing said twice
        assert text == await answer(local_model, QUESTIONS[0])
        assert "Paris" in text and model.last_source == "local"
        fallbacks = [data for kind, data in seen if kind == "fallback"]
        assert fallbacks[0]["reason"] == "dropped" and fallbacks[0]["partial_chars"] > 0
        assert model.breaker.state is BreakerState.OPEN

        assert "Paris" in await answer(model, QUESTIONS[0])  # open: local at once
        now[0] += 6.0
        assert "Paris" in await answer(model, QUESTIONS[0])  # trial: refused, local answers
        assert [data["reason"] for kind, data in seen if kind == "fallback"][-1] == "connect"

        server.start()  # the server returns
        now[0] += 6.0
        assert "Paris" in await answer(model, QUESTIONS[0])
        await until(lambda: model.breaker.state is BreakerState.CLOSED)
        assert model.last_source == "remote"
    finally:
        server.kill()
