"""Secrets from files: systemd credentials (``LoadCredential=``) or a private directory.

A secret in a TOML file or an environment variable is one ``ps e``, backup or pasted config
away from leaking. The daemon therefore also reads each secret setting from a file named after
it (``control_plane.token``, ``api.keys`` one key a line, ``llm.api_key``,
``arbitration.secret``) in
``credentials_dir``, which defaults to ``$CREDENTIALS_DIRECTORY`` (set by systemd for a unit
with ``LoadCredential=control_plane.token:/etc/companion/credentials/control_plane.token``).

A file that its group or other users may read is refused with the command that fixes it: a
secret that others can read is not one. A secret set both in the settings and in a file is
refused too: which of the two the device uses must never be a guess.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from pydantic import BaseModel

# the settings that are secrets, and whether the file holds one value or one a line
SECRET_SETTINGS: dict[str, bool] = {
    "api.keys": True,
    "control_plane.token": False,
    "llm.api_key": False,
    "arbitration.secret": False,
}
ENV_DIRECTORY = "CREDENTIALS_DIRECTORY"


class CredentialError(ValueError):
    """A credential file that must not be used; the message says which and how to fix it."""


def read_secret_file(path: Path) -> str:
    """The text of ``path``, refused when its group or other users can read it."""
    try:
        info = path.stat()
    except OSError as exc:
        raise CredentialError(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CredentialError(f"{path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise CredentialError(f"{path} has mode {mode:04o}, readable beyond its owner: "
                              f"run `chmod 600 {path}` (a secret others can read is not one)")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialError(f"cannot read {path}: {exc}") from None


def parse_secret(text: str, many: bool) -> str | list[str]:
    if not many:
        return text.strip()
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def credentials_directory(data: dict[str, Any]) -> Path | None:
    explicit = data.get("credentials_dir")
    if explicit is not None and not isinstance(explicit, str | os.PathLike):
        raise CredentialError(f"credentials_dir must be a path, not {type(explicit).__name__}")
    if explicit:
        return Path(explicit).expanduser()
    from_env = os.environ.get(ENV_DIRECTORY)
    return Path(from_env) if from_env else None


def fill_secrets(data: dict[str, Any], settings_cls: type[BaseModel]) -> dict[str, Any]:
    """``data`` (the settings as their sources gave them) with each secret that has a file in
    the credentials directory filled in from it; raises CredentialError."""
    directory = credentials_directory(data)
    if directory is None:
        return data
    if not directory.is_dir():
        raise CredentialError(f"credentials_dir {directory} is not a directory")
    data = dict(data)
    for name, many in SECRET_SETTINGS.items():
        path = directory / name
        if not path.exists():
            continue
        section_name, _, key = name.partition(".")
        section_cls = settings_cls.model_fields[section_name].annotation
        if key not in getattr(section_cls, "model_fields", {}):
            continue  # a secret this build does not have
        section = data.get(section_name) or {}
        section = dict(section.model_dump() if isinstance(section, BaseModel) else section)
        if section.get(key):
            raise CredentialError(f"{name} is set in the settings and in {path}: keep one")
        section[key] = parse_secret(read_secret_file(path), many)
        data[section_name] = section
    return data
