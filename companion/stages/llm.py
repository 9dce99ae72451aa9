"""The language model: llama-cpp-python on a GGUF, streamed token by token.

llama.cpp is not thread-safe and blocks, so generation runs in one worker thread at a time and
hands deltas to the event loop through a queue. Cancelling the consumer stops generation at the
next token. llama.cpp keeps the evaluated prompt of the previous call and re-evaluates only what
follows the longest common token prefix, so a persona prompt at the start of every prompt is read
once, not every turn. A saved state per persona (``warm_prefix``) keeps that true across persona
switches: each turn restores the kept state that shares the most tokens with its prompt.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal, Protocol, TypedDict

import numpy as np
import structlog

from companion.compute import ComputeGate
from companion.models import ModelRegistry
from companion.settings import LlmSettings

log = structlog.get_logger(__name__)


class Priority(IntEnum):
    """Who waits for a generation; lower runs first. A person talking to the device (VOICE)
    goes before an HTTP client (INTERACTIVE), which goes before work nobody waits for
    (BACKGROUND: summaries, persona warm-up, trivia and stories)."""

    VOICE = 0
    INTERACTIVE = 1
    BACKGROUND = 2


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
    cached_prompt_tokens: int = 0  # prompt tokens taken from llama.cpp's kept state

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
        stats: GenerationStats | None = None, *, priority: Priority = Priority.INTERACTIVE,
    ) -> AsyncIterator[str]: ...


class PrefixCachingChatModel(ChatModel, Protocol):
    """A chat model that can keep a persona's evaluated system prompt (llama.cpp state)."""

    async def warm_prefix(self, key: str, messages: list[ChatMessage], *,
                          priority: Priority = Priority.BACKGROUND) -> None: ...

    def load_prefix(self, key: str) -> bool: ...

    def has_prefix(self, key: str) -> bool: ...


_DONE = object()


