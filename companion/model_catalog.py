"""`companion models`: the catalog of bigger models a device with internet may fetch.

models/catalog.toml lists each model's files with URL, size and sha256. ``pull`` downloads them
into ``models_dir/.downloads/NAME/`` (resumable: an interrupted download goes on from where it
stopped), checks every file's size and hash, and only then moves the whole directory to
``models_dir/NAME/`` in one rename: a model directory is complete or absent, never half there.
The ModelRegistry reads the same catalog, so a pulled model resolves by name like a bundled one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import platform
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

log = structlog.get_logger(__name__)

CHUNK_BYTES = 1 << 20
FREE_SPACE_MARGIN_BYTES = 64 << 20  # left free beside the download (logs, SQLite)
DOWNLOADS_DIR = ".downloads"

# Memory of a device class in MB, and what the rest of the daemon takes beside one model:
# 600 MB is the daemon's RSS after loading its default models (README, scripts/bench_voice.py),
# 350 MB the OS and its services on a Raspberry Pi OS Lite install.
DEVICE_RAM_MB = {"pi4-2gb": 2048, "pi4-4gb": 4096, "pi4-8gb": 8192,
                 "pi5-4gb": 4096, "pi5-8gb": 8192, "x86": 8192}
DAEMON_BASE_MB = 600
OS_RESERVE_MB = 350


class CatalogError(RuntimeError):
    """A pull or verify that failed; the message says what to do. Exit code 1."""

    exit_code = 1


class UnknownModelError(CatalogError):
    """A name neither the catalog nor the manifest knows (bad input: exit code 2)."""

    exit_code = 2


class UnverifiedModelError(CatalogError):
    """An entry without a sha256, pulled without --allow-unverified (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class CatalogFile:
    name: str
    url: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    kind: str
    display_name: str
    files: tuple[CatalogFile, ...]
    aliases: tuple[str, ...] = ()
    parameters: str | None = None
    context_length: int | None = None
    license: str | None = None
    ram_mb: int | None = None
    slow_on: tuple[str, ...] = ()
    hash_source: str | None = None

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def verified(self) -> bool:
        """Every file has a published sha256 to check against."""
        return all(f.sha256 for f in self.files)

    @property
    def primary(self) -> CatalogFile:
        return self.files[0]

    def fit(self, device: str, ram_mb: int | None = None) -> str:
        """'ok', 'slow' (works, answers slowly) or 'no' (does not fit in memory) on a device
        class (``ram_mb`` overrides the class's memory, e.g. this machine's)."""
        total = ram_mb if ram_mb is not None else DEVICE_RAM_MB[device]
        if (self.ram_mb or 0) + DAEMON_BASE_MB > total - OS_RESERVE_MB:
            return "no"
        return "slow" if device in self.slow_on else "ok"


@dataclass
class Catalog:
    path: Path
    entries: dict[str, CatalogEntry] = field(default_factory=dict)

    def get(self, name: str) -> CatalogEntry:
        for entry in self.entries.values():
            if name == entry.name or name in entry.aliases:
                return entry
        raise UnknownModelError(
            f"unknown model {name!r}; the catalog has: {', '.join(self.entries) or '(nothing)'}")


def load_catalog(path: Path) -> Catalog:
    """Read a catalog file; a missing file is an empty catalog (a device without one)."""
    if not path.is_file():
        return Catalog(path)
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    entries = {}
    for name, fields in raw.get("models", {}).items():
        fields = dict(fields)
        files = tuple(CatalogFile(**f) for f in fields.pop("files", ()))
        if not files:
            raise CatalogError(f"{path}: model {name!r} lists no files")
        entries[name] = CatalogEntry(
            name=name, files=files, aliases=tuple(fields.pop("aliases", ())),
            slow_on=tuple(fields.pop("slow_on", ())), **fields)
    return Catalog(path, entries)


# --- what is on this machine -----------------------------------------------------------------


def this_device() -> tuple[str, int]:
    """(device class, RAM in MB) of the machine this runs on."""
    import psutil

    ram_mb = int(psutil.virtual_memory().total / (1 << 20))
    model = ""
    with contextlib.suppress(OSError):
        model = Path("/proc/device-tree/model").read_text(errors="ignore")
    for generation in ("5", "4"):
        if f"Raspberry Pi {generation}" in model:
            size = min((4, 8) if generation == "5" else (2, 4, 8),
                       key=lambda gb: abs(gb * 1024 - ram_mb))
            return f"pi{generation}-{size}gb", ram_mb
    return ("x86" if platform.machine() in ("x86_64", "AMD64") else platform.machine()), ram_mb


def install_dir(models_dir: Path, entry: CatalogEntry) -> Path:
    return models_dir / entry.name


def is_installed(models_dir: Path, entry: CatalogEntry) -> bool:
    target = install_dir(models_dir, entry)
    return all((target / f.name).is_file() for f in entry.files)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, spec: CatalogFile) -> str | None:
    """Why ``path`` is not the file the catalog describes, or None when it is."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        return f"{path}: {size} bytes, the catalog says {spec.size}"
    if spec.sha256 and (got := sha256_of(path)) != spec.sha256:
        return f"{path}: sha256 {got}, the catalog says {spec.sha256}"
    return None


def verify_installed(models_dir: Path, entry: CatalogEntry) -> list[str]:
    """Problems with an installed model's files (empty: intact). Reads every byte."""
    target = install_dir(models_dir, entry)
    return [problem for spec in entry.files if (problem := check_file(target / spec.name, spec))]


