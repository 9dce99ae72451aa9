#!/usr/bin/env bash
# Write constraints.txt: every package of the working .venv pinned to its installed version, so
# scripts/setup.sh gives a new device the versions that were tested. The project itself is left
# out, and llama-cpp-python (built from source by setup.sh) is pinned by version, not by the
# local wheel it was installed from. Run it after a dependency change, once the tests are green.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
{
  echo "# Pinned versions of a working environment (scripts/lock.sh wrote it; scripts/setup.sh installs"
  echo "# with it). Regenerate after a dependency change: ./scripts/lock.sh"
  "$VENV/bin/python" -m pip freeze --exclude-editable --exclude companion \
    | sed -E 's#^([A-Za-z0-9_.-]+) @ .*/[A-Za-z0-9_.]+-([0-9][0-9A-Za-z.+!]*)-py.*#\1==\2#' \
    | LC_ALL=C sort -f
} > constraints.txt
echo "lock: $(grep -vc '^#' constraints.txt) packages pinned in constraints.txt"
