"""Typed events on one bus: the pipeline produces them; LEDs, the HTTP API, metrics and the
control link consume them. Producers never wait for consumers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class EventType(StrEnum):
    # a turn and its stages, in the order they happen
    WAKE_DETECTED = "wake-detected"
    WAKE_ARBITRATION = "wake-arbitration"  # several devices heard it: this one answers or not
    TURN_START = "turn-start"
    LISTEN_START = "listen-start"
    SPEECH_START = "speech-start"
    END_OF_TURN = "end-of-turn"  # a pause judged: is the utterance complete? (probability)
    SPEECH_END = "speech-end"
    SPEECH_RESUMED = "speech-resumed"  # the user went on after the endpoint: same utterance
    NO_SPEECH = "no-speech"
    STT_START = "stt-start"
    STT_END = "stt-end"
    COMMAND = "command"
    LLM_START = "llm-start"
    LLM_FIRST_TOKEN = "llm-first-token"
    LLM_SENTENCE = "llm-sentence"
    LLM_END = "llm-end"
    LLM_FALLBACK = "llm-fallback"  # a reply came from the local model: the remote one failed
    TTS_START = "tts-start"
    TTS_END = "tts-end"
    PLAYBACK_START = "playback-start"
    PLAYBACK_END = "playback-end"
    TURN_END = "turn-end"
    TURN_ERROR = "turn-error"
    TURN_CANCELLED = "turn-cancelled"
    EXCHANGE_RECORDED = "exchange-recorded"  # a user's words and the reply, stored (any source)
    REPLY_INTERRUPTED = "reply-interrupted"  # barge-in: only the played words are kept
    SELF_WAKE_IGNORED = "self-wake-ignored"  # the wake word said by the device's own voice
    # device-wide
    STATE_CHANGED = "state-changed"
    BUTTON = "button"
    MUTE_CHANGED = "mute-changed"
    VOLUME_CHANGED = "volume-changed"
    PERSONA_SWITCHED = "persona-switched"
    TIMER_SET = "timer-set"
    TIMER_RANG = "timer-rang"
    LED_OVERRIDE = "led-override"
    AUDIO_DEVICE = "audio-device"
    CONTROL_LINK = "control-link"
    CONTROL_FRAME_REFUSED = "control-frame-refused"  # the server refused a frame: dead-lettered
    LLM_BACKEND = "llm-backend"  # the remote LLM's circuit breaker changed state


# --- payloads: one frozen dataclass per event type ---------------------------------------------
# ``EventBus.emit(EventType.X, turn_id, **fields)`` builds the type's payload from the fields, so
# a misspelt or missing field is a TypeError where it is emitted, not a silent gap downstream.


@dataclass(frozen=True, kw_only=True, slots=True)
class Payload:
    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


payload = dataclass(frozen=True, kw_only=True, slots=True)  # how every payload below is made


@payload
class NoFields(Payload):
    pass


@payload
class WakeDetected(Payload):
    word: str
    score: float
    audio_time_s: float


@payload
class WakeArbitration(Payload):
    won: bool
    winner: str | None
    source: str
    waited_ms: float | None
    room: str
    snr_db: float | None
    level_dbfs: float | None


@payload
class TurnStart(Payload):
    trigger: str
    wake_word: str | None = None
    follow_up: bool = False


@payload
class SpeechStart(Payload):
    audio_time_s: float


@payload
class EndOfTurn(Payload):
    """A pause judged (stages/turn.py): how complete the words so far are, and what follows."""

    audio_time_s: float
    end_reason: str  # complete, incomplete, command, silence, max-length
    end_probability: float | None
    silence_needed_s: float


@payload
class SpeechEnd(Payload):
    audio_time_s: float
    speech_s: float
    silence_s: float | None = None  # the silence that ended it
    end_reason: str | None = None  # see EndOfTurn
    end_probability: float | None = None
    silence_needed_s: float | None = None


@payload
class SpeechResumed(Payload):
    """Speech after the endpoint, before the answer was heard: the answer is dropped and the
    utterance goes on (``turn.resume_window_s``)."""

    audio_time_s: float  # where the new speech began, in the turn's audio
    after_endpoint_s: float  # audio between the endpoint and the new speech


@payload
class NoSpeech(Payload):
    audio_s: float | None = None
    reason: str | None = None


@payload
class SttStart(Payload):
    audio_s: float


@payload
class SttEnd(Payload):
    text: str
    took_s: float
    speculative: bool = False
    passes: int | None = None  # transcription passes while the person talked (streaming)
    decoded_audio_s: float | None = None  # audio those passes decoded: the CPU it cost


@payload
class Command(Payload):
    command: str
    source: str | None = None  # api, voice, control, button, tool
    text: str | None = None  # what was said, for a voice command


@payload
class LlmStart(Payload):
    persona_id: str
    speculative: bool = False  # begun at the final pause, before the endpoint (answer.py)
    ahead_s: float | None = None  # how long before this event it was begun


@payload
class Took(Payload):
    took_s: float


@payload
class Text(Payload):
    text: str


@payload
class LlmEnd(Payload):
    text: str
    tokens: int
    took_s: float


@payload
class TtsEnd(Payload):
    text: str
    audio_s: float
    took_s: float


@payload
class PlaybackStart(Payload):
    text: str
    audio_s: float


@payload
class TurnEnd(Payload):
    timings: dict[str, Any]


@payload
class TurnError(Payload):
    code: str  # a stable name (it goes to the fleet), never an exception class name
    message: str


@payload
class ExchangeRecorded(Payload):
    session_id: str
    persona_id: str
    source: str
    user_text: str
    reply: str
    tokens: int


@payload
class ReplyInterrupted(Payload):
    session_id: str
    played: str  # the words the user heard; only these are kept in the conversation


@payload
class SelfWakeIgnored(Payload):
    word: str
    score: float


@payload
class StateChanged(Payload):
    state: str
    previous: str


@payload
class Button(Payload):
    button: str
    kind: str


@payload
class MuteChanged(Payload):
    muted: bool


@payload
class VolumeChanged(Payload):
    volume: float
    previous: float | None = None


@payload
class PersonaSwitched(Payload):
    previous: str
    persona_id: str
    session_id: str | None
    latency_ms: float
    preserve_context: bool


@payload
class Timer(Payload):
    timer_id: str
    seconds: float
    label: str | None = None


@payload
class LedOverride(Payload):
    color: str
    pattern: str
    duration_ms: int


@payload
class AudioDevice(Payload):
    component: str
    healthy: bool
    detail: str = ""


@payload
class ControlLinkChanged(Payload):
    connected: bool
    url: str | None = None
    error: str | None = None


@payload
class ControlFrameRefused(Payload):
    frame_id: str
    frame_type: str
    bytes: int
    reason: str


@payload
class LlmFallback(Payload):
    reason: str  # connect | dropped | http | protocol | first_token_timeout | stall | breaker_open
    detail: str
    partial_chars: int  # what the remote model had said before it failed
    breaker: str


@payload
class LlmBackend(Payload):
    state: str  # the remote LLM's circuit breaker: closed | open | half-open
    previous: str | None = None


PAYLOADS: dict[EventType, type[Payload]] = {
    EventType.WAKE_DETECTED: WakeDetected,
    EventType.WAKE_ARBITRATION: WakeArbitration,
    EventType.TURN_START: TurnStart,
    EventType.LISTEN_START: NoFields,
    EventType.SPEECH_START: SpeechStart,
    EventType.END_OF_TURN: EndOfTurn,
    EventType.SPEECH_END: SpeechEnd,
    EventType.SPEECH_RESUMED: SpeechResumed,
    EventType.NO_SPEECH: NoSpeech,
    EventType.STT_START: SttStart,
    EventType.STT_END: SttEnd,
    EventType.COMMAND: Command,
    EventType.LLM_START: LlmStart,
    EventType.LLM_FIRST_TOKEN: Took,
    EventType.LLM_SENTENCE: Text,
    EventType.LLM_END: LlmEnd,
    EventType.TTS_START: Text,
    EventType.TTS_END: TtsEnd,
    EventType.PLAYBACK_START: PlaybackStart,
    EventType.PLAYBACK_END: Text,
    EventType.TURN_END: TurnEnd,
    EventType.TURN_ERROR: TurnError,
    EventType.TURN_CANCELLED: NoFields,
    EventType.EXCHANGE_RECORDED: ExchangeRecorded,
    EventType.REPLY_INTERRUPTED: ReplyInterrupted,
    EventType.SELF_WAKE_IGNORED: SelfWakeIgnored,
    EventType.STATE_CHANGED: StateChanged,
    EventType.BUTTON: Button,
    EventType.MUTE_CHANGED: MuteChanged,
    EventType.VOLUME_CHANGED: VolumeChanged,
    EventType.PERSONA_SWITCHED: PersonaSwitched,
    EventType.TIMER_SET: Timer,
    EventType.TIMER_RANG: Timer,
    EventType.LED_OVERRIDE: LedOverride,
    EventType.AUDIO_DEVICE: AudioDevice,
    EventType.CONTROL_LINK: ControlLinkChanged,
    EventType.CONTROL_FRAME_REFUSED: ControlFrameRefused,
    EventType.LLM_FALLBACK: LlmFallback,
    EventType.LLM_BACKEND: LlmBackend,
}


def payload(type_: EventType, **data: Any) -> Payload:
    """The typed payload of an event; TypeError names the event when a field is wrong."""
    try:
        return PAYLOADS[type_](**data)
    except KeyError:
        raise TypeError(f"event type {type_} has no payload class in PAYLOADS") from None
    except TypeError as exc:
        raise TypeError(f"{type_} event: {exc}") from None


class PipelineState(StrEnum):
    IDLE = "idle"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"
    MUTED = "muted"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    payload: Payload = field(default_factory=NoFields)
    turn_id: str | None = None
    timestamp: float = field(default_factory=time.monotonic)
    wall_time: float = field(default_factory=time.time)

    @property
    def data(self) -> dict[str, Any]:
        """The payload's fields as a dict (what consumers and ``as_dict`` read)."""
        return self.payload.as_dict()

    def as_dict(self) -> dict[str, Any]:
        return {"type": str(self.type), "turn_id": self.turn_id, "t": self.timestamp,
                "wall_time": self.wall_time, **self.data}


class EventBus:
    """Fan-out of events. ``publish`` never blocks: a slow subscriber loses its oldest events
    (and that is counted) instead of stalling the microphone."""

    def __init__(self, *, queue_size: int = 1000) -> None:
        self._queues: set[asyncio.Queue[Event]] = set()
        self._callbacks: list[Callable[[Event], None]] = []
        self._queue_size = queue_size
        self.dropped = 0

    def publish(self, event: Event) -> None:
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:  # a consumer's bug must not break the producer
                log.exception("event callback failed", event_type=str(event.type))
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(event)

    def emit(self, type_: EventType, turn_id: str | None = None, **data: Any) -> Event:
        event = Event(type_, payload(type_, **data), turn_id)
        self.publish(event)
        return event

    def add_callback(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback`` synchronously for each event; returns a function that removes it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    @contextmanager
    def subscription(self):
        queue: asyncio.Queue[Event] = asyncio.Queue(self._queue_size)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)

    async def subscribe(self) -> AsyncIterator[Event]:
        with self.subscription() as queue:
            while True:
                yield await queue.get()
