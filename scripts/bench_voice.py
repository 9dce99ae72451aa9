"""Benchmark the voice loop on the real embedded models and write JSON.

    .venv/bin/python scripts/bench_voice.py --runs 5 --out bench_voice.json

Each run plays a WAV ("Hey Jarvis." then a question) into the daemon's own pipeline, paced in
real time like a microphone, and records per-stage times. The same run then times the bare
models on the same work (the LLM up to the first sentence's tokens from the same cached persona
prompt, piper on the same first sentence, whisper on the same utterance when it was on the
critical path), so `overhead_ratio` = end-of-speech→first-audio ÷ model compute on that path
compares numbers measured seconds apart on the same machine. Both modes are measured:
`speculative` (the default: transcription overlaps the silence window) and `sequential`
(transcription starts after the endpoint, as Home Assistant's Assist does).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from companion.app import Features, build_app, tune_process
from companion.devices.audio import WavFileSink, WavFileSource
from companion.log import configure_logging
from companion.models import ModelRegistry
from companion.settings import PROJECT_ROOT, CompanionSettings
from scripts.make_utterance_wav import make

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "What is the largest planet?", "Who wrote Romeo and Juliet?",
             "What colour is the sky?"]
STAGES = ["wake_s", "endpoint_s", "stt_s", "llm_first_token_s", "llm_first_sentence_s",
          "tts_first_sentence_s", "end_of_speech_to_first_audio_s", "speech_end_to_first_audio_s"]


def summarize(values: list[float]) -> dict[str, float]:
    values = sorted(v for v in values if v is not None)
    if not values:
        return {}
    return {"median": round(statistics.median(values), 4), "min": round(values[0], 4),
            "max": round(values[-1], 4), "n": len(values)}


def bare_llm_to_first_sentence(app, messages, n_tokens: int) -> float:
    """The LLM alone: from the persona's cached prompt state, evaluate the rest of the prompt
    and generate the first sentence's tokens, greedy, no streaming plumbing."""
    llama = app.llm._llama
    tokens, _ = app.llm.prompt_tokens(messages)
    app.llm._restore_best_prefix(tokens)
    started = time.perf_counter()
    for _ in llama.create_chat_completion(messages=messages, stream=True, temperature=0.0,
                                          max_tokens=max(n_tokens, 1)):
        pass
    return time.perf_counter() - started


def bare_tts(app, sentence: str) -> float:
    voice = app.conversation.active_persona.voice_config.params()
    started = time.perf_counter()
    app.tts._run(sentence, voice)
    return time.perf_counter() - started


def bare_stt(app, pcm: bytes) -> float:
    import numpy as np

    audio = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768
    started = time.perf_counter()
    app.stt._run(audio, "en")
    return time.perf_counter() - started


def recording_transcriber(settings: CompanionSettings, gate):
    """The real transcriber, keeping the audio of each call (for the bare re-run)."""
    from companion.stages.stt import FasterWhisperTranscriber

    class Recording(FasterWhisperTranscriber):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.calls: list[bytes] = []

        async def transcribe(self, pcm: bytes, *, language: str | None = None):
            self.calls.append(pcm)
            return await super().transcribe(pcm, language=language)

    return Recording(settings.stt, ModelRegistry(settings.models_dir), gate=gate)


