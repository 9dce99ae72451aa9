"""The remote LLM backend, measured against llama-cpp-python's own server on loopback serving
the same GGUF as the local model.

    python scripts/bench_remote.py [--quick] [--runs 4] [--out r.json]

1. First audio (question in → first sound at the speaker, through the real conversation engine
   and piper) with ``llm.backend = "openai"`` ÷ the same with the local model, in the same run,
   alternating, several questions.
2. The server is killed (SIGKILL) while the first sentence of a long reply plays: the time until
   the local model's answer is heard, and the silence the listener hears in between (target: an
   answer, not silence, within 2 s).

The speaker is a WAV file written in real time (it takes as long as the audio lasts), so speech
queued before the kill plays on while the fallback answers, as on a device. Both "machines" share
this one's cores: the ratio includes the HTTP path, not a faster computer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from companion.app import App, build_app
from companion.conversation import Reply
from companion.devices.audio import WavFileSink
from companion.events import Event, EventType
from companion.settings import CompanionSettings, LlmSettings
from companion.stages.fallback_llm import FallbackChatModel
from companion.stages.llm import SamplingParams
from companion.stages.remote_llm import RemoteChatModel
from companion.stages.sentences import SentenceSplitter
from scripts.bench_quality import NO_SERVICES
from scripts.bench_report import write_report
from scripts.llama_server import LlamaServer

QUESTIONS = ["What is the capital of France?", "Which animal says moo?",
             "How many days are in a week?", "What colour is the sky on a clear day?"]
LONG = "Tell me a long story about a cat and a dog who become friends."


async def make_app(tmp: Path, name: str, llm: dict[str, Any], threads: int) -> App:
    settings = CompanionSettings(data_dir=tmp / name, log_level="warning",
                                 llm={"context_length": 2048, "threads": threads, **llm})
    app = build_app(settings, features=NO_SERVICES,
                    sink=WavFileSink(tmp / f"{name}.wav", realtime=True))
    await app.start()
    await app.conversation.warm_personas()  # as the daemon does at start (the local fallback too)
    return app


async def spoken_turn(app: App, text: str, *, max_tokens: int = 64,
                      written: list[tuple[float, str]] | None = None) -> list[Event]:
    """Answer ``text`` aloud as a voice turn does; returns the events it caused. ``written``
    (if given) gets each reply delta with the time it arrived."""
    events: list[Event] = []
    remove = app.bus.add_callback(events.append)
    events.append(Event(EventType.TURN_START, {"text": text}))
    reply = Reply("", "", "", text)

    async def sentences():
        splitter = SentenceSplitter()
        deltas = app.conversation.respond(text, reply=reply, new_session=True, source="bench",
                                          temperature=0.0, max_tokens=max_tokens)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if written is not None:
                    written.append((time.monotonic(), delta))
                for sentence in splitter.feed(delta):
                    yield sentence
        for sentence in splitter.flush():
            yield sentence

    try:
        await app.speech.speak(sentences(), app.conversation.active_persona.voice_config.params())
    finally:
        remove()
    return events


def first(events: list[Event], kind: EventType, after: float = 0.0) -> Event | None:
    return next((e for e in events if e.type is kind and e.timestamp >= after), None)


async def first_audio(app: App, text: str) -> float:
    events = await spoken_turn(app, text)
    played = first(events, EventType.PLAYBACK_START)
    assert played is not None, "nothing was played"
    return played.timestamp - events[0].timestamp


async def killed_mid_reply(app: App, server: LlamaServer) -> dict[str, Any]:
    """Kill the server as the first sentence starts playing; time what the listener hears."""
    killed: list[float] = []
    loop = asyncio.get_running_loop()

    def on_event(event: Event) -> None:
        if event.type is EventType.PLAYBACK_START and not killed:
            killed.append(time.monotonic())
            loop.run_in_executor(None, server.kill)  # SIGKILL now; reaping in a thread

    remove = app.bus.add_callback(on_event)
    written: list[tuple[float, str]] = []
    try:
        events = await spoken_turn(app, LONG, max_tokens=160, written=written)
    finally:
        remove()
    fallback = first(events, EventType.LLM_FALLBACK)
    if not killed or fallback is None:
        return {"error": "the reply ended before the kill took effect", "fell_back": False}
    t_kill = killed[0]
    local_tts = first(events, EventType.TTS_START, after=fallback.timestamp)
    local_audio = first(events, EventType.PLAYBACK_START, after=local_tts.timestamp) \
        if local_tts else None
    before = [e for e in events if e.type is EventType.PLAYBACK_END
              and (local_audio is None or e.timestamp <= local_audio.timestamp)]
    result: dict[str, Any] = {
        "fell_back": True, "reason": fallback.data.get("reason"),
        "kill_to_fallback_s": round(fallback.timestamp - t_kill, 3),
        # the local model's first words after the fallback: the part that does not depend on
        # how much speech was still queued when the server died
        "fallback_to_local_words_s": next(
            (round(t - fallback.timestamp, 3) for t, _ in written if t >= fallback.timestamp), None),
        "kill_to_local_audio_s": round(local_audio.timestamp - t_kill, 3) if local_audio else None,
    }
    if local_audio is not None:
        last_end = max((e.timestamp for e in before), default=t_kill)
        result["silence_before_local_answer_s"] = round(max(0.0, local_audio.timestamp - last_end), 3)
        result["local_first_sentence"] = local_audio.data.get("text")
    return result


async def words_after_fallback(local: Any, threads: int, *, continues: bool,
                               kill_after: int = 40) -> float | None:
    """Kill a fresh server after ``kill_after`` deltas of a story; seconds from the fallback
    to the local model's first words. ``continues=False`` makes the local model answer from
    scratch (as before it could continue a begun reply), for the comparison."""
    server = await asyncio.to_thread(LlamaServer(threads=threads).start)
    local.continues_replies = continues  # this instance only
    try:
        model = FallbackChatModel(RemoteChatModel(LlmSettings(
            backend="openai", base_url=server.base_url, remote_first_token_s=30.0,
            remote_stall_s=15.0)), local)
        fell_back: list[float] = []
        model.add_observer(lambda kind, **_: fell_back.append(time.monotonic())
                           if kind == "fallback" else None)
        story = [{"role": "user", "content": LONG}]
        deltas = model.stream(story, SamplingParams(temperature=0.0, max_tokens=kill_after + 40))
        async with contextlib.aclosing(deltas):
            n = 0
            async for _ in deltas:
                n += 1
                if n == kill_after:
                    await asyncio.to_thread(server.kill)
                if fell_back:
                    return time.monotonic() - fell_back[0]
        return None
    finally:
        del local.continues_replies
        await asyncio.to_thread(server.kill)


async def continue_vs_restart(local: Any, runs: int, threads: int) -> dict[str, Any]:
    """The fallback's first words: continuing the remote's partial reply vs answering anew,
    alternating, in the same run (the first of each kind warms up and is not counted)."""
    times: dict[str, list[float]] = {"continue": [], "restart": []}
    for run in range(runs + 1):
        order = (True, False) if run % 2 == 0 else (False, True)
        for continues in order:
            took = await words_after_fallback(local, threads, continues=continues)
            if run > 0 and took is not None:
                times["continue" if continues else "restart"].append(took)
    return {name: {"median": round(statistics.median(v), 3), "min": round(min(v), 3),
                   "max": round(max(v), 3), "n": len(v)} if v else None
            for name, v in times.items()}


async def bench(runs: int, questions: list[str], threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp_name:
        tmp = Path(tmp_name)
        server = await asyncio.to_thread(LlamaServer(threads=threads).start)
        try:
            local = await make_app(tmp, "local", {}, threads)
            # generous timeouts: this measures the remote path, not fallbacks on a busy machine
            remote = await make_app(tmp, "remote", {
                "backend": "openai", "base_url": server.base_url,
                "remote_first_token_s": 30.0, "remote_stall_s": 15.0}, threads)
            times: dict[str, list[float]] = {"local": [], "remote": []}
            for run in range(runs):
                for question in questions:
                    order = (("local", local), ("remote", remote))
                    for name, app in (order if run % 2 == 0 else order[::-1]):
                        times[name].append(await first_audio(app, question))
            gap = await continue_vs_restart(local.llm, max(1, runs // 2), threads)
            await local.aclose()
            fallbacks_before_kill = remote.llm.fallbacks  # type: ignore[attr-defined]
            kill = await killed_mid_reply(remote, server)
            await remote.aclose()
        finally:
            server.kill()
    local_s, remote_s = statistics.median(times["local"]), statistics.median(times["remote"])
    return {
        "bench": "remote", "turns_each": len(times["local"]),
        "first_audio_local_s": {"median": round(local_s, 3), "min": round(min(times["local"]), 3),
                                "max": round(max(times["local"]), 3)},
        "first_audio_remote_s": {"median": round(remote_s, 3),
                                 "min": round(min(times["remote"]), 3),
                                 "max": round(max(times["remote"]), 3)},
        "remote_over_local": round(remote_s / local_s, 3),
        "fallbacks_before_kill": fallbacks_before_kill, "threads": threads,
        "killed_mid_reply": kill,
        "fallback_to_local_words_s": gap,
        "target_answer_within_s": 2.0,
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--quick", action="store_true", help="one question each way")
    parser.add_argument("--runs", type=int, default=4, help="rounds over the questions")
    parser.add_argument("--threads", type=int, default=2,
                        help="llama.cpp threads of the local model and of the server alike")
    args = parser.parse_args(argv)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    result = asyncio.run(bench(1, QUESTIONS[:1], args.threads) if args.quick
                         else bench(args.runs, QUESTIONS, args.threads))
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
