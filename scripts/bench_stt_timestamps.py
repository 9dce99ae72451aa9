"""Whisper with and without timestamps: does it keep what follows a pause?

    .venv/bin/python scripts/bench_stt_timestamps.py [--voicings 3] [--out stt_timestamps.json]

Without timestamps faster-whisper decodes one segment and stops at the end-of-text token; after
a complete question followed by a pause ("What is the capital of Germany … and of France?") it
can stop there and drop the rest. This transcribes the voice benchmark's questions
(``scripts/bench_voice.py``: piper's and espeak-ng's voices, three with a 0.7 s mid-sentence
pause) and four clips with a 0.22–0.5 s pause after a complete phrase, with the daemon's
settings, both ways, in one run: mean word error rate, the clips misheard, and the median
seconds per transcription. piper says the same text a little differently each time (its noise
is random), and whether Whisper stops early depends on it: every piper clip is made
``--voicings`` times. The daemon keeps timestamps (``companion/stages/stt.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from companion.devices.audio import read_wav_16k_mono
from companion.models import ModelRegistry
from companion.settings import CompanionSettings
from scripts.bench_report import write_report
from scripts.bench_voice import ESPEAK, QUESTIONS, normalize, word_error_rate
from scripts.make_utterance_wav import make

BENCH_PAUSE_S = 0.7  # bench_voice's mid-sentence pause
AFTER_A_WHOLE_PHRASE = [("What is the capital of Germany | and of France?", 0.22),
                        ("How many legs does a spider have | and an ant?", 0.3),
                        ("Turn on the lights | in the kitchen.", 0.4),
                        ("Set a timer | for ten minutes.", 0.5)]


def clips(workdir: Path, quick: bool, voicings: int) -> list[tuple[str, str | None, np.ndarray]]:
    """(what was said, the last word of what follows a whole phrase or None, 16 kHz audio)."""
    chosen = [(q, BENCH_PAUSE_S) for q in (QUESTIONS[:2] if quick else QUESTIONS)]
    chosen += AFTER_A_WHOLE_PHRASE[:1] if quick else AFTER_A_WHOLE_PHRASE
    out = []
    for i, (text, pause_s) in enumerate(chosen):
        engine = "espeak" if text.startswith(ESPEAK) else "piper"  # espeak-ng: always the same
        said = text.removeprefix(ESPEAK)
        for k in range(voicings if engine == "piper" else 1):
            path = make(workdir / f"q{i}-{k}.wav", wake=None, text=said, engine=engine,
                        lead_s=0.3, tail_s=0.5, pause_s=pause_s)
            audio = np.frombuffer(read_wav_16k_mono(path), np.int16).astype(np.float32) / 32768
            after = normalize(said).split()[-1] if (text, pause_s) in AFTER_A_WHOLE_PHRASE else None
            out.append((normalize(said), after, audio))
    return out


def bench(quick: bool, voicings: int, workdir: Path) -> dict:
    from faster_whisper import WhisperModel

    settings = CompanionSettings()
    directory = ModelRegistry(settings.models_dir).resolve(settings.stt.model, kind="stt").directory
    model = WhisperModel(str(directory), device="cpu", compute_type=settings.stt.compute_type,
                         cpu_threads=settings.stt.threads, local_files_only=True)
    heard_clips = clips(workdir, quick, voicings)
    result: dict = {"clips": len(heard_clips), "voicings": voicings, "stt": settings.stt.model,
                    "clips_after_a_whole_phrase": sum(c[1] is not None for c in heard_clips)}
    for name, without in (("without_timestamps", True), ("with_timestamps", False)):
        times, rates, misheard, dropped = [], [], [], 0
        for reference, after, audio in heard_clips:
            started = time.perf_counter()
            segments, _ = model.transcribe(
                audio, language=settings.stt.language, beam_size=settings.stt.beam_size,
                vad_filter=False, condition_on_previous_text=False, without_timestamps=without)
            heard = " ".join(s.text.strip() for s in segments)
            times.append(time.perf_counter() - started)
            rates.append(word_error_rate(reference, heard))
            dropped += after is not None and after not in normalize(heard).split()
            if rates[-1] > 0:
                misheard.append({"said": reference, "heard": heard})
        result[name] = {"wer_mean": round(statistics.mean(rates), 4),
                        "dropped_after_a_pause": dropped,  # of the clips with one
                        "median_s": round(statistics.median(times), 4),
                        "misheard": misheard}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three clips, once")
    parser.add_argument("--voicings", type=int, default=3,
                        help="make every piper clip this often (each a little different)")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-stt-timestamps-") as tmp:
        result = bench(args.quick, 1 if args.quick else max(1, args.voicings), Path(tmp))
    summary = {k: {m: result[k][m] for m in ("wer_mean", "dropped_after_a_pause", "median_s")}
               for k in ("without_timestamps", "with_timestamps")}
    write_report(result, args.out, summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
