"""The local HTTP API with fakes: every endpoint and error path (SPEC §3)."""

from __future__ import annotations

import asyncio

import pytest

from companion.api.http import ROUTES, RateLimiter, openapi_document
from companion.events import EventType
from tests.conftest import until
from tests.fakes import FakeChatModel
from tests.http_helpers import parse_sse, sse_events, start_api

ERROR_KEYS = {"code", "message", "details", "request_id"}


async def error_of(response, status: int, code: str) -> dict:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == response.headers["X-Request-Id"]
    return body["error"]


@pytest.fixture
async def api(aiohttp_client, tmp_path):
    client, app = await start_api(aiohttp_client, tmp_path)
    yield client, app
    await app.aclose()


# --- health, readiness, headers ----------------------------------------------------------------


async def test_health_ready_and_common_headers(api):
    client, _ = api
    async with asyncio.timeout(5):
        r = await client.get("/health", headers={"X-Request-Id": "abc-123"})
        assert r.status == 200 and await r.json() == {"status": "ok"}
        assert r.headers["X-Request-Id"] == "abc-123"
        assert float(r.headers["X-Process-Time"]) >= 0
        r = await client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
        assert r.headers["X-Request-Id"] != "bad id\twith spaces"
        assert len(r.headers["X-Request-Id"]) == 32
        r = await client.get("/ready")
        body = await r.json()
        assert r.status == 200 and body["status"] == "ready"
        assert body["inference"]["healthy"] is True and body["inference"]["model"] == "fake-llm"


async def test_ready_all_lists_every_component(api):
    client, app = api
    app.status.recent_turns.extend([])
    async with asyncio.timeout(5):
        body = await (await client.get("/ready/all")).json()
    assert set(body["components"]) == {"wake_word", "vad", "stt", "llm", "llm_remote", "tts",
                                       "audio_in", "audio_out", "echo_cancel", "gpio",
                                       "control_plane", "storage"}
    assert body["components"]["llm_remote"] == {
        "healthy": True, "enabled": False, "detail": "llm.backend is local", "latency_ms": None}
    assert body["components"]["llm"]["healthy"] and body["components"]["llm"]["enabled"]
    assert body["components"]["storage"]["latency_ms"] is not None
    assert body["components"]["control_plane"]["enabled"] is False
    assert body["status"] == "ready"
    assert {"total", "stt", "llm_first_token"} <= set(body["latency_ms"])


