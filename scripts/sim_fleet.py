"""A simulated fleet against the dev control plane on loopback; prints JSON figures.

    .venv/bin/python scripts/sim_fleet.py [--devices 200] [--frames 5] [--downtime 2]

Each device is a real daemon App (store, personas, conversation, speech) with fake models and
audio, running the real control-link code with the default backoff settings. The control plane
runs as its own process (``companion-controlplane serve``). The script measures:

1. persona switch latency (command received → ack, on the device; and the server's round trip)
   for each default persona;
2. while the control plane is down (SIGKILL), every device queues frames in its outbox;
3. the control plane restarts: how reconnections spread over time (the largest share of devices
   in any one second; target ≤ 15 %), and that every outbox drains (every frame arrives).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from companion.app import Features, build_app
from companion.control.client import ControlLink
from companion.events import EventType
from companion.log import configure_logging
from companion.settings import PROJECT_ROOT, CompanionSettings
from tests.fakes import FakeChatModel, FakeSpeaker, FakeSynthesizer

TOKEN = "sim-token"
ADMIN_TOKEN = "sim-admin"
FEATURES = Features(audio_devices=False, voice_loop=False, http=False, control=False, gpio=False,
                    warm_personas=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_plane(port: int, state: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "companion_dev.controlplane", "serve", "--port", str(port),
         "--token", TOKEN, "--admin-token", ADMIN_TOKEN, "--state", str(state)],
        stdout=log.open("a"), stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)


async def get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        return await response.json()


async def wait_plane(http: aiohttp.ClientSession, base: str, limit_s: float = 20) -> None:
    async with asyncio.timeout(limit_s):
        while True:
            try:
                await get(http, f"{base}/health")
                return
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)


async def poll(predicate, limit_s: float, every_s: float = 0.05) -> None:
    """Wait until ``predicate()`` holds (the links' state has no events to wait on)."""
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(every_s)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sim_fleet_"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    plane = start_plane(port, tmp / "plane.db", tmp / "plane.log")
    apps, links, tasks = [], [], []
    result: dict[str, Any] = {"devices": args.devices}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        try:
            await wait_plane(http, base)
            for i in range(args.devices):
                settings = CompanionSettings(
                    device_id=f"sim-{i:04d}", data_dir=tmp / f"sim-{i:04d}",
                    personas={"dir": PROJECT_ROOT / "personas", "default": "companion"},
                    gpio={"enabled": False}, log_format="json", log_level="error",
                    control_plane={"url": f"ws://127.0.0.1:{port}", "token": TOKEN,
                                   "heartbeat_s": args.heartbeat})
                app = build_app(settings, features=FEATURES, llm=FakeChatModel(),
                                tts=FakeSynthesizer(), sink=FakeSpeaker())
                await app.start()
                link = ControlLink(app)
                apps.append(app)
                links.append(link)
                tasks.append(asyncio.create_task(link.run()))
            started = time.monotonic()
            await poll(lambda: all(link.status.connected for link in links), 120)
            result["initial_connect_s"] = round(time.monotonic() - started, 2)

            # 1. persona switch latency, per default persona
            personas = sorted(apps[0].personas.ids())
            sample = links[: min(args.switch_sample, len(links))]
            switch: dict[str, Any] = {}
            for persona in [*personas[1:], personas[0]]:
                device_ms: list[float] = []
                server_ms: list[float] = []

                async def one(link: ControlLink, persona: str = persona,
                              device_ms: list[float] = device_ms,
                              server_ms: list[float] = server_ms) -> None:
                    device = link.app.settings.device_id
                    async with http.post(f"{base}/devices/{device}/commands?wait=30",
                                         json={"type": "persona_switch",
                                               "payload": {"persona_id": persona}}) as response:
                        command = await response.json()
                    ack = command["ack"]
                    assert ack and ack["ok"], command
                    device_ms.append(ack["latency_ms"])
                    server_ms.append((command["acked_at"] - command["first_sent_at"]) * 1000)

                await asyncio.gather(*(one(link) for link in sample))
                switch[persona] = {
                    "n": len(device_ms), "device_p50_ms": pct(device_ms, 0.5),
                    "device_p95_ms": pct(device_ms, 0.95), "device_max_ms": round(max(device_ms), 2),
                    "server_round_trip_p50_ms": pct(server_ms, 0.5),
                    "server_round_trip_p95_ms": pct(server_ms, 0.95)}
            result["persona_switch"] = switch
            result["persona_switch_target_met"] = all(
                v["device_max_ms"] < 300 for v in switch.values())

            # 2. the control plane dies; devices keep working and fill their outboxes
            plane.send_signal(signal.SIGKILL)
            plane.wait(10)
            killed_at = time.time()
            await asyncio.sleep(0.5)
            for app in apps:
                for n in range(args.frames):
                    app.bus.emit(EventType.BUTTON, button="talk", kind=f"sim-{n}")
            await poll(lambda: sum(link.status.outbox_depth for link in links)
                       >= args.devices * args.frames, 60)
            result["outbox_total_while_down"] = sum(link.status.outbox_depth for link in links)
            await asyncio.sleep(max(0.0, args.downtime - (time.time() - killed_at)))

            # 3. restart: spread of reconnections, outboxes drain
            plane = start_plane(port, tmp / "plane.db", tmp / "plane.log")
            await wait_plane(http, base)
            restarted_at = time.time()
            await poll(lambda: all(link.status.connected for link in links), args.max_wait)
            reconnected_s = [link.status.connected_since - restarted_at for link in links]
            per_second = Counter(int(max(0.0, s)) for s in reconnected_s)
            worst = max(per_second.values())
            result["reconnect"] = {
                "control_plane_down_s": round(restarted_at - killed_at, 2),
                "all_back_after_s": round(max(reconnected_s), 2),
                "p50_s": pct(reconnected_s, 0.5), "p95_s": pct(reconnected_s, 0.95),
                "per_second": {str(k): per_second[k] for k in sorted(per_second)},
                "max_in_one_second": worst,
                "max_share_in_one_second": round(worst / len(links), 3),
                "target_max_share": 0.15, "target_met": worst / len(links) <= 0.15,
                "retries_median": statistics.median(link.status.retries for link in links),
            }
            await poll(lambda: not any(link.status.outbox_depth for link in links), args.max_wait)
            drained_at = time.time()
            missing = 0
            for link in links:
                device = link.app.settings.device_id
                frames = await get(http, f"{base}/devices/{device}/messages?type=button_press")
                kinds = [m["payload"]["kind"] for m in frames["messages"]]
                missing += int(kinds != [f"sim-{n}" for n in range(args.frames)])
            result["outbox"] = {"all_drained": True, "drained_after_restart_s":
                                round(drained_at - restarted_at, 2),
                                "devices_with_missing_or_reordered_frames": missing,
                                "dropped": sum(link.status.outbox_dropped for link in links)}
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for app in apps:
                await app.aclose()
            plane.send_signal(signal.SIGTERM)
            try:
                plane.wait(10)
            except subprocess.TimeoutExpired:
                plane.kill()
    result["work_dir"] = str(tmp)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--frames", type=int, default=5, help="frames queued per device offline")
    parser.add_argument("--downtime", type=float, default=2.0, help="seconds the plane is down")
    parser.add_argument("--switch-sample", type=int, default=50,
                        help="devices that get each persona switch")
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--max-wait", type=float, default=120.0)
    args = parser.parse_args(argv)
    configure_logging("error", "json")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    ok = result["reconnect"]["target_met"] and not result["outbox"][
        "devices_with_missing_or_reordered_frames"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
