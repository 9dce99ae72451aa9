"""Conversations: one engine for voice turns, HTTP chat and control-plane commands.

It owns the active persona and session, builds each prompt (persona prompt, summary of older
turns, the newest turns that fit the token budget, the user's words), streams the LLM, and
records the finished turn in the store in one transaction. Persona switches happen between
turns under a lock, so a turn never sees half a switch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import structlog

from companion.events import EventBus, EventType
from companion.personas import Persona, PersonaLibrary
from companion.settings import LlmSettings
from companion.stages.llm import ChatMessage, ChatModel, GenerationStats, SamplingParams
from companion.store import Message, Store, new_id

log = structlog.get_logger(__name__)

ACTIVE_PERSONA_KEY = "active_persona_id"
ACTIVE_SESSION_KEY = "active_session_id"

SUMMARY_PROMPT = (
    "Summarize the conversation below in at most three short sentences. Keep names, facts, "
    "times and anything the user asked to remember."
)


class SessionNotFoundError(LookupError):
    pass


class PersonaNotFoundError(LookupError):
    pass


@dataclass
class Reply:
    turn_id: str
    session_id: str
    persona_id: str
    user_text: str
    text: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)
    started_at: float = field(default_factory=time.time)
    latency_ms: float = 0.0
    completed: bool = False


@dataclass(frozen=True)
class SwitchResult:
    previous_persona_id: str
    new_persona_id: str
    session_id: str
    switch_latency_ms: float
    preserved_context: bool


def fit_history(
    messages: Sequence[Message], budget_tokens: int, count: Callable[[str], int]
) -> tuple[list[Message], list[Message]]:
    """Split into (kept, overflow): the newest whole turns whose tokens fit ``budget_tokens``
    are kept, in order; everything older overflows (to be summarized)."""
    kept: list[Message] = []
    used = 0
    for message in reversed(messages):
        tokens = message.tokens or count(message.content)
        if used + tokens > budget_tokens:
            break
        used += tokens
        kept.append(message)
    kept.reverse()
    # never start the kept window with an assistant message cut from its question
    while kept and kept[0].role == "assistant":
        kept.pop(0)
    overflow = list(messages[: len(messages) - len(kept)])
    return kept, overflow


class ConversationManager:
    def __init__(
        self, *, llm: ChatModel, store: Store, personas: PersonaLibrary, settings: LlmSettings,
        bus: EventBus, default_persona: str,
    ) -> None:
        self.llm = llm
        self.store = store
        self.personas = personas
        self.settings = settings
        self.bus = bus
        self._switch_lock = asyncio.Lock()
        self._summaries: dict[str, asyncio.Task[None]] = {}
        self._llm_context_persona: str | None = None
        stored = store.get_value(ACTIVE_PERSONA_KEY)
        if stored not in personas:
            stored = default_persona if default_persona in personas else (personas.ids() or [None])[0]
        if stored is None:
            raise PersonaNotFoundError("no valid persona in the library")
        self.active_persona_id: str = stored
        self.active_session_id: str | None = store.get_value(ACTIVE_SESSION_KEY)
        if self.active_session_id and store.get_session(self.active_session_id,
                                                        with_messages=False) is None:
            self.active_session_id = None

    # --- personas -----------------------------------------------------------------------------

    @property
    def active_persona(self) -> Persona:
        persona = self.personas.get(self.active_persona_id)
        if persona is None:  # removed by a reload: fall back to any good one
            self.active_persona_id = self.personas.ids()[0]
            persona = self.personas.get(self.active_persona_id)
        assert persona is not None
        return persona

    def persona_messages(self, persona: Persona) -> list[ChatMessage]:
        prompt = persona.full_system_prompt(with_character=self.settings.character_in_prompt)
        return [{"role": "system", "content": prompt}]

    async def warm_personas(self) -> None:
        """Evaluate every persona's prompt once, in the background at start, so a switch or a
        first turn does not wait for the LLM to read it."""
        for persona in [self.active_persona, *self.personas.all()]:
            if not self.llm.has_prefix(persona.id):
                await self.llm.warm_prefix(persona.id, self.persona_messages(persona))
        await self._use_persona_prefix(self.active_persona)

    async def switch_persona(
        self, target_id: str, *, preserve_context: bool = True
    ) -> SwitchResult:
        started = time.perf_counter()
        async with self._switch_lock:
            target = self.personas.get(target_id)
            if target is None:
                raise PersonaNotFoundError(f"unknown persona {target_id!r}")
            previous = self.active_persona_id
            if not self.llm.has_prefix(target.id):
                await self.llm.warm_prefix(target.id, self.persona_messages(target))
            await self._use_persona_prefix(target)
            session_id = await self._session_after_switch(target.id, preserve_context)
            self.active_persona_id = target.id
            await self.store.run(self.store.set_value, ACTIVE_PERSONA_KEY, target.id)
        latency_ms = (time.perf_counter() - started) * 1000
        self.bus.emit(EventType.PERSONA_SWITCHED, previous=previous, persona_id=target.id,
                      session_id=session_id, latency_ms=latency_ms,
                      preserve_context=preserve_context)
        log.info("persona switched", previous=previous, persona_id=target.id,
                 latency_ms=round(latency_ms, 1))
        return SwitchResult(previous, target.id, session_id, latency_ms, preserve_context)

    async def _session_after_switch(self, persona_id: str, preserve: bool) -> str:
        if preserve and self.active_session_id:
            await self.store.run(self.store.set_session_persona, self.active_session_id,
                                 persona_id)
            return self.active_session_id
        return await self.new_active_session(persona_id)

    async def _use_persona_prefix(self, persona: Persona) -> None:
        if self._llm_context_persona != persona.id and self.llm.has_prefix(persona.id):
            await asyncio.to_thread(self.llm.load_prefix, persona.id)
            self._llm_context_persona = persona.id

    # --- sessions -----------------------------------------------------------------------------

    async def new_active_session(self, persona_id: str | None = None) -> str:
        session = await self.store.run(self.store.create_session,
                                       persona_id or self.active_persona_id)
        self.active_session_id = session.id
        await self.store.run(self.store.set_value, ACTIVE_SESSION_KEY, session.id)
        return session.id

    async def active_session(self) -> str:
        if self.active_session_id is None:
            return await self.new_active_session()
        return self.active_session_id

    async def end_active_session(self) -> None:
        self.active_session_id = None
        await self.store.run(self.store.set_value, ACTIVE_SESSION_KEY, None)

    async def adopt_session(self, session_id: str, persona_id: str) -> None:
        """Make an imported session the active one (handoff in)."""
        if persona_id in self.personas and persona_id != self.active_persona_id:
            await self.switch_persona(persona_id, preserve_context=True)
        self.active_session_id = session_id
        await self.store.run(self.store.set_value, ACTIVE_SESSION_KEY, session_id)

    # --- replies ------------------------------------------------------------------------------

    async def respond(
        self, text: str, *, reply: Reply | None = None, session_id: str | None = None,
        new_session: bool = False, source: str = "voice", turn_id: str | None = None,
        system_prompt: str | None = None, temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> AsyncIterator[str]:
        """Stream the reply's deltas. ``reply`` (if given) is filled in as it goes; the turn is
        recorded when generation completes, not when it is cancelled."""
        async with self._switch_lock:
            persona = self.active_persona
            if session_id is not None:
                session = await self.store.run(self.store.get_session, session_id,
                                           with_messages=False)
                if session is None:
                    raise SessionNotFoundError(f"no conversation {session_id!r}")
                persona = self.personas.get(session.persona_id) or persona
            elif new_session:
                session_id = (await self.store.run(self.store.create_session, persona.id)).id
            else:
                session_id = await self.active_session()
            if system_prompt is None:
                await self._use_persona_prefix(persona)
            else:
                self._llm_context_persona = None
        turn_id = turn_id or new_id("turn")
        reply = reply or Reply(turn_id, session_id, persona.id, text)
        reply.turn_id, reply.session_id, reply.persona_id, reply.user_text = (
            turn_id, session_id, persona.id, text)
        messages, overflow = await self._build_prompt(session_id, persona, text, system_prompt)
        behavior = persona.behavior_config
        params = SamplingParams(
            temperature=behavior.temperature if temperature is None else temperature,
            max_tokens=behavior.max_tokens if max_tokens is None else max_tokens,
            top_p=self.settings.top_p, repeat_penalty=self.settings.repeat_penalty,
        )
        started = time.perf_counter()
        parts: list[str] = []
        async for delta in self.llm.stream(messages, params, reply.stats):
            parts.append(delta)
            reply.text = "".join(parts)
            yield delta
        reply.text = "".join(parts).strip()
        reply.latency_ms = (time.perf_counter() - started) * 1000
        await self.store.run(
            lambda: self.store.record_turn(
                session_id, turn_id, text, reply.text, persona_id=persona.id, source=source,
                user_tokens=self.llm.count_tokens(text),
                reply_tokens=reply.stats.completion_tokens or self.llm.count_tokens(reply.text),
                latency={"llm_ms": round(reply.latency_ms, 1),
                         "first_token_ms": round((reply.stats.first_token_s or 0) * 1000, 1)},
            )
        )
        reply.completed = True
        if overflow and self.settings.summary_enabled:
            self._schedule_summary(session_id)

    async def reply_text(self, text: str, **kwargs) -> Reply:
        """The whole reply at once (CLI, non-streaming HTTP)."""
        reply = Reply("", "", "", text)
        async for _ in self.respond(text, reply=reply, **kwargs):
            pass
        return reply

    async def _build_prompt(
        self, session_id: str, persona: Persona, text: str, system_prompt: str | None
    ) -> tuple[list[ChatMessage], list[Message]]:
        session = await self.store.run(self.store.get_session, session_id,
                                           with_messages=False)
        assert session is not None
        history = await self.store.run(
            lambda: self.store.messages(session_id, after_id=session.summarized_upto))
        kept, overflow = fit_history(history, self.settings.history_token_budget,
                                     self.llm.count_tokens)
        messages: list[ChatMessage] = (
            [{"role": "system", "content": system_prompt}] if system_prompt is not None
            else self.persona_messages(persona)
        )
        if session.summary:
            messages.append({"role": "system",
                             "content": f"Earlier in this conversation: {session.summary}"})
        messages.extend({"role": m.role, "content": m.content} for m in kept)  # type: ignore[misc]
        messages.append({"role": "user", "content": text})
        return messages, overflow

    # --- summaries ------------------------------------------------------------------------------

    def _schedule_summary(self, session_id: str) -> None:
        running = self._summaries.get(session_id)
        if running is not None and not running.done():
            return
        task = asyncio.create_task(self.summarize(session_id), name=f"summary-{session_id}")
        self._summaries[session_id] = task
        task.add_done_callback(lambda t: self._summaries.pop(session_id, None))

    async def summarize(self, session_id: str) -> bool:
        """Fold the turns that no longer fit the budget into the session's summary."""
        session = await self.store.run(self.store.get_session, session_id,
                                           with_messages=False)
        if session is None:
            return False
        history = await self.store.run(
            lambda: self.store.messages(session_id, after_id=session.summarized_upto))
        _, overflow = fit_history(history, self.settings.history_token_budget,
                                  self.llm.count_tokens)
        if not overflow:
            return False
        transcript = "\n".join(f"{m.role}: {m.content}" for m in overflow)
        if session.summary:
            transcript = f"Summary so far: {session.summary}\n{transcript}"
        messages: list[ChatMessage] = [{"role": "system", "content": SUMMARY_PROMPT},
                                       {"role": "user", "content": transcript}]
        try:
            parts = [d async for d in self.llm.stream(
                messages, SamplingParams(temperature=0.0, max_tokens=120))]
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("summary failed", session_id=session_id)
            return False
        finally:
            self._llm_context_persona = None
        summary = "".join(parts).strip()
        if summary:
            await self.store.run(self.store.set_summary, session_id, summary, overflow[-1].id)
            log.info("session summarized", session_id=session_id, folded=len(overflow))
        return bool(summary)

    async def wait_for_summaries(self) -> None:
        if self._summaries:
            await asyncio.gather(*self._summaries.values(), return_exceptions=True)
