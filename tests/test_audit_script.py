"""scripts/audit.py: a vulnerability fails unless allowed with a reason; no database, no failure
(said plainly). pip-audit's report is given as a fixed document here (its format is pip-audit's
JSON); the real pip-audit runs in scripts/test.sh."""

from __future__ import annotations

import json
import subprocess

from scripts.audit import judge, main, read_allowlist


def _report(*deps: dict) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess([], 1, json.dumps({"dependencies": list(deps)}), "")


VULN = {"name": "aiohttp", "version": "3.9.0", "vulns": [
    {"id": "PYSEC-2024-24", "aliases": ["GHSA-5h86-8mv2-jq9f", "CVE-2024-23334"],
     "fix_versions": ["3.9.2"], "description": "directory traversal"}]}
CLEAN = {"name": "numpy", "version": "2.4.6", "vulns": []}
UNKNOWN = {"name": "av", "skip_reason": "Dependency not found on PyPI and could not be audited"}


def _probe(tmp_path) -> str:
    page = tmp_path / "probe.json"
    page.write_text("{}")
    return page.as_uri()  # a URL that answers, without the network


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_unreachable_database_skips_and_says_so(capsys):
    def never():
        raise AssertionError("pip-audit must not run without its database")

    assert main(["--probe-url", "http://127.0.0.1:1/"], audit=never) == 0
    out = capsys.readouterr().out
    assert "SKIPPED" in out and "NOT checked" in out
    assert json.loads(out.strip().splitlines()[-1])["audit"] == "skipped"


def test_a_vulnerability_fails(tmp_path, capsys):
    code = main(["--probe-url", _probe(tmp_path), "--allowlist", str(tmp_path / "none.txt")],
                audit=lambda: _report(VULN, CLEAN))
    summary = _last_json(capsys)
    assert code == 1 and summary["audit"] == "failed" and summary["checked"] == 2
    assert "PYSEC-2024-24" in summary["failing"][0] and "3.9.2" in summary["failing"][0]


def test_an_allowed_vulnerability_passes_with_its_reason(tmp_path, capsys):
    allow = tmp_path / "allow.txt"
    allow.write_text("# accepted\nCVE-2024-23334  static files are not served by this device\n")
    code = main(["--probe-url", _probe(tmp_path), "--allowlist", str(allow)],
                audit=lambda: _report(VULN, CLEAN, UNKNOWN))
    out = capsys.readouterr().out
    assert code == 0 and "static files are not served" in out
    assert "1 packages could not be audited: av" in out


def test_a_database_that_knows_nothing_is_a_skip_not_a_pass(tmp_path, capsys):
    assert main(["--probe-url", _probe(tmp_path)], audit=lambda: _report(UNKNOWN)) == 0
    out = capsys.readouterr().out
    assert "SKIPPED" in out and json.loads(out.strip().splitlines()[-1])["audit"] == "skipped"


def test_a_broken_pip_audit_fails(tmp_path, capsys):
    broken = subprocess.CompletedProcess([], 2, "", "Traceback...\nRuntimeError: boom")
    assert main(["--probe-url", _probe(tmp_path)], audit=lambda: broken) == 1
    assert "RuntimeError: boom" in capsys.readouterr().out


def test_allowlist_and_judge(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("GHSA-x  why not\n\n# comment\nPYSEC-1\n")
    assert read_allowlist(path) == {"GHSA-x": "why not", "PYSEC-1": ""}
    failing, accepted = judge({"dependencies": [VULN]}, {"PYSEC-2024-24": "read it"})
    assert failing == [] and accepted and "read it" in accepted[0]
