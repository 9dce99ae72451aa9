"""Vulnerability audit of the installed packages (pip-audit), for scripts/test.sh and CI.

    python scripts/audit.py [--allowlist audit-allowlist.txt] [--probe-url URL] [--out PATH]

pip-audit asks PyPI's JSON API which of the installed versions have known vulnerabilities.
Where PyPI cannot be reached (an offline build machine) the audit cannot run: it says so
plainly, in one line, and exits 0, so CI does not fail for want of network. Where it runs, a
known vulnerability fails (exit 1) unless its id (or one of its aliases) is in the allow-list
file with the reason it is accepted: a vulnerability that nobody looked at must not pass.
The summary is one JSON line, last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROBE_URL = "https://pypi.org/pypi/pip/json"  # the service pip-audit asks (its default)


def reachable(url: str, timeout_s: float = 8.0) -> str | None:
    """None when ``url`` answers, else why not (one line)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            response.read(1)
        return None
    except Exception as exc:  # any failure means: no database here
        return f"{type(exc).__name__}: {exc}"


def read_allowlist(path: Path) -> dict[str, str]:
    """``ID  reason…`` per line (``#`` comments): the accepted vulnerabilities and why."""
    allowed: dict[str, str] = {}
    if not path.is_file():
        return allowed
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            vuln_id, _, reason = line.partition(" ")
            allowed[vuln_id.strip()] = reason.strip()
    return allowed


def judge(report: dict[str, Any], allowed: dict[str, str]) -> tuple[list[str], list[str]]:
    """(findings that fail, findings accepted by the allow-list), one line each."""
    failing, accepted = [], []
    for dep in report.get("dependencies", []):
        for vuln in dep.get("vulns", []):
            ids = [vuln["id"], *vuln.get("aliases", [])]
            fixed = ", ".join(vuln.get("fix_versions", [])) or "no fixed version yet"
            line = f"{dep['name']} {dep['version']}: {' / '.join(ids)} (fixed in: {fixed})"
            hit = next((i for i in ids if i in allowed), None)
            if hit is None:
                failing.append(line)
            else:
                accepted.append(f"{line}; allowed: {allowed[hit] or '(no reason given)'}")
    return failing, accepted


def run_pip_audit() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip_audit", "--format", "json", "--progress-spinner", "off",
         "--skip-editable"],
        capture_output=True, text=True, timeout=900, check=False)


def main(argv: list[str] | None = None, *,
         audit: Callable[[], subprocess.CompletedProcess[str]] = run_pip_audit) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allowlist", type=Path, default=ROOT / "audit-allowlist.txt")
    parser.add_argument("--probe-url", default=PROBE_URL)
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)

    summary: dict[str, Any] = {"audit": "skipped", "failing": [], "accepted": []}
    why_not = reachable(args.probe_url)
    if why_not is not None:
        print(f"audit: SKIPPED, the vulnerability database ({args.probe_url}) cannot be reached "
              f"from here ({why_not}); the dependencies were NOT checked")
        summary["reason"] = why_not
        return _finish(summary, args.out, 0)
    result = audit()
    try:
        report = json.loads(result.stdout)
    except ValueError:
        error = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"audit: FAILED to run pip-audit: {error}")
        summary.update(audit="error", reason=error)
        return _finish(summary, args.out, 1)
    failing, accepted = judge(report, read_allowlist(args.allowlist))
    deps = report.get("dependencies", [])
    skipped = [d for d in deps if "skip_reason" in d]
    checked = len(deps) - len(skipped)
    summary["unaudited"] = [d["name"] for d in skipped]
    if deps and not checked:
        reason = skipped[0]["skip_reason"]
        print(f"audit: SKIPPED, the vulnerability database answered but could audit none of the "
              f"{len(deps)} installed packages (first: {reason}); the dependencies were NOT "
              "checked")
        summary["reason"] = reason
        return _finish(summary, args.out, 0)
    if skipped:
        print(f"audit: {len(skipped)} packages could not be audited: "
              + ", ".join(d["name"] for d in skipped))
    for line in accepted:
        print(f"audit: accepted {line}")
    for line in failing:
        print(f"audit: VULNERABLE {line}")
    print(f"audit: {checked} packages checked, {len(failing)} vulnerable, {len(accepted)} accepted"
          + (f" (add an id with its reason to {args.allowlist.name} only after reading it)"
             if failing else ""))
    summary.update(audit="failed" if failing else "passed", checked=checked, failing=failing,
                   accepted=accepted)
    return _finish(summary, args.out, 1 if failing else 0)


def _finish(summary: dict[str, Any], out: Path | None, code: int) -> int:
    line = json.dumps(summary)
    if out is not None:
        out.write_text(line + "\n")
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
