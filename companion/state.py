"""The device's live status: pipeline state, mute, volume, activity and recent turn timings.

One object, written by the pipeline and commands, read by the HTTP API, LEDs, heartbeats and
`companion check`. Changes of pipeline state go out on the bus as STATE_CHANGED events.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from companion.events import EventBus, EventType, PipelineState


@dataclass
class TurnTimings:
    """Seconds, per stage, for one voice turn (None when the stage did not run)."""

    turn_id: str
    wake_s: float | None = None  # wake model compute for the chunk that fired
    endpoint_s: float | None = None  # audio seconds of speech + the silence that ended it
    stt_s: float | None = None
    llm_first_token_s: float | None = None
    llm_first_sentence_s: float | None = None
    tts_first_sentence_s: float | None = None
    end_of_speech_to_first_audio_s: float | None = None  # from the endpoint's decision
    speech_end_to_first_audio_s: float | None = None  # including the silence window
    total_s: float | None = None
    # bookkeeping while the turn runs, not reported
    _decided_at: float | None = None  # perf_counter when the endpoint decided speech ended
    _silence_window_s: float = 0.0
    _deadline: Any = None  # the turn's asyncio.Timeout, stopped at the first audio

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class DeviceStatus:
    bus: EventBus
    device_id: str
    started_at: float = field(default_factory=time.time)
    pipeline_state: PipelineState = PipelineState.IDLE
    muted: bool = False
    volume: float = 0.8
    last_activity: float | None = None
    recent_turns: deque[TurnTimings] = field(default_factory=lambda: deque(maxlen=200))
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)  # component → what is wrong (LED: error)

    def set_state(self, state: PipelineState, turn_id: str | None = None) -> None:
        if self.muted and state is PipelineState.IDLE:
            state = PipelineState.MUTED  # the microphone's state first: that is privacy
        elif self.faults and state is PipelineState.IDLE:
            state = PipelineState.ERROR  # at rest, a fault shows until it is gone
        if state is self.pipeline_state:
            return
        previous, self.pipeline_state = self.pipeline_state, state
        if state not in (PipelineState.IDLE, PipelineState.MUTED):
            self.last_activity = time.time()
        self.bus.emit(EventType.STATE_CHANGED, turn_id, state=str(state), previous=str(previous))

    def set_component(self, name: str, healthy: bool, detail: str = "",
                      latency_ms: float | None = None) -> None:
        self.components[name] = {"healthy": healthy, "detail": detail, "latency_ms": latency_ms}

    def set_fault(self, name: str, problem: str | None) -> None:
        """A component that keeps the device from working as it should (``problem``), or
        that works again (None): shown at rest as the error state, cleared by itself."""
        if problem is None:
            self.faults.pop(name, None)
        else:
            self.faults[name] = problem
        if self.pipeline_state in (PipelineState.IDLE, PipelineState.ERROR):
            self.set_state(PipelineState.IDLE)

    @property
    def uptime_s(self) -> float:
        return time.time() - self.started_at
