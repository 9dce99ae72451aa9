"""All settings of the daemon, in one typed tree.

Sources, strongest first: keyword arguments (tests), ``COMPANION_*`` environment variables
(nested with ``__``, lists as JSON), then a TOML file (``--config``, else ``./companion.toml``,
else ``/etc/companion/companion.toml``). Every model is frozen: a run-time change
(``config_update``) makes a new copy with ``model_copy(update=...)``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from companion.credentials import fill_secrets

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_CANDIDATES = (Path("companion.toml"), Path("/etc/companion/companion.toml"))


def _default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/companion")
    return Path.home() / ".local/share/companion"


def is_loopback_host(host: str | None) -> bool:
    """True for names and addresses that never leave this machine (127.0.0.0/8, ::1,
    localhost): the one place the daemon decides what "loopback" means."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_device_id() -> str:
    name = socket.gethostname().split(".")[0].lower()
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name) or "companion"


class _Section(BaseModel):
    # hide_input_in_errors: a refused section must not print its secrets in the error
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class AudioSettings(_Section):
    input_device: str | None = Field(
        None, description="Capture device name (substring match); unset = system default."
    )
    output_device: str | None = Field(
        None, description="Playback device name (substring match); unset = system default."
    )
    sample_rate: Literal[16000] = Field(
        16000, description="Pipeline sample rate; devices at other rates are resampled."
    )
    block_ms: int = Field(
        30, ge=10, le=100, description="Capture block length; 10/20/30 ms suit webrtcvad."
    )
    queue_blocks: int = Field(
        200, ge=10, description="Bounded capture queue; when full, frames are dropped."
    )
    output_volume: float = Field(
        0.8, ge=0.0, le=1.0, description="Speaker volume at start (0..1), changed by commands."
    )
    echo_cancel: Literal["auto", "webrtc", "system", "off"] = Field(
        "auto", description="Take the device's own voice out of the microphone: 'webrtc' "
        "in-process (WebRTC AEC3, pywebrtc-audio), 'system' the sound server's echo-cancel "
        "source (PulseAudio/PipeWire module-echo-cancel as the default source), 'auto' system "
        "when there is one, else webrtc, 'off'."
    )
    noise_suppression: bool = Field(
        False, description="WebRTC noise suppression on the microphone before wake word, VAD "
        "and STT (off by default: scripts/bench_echo.py measures where it lowers the WER)."
    )


class WakeSettings(_Section):
    models: list[str] = Field(
        default_factory=lambda: ["hey_jarvis"],
        description="openWakeWord models to run at once (names of bundled models or .onnx paths).",
    )
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Default score that fires.")
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="Per-word threshold overrides, e.g. {hey_jarvis=0.6}."
    )
    refractory_s: float = Field(
        2.0, ge=0.0, description="Audio seconds after a detection in which the word cannot fire."
    )
    enabled: bool = Field(True, description="Listen for wake words at all.")
    speech_gate: bool = Field(
        False, description="Score only around speech: in a quiet room openWakeWord rests, and "
        "at the first sign of speech it is given the audio just before it (gate_context_s) "
        "and scores on until gate_hold_s without speech. Off by default: with it on, the two "
        "tests of the wake word said over the device's reply failed once in a clean-clone CI "
        "run (cause not yet found); idle CPU 0.44 of openWakeWord's own with it, about 2 without."
    )
    gate_context_s: float = Field(
        2.0, ge=0.5, le=5.0, description="Audio before the speech that woke the gate, scored "
        "first: openWakeWord needs about 2 s to fill its feature window."
    )
    gate_hold_s: float = Field(
        2.0, ge=0.3, description="Silence after which openWakeWord rests again."
    )

    def threshold_for(self, word: str) -> float:
        return self.thresholds.get(word, self.threshold)


