"""Benchmark the voice loop on the real embedded models: user-perceived silence, per stage.

    .venv/bin/python scripts/bench_voice.py [--quick] [--repeat 1] [--out bench_voice.json]

Every question is a WAV ("Hey Jarvis." then the question; some with a 0.7 s pause mid-sentence,
five of 4-6 s, two of those in espeak-ng's voice, the rest in piper's) played into the daemon's
own pipeline in real time, like a microphone. The silence the user
hears is measured from the clip's own end of speech (known from the generated audio) to the
first sample handed to the speaker, and split per stage (endpoint, transcription, LLM to the
first sentence, synthesis of it). Three ways, in the same run on the same models (``--modes``
adds two variants of ours):

- ``ours``: the default: semantic end of turn (a transcription and judgement per pause), the
  answer begun at a pause judged complete while the closing silence is counted;
- ``streaming`` (a variant): ours with ``turn.streaming_stt`` (transcription passes while the
  person talks); ``no_speculation`` (a variant): ours with ``turn.speculative_answer`` off;
- ``sequential``: a fixed 0.6 s silence window, transcription after the endpoint (as Home
  Assistant's Assist does), streamed LLM and TTS, no going on after the endpoint;
- ``non_streaming``: the sequential endpoint, then whole transcript → whole reply → whole
  synthesis → play. Its stages are the bare models timed on the same utterances and prompts
  right after the sequential run (no playback plumbing, so it flatters the baseline).

Also: transcription after the endpoint ours ÷ sequential (utterances of 3 s or more), word error
rate both ways, the CPU each mode costs, cut-offs on the pausy clips.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from companion.app import Features, build_app, tune_process
from companion.devices.audio import WavFileSink, WavFileSource, read_wav_16k_mono, write_wav
from companion.log import configure_logging
from companion.settings import PROJECT_ROOT, CompanionSettings
from companion.stages.llm import Priority
from companion.stages.sentences import split_sentences
from scripts.bench_report import write_report
from scripts.make_utterance_wav import make

# (what is said; "|" = a 0.7 s pause mid-sentence; "espeak:" = said by espeak-ng, not piper)
QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of | Germany?",
    "Tell me three interesting facts about the moon, please.",
    "How many legs | does an octopus have?",
    "Can you explain why the sky looks blue during the day?",
    "Who wrote Romeo and Juliet?",
    # 4-6 s: where transcribing while the person talks could pay
    "Could you tell me | how far away the moon is from the earth?",
    "I would like to know what the weather is usually like in London during the winter.",
    "Please give me a short recipe for pancakes | with bananas and honey.",
    "espeak:What is the difference between | a crocodile and an alligator?",
    "espeak:Tell me a short story about a dragon who loves to bake bread.",
]
QUICK = [0, 1, 2]
ESPEAK = "espeak:"
STAGES = ["endpoint_s", "stt_s", "llm_first_sentence_s", "tts_first_audio_s"]
GAP_S = 7.0  # quiet after each question: the reply is written and played meanwhile
SPEECH_LEVEL = 400  # |sample| above this is speech when finding the clip's end of speech
LONG_UTTERANCE_S = 3.0

MODES = {
    "ours": {},
    "sequential": {"turn": {"semantic": False, "streaming_stt": False, "resume_window_s": 0},
                   "pipeline": {"speculative_stt": False}, "vad": {"silence_end_s": 0.6}},
    "streaming": {"turn": {"streaming_stt": True}},
    "no_speculation": {"turn": {"speculative_answer": False}},
}
BASE_MODES = ["ours", "sequential"]  # always run: the report compares them


@dataclass
class Clip:
    text: str
    start_s: float  # where the clip starts in the microphone stream
    speech_start_s: float  # the question's speech, in stream time
    speech_end_s: float

    @property
    def reference(self) -> str:
        return normalize(self.text.removeprefix(ESPEAK))

    @property
    def speech_s(self) -> float:
        return self.speech_end_s - self.speech_start_s


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.replace("|", " ").lower()).split())


def summarize(values: list[float | None]) -> dict[str, float]:
    kept = sorted(v for v in values if v is not None)
    if not kept:
        return {}
    return {"median": round(statistics.median(kept), 4), "min": round(kept[0], 4),
            "max": round(kept[-1], 4), "n": len(kept)}


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.median(kept), 4) if kept else None


def mean_wer(rows: list[dict], clips: list[Clip]) -> float | None:
    rates = [word_error_rate(clips[i].reference, r["transcript"])
             for i, r in enumerate(rows) if "transcript" in r]
    return round(statistics.mean(rates), 4) if rates else None


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer

    return float(jiwer.wer(reference, normalize(hypothesis) or "<empty>"))


def speech_span(pcm: bytes) -> tuple[float, float]:
    """Seconds of the first and last sample louder than SPEECH_LEVEL."""
    loud = np.flatnonzero(np.abs(np.frombuffer(pcm, np.int16).astype(np.int32)) > SPEECH_LEVEL)
    return float(loud[0]) / 16000, float(loud[-1] + 1) / 16000


def build_microphone(questions: list[str], workdir: Path) -> tuple[Path, list[Clip]]:
    """All questions in one microphone stream with quiet between them, and where each
    question's speech starts and ends (measured on the audio itself)."""
    pcm, clips = b"", []
    for i, text in enumerate(questions):
        wake = read_wav_16k_mono(make(workdir / f"w{i}.wav", wake="Hey Jarvis.", text=None,
                                      gap_s=0.0, tail_s=0.0))
        engine = "espeak" if text.startswith(ESPEAK) else "piper"
        question = read_wav_16k_mono(make(workdir / f"q{i}.wav", wake=None,
                                          text=text.removeprefix(ESPEAK), engine=engine,
                                          lead_s=0.8))
        start = len(pcm) / 32000
        first, last = speech_span(question)
        offset = start + len(wake) / 32000
        clips.append(Clip(text, start, offset + first, offset + last))
        pcm += wake + question + bytes(2 * int(GAP_S * 16000))
    mic = workdir / "mic.wav"
    write_wav(mic, pcm)
    return mic, clips