async def test_ready_all_percentiles_of_recent_turns(api):
    from companion.state import TurnTimings

    client, app = api
    for i in range(1, 101):
        app.status.recent_turns.append(TurnTimings(f"t{i}", stt_s=i / 1000, total_s=i / 100))
    async with asyncio.timeout(5):
        body = await (await client.get("/ready/all")).json()
    assert body["latency_ms"]["stt"] == {"count": 100, "p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert body["latency_ms"]["total"]["p99"] == 990.0
    assert body["latency_ms"]["wake"]["count"] == 0


async def test_v1_is_503_while_models_load_but_health_answers(aiohttp_client, tmp_path):
    client, app = await start_api(aiohttp_client, tmp_path, start=False)
    async with asyncio.timeout(5):
        assert (await client.get("/health")).status == 200
        error = await error_of(await client.get("/ready"), 503, "SERVICE_UNAVAILABLE")
        assert error["details"]["status"] == "loading"
        r = await client.post("/v1/chat", json={"message": "hi"})
        await error_of(r, 503, "SERVICE_UNAVAILABLE")
        assert r.headers["Retry-After"]
        body = await (await client.get("/ready/all")).json()
        assert body["status"] == "loading"
        app.load_error = "llm: model file missing"
        error = await error_of(await client.get("/ready"), 503, "SERVICE_UNAVAILABLE")
        assert error["details"] == {"status": "failed", "load_error": "llm: model file missing"}
        await error_of(await client.get("/v1/state"), 503, "SERVICE_UNAVAILABLE")
    app.store.close()


async def test_unknown_route_and_wrong_method_are_json(api):
    client, _ = api
    async with asyncio.timeout(5):
        error = await error_of(await client.get("/nope"), 404, "NOT_FOUND")
        assert error["details"]["path"] == "/nope"
        await error_of(await client.get("/v1/nope"), 404, "NOT_FOUND")
        r = await client.delete("/health")
        error = await error_of(r, 405, "METHOD_NOT_ALLOWED")
        assert error["details"]["allowed_methods"] == ["GET"]
        assert "GET" in r.headers["Allow"]
        await error_of(await client.get("/v1/chat"), 405, "METHOD_NOT_ALLOWED")


async def test_internal_error_is_json_without_traceback(api):
    client, app = api
    app.registry = None  # type: ignore[assignment]  # break the models endpoint
    async with asyncio.timeout(5):
        r = await client.get("/v1/system/models")
        error = await error_of(r, 500, "INTERNAL_ERROR")
    assert "Traceback" not in str(error)


# --- auth and rate limit -------------------------------------------------------------------------


async def test_bearer_key_required_on_v1_and_the_detail(aiohttp_client, tmp_path):
    client, app = await start_api(aiohttp_client, tmp_path, api={"keys": ["k1", "other-key"]})
    async with asyncio.timeout(5):
        r = await client.get("/v1/state")
        await error_of(r, 401, "UNAUTHORIZED")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        await error_of(await client.get("/v1/state", headers={"Authorization": "Bearer nope"}),
                       401, "UNAUTHORIZED")
        await error_of(await client.get("/v1/state", headers={"Authorization": "Basic k1"}),
                       401, "UNAUTHORIZED")
        assert (await client.get("/v1/state", headers={"Authorization": "Bearer k1"})).status == 200
        assert (await client.get("/v1/state",
                                 headers={"Authorization": "bearer other-key"})).status == 200
        for open_path in ("/health", "/ready"):  # probes stay open
            assert (await client.get(open_path)).status == 200, open_path
        # what tells paths, URLs and counters needs the key (issue 12)
        for detail in ("/ready/all", "/metrics", "/metrics/prometheus", "/api-docs/openapi.json"):
            await error_of(await client.get(detail), 401, "UNAUTHORIZED")
            r = await client.get(detail, headers={"Authorization": "Bearer k1"})
            assert r.status == 200, detail
    await app.aclose()


async def test_without_keys_on_loopback_everything_is_open(api):
    client, _ = api
    async with asyncio.timeout(5):
        for path in ("/health", "/ready", "/ready/all", "/metrics", "/api-docs/openapi.json",
                     "/v1/state"):
            assert (await client.get(path)).status == 200, path


async def test_rate_limit_per_ip_with_headers(aiohttp_client, tmp_path):
    client, app = await start_api(aiohttp_client, tmp_path, api={"rate_limit_per_minute": 3})
    async with asyncio.timeout(5):
        remaining = []
        for _ in range(3):
            r = await client.get("/v1/state")
            assert r.status == 200
            assert r.headers["X-RateLimit-Limit"] == "3"
            remaining.append(int(r.headers["X-RateLimit-Remaining"]))
            assert 0 < int(r.headers["X-RateLimit-Reset"]) <= 60
        assert remaining == [2, 1, 0]
        r = await client.get("/v1/state")
        error = await error_of(r, 429, "RATE_LIMITED")
        assert int(r.headers["Retry-After"]) == error["details"]["retry_after"] > 0
        assert r.headers["X-RateLimit-Remaining"] == "0"
        assert (await client.get("/health")).status == 200  # probes are not throttled
    await app.aclose()


def test_rate_limiter_window_resets_and_stays_bounded():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0], max_clients=3)
    assert limiter.hit("a")[:2] == (True, 1)
    assert limiter.hit("a")[:2] == (True, 0)
    assert limiter.hit("a") == (False, 0, 60)
    now[0] = 59.5
    assert limiter.hit("a") == (False, 0, 1)
    now[0] = 60.0
    assert limiter.hit("a")[0] is True
    for ip in ("b", "c", "d", "e"):
        limiter.hit(ip)
    assert len(limiter._windows) <= 3


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "field"), [
    ({"message": "hi", "temperature": 3}, "temperature"),
    ({"message": "hi", "temperature": -0.1}, "temperature"),
    ({"message": "hi", "temperature": "hot"}, "temperature"),
    ({"message": 5}, "message"),
    ({"message": ""}, "message"),
    ({}, "message"),
    ({"message": "hi", "max_tokens": 0}, "max_tokens"),
    ({"message": "hi", "speak": "yes"}, "speak"),
    ({"message": "hi", "temprature": 1}, "temprature"),
    ({"message": "hi", "model": "gpt-9"}, "model"),
    ([1, 2], "(body)"),
])
async def test_chat_validation_errors(api, body, field):
    client, _ = api
    async with asyncio.timeout(5):
        error = await error_of(await client.post("/v1/chat", json=body), 422, "VALIDATION_ERROR")
    assert field in [f["field"] for f in error["details"]["fields"]]


