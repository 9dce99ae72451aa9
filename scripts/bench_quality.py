"""Reply quality: a fixed quiz of everyday questions, scored by key words, on any model/backend.

    python scripts/bench_quality.py [--quick] [--out q.json] [--model NAME|PATH]
        [--backend local|openai|served] [--base-url URL] [--remote-model NAME]

The quiz (scripts/quality_quiz.toml, 44 questions: facts, arithmetic, time and dates, two-turn
memory probes, requests to decline) runs through the real conversation engine with the active
persona's prompt, each question in a new conversation; the tuned half and the held-out half are
scored separately. Reported: the score, the median time to the first complete sentence (what
the speaker waits for) and the median generation speed in tokens/s.

Backends: ``local`` (llama.cpp in this process), ``openai`` (a server at --base-url, with the
local model as fallback, like the daemon), ``served`` (starts llama-cpp-python's own server on
loopback with the same GGUF as --model and runs ``openai`` against it: its scores must equal
``local``'s). Temperature 0 by default, so a run is repeatable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import re
import statistics
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from companion.app import App, Features, build_app
from companion.conversation import Reply
from companion.settings import CompanionSettings
from companion.stages.sentences import SentenceSplitter, split_sentences
from scripts.bench_report import write_report

QUIZ = Path(__file__).with_name("quality_quiz.toml")
HALVES = ("tuned", "held-out")
NO_SERVICES = Features(audio_devices=False, voice_loop=False, http=False, control=False,
                       gpio=False, warm_personas=False)


@dataclass(frozen=True)
class Question:
    id: str
    half: str
    kind: str
    ask: tuple[str, ...]
    accept: tuple[str, ...]
    reject: tuple[str, ...] = ()

    def correct(self, answer: str) -> bool:
        text = answer.lower().replace("\u2019", "'")
        if self.kind == "decline":
            # a refusal opens the answer: "To build a bomb, you need ... You can't just ..."
            # carries "can't" but is instructions, not a refusal
            sentences = split_sentences(text)
            text = sentences[0] if sentences else ""
        return any(_has(text, w) for w in self.accept) and not any(_has(text, w) for w in self.reject)


def _has(text: str, word: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(word.lower())}(?![a-z0-9])", text) is not None


def load_quiz(path: Path = QUIZ) -> list[Question]:
    with path.open("rb") as fh:
        raw = tomllib.load(fh)["question"]
    return [Question(q["id"], q["half"], q["kind"], tuple(q["ask"]), tuple(q["accept"]),
                     tuple(q.get("reject", ()))) for q in raw]


def quick_subset(quiz: list[Question], per_half: int = 3) -> list[Question]:
    return [q for half in HALVES for q in [q for q in quiz if q.half == half][:per_half]]


async def ask(app: App, question: Question, *, temperature: float,
              max_tokens: int) -> dict[str, Any]:
    """Every turn of ``question`` in one new conversation; the last answer is scored."""
    session: str | None = None
    for text in question.ask:
        reply = Reply("", "", "", text)
        splitter = SentenceSplitter()
        started = time.perf_counter()
        first_sentence: float | None = None
        async for delta in app.conversation.respond(
                text, reply=reply, session_id=session, new_session=session is None,
                source="bench", temperature=temperature, max_tokens=max_tokens):
            if first_sentence is None and any(True for _ in splitter.feed(delta)):
                first_sentence = time.perf_counter() - started
        total = time.perf_counter() - started
        session = reply.session_id
    stats = reply.stats
    generating = total - (stats.first_token_s or 0.0)
    return {
        "id": question.id, "half": question.half, "kind": question.kind,
        "correct": question.correct(reply.text), "answer": reply.text,
        "first_sentence_s": round(first_sentence if first_sentence is not None else total, 3),
        "tokens_per_s": round(stats.completion_tokens / generating, 1)
        if stats.completion_tokens > 1 and generating > 0 else None,
    }


def rescore(report: dict[str, Any], quiz: list[Question]) -> dict[str, Any]:
    """A saved report graded again with the quiz as it is now (its answers are kept): for a
    change of grading, no model run is needed and the answers stay comparable."""
    if "local" in report and "served" in report:
        parts = {k: rescore(report[k], quiz) for k in ("local", "served")}
        return report | parts | {"scores_match": parts["local"]["score"] == parts["served"]["score"]}
    by_id = {q.id: q for q in quiz}
    answers = [a | {"correct": by_id[a["id"]].correct(a["answer"])} for a in report["answers"]]
    return report | summarize(answers) | {"answers": answers}


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    def score(rows: list[dict[str, Any]]) -> dict[str, Any]:
        right = sum(r["correct"] for r in rows)
        return {"correct": right, "total": len(rows),
                "pct": round(100 * right / len(rows), 1) if rows else None}

    speeds = [r["tokens_per_s"] for r in results if r["tokens_per_s"]]
    return {
        "score": {"tuned": score([r for r in results if r["half"] == "tuned"]),
                  "held_out": score([r for r in results if r["half"] == "held-out"]),
                  "all": score(results)},
        "by_kind": {k: score([r for r in results if r["kind"] == k])
                    for k in sorted({r["kind"] for r in results})},
        "median_first_sentence_s": round(statistics.median(
            r["first_sentence_s"] for r in results), 3) if results else None,
        "median_tokens_per_s": round(statistics.median(speeds), 1) if speeds else None,
    }


async def run_quiz(settings: CompanionSettings, quiz: list[Question], *, temperature: float,
                   max_tokens: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    app = build_app(settings, features=NO_SERVICES)
    try:
        await app.start()
        results = [await ask(app, q, temperature=temperature, max_tokens=max_tokens)
                   for q in quiz]
        info = {"model": app.llm.model_name, "persona": app.conversation.active_persona_id,
                "fallbacks": getattr(app.llm, "fallbacks", 0)}
    finally:
        await app.aclose()
    return results, info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--quick", action="store_true", help="3 questions of each half")
    parser.add_argument("--half", choices=(*HALVES, "all"), default="all",
                        help="only this half of the quiz (tune on 'tuned' alone)")
    parser.add_argument("--model", default=None, help="local LLM (name or .gguf path)")
    parser.add_argument("--backend", choices=("local", "openai", "served", "both"), default="local",
                        help="both = local, then served, and how many answers are identical")
    parser.add_argument("--base-url", help="the remote server's API root (--backend openai)")
    parser.add_argument("--remote-model", default="default")
    parser.add_argument("--persona", default=None, help="persona to answer as (default: settings)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rescore", type=Path, metavar="JSON",
                        help="grade a saved report's answers again with the current quiz (no model run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="llama.cpp threads, local and served alike (default: settings)")
    return parser.parse_args(argv)


def settings_threads(args: argparse.Namespace) -> int:
    """The server gets the local model's thread count: a like-for-like comparison."""
    return args.threads or CompanionSettings(data_dir=Path(tempfile.gettempdir())).llm.threads


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.backend != "both":
        return await bench_one(args)
    local = await bench_one(argparse.Namespace(**{**vars(args), "backend": "local"}))
    served = await bench_one(argparse.Namespace(**{**vars(args), "backend": "served"}))
    same = sum(a["answer"] == b["answer"] for a, b in zip(local["answers"], served["answers"],
                                                           strict=True))
    return {"bench": "quality", "backend": "both", "questions": local["questions"],
            "quick": args.quick, "identical_answers": same,
            "scores_match": local["score"] == served["score"],
            "local": local, "served": served}


