"""A speculative answer: begun at a pause judged complete, while the closing silence is counted.

When the end-of-turn check says the words so far are a whole question, the user is most likely
done; the rest of the silence window only confirms it. The answer starts at once: the LLM
writes (at VOICE priority) and the first sentence is synthesized, so when the endpoint fires
there is audio ready to play. Nothing is played, recorded or announced here: the reply's
events, its history entry and the speaker all wait for ``adopt()``, which the turn calls once
it owns the answer (the endpoint fell at this pause, arbitration committed, and the words
are not a local command). Speech resuming, a barge-in or any other outcome calls
``discard()``: the LLM stops, and no trace is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable

from companion.conversation import ConversationManager, Reply
from companion.stages.llm import Priority
from companion.stages.sentences import SentenceSplitter
from companion.stages.tts import AudioClip, Synthesizer, VoiceParams


class Speculation:
    """One answer written ahead of the endpoint for the words heard up to one pause."""

    def __init__(self, conversation: ConversationManager, tts: Synthesizer, *, turn_id: str,
                 text: str, pause_began_s: float) -> None:
        self.text = text
        self.pause_began_s = pause_began_s  # the pause (audio seconds) these words ended at
        self.started = time.perf_counter()
        self.first_token_s: float | None = None  # from the start of the speculation
        persona = conversation.active_persona
        self.reply = Reply(turn_id, "", persona.id, text)
        self._voice: VoiceParams = persona.voice_config.params()
        self._tts = tts
        self._deltas: asyncio.Queue[str | None] = asyncio.Queue()  # None: the reply is written
        self._seen: list[str] = []  # deltas taken from the queue before adoption
        self._written = False
        self._keep: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.first_sentence: str | None = None
        self._first_clip: asyncio.Task[AudioClip] | None = None
        self._writer = asyncio.create_task(self._write(conversation, turn_id), name="speculation")
        self._reader = asyncio.create_task(self._prepare(), name="speculation-tts")

    async def _write(self, conversation: ConversationManager, turn_id: str) -> None:
        deltas = conversation.respond(self.text, reply=self.reply, turn_id=turn_id, source="voice",
                                      priority=Priority.VOICE, before_record=self._hold)
        try:
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    if self.first_token_s is None:
                        self.first_token_s = time.perf_counter() - self.started
                    self._deltas.put_nowait(delta)
        finally:
            self._deltas.put_nowait(None)  # a reader never waits for deltas that will not come

    async def _hold(self) -> None:
        """Between the last delta and the history record: wait until the answer is adopted."""
        self._deltas.put_nowait(None)
        await self._keep

    async def _prepare(self) -> None:
        """Read the reply up to its first sentence and synthesize that sentence."""
        splitter = SentenceSplitter()
        while self.first_sentence is None:
            delta = await self._take()
            sentences = list(splitter.flush() if delta is None else splitter.feed(delta))
            if sentences:
                self.first_sentence = sentences[0]
            elif delta is None:
                return
        self._first_clip = asyncio.create_task(self._tts.synthesize(self.first_sentence,
                                                                    self._voice))

    async def _take(self) -> str | None:
        if self._written:
            return None
        delta = await self._deltas.get()
        if delta is None:
            self._written = True
        else:
            self._seen.append(delta)
        return delta

    def prepared(self) -> dict[str, Awaitable[AudioClip]]:
        """The sentence already being synthesized, for ``SpeechOutput.speak(prepared=…)``."""
        if self.first_sentence is None or self._first_clip is None:
            return {}
        return {self.first_sentence: self._first_clip}

    async def adopt(self) -> AsyncIterator[str]:
        """The answer is the user's: the reply's deltas from the start (what was written ahead,
        then the rest as it comes); the history record follows the last one."""
        self._reader.cancel()  # the first sentence's synthesis (if started) goes on
        await asyncio.wait({self._reader})
        kept = False
        try:
            for delta in self._seen:
                yield delta
            while (delta := await self._take()) is not None:
                yield delta
            self._keep.set_result(None)
            await self._writer  # the record (and any error of the LLM)
            kept = True
        finally:
            if not kept:  # cut short (barge-in): the LLM stops here
                self.discard()

    def discard(self) -> None:
        """Not the user's answer: stop writing and synthesizing; nothing is kept."""
        for task in (self._reader, self._writer, self._first_clip):
            if task is not None and not task.done():
                task.cancel()
            if task is not None:
                task.add_done_callback(_retrieve)
        if not self._keep.done():
            self._keep.cancel()


def _retrieve(task: asyncio.Task) -> None:
    """A discarded speculation's failure is no error: retrieve it so asyncio does not log it."""
    if not task.cancelled():
        task.exception()
