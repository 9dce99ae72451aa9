"""Shared fixtures: settings in a temporary data dir, an App built from fakes (always closed
after the test, pass or fail), the installed models, and the one polling helper."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from companion.app import App, Features, build_app
from companion.models import ModelRegistry
from companion.settings import PROJECT_ROOT, CompanionSettings
from tests.fakes import FakeChatModel, FakeSpeaker, FakeSynthesizer, FakeTranscriber, FakeVad, FakeWake

FAKE_FEATURES = Features(audio_devices=False, http=False, control=False, gpio=False,
                         warm_personas=False)


def make_settings(tmp_path: Path, **overrides) -> CompanionSettings:
    """Settings for a test: a private data dir, the project's personas and models, no
    control plane, GPIO off; `overrides` as build-time keyword arguments."""
    base = {"device_id": "test-device", "data_dir": tmp_path / "data",
            "personas": {"dir": PROJECT_ROOT / "personas", "default": "companion"},
            "gpio": {"enabled": False}, "log_format": "console"}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return CompanionSettings(**base)


@pytest.fixture
def settings(tmp_path: Path) -> CompanionSettings:
    return make_settings(tmp_path)


_open_apps: list[App] = []


def fake_app(settings: CompanionSettings, *, features: Features = FAKE_FEATURES, **parts) -> App:
    """An App whose models and devices are fakes unless `parts` says otherwise. It is closed
    after the test by `_close_apps` even when the test fails before its own ``aclose``."""
    defaults = {"llm": FakeChatModel(), "tts": FakeSynthesizer(), "stt": FakeTranscriber(),
                "wake": FakeWake(), "vad": FakeVad(), "sink": FakeSpeaker()}
    defaults.update(parts)
    return track(build_app(settings, features=features, **defaults))


def track(app: App) -> App:
    """Close ``app`` after the test (for Apps built with real parts through build_app)."""
    _open_apps.append(app)
    return app


@pytest.fixture(autouse=True)
async def _close_apps() -> AsyncIterator[None]:
    """A failing test must not leak an App's tasks and model threads into the next one.
    (Apps that wider-scoped fixtures made before this test started are theirs to close.)"""
    first = len(_open_apps)
    yield
    apps = _open_apps[first:]
    del _open_apps[first:]
    for app in apps:
        async with asyncio.timeout(30):
            await app.aclose()  # idempotent: tests that close their App themselves are fine


MODELS_FIXTURES = {"installed_models"}


@pytest.fixture
def installed_models() -> ModelRegistry:
    """The registry of the installed models: a test that takes it is marked `models`."""
    return ModelRegistry(PROJECT_ROOT / "models")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that touches the installed models, so `-m 'not models'` is true."""
    for item in items:
        if MODELS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.models)


async def until(predicate: Callable[[], Any], limit_s: float = 5.0, *, what: str = "",
                every_s: float = 0.01, ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """Poll ``predicate`` until it is truthy and return its value: for state that a callback,
    a signal handler, a background task or another process changes and that no event
    announces. The predicate may be a coroutine function (a store query in a thread).
    Exceptions in ``ignore`` count as "not yet" (a server still starting).
    TimeoutError naming ``what`` after ``limit_s``."""
    try:
        async with asyncio.timeout(limit_s):
            while True:
                try:
                    result = predicate()
                    if inspect.isawaitable(result):
                        result = await result
                    if result:
                        return result
                except ignore:
                    pass
                await asyncio.sleep(every_s)
    except TimeoutError:
        raise TimeoutError(f"not met within {limit_s} s: {what or predicate}") from None


def until_blocking(predicate: Callable[[], Any], limit_s: float = 5.0, what: str = "",
                   **options: Any) -> Any:
    """`until` for a synchronous test (a subprocess test with blocking HTTP predicates)."""
    return asyncio.run(until(predicate, limit_s, what=what, **options))


@pytest.fixture
async def started_app(settings):
    """A started fake-backed App, closed after the test."""
    app = fake_app(settings)
    async with asyncio.timeout(5):
        await app.start()
    yield app
    await app.aclose()