class ClockedSource(WavFileSource):
    """The WAV microphone, remembering when its first block went out: block n (audio up to
    (n+1)·block) is handed over at first + n·block, so stream time t was said at
    first + t - block in the pipeline's clock (as a real microphone hands it over at its end)."""

    first_block_at: float | None = None

    async def blocks(self):
        async for block in super().blocks():
            if self.first_block_at is None:
                self.first_block_at = time.monotonic()
            yield block

    def stream_time(self, monotonic_s: float) -> float:
        assert self.first_block_at is not None
        return monotonic_s - self.first_block_at + self._block / 32000

    def said_at(self, stream_s: float) -> float:
        assert self.first_block_at is not None
        return self.first_block_at + stream_s - self._block / 32000


def turn_measurements(events: list, clips: list[Clip], source: ClockedSource) -> list[dict]:
    """Per question: the stage boundaries (monotonic event times) from its end of speech."""
    by_turn: dict[str, list] = {}
    for event in events:
        if event.turn_id:
            by_turn.setdefault(event.turn_id, []).append(event)
    per_clip: dict[int, list[list]] = {}
    for turn_events in by_turn.values():
        start = next((e for e in turn_events if e.type.value == "turn-start"), None)
        if start is None:
            continue
        heard_s = source.stream_time(start.timestamp)  # the wake word's own clock lags the stream
        index = max((i for i, c in enumerate(clips) if c.start_s <= heard_s), default=0)
        per_clip.setdefault(index, []).append(turn_events)
    rows = []
    for index, clip in enumerate(clips):
        turns = per_clip.get(index, [])
        row: dict = {"question": clip.text, "speech_s": round(clip.speech_s, 3),
                     "turns": len(turns)}
        if turns:
            row["turn_id"] = turns[0][0].turn_id
            said = source.said_at(clip.speech_end_s)
            ends = [e for e in turns[0] if e.type.value == "speech-end"]
            # the utterance answered is the last one: the user may have gone on after an
            # endpoint (speech-resumed), and the answer being prepared was then dropped
            answered = turns[0][turns[0].index(ends[-1]):] if ends else turns[0]
            first = {e.type.value: e for e in reversed(answered)}  # earliest of each type
            stt = first.get("stt-end")
            sentence = first.get("llm-sentence")
            llm_start = first.get("llm-start")
            row["speculative"] = bool(llm_start and llm_start.data.get("speculative"))
            row["resumed"] = sum(1 for e in turns[0] if e.type.value == "speech-resumed")
            play = first.get("playback-start")
            row["transcript"] = stt.data["text"] if stt else ""
            # cut off: something was answered before the user had finished, or the answer
            # was to fewer words than were said
            played_early = any(e.type.value == "playback-start" for e in
                               turns[0][: turns[0].index(ends[-1])]) if ends else False
            row["cut_off"] = played_early or len(turns) > 1 or not row["transcript"] or \
                normalize(row["transcript"]).split()[-1:] != clip.reference.split()[-1:]
            row["end_reason"] = ends[-1].data.get("end_reason") if ends else None
            row["end_probability"] = ends[-1].data.get("end_probability") if ends else None
            row["stt_after_endpoint_s"] = stt.data["took_s"] if stt else None
            row["stt_passes"] = stt.data.get("passes") if stt else None
            row["stt_decoded_audio_s"] = stt.data.get("decoded_audio_s") if stt else None
            row["first_sentence"] = sentence.data["text"] if sentence else None
            if ends and stt and sentence and play and row["cut_off"]:
                # an answer to part of the question: its latency is no latency (it may even
                # come before the question is over); the medians leave it out
                row["cut_off_first_audio_s"] = round(play.timestamp - said, 4)
            elif ends and stt and sentence and play:
                row["stages"] = {
                    "endpoint_s": round(ends[-1].timestamp - said, 4),
                    "stt_s": round(stt.timestamp - ends[-1].timestamp, 4),
                    "llm_first_sentence_s": round(sentence.timestamp - stt.timestamp, 4),
                    "tts_first_audio_s": round(play.timestamp - sentence.timestamp, 4),
                }
                row["silence_to_first_audio_s"] = round(play.timestamp - said, 4)
                row["end_of_speech_to_transcript_s"] = round(stt.timestamp - said, 4)
        rows.append(row)
    return rows


