"""Write the action tables in docs/http-api.md and docs/control-plane.md from the registry.

    python -m scripts.gen_action_docs           # rewrite the tables
    python -m scripts.gen_action_docs --check   # exit 1 if a doc is out of date (tests do this)

Each table sits between ``<!-- actions:NAME -->`` and ``<!-- /actions:NAME -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from companion.actions import ALL_ACTIONS, Action
from companion.control.handlers import ACTION_COMMANDS

ROOT = Path(__file__).resolve().parent.parent
DOCS = {"api": ROOT / "docs" / "http-api.md", "control": ROOT / "docs" / "control-plane.md"}


def _type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "/".join(str(v) for v in prop["enum"])
    if "const" in prop:
        return str(prop["const"])
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"] if p.get("type") != "null")
    return str(prop.get("type", "object"))


def describe_args(action: Action) -> str:
    schema = action.request.model_json_schema()
    required = set(schema.get("required", []))
    parts = []
    for name, prop in schema.get("properties", {}).items():
        text = f"{name}: {_type(prop)}"
        if name not in required:
            text += f" = {json.dumps(prop['default'])}" if "default" in prop else "?"
        parts.append(f"`{text}`")
    return ", ".join(parts) or "–"


def control_frames(action: Action) -> str:
    frames = sorted(t for t, (name, _) in ACTION_COMMANDS.items() if name == action.name)
    return ", ".join(f"`{f}`" for f in frames) or "–"


def render(kind: str) -> str:
    if kind == "api":
        rows = ["| command | args | does |", "| --- | --- | --- |"]
        rows += [f"| {a.name} | {describe_args(a)} | {a.description} |"
                 for a in sorted(ALL_ACTIONS, key=lambda a: a.name) if "api" in a.channels]
    else:
        rows = ["| action | offered on | control-plane frame | args | does |",
                "| --- | --- | --- | --- | --- |"]
        rows += [f"| {a.name} | {', '.join(sorted(a.channels))} | {control_frames(a)} | "
                 f"{describe_args(a)} | {a.description} |"
                 for a in sorted(ALL_ACTIONS, key=lambda a: a.name)]
    return "\n".join(rows)


def _section(kind: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- actions:{kind} -->\n)(.*?)\n?(<!-- /actions:{kind} -->)", re.S)


def outdated() -> list[Path]:
    stale = []
    for kind, path in DOCS.items():
        match = _section(kind).search(path.read_text())
        if match is None or match.group(2) != render(kind):
            stale.append(path)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, do not write")
    args = parser.parse_args(argv)
    if args.check:
        stale = outdated()
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run python -m scripts.gen_action_docs")
        return 1 if stale else 0
    for kind, path in DOCS.items():
        text = path.read_text()
        if not _section(kind).search(text):
            print(f"{path.relative_to(ROOT)} has no <!-- actions:{kind} --> section", file=sys.stderr)
            return 2
        table = render(kind)
        path.write_text(_section(kind).sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(3), text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
