"""llama-cpp-python's own OpenAI-compatible server in a child process, on loopback.

Used by the remote-backend tests and benchmarks: the "machine in the house" serving the same
GGUF the device runs, so local and remote answers can be compared token for token.
(`pip install "llama-cpp-python[server]"`: fastapi, uvicorn, sse-starlette, starlette-context.)
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def default_gguf(models_dir: Path | None = None, name: str = "smollm2-135m-instruct") -> Path:
    from companion.models import ModelRegistry
    from companion.settings import PROJECT_ROOT

    return ModelRegistry(models_dir or PROJECT_ROOT / "models").resolve(name, kind="llm").file


class LlamaServer:
    """``start()`` returns once ``/v1/models`` answers; ``kill()`` is SIGKILL (a crash)."""

    def __init__(self, gguf: Path | None = None, *, port: int | None = None, threads: int = 2,
                 context_length: int = 2048) -> None:
        self.gguf = gguf or default_gguf()
        self.port = port or free_port()
        self.threads = threads
        self.context_length = context_length
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None

    def start(self, limit_s: float = 90.0, *, warm: bool = True) -> LlamaServer:
        """Start and wait until it answers; ``warm`` also runs a one-token completion, so the
        first real request does not pay for paging the model in."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf),
             "--host", "127.0.0.1", "--port", str(self.port),
             "--n_ctx", str(self.context_length), "--n_threads", str(self.threads),
             "--verbose", "false"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with code {self.process.returncode}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=1) as answer:
                    if answer.status == 200:
                        if warm:
                            self._complete_one_token(limit_s)
                        return self
            time.sleep(0.1)  # a child process starting up: nothing to wait on but its port
        self.kill()
        raise TimeoutError(f"llama_cpp.server did not answer within {limit_s} s")

    def _complete_one_token(self, limit_s: float) -> None:
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=limit_s) as answer:
            answer.read()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