def bare_baseline(app, rows: list[dict], utterances: dict[str, bytes]) -> None:
    """Whole transcript → whole reply → whole synthesis, the bare models on this run's
    utterances (on their own threads, one after the other), added to each row."""
    persona = app.conversation.active_persona
    voice = persona.voice_config.params()
    llama = app.llm._llama
    for row in rows:
        pcm = utterances.get(row.get("turn_id", ""))
        if "stages" not in row or pcm is None:
            continue
        audio = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768
        started = time.perf_counter()
        transcript = app.stt._thread.submit(app.stt._run, audio, "en").result().text
        stt_s = time.perf_counter() - started
        messages = [*app.conversation.persona_messages(persona),
                    {"role": "user", "content": transcript}]

        def whole_reply(messages=messages) -> str:
            tokens, _ = app.llm.prompt_tokens(messages)
            app.llm._restore_best_prefix(tokens)
            out = llama.create_chat_completion(messages=messages, temperature=0.0,
                                               max_tokens=persona.behavior_config.max_tokens)
            return out["choices"][0]["message"]["content"] or ""

        started = time.perf_counter()
        reply = app.llm._submit(Priority.VOICE, whole_reply).result()
        llm_s = time.perf_counter() - started
        started = time.perf_counter()
        for sentence in split_sentences(reply) or [reply]:
            app.tts._run(sentence, voice)
        tts_s = time.perf_counter() - started
        row["non_streaming"] = {
            "reply_sentences": len(split_sentences(reply)),
            "stages": {"endpoint_s": row["stages"]["endpoint_s"], "stt_s": round(stt_s, 4),
                       "llm_first_sentence_s": round(llm_s, 4), "tts_first_audio_s": round(tts_s, 4)},
        }
        row["non_streaming"]["silence_to_first_audio_s"] = round(
            sum(row["non_streaming"]["stages"].values()), 4)


