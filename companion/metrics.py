"""Metrics: one prometheus-client registry per App, fed by the HTTP middleware and the event bus.

A per-App ``CollectorRegistry`` (not the global default) lets several apps live in one test
process. The JSON ``/metrics`` is read back from the same collectors, so the two views always
agree. Voice-turn stage latencies come from TURN_END events (their ``timings``), voice inference
from LLM_END; HTTP chat records its inference directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from companion.events import Event, EventType

if TYPE_CHECKING:
    pass

log = structlog.get_logger(__name__)

# seconds; a Pi answers in 0.3-5 s, an HTTP probe in a few ms
STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 15.0, 30.0)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGES = ("wake_s", "endpoint_s", "stt_s", "llm_first_token_s", "llm_first_sentence_s",
          "tts_first_sentence_s", "end_of_speech_to_first_audio_s", "speech_end_to_first_audio_s",
          "total_s")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("companion_http_requests", "HTTP requests answered.",
                                     ["method", "route", "status_class"], registry=r)
        self.http_latency = Histogram("companion_http_request_duration_seconds",
                                      "Time to answer (to headers, for streams).", ["route"],
                                      buckets=HTTP_BUCKETS, registry=r)
        self.http_active = Gauge("companion_http_requests_active", "Requests in progress.",
                                 registry=r)
        self.inference_requests = Counter("companion_inference_requests", "LLM generations.",
                                          ["source"], registry=r)
        self.inference_failures = Counter("companion_inference_failures",
                                          "LLM generations that failed.", ["source"], registry=r)
        self.inference_latency = Histogram("companion_inference_duration_seconds",
                                           "Whole LLM generation time.", ["source"],
                                           buckets=STAGE_BUCKETS, registry=r)
        self.inference_tokens = Counter("companion_inference_tokens", "Tokens processed.",
                                        ["kind"], registry=r)
        self.stage_latency = Histogram("companion_pipeline_stage_seconds",
                                       "Voice-turn stage latencies.", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=r)
        self.voice_turns = Counter("companion_voice_turns", "Voice turns by outcome.",
                                   ["outcome"], registry=r)
        self.llm_fallbacks = Counter("companion_llm_fallbacks", "Replies the local model "
                                     "wrote because the remote LLM failed.", ["reason"], registry=r)
        self.llm_remote_up = Gauge("companion_llm_remote_up", "1 while the remote LLM's circuit "
                                   "breaker is closed (0 open or half-open).", registry=r)
        self.control_refused = Counter("companion_control_frames_refused", "Outbox frames the "
                                       "control plane refused (dead-lettered, not resent).",
                                       ["reason"], registry=r)
        self.remote_breaker: str | None = None
        self.last_inference_ms: float | None = None

    # --- feeding --------------------------------------------------------------------------------

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, f"{status // 100}xx").inc()
        self.http_latency.labels(route).observe(seconds)

    def observe_inference(self, source: str, seconds: float, *, prompt_tokens: int = 0,
                          completion_tokens: int = 0, failed: bool = False) -> None:
        self.inference_requests.labels(source).inc()
        if failed:
            self.inference_failures.labels(source).inc()
            return
        self.inference_latency.labels(source).observe(seconds)
        self.last_inference_ms = seconds * 1000
        if prompt_tokens:
            self.inference_tokens.labels("prompt").inc(prompt_tokens)
        if completion_tokens:
            self.inference_tokens.labels("completion").inc(completion_tokens)

    def on_event(self, event: Event) -> None:
        """Bus callback: synchronous and cheap (it runs inside the producer's emit)."""
        if event.type is EventType.TURN_END:
            self.voice_turns.labels("completed").inc()
            for stage, value in (event.data.get("timings") or {}).items():
                if stage in STAGES and isinstance(value, int | float):
                    self.stage_latency.labels(stage.removesuffix("_s")).observe(float(value))
        elif event.type is EventType.TURN_ERROR:
            self.voice_turns.labels("error").inc()
        elif event.type is EventType.TURN_CANCELLED:
            self.voice_turns.labels("cancelled").inc()
        elif event.type is EventType.LLM_FALLBACK:
            self.llm_fallbacks.labels(str(event.data.get("reason") or "unknown")).inc()
        elif event.type is EventType.CONTROL_FRAME_REFUSED:
            self.control_refused.labels(str(event.data.get("reason"))).inc()
        elif event.type is EventType.LLM_BACKEND:
            self.remote_breaker = str(event.data.get("state"))
            self.llm_remote_up.set(1 if self.remote_breaker == "closed" else 0)
        elif event.type is EventType.LLM_END:
            took = event.data.get("took_s")
            self.observe_inference("voice", float(took or 0.0),
                                   completion_tokens=int(event.data.get("tokens") or 0))

    # --- reading --------------------------------------------------------------------------------

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def _samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(s.labels, s.value) for metric in self.registry.collect()
                for s in metric.samples if s.name == name]

    def total(self, name: str, **match: str) -> float:
        return sum(v for labels, v in self._samples(name)
                   if all(labels.get(k) == want for k, want in match.items()))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, value in self._samples(name):
            out[labels[label]] = out.get(labels[label], 0.0) + value
        return out

    def _avg_ms(self, base: str, **match: str) -> float | None:
        count = self.total(f"{base}_count", **match)
        return round(self.total(f"{base}_sum", **match) / count * 1000, 2) if count else None

    def as_json(self) -> dict[str, Any]:
        """The JSON /metrics, read from the collectors above."""
        by_class = {k: int(v) for k, v in
                    sorted(self.by_label("companion_http_requests_total", "status_class").items())}
        stages = {}
        for stage in sorted(self.by_label("companion_pipeline_stage_seconds_count", "stage")):
            stages[stage] = {
                "count": int(self.total("companion_pipeline_stage_seconds_count", stage=stage)),
                "avg_ms": self._avg_ms("companion_pipeline_stage_seconds", stage=stage)}
        return {
            "http": {"requests_total": sum(by_class.values()), "by_class": by_class,
                     "active": int(self.total("companion_http_requests_active")),
                     "response_time_avg_ms": self._avg_ms("companion_http_request_duration_seconds")},
            "inference": {
                "requests": int(self.total("companion_inference_requests_total")),
                "failures": int(self.total("companion_inference_failures_total")),
                "time_avg_ms": self._avg_ms("companion_inference_duration_seconds"),
                "tokens_total": int(self.total("companion_inference_tokens_total")),
                "fallbacks": int(self.total("companion_llm_fallbacks_total")),
                "remote_breaker": self.remote_breaker},
            "pipeline": stages,
        }
