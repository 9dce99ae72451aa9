"""Request and response bodies of the local HTTP API (SPEC §3).

The handlers validate requests with these models and build responses from them, and the OpenAPI
document is generated from the same classes, so the document cannot drift from the code.
Requests forbid unknown fields: a typo (``temprature``) is a 422, not silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors ----------------------------------------------------------------------------------------


class FieldError(_Response):
    field: str
    error: str


class ErrorBody(_Response):
    code: str = Field(description="BAD_REQUEST, UNAUTHORIZED, FORBIDDEN, NOT_FOUND, "
                      "METHOD_NOT_ALLOWED, PAYLOAD_TOO_LARGE, VALIDATION_ERROR, RATE_LIMITED, "
                      "INTERNAL_ERROR, UPSTREAM_ERROR, UPSTREAM_TIMEOUT, SERVICE_UNAVAILABLE")
    message: str
    details: dict[str, Any] = Field(default_factory=dict)
    request_id: str


class ErrorResponse(_Response):
    error: ErrorBody


# --- health and readiness ------------------------------------------------------------------------


class HealthResponse(_Response):
    status: Literal["ok"] = "ok"


class InferenceHealth(_Response):
    healthy: bool
    model: str | None
    latency_ms: float | None = Field(description="Time of the last inference (HTTP or voice) in "
                                     "ms; null until there has been one.")


class ReadyResponse(_Response):
    status: Literal["ready"] = "ready"
    inference: InferenceHealth


class ComponentHealth(_Response):
    healthy: bool
    enabled: bool = Field(description="False when the component is off or absent by design "
                          "(then healthy is true).")
    detail: str = ""
    latency_ms: float | None = None


class Percentiles(_Response):
    count: int
    p50: float | None
    p90: float | None
    p99: float | None


class ReadyAllResponse(_Response):
    status: Literal["ready", "degraded", "loading", "failed"]
    components: dict[str, ComponentHealth]
    latency_ms: dict[str, Percentiles] = Field(
        description="Percentiles (ms) over recent voice turns, per stage.")
    load_error: str | None = None


# --- chat ------------------------------------------------------------------------------------------


class ChatRequest(_Request):
    message: str = Field(min_length=1, max_length=4000, description="What the user says.")
    conversation_id: str | None = Field(
        None, min_length=1, max_length=64,
        description="Continue this conversation (voice or HTTP); unset = the device's active one.")
    new_conversation: bool = Field(
        False, description="Start a new conversation (its id comes back as conversation_id) "
        "instead of continuing the device's active one; ignored with conversation_id.")
    system_prompt: str | None = Field(None, min_length=1, max_length=8000,
                                      description="Replaces the persona's prompt for this turn.")
    model: str | None = Field(None, max_length=200,
                              description="Must name the loaded LLM (only one is loaded).")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    speak: bool = Field(False, description="Also say the reply aloud in the persona's voice.")


class TokenCounts(_Response):
    prompt: int
    completion: int
    total: int


class ChatResponse(_Response):
    id: str = Field(description="The turn id.")
    conversation_id: str
    role: Literal["assistant"] = "assistant"
    content: str
    persona_id: str
    model: str
    tokens: TokenCounts
    latency_ms: float
    created_at: str = Field(description="ISO-8601, UTC.")
    spoken: bool = Field(False, description="True when the reply is being said aloud.")


class StreamDelta(_Response):
    """The ``data`` of each ``event: message`` of /v1/chat/stream."""

    delta: str


class StreamDone(_Response):
    """The ``data`` of the final ``event: done`` of /v1/chat/stream."""

    id: str
    tokens: TokenCounts
    conversation_id: str
    persona_id: str
    model: str
    latency_ms: float
    spoken: bool = False


# --- commands --------------------------------------------------------------------------------------


class CommandRequest(_Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"command": "time"}, {"command": "volume", "args": {"level": 40}},
        {"command": "timer", "args": {"minutes": 5, "label": "tea"}},
        {"command": "say", "args": {"text": "Lunch is ready."}}, {"command": "status"},
    ]})

    command: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)


class CommandResponse(_Response):
    command: str
    status: Literal["completed", "failed"]
    result: dict[str, Any]
    executed_at: str


class ParseRequest(_Request):
    input: str = Field(min_length=1, max_length=1000)


class ParsedCommand(_Response):
    command: str
    args: dict[str, Any]


class ParseResponse(_Response):
    input: str
    parsed: bool = Field(description="True when the input was recognised as a command.")
    command: ParsedCommand | None
    confidence: float = Field(ge=0.0, le=1.0)
    requires_approval: bool


# --- system ----------------------------------------------------------------------------------------


class Resources(_Response):
    memory_used_mb: float
    cpu_percent: float
    database_size_mb: float


class Statistics(_Response):
    requests_total: int
    inference_requests: int
    inference_failures: int
    turns_today: int
    voice_turns: int
    active_timers: int
    events_dropped: int


class SystemStatusResponse(_Response):
    version: str
    device_id: str
    uptime_seconds: float
    resources: Resources
    statistics: Statistics


class ModelInfo(_Response):
    id: str
    name: str
    kind: Literal["stt", "llm", "tts", "wake"]
    parameters: str | None
    size_bytes: int | None
    context_length: int | None
    default: bool
    installed: bool
    active: bool


class ModelsResponse(_Response):
    models: list[ModelInfo]


# --- personas --------------------------------------------------------------------------------------


class PersonaSummary(_Response):
    id: str
    name: str
    description: str
    version: str
    tags: list[str]
    led_color: str
    active: bool


class PersonaListResponse(_Response):
    personas: list[PersonaSummary]
    active_persona_id: str


class PersonaDetail(PersonaSummary):
    aliases: list[str]
    system_prompt: str
    character: dict[str, Any]
    voice_config: dict[str, Any]
    behavior_config: dict[str, Any]


class SwitchRequest(_Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"target_persona_id": "medication_nurse", "preserve_context": True},
        {"target_persona_id": "companion", "preserve_context": False}]})

    target_persona_id: str = Field(min_length=1, max_length=64)
    preserve_context: bool = True
    transition_message: str | None = Field(None, min_length=1, max_length=1000,
                                           description="Said in the new persona's voice.")


class SwitchResponse(_Response):
    success: bool
    previous_persona_id: str
    new_persona_id: str
    switch_latency_ms: float
    session_id: str


class ReloadResponse(_Response):
    personas: list[str]
    errors: list[str]


# --- state and sessions ------------------------------------------------------------------------------


class StateMetrics(_Response):
    uptime_hours: float
    interactions_today: int
    avg_response_latency_ms: float | None


class ControlLink(_Response):
    configured: bool
    connected: bool | None = None
    since: str | None = None
    retries: int | None = None
    outbox_depth: int | None = None


class StateResponse(_Response):
    device_id: str
    status: Literal["online", "offline", "busy"]
    pipeline_state: str
    active_persona_id: str
    active_session_id: str | None
    last_activity: str | None
    muted: bool
    volume: float
    speaking: bool
    control_plane: ControlLink
    metrics: StateMetrics


class SessionMessage(_Response):
    role: str
    content: str
    turn_id: str | None
    persona_id: str | None
    source: str | None
    created_at: str


class SessionResponse(_Response):
    id: str
    persona_id: str
    created_at: str
    updated_at: str
    summary: str | None
    origin: str | None
    active: bool
    messages: list[SessionMessage]


class SessionDeleted(_Response):
    id: str
    deleted: bool


# --- metrics -----------------------------------------------------------------------------------------


class HttpMetrics(_Response):
    requests_total: int
    by_class: dict[str, int]
    active: int
    response_time_avg_ms: float | None


class InferenceMetrics(_Response):
    requests: int
    failures: int
    time_avg_ms: float | None
    tokens_total: int
    fallbacks: int = Field(0, description="Replies the local model wrote because the remote "
                           "LLM (llm.backend = openai) failed or its breaker was open.")
    remote_breaker: str | None = Field(None, description="The remote LLM's circuit breaker: "
                                       "closed (in use), open, half-open; null with llm.backend = local.")


class StageMetrics(_Response):
    count: int
    avg_ms: float | None


class MetricsResponse(_Response):
    http: HttpMetrics
    inference: InferenceMetrics
    pipeline: dict[str, StageMetrics]