async def run_mode(mode: str, mic: Path, clips: list[Clip], workdir: Path) -> dict:
    overrides = MODES[mode]
    settings = CompanionSettings(
        data_dir=workdir / f"data-{mode}", personas={"dir": PROJECT_ROOT / "personas"},
        gpio={"enabled": False}, pipeline={"follow_up_window_s": 0,
                                           **overrides.get("pipeline", {})},
        **{k: v for k, v in overrides.items() if k != "pipeline"})
    source = ClockedSource(mic, realtime=True, block_ms=settings.audio.block_ms)
    sink = WavFileSink(workdir / f"out-{mode}.wav")
    app = build_app(settings, source=source, sink=sink, features=Features(
        audio_devices=False, http=False, control=False, gpio=False, warm_personas=False))
    events: list = []
    utterances: dict[str, bytes] = {}

    def on_event(event) -> None:
        events.append(event)
        if event.type.value == "turn-end":  # every question starts a fresh conversation
            asyncio.get_running_loop().create_task(app.conversation.new_active_session())

    app.bus.add_callback(on_event)
    await app.start()
    await app.conversation.warm_personas()
    await app.conversation.new_active_session()
    app.voice.utterance_listeners.append(utterances.__setitem__)
    process = psutil.Process()
    cpu_before = sum(process.cpu_times()[:2])
    wall_before = time.monotonic()
    await app.voice.run()
    await app.voice.wait_idle()
    cpu_s = sum(process.cpu_times()[:2]) - cpu_before
    wall_s = time.monotonic() - wall_before
    sink.close()
    rows = turn_measurements(events, clips, source)
    if mode == "sequential":
        await asyncio.to_thread(bare_baseline, app, rows, utterances)
    await app.aclose()
    return {"rows": rows, "cpu_s": round(cpu_s, 2), "wall_s": round(wall_s, 2),
            "cpu_s_per_audio_minute": round(cpu_s / (source.duration_s / 60), 2)}


def waterfall(runs: list[dict]) -> dict:
    """Median seconds per stage from the end of speech to the first audio."""
    timed = [r for r in runs if r.get("stages")]
    out = {stage: median([r["stages"][stage] for r in timed]) for stage in STAGES}
    out["silence_to_first_audio_s"] = median([r["silence_to_first_audio_s"] for r in timed])
    return out


