"""Model files under faults, in real processes: `companion models pull` SIGKILLed half-way
through a download from a slow loopback server (nothing half-installed; the same command
resumes, finishes and verifies); a model missing or corrupt when `companion check` and
`companion run` start (both name the file and the fix; the daemon answers /health and says
why /ready is 503)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from aiohttp import web

from companion.settings import PROJECT_ROOT
from tests.conftest import until
from tests.processes import Fleet, run_companion
from tests.processes import until as until_blocking
from tests.test_model_catalog import WEIGHTS, Origin, nothing_installed, write_catalog


class SlowOrigin(Origin):
    """``/slow/`` sends the first half of the file, then holds the connection until
    ``release`` is set; once released it serves the file (and Range requests) normally."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = asyncio.Event()
        self.held = asyncio.Event()

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/slow/{name}", self.slow)
        return app

    async def slow(self, request: web.Request) -> web.StreamResponse:
        if self.release.is_set():
            return await self.serve(request)
        self.requests.append((request.path, request.headers.get("Range")))
        data = (self.root / request.match_info["name"]).read_bytes()
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        self.held.set()
        await self.release.wait()
        return response


@pytest.fixture
async def slow_origin(tmp_path, aiohttp_server) -> SlowOrigin:
    files = tmp_path / "origin"
    files.mkdir()
    (files / "voice.onnx").write_bytes(WEIGHTS)
    (files / "voice.onnx.json").write_bytes(b'{"audio": {"sample_rate": 22050}}')
    served = SlowOrigin(files)
    server = await aiohttp_server(served.app())
    served.base = f"http://127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    return served


async def companion(*args: str, models: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "COMPANION_MODELS_DIR": str(models), "COMPANION_LOG_FORMAT": "json",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "companion", *args, env=env, cwd=models.parent,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


async def finish(proc: asyncio.subprocess.Process, limit_s: float = 60) -> tuple[int, str]:
    async with asyncio.timeout(limit_s):
        out, _ = await proc.communicate()
    return proc.returncode, out.decode(errors="replace")


async def test_kill_in_the_middle_of_a_models_pull(tmp_path: Path, slow_origin: SlowOrigin):
    models = tmp_path / "models"
    write_catalog(models, slow_origin.base, route="slow")
    part = models / ".downloads" / "test-voice" / "test-voice.onnx.part"
    puller = await companion("models", "pull", "test-voice", "--no-progress", models=models)
    try:
        async with asyncio.timeout(60):
            await slow_origin.held.wait()  # half the file sent, the rest held back
        # what the server sent is on disk, give or take the writer's buffer (8 KiB)
        await until(lambda: part.exists() and part.stat().st_size >= len(WEIGHTS) // 2 - 8192,
                    30, what="the first half written")
    finally:
        puller.send_signal(signal.SIGKILL)
        await finish(puller)
    assert nothing_installed(models)  # no directory, no half model
    kept = part.stat().st_size
    assert 0 < kept < len(WEIGHTS)

    slow_origin.release.set()
    code, out = await finish(await companion("models", "pull", "test-voice", "--no-progress",
                                             models=models))
    assert code == 0, out
    assert "installed test-voice" in out
    assert (models / "test-voice" / "test-voice.onnx").read_bytes() == WEIGHTS
    assert ("/slow/voice.onnx", f"bytes={kept}-") in slow_origin.requests  # resumed, not redone
    assert not part.exists()
    code, out = await finish(await companion("models", "verify", "test-voice", models=models))
    assert code == 0 and "ok   test-voice" in out, out


# --- a model file missing or corrupt at start ---------------------------------------------------

LLM = "smollm2-135m-instruct"


def broken_models(models: Path, how: str) -> tuple[str, str]:
    """A models dir (a copy of the manifest) where the LLM is missing (its package looks
    uninstalled) or corrupt (a cut-short copy in models/<name>/, which wins over the package);
    the installed model files are never touched. Returns (the file, what the fix says)."""
    from companion.models import ModelRegistry

    models.mkdir()
    manifest = (PROJECT_ROOT / "models" / "manifest.toml").read_text()
    entry = ModelRegistry(PROJECT_ROOT / "models").resolve(LLM)
    if how == "missing":
        module = f'module = "{entry.entry.module}"'
        assert manifest.count(module) == 1
        manifest = manifest.replace(module, 'module = "no_such_package_here"')
        fix = entry.entry.how_to_install
    else:
        (models / LLM).mkdir()
        with entry.file.open("rb") as whole:
            (models / LLM / entry.file.name).write_bytes(whole.read(1 << 20))
        fix = entry.entry.how_to_install
    (models / "manifest.toml").write_text(manifest)
    return str(models / LLM / entry.file.name), fix


@pytest.mark.models
@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_a_missing_or_corrupt_model_at_start_is_named_with_its_fix(tmp_path: Path, how: str,
                                                                    fleet: Fleet):
    models = tmp_path / "models"
    file, fix = broken_models(models, how)
    env = {"COMPANION_MODELS_DIR": str(models), "COMPANION_DATA_DIR": str(tmp_path / "data")}
    checked = run_companion("check", "--skip", "audio,gpio", env=env)
    assert checked.returncode == 1, checked.stdout
    failed = [line for line in checked.stdout.splitlines() if line.startswith("[FAIL]")]
    words = "not found" if how == "missing" else "corrupt"
    assert any(file in line and fix in line and words in line for line in failed), checked.stdout

    fleet.start_daemon("kitchen", plane=False, env={"COMPANION_MODELS_DIR": str(models)})
    until_blocking(lambda: fleet.get("kitchen", "/health")[0] == 200, 60, "/health")

    def not_ready() -> dict | None:
        status, body = fleet.get("kitchen", "/ready")
        return body["error"]["details"] if status == 503 and "load_error" in str(body) else None

    reason = until_blocking(not_ready, 120, "/ready 503 with the reason")["load_error"]
    assert file in reason and fix in reason and words in reason, reason
    logged = fleet.wait_log("kitchen", "component failed to load", component="llm")
    assert all(w in logged["error"] for w in (file, fix, words)), logged
    assert fleet.get("kitchen", "/health")[0] == 200
    assert fleet.procs["kitchen"].poll() is None  # stays up and says what is wrong: no restarts