class LlamaCppChatModel:
    """SmolLM2 (or any chat GGUF) through llama-cpp-python.

    Prompts are formatted with the model's own chat template and handed to llama.cpp as tokens,
    so the tokens compared with a kept persona prefix are exactly the tokens evaluated.
    """

    def __init__(self, settings: LlmSettings, registry: ModelRegistry, *,
                 gate: ComputeGate | None = None) -> None:
        from llama_cpp import Llama  # heavy; import only when used
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        resolved = registry.resolve(settings.model, kind="llm")
        self.model_name = resolved.entry.name
        self.model_path = resolved.file
        self.settings = settings
        self.gate = gate or ComputeGate()
        self._llama = Llama(
            model_path=str(resolved.file), n_ctx=settings.context_length,
            n_threads=settings.threads, n_batch=512, verbose=False,
        )
        self.context_length = self._llama.n_ctx()
        template = self._llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise RuntimeError(f"{self.model_name}: the GGUF has no chat template")
        eos = self._token_text(self._llama.token_eos())
        bos = self._token_text(self._llama.token_bos())
        # one formatter for prompts (ends with the assistant header), one for prefixes (ends
        # after the last given message, so it is a true prefix of every later prompt)
        self._prompt_format = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self._prefix_format = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                                  add_generation_prompt=False)
        self._lock = threading.Lock()  # llama.cpp: one call at a time
        # ...and always from the same thread: llama.cpp's OpenMP keeps a worker team per calling
        # thread, and a second team sometimes lands on the first one's core, where ggml's
        # spinning barriers make every token ~3x slower (measured: 245 ms vs 460 ms to the first
        # sentence, bimodal, only when a second executor thread made the call).
        # It also runs at a lower priority (nice), inherited by the OpenMP workers it creates:
        # the event loop (microphone pump, HTTP) gets a core at once while the LLM writes.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama",
                                          initializer=_lower_thread_priority,
                                          initargs=(settings.nice,))
        self._prefix_states: OrderedDict[str, Any] = OrderedDict()
        self._prefix_cache_size = settings.prefix_cache_size  # ~23 kB per prompt token (135M)
        self.last_prompt_eval_tokens = 0  # tokens llama.cpp had to evaluate for the last prompt

    def _token_text(self, token: int) -> str:
        return self._llama.detokenize([token], special=True).decode(errors="ignore")

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode(), add_bos=False, special=True))

    async def stream(
        self, messages: list[ChatMessage], params: SamplingParams,
        stats: GenerationStats | None = None, *, priority: Priority = Priority.INTERACTIVE,
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

        worker = asyncio.ensure_future(loop.run_in_executor(self._thread, work))
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

    def prompt_tokens(self, messages: list[ChatMessage]) -> tuple[list[int], list[str]]:
        """The tokens llama.cpp evaluates for ``messages`` and the template's stop strings."""
        result = self._prompt_format(messages=list(messages))
        tokens = self._llama.tokenize(result.prompt.encode(), add_bos=not result.added_special,
                                      special=True)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, stop

    def _generate(
        self, messages: list[ChatMessage], params: SamplingParams, stats: GenerationStats,
        cancel: threading.Event,
    ) -> Iterator[str]:
        tokens, stop = self.prompt_tokens(messages)
        with self._lock:
            reused = self._restore_best_prefix(tokens)
            stats.prompt_tokens = len(tokens)
            stats.prefix_reused = reused > 0
            stats.cached_prompt_tokens = reused
            self.last_prompt_eval_tokens = len(tokens) - reused
            chunks = self._llama.create_completion(
                prompt=tokens, stream=True, temperature=params.temperature,
                top_p=params.top_p, repeat_penalty=params.repeat_penalty,
                max_tokens=params.max_tokens, stop=[*stop, *params.stop] or None,
            )
            text: list[str] = []
            try:
                for chunk in chunks:
                    if cancel.is_set():
                        stats.finish_reason = "cancelled"
                        break
                    # the next token waits while speech the user is waiting for is synthesized
                    self.gate.wait_for_priority_work()
                    choice = chunk["choices"][0]  # type: ignore[index]
                    if choice["text"]:
                        text.append(choice["text"])
                        yield choice["text"]
                    if choice.get("finish_reason"):
                        stats.finish_reason = choice["finish_reason"]
            finally:
                chunks.close()  # type: ignore[union-attr]
            stats.completion_tokens = self.count_tokens("".join(text))

    def _restore_best_prefix(self, tokens: list[int]) -> int:
        """Load the kept state that shares the most leading tokens with ``tokens`` when it
        beats what llama.cpp holds now; returns how many prompt tokens need no evaluation.
        Call with the lock held."""
        current = _common_prefix(self._llama.input_ids[: self._llama.n_tokens], tokens)
        best_key, best = None, current
        for key, state in self._prefix_states.items():
            shared = _common_prefix(state.input_ids[: state.n_tokens], tokens)
            if shared > best:
                best_key, best = key, shared
        if best_key is not None:
            self._llama.load_state(self._prefix_states[best_key])
            self._prefix_states.move_to_end(best_key)
        # llama.cpp re-evaluates at least the last prompt token to get fresh logits
        return min(best, len(tokens) - 1)

    # --- prefix states: the evaluated persona prompt, kept per persona -------------------

    async def warm_prefix(self, key: str, messages: list[ChatMessage], *,
                          priority: Priority = Priority.BACKGROUND) -> None:
        """Evaluate ``messages`` (a persona's system prompt) and keep llama.cpp's state under
        ``key``: a later turn that starts with them re-uses it instead of re-reading them."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._warm_prefix, key, messages)

    def _warm_prefix(self, key: str, messages: list[ChatMessage]) -> None:
        tokens = self.prefix_tokens(messages)
        with self._lock:
            held = _common_prefix(self._llama.input_ids[: self._llama.n_tokens], tokens)
            if held == 0:
                self._llama.reset()
            elif self._llama.n_tokens > held:  # keep what is already evaluated, drop the rest
                self._llama._ctx.kv_cache_seq_rm(-1, held, -1)
                self._llama.n_tokens = held
            if held < len(tokens):
                self._llama.eval(tokens[held:])
            self._prefix_states[key] = self._save_state()
            self._prefix_states.move_to_end(key)
            while len(self._prefix_states) > self._prefix_cache_size:
                self._prefix_states.popitem(last=False)

    def _save_state(self) -> Any:
        """llama.cpp's state without llama-cpp-python's per-token logits copy (n_tokens × vocab
        floats: 73 MB for a 370-token prompt of SmolLM2); one row is enough because the
        prompt's suffix is always evaluated after a restore."""
        import ctypes

        import llama_cpp
        from llama_cpp.llama import LlamaState

        ctx = self._llama._ctx.ctx
        size = llama_cpp.llama_state_get_size(ctx)
        buffer = (ctypes.c_uint8 * int(size))()
        written = int(llama_cpp.llama_state_get_data(ctx, buffer, size))
        return LlamaState(
            input_ids=self._llama.input_ids.copy(),  # whole n_ctx array: load_state adopts it
            scores=np.zeros((1, self._llama.n_vocab()), dtype=np.single),
            n_tokens=self._llama.n_tokens, llama_state=bytes(buffer)[:written],
            llama_state_size=written, seed=self._llama._seed,
        )

    def load_prefix(self, key: str) -> bool:
        """Restore the state kept for ``key`` now; False when there is none. Optional: a turn
        restores the best matching state by itself."""
        state = self._prefix_states.get(key)
        if state is None:
            return False
        with self._lock:
            self._llama.load_state(state)
        self._prefix_states.move_to_end(key)
        return True

    def has_prefix(self, key: str) -> bool:
        return key in self._prefix_states

    def drop_prefix(self, key: str) -> None:
        self._prefix_states.pop(key, None)

    @property
    def prefix_keys(self) -> list[str]:
        return list(self._prefix_states)

    @property
    def prefix_bytes(self) -> int:
        return sum(s.llama_state_size + s.scores.nbytes for s in self._prefix_states.values())

    def prefix_tokens(self, messages: list[ChatMessage]) -> list[int]:
        """The tokens that start every prompt beginning with ``messages``: the formatted chat
        up to (not including) the first user turn, without the assistant header."""
        result = self._prefix_format(messages=list(messages))
        return self._llama.tokenize(result.prompt.encode(), add_bos=not result.added_special,
                                    special=True)


def _common_prefix(held: Any, tokens: list[int]) -> int:
    n = min(len(held), len(tokens))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(held[:n]) != np.asarray(tokens[:n], dtype=np.intc))
    return int(diff[0]) if diff.size else n


def _lower_thread_priority(nice: int) -> None:
    """Raise this thread's nice value (Linux: per thread, inherited by threads it creates)."""
    import os

    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        log.warning("could not lower the LLM thread's priority", nice=nice)