def report(modes: dict, clips: list[Clip]) -> dict:
    ours, seq = modes["ours"]["rows"], modes["sequential"]["rows"]
    variants = [m for m in modes if m not in BASE_MODES]
    long_ones = [i for i, c in enumerate(clips) if c.speech_s >= LONG_UTTERANCE_S]
    pausy = [i for i, c in enumerate(clips) if "|" in c.text]
    three = [i for i, r in enumerate(seq) if r.get("non_streaming", {}).get("reply_sentences", 0) >= 3]

    def ratio(a: list[float | None], b: list[float | None]) -> float | None:
        ma, mb = median(a), median(b)
        return round(ma / mb, 3) if ma is not None and mb else None

    summary = {
        "silence_to_first_audio_s": {
            "ours": summarize([r.get("silence_to_first_audio_s") for r in ours]),
            "sequential": summarize([r.get("silence_to_first_audio_s") for r in seq]),
            "non_streaming": summarize([r.get("non_streaming", {}).get("silence_to_first_audio_s")
                                        for r in seq]),
        },
        "waterfall": {"ours": waterfall(ours), "sequential": waterfall(seq),
                      "non_streaming": waterfall([r.get("non_streaming", {}) for r in seq]),
                      **{m: waterfall(modes[m]["rows"]) for m in variants}},
        "answers_begun_ahead": {m: sum(1 for r in modes[m]["rows"] if r.get("speculative"))
                                for m in modes},
        "ours_vs_non_streaming_3plus_sentences": ratio(
            [ours[i].get("silence_to_first_audio_s") for i in three],
            [seq[i]["non_streaming"]["silence_to_first_audio_s"] for i in three]),
        "transcription": {
            "utterances_3s_plus": len(long_ones),
            "after_endpoint_ours_vs_sequential": ratio(
                [ours[i].get("stt_after_endpoint_s") for i in long_ones],
                [seq[i].get("stt_after_endpoint_s") for i in long_ones]),
            "end_of_speech_to_transcript_ours_vs_sequential": ratio(
                [ours[i].get("end_of_speech_to_transcript_s") for i in long_ones],
                [seq[i].get("end_of_speech_to_transcript_s") for i in long_ones]),
            # mean, not median: one bad transcript among many must show
            **{f"wer_{m}": mean_wer(modes[m]["rows"], clips) for m in modes},
            **{f"after_endpoint_{m}_vs_sequential": ratio(
                [modes[m]["rows"][i].get("stt_after_endpoint_s") for i in long_ones],
                [seq[i].get("stt_after_endpoint_s") for i in long_ones]) for m in variants},
            "cpu_s_per_audio_minute": {m: modes[m]["cpu_s_per_audio_minute"] for m in modes},
        },
        "cut_offs": {m: sum(1 for i in pausy if modes[m]["rows"][i].get("cut_off", True))
                     for m in modes},
        "pausy_clips": len(pausy),
        "unanswered": {m: sum(1 for r in modes[m]["rows"]
                              if "stages" not in r and "cut_off_first_audio_s" not in r)
                       for m in modes},
        # the user went on after an endpoint and the answer being prepared was dropped
        "resumed": {m: sum(r.get("resumed", 0) for r in modes[m]["rows"]) for m in modes},
    }
    return summary


async def bench(questions: list[str], workdir: Path, modes_run: list[str]) -> dict:
    tune_process()  # as the daemon runs
    mic, clips = await asyncio.to_thread(build_microphone, questions, workdir)
    modes = {}
    for mode in modes_run:
        modes[mode] = await run_mode(mode, mic, clips, workdir)
        gc.collect()
    return {"machine": {"cpus": psutil.cpu_count(), "python": sys.version.split()[0]},
            "questions": len(questions), "summary": report(modes, clips),
            "clips": [{"text": c.text, "speech_s": round(c.speech_s, 3)} for c in clips],
            "modes_run": modes_run,
            "modes": modes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three questions (smoke test)")
    parser.add_argument("--repeat", type=int, default=1, help="ask every question this often")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    parser.add_argument("--modes", default="", help="variants of ours to add, comma-separated: "
                        + ", ".join(m for m in MODES if m not in BASE_MODES)
                        + " (default: all; none with --quick)")
    args = parser.parse_args(argv)
    variants = [m for m in MODES if m not in BASE_MODES]
    chosen = [m for m in args.modes.split(",") if m] if args.modes else (
        [] if args.quick else variants)
    if unknown := sorted(set(chosen) - set(variants)):
        parser.error(f"unknown mode(s): {', '.join(unknown)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    configure_logging("warning", "console")
    questions = [QUESTIONS[i] for i in QUICK] if args.quick else QUESTIONS * args.repeat
    with tempfile.TemporaryDirectory(prefix="bench-voice-") as tmp:
        result = asyncio.run(bench(questions, Path(tmp), [*BASE_MODES, *chosen]))
    write_report(result, args.out, summary=result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
