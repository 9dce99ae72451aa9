"""Property-based run over the generated OpenAPI document (schemathesis): whatever it sends,
the API answers without a 5xx and every answer fits its own documented schema, status code,
content type and headers. Marked ``fuzz``; it takes about a minute."""

from __future__ import annotations

import asyncio
import queue
import threading

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from companion.api.http import make_http_app, openapi_document
from tests.conftest import fake_app, make_settings

KEY = "fuzz-key"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]

schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def live_api(tmp_path_factory):
    """The API over a fake-backed App, served by a real TCP site in its own thread and loop
    (schemathesis sends real, blocking HTTP requests)."""
    settings = make_settings(tmp_path_factory.mktemp("fuzz"),
                             api={"keys": [KEY], "rate_limit_per_minute": 1_000_000})
    ports: queue.Queue[int | BaseException] = queue.Queue()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        app = fake_app(settings)
        try:
            async with asyncio.timeout(10):
                await app.start()
            runner = web.AppRunner(make_http_app(app), handler_cancellation=True,
                                   shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            ports.put(runner.addresses[0][1])
            await stop.wait()
            await runner.cleanup()
        except BaseException as exc:
            ports.put(exc)
            raise
        finally:
            await app.aclose()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    port = ports.get(timeout=30)
    if isinstance(port, BaseException):
        raise port
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(stop.set)
    thread.join(timeout=10)


@pytest.mark.fuzz
@schema.parametrize()
@hypothesis_settings(max_examples=250, deadline=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case, live_api):
    case.call_and_validate(base_url=live_api, headers={"Authorization": f"Bearer {KEY}"},
                           checks=CHECKS, timeout=10)