class VadSettings(_Section):
    aggressiveness: int = Field(2, ge=0, le=3, description="webrtcvad mode: 0 lenient .. 3 strict.")
    speech_start_s: float = Field(
        0.09, ge=0.0, description="Speech needed before an utterance counts as started."
    )
    min_speech_s: float = Field(
        0.3, ge=0.0, description="An utterance with less speech than this is noise (the tail "
        "of the wake word, a click): the endpointer goes on waiting."
    )
    silence_end_s: float = Field(
        0.6, ge=0.1, description="Silence after speech that ends the utterance."
    )
    max_utterance_s: float = Field(15.0, gt=1.0, description="Hard cap on an utterance.")
    no_speech_timeout_s: float = Field(
        6.0, gt=0.5, description="Give up when no speech starts within this much audio."
    )
    pre_roll_s: float = Field(
        0.3, ge=0.0, le=2.0, description="Audio kept from before speech start (first syllable)."
    )
    noise_margin_db: float = Field(
        0.0, ge=0.0, le=30.0, description="Speech must stand this far above the room's noise "
        "floor (babble, a television); 0 (default for now) = webrtcvad alone; 6 is measured."
    )


class TurnSettings(_Section):
    """When an utterance ends: by what was said (the LLM's end-of-turn probability) as well as
    by silence. ``semantic = false`` goes back to the fixed ``vad.silence_end_s`` window."""

    semantic: bool = Field(
        True, description="Judge at each pause whether the words so far are a complete turn."
    )
    complete_threshold: float = Field(
        0.02, gt=0.0, lt=1.0, description="End-of-turn probability from which an utterance "
        "counts as complete (SmolLM2-135M: unfinished sentences score < 0.002, finished ones "
        "0.02-0.98)."
    )
    complete_silence_s: float = Field(
        0.25, ge=0.05, description="Silence that ends a complete utterance."
    )
    incomplete_silence_s: float = Field(
        1.1, ge=0.2, description="Silence that ends an utterance judged incomplete (a pause "
        "mid-sentence); also the longest silence ever waited."
    )
    probe_silence_s: float = Field(
        0.15, ge=0.03, description="Silence after which the words so far are transcribed and "
        "judged; a local command ends here."
    )
    normalize_text: bool = Field(
        True, description="Judge the words without their final punctuation (Whisper "
        "punctuates unfinished sentences too)."
    )
    streaming_stt: bool = Field(
        False, description="Transcribe while the person talks, keeping the stable words, so "
        "only the last piece is left at the end. Off by default: Whisper pads every pass to 30 s, "
        "so the last piece costs as much as the whole, and stitching the passes raised the word "
        "error rate (scripts/bench.py voice --runs 3: 0.211 vs 0.038; end of speech to first "
        "audio 1.23 s vs 1.20 s)."
    )
    partial_every_s: float = Field(
        0.8, ge=0.2, description="New speech between two background transcription passes."
    )
    resume_window_s: float = Field(
        1.0, ge=0.0, description="After the endpoint, speech within this much audio, before "
        "any of the answer is heard, goes on with the same utterance (a pause after \"a short "
        "recipe for pancakes\" then \"with bananas\"): the answer being prepared is dropped "
        "without a trace and the whole utterance is answered. 0 = off."
    )
    speculative_answer: bool = Field(
        True, description="When a pause is judged a complete question, begin the answer (LLM "
        "and the first sentence's synthesis) while the rest of the closing silence is counted; "
        "discarded without a trace if speech resumes, played only once the turn is committed."
    )


class SttSettings(_Section):
    model: str = Field("whisper-tiny.en", description="Model name from models/manifest.toml.")
    compute_type: str = Field("int8", description="CTranslate2 compute type.")
    language: str = Field("en", description="Spoken language.")
    beam_size: int = Field(1, ge=1, le=10, description="1 = greedy, fastest.")
    threads: int = Field(2, ge=1, description="CPU threads for CTranslate2.")


