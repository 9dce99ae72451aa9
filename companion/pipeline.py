"""The voice loop: microphone → wake word → endpoint → STT → (local command | LLM) → TTS.

``VoiceLoop.run()`` pumps the microphone. Blocks go to the wake detector while no turn is
listening, and to the listening turn otherwise. A turn is one task with an id (bound to every
log line), a timeout, and typed start/end events for each stage; a button, the wake word while
speaking (barge-in), mute or the stop command cancel it.

Listening (``_Listener``): the utterance is transcribed in the background while the person
talks (``StreamingTranscription``), and at each pause the words so far are judged by the LLM's
end-of-turn probability (``stages/turn.py``): a complete question ends after a short silence, a
pause mid-sentence waits longer, a local command ends at once. The transcript of the final pause
is the final transcript, so the LLM starts as soon as the turn ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog

from companion.answer import Answer
from companion.arbitration import Arbiter, AudioClock, Round, measure_wake
from companion.conversation import ConversationManager
from companion.devices.audio import AudioSource
from companion.devices.echo import EchoControl
from companion.events import EventBus, EventType, PipelineState
from companion.settings import CompanionSettings, VadSettings
from companion.speech import SpeechOutput, SpeechStats
from companion.stages.llm import Priority
from companion.stages.sentences import SentenceSplitter
from companion.stages.stt import StreamingTranscription, Transcriber, Transcript
from companion.stages.turn import (
    EndOfTurnModel,
    TurnDecision,
    TurnPolicy,
    is_instant_command,
    normalize_transcript,
)
from companion.stages.vad import (
    Endpointer,
    EndpointResult,
    GatedClassifier,
    NoiseFloor,
    SegmentState,
    SpeechClassifier,
    SpeechSegmenter,
)
from companion.stages.wake import Detection, WakeDetector
from companion.state import DeviceStatus, TurnTimings
from companion.store import new_id

log = structlog.get_logger(__name__)

WAKE_CONTEXT_S = 3.0  # audio kept up to a wake word: the word and the noise floor before it
OWN_VOICE_TAIL_S = 1.0  # after a sentence ends, its echo (and the wake model's window) lingers
BARGE_IN_WINDOW_BLOCKS = 16  # barge-in by voice: of the last ~0.5 s of blocks ...
BARGE_IN_SPEECH_BLOCKS = 10  # ... this many must be speech


@dataclass(frozen=True)
class LocalAction:
    """What a local command handler did with an utterance: ``speak`` is said (may be empty)."""

    speak: str = ""
    name: str = ""
    expect_reply: bool = False  # a question ("Do you want me to …?"): open the follow-up window


IntentHandler = Callable[[str, str], Awaitable[LocalAction | None]]


class VoiceLoop:
    def __init__(
        self, *, settings: CompanionSettings, bus: EventBus, status: DeviceStatus,
        source: AudioSource | None, wake: WakeDetector | None, vad: SpeechClassifier,
        stt: Transcriber, conversation: ConversationManager, speech: SpeechOutput,
        intent_handler: IntentHandler | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.status = status
        self.source = source
        self.wake = wake
        self.vad = vad
        self.stt = stt
        self.conversation = conversation
        self.speech = speech
        self.intent_handler = intent_handler
        self.turn: asyncio.Task[None] | None = None
        self._turn_audio: asyncio.Queue[bytes | None] | None = None
        self._turns: set[asyncio.Task[None]] = set()
        self.source_ended = asyncio.Event()
        self._listening = False  # a turn is taking microphone audio right now
        self._wake_backlog: deque[bytes] = deque(maxlen=100)  # ~3 s heard while thinking
        self.echo: EchoControl | None = None  # echo cancellation (app.py wires it)
        self._barge_blocks: deque[tuple[bytes, bool]] = deque(maxlen=BARGE_IN_WINDOW_BLOCKS)
        self.hears_itself = False  # the source hears the sink (a simulated room)
        # called with (turn_id, 16 kHz PCM) for every utterance (the control link's audio_stream)
        self.utterance_listeners: list[Callable[[str, bytes], None]] = []
        # several devices heard the word: who answers (set by the app; None = always this one)
        self.arbiter: Arbiter | None = None
        self._heard: deque[bytes] = deque(
            maxlen=max(1, int(WAKE_CONTEXT_S * 1000 / settings.audio.block_ms)))
        self._rounds: dict[str, Round] = {}
        self._audio_clock = AudioClock(settings.audio.block_ms / 1000)  # when a word was heard
        self._ahead: dict[str, Answer] = {}  # answers begun before the endpoint, by turn
        self.noise_floor = NoiseFloor(block_s=settings.audio.block_ms / 1000)

    # --- the microphone pump --------------------------------------------------------------------

    async def run(self, *, hold_while_answering: bool = False) -> None:
        """Pump the microphone until it ends (a WAV) or forever (a device).

        ``hold_while_answering`` (simulation as fast as possible): a file has no clock, so the
        virtual microphone waits while a turn thinks and speaks instead of racing ahead."""
        if self.source is None:
            raise RuntimeError("no microphone")
        try:
            async for block in self.source.blocks():
                captured_at = getattr(self.source, "last_block_time_s", None)
                if hold_while_answering:
                    await self._hold()
                    # ...and while the listener judges a pause: the rest of the file must not
                    # pile up in (and be dropped with) the turn's queue meanwhile
                    while self._turn_audio is not None and self._turn_audio.qsize() > 2:  # noqa: ASYNC110  a queue the turn drains
                        await asyncio.sleep(0.002)
                self._audio_clock.tick()
                wake_block = block
                if self.echo is not None:
                    # AEC3's residual suppressor takes the user's voice out with the echo
                    # while both talk: the wake word hears the linear canceller's output
                    block, wake_block = await self.echo.process(block, captured_at)
                await self._route(block, wake_block)
        finally:
            self.source_ended.set()
            if self._turn_audio is not None:
                _offer(self._turn_audio, None)

    async def _hold(self) -> None:
        """Hold the virtual microphone while a turn thinks, and while it speaks unless the
        microphone hears the speaker (a room: then playback runs on the microphone's clock)."""
        while self.busy and not self._listening and self.turn is not None:
            if self.hears_itself and self.speech.playing.is_set():
                return
            waits: set[asyncio.Future] = {self.turn}
            playing = None
            if self.hears_itself:
                playing = asyncio.ensure_future(self.speech.playing.wait())
                waits.add(playing)
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if playing is not None:
                    playing.cancel()

    async def _route(self, block: bytes, wake_block: bytes | None = None) -> None:
        """``block`` goes to a listening turn; ``wake_block`` (default: the same) to the wake
        word detector."""
        if self.status.muted:
            return
        if self._turn_audio is not None:
            _offer(self._turn_audio, block)
            return
        if not self.busy:  # the room while idle (no reply, no user): what speech must rise above
            self.noise_floor.observe(block)
        if self._speech_barges_in(block):
            return
        if self.wake is None or not self.settings.wake.enabled:
            return
        if self.status.pipeline_state is PipelineState.THINKING:
            # between end of speech and first audio every core goes to STT/LLM/TTS; the wake
            # detector catches up on this audio as soon as the reply starts playing
            self._wake_backlog.append(block if wake_block is None else wake_block)
            return
        while self._wake_backlog:
            if await self._detect_wake(self._wake_backlog.popleft()):
                self._wake_backlog.clear()
                return
        await self._detect_wake(block if wake_block is None else wake_block)

    async def _detect_wake(self, block: bytes) -> bool:
        assert self.wake is not None
        started = time.perf_counter()
        self._heard.append(block)
        detection = await self.wake.process(block)
        if detection is not None and self._own_voice(detection):
            return False
        if detection is not None:
            self._on_wake(detection, time.perf_counter() - started)
        return detection is not None

    def _own_voice(self, detection: Detection) -> bool:
        """The device itself said the wake word ("Say hey Jarvis."): whatever echo is left
        after cancellation must not wake it. Its sentences on the speaker now, or within the
        room's echo tail, that contain the word's key word decide."""
        key = max(detection.word.replace("_", " ").split(), key=len).lower()
        if not self.speech.said_lately({key}, within_s=OWN_VOICE_TAIL_S):
            return False
        self.bus.emit(EventType.SELF_WAKE_IGNORED, word=detection.word,
                      score=round(detection.score, 4))
        log.info("wake word in the device's own voice ignored", word=detection.word)
        if self.wake is not None:
            self.wake.reset()
        return True

    def _speech_barges_in(self, block: bytes) -> bool:
        """``pipeline.barge_in = speech``: the user talking over the device interrupts it,
        once the echo canceller has converged (before, the device's own voice would)."""
        if (self.settings.pipeline.barge_in != "speech"
                or self.status.pipeline_state is not PipelineState.SPEAKING
                or self.echo is None or not self.echo.converged):
            self._barge_blocks.clear()
            return False
        self._barge_blocks.append((block, self.vad.is_speech(block)))
        if sum(speech for _, speech in self._barge_blocks) < BARGE_IN_SPEECH_BLOCKS:
            return False
        heard = [b for b, _ in self._barge_blocks]
        self._barge_blocks.clear()
        log.info("barge-in by voice")
        if self.start_turn(trigger="speech") is not None and self._turn_audio is not None:
            for b in heard:  # the words that interrupted belong to the new utterance
                _offer(self._turn_audio, b)
        return True

    def _on_wake(self, detection: Detection, compute_s: float) -> None:
        turn_id = new_id("turn")
        self.bus.emit(EventType.WAKE_DETECTED, turn_id, word=detection.word,
                      score=round(detection.score, 4), audio_time_s=round(detection.audio_time_s, 3))
        log.info("wake word", word=detection.word, score=round(detection.score, 3), turn_id=turn_id)
        if self.wake is not None:
            self.wake.reset()  # the word's audio must not fire again after the turn
        if self.start_turn(trigger="wake", turn_id=turn_id, wake_word=detection.word,
                           wake_compute_s=compute_s) is not None and self.turn is not None:
            self._arbitrate(turn_id, detection, self.turn)

    # --- several devices, one wake word (companion.arbitration) -----------------------------------

    def _arbitrate(self, turn_id: str, detection: Detection, turn: asyncio.Task[None]) -> None:
        """Listening has started (the user loses nothing); the answer waits for the verdict."""
        heard = b"".join(self._heard)
        self._heard.clear()
        if self.arbiter is None:
            return
        lag_s = self._audio_clock.lag_s(behind_blocks=len(self._wake_backlog))
        round_ = self.arbiter.begin(turn_id, detection.word, detection.score, measure_wake(heard),
                                    lag_s=lag_s)
        if round_ is None:
            return
        self._rounds[turn_id] = round_
        round_.result.add_done_callback(lambda result: self._on_verdict(turn, result))

    def _on_verdict(self, turn: asyncio.Task[None], result: asyncio.Future) -> None:
        if result.cancelled() or result.result().won:
            return
        if turn is self.turn and not turn.done():  # another device answers: stop, silently
            turn.cancel()
            self._release_microphone()

    async def _committed(self, turn_id: str) -> bool:
        """True when this device answers the turn (it won, or nobody else is there)."""
        round_ = self._rounds.pop(turn_id, None)
        return round_ is None or (await round_.commit()).won

    # --- turns ------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.turn is not None and not self.turn.done()

    def start_turn(self, *, trigger: str, turn_id: str | None = None, wake_word: str | None = None,
                   wake_compute_s: float | None = None) -> str | None:
        """Start listening for an utterance (wake word, button, API). What the device is doing
        is stopped first: pressing the button while the device speaks is barge-in. None while
        muted: the microphone is off, so there is nothing to listen to."""
        if self.status.muted:
            log.info("turn not started: muted", trigger=trigger)
            return None
        self.barge_in()
        return self._spawn_turn(trigger=trigger, turn_id=turn_id, wake_word=wake_word,
                                wake_compute_s=wake_compute_s, follow_up=False)

    def _spawn_turn(self, *, trigger: str, turn_id: str | None = None, wake_word: str | None = None,
                    wake_compute_s: float | None = None, follow_up: bool) -> str:
        turn_id = turn_id or new_id("turn")
        queue = self._take_microphone()
        task = asyncio.create_task(
            self._run_turn(turn_id, queue, trigger=trigger, wake_word=wake_word,
                           wake_compute_s=wake_compute_s, follow_up=follow_up),
            name=f"turn-{turn_id}",
        )
        self.turn = task
        self._turns.add(task)
        task.add_done_callback(self._turns.discard)
        return turn_id

    def _take_microphone(self) -> asyncio.Queue[bytes | None]:
        """Route microphone audio to a new listener (a turn or listen_once) instead of the wake
        word detector."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=2000)
        if self.source_ended.is_set():
            queue.put_nowait(None)
        self._turn_audio = queue
        self._listening = True  # from now: `--fast` must not hold the microphone back
        return queue

    def _release_microphone(self) -> None:
        """Give the audio back to the wake word detector; a listener still waiting on the old
        queue gets the end-of-audio marker, so it never waits for audio that will not come."""
        if self._turn_audio is not None:
            _offer(self._turn_audio, None)
        self._turn_audio = None
        self._listening = False

    def barge_in(self) -> bool:
        """Stop whatever the device is doing for the user now (speech and the turn behind it)."""
        stopped = self.speech.stop()
        if self.turn is not None and not self.turn.done():
            self.turn.cancel()
            stopped = True
        self._release_microphone()
        return stopped

    async def listen_once(self, *, no_speech_timeout_s: float | None = None) -> str | None:
        """Listen for one utterance and return its transcript without answering it (a trivia
        answer, a yes/no). Stops whatever the device was doing first; None when nobody spoke."""
        if self.status.muted:
            return None
        self.barge_in()
        turn_id = new_id("listen")
        queue = self._take_microphone()
        vad = self.settings.vad
        if no_speech_timeout_s is not None:
            vad = vad.model_copy(update={"no_speech_timeout_s": no_speech_timeout_s})
        try:
            self.status.set_state(PipelineState.LISTENING, turn_id)
            listener = _Listener(self, turn_id, vad)
            try:
                transcript = await self._listen_and_transcribe(turn_id, queue, listener,
                                                               TurnTimings(turn_id))
            finally:
                listener.close()
        finally:
            if self._turn_audio is queue:
                self._release_microphone()
            if self._turn_audio is None and not self.busy:  # nobody else took over
                self.status.set_state(PipelineState.IDLE, turn_id)
        return transcript.text if transcript is not None else None

    async def wait_idle(self) -> None:
        """Wait until no turn (including follow-ups it starts) is running."""
        while self._turns:
            await asyncio.gather(*list(self._turns), return_exceptions=True)

    async def _run_turn(self, turn_id: str, audio: asyncio.Queue[bytes | None], *, trigger: str,
                        wake_word: str | None, wake_compute_s: float | None,
                        follow_up: bool) -> None:
        structlog.contextvars.bind_contextvars(turn_id=turn_id)
        timings = TurnTimings(turn_id, wake_s=wake_compute_s)
        started = time.perf_counter()
        self.bus.emit(EventType.TURN_START, turn_id, trigger=trigger, wake_word=wake_word,
                      follow_up=follow_up)
        follow_up_next = False
        try:
            # the timeout bounds listening and thinking; it stops at the first audio, so a long
            # reply (or one waiting behind an announcement) is never cut off
            async with asyncio.timeout(self.settings.pipeline.turn_timeout_s) as deadline:
                timings._deadline = deadline
                if wake_word and not follow_up:
                    await self._persona_for_wake_word(wake_word)
                follow_up_next = await self._turn_body(turn_id, audio, timings, follow_up)
            timings.total_s = time.perf_counter() - started
            self.status.recent_turns.append(timings)
            self.bus.emit(EventType.TURN_END, turn_id, timings=timings.as_dict())
        except asyncio.CancelledError:
            self.bus.emit(EventType.TURN_CANCELLED, turn_id)
            raise
        except TimeoutError:
            self.bus.emit(EventType.TURN_ERROR, turn_id, code="turn-timeout",
                          message=f"turn took longer than {self.settings.pipeline.turn_timeout_s}s")
            log.warning("turn timed out")
            self.status.set_state(PipelineState.ERROR, turn_id)
            await self._apologise(turn_id)
        except Exception as exc:
            self.bus.emit(EventType.TURN_ERROR, turn_id, code="turn-failed",
                          message=str(exc))  # the reason; the code is a stable name
            log.exception("turn failed")
            self.status.set_state(PipelineState.ERROR, turn_id)
            await self._apologise(turn_id)
        finally:
            self._rounds.pop(turn_id, None)
            if self._turn_audio is audio:
                self._release_microphone()
            if self.turn is asyncio.current_task() and self._turn_audio is None:
                self.status.set_state(PipelineState.IDLE, turn_id)
            structlog.contextvars.unbind_contextvars("turn_id")
        # a follow-up window opens only if nothing else has taken over meanwhile (no barge-in)
        if (follow_up_next and self.turn is asyncio.current_task() and self._turn_audio is None
                and not self.source_ended.is_set() and not self.status.muted):
            self._spawn_turn(trigger="follow-up", follow_up=True)

    async def _turn_body(self, turn_id: str, audio: asyncio.Queue[bytes | None],
                         timings: TurnTimings, follow_up: bool) -> bool:
        """Listen, transcribe, answer. Returns True when a follow-up window should open."""
        self.status.set_state(PipelineState.LISTENING, turn_id)
        persona = self.conversation.active_persona
        vad_settings = self.settings.vad
        if follow_up:
            window = self._follow_up_window_s(persona)
            vad_settings = vad_settings.model_copy(update={"no_speech_timeout_s": window})
        listener = _Listener(self, turn_id, vad_settings, answer_ahead=True)
        more: list[bytes] = []  # audio after an endpoint where the user went on
        try:
            while True:
                transcript = await self._listen_and_transcribe(turn_id, audio, listener, timings,
                                                               replay=more)
                if transcript is None:
                    return False
                # an answer begun ahead is played only after this: arbitration decides first
                if not await self._committed(turn_id):
                    return False
                text = self._without_wake_phrase(transcript.text)
                if not text:  # only the wake word (said again in a follow-up window): listen anew
                    self.bus.emit(EventType.NO_SPEECH, turn_id, reason="wake word only")
                    return not self.source_ended.is_set() and self._follow_up_window_s(persona) > 0
                if self.intent_handler is not None and self.settings.pipeline.local_commands:
                    action = await self.intent_handler(text, turn_id)
                    if action is not None:  # the action registry emitted COMMAND if one ran
                        self._hand_back_microphone(audio)
                        if action.speak:
                            await self._speak_text(action.speak, turn_id, timings)
                        return action.expect_reply and self._follow_up_window_s(persona) > 0
                self.status.set_state(PipelineState.THINKING, turn_id)
                ahead = self._ahead.pop(turn_id, None)
                if ahead is not None and (ahead.text != text or ahead.reply.persona_id != persona.id):
                    ahead.discard()  # written for other words (or another persona)
                    ahead = None
                more = await self._answer_unless_resumed(turn_id, text, timings, ahead, audio,
                                                         listener)
                if not more:
                    return self._follow_up_window_s(persona) > 0
                self.status.set_state(PipelineState.LISTENING, turn_id)
        finally:
            listener.close()
            # whatever was not adopted (a command, a lost arbitration, a barge-in) is dropped
            if (left := self._ahead.pop(turn_id, None)) is not None:
                left.discard()

    async def _answer_unless_resumed(self, turn_id: str, text: str, timings: TurnTimings,
                                     ahead: Answer | None, audio: asyncio.Queue[bytes | None],
                                     listener: _Listener) -> list[bytes]:
        """Answer, while listening on until the answer is first heard: speech within
        ``turn.resume_window_s`` of the endpoint means the user had not finished. Then the
        answer is dropped (nothing was played or recorded) and the audio since the endpoint is
        returned, for the utterance to go on; else ``[]`` once the answer is over."""
        heard = asyncio.Event()
        answer = asyncio.create_task(self._answer(turn_id, text, timings, ahead, heard=heard),
                                     name=f"answer-{turn_id}")
        after: list[bytes] = []  # the audio the watch took from the turn's queue
        watch = None
        if (self._turn_audio is audio and self.settings.turn.resume_window_s > 0
                and not listener.endpointer.segmenter.hit_max_length):  # that one stays cut
            watch = asyncio.create_task(listener.watch_for_more(audio, heard, after),
                                        name="resume-watch")
        else:
            self._hand_back_microphone(audio)
        try:
            if watch is not None:
                await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
                resumed_after_s = watch.result() if watch.done() else None
                if resumed_after_s is not None and not heard.is_set():
                    answer.cancel()
                    await asyncio.wait({answer})
                    if answer.cancelled():  # nothing played, nothing recorded
                        seg = listener.endpointer.segmenter
                        self.bus.emit(EventType.SPEECH_RESUMED, turn_id,
                                      audio_time_s=round(seg.audio_s + resumed_after_s, 3),
                                      after_endpoint_s=round(resumed_after_s, 3))
                        log.info("the user went on after the endpoint: same utterance",
                                 after_endpoint_s=round(resumed_after_s, 3))
                        timings.llm_first_token_s = timings.llm_first_sentence_s = None
                        timings.tts_first_sentence_s = None
                        return after
                watch.cancel()
                await asyncio.wait({watch})
                self._hand_back_microphone(audio, after)
            await answer
            return []
        finally:
            pending = {t for t in (answer, watch) if t is not None and not t.done()}
            for task in pending:
                task.cancel()
            if pending:  # the answer keeps what a barge-in let the user hear before we go
                await asyncio.wait(pending)

    def _hand_back_microphone(self, audio: asyncio.Queue[bytes | None],
                              heard: list[bytes] | None = None) -> None:
        """The turn listens no more: the wake word detector hears again (barge-in), and
        catches up on what the turn heard since its endpoint."""
        if self._turn_audio is audio:
            self._release_microphone()
            self._wake_backlog.extend(heard or ())
            while not audio.empty():  # heard since, not yet taken (a command was running)
                if (block := audio.get_nowait()) is not None:
                    self._wake_backlog.append(block)

    def _follow_up_window_s(self, persona) -> float:
        """The persona's window, capped device-wide (pipeline.follow_up_window_s; 0 = off)."""
        return min(persona.behavior_config.follow_up_window_s,
                   self.settings.pipeline.follow_up_window_s)

    def _without_wake_phrase(self, text: str) -> str:
        """'Hey Jarvis, what time is it?' → 'what time is it?' (said in a follow-up window the
        wake word reaches the transcript, not the detector)."""
        words = self.wake.words if self.wake is not None else self.settings.wake.models
        lowered = text.lower()
        for word in words:
            phrase = word.replace("_", " ").lower()
            if lowered.lstrip(" ,.!?").startswith(phrase):
                start = lowered.index(phrase) + len(phrase)
                return text[start:].lstrip(" ,.!?")
        return text.strip()

    async def _listen_and_transcribe(
        self, turn_id: str, audio: asyncio.Queue[bytes | None], listener: _Listener,
        timings: TurnTimings, *, replay: list[bytes] | None = None,
    ) -> Transcript | None:
        """Listen up to the endpoint and transcribe. A listener made with ``answer_ahead`` may
        begin its answer at a pause judged complete; the answer is left in ``self._ahead`` when
        the endpoint fell at that pause. ``replay``: the user went on after the listener's
        endpoint; this audio (since that endpoint) comes first."""
        if not replay:
            self.bus.emit(EventType.LISTEN_START, turn_id)
        self._listening = True
        try:
            result = await listener.listen(audio, replay=replay or ())
            decided_at = time.perf_counter()
            self._listening = False
            if result.state in (SegmentState.WAITING, SegmentState.NO_SPEECH) or not result.audio:
                self.bus.emit(EventType.NO_SPEECH, turn_id, audio_s=round(result.audio_s, 3))
                return None
            timings.endpoint_s = (result.speech_end_s or result.audio_s) - (result.speech_start_s or 0)
            decision = listener.final_decision()
            self.bus.emit(EventType.SPEECH_END, turn_id,
                          audio_time_s=round(result.speech_end_s or result.audio_s, 3),
                          speech_s=round(timings.endpoint_s, 3),
                          silence_s=round(listener.silence_at_end_s, 3), **decision.as_event())
            self.status.set_state(PipelineState.THINKING, turn_id)
            for listener_cb in self.utterance_listeners:
                listener_cb(turn_id, result.audio)
            self.bus.emit(EventType.STT_START, turn_id, audio_s=round(len(result.audio) / 32000, 3))
            timings._decided_at = decided_at
            timings._silence_window_s = listener.silence_at_end_s
            transcript, reused = await listener.final_transcript(result)
            timings.stt_s = time.perf_counter() - decided_at
            self.bus.emit(EventType.STT_END, turn_id, text=transcript.text,
                          took_s=round(timings.stt_s, 4), speculative=reused,
                          **listener.stt_cost())
            log.info("transcript", chars=len(transcript.text), stt_s=round(timings.stt_s, 3))
            log.debug("transcript text", text=transcript.text)
            if not transcript.text.strip():
                self.bus.emit(EventType.NO_SPEECH, turn_id, audio_s=round(result.audio_s, 3),
                              reason="empty transcript")
                return None
            if (ahead := listener.take_speculation(result)) is not None:
                self._ahead[turn_id] = ahead
            return transcript
        finally:
            self._listening = False

    async def _answer(self, turn_id: str, text: str, timings: TurnTimings,
                      ahead: Answer | None = None, *, heard: asyncio.Event | None = None) -> None:
        """``ahead``: the answer begun at the final pause (its LLM text and first sentence's
        audio are taken over; its events start now, as it becomes this turn's answer).
        ``heard`` is set at the first audio: until then the turn may drop the answer (the user
        went on talking), and nothing of it is recorded."""
        persona = self.conversation.active_persona
        answer = ahead if ahead is not None else Answer(
            self.conversation, self.speech.tts, turn_id=turn_id, text=text, pause_began_s=-1.0,
            ahead=False)
        reply = answer.reply
        llm_started = time.perf_counter()
        self.bus.emit(EventType.LLM_START, turn_id, persona_id=persona.id,
                      speculative=ahead is not None,
                      ahead_s=round(llm_started - ahead.started, 4) if ahead else None)

        async def sentences() -> AsyncIterator[str]:
            splitter = SentenceSplitter()
            first_token = True
            async with contextlib.aclosing(answer.adopt()) as deltas:  # barge-in stops the LLM
                async for delta in deltas:
                    if first_token:
                        first_token = False
                        timings.llm_first_token_s = time.perf_counter() - llm_started
                        self.bus.emit(EventType.LLM_FIRST_TOKEN, turn_id,
                                      took_s=round(timings.llm_first_token_s, 4))
                    for sentence in splitter.feed(delta):
                        self._on_sentence(turn_id, sentence, llm_started, timings)
                        yield sentence
            for sentence in splitter.flush():
                self._on_sentence(turn_id, sentence, llm_started, timings)
                yield sentence
            self.bus.emit(EventType.LLM_END, turn_id, text=reply.text,
                          tokens=reply.stats.completion_tokens,
                          took_s=round(time.perf_counter() - llm_started, 4))

        def on_heard() -> None:
            answer.keep()
            if heard is not None:
                heard.set()

        stats = SpeechStats()
        try:
            await self._speak(sentences(), turn_id, timings, persona.voice_config.params(),
                              stats=stats, prepared=answer.prepared(), on_first_audio=on_heard)
            await answer.finished()  # the history record (kept even when nothing was said)
        except BaseException as exc:
            answer.discard()
            if isinstance(exc, asyncio.CancelledError) and (
                    stats.first_audio_at is not None or reply.completed):
                # barge-in: keep what the user heard (written in the background: this task is
                # being cancelled, and the next turn only reads history once the user spoke)
                task = asyncio.create_task(self.conversation.keep_played(reply, stats.played_text))
                self._turns.add(task)
                task.add_done_callback(self._turns.discard)
            raise

    def _on_sentence(self, turn_id: str, sentence: str, llm_started: float,
                     timings: TurnTimings) -> None:
        if timings.llm_first_sentence_s is None:
            timings.llm_first_sentence_s = time.perf_counter() - llm_started
        self.bus.emit(EventType.LLM_SENTENCE, turn_id, text=sentence)

    async def _speak(self, sentences: AsyncIterator[str], turn_id: str, timings: TurnTimings,
                     voice, stats: SpeechStats | None = None, prepared=None,
                     on_first_audio: Callable[[], None] | None = None) -> None:
        def first_audio() -> None:
            self.status.set_state(PipelineState.SPEAKING, turn_id)
            if timings._deadline is not None:
                with contextlib.suppress(RuntimeError):  # it expired: the turn is ending
                    timings._deadline.reschedule(None)
            if timings._decided_at is not None:
                timings.end_of_speech_to_first_audio_s = time.perf_counter() - timings._decided_at
                timings.speech_end_to_first_audio_s = (
                    timings.end_of_speech_to_first_audio_s + timings._silence_window_s)
                timings._decided_at = None
            if on_first_audio is not None:
                on_first_audio()

        stats = await self.speech.speak(sentences, voice, turn_id=turn_id,
                                        on_first_audio=first_audio, stats=stats,
                                        prepared=prepared)
        timings.tts_first_sentence_s = stats.first_tts_s

    async def _speak_text(self, text: str, turn_id: str, timings: TurnTimings) -> None:
        from companion.stages.sentences import split_sentences

        async def sentences() -> AsyncIterator[str]:
            for sentence in split_sentences(text):
                yield sentence

        voice = self.conversation.active_persona.voice_config.params()
        await self._speak(sentences(), turn_id, timings, voice)

    async def _apologise(self, turn_id: str) -> None:
        try:
            voice = self.conversation.active_persona.voice_config.params()
            await self.speech.say("Sorry, something went wrong.", voice, turn_id=turn_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("could not apologise", exc_info=True)

    async def _persona_for_wake_word(self, word: str) -> None:
        persona = self.conversation.personas.for_wake_word(word)
        if persona is not None and persona.id != self.conversation.active_persona_id:
            await self.conversation.switch_persona(persona.id, preserve_context=True)

    # --- mute ---------------------------------------------------------------------------------

    def set_muted(self, muted: bool) -> None:
        """Cut the microphone in software: nothing reaches the wake word or a turn."""
        if muted == self.status.muted:
            return
        self.status.muted = muted
        if muted and self._turn_audio is not None:
            # a turn still listening stops; one past its endpoint answers (it only stops
            # watching for the user going on)
            if self._listening and self.turn is not None and not self.turn.done():
                self.turn.cancel()
            self._release_microphone()
        if muted:
            self.status.set_state(PipelineState.MUTED)
        elif not self.busy:
            self.status.set_state(PipelineState.IDLE)
        self.bus.emit(EventType.MUTE_CHANGED, muted=muted)


@dataclass
class _Probe:
    """The words at one pause and the judgement of them (a task while it runs)."""

    pause_began_s: float  # audio time where the pause began
    task: asyncio.Task[tuple[Transcript, TurnDecision]]

    def outcome(self) -> tuple[Transcript, TurnDecision] | None:
        if not self.task.done() or self.task.cancelled() or self.task.exception() is not None:
            return None
        return self.task.result()


class _Listener:
    """One utterance: endpointing, transcription while the person talks, and at each pause the
    end-of-turn judgement. Decisions are made in audio seconds (the audio that has been
    consumed), so they are the same on a fast or slow machine; when a judgement is needed and
    not ready, the microphone's audio waits in its queue."""

    def __init__(self, loop: VoiceLoop, turn_id: str, vad_settings: VadSettings, *,
                 answer_ahead: bool = False) -> None:
        self.loop = loop
        self.turn_id = turn_id
        settings = loop.settings
        model = getattr(loop.conversation, "llm", None)
        self.policy = TurnPolicy(settings.turn, vad_settings.silence_end_s,
                                 model_available=isinstance(model, EndOfTurnModel))
        self.model = model
        # the segmenter ends an utterance by itself only after the longest silence
        self.endpointer = Endpointer(
            vad_settings.model_copy(update={"silence_end_s": self.policy.longest_silence_s}),
            GatedClassifier(loop.vad, loop.noise_floor, vad_settings.noise_margin_db))
        self.speculate = settings.pipeline.speculative_stt or self.policy.semantic
        stt = loop.stt
        self.streaming = (StreamingTranscription(stt, language=settings.stt.language)
                          if settings.turn.streaming_stt and hasattr(stt, "transcribe_words")
                          else None)
        self._partial: asyncio.Task[Transcript] | None = None
        self._partial_at_s = 0.0
        self.probe: _Probe | None = None
        self._context: list | None = None
        self.silence_at_end_s = 0.0
        self.answer_ahead = answer_ahead and settings.turn.speculative_answer and self.policy.semantic
        self.speculation: Answer | None = None

    async def listen(self, audio: asyncio.Queue[bytes | None],
                     replay: Iterable[bytes] = ()) -> EndpointResult:
        """Up to the endpoint. ``replay``: the user went on after the last endpoint; the
        utterance opens again and takes this audio (heard since that endpoint) first."""
        endpointer, seg = self.endpointer, self.endpointer.segmenter
        state = SegmentState.WAITING
        if replay:
            seg.resume()
            for block in replay:
                state = endpointer.feed(block)
            if state is SegmentState.SPEECH:
                self._maybe_partial_pass()
        while state in (SegmentState.WAITING, SegmentState.SPEECH):
            block = await audio.get()
            if block is None:  # the microphone ended (end of a WAV)
                break
            previous, state = state, endpointer.feed(block)
            if previous is SegmentState.WAITING and state is SegmentState.SPEECH:
                self.loop.bus.emit(EventType.SPEECH_START, self.turn_id,
                                   audio_time_s=round(seg.speech_start_s or 0, 3))
            if state is not SegmentState.SPEECH:
                continue
            if seg.silence_s == 0.0:
                self._drop_speculation()  # speech resumed: that answer is moot
                self._maybe_partial_pass()
            elif self.speculate and seg.silence_s >= self.policy.probe_silence_s:
                state = await self._at_pause()
        self.silence_at_end_s = seg._silence_run_s if seg.speech_end_s is not None else 0.0
        return endpointer.result()

    async def watch_for_more(self, audio: asyncio.Queue[bytes | None], heard: asyncio.Event,
                             into: list[bytes]) -> float | None:
        """After the endpoint, until the answer is heard: does the user go on talking within
        ``turn.resume_window_s``? Speech starts as an utterance does (``vad.speech_start_s``
        of it, above the room's noise). Returns the audio seconds after the endpoint where it
        began, or None; every block taken from ``audio`` is appended to ``into``."""
        window = self.loop.settings.turn.resume_window_s
        seg = SpeechSegmenter(self.endpointer.settings.model_copy(
            update={"no_speech_timeout_s": window, "pre_roll_s": 0.0}))
        classifier = self.endpointer.classifier
        heard_wait = asyncio.ensure_future(heard.wait())
        block_wait: asyncio.Future[bytes | None] | None = None
        try:
            while not heard.is_set():
                block_wait = asyncio.ensure_future(audio.get())
                await asyncio.wait({block_wait, heard_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not block_wait.done():
                    return None  # heard: the answer plays
                block, block_wait = block_wait.result(), None
                if block is None:  # the microphone ended: the marker stays for whoever is next
                    _offer(audio, None)
                    return None
                into.append(block)
                # the device itself speaking (an announcement before the answer) is not the user
                speech = not self.loop.speech.playing.is_set() and classifier.is_speech(block)
                state = seg.process(len(block) / 32000, speech)
                if state is SegmentState.SPEECH:
                    return seg.speech_start_s
                if state is SegmentState.NO_SPEECH:
                    return None
            return None
        finally:
            heard_wait.cancel()
            if block_wait is not None:
                if block_wait.done() and not block_wait.cancelled():
                    if (block := block_wait.result()) is not None:
                        into.append(block)  # taken from the queue as we were stopped
                    else:
                        _offer(audio, None)
                block_wait.cancel()

    def _maybe_partial_pass(self) -> None:
        """While the person talks: a background pass every ``partial_every_s`` of speech."""
        seg = self.endpointer.segmenter
        if self.streaming is None or seg.audio_s - self._partial_at_s < \
                self.loop.settings.turn.partial_every_s:
            return
        if self._partial is not None and not self._partial.done():
            return
        if self.probe is not None and not self.probe.task.done():
            return
        self._partial_at_s = seg.audio_s
        self._partial = asyncio.create_task(self.streaming.update(self.endpointer.result().audio))

    async def _at_pause(self) -> SegmentState:
        seg = self.endpointer.segmenter
        pause_began = round(seg.audio_s - seg.silence_s, 3)
        if self.probe is None or self.probe.pause_began_s != pause_began:
            if self.probe is not None and not self.probe.task.done():
                if not self.policy.semantic:
                    return seg.state  # one speculation at a time (see below)
                self.probe.task.cancel()  # speech resumed: that judgement is moot
            # without judgement, a new speculation waits for the old one: a cancelled run keeps
            # whisper's thread busy until it finishes, and the final one would queue behind it
            self.probe = _Probe(pause_began, asyncio.create_task(
                self._judge(self.endpointer.result().audio, pause_began)))
        if not self.policy.semantic:
            return seg.state
        if not self.probe.task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait({self.probe.task})  # audio waits in the queue meanwhile
        outcome = self.probe.outcome()
        decision = outcome[1] if outcome is not None else self.policy.decide(None)
        if seg.silence_s >= decision.silence_needed_s:
            return seg.end()
        if outcome is not None and decision.reason == "complete":
            self._speculate(outcome[0], pause_began)
        return seg.state

    def _speculate(self, transcript: Transcript, pause_began: float) -> None:
        """The words so far are a whole question and the closing silence is still being
        counted: begin the answer now (``companion.answer``)."""
        if not self.answer_ahead or (self.speculation is not None
                                     and self.speculation.pause_began_s == pause_began):
            return
        text = self.loop._without_wake_phrase(transcript.text)
        if not text:
            return
        self._drop_speculation()
        self.speculation = Answer(self.loop.conversation, self.loop.speech.tts,
                                       turn_id=self.turn_id, text=text, pause_began_s=pause_began)
        log.debug("answer begun ahead of the endpoint", audio_time_s=pause_began)

    def _drop_speculation(self) -> None:
        if self.speculation is not None:
            self.speculation.discard()
            self.speculation = None
            log.debug("answer begun ahead discarded: speech resumed")

    def take_speculation(self, result: EndpointResult) -> Answer | None:
        """The answer begun at the pause where the utterance ended, if any (the caller owns
        it now); one begun at an earlier pause is discarded."""
        speculation, self.speculation = self.speculation, None
        if speculation is not None and (self.endpointer.segmenter.hit_max_length or
                                        speculation.pause_began_s != round(result.speech_end_s or -1.0, 3)):
            speculation.discard()
            return None
        return speculation

    async def _judge(self, pcm: bytes, pause_began: float) -> tuple[Transcript, TurnDecision]:
        """Transcribe the words so far and judge whether they are a whole turn."""
        if self.streaming is not None:
            transcript = await self.streaming.update(pcm)
        else:
            transcript = await self.loop.stt.transcribe(pcm)
        if not self.policy.semantic:
            return transcript, self.policy.decide(None)
        text = self.loop._without_wake_phrase(transcript.text)
        probability = None
        command = bool(text) and self.loop.settings.pipeline.local_commands and \
            is_instant_command(text)
        if text and not command:
            probability = await self._probability(text)
        decision = self.policy.decide(probability, command=command)
        self.loop.bus.emit(EventType.END_OF_TURN, self.turn_id, audio_time_s=pause_began,
                           **decision.as_event())
        return transcript, decision

    async def _probability(self, text: str) -> float | None:
        assert isinstance(self.model, EndOfTurnModel)
        try:
            if self._context is None:
                self._context = await self.loop.conversation.voice_context()
            words = normalize_transcript(text) if self.loop.settings.turn.normalize_text else text
            return await self.model.end_of_turn_probability(
                [*self._context, {"role": "user", "content": words}], priority=Priority.VOICE)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("end-of-turn check failed; waiting out the long silence", exc_info=True)
            return None

    def final_decision(self) -> TurnDecision:
        seg = self.endpointer.segmenter
        if seg.hit_max_length:
            return TurnDecision("max-length", None, 0.0)
        outcome = self.probe.outcome() if self.probe is not None else None
        if outcome is not None and self.probe is not None and \
                self.probe.pause_began_s == round(seg.speech_end_s or -1.0, 3):
            return outcome[1]
        return self.policy.decide(None)

    async def final_transcript(self, result: EndpointResult) -> tuple[Transcript, bool]:
        """The transcript of the whole utterance: the one made at the final pause when there
        was one (no work left), else the last piece decoded now."""
        final_pause = round(result.speech_end_s or -1.0, 3)
        if self.probe is not None and self.probe.pause_began_s == final_pause:
            with contextlib.suppress(Exception):
                await asyncio.wait({self.probe.task})
            outcome = self.probe.outcome()
            if outcome is not None:
                return outcome[0], True
        if self.streaming is not None:
            return await self.streaming.update(result.audio, final=True), False
        return await self.loop.stt.transcribe(result.audio), False

    def stt_cost(self) -> dict:
        if self.streaming is None:
            return {}
        return {"passes": self.streaming.passes,
                "decoded_audio_s": round(self.streaming.decoded_s, 3)}

    def close(self) -> None:
        self._drop_speculation()
        for task in (self._partial, self.probe.task if self.probe else None):
            if task is None:
                continue
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: a failed speculation is not an error


def _offer(queue: asyncio.Queue, item) -> None:
    """Put without waiting; when full, drop the oldest (the newest audio matters most)."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)