async def test_bad_json_and_oversize_body(aiohttp_client, tmp_path):
    client, app = await start_api(aiohttp_client, tmp_path, api={"max_body_bytes": 2048})
    async with asyncio.timeout(5):
        r = await client.post("/v1/chat", data=b'{"message": "hi"',
                              headers={"Content-Type": "application/json"})
        await error_of(r, 400, "BAD_REQUEST")
        r = await client.post("/v1/chat", data=b"[" * 1000 + b"]" * 1000)  # deep nesting
        assert r.status in (400, 422)
        error = await error_of(await client.post("/v1/chat", json={"message": "x" * 5000}),
                               413, "PAYLOAD_TOO_LARGE")
        assert error["details"]["max_body_bytes"] == 2048

        async def chunks():  # no Content-Length: the reader has to stop it
            for _ in range(10):
                yield b"x" * 1000

        await error_of(await client.post("/v1/commands", data=chunks()), 413, "PAYLOAD_TOO_LARGE")
    await app.aclose()


# --- chat --------------------------------------------------------------------------------------------


async def test_chat_shape_and_conversation_shared_with_voice(api):
    client, app = api
    async with asyncio.timeout(5):
        # a conversation started by voice ...
        voice = await app.conversation.reply_text("hello from the kitchen", source="voice")
        r = await client.post("/v1/chat", json={"message": "and again",
                                                "conversation_id": voice.session_id})
        body = await r.json()
        assert r.status == 200, body
        assert set(body) == {"id", "conversation_id", "role", "content", "persona_id", "model",
                             "tokens", "latency_ms", "created_at", "spoken"}
        assert body["role"] == "assistant" and body["content"] == "Paris is the capital. It is lovely."
        assert body["conversation_id"] == voice.session_id
        assert body["tokens"]["total"] == body["tokens"]["prompt"] + body["tokens"]["completion"] > 0
        assert body["model"] == "fake-llm" and body["persona_id"] == "companion"
        # ... is continued over HTTP: the LLM saw the voice turn
        assert any(m["content"] == "hello from the kitchen" for m in app.llm.prompts[-1])
        session = await (await client.get(f"/v1/sessions/{voice.session_id}")).json()
        assert [m["source"] for m in session["messages"]] == ["voice", "voice", "http", "http"]
        # without an id, HTTP continues the device's active conversation (voice picks it up)
        r = await client.post("/v1/chat", json={"message": "no id"})
        assert (await r.json())["conversation_id"] == app.conversation.active_session_id


async def test_chat_overrides_reach_the_llm(api):
    client, app = api
    async with asyncio.timeout(5):
        r = await client.post("/v1/chat", json={"message": "hi", "system_prompt": "Be a pirate.",
                                                "model": "fake-llm", "temperature": 1.5,
                                                "max_tokens": 2})
        assert r.status == 200
    assert app.llm.prompts[-1][0] == {"role": "system", "content": "Be a pirate."}
    assert (await r.json())["content"] == "Paris is the capital. It is lovely."[:16]


