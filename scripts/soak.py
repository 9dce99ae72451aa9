"""A long mixed run of the whole daemon on the real models, to see what months alone would do.

    .venv/bin/python scripts/soak.py --minutes 30 --out soak.json
    .venv/bin/python scripts/soak.py --quick            # 2 minutes, for CI

One daemon (``App.run``: HTTP API, control link, voice loop, housekeeping) with a simulated
microphone that says "Hey Jarvis." and a question every few seconds, for ever, in real time,
and a speaker that writes a WAV file. Around it, at once: chat requests on the HTTP API,
persona switches and pings from a dev control plane on 127.0.0.1, that control plane stopped
and started again, and timers that ring.

The first ``--warmup-minutes`` run the same mix but are not measured: the first turns and
persona switches allocate for good (llama.cpp's per-persona prompt states, whisper's and piper's
buffers, the store's page cache), which is warm-up, not a leak. Measured from its end: turns,
errors (each with what it was, warm-up included), and at the start and the end the RSS, open
files, threads and asyncio tasks; per ten-minute slice (or per run, when shorter) the p50/p99 of
end of speech → first audio (from the VAD's end of speech: the user's silence) and of endpoint
decision → first audio, turns, errors and the resources at the slice's end; the RSS every
sample and its trend (least squares, MB per ten minutes: a leak keeps climbing, warm-up levels
off). RSS growth over the measured run (``rss_growth_percent``, the target) compares the
medians of its first and last sixth; it is also given point to point and from ready. Exit 1
when any error occurred; the summary is one JSON line, last.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from companion.app import Features, build_app
from companion.devices.audio import WavFileSink, read_wav_16k_mono
from companion.events import Event, EventType
from companion.log import configure_logging
from companion.settings import PROJECT_ROOT, CompanionSettings
from companion_dev.controlplane import ControlPlane
from scripts.bench_report import write_report
from scripts.make_utterance_wav import make

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "What colour is the sky?"]
CHATS = ["Tell me a fun fact.", "What is two plus two?", "Say hello in French."]
PERSONAS = ["companion", "entertainer", "medication_nurse"]
TOKEN = "soak-token"
SLICE_S = 600.0


class LoopingMic:
    """The utterances, one after another with quiet between, for ever, paced in real time."""

    def __init__(self, utterances: list[bytes], *, gap_s: float, block_ms: int = 30) -> None:
        self.name = "soak-mic"
        self.dropped_blocks = 0
        self.last_block_at = time.monotonic()
        self._block = 2 * 16000 * block_ms // 1000
        self._stream = b"".join(u + bytes(2 * int(gap_s * 16000)) for u in utterances)

    async def blocks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        started, n = loop.time(), 0
        block_s = self._block / 32000
        while True:
            for start in range(0, len(self._stream) - self._block + 1, self._block):
                delay = started + n * block_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                n += 1
                self.last_block_at = time.monotonic()
                yield self._stream[start:start + self._block]


def resources() -> dict[str, Any]:
    process = psutil.Process()
    return {"rss_mb": round(process.memory_info().rss / 2**20, 1),
            "open_files": process.num_fds(), "threads": threading.active_count(),
            "asyncio_tasks": len(asyncio.all_tasks())}


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"n": len(ordered), "p50_s": round(statistics.median(ordered), 3),
            "p99_s": round(p99, 3), "max_s": round(ordered[-1], 3)}


class Soak:
    def __init__(self, minutes: float, workdir: Path, *, warmup_minutes: float = 3.0,
                 sample_s: float = 10.0) -> None:
        self.duration_s = minutes * 60
        self.warmup_s = warmup_minutes * 60
        self.sample_s = sample_s
        self.workdir = workdir
        self.errors: list[dict[str, Any]] = []
        # (seconds into the run, end of speech → first audio, endpoint decision → first audio)
        self.turns: list[tuple[float, float | None, float | None]] = []
        self.counts = {"voice_turns": 0, "chats": 0, "persona_switches": 0, "timers_set": 0,
                       "timers_rang": 0, "plane_restarts": 0, "pings": 0}
        self.started = 0.0  # the end of warm-up: the measured run starts here (times are from it)
        self.plane: ControlPlane | None = None
        # held while the control plane is down for a restart: the operator's side (persona
        # switches) waits for it, as a real control plane sends nothing while it is down
        self.plane_up = asyncio.Lock()
        self.port = 0
        self.samples: list[dict[str, Any]] = []

    def error(self, kind: str, detail: Any) -> None:
        self.errors.append({"at_s": round(time.monotonic() - self.started, 1), "kind": kind,
                            "detail": str(detail)[:300]})

    def on_event(self, event: Event) -> None:
        if event.type is EventType.TURN_END:
            self.counts["voice_turns"] += 1
            timings = event.data.get("timings") or {}
            # the user's silence counts from the VAD's end of speech (the closing silence
            # included); the pipeline's own time from the moment it decided the turn was over
            self.turns.append((time.monotonic() - self.started,
                               timings.get("speech_end_to_first_audio_s"),
                               timings.get("end_of_speech_to_first_audio_s")))
        elif event.type is EventType.TURN_ERROR:
            self.error("turn", event.data)
        elif event.type is EventType.TIMER_RANG:
            self.counts["timers_rang"] += 1

    async def run(self) -> dict[str, Any]:
        utterances = []
        for i, question in enumerate(QUESTIONS):
            wav = await asyncio.to_thread(make, self.workdir / f"q{i}.wav", wake="Hey Jarvis.",
                                          text=question)
            utterances.append(read_wav_16k_mono(wav))
        self.plane = ControlPlane(token=TOKEN, state_path=self.workdir / "plane.db")
        self.port = await self.plane.start("127.0.0.1", 0)
        settings = CompanionSettings(
            device_id="soak", data_dir=self.workdir / "data", gpio={"enabled": False},
            personas={"dir": PROJECT_ROOT / "personas"}, api={"port": 0},
            pipeline={"follow_up_window_s": 0},
            control_plane={"url": f"ws://127.0.0.1:{self.port}", "token": TOKEN,
                           "backoff_max_s": 2, "reconnect_spread_s": 1})
        app = build_app(settings, source=LoopingMic(utterances, gap_s=6.0),
                        sink=WavFileSink(self.workdir / "speaker.wav", realtime=True),
                        features=Features(audio_devices=False, gpio=False))
        app.bus.add_callback(self.on_event)
        daemon = asyncio.create_task(app.run(), name="daemon")
        try:
            async with asyncio.timeout(300):
                await app.ready.wait()
                while not app.http_addresses:  # noqa: ASYNC110  set by serve_http
                    await asyncio.sleep(0.1)
                await self.plane.wait_connected("soak", within_s=60)
            host, port = app.http_addresses[0][:2]
            base = f"http://{host}:{port}"
            self.started = time.monotonic() + self.warmup_s
            ready = resources()
            drivers = [self.chats(base), self.timers(base), self.personas(),
                       self.plane_restarts(), self.sample()]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
                self.http = http
                tasks = [asyncio.create_task(d) for d in drivers]
                for task in tasks:  # a driver that dies is an error then, not at the end
                    task.add_done_callback(self._driver_died)
                try:
                    await asyncio.sleep(self.warmup_s)
                    start = resources()
                    await asyncio.sleep(self.duration_s)
                finally:
                    # a driver that died is counted already (its callback); the rest are
                    # stopped now, and one that fails while stopping is counted here
                    running = [task for task in tasks if not task.done()]
                    for task in running:
                        task.remove_done_callback(self._driver_died)
                        task.cancel()
                    for result in await asyncio.gather(*running, return_exceptions=True):
                        if isinstance(result, Exception):
                            self.error("driver", f"{type(result).__name__}: {result}")
            if daemon.done():
                self.error("daemon", daemon.exception() or "stopped")
            end = resources()
        finally:
            daemon.cancel()
            await asyncio.gather(daemon, return_exceptions=True)
            await app.aclose()
            await self.plane.stop()
            self.plane.close()
        return self.summary(ready, start, end)

    def _driver_died(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            self.error("driver", f"{task.get_coro().__name__}: {type(error).__name__}: {error}")

    async def every(self, period_s: float, first_s: float):
        await asyncio.sleep(first_s)
        while True:
            yield
            await asyncio.sleep(period_s)

    async def sample(self) -> None:
        while True:
            self.samples.append({"at_s": round(time.monotonic() - self.started, 1),
                                 "turns": self.counts["voice_turns"],
                                 "errors": len(self.errors), **resources()})
            await asyncio.sleep(self.sample_s)

    async def chats(self, base: str) -> None:
        n = 0
        async for _ in self.every(25, 5):
            body = {"message": CHATS[n % len(CHATS)]}
            n += 1
            try:
                async with self.http.post(f"{base}/v1/chat", json=body) as response:
                    if response.status != 200:
                        self.error("chat", f"HTTP {response.status}: {await response.text()}")
                    else:
                        self.counts["chats"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.error("chat", f"{type(exc).__name__}: {exc}")

    async def timers(self, base: str) -> None:
        async for _ in self.every(60, 12):
            body = {"command": "timer", "args": {"seconds": 8, "label": "soak"}}
            async with self.http.post(f"{base}/v1/commands", json=body) as response:
                if response.status != 200:
                    self.error("timer", f"HTTP {response.status}: {await response.text()}")
                else:
                    self.counts["timers_set"] += 1

    async def personas(self) -> None:
        n = 0
        async for _ in self.every(45, 20):
            n += 1
            async with self.plane_up:
                await self._switch_persona(n)

    async def _switch_persona(self, n: int) -> None:
        assert self.plane is not None
        try:
            command = await self.plane.send("soak", "persona_switch",
                                            {"persona_id": PERSONAS[n % len(PERSONAS)]})
            ack = await self.plane.wait_ack(command, within_s=60)
            if not ack.get("ok"):
                self.error("persona_switch", ack)
            else:
                self.counts["persona_switches"] += 1
            ping = await self.plane.wait_ack(await self.plane.send("soak", "ping", {}),
                                             within_s=60)
            self.counts["pings"] += bool(ping.get("ok"))
        except TimeoutError:
            self.error("control", "no ack within 60 s")

    async def plane_restarts(self) -> None:
        async for _ in self.every(min(300, self.duration_s / 3), min(300, self.duration_s / 3)):
            async with self.plane_up:
                await self.plane.stop()
                self.plane.close()
                await asyncio.sleep(2)
                # a new process of the control plane, as after a restart: same port, same state
                self.plane = ControlPlane(token=TOKEN, state_path=self.workdir / "plane.db")
                await self.plane.start("127.0.0.1", self.port)
            self.counts["plane_restarts"] += 1
            try:
                await self.plane.wait_connected("soak", within_s=60)
            except TimeoutError:
                self.error("control", "the device did not come back within 60 s")

    def summary(self, ready: dict, start: dict, end: dict) -> dict[str, Any]:
        measured = [x for x in self.samples if x["at_s"] >= 0]
        slices = []
        for k in range(max(1, math.ceil(self.duration_s / SLICE_S))):
            lo, hi = k * SLICE_S, min((k + 1) * SLICE_S, self.duration_s)
            inside_turns = [t for t in self.turns if lo <= t[0] < hi]
            inside = [x for x in measured if lo <= x["at_s"] < hi + self.sample_s]
            slices.append({
                "minutes": f"{lo / 60:g}-{hi / 60:g}",
                "turns": len(inside_turns),
                "errors": sum(1 for e in self.errors if lo <= e["at_s"] < hi),
                "end_of_speech_to_first_audio": percentiles(
                    [t[1] for t in inside_turns if t[1] is not None]),
                "decision_to_first_audio": percentiles(
                    [t[2] for t in inside_turns if t[2] is not None]),
                "start": _resources_of(inside[0]) if inside else None,
                "end": _resources_of(inside[-1]) if inside else None,
                "rss_max_mb": max((x["rss_mb"] for x in inside), default=None)})
        return {"minutes": round(self.duration_s / 60, 2),
                "warmup_minutes": round(self.warmup_s / 60, 2), **self.counts,
                "errors": len(self.errors), "error_list": self.errors[:50],
                "ready": ready, "start": start, "end": end,
                "rss_growth_percent": _window_growth(measured),
                "rss_growth_point_to_point_percent": _growth(start, end),
                "rss_growth_from_ready_percent": _growth(ready, end),
                "rss_trend_mb_per_10_min": _trend(measured),
                "slices": slices,
                "all_turns": percentiles([t[1] for t in self.turns
                                          if t[0] >= 0 and t[1] is not None]),
                "rss_samples": [[x["at_s"], x["rss_mb"]] for x in self.samples]}


def _resources_of(sample: dict[str, Any]) -> dict[str, Any]:
    return {k: sample[k] for k in ("at_s", "rss_mb", "open_files", "threads", "asyncio_tasks")}


def _growth(before: dict[str, Any], after: dict[str, Any]) -> float:
    return round((after["rss_mb"] - before["rss_mb"]) / before["rss_mb"] * 100, 2)


def _window_growth(samples: list[dict[str, Any]]) -> float | None:
    """RSS growth between the medians of the first and the last sixth of the samples (at most
    5 minutes' worth each): RSS swings by ±60 MB with what is being said (piper's working
    memory per character), so two single samples measure the moment, not the level."""
    k = min(len(samples) // 6, 30)
    if k < 1:
        return None
    before = statistics.median(x["rss_mb"] for x in samples[:k])
    after = statistics.median(x["rss_mb"] for x in samples[-k:])
    return round((after - before) / before * 100, 2)


def _trend(samples: list[dict[str, Any]]) -> float | None:
    """Least-squares slope of RSS over time, in MB per ten minutes."""
    if len(samples) < 3:
        return None
    slope = statistics.linear_regression([x["at_s"] for x in samples],
                                         [x["rss_mb"] for x in samples]).slope
    return round(slope * SLICE_S, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true",
                        help="2 minutes after a 30-second warm-up (CI)")
    parser.add_argument("--warmup-minutes", type=float, default=3.0,
                        help="run, not measured, before the start figures are taken")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    minutes = 2.0 if args.quick else args.minutes
    warmup = 0.5 if args.quick else args.warmup_minutes
    configure_logging(args.log_level, "console")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        summary = asyncio.run(Soak(minutes, Path(tmp), warmup_minutes=warmup,
                                   sample_s=5.0 if args.quick else 10.0).run())
    write_report(summary, args.out)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
