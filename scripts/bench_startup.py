"""Benchmark start-up and idling: seconds to READY, CPU while nobody says the wake word, RSS.

    .venv/bin/python scripts/bench_startup.py [--quick] [--idle-s 30] [--out bench_startup.json]

Run in a fresh process (what a daemon start costs): the real models, a WAV of room noise (no
wake word) as the microphone, paced in real time. Reports
- ``ready_from_process_start_s``: process start (imports included) → App ready, every model
  loaded; ``models_load_s``: App.start() alone (models load in parallel);
- ``idle_cpu_s_per_minute``: the whole daemon's CPU seconds per minute of that noise;
- ``openwakeword_cpu_s_per_minute``: openWakeWord alone on the same audio, same process, right
  after; their ratio ``idle_vs_openwakeword`` (target ≤ 1.3);
- ``rss_idle_mb``: resident memory after idling.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from companion import wav
from companion.app import Features, build_app, tune_process
from companion.devices.audio import WavFileSink, WavFileSource, write_wav
from companion.log import configure_logging
from companion.settings import PROJECT_ROOT, CompanionSettings
from scripts.bench_report import write_report


def room_noise(seconds: float, path: Path, seed: int = 7) -> Path:
    """A quiet room: brownish noise, mains hum and now and then a soft knock (no speech)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    brown = np.cumsum(rng.normal(0, 1, n))
    brown -= np.convolve(brown, np.ones(1600) / 1600, mode="same")  # no drift
    brown *= 300 / (np.std(brown) or 1)
    t = np.arange(n) / 16000
    hum = 120 * np.sin(2 * np.pi * 50 * t) + 60 * np.sin(2 * np.pi * 100 * t)
    knocks = np.zeros(n)
    for start in rng.integers(0, max(n - 800, 1), size=int(seconds / 4) + 1):
        knocks[start : start + 800] += 2500 * np.exp(-np.arange(800) / 120) * rng.normal(0, 1, 800)
    pcm = np.clip(brown + hum + knocks, -32768, 32767).astype(np.int16)
    write_wav(path, pcm.tobytes())
    return path


def cpu_s() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def openwakeword_alone(settings: CompanionSettings, path: Path) -> float:
    """openWakeWord's own CPU seconds on the WAV, as fast as it goes, with the daemon's models."""
    from openwakeword.model import Model

    from companion.models import ModelRegistry
    from companion.stages.wake import CHUNK_SAMPLES

    registry = ModelRegistry(settings.models_dir)
    model = Model(wakeword_models=[str(registry.resolve(w, kind="wake").file)
                                   for w in settings.wake.models], inference_framework="onnx")
    audio = np.frombuffer(wav.decode(path)[0], np.int16)
    before = cpu_s()
    for start in range(0, len(audio) - CHUNK_SAMPLES + 1, CHUNK_SAMPLES):
        model.predict(audio[start : start + CHUNK_SAMPLES])
    return cpu_s() - before


async def bench(idle_s: float, workdir: Path) -> dict:
    tune_process()
    noise = room_noise(idle_s, workdir / "room.wav")
    settings = CompanionSettings(data_dir=workdir / "data", gpio={"enabled": False},
                                 personas={"dir": PROJECT_ROOT / "personas"})
    source = WavFileSource(noise, realtime=True, block_ms=settings.audio.block_ms,
                           tail_silence_s=0.0)
    app = build_app(settings, source=source, sink=WavFileSink(workdir / "out.wav"),
                    features=Features(audio_devices=False, http=False, control=False, gpio=False))
    started = time.perf_counter()
    await app.start()
    models_load_s = time.perf_counter() - started
    ready_at = time.time()
    process_started = psutil.Process().create_time()
    if app.features.warm_personas:
        await app.conversation.warm_personas()  # as the daemon does right after READY
    rss_ready = psutil.Process().memory_info().rss
    before, wall = cpu_s(), time.monotonic()
    await app.voice.run()
    idle_cpu = cpu_s() - before
    wall_s = time.monotonic() - wall
    turns = len(app.status.recent_turns)
    rss_idle = psutil.Process().memory_info().rss
    await app.aclose()
    oww_cpu = await asyncio.to_thread(openwakeword_alone, settings, noise)
    minutes = source.duration_s / 60
    return {
        "ready_from_process_start_s": round(ready_at - process_started, 3),
        "models_load_s": round(models_load_s, 3),
        "components_load_ms": {k: v.get("latency_ms") for k, v in app.status.components.items()
                               if v.get("latency_ms") is not None},
        "idle_audio_s": round(source.duration_s, 1), "idle_wall_s": round(wall_s, 1),
        "idle_cpu_s_per_minute": round(idle_cpu / minutes, 3),
        "openwakeword_cpu_s_per_minute": round(oww_cpu / minutes, 3),
        "idle_vs_openwakeword": round(idle_cpu / oww_cpu, 3) if oww_cpu else None,
        "false_turns": turns,
        "rss_ready_mb": round(rss_ready / 2**20, 1), "rss_idle_mb": round(rss_idle / 2**20, 1),
        "machine": {"cpus": psutil.cpu_count(), "python": sys.version.split()[0]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 s of room noise")
    parser.add_argument("--idle-s", type=float, default=30.0, help="seconds of room noise")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args(argv)
    if args.idle_s < 2:
        parser.error("--idle-s must be at least 2")
    configure_logging("warning", "console")
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        result = asyncio.run(bench(8.0 if args.quick else args.idle_s, Path(tmp)))
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