async def test_chat_unknown_conversation_is_404(api):
    client, _ = api
    async with asyncio.timeout(5):
        for path in ("/v1/chat", "/v1/chat/stream"):
            r = await client.post(path, json={"message": "hi", "conversation_id": "ses_nope"})
            await error_of(r, 404, "NOT_FOUND")


async def test_chat_speak_says_the_reply_in_the_persona_voice(api):
    client, app = api
    async with asyncio.timeout(5):
        r = await client.post("/v1/chat", json={"message": "hi", "speak": True})
        assert (await r.json())["spoken"] is True
        await until(lambda: len(app.sink.played) >= 2)
    spoken = [text for text, _ in app.tts.spoken]
    assert spoken[:2] == ["Paris is the capital.", "It is lovely."]
    assert app.tts.spoken[0][1] == app.conversation.active_persona.voice_config.params()


class BrokenChatModel(FakeChatModel):
    async def stream(self, messages, params, stats=None, *, priority=None):
        yield "Par"
        raise RuntimeError("llama.cpp exploded")


async def test_llm_failure_is_502_and_an_sse_error_event(aiohttp_client, tmp_path):
    client, app = await start_api(aiohttp_client, tmp_path, parts={"llm": BrokenChatModel()})
    async with asyncio.timeout(5):
        await error_of(await client.post("/v1/chat", json={"message": "hi"}), 502, "UPSTREAM_ERROR")
        r = await client.post("/v1/chat/stream", json={"message": "hi"})
        events = parse_sse(await r.text())
        assert events[0] == ("message", {"delta": "Par"})
        assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "UPSTREAM_ERROR"
        metrics = await (await client.get("/metrics")).json()
        assert metrics["inference"]["failures"] == 2
    await app.aclose()


# --- streaming -----------------------------------------------------------------------------------------


async def test_stream_sends_deltas_then_done(api):
    client, app = api
    async with asyncio.timeout(5):
        r = await client.post("/v1/chat/stream", json={"message": "hi"})
        assert r.status == 200 and r.content_type == "text/event-stream"
        assert r.headers["X-Request-Id"] and r.headers["X-RateLimit-Limit"]
        events = parse_sse(await r.text())
    deltas = [data["delta"] for event, data in events if event == "message"]
    assert "".join(deltas) == "Paris is the capital. It is lovely."
    event, done = events[-1]
    assert event == "done"
    assert done["conversation_id"] == app.conversation.active_session_id
    assert done["tokens"]["completion"] == len(deltas)
    assert {"id", "persona_id", "model", "latency_ms"} <= set(done)


async def test_stream_first_delta_arrives_before_the_reply_is_complete(aiohttp_client, tmp_path):
    llm = FakeChatModel("one two three four five six seven eight nine ten", delay_s=0.03, chunk=4)
    client, app = await start_api(aiohttp_client, tmp_path, parts={"llm": llm})
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        started = loop.time()
        r = await client.post("/v1/chat/stream", json={"message": "count"})
        times = {}
        async for event, _ in sse_events(r):
            times.setdefault(event, loop.time() - started)
    assert times["message"] < times["done"] / 3
    await app.aclose()


async def test_client_disconnect_cancels_generation(aiohttp_client, tmp_path):
    llm = FakeChatModel("word " * 500, delay_s=0.02, chunk=5)
    client, app = await start_api(aiohttp_client, tmp_path, parts={"llm": llm})
    async with asyncio.timeout(5):
        r = await client.post("/v1/chat/stream", json={"message": "talk forever"})
        async for event, _ in sse_events(r):
            assert event == "message"
            break
        r.close()  # the client goes away mid-reply
        await until(lambda: llm.cancelled == 1)
        # nothing was recorded: the turn did not complete
        turns = await app.store.run(app.store.count_turns_since, 0)
    assert turns == 0
    await app.aclose()


# --- commands ----------------------------------------------------------------------------------------