async def bench_one(args: argparse.Namespace) -> dict[str, Any]:
    from scripts.llama_server import LlamaServer, default_gguf

    quiz = load_quiz()
    if args.half != "all":
        quiz = [q for q in quiz if q.half == args.half]
    if args.quick:
        quiz = quick_subset(quiz)
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        llm: dict[str, Any] = {"context_length": 2048, "threads": settings_threads(args)}
        if args.model:
            llm["model"] = args.model
        server = None
        if args.backend == "served":
            gguf = Path(args.model) if args.model and Path(args.model).suffix else default_gguf(
                name=args.model or "smollm2-135m-instruct")
            server = await asyncio.to_thread(LlamaServer(gguf, threads=settings_threads(args)).start)
            llm |= {"backend": "openai", "base_url": server.base_url}
        elif args.backend == "openai":
            llm |= {"backend": "openai", "base_url": args.base_url,
                    "remote_model": args.remote_model}
        if args.backend != "local":  # a fair remote: generous timeouts, no fallback by haste
            llm |= {"remote_first_token_s": 30.0, "remote_stall_s": 15.0}
        overrides: dict[str, Any] = {"data_dir": Path(tmp), "llm": llm, "log_level": "warning"}
        if args.persona:
            overrides["personas"] = {"default": args.persona}
        settings = CompanionSettings(**overrides)
        try:
            results, info = await run_quiz(settings, quiz, temperature=args.temperature,
                                           max_tokens=args.max_tokens)
        finally:
            if server is not None:
                server.kill()
    return {"bench": "quality", "backend": args.backend, **info,
            "threads": settings_threads(args), "temperature": args.temperature, "max_tokens": args.max_tokens,
            "questions": len(quiz), "quick": args.quick, **summarize(results),
            "machine": f"{platform.machine()}, {platform.python_version()}",
            "answers": results}


def _without_answers(report: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_answers(v) if isinstance(v, dict) else v
            for k, v in report.items() if k != "answers"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend == "openai" and not args.base_url:
        print("bench_quality: --backend openai needs --base-url", file=sys.stderr)
        return 2
    if args.rescore:
        try:
            result = rescore(json.loads(args.rescore.read_text()), load_quiz())
        except (OSError, ValueError, KeyError) as exc:
            print(f"bench_quality: cannot rescore {args.rescore}: {exc!r}", file=sys.stderr)
            return 2
        write_report(result, args.out, summary=_without_answers(result))
        return 0
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    result = asyncio.run(bench(args))
    write_report(result, args.out, summary=_without_answers(result))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
