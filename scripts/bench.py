"""One benchmark command: run the project's benchmarks by name and write one report.

    .venv/bin/python scripts/bench.py                      # all of them
    .venv/bin/python scripts/bench.py voice startup --quick --out-dir /tmp/bench

Each benchmark is its own script (``scripts/bench_*.py``, ``scripts/sim_fleet.py``) and runs in
its own process (a fresh interpreter: start-up time and memory are its own) with ``--out`` and,
with ``--quick``, ``--quick``. A benchmark whose script is not there is reported as skipped.
Writes into ``--out-dir``: ``bench.json`` (every result and the machine), ``bench.md`` (tables
to paste into the README) and ``waterfall.png`` (end of speech → first audio, per stage, for
ours, the sequential pipeline and the non-streaming baseline).

With ``--runs N`` every benchmark runs N times: the report holds every run, and each figure of the
tables is the median of the N runs with their range (a best run is not a result).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = {
    "voice": "bench_voice.py",
    "startup": "bench_startup.py",
    "api": "bench_api.py",
    "persona": "bench_personas.py",
    "fleet": "sim_fleet.py",
    "quality": "bench_quality.py",
    "echo": "bench_echo.py",
    "remote": "bench_remote.py",
    "arbitration": "sim_arbitration.py",
}
STAGE_LABELS = {"endpoint_s": "endpoint", "stt_s": "transcript", "llm_first_sentence_s":
                "LLM first sentence", "tts_first_audio_s": "first sentence synthesized"}
MODE_LABELS = {"ours": "ours", "no_speculation": "ours, answer not begun ahead",
               "streaming": "ours + streaming transcription",
               "sequential": "sequential (STT after the endpoint)",
               "non_streaming": "non-streaming (whole → whole → whole)"}


def machine() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_one(name: str, quick: bool, timeout_s: float) -> dict:
    """Run one benchmark script; its JSON, or why there is none."""
    script = ROOT / "scripts" / BENCHMARKS[name]
    if not script.exists():
        return {"skipped": f"scripts/{script.name} is not there"}
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        out = Path(tmp) / "out.json"
        quick_flag = ["--quick"] if quick else []
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        started = time.perf_counter()
        # the contract is `--out` and `--quick`; an older script without them still runs
        for args in ([*quick_flag, "--out", str(out)], ["--out", str(out)], []):
            try:
                done = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                                      text=True, cwd=ROOT, env=env, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return {"error": f"took longer than {timeout_s:.0f} s"}
            if not (done.returncode == 2 and "unrecognized arguments" in done.stderr):
                break
        took = round(time.perf_counter() - started, 1)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {done.returncode}: " + " | ".join(tail), "took_s": took}
        try:
            result = json.loads(out.read_text()) if out.exists() else last_json(done.stdout)
        except ValueError as exc:
            return {"error": f"no JSON result: {exc}", "took_s": took}
    if not isinstance(result, dict):
        result = {"result": result}
    result["took_s"] = took
    return result


def last_json(stdout: str) -> dict:
    """A script that prints its JSON instead of writing it: the whole output or its last line."""
    try:
        return json.loads(stdout)
    except ValueError:
        return json.loads(stdout.strip().splitlines()[-1])


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def combine(runs: list[dict]) -> dict:
    """Several runs of one benchmark as one result: each number the median of the runs, with
    ``spread`` holding [min, max] per number path (``summary.waterfall.ours.endpoint_s``)."""
    spread: dict[str, list[float]] = {}

    def merge(values: list, path: str):
        if all(_number(v) for v in values):
            spread[path] = [min(values), max(values)]
            return round(statistics.median(values), 4)
        if all(isinstance(v, dict) for v in values):
            return {key: merge([v[key] for v in values], f"{path}.{key}" if path else key)
                    for key in values[0] if all(key in v for v in values)}
        return values[0]

    good = [r for r in runs if "error" not in r and "skipped" not in r]
    if len(good) < len(runs):
        return next(r for r in runs if "error" in r or "skipped" in r) | {"runs": runs}
    result = merge(good, "")
    return result | {"runs": runs, "spread": spread}


def fmt(value, spread: list[float] | None = None) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        text = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        if spread and spread[0] != spread[1]:
            text += f" ({fmt(float(spread[0]))}–{fmt(float(spread[1]))})"
        return text
    return str(value)


def voice_tables(voice: dict) -> list[str]:
    spread = voice.get("spread", {})
    summary = voice.get("summary", {})

    def cell(path: str) -> str:
        """The figure at ``summary.<path>``, with its range over several runs."""
        value: object = summary
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return fmt(value, spread.get(f"summary.{path}"))

    lines = ["### End of speech → first audio (user-perceived silence), median seconds", "",
             "| pipeline | " + " | ".join(STAGE_LABELS.values()) + " | total |",
             "|---|" + "---|" * (len(STAGE_LABELS) + 1)]
    for mode, label in MODE_LABELS.items():
        if mode not in summary.get("waterfall", {}):
            continue  # a variant that was not run
        lines.append(f"| {label} | " + " | ".join(cell(f"waterfall.{mode}.{s}") for s in STAGE_LABELS)
                     + f" | **{cell(f'waterfall.{mode}.silence_to_first_audio_s')}** |")
    stt = summary.get("transcription", {})
    lines += ["", "| voice measure | value |", "|---|---|",
              f"| ours ÷ non-streaming, replies of 3+ sentences | "
              f"{cell('ours_vs_non_streaming_3plus_sentences')} |",
              f"| transcription after the endpoint, ours ÷ sequential (utterances ≥ 3 s, "
              f"n={cell('transcription.utterances_3s_plus')}) | "
              f"{cell('transcription.after_endpoint_ours_vs_sequential')} |",
              f"| end of speech → transcript, ours ÷ sequential | "
              f"{cell('transcription.end_of_speech_to_transcript_ours_vs_sequential')} |",
              f"| word error rate (mean), ours / sequential | {cell('transcription.wer_ours')} / "
              f"{cell('transcription.wer_sequential')} |",
              *(f"| {MODE_LABELS[m]}: word error rate / transcription after the endpoint ÷ "
                f"sequential | {cell(f'transcription.wer_{m}')} / "
                f"{cell(f'transcription.after_endpoint_{m}_vs_sequential')} |"
                for m in ("streaming", "no_speculation") if f"wer_{m}" in stt),
              f"| answers begun ahead of the endpoint (ours) | "
              f"{cell('answers_begun_ahead.ours')} of {voice.get('questions')} |",
              f"| CPU s per minute of audio, ours / sequential | "
              f"{cell('transcription.cpu_s_per_audio_minute.ours')} / "
              f"{cell('transcription.cpu_s_per_audio_minute.sequential')} |",
              f"| cut-offs on {summary.get('pausy_clips')} clips with a 0.7 s pause, ours / sequential"
              f" | {cell('cut_offs.ours')} / {cell('cut_offs.sequential')} |",
              f"| the user went on after an endpoint, the answer being prepared dropped (ours) | "
              f"{cell('resumed.ours')} |"]
    return lines


def scalars(result: dict, prefix: str = "", limit: int = 20) -> list[tuple[str, object]]:
    """The first numbers of a result, flattened (for benchmarks without their own table)."""
    found: list[tuple[str, object]] = []
    for key, value in result.items():
        if key in ("machine", "took_s", "runs", "rows", "modes", "spread"):
            continue
        if isinstance(value, dict):
            found += scalars(value, f"{prefix}{key}.", limit - len(found))
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            found.append((prefix + key, value))
        if len(found) >= limit:
            break
    return found[:limit]


def markdown(results: dict, info: dict, chart: str | None, runs: int = 1) -> str:
    how = (f" Each figure is the median of {runs} runs, the range in brackets."
           if runs > 1 else " One run each.")
    lines = ["# Benchmarks", "",
             f"Produced by `scripts/bench.py` on {info['cpu']} ({info['cores']} cores, "
             f"{info['memory_gb']} GB, {info['system']}, Python {info['python']}), {info['date']}."
             + how, ""]
    for name, result in results.items():
        script = BENCHMARKS[name]
        lines.append(f"## {name} (`scripts/{script}`)")
        lines.append("")
        if "skipped" in result or "error" in result:
            lines += [f"Not measured: {result.get('skipped') or result.get('error')}", ""]
            continue
        if name == "voice":
            lines += voice_tables(result)
            if chart:
                lines += ["", f"![end of speech → first audio]({chart})"]
        else:
            lines += ["| measure | value |", "|---|---|"]
            spread = result.get("spread", {})
            lines += [f"| {key} | {fmt(value, spread.get(key))} |" for key, value in scalars(result)]
        lines.append("")
    return "\n".join(lines)


def waterfall_png(voice: dict, path: Path) -> bool:
    """Stacked horizontal bars: each pipeline's stages from the end of speech."""
    falls = voice.get("summary", {}).get("waterfall", {})
    modes = [m for m in MODE_LABELS if falls.get(m, {}).get("silence_to_first_audio_s")]
    if not modes:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.8 * len(modes)))
    colors = ["#8da0cb", "#66c2a5", "#fc8d62", "#e78ac3"]
    for row, mode in enumerate(reversed(modes)):
        left = 0.0
        for (stage, label), color in zip(STAGE_LABELS.items(), colors, strict=True):
            width = max(falls[mode].get(stage) or 0.0, 0.0)
            ax.barh(row, width, left=left, color=color, label=label if row == 0 else None)
            left += width
        ax.text(left + 0.02, row, f"{falls[mode]['silence_to_first_audio_s']:.2f} s", va="center")
    ax.set_yticks(range(len(modes)), [MODE_LABELS[m] for m in reversed(modes)])
    ax.set_xlabel("seconds from the end of speech to the first audio (median)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(0, max(falls[m]["silence_to_first_audio_s"] for m in modes) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "benchmarks",
                        help="where bench.json, bench.md and waterfall.png go")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")
    parser.add_argument("--runs", type=int, default=1,
                        help="run each benchmark this often; figures are medians with the range")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.runs < 1:
        parser.error("--runs must be 1 or more")
    names = args.names or list(BENCHMARKS)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    results = {}
    for name in names:
        runs = []
        for number in range(args.runs):
            print(f"bench: {name} run {number + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            runs.append(run_one(name, args.quick, args.timeout))
        results[name] = runs[0] if args.runs == 1 else combine(runs)
    chart = None
    if "voice" in results and waterfall_png(results["voice"], args.out_dir / "waterfall.png"):
        chart = "waterfall.png"
    (args.out_dir / "bench.json").write_text(json.dumps(
        {"machine": info, "quick": args.quick, "runs": args.runs, "results": results}, indent=2))
    (args.out_dir / "bench.md").write_text(markdown(results, info, chart, args.runs))
    failed = [n for n, r in results.items() if "error" in r]
    summary = {"out_dir": str(args.out_dir), "ran": [n for n in names if "skipped" not in results[n]],
               "skipped": [n for n in names if "skipped" in results[n]], "failed": failed}
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