# --- pull ---------------------------------------------------------------------------------------


async def pull(entry: CatalogEntry, models_dir: Path, *, allow_unverified: bool = False,
               progress: bool = True, connect_timeout_s: float = 15.0,
               read_timeout_s: float = 60.0, keep_free_bytes: int = FREE_SPACE_MARGIN_BYTES) -> Path:
    """Download, verify and install ``entry``; returns its directory. Raises CatalogError with
    a message for the user; on any error nothing is installed (a partial download stays in
    ``.downloads/`` to be resumed, unless it is known to be bad)."""
    import aiohttp

    if not entry.verified and not allow_unverified:
        raise UnverifiedModelError(
            f"{entry.name}: the catalog has no sha256 for "
            f"{', '.join(f.name for f in entry.files if not f.sha256)} (unverified); "
            "nothing was downloaded. Pass --allow-unverified to install it anyway.")
    staging = models_dir / DOWNLOADS_DIR / entry.name
    await asyncio.to_thread(staging.mkdir, parents=True, exist_ok=True)
    with _exclusive(staging.with_name(entry.name + ".lock"), entry.name):
        _check_space(entry, staging, keep_free_bytes)
        timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            bar = _progress_bar(entry, staging, progress)
            try:
                for spec in entry.files:
                    await _fetch(session, spec, staging / (spec.name + ".part"), bar)
            finally:
                bar.close()
        for spec in entry.files:
            await _verify_part(spec, staging / (spec.name + ".part"))
        target = await asyncio.to_thread(_install, entry, staging, models_dir)
    log.info("model installed", model=entry.name, path=str(target))
    return target


@contextlib.contextmanager
def _exclusive(lock_path: Path, name: str):
    """One pull of a model at a time (two would write the same partial files)."""
    with lock_path.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CatalogError(f"another `companion models pull {name}` is running") from None
        yield


def _have(part: Path) -> int:
    return part.stat().st_size if part.exists() else 0


def _check_space(entry: CatalogEntry, staging: Path, keep_free: int) -> None:
    needed = sum(max((f.size or 0) - _have(staging / (f.name + ".part")), 0) for f in entry.files)
    free = shutil.disk_usage(staging).free
    if needed + keep_free > free:
        raise CatalogError(
            f"not enough disk space for {entry.name}: it needs {_mb(needed)} MB more and "
            f"{staging.parent} has {_mb(free)} MB free (keeping {_mb(keep_free)} MB "
            "spare); free some space and run the same command again")


def _progress_bar(entry: CatalogEntry, staging: Path, enabled: bool):
    from tqdm import tqdm

    done = sum(min(_have(staging / (f.name + ".part")), f.size or 0) for f in entry.files)
    return tqdm(total=entry.size or None, initial=done, unit="B", unit_scale=True,
                unit_divisor=1024, desc=entry.name, disable=not enabled, leave=False)


