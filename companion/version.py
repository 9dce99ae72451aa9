"""The daemon's version: written once, in pyproject.toml, and read from the installed package's
metadata (``companion --version``, the hello frame, /v1/state and the OpenAPI document)."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _version() -> str:
    try:
        return version("companion")
    except PackageNotFoundError:  # a source tree that was never pip-installed
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        with pyproject.open("rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])


VERSION = _version()
