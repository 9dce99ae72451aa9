"""Conversations: one engine for voice turns, HTTP chat and control-plane commands.

It owns the active persona and session, builds each prompt (persona prompt, summary of older
turns, the newest turns that fit the token budget, the user's words), streams the LLM, and
records the finished turn in the store in one transaction. Persona switches happen between
turns under a lock, so a turn never sees half a switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from companion.events import EventBus, EventType
from companion.personas import Persona, PersonaLibrary
from companion.settings import LlmSettings
from companion.stages.llm import ChatMessage, ChatModel, GenerationStats, Priority, SamplingParams
from companion.stages.tts import VoiceParams
from companion.store import Message, Store, new_id

log = structlog.get_logger(__name__)

ACTIVE_PERSONA_KEY = "active_persona_id"
ACTIVE_SESSION_KEY = "active_session_id"

SUMMARY_PROMPT = (
    "Summarize the conversation below in at most three short sentences. Keep names, facts, "
    "times and anything the user asked to remember."
)
# after a fold, the turns left unsummarized take at most this share of the history budget:
# the start of the prompt then stays the same for several turns, and llama.cpp re-uses it
KEEP_AFTER_SUMMARY = 0.5
CONTEXT_RESERVE_TOKENS = 512  # persona prompt, summary and the user's words, in the window
SUMMARY_CHUNK_TOKENS = 600  # turns folded per LLM call (keeps the summary prompt small)
MESSAGE_OVERHEAD_TOKENS = 4  # chat-template tokens around each message
NEXT_TURN_KEY = "@next-turn"  # LLM state: persona + summary + history, evaluated ahead of a turn


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
    voice: VoiceParams = field(default_factory=VoiceParams)  # the new persona's voice
    transition_message: str | None = None  # what the caller should say, in ``voice``
    prefix_was_warm: bool = True  # False: the persona prompt is evaluated after the switch

    def as_dict(self) -> dict:
        return {"success": True, "previous_persona_id": self.previous_persona_id,
                "new_persona_id": self.new_persona_id, "session_id": self.session_id,
                "switch_latency_ms": round(self.switch_latency_ms, 2),
                "preserve_context": self.preserved_context}


class Speaker(Protocol):
    async def say(self, text: str, voice: VoiceParams, **kwargs: Any) -> Any: ...


def fit_history(
    messages: Sequence[Message], budget_tokens: int, count: Callable[[str], int]
) -> tuple[list[Message], list[Message]]:
    """Split into (kept, overflow): the newest whole turns whose tokens fit ``budget_tokens``
    are kept, in order; everything older overflows (to be summarized)."""
    kept: list[Message] = []
    used = 0
    for message in reversed(messages):
        tokens = message_tokens(message, count)
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


def message_tokens(message: Message, count: Callable[[str], int]) -> int:
    return (message.tokens or count(message.content)) + MESSAGE_OVERHEAD_TOKENS


def prefix_key(persona: Persona, messages: Sequence[ChatMessage]) -> str:
    """The LLM state key of a persona's prompt: its id and a hash of the prompt, so an edited
    persona file (reload) never re-uses the state of its old prompt."""
    digest = hashlib.sha256("\x00".join(m["content"] for m in messages).encode()).hexdigest()
    return f"{persona.id}:{digest[:12]}"


class ConversationManager:
    """The active persona and session, and every turn's prompt, reply and record."""

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
        self._summaries: dict[str, asyncio.Task[bool]] = {}
        self._warming: asyncio.Task[None] | None = None
        self._preparing: asyncio.Task[None] | None = None
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        first = default_persona if default_persona in personas else (personas.ids() or [None])[0]
        if first is None:
            raise PersonaNotFoundError("no valid persona in the library")
        self.active_persona_id: str = first  # until start() reads the stored one
        self.active_session_id: str | None = None

    async def start(self) -> None:
        """Take up the persona and session that were active before the restart (read in a
        worker thread: the event loop never waits on the disk)."""
        def read() -> tuple[str | None, str | None]:
            session_id = self.store.get_value(ACTIVE_SESSION_KEY)
            if session_id and self.store.get_session(session_id, with_messages=False) is None:
                session_id = None
            return self.store.get_value(ACTIVE_PERSONA_KEY), session_id

        persona_id, self.active_session_id = await self.store.run(read)
        if persona_id in self.personas:
            self.active_persona_id = persona_id

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
        messages: list[ChatMessage] = [{"role": "system", "content": prompt}]
        for example in persona.examples:
            messages.append({"role": "user", "content": example.user})
            messages.append({"role": "assistant", "content": example.assistant})
        return messages

    def _prefix_key(self, persona: Persona) -> str:
        return prefix_key(persona, self.persona_messages(persona))

    def prefix_ready(self, persona_id: str) -> bool:
        """True when the persona's prompt is already evaluated and kept by the LLM."""
        persona = self.personas.get(persona_id)
        has = getattr(self.llm, "has_prefix", None)
        return persona is not None and has is not None and has(self._prefix_key(persona))

    async def _warm(self, persona: Persona, priority: Priority = Priority.BACKGROUND) -> bool:
        """Evaluate the persona's prompt unless the LLM keeps it; True if it had to."""
        warm = getattr(self.llm, "warm_prefix", None)
        if warm is None or self.prefix_ready(persona.id):
            return False
        started = time.perf_counter()
        await warm(self._prefix_key(persona), self.persona_messages(persona), priority=priority)
        log.info("persona prompt evaluated", persona_id=persona.id,
                 took_ms=round((time.perf_counter() - started) * 1000, 1))
        return True

    async def warm_personas(self) -> None:
        """Evaluate every persona's prompt once, in the background at start (active one
        first), so a first turn does not wait for the LLM to read it. At BACKGROUND priority:
        a turn, or the warm-up after a switch, goes first."""
        for persona in [self.active_persona, *self.personas.all()]:
            await self._warm(persona)

    def personas_reloaded(self) -> None:
        """After the library was re-read: warm the personas whose prompt is new or changed
        (in the background; a state of an old prompt is never used for a new one). Safe to
        call from a worker thread (the HTTP API reloads in one)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._start_warming)
            return
        self._start_warming()

    def _start_warming(self) -> None:
        if self._warming is None or self._warming.done():
            self._warming = asyncio.create_task(self._warm_quietly(), name="warm-personas")

    async def _warm_quietly(self) -> None:
        try:
            await self.warm_personas()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("warming persona prompts failed")

    async def switch_persona(
        self, target_id: str, *, preserve_context: bool = True,
        transition_message: str | None = None,
    ) -> SwitchResult:
        """Make ``target_id`` the persona of the next turn: prompt, voice and behaviour change
        together under the lock (a turn already streaming finishes as it began).
        ``preserve_context`` keeps the session; otherwise a new one starts. The caller speaks
        ``result.transition_message`` in ``result.voice`` (see ``announce_switch``).

        The switch never waits for the LLM: the new persona's prompt (and the kept history
        under it) is evaluated afterwards, ahead of background work, while the transition
        message plays; a turn that comes sooner re-uses whatever part is evaluated."""
        started = time.perf_counter()
        async with self._switch_lock:
            target = self.personas.get(target_id)
            if target is None:
                raise PersonaNotFoundError(f"unknown persona {target_id!r}")
            previous = self.active_persona_id
            was_warm = self.prefix_ready(target.id)
            session_id = await self._session_after_switch(target.id, preserve_context)
            self.active_persona_id = target.id
            await self.store.run(self.store.set_value, ACTIVE_PERSONA_KEY, target.id)
            self._prepare_in_background(session_id if preserve_context else None, target)
        latency_ms = (time.perf_counter() - started) * 1000
        self.bus.emit(EventType.PERSONA_SWITCHED, previous=previous, persona_id=target.id,
                      session_id=session_id, latency_ms=latency_ms,
                      preserve_context=preserve_context)
        log.info("persona switched", previous=previous, persona_id=target.id,
                 latency_ms=round(latency_ms, 1), cold=not was_warm)
        return SwitchResult(previous, target.id, session_id, latency_ms, preserve_context,
                            target.voice_config.params(), transition_message or None,
                            was_warm)

    async def _session_after_switch(self, persona_id: str, preserve: bool) -> str:
        if preserve and self.active_session_id:
            await self.store.run(self.store.set_session_persona, self.active_session_id,
                                 persona_id)
            return self.active_session_id
        return await self.new_active_session(persona_id)

    # --- sessions -----------------------------------------------------------------------------

    async def new_active_session(self, persona_id: str | None = None) -> str:
        session = await self.store.run(self.store.create_session,
                                       persona_id or self.active_persona_id)
        self.active_session_id = session.id
        await self.store.run(self.store.set_value, ACTIVE_SESSION_KEY, session.id)
        return session.id

    async def active_session(self) -> str:
        """The session of the next turn; a new one when there is none or it was forgotten."""
        if self.active_session_id is not None and await self.store.run(
                self.store.get_session, self.active_session_id, with_messages=False) is not None:
            return self.active_session_id
        return await self.new_active_session()

    async def forget_session(self, session_id: str) -> bool:
        """DELETE a session for real (turns and summary); the next turn starts a new one."""
        running = self._summaries.get(session_id)
        if running is not None and not running.done():
            running.cancel()
            await asyncio.wait([running])
        deleted = await self.store.run(self.store.delete_session, session_id)
        if session_id == self.active_session_id:
            await self.end_active_session()
        return deleted

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
        max_tokens: int | None = None, latency: dict[str, float] | None = None,
        priority: Priority = Priority.INTERACTIVE,
        before_record: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[str]:
        """Stream the reply's deltas. ``reply`` (if given) is filled in as it goes; the turn
        (user words and reply together) is recorded when generation completes, not when it is
        cancelled. ``latency`` adds the caller's timings (e.g. stt_ms) to the record.
        ``priority``: VOICE for a person talking to the device, INTERACTIVE otherwise.
        ``before_record`` is awaited between the last delta and the record: a speculative
        answer holds there until the turn is really the user's (cancelled: nothing is kept)."""
        async with self._switch_lock:  # one consistent persona + session for the whole turn
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
        turn_id = turn_id or new_id("turn")
        reply = reply or Reply(turn_id, session_id, persona.id, text)
        reply.turn_id, reply.session_id, reply.persona_id, reply.user_text = (
            turn_id, session_id, persona.id, text)
        await self._pause_summary(session_id)
        behavior = persona.behavior_config
        params = SamplingParams(
            temperature=behavior.temperature if temperature is None else temperature,
            max_tokens=behavior.reply_tokens(text) if max_tokens is None else max_tokens,
            top_p=self.settings.top_p, repeat_penalty=self.settings.repeat_penalty,
        )
        messages, overflow = await self._build_prompt(session_id, persona, text, system_prompt,
                                                      params.max_tokens)
        started = time.perf_counter()
        parts: list[str] = []
        stream = self.llm.stream(messages, params, reply.stats, priority=priority)
        async with contextlib.aclosing(stream):  # closing us stops the LLM at its next token
            async for delta in stream:
                parts.append(delta)
                reply.text = "".join(parts)
                yield delta
        reply.text = "".join(parts).strip()
        reply.latency_ms = (time.perf_counter() - started) * 1000
        if before_record is not None:
            await before_record()
        timings = {"llm_ms": round(reply.latency_ms, 1),
                   "first_token_ms": round((reply.stats.first_token_s or 0) * 1000, 1),
                   "prompt_tokens": reply.stats.prompt_tokens,
                   "cached_prompt_tokens": reply.stats.cached_prompt_tokens,
                   **(latency or {})}
        user_tokens, reply_tokens = await asyncio.to_thread(
            lambda: (self.llm.count_tokens(text),
                     reply.stats.completion_tokens or self.llm.count_tokens(reply.text)))
        await self.store.run(
            lambda: self.store.record_turn(
                session_id, turn_id, text, reply.text, persona_id=persona.id, source=source,
                user_tokens=user_tokens, reply_tokens=reply_tokens, latency=timings))
        reply.completed = True
        self.bus.emit(EventType.EXCHANGE_RECORDED, turn_id, session_id=session_id,
                      persona_id=persona.id, source=source, user_text=text, reply=reply.text,
                      tokens=reply.stats.total_tokens)
        if overflow and self.settings.summary_enabled:
            self._schedule_summary(session_id)

    async def keep_played(self, reply: Reply, played: str, *, source: str = "voice") -> None:
        """A barge-in cut the reply: remember only the words the user heard, marked
        interrupted, so the next turn does not build on words that were never said."""
        if not reply.session_id:
            return  # cut before the turn had a session: nothing was said
        await self.store.run(lambda: self.store.keep_played(
            reply.session_id, reply.turn_id, reply.user_text, played,
            persona_id=reply.persona_id, source=source))
        self.bus.emit(EventType.REPLY_INTERRUPTED, reply.turn_id, session_id=reply.session_id,
                      played=played)

    async def reply_text(self, text: str, **kwargs: Any) -> Reply:
        """The whole reply at once (CLI, non-streaming HTTP)."""
        reply = Reply("", "", "", text)
        async for _ in self.respond(text, reply=reply, **kwargs):
            pass
        return reply

    async def _history(self, session_id: str) -> tuple[str, list[Message]] | None:
        """The session's summary and the messages not folded into it."""
        def read() -> tuple[str, list[Message]] | None:
            session = self.store.get_session(session_id, with_messages=False)
            if session is None:
                return None
            return session.summary, self.store.messages(session_id,
                                                        after_id=session.summarized_upto)
        return await self.store.run(read)

    async def _build_prompt(
        self, session_id: str, persona: Persona, text: str, system_prompt: str | None,
        max_tokens: int,
    ) -> tuple[list[ChatMessage], list[Message]]:
        found = await self._history(session_id)
        if found is None:
            raise SessionNotFoundError(f"no conversation {session_id!r}")
        summary, history = found
        kept, overflow = await asyncio.to_thread(self._window, history, max_tokens)
        messages = self._context(persona, summary, kept, system_prompt)
        messages.append({"role": "user", "content": persona.behavior_config.user_turn(text)})
        return messages, overflow

    async def voice_context(self) -> list[ChatMessage]:
        """Everything of the next voice turn's prompt before the user's words. The end-of-turn
        check reads the user's words after exactly these, so the reply's prompt re-uses them."""
        persona = self.active_persona
        found = await self._history(await self.active_session())
        summary, history = found if found is not None else ("", [])
        kept, _ = self._window(history, persona.behavior_config.max_tokens)
        return self._context(persona, summary, kept)

    def _window(self, history: Sequence[Message],
                max_tokens: int) -> tuple[list[Message], list[Message]]:
        """(turns in the prompt, turns to fold into the summary).

        ``llm.history_token_budget`` decides what gets summarized; until the summary is written,
        the prompt keeps those turns as long as the context window has room. Dropping them at
        once would change the start of every prompt, and llama.cpp would re-read the whole
        history each turn (measured: first token 1.6-2.2 s instead of ~0.1 s)."""
        count = self.llm.count_tokens
        hard = self.settings.history_token_budget
        if self.settings.summary_enabled:  # a summary will replace the old turns: keep them till then
            hard = max(hard, self.llm.context_length - CONTEXT_RESERVE_TOKENS - max_tokens)
        kept, _ = fit_history(history, hard, count)
        _, overflow = fit_history(history, self.settings.history_token_budget, count)
        return kept, overflow

    def _context(self, persona: Persona, summary: str, kept: Sequence[Message],
                 system_prompt: str | None = None) -> list[ChatMessage]:
        """Everything of a prompt before the user's new words."""
        messages: list[ChatMessage] = (
            [{"role": "system", "content": system_prompt}] if system_prompt is not None
            else self.persona_messages(persona)
        )
        if summary:
            messages.append({"role": "system",
                             "content": f"Earlier in this conversation: {summary}"})
        messages.extend({"role": m.role, "content": m.content} for m in kept)  # type: ignore[misc]
        return messages

    async def prepare_next_turn(self, session_id: str, persona: Persona | None = None, *,
                                priority: Priority = Priority.BACKGROUND) -> bool:
        """Evaluate the next turn's context (persona prompt, summary, kept history) now, while
        the user is listening or thinking, so the turn reads only its new words. Used after a
        summary changed the prompt's start and after a switch that keeps the history."""
        warm = getattr(self.llm, "warm_prefix", None)
        found = await self._history(session_id)
        if warm is None or found is None:
            return False
        summary, history = found
        persona = persona or self.active_persona
        kept, _ = await asyncio.to_thread(self._window, history,
                                          persona.behavior_config.max_tokens)
        if not summary and not kept:
            return False  # the persona's own prefix state covers it
        await warm(NEXT_TURN_KEY, self._context(persona, summary, kept), priority=priority)
        return True

    def _prepare_in_background(self, session_id: str | None, persona: Persona) -> None:
        """After a switch: the persona's prompt, then (``session_id``) the kept history under
        it, at INTERACTIVE priority (before the warm-up of other personas)."""
        if self._preparing is not None and not self._preparing.done():
            self._preparing.cancel()
        self._preparing = asyncio.create_task(self._prepare_quietly(session_id, persona),
                                              name="prepare-next-turn")

    async def wait_prepared(self) -> None:
        """Wait for the evaluation that follows a switch (benchmarks, tests)."""
        if self._preparing is not None:
            await asyncio.wait([self._preparing])

    async def _prepare_quietly(self, session_id: str | None, persona: Persona) -> None:
        try:
            await self._warm(persona, Priority.INTERACTIVE)
            if session_id is not None:
                await self.prepare_next_turn(session_id, persona, priority=Priority.INTERACTIVE)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("preparing the next turn failed", session_id=session_id)

    # --- summaries ------------------------------------------------------------------------------

    def _schedule_summary(self, session_id: str) -> None:
        running = self._summaries.get(session_id)
        if running is not None and not running.done():
            return
        task = asyncio.create_task(self.summarize(session_id), name=f"summary-{session_id}")
        self._summaries[session_id] = task
        task.add_done_callback(lambda t: self._summaries.pop(session_id, None)
                               if self._summaries.get(session_id) is t else None)

    async def _pause_summary(self, session_id: str) -> None:
        """A new turn goes before a background summary: stop it at its next token (it is
        scheduled again when the turn is recorded)."""
        running = self._summaries.get(session_id)
        if running is not None and not running.done():
            running.cancel()
            await asyncio.wait([running])

    async def summarize(self, session_id: str) -> bool:
        """Fold the oldest turns into the session's summary until the rest takes at most
        KEEP_AFTER_SUMMARY of the history budget. True if the summary changed."""
        keep_budget = int(self.settings.history_token_budget * KEEP_AFTER_SUMMARY)
        changed = False
        while True:
            found = await self._history(session_id)
            if found is None:
                return changed
            summary, history = found
            chunk = await asyncio.to_thread(self._summary_chunk, history, keep_budget)
            if not chunk:
                if changed and session_id == self.active_session_id:
                    await self.prepare_next_turn(session_id)
                return changed
            new_summary = await self._write_summary(summary, chunk)
            if not new_summary:
                return changed
            await self.store.run(self.store.set_summary, session_id, new_summary, chunk[-1].id)
            changed = True
            log.info("session summarized", session_id=session_id, folded=len(chunk))

    def _summary_chunk(self, history: Sequence[Message], keep_budget: int) -> list[Message]:
        """The oldest whole turns to fold next (a bounded piece per LLM call); [] when the
        rest fits ``keep_budget``. Counts tokens: call in a worker thread."""
        _, overflow = fit_history(history, keep_budget, self.llm.count_tokens)
        chunk: list[Message] = []
        used = 0
        for message in overflow:
            used += message_tokens(message, self.llm.count_tokens)
            if chunk and used > SUMMARY_CHUNK_TOKENS:
                break
            chunk.append(message)
        while len(chunk) > 1 and chunk[-1].role == "user":  # fold whole turns
            chunk.pop()
        return chunk

    async def _write_summary(self, summary: str, chunk: Sequence[Message]) -> str:
        transcript = "\n".join(f"{m.role}: {m.content}" for m in chunk)
        if summary:
            transcript = f"Summary so far: {summary}\n{transcript}"
        messages: list[ChatMessage] = [{"role": "system", "content": SUMMARY_PROMPT},
                                       {"role": "user", "content": transcript}]
        try:
            parts = [d async for d in self.llm.stream(
                messages, SamplingParams(temperature=0.0, max_tokens=120),
                priority=Priority.BACKGROUND)]
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("summary failed")
            return ""
        return " ".join("".join(parts).split())

    async def wait_for_summaries(self) -> None:
        if self._summaries:
            await asyncio.gather(*self._summaries.values(), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop the background work (summaries, warming, preparing) and wait for it."""
        tasks = [t for t in (*self._summaries.values(), self._warming, self._preparing)
                 if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


async def announce_switch(speech: Speaker, result: SwitchResult, **kwargs: Any) -> None:
    """Say the switch's transition message in the new persona's voice (API, control plane,
    voice command all use this after ``switch_persona``)."""
    if result.transition_message:
        await speech.say(result.transition_message, result.voice, **kwargs)