async def _fetch(session, spec: CatalogFile, part: Path, bar) -> None:
    """Download one file to ``part``, going on from its current length when the server can."""
    import aiohttp

    have = _have(part)
    if spec.size is not None and have >= spec.size:
        if have > spec.size:  # longer than the file can be: start over
            await asyncio.to_thread(part.unlink)
        else:
            return
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    host = urlsplit(spec.url).hostname
    try:
        async with session.get(spec.url, headers=headers) as response:
            if response.status == 200 and have:  # the server ignores Range: from the start
                bar.update(-have)
                have = 0
            elif response.status not in (200, 206):
                raise CatalogError(f"{spec.url}: the server answered HTTP {response.status}; "
                                   "nothing was installed")
            await _write_body(response, part, append=have > 0, bar=bar)
    except aiohttp.ClientConnectorError as exc:
        raise CatalogError(f"cannot reach {host} ({exc.os_error or exc}): is this device "
                           "online? Nothing was installed.") from None
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError, TimeoutError) as exc:
        got = _have(part)
        total = f" of {spec.size}" if spec.size else ""
        raise CatalogError(f"download of {spec.name} interrupted at {got}{total} bytes "
                           f"({type(exc).__name__}); run the same command again to resume. "
                           "Nothing was installed.") from None


async def _write_body(response, part: Path, *, append: bool, bar) -> None:
    fh = await asyncio.to_thread(part.open, "ab" if append else "wb")
    try:
        async for chunk in response.content.iter_any():  # what arrived, kept if cut off
            await asyncio.to_thread(fh.write, chunk)
            bar.update(len(chunk))
        await asyncio.to_thread(fh.flush)
        await asyncio.to_thread(os.fsync, fh.fileno())
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        fh.close()
        await asyncio.to_thread(part.unlink, missing_ok=True)
        raise CatalogError(f"no space left while writing {part.name} ({exc.strerror}); the "
                           "partial file was deleted and nothing was installed") from None
    finally:
        fh.close()


async def _verify_part(spec: CatalogFile, part: Path) -> None:
    if spec.size is not None and _have(part) < spec.size:  # the server closed early
        raise CatalogError(f"download of {spec.name} stopped at {_have(part)} of {spec.size} "
                           "bytes; run the same command again to resume. Nothing was installed.")
    problem = await asyncio.to_thread(check_file, part, spec)
    if problem is not None:
        await asyncio.to_thread(part.unlink, missing_ok=True)
        raise CatalogError(f"{spec.name} failed verification ({problem.split(': ', 1)[-1]}); "
                           "the download was deleted and nothing was installed")


def _install(entry: CatalogEntry, staging: Path, models_dir: Path) -> Path:
    """Name the verified parts, then swap the directory in with one rename."""
    for spec in entry.files:
        (staging / (spec.name + ".part")).replace(staging / spec.name)
    target = install_dir(models_dir, entry)
    previous = None
    if target.exists():
        previous = staging.with_name(f"{entry.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        target.replace(previous)
    staging.replace(target)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return target


def _mb(n: int) -> int:
    return round(n / (1 << 20))


# --- use ----------------------------------------------------------------------------------------

SETTING_FOR_KIND = {"llm": ("llm", "model"), "stt": ("stt", "model"), "tts": ("tts", "voice")}


def write_setting(config: Path, section: str, key: str, value: str) -> None:
    """Set ``section.key`` in a TOML settings file, keeping its comments and layout; the file
    is replaced in one rename, so a crash never leaves it half written."""
    import tomlkit

    document = tomlkit.parse(config.read_text()) if config.exists() else tomlkit.document()
    table: Any = document.get(section)
    if table is None:
        table = tomlkit.table()
        document[section] = table
    table[key] = value
    config.parent.mkdir(parents=True, exist_ok=True)
    scratch = config.with_name(config.name + ".tmp")
    scratch.write_text(tomlkit.dumps(document))
    scratch.replace(config)
