"""The dev control plane is a development tool: it lives outside the daemon's package, and its
HTTP API (which sends commands to devices) answers only with the admin token."""

from __future__ import annotations

import ast
from pathlib import Path

import aiohttp
import pytest

from companion.settings import PROJECT_ROOT
from companion_dev.controlplane import ADMIN_TOKEN_ENV, ControlPlane, main

ADMIN = "admin-secret"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_daemon_never_imports_the_dev_tools():
    sources = sorted((PROJECT_ROOT / "companion").rglob("*.py"))
    assert sources
    offenders = {str(p.relative_to(PROJECT_ROOT)) for p in sources
                 if any(name.split(".")[0] == "companion_dev" for name in imported_modules(p))}
    assert offenders == set()


@pytest.mark.parametrize(("admin_token", "header", "allowed"), [
    (ADMIN, None, False),
    (ADMIN, "Bearer wrong", False),
    (ADMIN, f"Basic {ADMIN}", False),
    (ADMIN, "Bearer", False),
    (ADMIN, f"Bearer {ADMIN}x", False),
    (ADMIN, f"Bearer {ADMIN}", True),
    (ADMIN, f"bearer {ADMIN}", True),
    (None, f"Bearer {ADMIN}", False),  # no admin token configured: the API is closed
    (None, "Bearer ", False),
])
async def test_the_admin_api_needs_the_admin_token(admin_token, header, allowed):
    plane = ControlPlane(token="device-token", admin_token=admin_token)
    await plane.start("127.0.0.1", 0)
    try:
        headers = {"Authorization": header} if header is not None else {}
        async with aiohttp.ClientSession(headers=headers) as http:
            base = f"http://127.0.0.1:{plane.port}"
            for method, path in (("GET", "/devices"), ("POST", "/broadcast"),
                                 ("GET", "/devices/kitchen/messages")):
                async with http.request(method, base + path, json={"type": "ping", "payload": {}}) as r:
                    assert (r.status < 300) if allowed else (r.status == 401), (method, path, r.status)
                    if not allowed:
                        assert (await r.json())["error"]["code"] == "UNAUTHORIZED"
            async with http.get(base + "/health") as r:  # health stays open for probes
                assert r.status == 200
    finally:
        await plane.stop()
        plane.close()


def test_serve_refuses_to_start_without_an_admin_token(monkeypatch, capsys):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    assert main(["serve", "--port", "0"]) == 2
    assert ADMIN_TOKEN_ENV in capsys.readouterr().err
