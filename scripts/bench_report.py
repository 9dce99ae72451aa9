"""The output contract every benchmark keeps: the whole result as indented JSON in ``--out``
(its folder made if needed), and a one-line JSON summary as the last line on stdout, which
``scripts/bench.py`` and people reading a terminal both take."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(result: dict[str, Any], out: Path | None, *, summary: dict[str, Any] | None = None) -> None:
    """Write ``result`` to ``out`` (when given) and print ``summary`` (default: ``result``)."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result if summary is None else summary))
