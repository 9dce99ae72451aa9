"""`companion models`: pull from a loopback HTTP server (never the internet), verify, use.

Every failure must leave nothing half-installed: the model directory is complete or absent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from aiohttp import web

from companion.model_catalog import (
    CatalogError,
    UnverifiedModelError,
    load_catalog,
    pull,
    verify_installed,
)
from companion.models import ModelRegistry
from companion.settings import PROJECT_ROOT, load_settings
from tests.conftest import until

WEIGHTS = os.urandom(300_000)
CONFIG = b'{"audio": {"sample_rate": 22050}}'


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Origin:
    """A loopback file server: ``/files/`` answers Range requests (aiohttp's FileResponse),
    ``/cut/`` sends half of the file and drops the connection; every request is recorded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.cut_when = lambda: True  # /cut/ drops the connection once this holds

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/files/{name}", self.serve)
        app.router.add_get("/cut/{name}", self.cut)
        return app

    async def serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, request.headers.get("Range")))
        path = self.root / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def cut(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, request.headers.get("Range")))
        data = (self.root / request.match_info["name"]).read_bytes()
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        await until(self.cut_when)
        request.transport.close()  # the network goes away mid-file
        return response


@pytest.fixture
async def origin(tmp_path, aiohttp_server):
    files = tmp_path / "origin"
    files.mkdir()
    (files / "voice.onnx").write_bytes(WEIGHTS)
    (files / "voice.onnx.json").write_bytes(CONFIG)
    served = Origin(files)
    server = await aiohttp_server(served.app())
    served.base = f"http://127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    return served


def write_catalog(models_dir: Path, base: str, *, route: str = "files", weights_sha: str | None = None,
                  size: int | None = len(WEIGHTS), with_sha: bool = True) -> None:
    models_dir.mkdir(parents=True, exist_ok=True)
    (models_dir / "manifest.toml").write_text((PROJECT_ROOT / "models/manifest.toml").read_text())
    weights_sha = weights_sha or sha(WEIGHTS)
    size_line = f"size = {size}\n" if size is not None else ""
    sha_line = f'sha256 = "{weights_sha}"\n' if with_sha else ""
    (models_dir / "catalog.toml").write_text(f"""
[models.test-voice]
aliases = ["tv"]
kind = "tts"
display_name = "Test voice"
ram_mb = 150
[[models.test-voice.files]]
name = "test-voice.onnx"
url = "{base}/{route}/voice.onnx"
{size_line}{sha_line}
[[models.test-voice.files]]
name = "test-voice.onnx.json"
url = "{base}/files/voice.onnx.json"
size = {len(CONFIG)}
sha256 = "{sha(CONFIG)}"
""")


def nothing_installed(models_dir: Path) -> bool:
    return not (models_dir / "test-voice").exists()


async def pull_test_voice(models_dir: Path, **kwargs) -> Path:
    entry = load_catalog(models_dir / "catalog.toml").get("test-voice")
    async with asyncio.timeout(20):
        return await pull(entry, models_dir, progress=False, **kwargs)


async def test_pull_installs_verified_files_under_the_models_dir(tmp_path, origin):
    models = tmp_path / "models"
    write_catalog(models, origin.base)
    target = await pull_test_voice(models)
    assert target == models / "test-voice"
    assert (target / "test-voice.onnx").read_bytes() == WEIGHTS
    assert not (models / ".downloads" / "test-voice").exists()
    entry = load_catalog(models / "catalog.toml").get("tv")
    assert verify_installed(models, entry) == []
    resolved = ModelRegistry(models).resolve("test-voice", kind="tts")  # usable by name at once
    assert resolved.file == target / "test-voice.onnx"
    assert resolved.config_file == target / "test-voice.onnx.json"


async def test_a_wrong_sha256_installs_nothing_and_deletes_the_download(tmp_path, origin):
    models = tmp_path / "models"
    write_catalog(models, origin.base, weights_sha="0" * 64)
    with pytest.raises(CatalogError, match="failed verification"):
        await pull_test_voice(models)
    assert nothing_installed(models)
    assert not (models / ".downloads" / "test-voice" / "test-voice.onnx.part").exists()


async def test_an_interrupted_download_resumes_where_it_stopped(tmp_path, origin):
    models = tmp_path / "models"
    write_catalog(models, origin.base, route="cut")
    part = models / ".downloads" / "test-voice" / "test-voice.onnx.part"
    origin.cut_when = lambda: part.exists() and part.stat().st_size > 0  # some bytes arrived
    with pytest.raises(CatalogError, match="run the same command again to resume"):
        await pull_test_voice(models)
    kept = part.stat().st_size
    assert 0 < kept < len(WEIGHTS) and nothing_installed(models)

    write_catalog(models, origin.base)  # the network is back
    await pull_test_voice(models)
    assert ("/files/voice.onnx", f"bytes={kept}-") in origin.requests
    assert (models / "test-voice" / "test-voice.onnx").read_bytes() == WEIGHTS


