"""The OpenAPI 3.1 document, generated from the route table and its pydantic models.

Nothing here is written by hand per endpoint: each ``Route`` (see ``companion.api.common``) names
its request model, response model, media type and the error statuses it can answer, and
pydantic's ``models_json_schema`` turns the models into ``components.schemas``. pydantic 2 emits
JSON Schema 2020-12, which is what OpenAPI 3.1 uses, so the schemas go in unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from companion.api.schemas import ErrorResponse

REF = "#/components/schemas/{model}"
# outside /v1, what tells more than "alive" and "ready": paths, URLs, counters, the API itself.
# With api.keys set, these need a key too; /health and /ready stay open for probes.
DETAIL_PATHS = frozenset({"/ready/all", "/metrics", "/metrics/prometheus"})
DETAIL_PREFIXES = ("/v1/", "/api-docs/")


def needs_key(path: str) -> bool:
    """Whether ``path`` needs an API key when api.keys is set (the auth middleware and the
    OpenAPI document both ask here)."""
    return path in DETAIL_PATHS or path.startswith(DETAIL_PREFIXES)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Any
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    media_type: str = "application/json"
    errors: tuple[int, ...] = ()
    description: str = ""
    response_description: str = ""
    path_params: tuple[str, ...] = field(default=())
    events: tuple[tuple[str, type[BaseModel]], ...] = ()  # SSE: (event name, model of its data)

    @property
    def protected(self) -> bool:
        """Under /v1: needs a key, is rate limited and waits for the models to load."""
        return self.path.startswith("/v1/")

    @property
    def keyed(self) -> bool:
        """Needs a key when api.keys is set (all of /v1, and the detail outside it)."""
        return needs_key(self.path)

    @property
    def operation_id(self) -> str:
        return self.handler.__name__

    def statuses(self) -> list[int]:
        codes = set(self.errors)
        if self.protected:
            codes |= {429, 503}
        if self.keyed:
            codes.add(401)
        if self.body is not None:
            codes |= {400, 413, 422}
        if self.path_params:
            codes.add(404)
        return sorted(codes)


def _header(description: str, schema_type: str = "string") -> dict[str, Any]:
    return {"description": description, "schema": {"type": schema_type}}


COMMON_HEADERS = {
    "X-Request-Id": _header("The client's X-Request-Id, or one made for this request."),
    "X-Process-Time": _header("Seconds the server took to start answering.", "string"),
}
RATE_HEADERS = {
    "X-RateLimit-Limit": _header("Requests allowed per window.", "integer"),
    "X-RateLimit-Remaining": _header("Requests left in this window.", "integer"),
    "X-RateLimit-Reset": _header("Seconds until the window resets.", "integer"),
}


def build_openapi(routes: Sequence[Route], *, title: str, version: str,
                  description: str = "") -> dict[str, Any]:
    models = _models(routes)
    key_map, defs = models_json_schema(
        [(m, "validation") for m in models["in"]] + [(m, "serialization") for m in models["out"]],
        ref_template=REF,
    )

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return key_map[(model, mode)]  # type: ignore[index]

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        headers = {**COMMON_HEADERS, **(RATE_HEADERS if route.protected else {})}
        if route.response is not None:
            content = {route.media_type: {"schema": ref(route.response, "serialization")}}
        elif route.events:  # OpenAPI 3.1: an event stream's schema describes one event
            content = {route.media_type: {"schema": _sse_event_schema(route, ref)}}
        else:  # the OpenAPI document itself (an object), Prometheus text (a string)
            kind = "object" if route.media_type == "application/json" else "string"
            content = {route.media_type: {"schema": {"type": kind}}}
        responses: dict[str, Any] = {
            "200": {"description": route.response_description or "OK", "headers": headers,
                    "content": content}}
        for status in route.statuses():
            error_headers = dict(headers)
            if status in (429, 503):
                error_headers["Retry-After"] = _header("Seconds to wait before retrying.",
                                                       "integer")
            responses[str(status)] = {
                "description": HTTPStatus(status).phrase, "headers": error_headers,
                "content": {"application/json": {"schema": ref(ErrorResponse, "serialization")}}}
        operation: dict[str, Any] = {
            "operationId": route.operation_id, "summary": route.summary, "tags": [route.tag],
            "responses": responses,
        }
        if route.description:
            operation["description"] = route.description
        if route.path_params:
            operation["parameters"] = [
                {"name": p, "in": "path", "required": True,
                 "schema": {"type": "string", "minLength": 1, "maxLength": 128}}
                for p in route.path_params]
        if route.body is not None:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": ref(route.body, "validation")}}}
        operation["security"] = [{"bearerAuth": []}] if route.keyed else []
        paths.setdefault(route.path, {})[route.method.lower()] = operation

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "servers": [{"url": "http://127.0.0.1:3000"}],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "One of the keys in api.keys (COMPANION_API__KEYS). With no keys "
                               "configured (loopback only) everything is open; with keys, "
                               "only /health and /ready are."}},
        },
        "tags": [{"name": t} for t in _unique(r.tag for r in routes)],
    }


def add_commands(doc: dict[str, Any], actions: Sequence[Any]) -> dict[str, Any]:
    """List the commands of ``POST /v1/commands`` (from the action registry) in the document:
    ``command`` becomes an enum and ``args`` one of the actions' request schemas."""
    _, defs = models_json_schema([(a.request, "validation") for a in actions], ref_template=REF)
    schemas = doc["components"]["schemas"]
    schemas.update(defs.get("$defs", {}))
    props = schemas["CommandRequest"]["properties"]
    props["command"]["enum"] = [a.name for a in actions]
    props["command"]["description"] = "; ".join(f"{a.name}: {a.description}" for a in actions)
    props["args"] = {"description": "The command's arguments (an empty object for none).",
                     "anyOf": _unique({"$ref": REF.format(model=a.request.__name__)}
                                      for a in actions)}
    return doc


def _sse_event_schema(route: Route, ref) -> dict[str, Any]:
    """One Server-Sent Event: its name and its ``data`` (a JSON text of the named model)."""
    variants = [{
        "type": "object", "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": ref(model, "serialization")},
            "id": {"type": "string"}, "retry": {"type": "integer"}},
    } for name, model in route.events]
    return {"oneOf": variants}


def _models(routes: Iterable[Route]) -> dict[str, list[type[BaseModel]]]:
    inputs = _unique(r.body for r in routes if r.body is not None)
    outputs = _unique([*(r.response for r in routes if r.response is not None),
                       *(m for r in routes for _, m in r.events), ErrorResponse])
    return {"in": inputs, "out": outputs}


def _unique(items: Iterable[Any]) -> list[Any]:
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen
