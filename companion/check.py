"""`companion check`: load every model, look at audio devices, GPIO, personas and settings, and
say in plain words what is wrong. Exit 0 only when all is well."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from companion.models import ModelMissingError, ModelRegistry
from companion.personas import PersonaLibrary
from companion.settings import CompanionSettings


@dataclass
class CheckLine:
    name: str
    ok: bool
    detail: str
    skipped: bool = False


@dataclass
class Report:
    lines: list[CheckLine] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.lines.append(CheckLine(name, ok, detail))

    @property
    def ok(self) -> bool:
        return all(line.ok or line.skipped for line in self.lines)

    def render(self) -> str:
        out = []
        for line in self.lines:
            mark = "skip" if line.skipped else ("ok  " if line.ok else "FAIL")
            out.append(f"[{mark}] {line.name:<22} {line.detail}")
        failed = sum(not (line.ok or line.skipped) for line in self.lines)
        out.append("all checks passed" if not failed else f"{failed} check(s) failed")
        return "\n".join(out)


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, (time.perf_counter() - started) * 1000


async def run_checks(settings: CompanionSettings, *, skip: set[str] = frozenset()) -> Report:
    return await asyncio.to_thread(_run_checks, settings, skip)


def _run_checks(settings: CompanionSettings, skip: set[str]) -> Report:
    report = Report()
    report.add("settings", True, f"device_id={settings.device_id} data_dir={settings.data_dir}")
    registry = ModelRegistry(settings.models_dir)
    _check_models(settings, registry, report)
    _check_remote_llm(settings, report)
    _check_personas(settings, registry, report)
    _check_storage(settings, report)
    if "audio" in skip:
        report.lines.append(CheckLine("audio", True, "skipped", skipped=True))
    else:
        _check_audio(settings, report)
    if "gpio" in skip or not settings.gpio.enabled:
        report.lines.append(CheckLine("gpio", True, "skipped", skipped=True))
    else:
        _check_gpio(settings, report)
    cp = settings.control_plane
    report.add("control_plane", True,
               f"{cp.url} (token {'set' if cp.token else 'MISSING'}"
               f"{'; clear text, allowed by allow_insecure_ws' if cp.clear_text else ''})"
               if cp.enabled
               else "not configured (device works on its own)")
    if cp.enabled and not cp.token:
        report.lines[-1].ok = False
    if settings.api.unprotected:
        report.add("api", False, settings.api.unprotected)
    else:
        report.add("api", True, f"{settings.api.host}:{settings.api.port}, "
                                f"{len(settings.api.keys)} key(s)")
    return report


def _check_models(settings: CompanionSettings, registry: ModelRegistry, report: Report) -> None:
    from companion.app import _real_llm, _real_stt, _real_tts, _real_vad, _real_wake

    wanted = [("stt", settings.stt.model), ("llm", settings.llm.model),
              ("tts", settings.tts.voice), *(("wake", w) for w in settings.wake.models)]
    for kind, name in wanted:
        try:
            resolved = registry.resolve(name, kind=kind)  # type: ignore[arg-type]
        except ModelMissingError as exc:
            report.add(f"model {kind}", False, str(exc))
            continue
        intact = resolved.verify_sha256()
        report.add(f"model {kind} {resolved.entry.name}", intact,
                   str(resolved.file) if intact else f"{resolved.file}: sha256 mismatch "
                   f"(corrupt; reinstall with: {resolved.entry.how_to_install})")
    loaders = {"load stt": lambda: _real_stt(settings, registry),
               "load llm": lambda: _real_llm(settings, registry),
               "load tts": lambda: _real_tts(settings, registry),
               "load vad": lambda: _real_vad(settings),
               "load wake word": lambda: _real_wake(settings, registry)}
    for name, load in loaders.items():
        try:
            _, ms = _timed(load)
            report.add(name, True, f"loaded in {ms:.0f} ms")
        except Exception as exc:
            report.add(name, False, f"{type(exc).__name__}: {exc}")


def _check_personas(settings: CompanionSettings, registry: ModelRegistry, report: Report) -> None:
    library = PersonaLibrary(settings.personas.dir,
                             voice_exists=lambda voice: registry.has(voice, kind="tts"))
    errors = library.load()
    report.add("personas", not errors and bool(library.ids()),
               f"{', '.join(library.ids()) or 'none'}"
               + (f"; rejected: {'; '.join(map(str, errors))}" if errors else ""))
    if settings.personas.default not in library:
        report.add("personas.default", False, f"{settings.personas.default!r} is not loaded")


def _check_remote_llm(settings: CompanionSettings, report: Report) -> None:
    """With llm.backend = openai: can the server be reached, and does it know the model?"""
    llm = settings.llm
    if llm.backend != "openai":
        return
    from openai import OpenAI, OpenAIError

    key = llm.api_key.get_secret_value() if llm.api_key else "not-needed"
    try:
        with OpenAI(base_url=llm.base_url, api_key=key, max_retries=0, timeout=5.0) as client:
            served = [m.id for m in client.models.list()]
    except OpenAIError as exc:
        report.add("remote llm", False, f"{llm.base_url}: {type(exc).__name__}: {exc} (the "
                   "local model answers until it is back)")
        return
    report.add("remote llm", True, f"{llm.base_url} serves {', '.join(served[:3]) or 'no model'}")


def _check_storage(settings: CompanionSettings, report: Report) -> None:
    from companion.store import Store

    try:
        store = Store(settings.db_path)
        store.query("SELECT 1")
        store.close()
        report.add("storage", True, str(settings.db_path))
    except Exception as exc:
        report.add("storage", False, f"{settings.db_path}: {exc}")


def _check_audio(settings: CompanionSettings, report: Report) -> None:
    from companion.devices.audio import AudioUnavailableError, find_device

    for kind, name in (("input", settings.audio.input_device),
                       ("output", settings.audio.output_device)):
        try:
            _, info = find_device(name, kind)
            report.add(f"audio {kind}", True, f"{info['name']} "
                       f"({int(info['default_samplerate'])} Hz)")
        except AudioUnavailableError as exc:
            report.add(f"audio {kind}", False, str(exc))
    _check_echo(settings, report)


def _check_echo(settings: CompanionSettings, report: Report) -> None:
    """Which echo cancellation the daemon would use (the sounddevice speaker gives the
    playback reference, so webrtc needs only the package)."""
    from companion.devices.echo import resolve_mode, system_echo_source, webrtc_available

    requested = settings.audio.echo_cancel
    system = system_echo_source() if requested in ("auto", "system") else None
    mode, detail = resolve_mode(requested, system_source=system, webrtc_error=webrtc_available())
    met = mode != "off" or requested == "off"
    report.add("echo cancel", met, f"{mode}: {detail} (audio.echo_cancel = {requested})")


def _check_gpio(settings: CompanionSettings, report: Report) -> None:
    try:
        from companion.devices.gpio import make_gpio

        led = make_gpio(settings.gpio)
        if led is not None:
            led.close()
        report.add("gpio", True, f"pin factory {settings.gpio.pin_factory or 'default'}")
    except Exception as exc:
        report.add("gpio", False, f"{type(exc).__name__}: {exc}")
