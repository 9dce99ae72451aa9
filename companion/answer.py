"""A voice answer: written, and its first sentence synthesized, before anything is heard.

An answer is begun at a pause judged complete, while the closing silence is still counted
(``ahead``: the end-of-turn check says the words so far are a whole question, so the user is
most likely done and the rest of the window only confirms it), or at the endpoint otherwise.
Either way nothing is played, recorded or announced here: the reply's events and the speaker
wait for ``adopt()``, which the turn calls once it owns the answer (the endpoint fell at this
pause, arbitration committed, and the words are not a local command); the history record waits
for ``keep()``, which the turn calls once the user has heard the answer's first audio. Until
then the user may still go on talking (``turn.resume_window_s``) and ``discard()`` leaves no
trace: the LLM stops and nothing is stored.
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


class Answer:
    """One reply to the words heard up to one pause, written before it is heard."""

    def __init__(self, conversation: ConversationManager, tts: Synthesizer, *, turn_id: str,
                 text: str, pause_began_s: float, ahead: bool = True) -> None:
        self.text = text
        self.pause_began_s = pause_began_s  # the pause (audio seconds) these words ended at
        self.started = time.perf_counter()
        self.first_token_s: float | None = None  # from the start of the answer
        persona = conversation.active_persona
        self.reply = Reply(turn_id, "", persona.id, text)
        self._voice: VoiceParams = persona.voice_config.params()
        self._tts = tts
        self._deltas: asyncio.Queue[str | None] = asyncio.Queue()  # None: the reply is written
        self._seen: list[str] = []  # deltas taken from the queue before adoption
        self._written = False
        self._error: BaseException | None = None  # the LLM's failure, raised by adopt()
        self._keep: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.first_sentence: str | None = None
        self._first_clip: asyncio.Task[AudioClip] | None = None
        self._writer = asyncio.create_task(self._write(conversation, turn_id), name="answer")
        # begun before the endpoint: the first sentence is synthesized meanwhile
        self._reader = asyncio.create_task(self._prepare(), name="answer-tts") if ahead else None

    async def _write(self, conversation: ConversationManager, turn_id: str) -> None:
        deltas = conversation.respond(self.text, reply=self.reply, turn_id=turn_id, source="voice",
                                      priority=Priority.VOICE, before_record=self._hold)
        try:
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    if self.first_token_s is None:
                        self.first_token_s = time.perf_counter() - self.started
                    self._deltas.put_nowait(delta)
        except Exception as exc:
            self._error = exc
            raise
        finally:
            self._deltas.put_nowait(None)  # a reader never waits for deltas that will not come

    async def _hold(self) -> None:
        """Between the last delta and the history record: wait until the answer is heard."""
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
        then the rest as it comes). The LLM's failure is raised after the deltas it wrote."""
        if self._reader is not None:
            self._reader.cancel()  # the first sentence's synthesis (if started) goes on
            await asyncio.wait({self._reader})
        whole = False
        try:
            for delta in self._seen:
                yield delta
            while (delta := await self._take()) is not None:
                yield delta
            if self._error is not None:
                raise self._error
            whole = True
        finally:
            if not whole:  # cut short (barge-in, the user went on): the LLM stops here
                self.discard()

    def keep(self) -> None:
        """The user heard the answer (or it is over): its exchange may be recorded."""
        if not self._keep.done():
            self._keep.set_result(None)

    async def finished(self) -> None:
        """Keep the answer and wait for its history record (or the LLM's failure)."""
        self.keep()
        await self._writer

    def discard(self) -> None:
        """Not the user's answer (or cut short): stop writing and synthesizing; whatever was
        not recorded yet never is."""
        for task in (self._reader, self._writer, self._first_clip):
            if task is not None and not task.done():
                task.cancel()
            if task is not None:
                task.add_done_callback(_retrieve)
        if not self._keep.done():
            self._keep.cancel()


def _retrieve(task: asyncio.Task) -> None:
    """A discarded answer's failure is no error: retrieve it so asyncio does not log it."""
    if not task.cancelled():
        task.exception()