class LlmSettings(_Section):
    model: str = Field("smollm2-135m-instruct", description="Model name or a .gguf path.")
    context_length: int = Field(2048, ge=256, description="llama.cpp context window (tokens).")
    threads: int = Field(2, ge=1, description="CPU threads for llama.cpp.")
    nice: int = Field(
        5, ge=0, le=19, description="Scheduling priority of the LLM threads (higher = lower): "
        "the event loop, microphone and HTTP API go first while the LLM writes."
    )
    temperature: float = Field(0.2, ge=0.0, le=2.0, description="Default sampling temperature.")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    repeat_penalty: float = Field(1.1, ge=1.0, le=2.0)
    max_tokens: int = Field(96, ge=1, le=4096, description="Default reply length cap.")
    history_token_budget: int = Field(
        700, ge=64, description="Tokens of conversation history given to each turn."
    )
    character_in_prompt: bool = Field(
        False, description="Also put traits, backstory, topics, likes in the system prompt "
        "(for models of 1B+; the 135M default answers worse with them)."
    )
    summary_enabled: bool = Field(
        True, description="Fold turns that outgrow the budget into an LLM-written summary."
    )
    prefix_cache_size: int = Field(
        8, ge=1, description="Evaluated persona prompts (llama.cpp states) kept in memory."
    )
    backend: Literal["local", "openai"] = Field(
        "local", description="`local`: llama.cpp in this process. `openai`: an OpenAI-compatible "
        "server on the LAN (llama.cpp's server, Ollama, vLLM), with the local model as fallback."
    )
    base_url: str | None = Field(
        None, description="The remote server's API root, e.g. http://192.168.1.20:8080/v1 "
        "(llama.cpp server) or http://192.168.1.20:11434/v1 (Ollama)."
    )
    api_key: SecretStr | None = Field(None, description="Bearer key of the remote server, if any.")
    remote_model: str = Field(
        "default", description="Model name sent to the remote server (Ollama: e.g. "
        "`qwen2.5:1.5b`; llama.cpp's server serves its one model under any name)."
    )
    remote_first_token_s: float = Field(
        4.0, gt=0.0, description="Fall back to the local model when the remote one has not "
        "sent its first words within this time (connection included)."
    )
    remote_stall_s: float = Field(
        2.0, gt=0.0, description="Fall back when the remote stream goes silent this long."
    )
    remote_connect_s: float = Field(1.0, gt=0.0, description="TCP connect timeout.")
    breaker_failures: int = Field(
        2, ge=1, description="Consecutive remote failures that open the circuit breaker: the "
        "local model answers at once, without waiting for the remote one to time out."
    )
    breaker_reset_s: float = Field(
        30.0, gt=0.0, description="How long the breaker stays open before one turn tries the "
        "remote server again."
    )
    fallback: bool = Field(
        True, description="With `openai`: the local model answers when the remote one fails. "
        "Off: the remote model only (a household that wants no answer from the small model); a "
        "failure is then an error, and a voice turn says a short apology."
    )

    @model_validator(mode="after")
    def _remote_needs_url(self) -> LlmSettings:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("llm.backend = 'openai' needs llm.base_url")
        return self


class TtsSettings(_Section):
    voice: str = Field("en_US-joe-medium", description="Default piper voice (manifest name).")
    voice_cache_size: int = Field(3, ge=1, description="Loaded voices kept in memory.")
    threads: int = Field(2, ge=1, description="CPU threads for piper's onnxruntime session.")
    sentence_silence_s: float = Field(0.15, ge=0.0, description="Pause between sentences.")


class GpioSettings(_Section):
    enabled: bool = Field(True, description="Use buttons and LEDs (skipped when no GPIO).")
    pin_factory: str | None = Field(
        None, description="gpiozero pin factory (e.g. 'mock' for tests); unset = gpiozero's choice."
    )
    talk_button_pin: int | None = Field(17, description="Button that starts a turn / stops speech.")
    mute_button_pin: int | None = Field(27, description="Button that toggles the microphone.")
    volume_up_pin: int | None = Field(None)
    volume_down_pin: int | None = Field(None)
    led_red_pin: int | None = Field(5)
    led_green_pin: int | None = Field(6)
    led_blue_pin: int | None = Field(13)
    long_press_s: float = Field(1.0, gt=0.0)
    double_press_s: float = Field(0.4, gt=0.0)


