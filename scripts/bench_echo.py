"""Echo cancellation, barge-in and noise, measured in simulated rooms (companion/room.py), with
the in-process canceller off and on in the same run.

    .venv/bin/python scripts/bench_echo.py --out docs/benchmarks/echo.json \
        --plot docs/benchmarks/echo_barge_in.png
    .venv/bin/python scripts/bench_echo.py --quick          # a short smoke run (CI)

What it measures (JSON, last stdout line is the summary):
- erle: echo return loss enhancement of AEC3 while the device speaks, after 2 s of convergence;
  cost: canceller CPU per audio second (real-time factor of one core) and the delay it adds
  (lag of the best input/output correlation on near-end speech);
- wake_over_reply: "Hey Jarvis" spoken over the device's reply at echo +6 and +12 dB, hits of
  the real wake detector on the raw microphone (AEC off) and on the cleaned one (AEC on; the
  canceller has heard one earlier reply, as on a device that has spoken before);
- barge_in: the whole daemon (real models) in a room: the user's wake word over a reply,
  wall time from detection to playback stopped, and room time from the end of the word;
- self_wakes: detections during the device's own speech played into the room, run through the
  wake detector as fast as it goes (not in real time): one hour in the full run;
- wer: word error rate of the test questions in noise at SNR 20/10/5, without and with WebRTC
  noise suppression before Whisper.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from companion.devices.echo import Cleaned, EchoCanceller, PlaybackReference
from companion.room import Room, RoomConfig
from scripts.bench_report import write_report

RATE = 16000
BLOCK = 480
BARGE_ECHO_DB = 6.0
REPLY = ["The capital of France is Paris.",
         "It is famous for the Eiffel Tower, its museums and its cafes.",
         "Many people visit it every year, especially in the spring.",
         "Would you like to hear more about its history?"]
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "What is the largest planet?", "Who wrote Romeo and Juliet?",
             "What colour is the sky?"]


def settings():
    from companion.settings import CompanionSettings

    return CompanionSettings(log_level="warning", log_format="console")


def db(x: np.ndarray) -> float:
    return float(10 * np.log10((np.asarray(x, np.float64) ** 2).mean() + 1e-9))


async def run_room(room: Room, *, aec: bool, ns: bool = False, detector=None,
                   on_detect=None, wake_hears: str = "wake") -> dict:
    """Play what is queued on the room's speaker, block by block; the canceller (and the wake
    detector) see what a daemon would: the wake word the linear canceller's output
    (``wake_hears="wake"``, as the daemon does) or AEC3's (``"block"``). Returns mic, cleaned,
    the wake stream and detections (room seconds)."""
    room.speaker.reference = PlaybackReference()
    canceller = (EchoCanceller(room.speaker.reference, echo_cancellation=aec, noise_suppression=ns)
                 if aec or ns else None)
    mic, out, wake, hits, wall = [], [], [], [], []
    mic_source = room.source()
    async for block in mic_source.blocks():
        cleaned = Cleaned(block, block)
        if canceller is not None:
            started = time.perf_counter()
            cleaned = canceller.split(block, mic_source.last_block_time_s)
            wall.append(time.perf_counter() - started)
        mic.append(np.frombuffer(block, np.int16))
        out.append(np.frombuffer(cleaned.block, np.int16))
        wake.append(np.frombuffer(cleaned.wake, np.int16))
        heard = getattr(cleaned, wake_hears)
        if detector is not None and await detector.process(heard) is not None:
            hits.append(room.now_s)
            if on_detect is not None:
                on_detect(room)
    return {"mic": np.concatenate(mic).astype(np.float64),
            "out": np.concatenate(out).astype(np.float64),
            "wake": np.concatenate(wake).astype(np.float64), "hits": hits,
            "canceller": canceller, "block_wall_s": wall}


def user_track(total_s: float, parts: list[tuple[float, np.ndarray]]) -> bytes:
    user = np.zeros(int(total_s * RATE))
    for at, samples in parts:
        start = int(at * RATE)
        user[start:start + len(samples)] += samples[: len(user) - start]
    return user.astype(np.int16).tobytes()


# --- sections -------------------------------------------------------------------------------


async def bench_erle(speak, seeds: list[int]) -> dict:
    reply = np.concatenate([speak(t, 1.0) for t in REPLY])
    erles, linear, rtfs, walls = [], [], [], []
    for seed in seeds:
        room = Room(RoomConfig(echo_db=6.0, seed=seed), user_track(len(reply) / RATE + 1, []),
                    realtime=False)
        room.speaker.enqueue(reply)
        r = await run_room(room, aec=True)
        start = 2 * RATE  # after convergence
        active = np.arange(len(r["mic"])) >= start
        played = np.abs(np.pad(reply, (0, max(0, len(r["mic"]) - len(reply))))[: len(r["mic"])])
        active &= played > 300
        erles.append(db(r["mic"][active]) - db(r["out"][active]))
        linear.append(db(r["mic"][active]) - db(r["wake"][active]))
        stats = r["canceller"].stats
        rtfs.append(stats.process_s / (len(r["mic"]) / RATE))
        walls.extend(r["block_wall_s"])
    # the delay the canceller adds: near-end speech alone in, where is it in the output?
    near = np.concatenate([speak(q, 1.0) for q in QUESTIONS[:2]])
    room = Room(RoomConfig(echo_db=6.0, rt60=0.0, seed=0), near.astype(np.int16).tobytes(),
                realtime=False)
    r = await run_room(room, aec=True)
    lag = _best_lag(r["mic"], r["out"], max_lag=RATE // 10)
    return {"echo_db": 6.0, "rt60_s": 0.3, "seeds": seeds,
            "erle_db": _summary(erles), "erle_db_each": [round(e, 1) for e in erles],
            "linear_erle_db": _summary(linear),
            "rtf_one_core": _summary(rtfs, 4),
            "block_wall_ms": _summary([w * 1000 for w in walls], 3),
            "added_delay_ms": round(lag / RATE * 1000, 2),
            "targets": {"erle_db": ">= 20", "rtf_one_core": "<= 0.05", "added_delay_ms": "<= 10"}}


def _best_lag(a: np.ndarray, b: np.ndarray, max_lag: int) -> int:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    scores = [float(np.dot(a[: n - lag], b[lag:])) for lag in range(0, max_lag, 8)]
    coarse = int(np.argmax(scores)) * 8
    fine = range(max(0, coarse - 8), coarse + 9)
    return max(fine, key=lambda lag: float(np.dot(a[: n - lag], b[lag:])))


async def bench_wake_over_reply(speak, trials: int, levels: list[float]) -> dict:
    from companion.models import ModelRegistry
    from companion.stages.wake import OpenWakeWordDetector

    s = settings()
    registry = ModelRegistry(s.models_dir)
    wake = speak("Hey Jarvis.", 1.0)
    reply = np.concatenate([speak(t, 1.0) for t in REPLY[:2]])
    warm = np.concatenate([speak(REPLY[2], 1.0), np.zeros(RATE // 2)])
    out: dict = {"trials": trials, "method": "the canceller first hears one other reply (a device "
                 "that has spoken before); the word starts 0.3..2.5 s into the next one; "
                 "aec_on: the detector hears the linear canceller (as the daemon does), "
                 "aec3_output: AEC3's suppressed output (for comparison)"}
    for level in levels:
        result = {}
        for name, aec, hears in (("aec_off", False, "wake"), ("aec_on", True, "wake"),
                                 ("aec3_output", True, "block")):
            hits = 0
            for i in range(trials):
                at = len(warm) / RATE + 0.3 + 2.2 * i / max(1, trials - 1)
                total = len(warm) / RATE + len(reply) / RATE + 2.0
                room = Room(RoomConfig(echo_db=level, seed=100 + i),
                            user_track(total, [(at, wake)]), realtime=False)
                room.speaker.enqueue(np.concatenate([warm, reply]))
                detector = OpenWakeWordDetector(s.wake, registry)
                r = await run_room(room, aec=aec, detector=detector, wake_hears=hears)
                end = at + len(wake) / RATE
                hits += any(at < h <= end + 1.0 for h in r["hits"])
            result[name] = hits
        out[f"echo_{level:+g}_db"] = result
    out["target"] = ">= 9 of 10 at +6 dB with AEC on"
    return out


async def bench_self_wakes(speak, seconds: float) -> dict:
    """The device's own replies, played and fed back, through the wake detector (raw and
    cleaned), as fast as the detector runs."""
    from companion.models import ModelRegistry
    from companion.stages.wake import OpenWakeWordDetector

    s = settings()
    registry = ModelRegistry(s.models_dir)
    lines = [speak(t, 1.0) for t in REPLY + QUESTIONS]
    rng = np.random.default_rng(0)
    parts, total = [], 0
    while total < seconds * RATE:
        line = lines[int(rng.integers(len(lines)))]
        parts += [line, np.zeros(int(rng.uniform(0.2, 1.0) * RATE))]
        total += len(line) + len(parts[-1])
    speech = np.concatenate(parts)
    result = {"audio_s": round(len(speech) / RATE, 1), "echo_db": 6.0,
              "method": "replies looped with pauses, played into the room, the wake detector "
                        "run on every block faster than real time (no pacing)"}
    for aec in (False, True):
        room = Room(RoomConfig(echo_db=6.0, seed=7), user_track(len(speech) / RATE + 1, []),
                    realtime=False)
        room.speaker.enqueue(speech)
        started = time.perf_counter()
        r = await run_room(room, aec=aec, detector=OpenWakeWordDetector(s.wake, registry))
        result["aec_on" if aec else "aec_off"] = {
            "self_wakes": len(r["hits"]), "took_s": round(time.perf_counter() - started, 1)}
    result["target"] = "0"
    return result


async def bench_wer(speak, snrs: list[float], kinds: list[str], *, questions: int) -> dict:
    from companion.app import _real_stt
    from companion.models import ModelRegistry

    s = settings()
    stt = _real_stt(s, ModelRegistry(s.models_dir))
    clips = [(q, speak(q, 1.0)) for q in QUESTIONS[:questions]]
    out: dict = {"questions": len(clips), "stt": s.stt.model}
    for kind in kinds:
        for snr in snrs:
            row = {}
            for ns in (False, True):
                errors = words = 0
                for i, (text, clip) in enumerate(clips):
                    user = user_track(len(clip) / RATE + 1.5, [(0.5, clip)])
                    room = Room(RoomConfig(noise=kind, snr_db=snr, seed=200 + i), user,
                                realtime=False, speak=speak if kind == "babble" else None)
                    r = await run_room(room, aec=False, ns=ns)
                    heard = await stt.transcribe(r["out"].astype(np.int16).tobytes())
                    e, n = word_errors(text, heard.text)
                    errors, words = errors + e, words + n
                row["ns_on" if ns else "ns_off"] = round(errors / words, 3)
            out[f"{kind}_snr_{snr:g}_db"] = row
    return out


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words): Levenshtein distance over lower-case words."""
    norm = lambda t: "".join(c if c.isalnum() or c == " " else " " for c in t.lower()).split()  # noqa: E731
    ref, hyp = norm(reference), norm(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


async def bench_barge_in(trials: int) -> dict:
    """The whole daemon (real models) in a room: a reply spoken, the user's wake word over it
    (echo +6 dB), detection → playback stopped. Each trial twice, with one data directory: a
    device's first reply ever (the canceller learns the room from scratch), then a device that
    has spoken before (it starts from the echo path it kept, ``<data_dir>/echo_path.npy``)."""
    import tempfile

    from companion.__main__ import piper_speaker

    s = settings()
    speak = piper_speaker(s)
    wake = speak("Hey Jarvis.", 1.0)
    out: dict = {"trials": trials, "echo_db": BARGE_ECHO_DB}
    runs: dict[str, list[tuple[float, float] | None]] = {"first_reply_ever": [],
                                                         "echo_path_kept": []}
    for i in range(trials):
        at = 0.5 + 0.3 * i  # within the first sentence: the room plays faster than TTS makes the next
        with tempfile.TemporaryDirectory(prefix="bench-echo-") as data_dir:
            for name in runs:
                runs[name].append(await _barge_in_once(s, wake, at, i, Path(data_dir)))
    for name, results in runs.items():
        hit = [r for r in results if r is not None]
        out[name] = {"detected": len(hit),
                     "detection_to_playback_stopped_ms": _summary([w for w, _ in hit], 2),
                     "end_of_word_to_playback_stopped_audio_ms": _summary([a for _, a in hit], 1)}
    return out


async def _barge_in_once(s, wake: np.ndarray, at: float, seed: int,
                         data_dir: Path) -> tuple[float, float] | None:
    """(wall ms from detection to playback stopped, room ms from the word's end), or None."""
    from companion.app import Features, build_app
    from companion.events import EventType

    room = Room(RoomConfig(echo_db=BARGE_ECHO_DB, seed=300 + seed),
                user_track(at + 3.0, [(at, wake)]), realtime=False)
    app = build_app(s.model_copy(update={"data_dir": data_dir}), source=room.source(),
                    sink=room.speaker, features=Features(audio_devices=False, http=False,
                                                         control=False, gpio=False,
                                                         warm_personas=False))
    detected: list[float] = []

    def on_event(event) -> None:
        if event.type is EventType.WAKE_DETECTED:
            detected.append(time.perf_counter())

    app.bus.add_callback(on_event)
    await app.start()
    app.voice.hears_itself = True
    room.linger = lambda: app.speech.speaking
    voice = app.conversation.active_persona.voice_config.params()
    say = asyncio.create_task(app.speech.say(" ".join(REPLY), voice))
    # the room's clock starts with the reply (it stands still until the mic is read)
    async with asyncio.timeout(120):
        await app.speech.playing.wait()
    pump = asyncio.create_task(app.voice.run())
    try:
        async with asyncio.timeout(120):
            await asyncio.gather(say, return_exceptions=True)
            app.voice.barge_in()
            await pump
    finally:
        pump.cancel()
        await app.aclose()  # keeps the echo path learnt (the next run of this trial starts from it)
    if not detected or room.speaker.stopped_at is None:
        return None
    return ((room.speaker.stopped_at - detected[0]) * 1000,
            (room.speaker.played_s - (at + len(wake) / RATE)) * 1000)


async def plot_barge_in(speak, path: Path) -> dict:
    """Microphone vs cleaned level over one barge-in (AEC on, echo +6 dB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from companion.models import ModelRegistry
    from companion.stages.wake import OpenWakeWordDetector

    s = settings()
    wake = speak("Hey Jarvis.", 1.0)
    reply = np.concatenate([speak(t, 1.0) for t in REPLY])
    at = 4.5
    room = Room(RoomConfig(echo_db=6.0, seed=1), user_track(len(reply) / RATE + 2, [(at, wake)]),
                realtime=False)
    room.speaker.enqueue(reply)
    stopped: list[float] = []

    def barge(r: Room) -> None:
        if not stopped:
            stopped.append(r.now_s)
            r.speaker.stop()

    r = await run_room(room, aec=True, detector=OpenWakeWordDetector(
        s.wake, ModelRegistry(s.models_dir)), on_detect=barge)
    n = len(r["mic"]) // BLOCK
    level = lambda x: 10 * np.log10((x[: n * BLOCK].reshape(n, BLOCK) ** 2).mean(1) / 32768**2 + 1e-10)  # noqa: E731
    t = np.arange(n) * BLOCK / RATE
    fig, ax = plt.subplots(figsize=(9, 3.5), dpi=100)
    ax.plot(t, level(r["mic"]), label="microphone (user + echo +6 dB)", lw=1)
    ax.plot(t, level(r["out"]), label="cleaned (AEC3: speech recognition)", lw=1)
    ax.plot(t, level(r["wake"]), label="linear canceller (the wake word's input)", lw=1, alpha=0.8)
    ax.axvspan(at, at + len(wake) / RATE, color="green", alpha=0.15, label="user: 'Hey Jarvis'")
    if stopped:
        ax.axvline(stopped[0], color="red", ls="--", label="wake word detected: playback stopped")
    ax.set_xlabel("room time (s)")
    ax.set_ylabel("level (dBFS, 30 ms)")
    ax.set_ylim(-90, -5)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("One barge-in: scripts/bench_echo.py")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return {"png": str(path), "detected_at_s": stopped[0] if stopped else None, "word_at_s": at}


def _summary(values: list[float], digits: int = 1) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


SECTIONS = ("erle", "wake_over_reply", "barge_in", "self_wakes", "wer")


async def run(args: argparse.Namespace) -> dict:
    from companion.__main__ import piper_speaker

    speak = piper_speaker(settings())
    quick = args.quick
    chosen = args.sections or SECTIONS
    result: dict = {"quick": quick, "sections": list(chosen)}
    if "erle" in chosen:
        result["erle"] = await bench_erle(speak, [0] if quick else [0, 1, 2, 3, 4])
    if "wake_over_reply" in chosen:
        result["wake_over_reply"] = await bench_wake_over_reply(speak, 1 if quick else 10,
                                                                [6.0, 12.0])
    if "barge_in" in chosen:
        result["barge_in"] = await bench_barge_in(1 if quick else 3)
    if "self_wakes" in chosen:
        result["self_wakes"] = await bench_self_wakes(
            speak, args.self_wake_s if args.self_wake_s is not None else 15.0 if quick else 3600.0)
    if "wer" in chosen:
        result["wer"] = await bench_wer(speak, [10.0] if quick else [20.0, 10.0, 5.0],
                                        ["pink"] if quick else ["pink", "babble"],
                                        questions=2 if quick else len(QUESTIONS))
    if args.plot is not None:
        result["plot"] = await plot_barge_in(speak, args.plot)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON here")
    parser.add_argument("--quick", action="store_true", help="a short run (CI, smoke test)")
    parser.add_argument("--plot", type=Path, help="PNG of mic vs cleaned level over a barge-in")
    parser.add_argument("--self-wake-s", type=float, metavar="S",
                        help="seconds of the device's own speech for self_wakes (default 3600; "
                             "it runs about 2x faster than real time on 2 loaded cores)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, metavar="NAME",
                        help=f"run only these ({', '.join(SECTIONS)}; default: all)")
    args = parser.parse_args(argv)
    if args.self_wake_s is not None and not 0 < args.self_wake_s <= 24 * 3600:
        parser.error("--self-wake-s must be between 0 and 86400 seconds")
    from companion.log import configure_logging

    configure_logging("warning", "console")
    result = asyncio.run(run(args))
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