async def test_commands_run_and_unknown_lists_known(api):
    client, app = api
    async with asyncio.timeout(5):
        r = await client.post("/v1/commands", json={"command": "volume", "args": {"level": 30}})
        body = await r.json()
        assert r.status == 200 and body["status"] == "completed"
        assert body["command"] == "volume" and body["result"]["volume"] == 30
        assert body["executed_at"].endswith("Z")
        assert app.status.volume == pytest.approx(0.3)
        error = await error_of(await client.post("/v1/commands", json={"command": "dance"}),
                               404, "NOT_FOUND")
        assert {"help", "status", "say", "stop", "listen", "mute", "unmute", "volume", "persona",
                "timer", "time"} == set(error["details"]["known_commands"])
        error = await error_of(await client.post("/v1/commands", json={
            "command": "volume", "args": {"level": 300}}), 422, "VALIDATION_ERROR")
        assert error["details"]["fields"][0]["field"] == "args.level"
        r = await client.post("/v1/commands", json={"command": "listen"})
        body = await r.json()
        assert body["status"] == "failed" and "microphone" in body["result"]["error"]


async def test_command_parse_does_not_run_it(api):
    client, app = api
    async with asyncio.timeout(5):
        r = await client.post("/v1/commands/parse", json={"input": "set a timer for five minutes"})
        body = await r.json()
        assert body == {"input": "set a timer for five minutes", "parsed": True,
                        "command": {"command": "timer", "args": {"seconds": 300.0}},
                        "confidence": 0.9, "requires_approval": False}
        body = await (await client.post("/v1/commands/parse",
                                        json={"input": "switch to the nurse"})).json()
        assert body["command"] == {"command": "persona", "args": {"id": "medication_nurse"}}
        body = await (await client.post("/v1/commands/parse",
                                        json={"input": "what is the capital of France"})).json()
        assert body["parsed"] is False and body["command"] is None
        assert body["requires_approval"] is True  # nothing confident to run
    assert not app.timers.by_id


# --- system, personas, state, sessions -------------------------------------------------------------


async def test_system_status_and_models(api):
    client, _ = api
    async with asyncio.timeout(5):
        await client.post("/v1/chat", json={"message": "hi"})
        body = await (await client.get("/v1/system/status")).json()
        assert body["version"] and body["uptime_seconds"] >= 0
        assert body["resources"]["memory_used_mb"] > 0
        assert body["resources"]["database_size_mb"] > 0
        assert body["statistics"]["inference_requests"] == 1
        assert body["statistics"]["turns_today"] == 1
        assert body["statistics"]["requests_total"] >= 1
        body = await (await client.get("/v1/system/models")).json()
    kinds = {m["kind"] for m in body["models"]}
    assert kinds == {"stt", "llm", "tts", "wake"}
    llm = next(m for m in body["models"] if m["id"] == "smollm2-135m-instruct")
    assert llm["default"] and llm["parameters"] == "135M"
    assert {"id", "name", "kind", "parameters", "size_bytes", "context_length", "default",
            "installed", "active"} == set(llm)


async def test_personas_list_detail_switch_reload(api):
    client, app = api
    async with asyncio.timeout(5):
        body = await (await client.get("/v1/personas")).json()
        assert body["active_persona_id"] == "companion"
        assert {p["id"] for p in body["personas"]} >= {"companion", "medication_nurse"}
        detail = await (await client.get("/v1/personas/medication_nurse")).json()
        assert detail["name"] == "Nora" and detail["voice_config"]["length_scale"] == 1.2
        assert "allowed_commands" in detail["behavior_config"]
        await error_of(await client.get("/v1/personas/nobody"), 404, "NOT_FOUND")

        first = await (await client.post("/v1/chat", json={"message": "hi"})).json()
        r = await client.post("/v1/personas/switch", json={
            "target_persona_id": "medication_nurse", "preserve_context": True,
            "transition_message": "Nora here."})
        body = await r.json()
        assert r.status == 200 and body["success"] is True
        assert body["previous_persona_id"] == "companion"
        assert body["new_persona_id"] == "medication_nurse"
        assert body["session_id"] == first["conversation_id"]  # context kept
        await until(lambda: any(t == "Nora here." for t, _ in app.tts.spoken))
        voice = next(v for t, v in app.tts.spoken if t == "Nora here.")
        assert voice.length_scale == 1.2
        r = await client.post("/v1/personas/switch", json={"target_persona_id": "companion",
                                                           "preserve_context": False})
        assert (await r.json())["session_id"] != first["conversation_id"]
        await error_of(await client.post("/v1/personas/switch", json={"target_persona_id": "x"}),
                       404, "NOT_FOUND")
        body = await (await client.post("/v1/personas/reload")).json()
        assert "companion" in body["personas"] and body["errors"] == []


