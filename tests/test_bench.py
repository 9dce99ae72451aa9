"""scripts/bench.py: choosing benchmarks, reporting what is missing or failed, and the tables
and chart it writes (the benchmarks themselves run on the real models in CI's bench job)."""

import json

import pytest

from scripts import bench

VOICE = {"summary": {
    "waterfall": {
        "ours": {"endpoint_s": 0.3, "stt_s": 0.01, "llm_first_sentence_s": 0.2,
                 "tts_first_audio_s": 0.08, "silence_to_first_audio_s": 0.59},
        "sequential": {"endpoint_s": 0.65, "stt_s": 0.2, "llm_first_sentence_s": 0.2,
                       "tts_first_audio_s": 0.08, "silence_to_first_audio_s": 1.13},
        "non_streaming": {"endpoint_s": 0.65, "stt_s": 0.2, "llm_first_sentence_s": 1.5,
                          "tts_first_audio_s": 0.4, "silence_to_first_audio_s": 2.75}},
    "transcription": {"utterances_3s_plus": 2, "after_endpoint_ours_vs_sequential": 0.05,
                      "wer_ours": 0.0, "wer_sequential": 0.1,
                      "cpu_s_per_audio_minute": {"ours": 20.0, "sequential": 15.0}},
    "cut_offs": {"ours": 0, "sequential": 2}, "pausy_clips": 2}}


def test_unknown_benchmark_names_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["voice", "nonsense"])
    assert exit_info.value.code == 2
    assert "nonsense" in capsys.readouterr().err


def test_a_missing_script_is_skipped_and_a_failing_one_reported(monkeypatch, tmp_path):
    monkeypatch.setitem(bench.BENCHMARKS, "ghost", "bench_ghost_not_there.py")
    assert "skipped" in bench.run_one("ghost", quick=True, timeout_s=10)
    failing = tmp_path / "scripts"
    failing.mkdir()
    (failing / "bench_fail.py").write_text("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setitem(bench.BENCHMARKS, "fail", "bench_fail.py")
    result = bench.run_one("fail", quick=True, timeout_s=30)
    assert result["error"].startswith("exit 3") and "boom" in result["error"]


def test_a_script_without_out_or_quick_still_runs(monkeypatch, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "bench_old.py").write_text(
        "import argparse, json\nargparse.ArgumentParser().parse_args()\nprint(json.dumps({'rps': 5}))\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setitem(bench.BENCHMARKS, "old", "bench_old.py")
    assert bench.run_one("old", quick=True, timeout_s=30)["rps"] == 5


def test_tables_and_waterfall_are_written(tmp_path):
    info = {"cpu": "test cpu", "cores": 2, "memory_gb": 4.0, "system": "Linux", "python": "3.11",
            "date": "today"}
    results = {"voice": VOICE, "startup": {"models_load_s": 2.5, "rss_idle_mb": 400.0},
               "echo": {"skipped": "scripts/bench_echo.py is not there"}}
    assert bench.waterfall_png(VOICE, tmp_path / "w.png")
    assert (tmp_path / "w.png").read_bytes().startswith(b"\x89PNG")
    text = bench.markdown(results, info, "w.png")
    assert "| ours | 0.300 | 0.010 | 0.200 | 0.080 | **0.590** |" in text
    assert "non-streaming" in text and "![end of speech → first audio](w.png)" in text
    assert "| models_load_s | 2.500 |" in text
    assert "Not measured: scripts/bench_echo.py is not there" in text
    assert "`scripts/bench.py` on test cpu (2 cores" in text


def test_main_writes_json_markdown_and_chart(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "run_one", lambda name, quick, timeout_s: VOICE)
    assert bench.main(["voice", "--quick", "--out-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "bench.json").read_text())["results"]["voice"] == VOICE
    assert (tmp_path / "waterfall.png").exists() and (tmp_path / "bench.md").exists()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ran"] == ["voice"] and summary["failed"] == []


def test_several_runs_report_the_median_and_the_range():
    runs = [{"summary": {"x": 1.0, "label": "a"}}, {"summary": {"x": 3.0, "label": "a"}},
            {"summary": {"x": 2.0, "label": "a"}}]
    combined = bench.combine(runs)
    assert combined["summary"]["x"] == 2.0 and combined["summary"]["label"] == "a"
    assert combined["spread"]["summary.x"] == [1.0, 3.0]
    assert combined["runs"] == runs
    assert "2.000 (1.000–3.000)" in bench.fmt(2.0, combined["spread"]["summary.x"])


def test_a_failed_run_makes_the_benchmark_failed():
    combined = bench.combine([{"x": 1.0}, {"error": "exit 1: boom"}])
    assert combined["error"] == "exit 1: boom" and len(combined["runs"]) == 2


def test_runs_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["voice", "--runs", "0"])
    assert exc.value.code == 2
