"""The language model: llama-cpp-python on a GGUF, streamed token by token.

llama.cpp is not thread-safe and blocks, so generation runs in one worker thread at a time and
hands deltas to the event loop through a queue. Cancelling the consumer stops generation at the
next token. llama.cpp keeps the evaluated prompt of the previous call and re-evaluates only what
follows the longest common token prefix, so a persona prompt at the start of every prompt is read
once, not every turn. A saved state per persona (``warm_prefix``) keeps that true across persona
switches: each turn restores the kept state that shares the most tokens with its prompt.

All llama.cpp work runs on that one thread in order of ``Priority``: a voice turn goes before an
HTTP chat, which goes before background work. A running generation or warm-up steps aside at its
next token (or chunk of prompt) when more urgent work arrives: it keeps its llama.cpp state, runs
that work on the same thread, restores its state and goes on where it was.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal, Protocol, TypedDict

import numpy as np
import structlog

from companion.compute import ComputeGate, PriorityWorker, WorkerClosedError
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

    def has_prefix(self, key: str) -> bool: ...


_DONE = object()
WARM_CHUNK_TOKENS = 64  # a warm-up steps aside for urgent work after at most this many tokens


class LlamaCppChatModel:
    """SmolLM2 (or any chat GGUF) through llama-cpp-python.

    Prompts are formatted with the model's own chat template and handed to llama.cpp as tokens,
    so the tokens compared with a kept persona prefix are exactly the tokens evaluated.
    Messages ending with an assistant message continue that reply (``continues_replies``).
    """

    continues_replies = True

    def __init__(self, settings: LlmSettings, registry: ModelRegistry, *,
                 gate: ComputeGate | None = None) -> None:
        from llama_cpp import Llama  # heavy; import only when used
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        resolved = registry.resolve(settings.model, kind="llm")
        self.model_name = resolved.entry.name
        self.model_path = resolved.file
        self.settings = settings
        self.gate = gate or ComputeGate()
        self._closing = threading.Lock()  # tokenizing vs freeing the model
        self._closed = False
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
        # llama.cpp: one call at a time, and always from the same thread: llama.cpp's OpenMP
        # keeps a worker team per calling thread, and a second team sometimes lands on the first
        # one's core, where ggml's spinning barriers make every token ~3x slower (measured:
        # 245 ms vs 460 ms to the first sentence, bimodal, only when a second executor thread
        # made the call). The thread runs at a lower priority (nice), inherited by the OpenMP
        # workers it creates: the event loop (microphone pump, HTTP) gets a core at once while
        # the LLM writes. Tokenizing alone (count_tokens) is read-only and may run anywhere.
        self._worker = PriorityWorker(
            "llama", initializer=functools.partial(_lower_thread_priority, settings.nice))
        self._prefix_states: OrderedDict[str, Any] = OrderedDict()
        self._prefix_cache_size = settings.prefix_cache_size  # ~23 kB per prompt token (135M)
        self.last_prompt_eval_tokens = 0  # tokens llama.cpp had to evaluate for the last prompt

    def _token_text(self, token: int) -> str:
        return self._llama.detokenize([token], special=True).decode(errors="ignore")

    def count_tokens(self, text: str) -> int:
        """Tokenizing reads only the vocabulary: safe beside a generation, on any thread (but
        not free: callers on the event loop run it in a worker thread)."""
        return len(self._tokenize(text))

    def _tokenize(self, text: str) -> list[int]:
        # the model must not be freed under a tokenizer (close() on shutdown while a record
        # counted tokens in a worker thread: a segfault in a CI run)
        with self._closing:
            if self._closed:
                raise RuntimeError(f"{self.model_name}: the model is closed")
            return self._llama.tokenize(text.encode(), add_bos=False, special=True)

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
                for delta in self._generate(messages, params, stats, cancel, Priority(priority)):
                    put(delta)
            except BaseException as exc:  # handed to the consumer, raised there
                put(exc)
            finally:
                put(_DONE)

        job = self._submit(priority, work)
        job.add_done_callback(functools.partial(_report_cancelled, put))
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
            if not job.cancel():  # running: it stops at its next token
                await asyncio.shield(asyncio.wrap_future(job))

    @property
    def busy_with(self) -> Priority | None:
        """The priority of the work llama.cpp is doing now (None: idle)."""
        running = self._worker.running
        return None if running is None else Priority(running)

    def _submit(self, priority: Priority, fn: Callable[[], Any]) -> Future:
        try:
            return self._worker.submit(priority, fn)
        except WorkerClosedError as exc:
            raise RuntimeError(f"{self.model_name}: the language model is closed") from exc

    async def _run(self, priority: Priority, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self._submit(priority, functools.partial(fn, *args)))

    def close(self) -> None:
        """Stop the llama thread (a running generation ends at its next token, queued work is
        cancelled) and free the model. App.aclose calls it in a worker thread."""
        self._worker.close()
        self._prefix_states.clear()
        with self._closing:
            self._closed = True
            self._llama.close()

    def prompt_tokens(self, messages: list[ChatMessage]) -> tuple[list[int], list[str]]:
        """The tokens llama.cpp evaluates for ``messages`` and the template's stop strings.
        A trailing assistant message is a reply begun elsewhere (a remote server that died
        mid-reply): the prompt ends inside it, so the model goes on from its last word."""
        if messages and messages[-1]["role"] == "assistant":
            result = self._prefix_format(messages=list(messages))
            prompt = _cut_after(result.prompt, messages[-1]["content"])
        else:
            result = self._prompt_format(messages=list(messages))
            prompt = result.prompt
        tokens = self._llama.tokenize(prompt.encode(), add_bos=not result.added_special,
                                      special=True)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, stop

    def _generate(
        self, messages: list[ChatMessage], params: SamplingParams, stats: GenerationStats,
        cancel: threading.Event, priority: Priority,
    ) -> Iterator[str]:
        """Runs on the llama thread. When more urgent work waits, the generation keeps its
        state, lets that work run, restores the state and continues from the text it has
        given so far (llama.cpp then evaluates only the few tokens it had not yet)."""
        if cancel.is_set():
            stats.finish_reason = "cancelled"
            return
        tokens, stop = self.prompt_tokens(messages)
        stats.prompt_tokens = len(tokens)
        reused = self._restore_best_prefix(tokens)
        stats.prefix_reused = reused > 0
        stats.cached_prompt_tokens = reused
        self.last_prompt_eval_tokens = len(tokens) - reused
        text: list[str] = []
        prompt, max_tokens = tokens, params.max_tokens
        while True:
            chunks = self._llama.create_completion(
                prompt=prompt, stream=True, temperature=params.temperature,
                top_p=params.top_p, repeat_penalty=params.repeat_penalty,
                max_tokens=max_tokens, stop=[*stop, *params.stop] or None,
            )
            step_aside = False
            try:
                for chunk in chunks:
                    if cancel.is_set() or self._worker.closed:
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
                    elif self._worker.more_urgent(priority):
                        step_aside = True
                        break
            finally:
                chunks.close()  # type: ignore[union-attr]
            if not step_aside:
                break
            written = self._tokenize("".join(text))
            max_tokens = params.max_tokens - len(written)
            if max_tokens <= 0:
                stats.finish_reason = "length"
                break
            self._step_aside(priority)
            prompt = tokens + written
            self._restore_best_prefix(prompt)
        stats.completion_tokens = self.count_tokens("".join(text))

    def _step_aside(self, priority: Priority) -> None:
        """Let more urgent work run now, on this thread, keeping this job's llama.cpp state."""
        saved = self._save_state()
        ran = self._worker.run_more_urgent(priority)
        self._llama.load_state(saved)
        log.debug("llm work stepped aside", priority=priority.name, ran=ran)

    def _restore_best_prefix(self, tokens: list[int]) -> int:
        """Load the kept state that shares the most leading tokens with ``tokens`` when it
        beats what llama.cpp holds now; returns how many prompt tokens need no evaluation.
        Call on the llama thread."""
        current = _common_prefix(self._llama.input_ids[: self._llama.n_tokens], tokens)
        best_key, best = None, current
        for key, state in list(self._prefix_states.items()):
            shared = _common_prefix(state.input_ids[: state.n_tokens], tokens)
            if shared > best:
                best_key, best = key, shared
        if best_key is not None:
            self._llama.load_state(self._prefix_states[best_key])
            self._prefix_states.move_to_end(best_key)
        # llama.cpp re-evaluates at least the last prompt token to get fresh logits
        return min(best, len(tokens) - 1)

    # --- end of turn: is the user's message finished? ------------------------------------

    async def end_of_turn_probability(self, messages: list[ChatMessage], *,
                                      priority: Priority = Priority.VOICE) -> float:
        """How likely the last message (the user's words so far, without final punctuation)
        ends here: P(next token is the chat template's end-of-message token or a sentence's
        final punctuation). A small model that was never trained for this rarely ends a
        message without punctuation, so the punctuation carries the signal: ~0.9 after "What
        is the capital of Germany", ~0.0001 after "What is the capital of" (SmolLM2-135M).
        Runs on the model's own thread; the user is waiting, so it goes first (VOICE).
        Evaluating the user's words here also pre-reads them for the reply's prompt."""
        return await self._run(priority, self._end_of_turn, messages)

    def end_of_turn_tokens(self, messages: list[ChatMessage]) -> tuple[list[int], list[int]]:
        """The prompt up to (not including) the end-of-message token after the last message,
        and the ids of the tokens that end it (end of message, ``?``, ``.``, ``!``)."""
        result = self._prefix_format(messages=list(messages))
        stops = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        marker = stops[0] if stops else self._token_text(self._llama.token_eos())
        cut = result.prompt.rfind(marker)
        if cut < 0:
            raise RuntimeError(f"{self.model_name}: the chat template has no end-of-message token")
        tokens = self._llama.tokenize(result.prompt[:cut].encode(),
                                      add_bos=not result.added_special, special=True)
        marker_tokens = self._llama.tokenize(marker.encode(), add_bos=False, special=True)
        enders = {marker_tokens[0] if len(marker_tokens) == 1 else self._llama.token_eos()}
        for mark in ("?", ".", "!"):
            ids = self._llama.tokenize(mark.encode(), add_bos=False, special=False)
            if len(ids) == 1:
                enders.add(ids[0])
        return tokens, sorted(enders)

    def _end_of_turn(self, messages: list[ChatMessage]) -> float:
        tokens, enders = self.end_of_turn_tokens(messages)
        held = self._restore_best_prefix(tokens)
        if self._llama.n_tokens > held:  # keep the shared prefix, drop the rest
            self._llama._ctx.kv_cache_seq_rm(-1, held, -1)
            self._llama.n_tokens = held
        self.last_prompt_eval_tokens = len(tokens) - held  # the user's words, when all is well
        self._llama.eval(tokens[held:])
        logits = np.ctypeslib.as_array(self._llama._ctx.get_logits(),
                                       shape=(self._llama.n_vocab(),)).astype(np.float64)
        logits -= logits.max()
        weights = np.exp(logits)
        return float(weights[enders].sum() / weights.sum())

    # --- prefix states: the evaluated persona prompt, kept per persona -------------------

    async def warm_prefix(self, key: str, messages: list[ChatMessage], *,
                          priority: Priority = Priority.BACKGROUND) -> None:
        """Evaluate ``messages`` (a persona's system prompt) and keep llama.cpp's state under
        ``key``: a later turn that starts with them re-uses it instead of re-reading them."""
        await self._run(priority, self._warm_prefix, key, messages, Priority(priority))

    def _warm_prefix(self, key: str, messages: list[ChatMessage], priority: Priority) -> None:
        """Evaluate in chunks, so more urgent work waits for one chunk, not the whole prompt."""
        tokens = self.prefix_tokens(messages)
        while True:
            held = _common_prefix(self._llama.input_ids[: self._llama.n_tokens], tokens)
            if held == 0:
                self._llama.reset()
            elif self._llama.n_tokens > held:  # keep what is already evaluated, drop the rest
                self._llama._ctx.kv_cache_seq_rm(-1, held, -1)
                self._llama.n_tokens = held
            if held >= len(tokens) or self._worker.closed:
                break
            if self._worker.more_urgent(priority):
                self._step_aside(priority)
                continue
            self._llama.eval(tokens[held: held + WARM_CHUNK_TOKENS])
        if self._worker.closed:
            return
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

    def has_prefix(self, key: str) -> bool:
        return key in self._prefix_states

    @property
    def prefix_keys(self) -> list[str]:
        return list(self._prefix_states)

    @property
    def prefix_bytes(self) -> int:
        return sum(s.llama_state_size + s.scores.nbytes
                   for s in list(self._prefix_states.values()))

    def prefix_tokens(self, messages: list[ChatMessage]) -> list[int]:
        """The tokens that start every prompt beginning with ``messages``: the formatted chat
        up to (not including) the first user turn, without the assistant header."""
        result = self._prefix_format(messages=list(messages))
        return self._llama.tokenize(result.prompt.encode(), add_bos=not result.added_special,
                                    special=True)


def _report_cancelled(put: Callable[[object], None], job: Future) -> None:
    """A job cancelled before it ran (the model was closed) ends its stream with an error."""
    if job.cancelled():
        try:
            put(RuntimeError("the language model was closed before this reply started"))
            put(_DONE)
        except RuntimeError:  # the event loop is gone: nobody is waiting
            pass


def _cut_after(prompt: str, begun: str) -> str:
    """``prompt`` up to the end of the begun reply ``begun`` (dropping the end-of-message
    token the template puts after it); templates that trim the content are matched trimmed."""
    for text in (begun, begun.strip()):
        at = prompt.rfind(text) if text else -1
        if at >= 0:
            return prompt[: at + len(text)]
    raise ValueError("the chat template dropped the begun reply")


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
