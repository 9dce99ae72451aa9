"""/health, /ready and /ready/all."""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING

from aiohttp import web

from companion.api import schemas as s
from companion.api.common import METRICS, ApiError, app_of, route
from companion.metrics import STAGES

if TYPE_CHECKING:
    from companion.app import App


COMPONENTS = ("wake_word", "vad", "stt", "llm", "llm_remote", "tts", "audio_in", "audio_out",
              "echo_cancel", "gpio", "control_plane", "storage")


@route("GET", "/health", summary="Liveness", tag="health", response=s.HealthResponse)
async def health(request: web.Request) -> s.HealthResponse:
    """Answers while the models load: the process and its event loop are alive."""
    return s.HealthResponse()


@route("GET", "/ready", summary="Readiness of the inference stack", tag="health",
       response=s.ReadyResponse, errors=(503,))
async def ready(request: web.Request) -> s.ReadyResponse:
    """503 while the models load or when one failed (details say which)."""
    app = app_of(request)
    if app.load_error:
        raise ApiError(503, "SERVICE_UNAVAILABLE", "a component failed to load",
                       {"status": "failed", "load_error": app.load_error}, {"Retry-After": "30"})
    if not app.ready.is_set():
        raise ApiError(503, "SERVICE_UNAVAILABLE", "the models are still loading",
                       {"status": "loading"}, {"Retry-After": "2"})
    llm = app.status.components.get("llm", {})
    return s.ReadyResponse(inference=s.InferenceHealth(
        healthy=bool(llm.get("healthy")), model=getattr(app.llm, "model_name", None),
        latency_ms=_last_inference_ms(request)))


def _last_inference_ms(request: web.Request) -> float | None:
    """The last real inference (HTTP or voice), never the model's load time."""
    last = request.app[METRICS].last_inference_ms
    return round(last, 1) if last is not None else None


async def _storage_health(app: App) -> s.ComponentHealth:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(5):
            await app.store.run(app.store.query, "SELECT 1")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return s.ComponentHealth(healthy=False, enabled=True, detail=str(exc))
    if app.store.problem is not None:  # it reads, but the last write was refused
        return s.ComponentHealth(healthy=False, enabled=True, detail=f"storage: {app.store.problem}")
    took = (time.perf_counter() - started) * 1000
    return s.ComponentHealth(healthy=True, enabled=True, detail=str(app.store.path),
                             latency_ms=round(took, 2))


def _control_health(app: App) -> s.ComponentHealth:
    if not app.settings.control_plane.enabled:
        return s.ComponentHealth(healthy=True, enabled=False, detail="no control plane configured")
    if app.control is None:
        return s.ComponentHealth(healthy=False, enabled=True, detail="not started")
    link = app.control.status
    detail = "connected" if link.connected else (
        f"disconnected (retries {link.retries}, outbox {link.outbox_depth})")
    return s.ComponentHealth(healthy=link.connected, enabled=True, detail=detail,
                             latency_ms=link.latency_ms)


def _absent_reason(app: App, name: str) -> str:
    st = app.settings
    if not app.ready.is_set() and not app.load_error:
        return "loading"
    if name == "wake_word" and not st.wake.enabled:
        return "wake word disabled in settings"
    if name == "gpio" and not (st.gpio.enabled and app.features.gpio):
        return "GPIO disabled"
    if name in ("wake_word", "vad", "stt", "audio_in", "echo_cancel"):
        return "voice loop off (no microphone)"
    if name == "audio_out":
        return "no audio output"
    if name == "llm_remote":
        return "llm.backend is local"
    return "not in use"


def percentiles(values: list[float]) -> s.Percentiles:
    if not values:
        return s.Percentiles(count=0, p50=None, p90=None, p99=None)
    ordered = sorted(values)

    def rank(q: float) -> float:  # nearest rank
        return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 2)

    return s.Percentiles(count=len(ordered), p50=rank(0.5), p90=rank(0.9), p99=rank(0.99))


@route("GET", "/ready/all", summary="Every component's health and recent turn latencies",
       tag="health", response=s.ReadyAllResponse)
async def ready_all(request: web.Request) -> s.ReadyAllResponse:
    app = app_of(request)
    components: dict[str, s.ComponentHealth] = {}
    for name in COMPONENTS:
        if name == "storage":
            components[name] = await _storage_health(app)
        elif name == "control_plane":
            components[name] = _control_health(app)
        elif name in app.status.components:
            c = app.status.components[name]
            components[name] = s.ComponentHealth(healthy=bool(c["healthy"]), enabled=True,
                                                 detail=str(c.get("detail") or ""),
                                                 latency_ms=c.get("latency_ms"))
        else:
            components[name] = s.ComponentHealth(healthy=True, enabled=False,
                                                 detail=_absent_reason(app, name))
    turns = list(app.status.recent_turns)
    latency = {stage.removesuffix("_s"): percentiles(
        [v * 1000 for t in turns if (v := getattr(t, stage, None)) is not None])
        for stage in STAGES}
    if app.load_error:
        status = "failed"
    elif not app.ready.is_set():
        status = "loading"
    elif any(c.enabled and not c.healthy for c in components.values()):
        status = "degraded"
    else:
        status = "ready"
    return s.ReadyAllResponse(status=status, components=components, latency_ms=latency,
                              load_error=app.load_error)
