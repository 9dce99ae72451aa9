"""Benchmark personas and memory on the real LLM (and TTS): prints one JSON document.

    .venv/bin/python scripts/bench_personas.py [--repeat 3] [--quick] [--out bench.json]

- switch right after start, measured from outside: the daemon's API (real SmolLM2 + piper, no
  audio devices, the background persona warm-up on as in `companion run`) in a child process;
  as soon as /ready says ready, one chat, then POST /v1/personas/switch (round trip; target
  < 300 ms), then the first chat in the new persona (its first SSE delta: the prompt the switch
  did not wait for is read by then, or by this turn);
- switch latency (request -> ready for the next turn), cold (persona prompt not evaluated yet)
  and warm (its llama.cpp state kept), per persona; and the piper voice load, cold vs cached;
- time to first token of a turn with a ~400-token persona prompt, with the kept prefix vs
  without (llama.cpp state reset), and their ratio (target <= 0.3);
- turn latency as the history grows from 0 to 200 turns (history pre-filled in the store between
  checkpoints; summaries folded in the background as in the daemon, waited for between
  checkpoints and not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from companion.conversation import ConversationManager
from companion.events import EventBus
from companion.models import ModelRegistry
from companion.personas import PersonaLibrary
from companion.settings import PROJECT_ROOT, CompanionSettings
from companion.store import Store
from scripts.bench_report import write_report

LONG_PERSONA = '''id = "care_guide"
name = "Grace"
description = "A detailed care-home guide (benchmark persona with a long prompt)."
system_prompt = """You are Grace, the voice companion of Rosewood House, a small care home. \
You talk with residents, most of them over eighty, some with poor hearing or memory. \
Answer the user's question directly and correctly in one or two short, simple sentences. \
If you do not know, say so, and never make up facts. \
Breakfast is served from eight to nine in the garden room, lunch at half past twelve and supper \
at six. The hairdresser visits on Tuesday mornings, the chiropodist on the first Monday of the \
month and the library van on Thursdays at two. Visiting hours are from ten in the morning until \
eight in the evening; visitors sign the book at the front desk. The nurse on duty can be called \
with the red button beside each bed or by saying "call the nurse". Residents must not be told to \
change the dose of any medicine; for anything about pain, falls, chest pain, breathing or \
confusion, tell them to press the red button or ask for the nurse at once. \
Activities: chair exercises on Monday and Wednesday at eleven, a singing group on Friday \
afternoons, bingo on Saturday evening, a church service on Sunday morning in the lounge and a \
film on Sunday afternoon. The garden is open from nine until dusk; the path by the pond is \
slippery after rain. Meals can be taken in a resident's room if they ask the day before. \
Telephone calls to family can be made from the quiet room; the staff help with video calls on \
the tablet. Post arrives at eleven and is handed out before lunch. \
Speak warmly and slowly, use the resident's name when you know it, and repeat important times \
once. Do not use lists, numbers with many digits, abbreviations or emojis, because everything you \
say is read aloud by a speech synthesizer. Never pretend to be a person; you are a voice \
companion. If a resident seems upset or lonely, listen, be kind and suggest a cup of tea with the \
staff or a call to their family."""

[character]
speaking_style = "Warm, slow and clear; short sentences."

[voice_config]
voice = "en_US-joe-medium"
length_scale = 1.1

