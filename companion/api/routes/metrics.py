"""Counters as JSON and Prometheus text, and the OpenAPI document."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from companion.api import schemas as s
from companion.api.common import METRICS, OPENAPI, route


@route("GET", "/metrics", summary="Counters as JSON", tag="metrics", response=s.MetricsResponse)
async def metrics_json(request: web.Request) -> s.MetricsResponse:
    return s.MetricsResponse.model_validate(request.app[METRICS].as_json())


@route("GET", "/metrics/prometheus", summary="The same in Prometheus text format", tag="metrics",
       media_type="text/plain")
async def metrics_prometheus(request: web.Request) -> web.Response:
    response = web.Response(body=request.app[METRICS].prometheus_text())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


@route("GET", "/api-docs/openapi.json", summary="This document", tag="docs")
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])
