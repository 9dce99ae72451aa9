"""/v1/system/status and /v1/system/models."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from companion.api import schemas as s
from companion.api.common import METRICS, PROCESS, app_of, route, timed, turns_today
from companion.version import VERSION

if TYPE_CHECKING:
    from companion.app import App


@route("GET", "/v1/system/status", summary="Version, uptime, resources, statistics", tag="system",
       response=s.SystemStatusResponse)
async def system_status(request: web.Request) -> s.SystemStatusResponse:
    app = app_of(request)
    process = request.app[PROCESS]
    db_bytes = await timed(lambda: app.store.run(lambda: app.store.size_bytes))
    metrics = request.app[METRICS]
    counts = metrics.as_json()
    return s.SystemStatusResponse(
        version=VERSION, device_id=app.settings.device_id,
        uptime_seconds=round(app.status.uptime_s, 1),
        resources=s.Resources(memory_used_mb=round(process.memory_info().rss / 2**20, 1),
                              cpu_percent=process.cpu_percent(interval=None),
                              database_size_mb=round(db_bytes / 2**20, 3)),
        statistics=s.Statistics(
            requests_total=counts["http"]["requests_total"],
            inference_requests=counts["inference"]["requests"],
            inference_failures=counts["inference"]["failures"],
            turns_today=await turns_today(app),
            voice_turns=int(metrics.total("companion_voice_turns_total", outcome="completed")),
            active_timers=len(app.timers), events_dropped=app.bus.dropped))


def _model_infos(app: App) -> list[s.ModelInfo]:
    st = app.settings
    loaded_llm = getattr(getattr(app, "llm", None), "model_name", None)
    voices = {st.tts.voice, *(p.voice_config.voice for p in app.personas.all())}
    out = []
    for entry in app.registry.entries:
        names = {entry.name, *entry.aliases}
        try:
            resolved = app.registry.resolve(entry.name)
            size: int | None = resolved.file.stat().st_size
            installed = True
        except Exception:
            size, installed = None, False
        active = {
            "llm": entry.name == loaded_llm or st.llm.model in names,
            "stt": st.stt.model in names and "stt" in app.status.components,
            "tts": bool(voices & names),
            "wake": bool(set(st.wake.models) & names) and "wake_word" in app.status.components,
        }[entry.kind]
        out.append(s.ModelInfo(id=entry.name, name=entry.display_name, kind=entry.kind,
                               parameters=entry.parameters, size_bytes=size,
                               context_length=(getattr(app.llm, "context_length", None)
                                               if active and entry.kind == "llm"
                                               else entry.context_length),
                               default=entry.default, installed=installed, active=active))
    return out


@route("GET", "/v1/system/models", summary="Installed STT, LLM, TTS and wake word models",
       tag="system", response=s.ModelsResponse)
async def system_models(request: web.Request) -> s.ModelsResponse:
    app = app_of(request)
    infos = await timed(lambda: asyncio.to_thread(_model_infos, app))
    return s.ModelsResponse(models=infos)
