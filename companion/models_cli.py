"""`companion models list|pull|verify|use`: the command-line face of model_catalog.

Errors are one line on stderr: exit 2 for bad input (an unknown name, an unverified entry
without --allow-unverified), 1 for a failed download or verification.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from companion.model_catalog import (
    DEVICE_RAM_MB,
    SETTING_FOR_KIND,
    Catalog,
    CatalogError,
    UnknownModelError,
    is_installed,
    load_catalog,
    pull,
    this_device,
    verify_installed,
    write_setting,
)
from companion.models import ModelMissingError, ModelRegistry
from companion.settings import CompanionSettings, find_config


def add_parser(sub: Any) -> None:
    models = sub.add_parser("models", help="list, download, verify and choose models")
    msub = models.add_subparsers(dest="models_command", required=True)
    listing = msub.add_parser("list", help="bundled and downloadable models, and what fits here")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    get = msub.add_parser("pull", help="download, verify and install a catalog model")
    get.add_argument("name")
    get.add_argument("--allow-unverified", action="store_true",
                     help="install an entry the catalog has no sha256 for")
    get.add_argument("--no-progress", action="store_true", help="no progress bar")
    check = msub.add_parser("verify", help="check installed models' sizes and sha256")
    check.add_argument("name", nargs="?", help="one model (default: every installed one)")
    use = msub.add_parser("use", help="make an installed model the one the daemon runs")
    use.add_argument("name")


async def cmd_models(settings: CompanionSettings, args: argparse.Namespace) -> int:
    catalog = load_catalog(settings.models_dir / "catalog.toml")
    commands = {"list": _list, "pull": _pull, "verify": _verify, "use": _use}
    try:
        return await commands[args.models_command](settings, catalog, args)
    except CatalogError as exc:
        print(f"companion: {exc}", file=sys.stderr)
        return exc.exit_code


async def _list(settings: CompanionSettings, catalog: Catalog, args: argparse.Namespace) -> int:
    device, ram_mb = this_device()
    registry = ModelRegistry(settings.models_dir)
    rows = []
    for entry in registry.entries:
        if entry.name in catalog.entries or entry.kind == "wake":
            continue
        installed = registry.has(entry.name)
        size = registry.resolve(entry.name).file.stat().st_size if installed else None
        rows.append({"name": entry.name, "kind": entry.kind, "source": "bundled",
                     "installed": installed, "size_mb": size and round(size / 1e6),
                     "ram_mb": None, "fits": {}, "this_machine": None})
    for entry in catalog.entries.values():
        rows.append({
            "name": entry.name, "kind": entry.kind, "source": "catalog",
            "installed": is_installed(settings.models_dir, entry),
            "size_mb": round(entry.size / 1e6), "ram_mb": entry.ram_mb,
            "verified": entry.verified,
            "fits": {d: entry.fit(d) for d in DEVICE_RAM_MB},
            "this_machine": entry.fit(device if device in DEVICE_RAM_MB else "x86", ram_mb)})
    active = {_canonical(registry, n) for n in (settings.llm.model, settings.stt.model,
                                                 settings.tts.voice)}
    for row in rows:
        row["active"] = row["name"] in active
    if args.json:
        print(json.dumps({"device": device, "ram_mb": ram_mb, "models": rows}, indent=2))
        return 0
    devices = list(DEVICE_RAM_MB)
    print(f"this machine: {device}, {ram_mb} MB RAM   (fits: ok / slow / no; * = in use)")
    print(f"{'name':<24} {'kind':<4} {'installed':<9} {'MB':>5} {'RAM MB':>6}  "
          + " ".join(f"{d:<7}" for d in devices) + "  here")
    for row in rows:
        fits = " ".join(f"{row['fits'].get(d, '-'):<7}" for d in devices)
        mark = "*" if row["active"] else " "
        print(f"{mark}{row['name']:<23} {row['kind']:<4} {'yes' if row['installed'] else 'no':<9} "
              f"{row['size_mb'] or '-':>5} {row['ram_mb'] or '-':>6}  {fits}  "
              f"{row['this_machine'] or '-'}")
    return 0


def _canonical(registry: ModelRegistry, name: str) -> str:
    try:
        return registry.entry(name).name
    except ModelMissingError:
        return name


async def _pull(settings: CompanionSettings, catalog: Catalog, args: argparse.Namespace) -> int:
    entry = catalog.get(args.name)
    target = await pull(entry, settings.models_dir, allow_unverified=args.allow_unverified,
                        progress=not args.no_progress and sys.stderr.isatty())
    print(f"installed {entry.name} in {target}; make it the one in use with: "
          f"companion models use {entry.name}")
    return 0


async def _verify(settings: CompanionSettings, catalog: Catalog, args: argparse.Namespace) -> int:
    if args.name:
        entries = [catalog.get(args.name)]
        if not is_installed(settings.models_dir, entries[0]):
            raise CatalogError(f"{entries[0].name} is not installed "
                               f"(companion models pull {entries[0].name})")
    else:
        entries = [e for e in catalog.entries.values() if is_installed(settings.models_dir, e)]
    failed = 0
    for entry in entries:
        problems = await asyncio.to_thread(verify_installed, settings.models_dir, entry)
        print(f"{'ok  ' if not problems else 'FAIL'} {entry.name}"
              + "".join(f"\n     {p}" for p in problems))
        failed += bool(problems)
    if not args.name:  # the bundled models too
        failed += await asyncio.to_thread(_verify_bundled, settings, catalog)
    if failed:
        print(f"{failed} model(s) failed verification: pull them again", file=sys.stderr)
    return 1 if failed else 0


def _verify_bundled(settings: CompanionSettings, catalog: Catalog) -> int:
    registry = ModelRegistry(settings.models_dir)
    failed = 0
    for entry in registry.entries:
        if entry.name in catalog.entries or not registry.has(entry.name):
            continue
        intact = registry.resolve(entry.name).verify_sha256()
        print(f"{'ok  ' if intact else 'FAIL'} {entry.name} (bundled)")
        failed += not intact
    return failed


async def _use(settings: CompanionSettings, catalog: Catalog, args: argparse.Namespace) -> int:
    registry = ModelRegistry(settings.models_dir)
    try:
        entry = registry.entry(args.name)
    except ModelMissingError as exc:
        raise UnknownModelError(str(exc)) from None
    if entry.kind not in SETTING_FOR_KIND:
        raise UnknownModelError(f"{entry.name} is a {entry.kind} model; set wake.models instead")
    if not registry.has(entry.name, kind=entry.kind):  # type: ignore[arg-type]
        raise CatalogError(f"{entry.name} is not installed; first: {entry.how_to_install}")
    section, key = SETTING_FOR_KIND[entry.kind]
    config = _config_path(getattr(args, "config", None))
    await asyncio.to_thread(write_setting, config, section, key, entry.name)
    print(f"{section}.{key} = {entry.name!r} written to {config}; restart the daemon to load it "
          "(sudo systemctl restart companion)")
    env = f"COMPANION_{section.upper()}__{key.upper()}"
    if env in os.environ:
        print(f"companion: note: {env} is set and overrides the file", file=sys.stderr)
    return 0


def _config_path(explicit: Path | None) -> Path:
    """The settings file the daemon reads: --config, else the first existing default, else a
    new one (the system file when root, as the systemd unit runs)."""
    found = find_config(explicit) if explicit is None or explicit.exists() else explicit
    if found is not None:
        return found
    return Path("/etc/companion/companion.toml") if os.geteuid() == 0 else Path("companion.toml")