class ControlPlaneSettings(_Section):
    url: str | None = Field(None, description="ws(s)://host:port of the control plane; unset = off.")
    token: SecretStr | None = Field(
        None, description="Bearer token of this device (a secret: best in a credentials file)."
    )
    ca_file: Path | None = Field(
        None, description="PEM bundle of a private CA that signed the control plane's "
        "certificate; it replaces the system's CAs. Certificates are always verified."
    )
    allow_insecure_ws: bool = Field(
        False, description="Allow a ws:// (clear-text) url to a host that is not loopback; the "
        "device token then crosses the network readable by anyone on the path. Logged at start."
    )
    heartbeat_s: float = Field(15.0, gt=0.0, description="Heartbeat period.")
    backoff_initial_s: float = Field(1.0, gt=0.0, description="First reconnect delay.")
    backoff_max_s: float = Field(60.0, gt=0.0, description="Reconnect delay cap.")
    backoff_fatal_s: float = Field(300.0, gt=0.0, description="Delay after a 401/403.")
    reconnect_spread_s: float = Field(
        15.0, gt=0.0, description="After a working link drops, the first retry waits a random "
        "0..this many seconds, so a fleet does not stampede a restarted control plane."
    )
    outbox_max: int = Field(5000, ge=10, description="Messages kept while the link is down.")
    max_frame_bytes: int = Field(1_048_576, ge=1024, description="Largest frame accepted.")
    send_audio: bool = Field(False, description="Send captured utterances up as audio_stream.")
    audio_url_hosts: list[str] = Field(
        default_factory=list, description="Hosts an audio_url may name although they are on "
        "this machine or the local network (loopback, link-local, private addresses are refused "
        "otherwise), e.g. [\"media.local\"].",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("must be ws://host[:port] or wss://host[:port]")
        return value

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        try:
            ssl.create_default_context(cafile=str(value))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot use {value} as a CA bundle: {exc}") from None
        return value

    @model_validator(mode="after")
    def _no_clear_text_token(self) -> ControlPlaneSettings:
        if self.clear_text and not self.allow_insecure_ws:
            raise ValueError(
                f"ws:// to {self.host} would send the device token in clear text: use wss://, "
                "or set control_plane.allow_insecure_ws = true on a network you trust")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def host(self) -> str | None:
        return urlsplit(self.url).hostname if self.url else None

    @property
    def clear_text(self) -> bool:
        """A ws:// link that leaves this machine (the token is readable on the way)."""
        return bool(self.url) and urlsplit(self.url).scheme == "ws" \
            and not is_loopback_host(self.host)


class ArbitrationSettings(_Section):
    """Several devices hear one wake word: exactly one answers (docs/control-plane.md)."""

    enabled: bool = Field(True, description="Take part in wake word arbitration at all.")
    room: str = Field(
        "default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="The room group this device arbitrates wake words in (the control plane "
        "can assign it with config_update).",
    )
    window_ms: int = Field(
        200, ge=20, le=2000, description="How long a device waits for the result before it "
        "answers anyway; devices whose wake times fall within it arbitrate together.",
    )
    peer: bool = Field(
        False, description="Arbitrate peer to peer over UDP multicast when the control plane "
        "is down or silent (needs arbitration.secret).",
    )
    secret: SecretStr | None = Field(
        None, description="Shared group secret that signs peer announcements (HMAC-SHA256).",
    )
    peer_group: str = Field("239.255.42.99", description="IPv4 multicast group of the peers.")
    peer_port: int = Field(47613, ge=1, le=65535, description="UDP port of the peer group.")
    peer_interface: str = Field(
        "0.0.0.0", description="IPv4 address of the interface to multicast on; 0.0.0.0 = the "
        "system's choice.",
    )
    peer_beacon_s: float = Field(
        10.0, gt=0.0, description="How often a device tells its peers it is there (so a device "
        "alone in its room need not wait the window).",
    )

    @model_validator(mode="after")
    def _secret_for_peers(self) -> ArbitrationSettings:
        if self.peer and (self.secret is None or len(self.secret.get_secret_value()) < 16):
            raise ValueError("arbitration.peer needs arbitration.secret (16 characters or more)")
        return self


class ApiSettings(_Section):
    host: str = Field("127.0.0.1", description="Bind address; non-loopback needs api.keys.")
    port: int = Field(3000, ge=0, le=65535)
    keys: list[SecretStr] = Field(
        default_factory=list, description="Accepted Bearer keys (secrets: best in a credentials "
        "file, one a line)."
    )
    rate_limit_per_minute: int = Field(60, ge=1, description="Requests per client IP per minute.")
    max_concurrent_chats: int = Field(
        4, ge=1, description="Chats generating or waiting for the model at once; one more is "
        "answered 503 BUSY with Retry-After at once (voice turns go first and are not counted).")
    max_body_bytes: int = Field(65536, ge=1024, description="Largest request body.")

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def unprotected(self) -> str | None:
        """Why the API must not be served as configured (reachable from the network with no
        key), or None. `run`, `check` and the HTTP server all ask here."""
        if self.is_loopback or self.keys:
            return None
        return f"api.host is {self.host} (not loopback) but api.keys is empty"


class PersonaSettings(_Section):
    dir: Path = Field(PROJECT_ROOT / "personas", description="The persona library (*.toml).")
    default: str = Field("companion", description="Persona active at first start.")


class PipelineSettings(_Section):
    turn_timeout_s: float = Field(60.0, gt=1.0, description="Whole-turn cap (wall clock).")
    follow_up_window_s: float = Field(
        10.0, ge=0.0, description="Device-wide cap on the persona's follow-up window (listening "
        "again after a reply without the wake word); 0 turns follow-ups off."
    )
    local_commands: bool = Field(
        True, description="Handle 'stop', 'louder', timers without the LLM."
    )
    speculative_stt: bool = Field(
        True, description="Transcribe during the end-of-speech silence window (saves STT time)."
    )
    barge_in: Literal["wake", "speech"] = Field(
        "wake", description="What interrupts the device while it speaks: the wake word (or the "
        "talk button), or also any speech once the echo canceller has converged."
    )


class StorageSettings(_Section):
    retention_days: int = Field(30, ge=0, description="Sessions idle longer are deleted; 0 = keep.")


class CompanionSettings(BaseSettings):
    """The daemon's settings; see the module docstring for where they come from."""

    model_config = SettingsConfigDict(
        env_prefix="COMPANION_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    device_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] = Field(
        default_factory=_default_device_id, description="This device's id (default: hostname)."
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir, description="SQLite store, outbox and caches."
    )
    models_dir: Path = Field(
        PROJECT_ROOT / "models", description="Where models/manifest.toml and local models live."
    )
    credentials_dir: Path | None = Field(
        None, description="Secrets as files named after their setting (control_plane.token, "
        "api.keys, llm.api_key), each readable by its owner only; unset = $CREDENTIALS_DIRECTORY "
        "(systemd's LoadCredential=)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto = JSON when stdout is not a terminal (journald)."
    )

    audio: AudioSettings = AudioSettings()
    wake: WakeSettings = WakeSettings()
    vad: VadSettings = VadSettings()
    stt: SttSettings = SttSettings()
    turn: TurnSettings = TurnSettings()
    llm: LlmSettings = LlmSettings()
    tts: TtsSettings = TtsSettings()
    gpio: GpioSettings = GpioSettings()
    control_plane: ControlPlaneSettings = ControlPlaneSettings()
    arbitration: ArbitrationSettings = ArbitrationSettings()
    api: ApiSettings = ApiSettings()
    personas: PersonaSettings = PersonaSettings()
    pipeline: PipelineSettings = PipelineSettings()
    storage: StorageSettings = StorageSettings()

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        return fill_secrets(data, cls) if isinstance(data, dict) else data

    @field_validator("data_dir", "models_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @property
    def db_path(self) -> Path:
        return self.data_dir / "companion.db"


def find_config(explicit: Path | None) -> Path | None:
    """The TOML file to read: the one given, else the first of CONFIG_CANDIDATES that exists."""
    if explicit is not None:
        if not explicit.is_file():
            raise FileNotFoundError(f"config file not found: {explicit}")
        return explicit
    return next((p for p in CONFIG_CANDIDATES if p.is_file()), None)


def load_settings(config: Path | None = None, **overrides: object) -> CompanionSettings:
    """Read settings from ``config`` (or the default places), the environment and ``overrides``."""
    path = find_config(config)

    class _FromFile(CompanionSettings):
        model_config = SettingsConfigDict(toml_file=path)

    loaded = _FromFile(**overrides)  # type: ignore[arg-type]
    return CompanionSettings.model_construct(**dict(loaded))


def describe_validation_error(exc: Exception) -> str:
    """One line per bad field: ``llm.temperature: Input should be less than or equal to 2``."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        cause = exc.__cause__  # pydantic-settings: "error parsing value for field …" + why
        text = f"{exc}: {cause}" if cause else str(exc)
        return " ".join(text.split())
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(settings)"
        parts.append(" ".join(f"{field}: {err['msg']}".split()))  # a value may hold a newline
    return "; ".join(parts)
