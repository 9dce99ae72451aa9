"""The control-plane wire format (SPEC §4): one JSON object per WebSocket text frame.

    device → server: {"id", "type", "payload", "timestamp"}
    server → device: {"id", "type", "payload", "priority"}

Every server → device type has a pydantic payload model, so a bad frame is refused with an
``error`` frame that names the problem (field and reason) before anything in the daemon changes.
SPEC §9 adds ``wake_detected`` (device → server) and ``wake_arbitration`` (server → device);
neither is a command: no ack, no outbox, no resend (a result is useless after its window).
Two additions to SPEC §4, both optional for a server: ``received`` (server → device, ``{"ids":
[...], "server_time": epoch s}``: those frames are stored, the device may drop them from its
outbox; it also gives the clock-offset samples) and the ``X-Companion-Receipts: 1`` header on
the WebSocket handshake response that says the server sends ``received`` frames.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from companion.actions.device import LedRequest
from companion.actions.handoff import HandoffInRequest, HandoffOutRequest

RECEIPTS_HEADER = "X-Companion-Receipts"
PROTOCOL_VERSION = 1

# device → server
HELLO = "hello"
HEARTBEAT = "heartbeat"
TEXT_INPUT = "text_input"
TRANSCRIPT = "transcript"
REPLY = "reply"
BUTTON_PRESS = "button_press"
AUDIO_STREAM = "audio_stream"
ACK = "ack"
SESSION_EXPORT = "session_export"
ERROR = "error"
WAKE_DETECTED = "wake_detected"  # SPEC §9: sent outside the outbox (stale after the window)
DEVICE_TYPES = frozenset({HELLO, HEARTBEAT, TEXT_INPUT, TRANSCRIPT, REPLY, BUTTON_PRESS,
                          AUDIO_STREAM, ACK, SESSION_EXPORT, ERROR, WAKE_DETECTED})
# what must reach the server even when the outbox overflows (dropped last)
ESSENTIAL_TYPES = frozenset({ACK, SESSION_EXPORT})

RECEIVED = "received"  # server → device delivery receipt (extension, see the module docstring)
WAKE_ARBITRATION = "wake_arbitration"  # SPEC §9: a result, not a command (no ack, no outbox)



class ProtocolError(ValueError):
    """A frame the device refuses; becomes an ``error`` frame back to the server."""

    def __init__(self, code: str, message: str, *, ref_id: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref_id = ref_id
        self.details = details or {}

    def payload(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "ref_id": self.ref_id,
                "details": self.details}


class _Payload(BaseModel):
    # unknown keys are ignored (a newer server may send more); missing or wrong ones are errors
    model_config = ConfigDict(frozen=True, extra="ignore")


class PersonaSwitch(_Payload):
    persona_id: str = Field(min_length=1, max_length=64)
    preserve_context: bool = True
    transition_message: str | None = Field(None, max_length=2000)


class AudioResponse(_Payload):
    text: str | None = Field(None, max_length=4000)
    audio_b64: str | None = None  # a WAV file (16-bit PCM), base64
    audio_url: str | None = Field(None, pattern=r"^https?://")

    @model_validator(mode="after")
    def _something_to_play(self) -> AudioResponse:
        if not (self.text or self.audio_b64 or self.audio_url):
            raise ValueError("needs text, audio_b64 or audio_url")
        return self


class Announce(_Payload):
    event_type: str = Field("announcement", max_length=64)
    payload: dict[str, Any] = Field(default_factory=dict)
    text: str | None = Field(None, max_length=4000)
    audio_b64: str | None = None

    @property
    def spoken_text(self) -> str | None:
        inner = self.payload.get("text") or self.payload.get("message")
        return self.text or (str(inner) if inner else None)


class LedControl(LedRequest):
    """The ``led`` action's request, with the wire's rules (unknown keys ignored, frozen)."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class SessionHandoffOut(HandoffOutRequest):
    model_config = ConfigDict(frozen=True, extra="ignore")


class SessionHandoffIn(HandoffInRequest):
    model_config = ConfigDict(frozen=True, extra="ignore")


class TriviaConfig(_Payload):
    topic: str | None = Field(None, max_length=200)
    question: str | None = Field(None, max_length=1000)
    answer: str | None = Field(None, max_length=200)
    announce_result: bool = True
    answer_timeout_s: float = Field(8.0, ge=1.0, le=60.0)


class StoryConfig(_Payload):
    story_so_far: str | None = Field(None, max_length=4000)
    theme: str | None = Field(None, max_length=200)
    prompt: str | None = Field(None, max_length=200)
    sentences: int = Field(2, ge=1, le=6, description="bounded: each asks the LLM for ~40 tokens")
    listen: bool = True
    answer_timeout_s: float = Field(8.0, ge=1.0, le=60.0)


ACTIVITY_CONFIGS: dict[str, type[_Payload]] = {"trivia": TriviaConfig, "story": StoryConfig}