async def test_state(api):
    client, app = api
    async with asyncio.timeout(5):
        await client.post("/v1/chat", json={"message": "hi"})
        body = await (await client.get("/v1/state")).json()
    assert body["device_id"] == "test-device" and body["status"] == "online"
    assert body["pipeline_state"] == "idle" and body["active_persona_id"] == "companion"
    assert body["active_session_id"] == app.conversation.active_session_id
    assert body["last_activity"] is not None
    assert body["metrics"]["interactions_today"] == 1
    assert body["metrics"]["avg_response_latency_ms"] is not None
    assert body["control_plane"] == {"configured": False, "connected": None, "since": None,
                                     "retries": None, "outbox_depth": None}


async def test_state_with_a_control_link_that_never_connected(api):
    from companion.control.client import ControlLink

    client, app = api
    app.settings = app.settings.model_copy(update={"control_plane": app.settings.control_plane
                                                   .model_copy(update={"url": "wss://cp"})})
    link = ControlLink(app)  # the real link object, not started: it never connected
    link.status.retries = 4
    async with asyncio.timeout(5):
        body = await (await client.get("/v1/state")).json()
        all_ = await (await client.get("/ready/all")).json()
    assert body["status"] == "offline"
    assert body["control_plane"] == {"configured": True, "connected": False, "since": None,
                                     "retries": 4, "outbox_depth": 0}
    assert all_["components"]["control_plane"]["healthy"] is False
    assert all_["status"] == "degraded"


async def test_sessions_get_and_delete(api):
    client, app = api
    async with asyncio.timeout(5):
        chat = await (await client.post("/v1/chat", json={"message": "remember the milk"})).json()
        sid = chat["conversation_id"]
        body = await (await client.get(f"/v1/sessions/{sid}")).json()
        assert body["id"] == sid and body["active"] is True
        assert [m["role"] for m in body["messages"]] == ["user", "assistant"]
        assert body["messages"][0]["content"] == "remember the milk"
        r = await client.delete(f"/v1/sessions/{sid}")
        assert await r.json() == {"id": sid, "deleted": True}
        assert app.conversation.active_session_id is None
        await error_of(await client.get(f"/v1/sessions/{sid}"), 404, "NOT_FOUND")
        await error_of(await client.delete(f"/v1/sessions/{sid}"), 404, "NOT_FOUND")
    rows = await app.store.run(app.store.query, "SELECT COUNT(*) AS n FROM messages")
    assert rows[0]["n"] == 0


# --- metrics and docs -----------------------------------------------------------------------------------


async def test_metrics_json_and_prometheus_agree(api):
    client, app = api
    app.bus.emit(EventType.TURN_END, "t1", timings={"stt_s": 0.2, "llm_first_token_s": 0.3,
                                                    "total_s": 1.5, "wake_s": None})
    app.bus.emit(EventType.LLM_END, "t1", text="Hi.", tokens=12, took_s=0.4)
    async with asyncio.timeout(5):
        await client.post("/v1/chat", json={"message": "hi"})
        await client.get("/nope")
        body = await (await client.get("/metrics")).json()
        text = await (await client.get("/metrics/prometheus")).text()
    assert body["http"]["by_class"]["2xx"] >= 1 and body["http"]["by_class"]["4xx"] == 1
    assert body["http"]["requests_total"] == sum(body["http"]["by_class"].values())
    assert body["inference"]["requests"] == 2 and body["inference"]["tokens_total"] > 12
    assert body["pipeline"]["stt"] == {"count": 1, "avg_ms": 200.0}
    assert "wake" not in body["pipeline"]
    assert 'companion_pipeline_stage_seconds_bucket{le="0.25",stage="stt"} 1.0' in text
    assert "companion_http_request_duration_seconds_bucket" in text
    assert 'companion_inference_requests_total{source="http"} 1.0' in text


