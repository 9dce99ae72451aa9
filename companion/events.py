"""Typed events on one bus: the pipeline produces them; LEDs, the HTTP API, metrics and the
control link consume them. Producers never wait for consumers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    SPEECH_END = "speech-end"
    NO_SPEECH = "no-speech"
    STT_START = "stt-start"
    STT_END = "stt-end"
    COMMAND = "command"
    LLM_START = "llm-start"
    LLM_FIRST_TOKEN = "llm-first-token"
    LLM_SENTENCE = "llm-sentence"
    LLM_END = "llm-end"
    TTS_START = "tts-start"
    TTS_END = "tts-end"
    PLAYBACK_START = "playback-start"
    PLAYBACK_END = "playback-end"
    TURN_END = "turn-end"
    TURN_ERROR = "turn-error"
    TURN_CANCELLED = "turn-cancelled"
    EXCHANGE_RECORDED = "exchange-recorded"  # a user's words and the reply, stored (any source)
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
    data: dict[str, Any] = field(default_factory=dict)
    turn_id: str | None = None
    timestamp: float = field(default_factory=time.monotonic)
    wall_time: float = field(default_factory=time.time)

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
        event = Event(type_, data, turn_id)
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
