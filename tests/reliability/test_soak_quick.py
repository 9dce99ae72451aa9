"""CI's soak: ``scripts/soak.py --quick`` (30 s of warm-up, then 2 minutes of voice turns, chats,
persona switches, control-plane restarts and timers on the real models) must end with no error
and report what a long run reports. The 30-minute run is the lead's, on a quiet machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from companion.settings import PROJECT_ROOT

pytestmark = pytest.mark.models


def test_the_quick_soak_has_no_error_and_reports_every_figure(tmp_path: Path):
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, "scripts/soak.py", "--quick", "--out", str(out)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=480)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text())
    assert result.returncode == 0, (summary["error_list"], result.stderr[-2000:])
    assert summary["errors"] == 0 and summary["voice_turns"] > 0 and summary["chats"] > 0
    assert summary["persona_switches"] > 0 and summary["timers_rang"] > 0
    for moment in ("ready", "start", "end"):
        assert set(summary[moment]) == {"rss_mb", "open_files", "threads", "asyncio_tasks"}
    assert len(summary["slices"]) == 1 and summary["slices"][0]["turns"] > 0
    assert summary["slices"][0]["end_of_speech_to_first_audio"]["p99_s"] > 0
    assert summary["rss_trend_mb_per_10_min"] is not None
