"""Wiring: the ONLY module that picks implementations.

``build_app(settings, **overrides)`` returns an ``App`` whose missing parts are built from
settings when it starts: the real models, devices, HTTP API and control link. Tests pass fakes
as keyword arguments. ``App.run()`` supervises everything in one TaskGroup: when one long-lived
task fails, all are cancelled and systemd restarts the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import structlog

from companion.actions import ActionRegistry, build_registry
from companion.actions.timers import Timers
from companion.compute import ComputeGate, release_free_memory
from companion.conversation import ConversationManager
from companion.devices.audio import AudioSink, AudioSource, AudioUnavailableError
from companion.events import EventBus, EventType
from companion.metrics import Metrics
from companion.models import ModelMissingError, ModelRegistry
from companion.personas import PersonaLibrary
from companion.pipeline import IntentHandler, VoiceLoop
from companion.settings import CompanionSettings
from companion.speech import SpeechOutput
from companion.stages.llm import ChatModel
from companion.stages.stt import Transcriber
from companion.stages.tts import Synthesizer
from companion.stages.vad import SpeechClassifier
from companion.stages.wake import WakeDetector
from companion.state import DeviceStatus
from companion.store import Store

if TYPE_CHECKING:
    from companion.arbitration import Arbiter
    from companion.control.client import ControlLink
    from companion.devices.gpio import Buttons, LedIndicator
    from companion.peers import PeerTransport

log = structlog.get_logger(__name__)

GIL_SWITCH_INTERVAL_S = 0.0005
HOUSEKEEPING_EVERY_S = 3600.0
MEMORY_TRIM_EVERY_S = 30.0  # freed heap memory goes back to the system this often (when idle)
STORAGE_PROBE_S = 2.0  # while the disk refuses writes: how often to try one


@dataclass
class Parts:
    """Everything that can be injected; ``None`` = build the real one from settings."""

    source: AudioSource | None = None
    sink: AudioSink | None = None
    wake: WakeDetector | None = None
    vad: SpeechClassifier | None = None
    stt: Transcriber | None = None
    llm: ChatModel | None = None
    tts: Synthesizer | None = None
    store: Store | None = None
    intent_handler: IntentHandler | None = None


@dataclass(frozen=True)
class Features:
    """Which long-lived services ``run()`` starts; simulate and chat turn most of them off."""

    audio_devices: bool = True  # open sounddevice when no source/sink is injected
    voice_loop: bool = True
    http: bool = True
    control: bool = True
    gpio: bool = True
    warm_personas: bool = True
    llm: bool = True  # `companion say` needs only TTS: no language model, no conversation


class App:
    def __init__(self, settings: CompanionSettings, parts: Parts, features: Features) -> None:
        self.settings = settings
        self.parts = parts
        self.features = features
        self.bus = EventBus()
        self.status = DeviceStatus(self.bus, settings.device_id,
                                   volume=settings.audio.output_volume)
        self.registry = ModelRegistry(settings.models_dir)
        self.compute_gate = ComputeGate()  # speech the user waits for goes before LLM tokens
        self.store = parts.store or Store(settings.db_path)
        self.ready = asyncio.Event()
        self._housekeeping_due = asyncio.Event()
        self.http_listening = asyncio.Event()  # set by serve_http once it accepts connections
        self._http_task: asyncio.Task | None = None
        self.load_error: str | None = None
        # built by start()
        self.personas: PersonaLibrary
        self.conversation: ConversationManager
        self.speech: SpeechOutput
        self.voice: VoiceLoop | None = None
        self.sink: AudioSink | None = None
        self.metrics = Metrics()  # counts from the start: it follows the bus
        self.bus.add_callback(self.metrics.on_event)
        self.actions: ActionRegistry = build_registry(self)  # everything it can be asked to do
        self.timers = Timers(self)
        # started by run() when configured and available; None otherwise
        self.control: ControlLink | None = None
        self.arbiter: Arbiter | None = None
        self.peers: PeerTransport | None = None
        self.led: LedIndicator | None = None
        self.buttons: Buttons | None = None
        self.http_addresses: list[Any] = []  # where the HTTP API listens, once it does
        self._tasks: list[asyncio.Task] = []
        self._storage_probe: asyncio.Task | None = None
        self._closed = False

    # --- start-up ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load models (in threads, all at once: start-up takes as long as the slowest model,
        and the loop keeps serving /health meanwhile) and wire the pipeline. A model that fails
        is reported on its component and in /ready."""
        p, s = self.parts, self.settings
        voice = self.features.voice_loop and self.features.llm
        source = await self._microphone(p, s) if voice else None
        loads = [self._load("tts", lambda: p.tts or _real_tts(s, self.registry, self.compute_gate),
                            attr="tts")]
        if self.features.llm:
            loads.append(self._load(
                "llm", lambda: p.llm or _real_llm(s, self.registry, self.compute_gate), attr="llm"))
        if source is not None:
            loads.append(self._load(
                "stt", lambda: p.stt or _real_stt(s, self.registry, self.compute_gate), attr="stt"))
            loads.append(self._load("vad", lambda: p.vad or _real_vad(s), attr="vad"))
            self.wake = None
            if s.wake.enabled:
                loads.append(self._load("wake_word", lambda: p.wake or _real_wake(s, self.registry),
                                        attr="wake"))
        await asyncio.gather(*loads)
        self.personas = PersonaLibrary(s.personas.dir, voice_exists=self.tts.has_voice)
        errors = self.personas.load()
        for error in errors:
            log.warning("persona file rejected", error=str(error))
        if self.features.llm:
            self._watch_llm_backend()
            self.conversation = ConversationManager(
                llm=self.llm, store=self.store, personas=self.personas, settings=s.llm,
                bus=self.bus, default_persona=s.personas.default,
            )
            await self.conversation.start()
        sink = p.sink
        if sink is None and self.features.audio_devices:
            sink = await self._open_audio("audio_out", lambda: _real_sink(s))
        elif sink is not None:
            self.status.set_component("audio_out", True, sink.name)
        self.sink = sink
        self.speech = SpeechOutput(self.tts, sink, self.bus,
                                   sentence_silence_s=s.tts.sentence_silence_s)
        if source is not None:
            self.voice = VoiceLoop(
                settings=s, bus=self.bus, status=self.status, source=source, wake=self.wake,
                vad=self.vad, stt=self.stt, conversation=self.conversation, speech=self.speech,
                intent_handler=p.intent_handler or _local_commands(self),
            )
            self.voice.echo = self._echo_control(s)
        self.status.set_component("storage", True, str(self.store.path))
        loop = asyncio.get_running_loop()
        self.store.on_problem = lambda problem: loop.call_soon_threadsafe(
            self._storage_changed, problem)
        self.bus.add_callback(self._after_turn)
        self.ready.set()
        self.bus.emit(EventType.STATE_CHANGED, state=str(self.status.pipeline_state),
                      previous=str(self.status.pipeline_state))

    async def _microphone(self, p: Parts, s: CompanionSettings) -> AudioSource | None:
        source = p.source
        if source is None and self.features.audio_devices:
            source = await self._open_audio("audio_in", lambda: _real_source(s))
        elif source is not None:
            self.status.set_component("audio_in", True, source.name)
        if source is None:
            log.warning("no microphone: the voice loop is off; the HTTP API, chat and the "
                        "control link keep working")
        return source

    def _echo_control(self, s: CompanionSettings):
        """Echo cancellation with what the speaker plays as the reference (when the sink can
        say when it played what: sounddevice, the simulated room)."""
        from companion.devices.echo import EchoControl, PlaybackReference

        reference = None
        if hasattr(self.sink, "reference") and s.audio.echo_cancel != "off":
            reference = self.sink.reference = self.sink.reference or PlaybackReference()

        def report(control: EchoControl) -> None:
            self.status.set_component("echo_cancel", control.mode != "off" or
                                      s.audio.echo_cancel == "off",
                                      f"{control.mode}: {control.detail}")

        return EchoControl(s.audio.echo_cancel, reference,
                           noise_suppression=s.audio.noise_suppression, on_change=report,
                           echo_path_file=s.data_dir / "echo_path.npy")

    async def _load(self, component: str, build, *, attr: str) -> Any:
        started = time.perf_counter()
        try:
            value = await asyncio.to_thread(build)
        except Exception as exc:
            error = str(exc)
            hint = await asyncio.to_thread(self._corrupt_model, component)
            if hint and hint not in error:
                error = f"{error}; {hint}"
            self.status.set_component(component, False, error)
            self.load_error = f"{component}: {error}"
            log.error("component failed to load", component=component, error=error)
            raise
        took = (time.perf_counter() - started) * 1000
        name = getattr(value, "model_name", None) or type(value).__name__
        self.status.set_component(component, True, str(name), latency_ms=round(took, 1))
        setattr(self, attr, value)
        log.info("component ready", component=component, detail=name, load_ms=round(took, 1))
        return value

    def _corrupt_model(self, component: str) -> str | None:
        """Why a model that is there did not load, when its file does not match the manifest
        (a cut-short copy, a bad card): which file and how to reinstall it. Start-up checks
        only that the files exist; a hash is read only after a load failed."""
        name = {"stt": self.settings.stt.model, "llm": self.settings.llm.model,
                "tts": self.settings.tts.voice}.get(component)
        if name is None:
            return None
        try:
            resolved = self.registry.resolve(name, kind=component)  # type: ignore[arg-type]
            if resolved.verify_sha256():
                return None
        except (ModelMissingError, OSError):
            return None  # the load error says so already
        return (f"{resolved.file} is corrupt (sha256 does not match the manifest); reinstall "
                f"it with: {resolved.entry.how_to_install}")

    def _watch_llm_backend(self) -> None:
        """With a remote LLM: its fallbacks and breaker changes become events, the
        ``llm_remote`` component of /ready/all and metrics."""
        observe = getattr(self.llm, "add_observer", None)
        if observe is None:
            return
        observe(self._on_llm_backend)
        self._on_llm_backend("breaker", state="closed", previous=None)  # the starting state

    def _on_llm_backend(self, kind: str, **data: Any) -> None:
        turn_id = structlog.contextvars.get_contextvars().get("turn_id")
        if kind == "fallback":
            self.bus.emit(EventType.LLM_FALLBACK, turn_id, **data)
            return
        state = data.get("state")
        detail = (f"{self.llm.model_name}: in use" if state == "closed" else
                  f"{self.llm.model_name}: breaker {state}; the local model answers")
        self.status.set_component("llm_remote", state == "closed", detail)
        self.bus.emit(EventType.LLM_BACKEND, turn_id, **data)

    async def _open_audio(self, component: str, build):
        """Probe and open a sound device in a worker thread (PortAudio can take a second to
        start and enumerate), and only once the HTTP API serves: /health never waits on it."""
        await self._http_started()
        try:
            device = await asyncio.to_thread(build)
        except AudioUnavailableError as exc:
            self.status.set_component(component, False, str(exc))
            log.warning("audio device unavailable", component=component, error=str(exc))
            return None
        self.status.set_component(component, True, device.name)
        if hasattr(device, "on_health"):
            device.on_health = self._audio_health(component)
        return device

    def _audio_health(self, component: str):
        """A sound device that fails or recovers at run time: /ready/all, an event, the LED
        (called on the event loop)."""
        def report(healthy: bool, detail: str) -> None:
            self.status.set_component(component, healthy, detail)
            self.status.set_fault(component, None if healthy else detail)  # the LED, at rest
            self.bus.emit(EventType.AUDIO_DEVICE, component=component, healthy=healthy,
                          detail=detail)

        return report

    async def _http_started(self) -> None:
        """Return when the HTTP API listens, or at once when run() serves none (or it failed)."""
        task = self._http_task
        if task is None or task.done() or self.http_listening.is_set():
            return
        listening = asyncio.ensure_future(self.http_listening.wait())
        try:
            await asyncio.wait([task, listening], return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()

    # --- running ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """The daemon: serve until cancelled (SIGTERM) or a service fails."""
        from companion import systemd

        tune_process()

        async with asyncio.TaskGroup() as group:
            if self.features.http:
                from companion.api.http import serve_http

                self._http_task = group.create_task(serve_http(self), name="http")
            try:
                await self.start()
            except Exception:
                # degraded: /health answers, /ready says what failed, `companion check` explains
                log.error("start-up incomplete; serving health and readiness only",
                          error=self.load_error)
                group.create_task(systemd.supervise(self), name="systemd")
                return
            if self.features.warm_personas:
                group.create_task(self.conversation.warm_personas(), name="warm-personas")
            if self.voice is not None:
                await self.start_arbitration()
                group.create_task(self.voice.run(), name="voice-loop")
                if self.voice.echo is not None:
                    group.create_task(self.voice.echo.watch(), name="echo-watch")
            if self.features.gpio and self.settings.gpio.enabled:
                self._start_gpio()
            if self.features.control and self.settings.control_plane.enabled:
                from companion.control.client import run_control_link

                group.create_task(run_control_link(self), name="control-link")
            group.create_task(systemd.supervise(self), name="systemd")
            group.create_task(self.housekeeping(), name="housekeeping")
            group.create_task(self.release_memory(), name="release-memory")

    async def start_arbitration(self) -> None:
        """Several devices, one wake word: the control link (when it runs) and, in peer mode,
        UDP multicast decide which device answers (companion.arbitration)."""
        from companion.arbitration import Arbiter

        s = self.settings
        if self.voice is None or not s.arbitration.enabled:
            return
        arbiter = Arbiter(lambda: self.settings.arbitration, s.device_id, self.bus,
                          control=lambda: self.control)
        if s.arbitration.peer:
            from companion.peers import PeerTransport

            peer = PeerTransport(lambda: self.settings.arbitration, s.device_id,
                                 on_claim=arbiter.on_peer_claim)
            await peer.start()
            arbiter.peer = peer
            self.peers = peer
        self.voice.arbiter = arbiter
        self.arbiter = arbiter

    def _storage_changed(self, problem: str | None) -> None:
        """The disk refused a write (full, read-only) or takes them again: the storage
        component, the LED (error at rest) and the log say so; while it refuses, a small write
        is tried every few seconds so the device recovers by itself when space returns."""
        self.status.set_component("storage", problem is None, problem or str(self.store.path))
        self.status.set_fault("storage", problem)
        if problem is None:
            log.info("storage writable again", path=str(self.store.path))
            return
        log.error("storage failing: replies are not kept until it is fixed", problem=problem)
        if self._storage_probe is None or self._storage_probe.done():
            self._storage_probe = asyncio.create_task(self._probe_storage(), name="storage-probe")

    async def _probe_storage(self) -> None:
        while True:
            await asyncio.sleep(STORAGE_PROBE_S)
            if await self.store.run(self.store.probe):
                return

    def _after_turn(self, event) -> None:
        if event.type in (EventType.TURN_END, EventType.TURN_ERROR, EventType.EXCHANGE_RECORDED):
            task = asyncio.get_running_loop().run_in_executor(None, release_free_memory)
            self._tasks.append(task)  # kept until done, so it is not garbage-collected early
            task.add_done_callback(self._tasks.remove)

    def _start_gpio(self) -> None:
        from companion.actions.buttons import button_actions
        from companion.devices.gpio import Buttons, LedIndicator, make_gpio

        try:
            led = make_gpio(self.settings.gpio)
            if led is not None:
                self.led = LedIndicator(
                    led, self.bus, lambda: self.conversation.active_persona.led_color)
            self.buttons = Buttons(self.settings.gpio, button_actions(self), self.bus,
                                   asyncio.get_running_loop())
            self.status.set_component("gpio", True, "buttons and LED")
        except Exception as exc:  # no GPIO chip on this machine
            self.status.set_component("gpio", False, f"no GPIO: {exc}")
            log.warning("GPIO unavailable; buttons and LEDs are off", error=str(exc))

    async def housekeeping(self) -> None:
        """Expire old sessions every hour, and at once when the retention setting changes
        (``housekeeping_now``): storage.retention_days is read at each pass."""
        while True:
            await self.expire_sessions()
            self._housekeeping_due.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOUSEKEEPING_EVERY_S):
                    await self._housekeeping_due.wait()

    async def release_memory(self, every_s: float = MEMORY_TRIM_EVERY_S) -> None:
        """Now and then, while no turn runs, give freed heap memory back (companion.memory)."""
        from companion.memory import release_free_memory

        while True:
            await asyncio.sleep(every_s)
            if self.voice is None or not self.voice.busy:
                await asyncio.to_thread(release_free_memory)

    def housekeeping_now(self) -> None:
        self._housekeeping_due.set()

    async def expire_sessions(self) -> int:
        days = self.settings.storage.retention_days
        if not days:
            return 0
        keep = {self.conversation.active_session_id} - {None}
        removed = await self.store.run(self.store.expire_sessions, days * 86400.0, keep=keep)
        if removed:
            log.info("expired sessions", count=removed, retention_days=days)
        return removed

    def reload_personas(self) -> list[str]:
        """Re-read the persona library (SIGHUP, POST /v1/personas/reload): a bad file is
        reported and never replaces the good persona; changed prompts are re-warmed."""
        errors = self.personas.load()
        self.conversation.active_persona  # noqa: B018  falls back if the active one vanished
        self.conversation.personas_reloaded()
        return [str(e) for e in errors]

    async def aclose(self) -> None:
        """Stop turns and timers, free the models and devices, close the store. Idempotent:
        a test fixture closes every App again after the test, whatever the test did."""
        if self._closed:
            return
        self._closed = True
        if self.voice is not None:  # turns live outside the TaskGroup: stop them first
            self.voice.barge_in()
            await self.voice.wait_idle()
        if self._storage_probe is not None:
            self._storage_probe.cancel()
            await asyncio.gather(self._storage_probe, return_exceptions=True)
        await self.timers.aclose()
        await self.actions.aclose()  # background speech
        if hasattr(self, "conversation"):
            await self.conversation.aclose()
        if self.arbiter is not None:
            await self.arbiter.aclose()
        for part in (self.buttons, self.led, self.peers):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close()
        if self.voice is not None and self.voice.echo is not None:
            self.voice.echo.close()
        close = getattr(self.sink, "close", None)
        if close is not None:
            close()
        remote = getattr(getattr(self, "llm", None), "aclose", None)  # llm.backend = openai
        if remote is not None and self.parts.llm is None:
            await remote()
        for name in ("llm", "stt"):  # the models it built (an injected one is the caller's)
            shutdown = getattr(getattr(self, name, None), "close", None)
            if shutdown is not None and getattr(self.parts, name) is None:
                await asyncio.to_thread(shutdown)
        self.store.close()


