"""An LLM on another machine in the house, through the OpenAI chat-completions API.

Works with llama.cpp's server (and llama-cpp-python's), Ollama and vLLM: they all stream
``/v1/chat/completions`` as server-sent events. The official ``openai`` client does the HTTP and
the SSE parsing; this adapter adds what a voice device needs on top: a first-token timeout and
a stall timeout (a server that stops talking mid-reply), and closing the HTTP stream when the
consumer stops (barge-in, an HTTP client that went away), which makes the server stop generating.
Every failure becomes ``RemoteLLMError`` so the fallback wrapper can answer with the local model.

What the remote side caches: nothing is kept on this device. llama.cpp's server keeps the
evaluated prompt of each slot (``cache_prompt``, on by default) and re-reads only what follows the
longest shared prefix, so a persona prompt at the start of every turn is read once per persona
switch, as the local model does; Ollama keeps the last prompt's context per loaded model; vLLM
reuses shared prefixes with ``--enable-prefix-caching``. ``warm_prefix`` does not exist here: the
fallback wrapper keeps warming the local model instead, so a fallback starts warm.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import structlog

from companion.settings import LlmSettings
from companion.stages.llm import ChatMessage, GenerationStats, Priority, SamplingParams

log = structlog.get_logger(__name__)

CHARS_PER_TOKEN = 4  # history budgeting without the remote tokenizer (rough, on the safe side)


class RemoteLLMError(RuntimeError):
    """The remote LLM could not answer: unreachable, an HTTP error, garbage, or too slow."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        # connect | dropped | http | protocol | first_token_timeout | stall
        self.reason = reason


class RemoteChatModel:
    """``ChatModel`` over an OpenAI-compatible server; see the module docstring."""

    def __init__(self, settings: LlmSettings, *, client: Any = None) -> None:
        from openai import AsyncOpenAI, Timeout

        if not settings.base_url:
            raise ValueError("the remote LLM needs llm.base_url")
        self.settings = settings
        self.host = urlsplit(settings.base_url).netloc or settings.base_url
        self.model_name = f"{settings.remote_model}@{self.host}"
        self.context_length = settings.context_length
        key = settings.api_key.get_secret_value() if settings.api_key else "not-needed"
        # no client retries: a failure falls back to the local model at once instead
        self._client = client or AsyncOpenAI(
            base_url=settings.base_url, api_key=key, max_retries=0,
            timeout=Timeout(settings.remote_first_token_s, connect=settings.remote_connect_s))

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // CHARS_PER_TOKEN) if text else 0

    async def aclose(self) -> None:
        await self._client.close()

    def close(self) -> None:
        """App.aclose calls this in a worker thread: the HTTP pool closes with the loop."""

    async def stream(
        self, messages: list[ChatMessage], params: SamplingParams,
        stats: GenerationStats | None = None, *, priority: Priority = Priority.INTERACTIVE,
    ) -> AsyncIterator[str]:
        """Stream the reply's deltas. ``priority`` is accepted for the ChatModel contract; the
        server orders its own queue."""
        stats = stats if stats is not None else GenerationStats()
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.settings.remote_first_token_s
        response = None
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._client.chat.completions.create(**self._request(messages, params))
            chunks = response.__aiter__()
            while True:
                limit = deadline if stats.first_token_s is None else (
                    loop.time() + self.settings.remote_stall_s)
                try:
                    async with asyncio.timeout_at(limit):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                delta = self._take(chunk, stats)
                if delta:
                    if stats.first_token_s is None:
                        stats.first_token_s = loop.time() - started
                    stats.completion_tokens += 1
                    yield delta
        except TimeoutError:
            reason = "first_token_timeout" if stats.first_token_s is None else "stall"
            raise RemoteLLMError(reason, f"{self.host}: no {'first words' if reason != 'stall' else 'words'} "
                                 f"within {self._limit(reason)} s") from None
        except Exception as exc:  # openai/httpx errors, garbage JSON: all mean "not usable now"
            reason = _reason(exc)
            if reason == "connect" and stats.first_token_s is not None:
                reason = "dropped"  # the connection broke in the middle of the reply
            raise RemoteLLMError(reason, f"{self.host}: {_describe(exc)}") from exc
        finally:
            if response is not None:  # tells the server to stop generating
                await asyncio.shield(_close_quietly(response))

    def _limit(self, reason: str) -> float:
        return (self.settings.remote_stall_s if reason == "stall"
                else self.settings.remote_first_token_s)

    def _request(self, messages: list[ChatMessage], params: SamplingParams) -> dict[str, Any]:
        return {
            "model": self.settings.remote_model, "messages": list(messages), "stream": True,
            "temperature": params.temperature, "top_p": params.top_p,
            "max_tokens": params.max_tokens, "stop": list(params.stop) or None,
            # llama.cpp's servers know repeat_penalty (the local model's knob: same answers);
            # Ollama and vLLM ignore a field they do not know
            "extra_body": {"repeat_penalty": params.repeat_penalty},
        }

    @staticmethod
    def _take(chunk: Any, stats: GenerationStats) -> str:
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            stats.prompt_tokens = usage.prompt_tokens or stats.prompt_tokens
        if not chunk.choices:
            return ""
        choice = chunk.choices[0]
        if choice.finish_reason:
            stats.finish_reason = choice.finish_reason
        return (choice.delta.content or "") if choice.delta is not None else ""


async def _close_quietly(response: Any) -> None:
    try:
        await response.close()
    except Exception:  # the connection is gone already
        log.debug("closing the remote stream failed", exc_info=True)


def _reason(exc: Exception) -> str:
    import openai

    if isinstance(exc, openai.APIConnectionError):
        return "connect"
    if isinstance(exc, openai.APIStatusError):
        return "http"
    return "protocol"


def _describe(exc: Exception) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        return f"cannot connect ({cause or exc})"
    return f"{type(exc).__name__}: {exc}"[:200]
