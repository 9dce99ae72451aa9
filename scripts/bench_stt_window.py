"""Whisper's encoder window: is a shorter one faster for short utterances, and as accurate?

    .venv/bin/python scripts/bench_stt_window.py [--quick] [--out bench_stt_window.json]

faster-whisper always encodes a 30 s window, padded with silence, however short the clip.
Its ``chunk_length`` argument only changes how long audio is cut into windows: the features of
each window are still padded to 3000 frames (``pad_or_trim`` in faster_whisper/transcribe.py,
1.2.1) before the encoder. To measure what a shorter encoder input would give, this script
pads to the window it is given instead (in this process only) and transcribes the voice
benchmark's questions (``scripts/bench_voice.py``: piper's and espeak-ng's voices, some with a
mid-sentence pause) with the daemon's settings, per window: the default 30 s, a fixed 10 s,
and the clip's length rounded up plus 1 s; each with faster-whisper's temperature fallback
(the default) and without it. Reports the median seconds per transcription and the mean word
error rate per window, in one run.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from companion.devices.audio import read_wav_16k_mono
from companion.models import ModelRegistry
from companion.settings import CompanionSettings
from scripts.bench_report import write_report
from scripts.bench_voice import ESPEAK, QUESTIONS, mean_wer, normalize
from scripts.make_utterance_wav import make

WINDOWS: dict[str, Callable[[float], int]] = {
    "30s": lambda seconds: 30,
    "10s": lambda seconds: 10,
    "fitted": lambda seconds: math.ceil(seconds) + 1,
}


def transcribe(model, audio: np.ndarray, window_s: int, *, fallback: bool, beam_size: int) -> str:
    import faster_whisper.transcribe as fw

    padded = fw.pad_or_trim
    fw.pad_or_trim = functools.partial(padded, length=window_s * 100)  # 100 frames a second
    try:
        segments, _ = model.transcribe(
            audio, language="en", beam_size=beam_size, vad_filter=False,
            condition_on_previous_text=False, without_timestamps=True, chunk_length=window_s,
            **({} if fallback else {"temperature": 0.0}))
        return " ".join(s.text.strip() for s in segments)
    finally:
        fw.pad_or_trim = padded


def bench(questions: list[str], repeat: int, workdir: Path) -> dict:
    from faster_whisper import WhisperModel

    settings = CompanionSettings()
    directory = ModelRegistry(settings.models_dir).resolve(settings.stt.model, kind="stt").directory
    model = WhisperModel(str(directory), device="cpu", compute_type=settings.stt.compute_type,
                         cpu_threads=settings.stt.threads, local_files_only=True)
    clips = []
    for i, text in enumerate(questions):
        engine = "espeak" if text.startswith(ESPEAK) else "piper"
        path = make(workdir / f"q{i}.wav", wake=None, text=text.removeprefix(ESPEAK),
                    engine=engine, lead_s=0.3, tail_s=0.3)
        pcm = read_wav_16k_mono(path)
        clips.append((text, np.frombuffer(pcm, np.int16).astype(np.float32) / 32768))
    results = {}
    for name, window in WINDOWS.items():
        for fallback in (True, False):
            times, rows = [], []
            for _ in range(repeat):
                rows = []
                for _text, audio in clips:
                    started = time.perf_counter()
                    heard = transcribe(model, audio, window(len(audio) / 16000),
                                       fallback=fallback, beam_size=settings.stt.beam_size)
                    times.append(time.perf_counter() - started)
                    rows.append({"transcript": heard})
            key = name if fallback else f"{name}_no_fallback"
            wrong = [{"said": normalize(t.removeprefix(ESPEAK)), "heard": r["transcript"][:200]}
                     for (t, _), r in zip(clips, rows, strict=True)
                     if normalize(r["transcript"]) != normalize(t.removeprefix(ESPEAK))]
            results[key] = {"median_s": round(statistics.median(times), 4),
                            "max_s": round(max(times), 4),
                            "wer_mean": mean_wer(rows, [_Ref(t) for t, _ in clips]),
                            "misheard": wrong}
    return {"clips": len(clips), "repeat": repeat, "windows": results}


class _Ref:
    """What ``mean_wer`` reads of a clip: its reference words."""

    def __init__(self, text: str) -> None:
        self.reference = normalize(text.removeprefix(ESPEAK))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three questions, once")
    parser.add_argument("--repeat", type=int, default=2, help="transcribe every clip this often")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args(argv)
    questions = QUESTIONS[:3] if args.quick else QUESTIONS
    with tempfile.TemporaryDirectory(prefix="bench-stt-window-") as tmp:
        result = bench(questions, 1 if args.quick else max(1, args.repeat), Path(tmp))
    summary = {k: {m: v[m] for m in ("median_s", "wer_mean")} for k, v in result["windows"].items()}
    write_report(result, args.out, summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