class GroupActivity(_Payload):
    activity_type: Literal["trivia", "story", "sync_playback"]
    persona_id: str | None = Field(None, max_length=64)
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bounded_config(cls, data: Any) -> Any:
        """Every value the activity uses is checked here (bounds included), before it runs:
        a story of a million sentences or an hour-long listen is refused, not attempted."""
        if not isinstance(data, dict) or not isinstance(data.get("config", {}), dict):
            return data
        model = ACTIVITY_CONFIGS.get(str(data.get("activity_type")))
        if model is None:
            return data
        try:
            config = model.model_validate(data.get("config", {}))
        except ValidationError as exc:
            raise ValueError("; ".join(
                f"config.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )) from None
        return {**data, "config": config.model_dump(exclude_none=True)}


class SyncEvent(_Payload):
    at: float = Field(description="server time (epoch seconds, or ISO-8601) to act at")
    action: Literal["say", "play", "led"] = "say"
    text: str | None = Field(None, max_length=4000)
    audio_b64: str | None = None
    led: LedControl | None = None

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        return value

    @model_validator(mode="after")
    def _has_material(self) -> SyncEvent:
        if self.action == "say" and not self.text:
            raise ValueError("action 'say' needs text")
        if self.action == "play" and not (self.audio_b64 or self.text):
            raise ValueError("action 'play' needs audio_b64 (or text to synthesize)")
        if self.action == "led" and self.led is None:
            raise ValueError("action 'led' needs led")
        return self


class ConfigUpdate(_Payload):
    settings: dict[str, Any] = Field(min_length=1, description="'section.key': value, or nested")


class Ping(_Payload):
    server_time: float | None = None


class Received(_Payload):
    ids: list[str] = Field(default_factory=list)
    server_time: float | None = None


class WakeDetected(_Payload):
    """device → server (and peer → peer): this device heard a wake word (SPEC §9)."""

    turn_id: str = Field(min_length=1, max_length=128)
    word: str = Field(min_length=1, max_length=64)
    score: float = Field(ge=0.0, le=1.0)
    level_dbfs: float = Field(ge=-200.0, le=10.0)
    snr_db: float = Field(ge=0.0, le=300.0)
    at: float = Field(description="wake time on the control plane's clock (epoch seconds)")
    room: str = Field("default", min_length=1, max_length=64)
    window_ms: int = Field(200, ge=1, le=10_000)


class WakeArbitration(_Payload):
    """server → device: which device of the room answers the wake word of ``turn_id``."""

    turn_id: str = Field(min_length=1, max_length=128)
    winner_device_id: str = Field(min_length=1, max_length=64)


SERVER_PAYLOADS: dict[str, type[_Payload]] = {
    "persona_switch": PersonaSwitch,
    "audio_response": AudioResponse,
    "led_control": LedControl,
    "announce": Announce,
    "broadcast": Announce,
    "session_handoff_out": SessionHandoffOut,
    "session_handoff_in": SessionHandoffIn,
    "group_activity": GroupActivity,
    "sync_event": SyncEvent,
    "config_update": ConfigUpdate,
    "ping": Ping,
    RECEIVED: Received,
    WAKE_ARBITRATION: WakeArbitration,
}
COMMAND_TYPES = frozenset(SERVER_PAYLOADS) - {RECEIVED, WAKE_ARBITRATION}


class ServerFrame(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(min_length=1, max_length=128)
    type: str = Field(min_length=1, max_length=64)
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(0, ge=0, le=10)


class Command(BaseModel):
    """A validated server frame: the envelope plus its typed payload."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    id: str
    type: str
    priority: int
    payload: Any
    raw: dict[str, Any]


def _describe(exc: ValidationError, prefix: str = "") -> tuple[str, list[dict[str, str]]]:
    fields = [{"field": prefix + ".".join(str(p) for p in e["loc"]) if e["loc"] else prefix.rstrip("."),
               "error": e["msg"]} for e in exc.errors()]
    return "; ".join(f"{f['field'] or '(payload)'}: {f['error']}" for f in fields), fields


def parse_server_frame(raw: str | bytes, *, max_bytes: int) -> Command:
    """Validate one frame from the server or raise ProtocolError naming what is wrong."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise ProtocolError("frame_too_large", f"frame of {size} bytes exceeds the limit of "
                            f"{max_bytes} bytes", details={"size": size, "limit": max_bytes})
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("malformed_json", f"frame is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("malformed_json", "frame is nested too deeply") from None
    if not isinstance(data, dict):
        raise ProtocolError("malformed_frame", f"frame must be a JSON object, not "
                            f"{type(data).__name__}")
    ref = data.get("id") if isinstance(data.get("id"), str) else None
    try:
        frame = ServerFrame.model_validate(data)
    except ValidationError as exc:
        message, fields = _describe(exc)
        raise ProtocolError("invalid_frame", message, ref_id=ref,
                            details={"fields": fields}) from None
    model = SERVER_PAYLOADS.get(frame.type)
    if model is None:
        raise ProtocolError("unknown_type", f"unknown frame type {frame.type!r}; known: "
                            + ", ".join(sorted(SERVER_PAYLOADS)), ref_id=frame.id,
                            details={"type": frame.type})
    try:
        payload = model.model_validate(frame.payload)
    except ValidationError as exc:
        message, fields = _describe(exc, "payload.")
        raise ProtocolError("invalid_payload", f"{frame.type}: {message}", ref_id=frame.id,
                            details={"type": frame.type, "fields": fields}) from None
    return Command(id=frame.id, type=frame.type, priority=frame.priority, payload=payload,
                   raw=data)


def new_frame_id() -> str:
    return f"msg_{uuid.uuid4().hex[:20]}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def device_frame(type_: str, payload: dict[str, Any], *, frame_id: str | None = None) -> dict[str, Any]:
    """A device → server frame (SPEC §4 envelope)."""
    return {"id": frame_id or new_frame_id(), "type": type_, "payload": payload,
            "timestamp": now_iso()}


def server_frame(type_: str, payload: dict[str, Any], *, frame_id: str | None = None,
                 priority: int = 0) -> dict[str, Any]:
    """A server → device frame (used by the dev control plane and tests)."""
    return {"id": frame_id or f"cmd_{uuid.uuid4().hex[:20]}", "type": type_, "payload": payload,
            "priority": priority}


def error_frame(error: ProtocolError) -> dict[str, Any]:
    return device_frame(ERROR, error.payload())
