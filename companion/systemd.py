"""systemd integration: READY=1 once started, and a watchdog that is petted only while the
microphone delivers audio and the event loop is not lagging, so a hung microphone or a blocked
loop gets the process restarted (WatchdogSec in systemd/companion.service)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from companion.app import App

log = structlog.get_logger(__name__)

MAX_LOOP_LAG_S = 2.0
MAX_AUDIO_SILENCE_S = 10.0


def _notifier():
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    import sdnotify

    return sdnotify.SystemdNotifier()


def watchdog_interval_s() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    return int(usec) / 2e6 if usec and usec.isdigit() else None


def healthy(app: App, lag_s: float) -> tuple[bool, str]:
    if lag_s > MAX_LOOP_LAG_S:
        return False, f"event loop lagging {lag_s:.1f}s"
    source = app.voice.source if app.voice is not None else None
    if source is not None and not app.voice.source_ended.is_set():  # type: ignore[union-attr]
        quiet = time.monotonic() - source.last_block_at
        if not getattr(source, "healthy", True):
            # a sound device that died is being reopened by the source itself (audio_in in
            # /ready/all says so): a restart would not bring it back sooner, and without the
            # device it would become a restart loop
            return True, "the microphone is down and being reopened"
        if quiet > MAX_AUDIO_SILENCE_S:
            return False, f"no audio from the microphone for {quiet:.0f}s"
    return True, "ok"


async def supervise(app: App) -> None:
    notifier = _notifier()
    if notifier is not None:
        notifier.notify("READY=1\nSTATUS=serving")
    interval = watchdog_interval_s() or 5.0
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + interval
        await asyncio.sleep(interval)
        lag = max(0.0, loop.time() - expected)
        ok, why = healthy(app, lag)
        app.status.set_component("watchdog", ok, why, latency_ms=round(lag * 1000, 1))
        if notifier is None:
            continue
        if ok:
            notifier.notify("WATCHDOG=1")
        else:
            log.error("watchdog not petted", reason=why)
            notifier.notify(f"STATUS={why}")