def concatenate(wavs: list[Path], out: Path, gap_s: float = 2.5) -> Path:
    """All questions in one microphone stream, with quiet between them (as in a room)."""
    import wave

    from companion.devices.audio import read_wav_16k_mono

    pcm = b"".join(read_wav_16k_mono(w) + bytes(2 * int(gap_s * 16000)) for w in wavs)
    with wave.open(str(out), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(pcm)
    return out


async def run_mode(settings: CompanionSettings, mic_wav: Path, workdir: Path, mode: str) -> dict:
    """One daemon pipeline (as on a device), every question through it, then the bare models
    on the same work, on the same threads the pipeline uses."""
    source = WavFileSource(mic_wav, realtime=True, block_ms=settings.audio.block_ms)
    sink = WavFileSink(workdir / f"out-{mode}.wav", realtime=True)
    stt = recording_transcriber(settings, None)
    app = build_app(settings, source=source, sink=sink, stt=stt, features=Features(
        audio_devices=False, http=False, control=False, gpio=False, warm_personas=False))
    stt.gate = app.compute_gate  # as the daemon wires it
    events = []

    def on_event(event) -> None:
        events.append(event)
        if event.type.value == "turn-end":  # every question starts a fresh conversation
            asyncio.get_running_loop().create_task(app.conversation.new_active_session())

    app.bus.add_callback(on_event)
    load_started = time.perf_counter()
    await app.start()
    load_s = time.perf_counter() - load_started
    await app.conversation.warm_personas()
    await app.conversation.new_active_session()
    rss_after_load = psutil.Process().memory_info().rss
    await app.voice.run()
    await app.voice.wait_idle()
    sink.close()
    rss_after_turns = psutil.Process().memory_info().rss
    loop = asyncio.get_running_loop()
    persona = app.conversation.active_persona
    runs: list[dict] = []
    unanswered: list[dict] = []
    for turn in app.status.recent_turns:
        mine = [e for e in events if e.turn_id == turn.turn_id]
        stt_end = next((e for e in mine if e.type.value == "stt-end"), None)
        first_sentence = next((e.data["text"] for e in mine if e.type.value == "llm-sentence"), None)
        if stt_end is None or first_sentence is None or turn.end_of_speech_to_first_audio_s is None:
            unanswered.append({"turn_id": turn.turn_id, "events": [e.type.value for e in mine],
                               "transcript": stt_end.data["text"] if stt_end else None})
            continue
        messages = [*app.conversation.persona_messages(persona),
                    {"role": "user", "content": stt_end.data["text"]}]
        n_tokens = app.llm.count_tokens(first_sentence) + 1
        llm_bare = await loop.run_in_executor(app.llm._thread, bare_llm_to_first_sentence, app,
                                              messages, n_tokens)
        tts_bare = await asyncio.to_thread(bare_tts, app, first_sentence)
        timings = turn.as_dict()
        if stt_end.data["speculative"]:
            stt_critical = timings["stt_s"]  # only the part of the transcription not yet done
        else:
            audio = stt.calls[len(runs)] if len(stt.calls) > len(runs) else stt.calls[-1]
            stt_critical = await loop.run_in_executor(stt._thread, bare_stt, app, audio)
        model_compute = stt_critical + llm_bare + tts_bare
        e2e = timings["end_of_speech_to_first_audio_s"]
        runs.append({
            "transcript": stt_end.data["text"], "first_sentence": first_sentence,
            "speculative_stt": stt_end.data["speculative"],
            "timings": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in timings.items()},
            "bare": {"stt_critical_s": round(stt_critical, 4),
                     "llm_to_first_sentence_s": round(llm_bare, 4),
                     "tts_first_sentence_s": round(tts_bare, 4),
                     "model_compute_s": round(model_compute, 4)},
            "overhead_ratio": round(e2e / model_compute, 3) if model_compute and e2e else None,
        })
    await app.aclose()
    return {"load_s": round(load_s, 3), "rss_after_load_mb": round(rss_after_load / 2**20, 1),
            "rss_after_turns_mb": round(rss_after_turns / 2**20, 1), "runs": runs,
            "unanswered": unanswered}


async def bench(runs: int, workdir: Path) -> dict:
    tune_process()  # as the daemon runs
    wavs = [await asyncio.to_thread(make, workdir / f"q{i}.wav", wake="Hey Jarvis.", text=q)
            for i, q in enumerate(QUESTIONS)]
    mic = concatenate([wavs[i % len(wavs)] for i in range(runs)], workdir / "mic.wav", gap_s=9.0)
    report: dict = {"machine": {"cpus": psutil.cpu_count(), "python": sys.version.split()[0]},
                    "questions": runs, "modes": {}}
    for mode, speculative in (("speculative", True), ("sequential", False)):
        settings = CompanionSettings(
            data_dir=workdir / f"data-{mode}", personas={"dir": PROJECT_ROOT / "personas"},
            gpio={"enabled": False}, pipeline={"follow_up_window_s": 0, "speculative_stt": speculative})
        result = await run_mode(settings, mic, workdir, mode)
        ok = result["runs"]
        report["modes"][mode] = {
            "stages": {s: summarize([r["timings"][s] for r in ok]) for s in STAGES},
            "model_compute_on_critical_path_s": summarize([r["bare"]["model_compute_s"] for r in ok]),
            "stt_on_critical_path_s": summarize([r["bare"]["stt_critical_s"] for r in ok]),
            "overhead_ratio": summarize([r["overhead_ratio"] for r in ok]),
            "load_s": result["load_s"],
            "rss_after_load_mb": result["rss_after_load_mb"],
            "rss_after_turns_mb": result["rss_after_turns_mb"],
            "turns_answered": len(ok), "questions": runs, "unanswered": result["unanswered"],
            "runs": ok,
        }
        gc.collect()
    spec = report["modes"]["speculative"]["stages"]["end_of_speech_to_first_audio_s"]
    seq = report["modes"]["sequential"]["stages"]["end_of_speech_to_first_audio_s"]
    if spec and seq:
        report["speculative_vs_sequential_ratio"] = round(spec["median"] / seq["median"], 3)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="questions asked per mode")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    configure_logging("warning", "console")
    with tempfile.TemporaryDirectory(prefix="bench-voice-") as tmp:
        report = asyncio.run(bench(args.runs, Path(tmp)))
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