[behavior_config]
temperature = 0.2
max_tokens = 48
'''

QUESTION = "When is lunch served?"
SWITCH_TARGET = "medication_nurse"  # not the default persona: its prompt is not read first
SWITCH_TARGET_MS = 300
GROWTH = (0, 10, 25, 50, 100, 200)  # history turns at each checkpoint
GROWTH_QUICK = (0, 10)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


async def _turn(cm: ConversationManager, text: str, **kwargs) -> dict:
    started = time.perf_counter()
    reply = await cm.reply_text(text, **kwargs)
    total = (time.perf_counter() - started) * 1000
    return {"ttft_ms": (reply.stats.first_token_s or 0) * 1000, "total_ms": total,
            "prompt_tokens": reply.stats.prompt_tokens,
            "cached_prompt_tokens": reply.stats.cached_prompt_tokens, "text": reply.text}


def _forget_llm_state(llm) -> dict:
    kept = dict(llm._prefix_states)
    llm._prefix_states.clear()
    llm._llama.reset()
    return kept


async def bench(repeat: int, growth_points: tuple[int, ...] = GROWTH) -> dict:
    from companion.stages.llm import LlamaCppChatModel
    from companion.stages.tts import PiperSynthesizer

    settings = CompanionSettings(device_id="bench")
    registry = ModelRegistry(settings.models_dir)
    started = time.perf_counter()
    llm = LlamaCppChatModel(settings.llm, registry)
    llm_load_ms = (time.perf_counter() - started) * 1000
    tts = PiperSynthesizer(settings.tts, registry)
    tmp = Path(tempfile.mkdtemp(prefix="bench-personas-"))
    try:
        lib_dir = tmp / "personas"
        shutil.copytree(PROJECT_ROOT / "personas", lib_dir)
        (lib_dir / "care_guide.toml").write_text(LONG_PERSONA)
        library = PersonaLibrary(lib_dir, voice_exists=tts.has_voice)
        errors = library.load()
        assert not errors, errors
        store = Store(tmp / "bench.db")
        cm = ConversationManager(llm=llm, store=store, personas=library, settings=settings.llm,
                                 bus=EventBus(), default_persona="companion")
        await cm.start()
        report: dict = {"machine": {"python": platform.python_version(), "cpu": platform.processor()
                                    or platform.machine(), "threads": settings.llm.threads},
                        "model": llm.model_name, "llm_load_ms": round(llm_load_ms, 1)}

        # 1. switch latency: cold (prompt not evaluated yet; the switch does not wait for it,
        # prompt_ready is when its evaluation after the switch is done) and warm (state kept)
        targets = ["medication_nurse", "entertainer", "companion", "care_guide"]
        cold: dict[str, list[float]] = {t: [] for t in targets}
        ready: dict[str, list[float]] = {t: [] for t in targets}
        warm: dict[str, list[float]] = {t: [] for t in targets}
        for _ in range(repeat):
            _forget_llm_state(llm)
            for target in targets:
                started = time.perf_counter()
                result = await cm.switch_persona(target, preserve_context=True)
                assert not result.prefix_was_warm
                cold[target].append(result.switch_latency_ms)
                await cm.wait_prepared()
                ready[target].append((time.perf_counter() - started) * 1000)
            for target in targets:
                result = await cm.switch_persona(target, preserve_context=True)
                assert result.prefix_was_warm
                warm[target].append(result.switch_latency_ms)
        prompt_tokens = {t: len(llm.prefix_tokens(cm.persona_messages(library.get(t))))
                         for t in targets}
        voice = settings.tts.voice
        voice_cold, voice_cached = [], []
        for _ in range(repeat):
            tts._voices.clear()
            t0 = time.perf_counter()
            tts.load_voice(voice)
            voice_cold.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            tts.load_voice(voice)
            voice_cached.append((time.perf_counter() - t0) * 1000)
        report["switch"] = {
            "persona_prompt_tokens": prompt_tokens,
            "cold_ms": {t: _median(v) for t, v in cold.items()},
            "cold_prompt_ready_ms": {t: _median(v) for t, v in ready.items()},
            "warm_ms": {t: _median(v) for t, v in warm.items()},
            "voice_load_cold_ms": _median(voice_cold), "voice_load_cached_ms": _median(voice_cached),
            "prefix_states_bytes": llm.prefix_bytes,
        }

        # 2. first token with a ~400-token persona prompt: kept prefix vs none
        await cm.switch_persona("care_guide", preserve_context=False)
        with_prefix, without = [], []
        for _ in range(repeat):
            await cm.warm_personas()
            with_prefix.append(await _turn(cm, QUESTION, new_session=True, temperature=0.0))
            kept = _forget_llm_state(llm)
            without.append(await _turn(cm, QUESTION, new_session=True, temperature=0.0))
            llm._prefix_states.update(kept)
        ttft_with = _median([t["ttft_ms"] for t in with_prefix])
        ttft_without = _median([t["ttft_ms"] for t in without])
        report["ttft_400_token_persona"] = {
            "persona_prompt_tokens": prompt_tokens["care_guide"],
            "prompt_tokens": with_prefix[0]["prompt_tokens"],
            "cached_prompt_tokens": with_prefix[0]["cached_prompt_tokens"],
            "with_prefix_ms": ttft_with, "without_prefix_ms": ttft_without,
            "ratio": round(ttft_with / ttft_without, 3), "target_ratio": 0.3,
            "same_answer": with_prefix[0]["text"] == without[0]["text"],
            "answer": with_prefix[0]["text"],
        }

        # 3. turn latency as history grows (companion persona, one session)
        await cm.switch_persona("companion", preserve_context=False)
        sid = await cm.active_session()
        growth = []
        have = 0
        for target in growth_points:
            for i in range(have, target):  # pre-fill the turns a conversation would have had
                store.record_turn(sid, f"fill{i}", f"Tell me something about topic number {i}, "
                                  "and what the weather might be like later today.",
                                  f"Topic {i} is interesting, and the weather later today should "
                                  "stay mild and dry, with a little sun in the afternoon.",
                                  persona_id="companion", source="bench")
            have = max(have, target)
            await cm.summarize(sid)  # what the background task does after a turn
            await cm.prepare_next_turn(sid)  # as if the pre-filled turns had been spoken here
            turns = []
            for _ in range(max(repeat, 2)):
                turns.append(await _turn(cm, QUESTION, temperature=0.0))
                await cm.wait_for_summaries()  # a fold between turns, as while the reply plays
            have += len(turns)
            growth.append({"history_turns": target,
                           "ttft_ms": _median([t["ttft_ms"] for t in turns]),
                           "ttft_ms_each": [round(t["ttft_ms"], 1) for t in turns],
                           "total_ms": _median([t["total_ms"] for t in turns]),
                           "prompt_tokens": max(t["prompt_tokens"] for t in turns),
                           "evaluated_tokens_each": [t["prompt_tokens"] - t["cached_prompt_tokens"]
                                                     for t in turns]})
        session = store.get_session(sid, with_messages=False)
        report["history_growth"] = {"budget_tokens": settings.llm.history_token_budget,
                                    "points": growth,
                                    "summary_chars": len(session.summary) if session else 0}
        store.close()
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- switch right after start (the daemon's API in a child process) ---------------------------


async def _serve(port: int, data_dir: str) -> None:
    from companion.app import Features, build_app
    from companion.log import configure_logging

    settings = CompanionSettings(
        device_id="bench", data_dir=Path(data_dir), log_level="warning",
        api={"host": "127.0.0.1", "port": port, "rate_limit_per_minute": 1_000_000},
        gpio={"enabled": False})
    configure_logging("warning", "console")
    app = build_app(settings, features=Features(audio_devices=False, voice_loop=False,
                                                control=False, gpio=False))
    try:
        await app.run()
    finally:
        await app.aclose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _first_delta_ms(session, base: str, message: str) -> float:
    started = time.perf_counter()
    first = None
    async with session.post(f"{base}/v1/chat/stream", json={"message": message}) as r:
        r.raise_for_status()
        async for line in r.content:
            if first is None and line.startswith(b"data:"):
                first = time.perf_counter()
    return ((first or time.perf_counter()) - started) * 1000


async def _switch_after_start_once(base: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        deadline = time.perf_counter() + 120
        while True:  # ready as soon as the models are loaded; warm-up runs on in the background
            try:
                async with session.get(f"{base}/ready") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError("the API never became ready")
            await asyncio.sleep(0.05)
        chat_started = time.perf_counter()
        async with session.post(f"{base}/v1/chat", json={"message": "Hello there!"}) as r:
            r.raise_for_status()
            await r.read()
        chat_ms = (time.perf_counter() - chat_started) * 1000
        started = time.perf_counter()
        async with session.post(f"{base}/v1/personas/switch",
                                json={"target_persona_id": SWITCH_TARGET}) as r:
            r.raise_for_status()
            body = await r.json()
        round_trip = (time.perf_counter() - started) * 1000
        after = await _first_delta_ms(session, base, QUESTION)
    return {"first_chat_ms": round(chat_ms, 1), "switch_round_trip_ms": round(round_trip, 1),
            "switch_latency_ms": body["switch_latency_ms"],
            "first_delta_after_switch_ms": round(after, 1)}


def bench_switch_after_start(runs: int) -> dict:
    results = []
    for _ in range(runs):  # a fresh daemon each time: "right after start"
        port = _free_port()
        with tempfile.TemporaryDirectory() as data_dir:
            child = subprocess.Popen(
                [sys.executable, __file__, "--serve", str(port), "--data-dir", data_dir],
                cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
            try:
                results.append(asyncio.run(_switch_after_start_once(f"http://127.0.0.1:{port}")))
            finally:
                child.terminate()
                child.wait(timeout=30)
    trips = [r["switch_round_trip_ms"] for r in results]
    return {"target_persona": SWITCH_TARGET, "runs": results,
            "switch_round_trip_ms_median": _median(trips),
            "switch_round_trip_ms_range": [min(trips), max(trips)],
            "first_delta_after_switch_ms_median": _median(
                [r["first_delta_after_switch_ms"] for r in results]),
            "target_ms": SWITCH_TARGET_MS, "met": max(trips) < SWITCH_TARGET_MS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="one repetition, short history growth (CI smoke run)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, args.data_dir))
        return 0
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    repeat = 1 if args.quick else args.repeat
    result = {"switch_after_start": bench_switch_after_start(repeat)}
    result.update(asyncio.run(bench(repeat, GROWTH_QUICK if args.quick else GROWTH)))
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
