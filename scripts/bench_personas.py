"""Benchmark personas and memory on the real LLM (and TTS): prints one JSON document.

    .venv/bin/python scripts/bench_personas.py [--repeat 3] [--out bench.json]

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
import json
import platform
import shutil
import statistics
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


async def bench(repeat: int) -> dict:
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
        report: dict = {"machine": {"python": platform.python_version(), "cpu": platform.processor()
                                    or platform.machine(), "threads": settings.llm.threads},
                        "model": llm.model_name, "llm_load_ms": round(llm_load_ms, 1)}

        # 1. switch latency: cold (prompt not evaluated yet) and warm (state kept)
        targets = ["medication_nurse", "entertainer", "companion", "care_guide"]
        cold: dict[str, list[float]] = {t: [] for t in targets}
        warm: dict[str, list[float]] = {t: [] for t in targets}
        for _ in range(repeat):
            _forget_llm_state(llm)
            for target in targets:
                cold[target].append((await cm.switch_persona(target, preserve_context=True))
                                    .switch_latency_ms)
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
        for target in (0, 10, 25, 50, 100, 200):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    report = asyncio.run(bench(args.repeat))
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
