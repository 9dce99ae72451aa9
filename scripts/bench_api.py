#!/usr/bin/env python3
"""Benchmark the local HTTP API with the real LLM; prints one JSON object.

    .venv/bin/python scripts/bench_api.py [--seconds 3] [--runs 5]

It starts the daemon's API (real SmolLM2 + piper, no audio devices) in a child process on a free
loopback port, so the client's work does not share the server's event loop, then measures:

- /health requests per second (8 concurrent clients) and p50/p99 latency (sequential), idle;
- /health p99 while a /v1/chat/stream generates, and its ratio to the idle p99 (target <= 3);
- time to the first SSE delta versus time to the whole reply (median of --runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Tell me a short story about a lighthouse keeper and his cat."


# --- the server (child process) -------------------------------------------------------------------


async def serve(port: int, data_dir: str) -> None:
    sys.path.insert(0, str(ROOT))
    from companion.api.http import serve_http
    from companion.app import Features, build_app
    from companion.log import configure_logging
    from companion.settings import CompanionSettings

    settings = CompanionSettings(
        device_id="bench", data_dir=Path(data_dir), log_level="warning",
        api={"host": "127.0.0.1", "port": port, "rate_limit_per_minute": 1_000_000},
        gpio={"enabled": False})
    configure_logging("warning", "console")
    app = build_app(settings, features=Features(audio_devices=False, voice_loop=False,
                                                http=False, control=False, gpio=False,
                                                warm_personas=False))
    async with asyncio.TaskGroup() as group:
        group.create_task(serve_http(app))
        await app.start()


# --- the client ---------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def sequential_health(session: aiohttp.ClientSession, url: str, n: int,
                            until: asyncio.Task | None = None) -> list[float]:
    out = []
    for _ in range(n):
        if until is not None and until.done():
            break
        started = time.perf_counter()
        async with session.get(url) as r:
            await r.read()
        out.append(time.perf_counter() - started)
    return out


async def health_rps(session: aiohttp.ClientSession, url: str, seconds: float) -> float:
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            async with session.get(url) as r:
                await r.read()
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(8)))
    return count / (time.perf_counter() - started)


async def stream_once(session: aiohttp.ClientSession, base: str, *, max_tokens: int,
                      first: asyncio.Event | None = None) -> dict:
    started = time.perf_counter()
    first_delta = None
    deltas = 0
    done: dict = {}
    async with session.post(f"{base}/v1/chat/stream",
                            json={"message": PROMPT, "max_tokens": max_tokens,
                                  "temperature": 0.7, "new_conversation": True}) as r:
        event = None
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "message":
                deltas += 1
                if first_delta is None:
                    first_delta = time.perf_counter() - started
                    if first is not None:
                        first.set()
            elif line.startswith("data:") and event == "done":
                done = json.loads(line[5:])
    return {"first_delta_s": first_delta, "total_s": time.perf_counter() - started,
            "deltas": deltas, "completion_tokens": done.get("tokens", {}).get("completion")}


async def bench(base: str, seconds: float, runs: int, rounds: int) -> dict:
    health = f"{base}/health"
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(120):
            while True:  # wait for the models
                try:
                    async with session.get(f"{base}/ready") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        await stream_once(session, base, max_tokens=8)  # warm the LLM
        await sequential_health(session, health, 50)
        rps = await health_rps(session, health, seconds)
        # p99 of sub-millisecond latencies moves with one scheduler hiccup: alternate idle and
        # streaming rounds and report the median ratio over the rounds
        rounds_idle, rounds_during, ratios = [], [], []
        for _ in range(rounds):
            idle = await sequential_health(session, health, 1000)
            first = asyncio.Event()
            gen = asyncio.create_task(stream_once(session, base, max_tokens=400, first=first))
            await first.wait()
            during = await sequential_health(session, health, 1000, until=gen)
            generation = await gen
            rounds_idle.append(pct(idle, 0.99))
            rounds_during.append(pct(during, 0.99))
            ratios.append(pct(during, 0.99) / pct(idle, 0.99))

        streams = [await stream_once(session, base, max_tokens=120) for _ in range(runs)]
    firsts = [s["first_delta_s"] for s in streams if s["first_delta_s"] is not None]
    totals = [s["total_s"] for s in streams]
    return {
        "health_idle": {"rps_8_clients": round(rps, 1), "p50_ms": ms(pct(idle, 0.5)),
                        "p99_ms": ms(pct(idle, 0.99)), "samples": len(idle)},
        "health_while_streaming": {
            "p50_ms": ms(pct(during, 0.5)), "p99_ms": ms(pct(during, 0.99)),
            "samples": len(during), "stream_tokens": generation["completion_tokens"],
            "p99_ratio_to_idle": round(pct(during, 0.99) / pct(idle, 0.99), 2),
            "rounds": rounds,
            "p99_ms_each_round": {"idle": [ms(v) for v in rounds_idle],
                                  "streaming": [ms(v) for v in rounds_during]},
            "p99_ratio_each_round": [round(r, 2) for r in ratios],
            "p99_ratio_median_of_rounds": round(statistics.median(ratios), 2),
            "p50_ratio_to_idle": round(pct(during, 0.5) / pct(idle, 0.5), 2),
            "target_p99_ratio": 3},
        "chat_stream": {
            "runs": runs, "max_tokens": 120,
            "first_delta_ms_median": ms(statistics.median(firsts)),
            "full_reply_ms_median": ms(statistics.median(totals)),
            "completion_tokens": [s["completion_tokens"] for s in streams],
            "first_delta_fraction_of_full": round(statistics.median(firsts)
                                                  / statistics.median(totals), 3)},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the rps run")
    parser.add_argument("--runs", type=int, default=5, help="streams for first-delta timing")
    parser.add_argument("--rounds", type=int, default=5, help="idle/streaming latency rounds")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.data_dir))
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--data-dir",
                                  data_dir], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            result = asyncio.run(bench(f"http://127.0.0.1:{port}", args.seconds, args.runs,
                                       args.rounds))
        finally:
            child.terminate()
            child.wait(timeout=15)
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
