"""Sharing two CPU cores between models that run at the same time.

While a reply is spoken, the LLM keeps writing the next sentences on every core, and piper
has to synthesize the sentence the user is waiting for on the same cores. ``ComputeGate`` lets
latency-critical work (speech synthesis, transcription) run alone: background generation waits
at its next token while a priority section is open. Measured on 2 cores: the first sentence's
synthesis took 0.40 s inside the pipeline against 0.07-0.26 s alone before the gate.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ComputeGate:
    def __init__(self) -> None:
        self._open_sections = 0
        self._changed = threading.Condition()

    @contextmanager
    def priority(self) -> Iterator[None]:
        """Hold while doing work someone is waiting for (called in worker threads)."""
        with self._changed:
            self._open_sections += 1
        try:
            yield
        finally:
            with self._changed:
                self._open_sections -= 1
                self._changed.notify_all()

    def wait_for_priority_work(self, timeout_s: float = 2.0) -> None:
        """Called by background work between steps: return at once when nothing has priority,
        else when it is done (or after ``timeout_s``, so nothing starves for good)."""
        with self._changed:
            if self._open_sections:
                self._changed.wait_for(lambda: self._open_sections == 0, timeout=timeout_s)

    @property
    def busy(self) -> bool:
        return self._open_sections > 0


def quiet_onnx_session_options(threads: int):
    """onnxruntime options for a model that shares the CPU and the memory: a fixed thread
    count, no spinning thread pool (idle ORT threads otherwise spin after each run and take
    cores from llama.cpp), no memory arena."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # no arena: it keeps the peak of the longest input for good (measured with piper: +240 MB
    # over five replies); freeing after each run costs little next to synthesis itself
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def release_free_memory() -> None:
    """Hand memory freed by the models back to the system (glibc keeps it in per-thread arenas
    otherwise; measured: 622-732 MB after each of five turns with this, 667-878 MB without).
    A no-op where the C library has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