def test_openapi_document_covers_every_route():
    doc = openapi_document()
    assert doc["openapi"].startswith("3.1")
    declared = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    routes = {(r.method, r.path) for r in ROUTES}
    assert declared == routes
    spec_routes = {("GET", "/health"), ("GET", "/ready"), ("GET", "/ready/all"),
                   ("POST", "/v1/chat"), ("POST", "/v1/chat/stream"), ("POST", "/v1/commands"),
                   ("POST", "/v1/commands/parse"), ("GET", "/v1/system/status"),
                   ("GET", "/v1/system/models"), ("GET", "/v1/personas"),
                   ("GET", "/v1/personas/{id}"), ("POST", "/v1/personas/switch"),
                   ("POST", "/v1/personas/reload"), ("GET", "/v1/state"),
                   ("GET", "/v1/sessions/{id}"), ("DELETE", "/v1/sessions/{id}"),
                   ("GET", "/metrics"), ("GET", "/metrics/prometheus"),
                   ("GET", "/api-docs/openapi.json")}
    assert spec_routes <= routes
    chat = doc["paths"]["/v1/chat"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatRequest")
    schema = doc["components"]["schemas"]["ChatRequest"]["properties"]["temperature"]
    assert {"minimum": 0.0, "maximum": 2.0}.items() <= schema["anyOf"][0].items()
    assert chat["security"] == [{"bearerAuth": []}]
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert "StreamDone" in doc["components"]["schemas"]


async def test_openapi_served_matches_generated(api):
    client, _ = api
    async with asyncio.timeout(5):
        assert await (await client.get("/api-docs/openapi.json")).json() == openapi_document()


# --- serving --------------------------------------------------------------------------------------


async def test_serve_http_runs_until_cancelled(tmp_path):
    import aiohttp

    from companion.api.http import serve_http
    from tests.conftest import fake_app, make_settings

    app = fake_app(make_settings(tmp_path, api={"port": 0}))
    async with asyncio.timeout(10):
        server = asyncio.create_task(serve_http(app))  # before start(): /health must answer
        await until(lambda: app.http_addresses)
        host, port = app.http_addresses[0][:2]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{host}:{port}/health") as r:
                assert r.status == 200
            await app.start()
            async with session.get(f"http://{host}:{port}/ready") as r:
                assert r.status == 200
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
    assert server.cancelled()
    await app.aclose()


async def test_serve_http_refuses_an_open_non_loopback_bind(tmp_path):
    from companion.api.http import serve_http
    from tests.conftest import fake_app, make_settings

    app = fake_app(make_settings(tmp_path, api={"host": "0.0.0.0", "port": 0}))
    with pytest.raises(RuntimeError, match=r"api\.keys"):
        async with asyncio.timeout(5):
            await serve_http(app)
    app.store.close()


async def test_chat_can_start_a_new_conversation(tmp_path, aiohttp_client):
    from tests.http_helpers import start_api

    client, _app = await start_api(aiohttp_client, tmp_path)
    first = await (await client.post("/v1/chat", json={"message": "hello"})).json()
    fresh = await (await client.post("/v1/chat", json={"message": "hello",
                                                        "new_conversation": True})).json()
    again = await (await client.post("/v1/chat", json={"message": "hello"})).json()
    assert fresh["conversation_id"] != first["conversation_id"]
    assert again["conversation_id"] == first["conversation_id"]  # the active one goes on
