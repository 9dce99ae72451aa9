"""Shared fixtures: settings in a temporary data dir, and an App built from fakes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from companion.app import App, Features, build_app
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


def fake_app(settings: CompanionSettings, *, features: Features = FAKE_FEATURES, **parts) -> App:
    """An App whose models and devices are fakes unless `parts` says otherwise."""
    defaults = {"llm": FakeChatModel(), "tts": FakeSynthesizer(), "stt": FakeTranscriber(),
                "wake": FakeWake(), "vad": FakeVad(), "sink": FakeSpeaker()}
    defaults.update(parts)
    return build_app(settings, features=features, **defaults)


async def until(predicate, limit_s: float = 5.0):
    """Poll ``predicate`` until it is truthy (state that a callback, signal handler or
    background task changes) and return its value; TimeoutError after ``limit_s``."""
    async with asyncio.timeout(limit_s):
        while not (result := predicate()):  # noqa: ASYNC110  polling state owned elsewhere
            await asyncio.sleep(0.01)
    return result


@pytest.fixture
async def started_app(settings):
    """A started fake-backed App, closed after the test."""
    app = fake_app(settings)
    async with asyncio.timeout(5):
        await app.start()
    yield app
    await app.aclose()
