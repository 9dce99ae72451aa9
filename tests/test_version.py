"""One version (pyproject.toml, read from the package metadata) and one rule for an API that
would be open to the network."""

from __future__ import annotations

import tomllib
from importlib.metadata import version

from companion.settings import PROJECT_ROOT, ApiSettings
from companion.version import VERSION


def test_the_version_is_the_packages():
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as fh:
        written = tomllib.load(fh)["project"]["version"]
    assert VERSION == version("companion") == written


def test_an_api_reachable_from_the_network_needs_a_key():
    assert ApiSettings(host="127.0.0.1").unprotected is None
    assert ApiSettings(host="0.0.0.0", keys=["k"]).unprotected is None
    assert "0.0.0.0" in ApiSettings(host="0.0.0.0").unprotected
