"""Remote LLM first, the local model when the remote one fails: never silence, never silently.

``FallbackChatModel`` is the ChatModel the App uses with ``llm.backend = "openai"``. Each
generation goes to the remote server unless the circuit breaker is open; a remote failure
(unreachable, HTTP error, garbage, no first words in time, a stall mid-reply) is answered by the
local model in the same generation, so the caller sees one stream of deltas. When the remote one
dies mid-reply, a local model that ``continues_replies`` (llama.cpp) reads the partial reply as
the start of its own and goes on from the last word: one coherent answer, and the next words
come after one prompt evaluation instead of after regenerating all that was already said
(which left 4.2 s of silence in scripts/bench_remote.py). Another local model answers the same
prompt; what the remote side already said is not repeated when the local answer begins the
same way, and a "…" line break separates the two otherwise.

After ``breaker_failures`` consecutive failures the breaker opens: turns go straight to the local
model (no timeout to wait out) until ``breaker_reset_s`` has passed, then one turn tries the
remote server again. Every fallback and every breaker change goes to the observer (the App
turns them into events, a /ready/all component, metrics) and to the log.

Persona prefix caching stays with the local model (``warm_prefix`` and friends are delegated),
so a fallback starts warm; the remote server caches prefixes on its own (see remote_llm).

Why not pybreaker/aiobreaker: they guard one call that returns or raises; a streamed reply
succeeds or fails long after it began, and a barge-in that cancels it is neither. The state
machine below is the whole of it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from enum import StrEnum
from typing import Any

import structlog

from companion.stages.llm import ChatMessage, ChatModel, GenerationStats, Priority, SamplingParams
from companion.stages.remote_llm import RemoteChatModel, RemoteLLMError

log = structlog.get_logger(__name__)

SEPARATOR = "…\n"  # ends the remote's cut-off sentence before the local answer (a sentence break)

Observer = Callable[..., None]  # observer(kind, **data): kind = "fallback" | "breaker"


class BreakerState(StrEnum):
    CLOSED = "closed"  # remote in use
    OPEN = "open"  # remote skipped until the reset time
    HALF_OPEN = "half-open"  # one trial generation is trying the remote again


class CircuitBreaker:
    def __init__(self, *, failures: int, reset_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[BreakerState, BreakerState], None] | None = None) -> None:
        self.failures_to_open = failures
        self.reset_s = reset_s
        self.clock = clock
        self.on_change = on_change
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._trial = False

    def allow(self) -> bool:
        """May this generation use the remote server? (An open breaker lets one trial through
        once ``reset_s`` has passed.)"""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self.clock() - self.opened_at >= self.reset_s:
            self._set(BreakerState.HALF_OPEN)
        if self.state is BreakerState.HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self._trial = False
        self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        self.failures += 1
        self._trial = False
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.failures_to_open:
            self.opened_at = self.clock()
            self._set(BreakerState.OPEN)

    def abandon(self) -> None:
        """The generation was cancelled (barge-in, client gone): it proves nothing either way."""
        if self._trial:
            self._trial = False
            self._set(BreakerState.OPEN)  # opened_at unchanged: the next turn tries again

    def _set(self, state: BreakerState) -> None:
        previous, self.state = self.state, state
        if previous is not state and self.on_change is not None:
            self.on_change(previous, state)


class FallbackChatModel:
    """``ChatModel``: ``remote`` first, ``local`` on failure; see the module docstring."""

    def __init__(self, remote: RemoteChatModel | Any, local: ChatModel | Any, *,
                 failures: int = 2, reset_s: float = 30.0, fallback: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.remote = remote
        self.fallback = fallback  # False: a remote failure is raised, the local model stays quiet
        self.local = local
        self.observers: list[Observer] = []
        self.breaker = CircuitBreaker(failures=failures, reset_s=reset_s, clock=clock,
                                      on_change=self._breaker_changed)
        self.model_name = remote.model_name
        self.context_length = local.context_length
        self.fallbacks = 0
        self.last_source: str | None = None  # "remote" | "local": who wrote the last reply

    # --- what the local model keeps doing ------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return self.local.count_tokens(text)

    def __getattr__(self, name: str) -> Any:
        # persona prefix caching (warm_prefix, load_prefix, has_prefix, drop_prefix, ...) stays
        # on the local model, which keeps the fallback warm
        if name.startswith("_") or name in ("remote", "local"):
            raise AttributeError(name)
        return getattr(self.local, name)

    def close(self) -> None:
        close = getattr(self.local, "close", None)
        if close is not None:
            close()

    async def aclose(self) -> None:
        close = getattr(self.remote, "aclose", None)
        if close is not None:
            await close()

    # --- generation ------------------------------------------------------------------------------

    async def stream(
        self, messages: list[ChatMessage], params: SamplingParams,
        stats: GenerationStats | None = None, *, priority: Priority = Priority.INTERACTIVE,
    ) -> AsyncIterator[str]:
        stats = stats if stats is not None else GenerationStats()
        said: list[str] = []
        if not self.fallback:  # nothing to fall back to: no breaker, every turn tries the remote
            async for delta in self.remote.stream(messages, params, stats, priority=priority):
                yield delta
            self.last_source = "remote"
            return
        if not self.breaker.allow():
            reason, detail = "breaker_open", f"breaker open since {self.breaker.failures} failures"
        else:
            try:
                async for delta in self.remote.stream(messages, params, stats, priority=priority):
                    said.append(delta)
                    yield delta
            except RemoteLLMError as exc:
                self.breaker.failure()
                reason, detail = exc.reason, str(exc)
            except BaseException:  # cancelled, or the consumer stopped reading: no verdict
                self.breaker.abandon()
                raise
            else:
                self.breaker.success()
                self.last_source = "remote"
                return
        self.fallbacks += 1
        self.last_source = "local"
        partial = "".join(said)
        log.warning("remote LLM failed; the local model answers", reason=reason, detail=detail,
                    remote=self.model_name, local=getattr(self.local, "model_name", "?"),
                    partial_chars=len(partial), breaker=str(self.breaker.state))
        self._notify("fallback", reason=reason, detail=detail, partial_chars=len(partial),
                     breaker=str(self.breaker.state))
        if partial.strip() and getattr(self.local, "continues_replies", False):
            # the local model reads what was said as the start of its own reply and goes on
            # from the last word: no sentence said twice, no silence while it catches up
            # within the reply's budget: what the remote said counts
            rest = replace(params, max_tokens=max(1, params.max_tokens - stats.completion_tokens))
            begun: ChatMessage = {"role": "assistant", "content": partial}
            local = self.local.stream([*messages, begun], rest, stats, priority=priority)
        else:
            local = _after(self.local.stream(messages, params, stats, priority=priority), partial)
        async for delta in local:
            yield delta

    # --- observers -------------------------------------------------------------------------------

    def add_observer(self, observer: Observer) -> None:
        self.observers.append(observer)

    def _breaker_changed(self, previous: BreakerState, state: BreakerState) -> None:
        log_fn = log.info if state is BreakerState.CLOSED else log.warning
        log_fn("remote LLM circuit breaker", previous=str(previous), state=str(state),
               remote=self.model_name)
        self._notify("breaker", state=str(state), previous=str(previous))

    def _notify(self, kind: str, **data: Any) -> None:
        for observer in list(self.observers):
            try:
                observer(kind, **data)
            except Exception:  # an observer's bug must not break a reply
                log.exception("LLM fallback observer failed", kind=kind)


async def _after(deltas: AsyncIterator[str], said: str) -> AsyncIterator[str]:
    """The local reply, minus what the remote one already said when it begins the same way."""
    if not said:
        async for delta in deltas:
            yield delta
        return
    text, following = "", False
    async for delta in deltas:
        if following:
            yield delta
            continue
        text += delta
        if said.startswith(text):
            continue  # still repeating what was said
        following = True
        yield text[len(said):] if text.startswith(said) else SEPARATOR + text