def tune_process() -> None:
    """Process-wide settings for a daemon that runs models beside its event loop.

    Model threads run Python between native calls (llama-cpp-python, per token) and hold the
    GIL meanwhile; a short switch interval lets the event loop in within ~0.5 ms instead of up
    to 5 ms (measured: /health p99 while a chat streams went from 2.1 ms to 0.5 ms)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def build_app(settings: CompanionSettings, *, features: Features | None = None,
              **overrides: Any) -> App:
    names = {f.name for f in fields(Parts)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"unknown parts: {sorted(unknown)}")
    return App(settings, Parts(**overrides), features or Features())


def install_signal_handlers(app: App, main_task: asyncio.Task) -> None:
    loop = asyncio.get_running_loop()
    stopping = False

    def stop() -> None:
        """The first signal stops the daemon; one more (a second Ctrl-C, `timeout` forwarding
        SIGTERM) must not cancel the shutdown itself, which left a traceback and the store
        and echo path unsaved."""
        nonlocal stopping
        if stopping:
            log.info("already stopping")
            return
        stopping = True
        main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)

    reloading: set[asyncio.Task] = set()

    async def reload() -> None:
        errors = await asyncio.to_thread(app.reload_personas)  # reads and parses files
        log.info("personas reloaded", errors=errors)

    def on_sighup() -> None:
        task = loop.create_task(reload(), name="reload-personas")
        reloading.add(task)  # kept until done, so it is not garbage-collected early
        task.add_done_callback(reloading.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)


# --- the real implementations -------------------------------------------------------------------


def _real_tts(s: CompanionSettings, registry: ModelRegistry,
              gate: ComputeGate | None = None) -> Synthesizer:
    from companion.stages.tts import PiperSynthesizer

    return PiperSynthesizer(s.tts, registry, gate=gate)


def _real_llm(s: CompanionSettings, registry: ModelRegistry,
              gate: ComputeGate | None = None) -> ChatModel:
    from companion.stages.llm import LlamaCppChatModel

    local = LlamaCppChatModel(s.llm, registry, gate=gate)
    if s.llm.backend == "local":
        return local
    from companion.stages.fallback_llm import FallbackChatModel
    from companion.stages.remote_llm import RemoteChatModel

    return FallbackChatModel(RemoteChatModel(s.llm), local, failures=s.llm.breaker_failures,
                             reset_s=s.llm.breaker_reset_s, fallback=s.llm.fallback)


def _real_stt(s: CompanionSettings, registry: ModelRegistry,
              gate: ComputeGate | None = None) -> Transcriber:
    from companion.stages.stt import FasterWhisperTranscriber

    return FasterWhisperTranscriber(s.stt, registry, gate=gate)


def _real_vad(s: CompanionSettings) -> SpeechClassifier:
    from companion.stages.vad import WebRtcVad

    return WebRtcVad(s.vad.aggressiveness)


def _real_wake(s: CompanionSettings, registry: ModelRegistry) -> WakeDetector:
    from companion.stages.wake import OpenWakeWordDetector

    return OpenWakeWordDetector(s.wake, registry)


def _real_source(s: CompanionSettings) -> AudioSource:
    from companion.devices.audio import SoundDeviceSource

    return SoundDeviceSource(s.audio.input_device, block_ms=s.audio.block_ms,
                             queue_blocks=s.audio.queue_blocks)


def _real_sink(s: CompanionSettings) -> AudioSink:
    from companion.devices.audio import SoundDeviceSink

    return SoundDeviceSink(s.audio.output_device, volume=s.audio.output_volume)


def _local_commands(app: App) -> IntentHandler:
    from companion.actions.voice import make_intent_handler

    return make_intent_handler(app)
