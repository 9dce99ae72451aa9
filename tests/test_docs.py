"""The documentation is whole inside the repository: every relative link resolves to a file
here, and nothing sends the reader to a path outside it (a clone has nothing else)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from companion.settings import PROJECT_ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target)
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)  # [name]: target
OUTSIDE = re.compile(r"(?<![\w./])(\.\./[\w./-]+)")  # a path written out that climbs out of here
EXTERNAL = ("http://", "https://", "mailto:", "file://")


def markdown_files() -> list[Path]:
    skip = {"node_modules", "build", "dist"}
    return sorted(p for p in PROJECT_ROOT.rglob("*.md")
                  if not any(part.startswith(".") or part in skip
                             for part in p.relative_to(PROJECT_ROOT).parts[:-1]))


def broken_links(path: Path, text: str | None = None) -> dict[str, str]:
    """The link targets of ``path`` (or of ``text`` as if it were there) that are no file in the
    repository or lie outside it, with what is wrong with each."""
    text = path.read_text(encoding="utf-8") if text is None else text
    root = PROJECT_ROOT.resolve()
    problems: dict[str, str] = {}
    for target in LINK.findall(text) + REFERENCE.findall(text):
        if target.startswith(EXTERNAL) or target.startswith("#"):
            continue
        resolved = (path.parent / target.split("#", 1)[0]).resolve()
        if not resolved.is_relative_to(root):
            problems[target] = "outside the repository"
        elif not resolved.exists():
            problems[target] = "no such file"
    for written in OUTSIDE.findall(text):  # also a path in backticks or plain text
        if not (path.parent / written).resolve().is_relative_to(root):
            problems.setdefault(written, "outside the repository")
    return problems


def test_the_readme_and_docs_are_found():
    names = {p.relative_to(PROJECT_ROOT).as_posix() for p in markdown_files()}
    assert {"README.md", "docs/models.md", "docs/http-api.md"} <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(PROJECT_ROOT).as_posix())
def test_every_link_resolves_inside_the_repository(path: Path):
    assert broken_links(path) == {}


def test_the_check_catches_what_it_is_for():
    text = ("[ok](docs/models.md) [gone](docs/nothere.md) [up](../elsewhere/MODELS.md) "
            "see `../shared/MODELS.md` [web](https://example.org) [anchor](#top) "
            "[section](docs/personas.md#fields) [fine](docs/../README.md)\n[ref]: ../x.md\n")
    assert broken_links(PROJECT_ROOT / "README.md", text) == {
        "docs/nothere.md": "no such file", "../elsewhere/MODELS.md": "outside the repository",
        "../x.md": "outside the repository", "../shared/MODELS.md": "outside the repository"}
