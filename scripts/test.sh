#!/usr/bin/env bash
# Set up from nothing (scripts/setup.sh) and run every test: the fast ones and the slower ones
# marked `models` (real models) and `audio` (a private PulseAudio). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check companion tests scripts
# known vulnerabilities in the pinned dependencies (skipped, and said, where PyPI is unreachable)
.venv/bin/python scripts/audit.py
exec .venv/bin/python -m pytest -m "" "$@"
