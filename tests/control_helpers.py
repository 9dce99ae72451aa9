"""Helpers for the control-link tests: a dev control plane on 127.0.0.1:0 and daemons (App with
fakes) linked to it, with millisecond backoff."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from companion.app import App
from companion.control.client import ControlLink
from companion_dev.controlplane import ControlPlane
from tests.conftest import fake_app, make_settings

TOKEN = "device-secret"
FAST = {"token": TOKEN, "heartbeat_s": 0.2, "backoff_initial_s": 0.005, "backoff_max_s": 0.05,
        "backoff_fatal_s": 0.2, "reconnect_spread_s": 0.02}


def url(plane: ControlPlane) -> str:
    return f"ws://127.0.0.1:{plane.port}"


@contextlib.asynccontextmanager
async def linked_device(tmp_path: Path, plane_url: str, device_id: str = "dev-a", *,
                        cp: dict[str, Any] | None = None, settings_extra: dict | None = None,
                        link_kwargs: dict | None = None, **parts) -> AsyncIterator[tuple[App, ControlLink]]:
    """A started App (fakes) with its control link running; torn down on exit."""
    settings = make_settings(tmp_path / device_id, device_id=device_id,
                             control_plane={"url": plane_url, **FAST, **(cp or {})},
                             **(settings_extra or {}))
    app = fake_app(settings, **parts)
    async with asyncio.timeout(5):
        await app.start()
    link = ControlLink(app, **(link_kwargs or {}))
    tasks = [asyncio.create_task(link.run(), name=f"link-{device_id}")]
    if app.voice is not None:
        tasks.append(asyncio.create_task(app.voice.run(), name=f"voice-{device_id}"))
    try:
        yield app, link
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app.aclose()


@contextlib.asynccontextmanager
async def control_plane(port: int = 0, **kwargs) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(token=TOKEN, **kwargs)
    await plane.start("127.0.0.1", port)
    try:
        yield plane
    finally:
        await plane.stop()
        plane.close()