async def test_not_enough_disk_space_is_refused_before_downloading(tmp_path, origin):
    models = tmp_path / "models"
    write_catalog(models, origin.base, size=1 << 60)
    with pytest.raises(CatalogError, match="not enough disk space"):
        await pull_test_voice(models)
    assert origin.requests == [] and nothing_installed(models)


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 256 kB filesystem (tmpfs), to run out of space in the middle of a file."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


async def test_a_disk_that_fills_up_mid_file_leaves_nothing_behind(small_filesystem, origin):
    models = small_filesystem / "models"
    write_catalog(models, origin.base, size=None)  # size unknown: the free-space check can't help
    with pytest.raises(CatalogError, match="no space left"):
        await pull_test_voice(models, keep_free_bytes=0)
    assert nothing_installed(models)
    assert not list((models / ".downloads" / "test-voice").glob("*.part"))


async def test_no_network_is_a_clear_error(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    models = tmp_path / "models"
    write_catalog(models, f"http://127.0.0.1:{port}")
    with pytest.raises(CatalogError, match=r"cannot reach 127\.0\.0\.1"):
        await pull_test_voice(models)
    assert nothing_installed(models)


async def test_a_missing_file_on_the_server_is_a_clear_error(tmp_path, origin):
    models = tmp_path / "models"
    write_catalog(models, origin.base)
    text = (models / "catalog.toml").read_text().replace("/voice.onnx\"", "/gone.onnx\"", 1)
    (models / "catalog.toml").write_text(text)
    with pytest.raises(CatalogError, match="HTTP 404"):
        await pull_test_voice(models)
    assert nothing_installed(models)


async def test_an_entry_without_a_hash_needs_allow_unverified(tmp_path, origin):
    models = tmp_path / "models"
    write_catalog(models, origin.base, with_sha=False)
    with pytest.raises(UnverifiedModelError, match="--allow-unverified"):
        await pull_test_voice(models)
    assert origin.requests == [] and nothing_installed(models)
    await pull_test_voice(models, allow_unverified=True)
    assert not nothing_installed(models)


# --- the command line ------------------------------------------------------------------------


async def models_cli(*argv: str, models: Path, capsys) -> tuple[int, str, str]:
    """`companion models ...` in this process (the origin server runs in this loop)."""
    from companion.__main__ import parse_args
    from companion.models_cli import cmd_models

    capsys.readouterr()
    args = parse_args(["models", *argv])
    code = await cmd_models(load_settings(None, models_dir=models), args)
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_cli_pull_verify_use_and_list(tmp_path, origin, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    models = tmp_path / "models"
    write_catalog(models, origin.base)
    config = tmp_path / "companion.toml"
    config.write_text("# my device\n[tts]\nthreads = 1  # keep a core free\n")
    code, _, err = await models_cli("use", "tv", models=models, capsys=capsys)
    assert code == 1 and "companion models pull test-voice" in err

    code, _, err = await models_cli("pull", "tv", "--no-progress", models=models,
                                    capsys=capsys)
    assert code == 0, err
    code, out, _ = await models_cli("verify", "test-voice", models=models,
                                    capsys=capsys)
    assert code == 0 and "ok   test-voice" in out

    code, _, err = await models_cli("use", "tv", models=models, capsys=capsys)
    assert code == 0, err
    text = config.read_text()
    assert "# keep a core free" in text  # the user's comments survive
    assert tomllib.loads(text)["tts"] == {"threads": 1, "voice": "test-voice"}
    assert load_settings(config, models_dir=models).tts.voice == "test-voice"

    code, out, _ = await models_cli("list", "--json", models=models, capsys=capsys)
    rows = {row["name"]: row for row in json.loads(out)["models"]}
    assert rows["test-voice"]["installed"] and rows["test-voice"]["active"]
    assert rows["smollm2-135m-instruct"]["source"] == "bundled"

    (models / "test-voice" / "test-voice.onnx").write_bytes(b"corrupted")
    code, out, _ = await models_cli("verify", models=models, capsys=capsys)
    assert code == 1 and "FAIL test-voice" in out


def test_cli_unknown_model_is_one_line_and_exit_2(tmp_path):
    """As a user runs it: a real process, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run([sys.executable, "-m", "companion", "models", "pull", "nope"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("companion: unknown model 'nope'")


def test_the_shipped_catalog_is_complete_and_pinned():
    catalog = load_catalog(PROJECT_ROOT / "models/catalog.toml")
    names = set(catalog.entries)
    assert {"qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct", "llama-3.2-1b-instruct",
            "gemma-3-1b-it", "whisper-base.en", "whisper-small.en"} <= names
    assert sum(e.kind == "tts" for e in catalog.entries.values()) >= 2
    for entry in catalog.entries.values():
        assert entry.verified, entry.name  # every shipped file has a published sha256
        assert all(f.size and f.url.startswith("https://") for f in entry.files), entry.name
    # a 1.5B model does not fit beside the daemon on a 2 GB Pi 4; the 0.5B does
    assert catalog.get("qwen2.5-1.5b-instruct").fit("pi4-2gb") == "no"
    assert catalog.get("qwen2.5-0.5b-instruct").fit("pi4-2gb") == "ok"
    assert catalog.get("qwen2.5-1.5b-instruct").fit("pi5-8gb") == "ok"
