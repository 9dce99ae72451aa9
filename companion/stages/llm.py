"""The language model: llama-cpp-python on a GGUF, streamed token by token.

llama.cpp is not thread-safe and blocks, so generation runs in one worker thread at a time and
hands deltas to the event loop through a queue. Cancelling the consumer stops generation at the
next token. llama.cpp keeps the evaluated prompt of the previous call and re-evaluates only what
differs, so a persona prompt at the start of every prompt is read once, not every turn; a state
per persona (``save_prefix`` / ``load_prefix``) keeps that true across persona switches.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypedDict

import structlog

from companion.models import ModelRegistry
from companion.settings import LlmSettings

log = structlog.get_logger(__name__)


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass
class GenerationStats:
    """Filled in by ``stream`` as it goes: read it after the stream ends."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None  # seconds from call to first delta
    finish_reason: str | None = None
    prefix_reused: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.2
    max_tokens: int = 96
    top_p: float = 0.9
    repeat_penalty: float = 1.1
    stop: tuple[str, ...] = field(default=())


class ChatModel(Protocol):
    model_name: str
    context_length: int

    def count_tokens(self, text: str) -> int: ...

    def stream(
        self, messages: list[ChatMessage], params: SamplingParams,
        stats: GenerationStats | None = None,
    ) -> AsyncIterator[str]: ...


_DONE = object()


class LlamaCppChatModel:
    def __init__(self, settings: LlmSettings, registry: ModelRegistry) -> None:
        from llama_cpp import Llama  # heavy; import only when used

        resolved = registry.resolve(settings.model, kind="llm")
        self.model_name = resolved.entry.name
        self.model_path = resolved.file
        self.settings = settings
        self._llama = Llama(
            model_path=str(resolved.file), n_ctx=settings.context_length,
            n_threads=settings.threads, n_batch=512, verbose=False,
        )
        self.context_length = self._llama.n_ctx()
        self._lock = threading.Lock()  # llama.cpp: one call at a time
        self._prefix_states: OrderedDict[str, Any] = OrderedDict()
        self._prefix_cache_size = 8

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode(), add_bos=False, special=True))

    async def stream(
        self, messages: list[ChatMessage], params: SamplingParams,
        stats: GenerationStats | None = None,
    ) -> AsyncIterator[str]:
        stats = stats if stats is not None else GenerationStats()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()
        started = loop.time()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                for delta in self._generate(messages, params, stats, cancel):
                    put(delta)
            except BaseException as exc:  # handed to the consumer, raised there
                put(exc)
            finally:
                put(_DONE)

        worker = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                if stats.first_token_s is None:
                    stats.first_token_s = loop.time() - started
                yield item  # type: ignore[misc]
        finally:
            cancel.set()
            await asyncio.shield(worker)

    def _generate(
        self, messages: list[ChatMessage], params: SamplingParams, stats: GenerationStats,
        cancel: threading.Event,
    ) -> Iterator[str]:
        with self._lock:
            chunks = self._llama.create_chat_completion(
                messages=list(messages), stream=True, temperature=params.temperature,
                top_p=params.top_p, repeat_penalty=params.repeat_penalty,
                max_tokens=params.max_tokens, stop=list(params.stop) or None,
            )
            text = []
            for chunk in chunks:
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                choice = chunk["choices"][0]
                delta = choice["delta"].get("content")
                if delta:
                    text.append(delta)
                    yield delta
                if choice.get("finish_reason"):
                    stats.finish_reason = choice["finish_reason"]
            stats.completion_tokens = self.count_tokens("".join(text))
            stats.prompt_tokens = self._prompt_tokens_of_last_call(stats.completion_tokens)

    def _prompt_tokens_of_last_call(self, completion_tokens: int) -> int:
        return max(self._llama.n_tokens - completion_tokens, 0)

    # --- prefix states: the evaluated persona prompt, kept per persona -------------------

    async def warm_prefix(self, key: str, messages: list[ChatMessage]) -> None:
        """Evaluate ``messages`` (a persona's system prompt) and keep llama.cpp's state under
        ``key``, so a later switch to that persona does not re-read its prompt."""
        await asyncio.to_thread(self._warm_prefix, key, messages)

    def _warm_prefix(self, key: str, messages: list[ChatMessage]) -> None:
        prefix_tokens = self.prefix_tokens(messages)
        with self._lock:
            self._llama.reset()
            self._llama.eval(prefix_tokens)
            self._prefix_states[key] = self._llama.save_state()
            self._prefix_states.move_to_end(key)
            while len(self._prefix_states) > self._prefix_cache_size:
                self._prefix_states.popitem(last=False)

    def load_prefix(self, key: str) -> bool:
        """Restore the state kept for ``key``; False when there is none. Call between turns."""
        state = self._prefix_states.get(key)
        if state is None:
            return False
        with self._lock:
            self._llama.load_state(state)
        self._prefix_states.move_to_end(key)
        return True

    def has_prefix(self, key: str) -> bool:
        return key in self._prefix_states

    def prefix_tokens(self, messages: list[ChatMessage]) -> list[int]:
        """The tokens that start every prompt beginning with ``messages``: the formatted chat
        up to (not including) the first user turn."""
        formatted = self._format(messages)
        tokens = self._llama.tokenize(formatted.encode(), add_bos=True, special=True)
        return tokens

    def _format(self, messages: list[ChatMessage]) -> str:
        handler = self._llama.chat_handler or None
        if handler is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            template = self._llama.metadata.get("tokenizer.chat_template")
            eos = self._llama.detokenize([self._llama.token_eos()]).decode(errors="ignore")
            bos = self._llama.detokenize([self._llama.token_bos()]).decode(errors="ignore")
            formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
            return formatter(messages=list(messages)).prompt
        raise RuntimeError("custom chat handlers are not supported for prefix caching")
