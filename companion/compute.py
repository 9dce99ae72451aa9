"""Sharing two CPU cores between models that run at the same time.

While a reply is spoken, the LLM keeps writing the next sentences on every core, and piper
has to synthesize the sentence the user is waiting for on the same cores. ``ComputeGate`` lets
latency-critical work (speech synthesis, transcription) run alone: background generation waits
at its next token while a priority section is open. Measured on 2 cores: the first sentence's
synthesis took 0.40 s inside the pipeline against 0.07-0.26 s alone before the gate.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any


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


class WorkerClosedError(RuntimeError):
    """The worker was closed before the job could run."""


class PriorityWorker:
    """One thread that runs submitted jobs one at a time, lowest priority number first (FIFO
    among equals), and lets a running job step aside for more urgent ones.

    llama.cpp must be called from one thread only (see ``LlamaCppChatModel``), so a reply the
    user waits for cannot run beside a long background generation: it has to go first. A job
    that takes long asks ``more_urgent(its_priority)`` between steps and, if so, calls
    ``run_more_urgent(its_priority)``, which runs those jobs here and now, on this same thread,
    before the job goes on."""

    def __init__(self, name: str, *, initializer: Callable[[], None] | None = None) -> None:
        self._changed = threading.Condition()
        self._queue: list[tuple[int, int, Future, Callable[[], Any]]] = []
        self._order = itertools.count()
        self._closed = False
        self._running: list[int] = []  # priorities of the jobs under way, innermost last
        self._thread = threading.Thread(target=self._serve, args=(initializer,), name=name,
                                        daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn: Callable[[], Any]) -> Future:
        """Queue ``fn``; its result (or exception) arrives on the returned future."""
        future: Future = Future()
        with self._changed:
            if self._closed:
                raise WorkerClosedError(f"{self._thread.name}: closed")
            heapq.heappush(self._queue, (int(priority), next(self._order), future, fn))
            self._changed.notify()
        return future

    def more_urgent(self, priority: int) -> bool:
        """True when a job with a lower priority number than ``priority`` is waiting."""
        with self._changed:
            return bool(self._queue) and self._queue[0][0] < priority

    def run_more_urgent(self, priority: int) -> int:
        """Run every waiting job more urgent than ``priority`` (call on the worker thread, from
        inside a job). Returns how many ran."""
        assert threading.current_thread() is self._thread, "only a running job steps aside"
        ran = 0
        while (job := self._pop(lambda p: p < priority, wait=False)) is not None:
            self._run(*job)
            ran += 1
        return ran

    @property
    def running(self) -> int | None:
        """The priority of the job that has the thread now (None: idle)."""
        running = self._running
        return running[-1] if running else None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new jobs, cancel the queued ones, and wait for the running one to end (a
        long job should check ``closed`` between steps)."""
        with self._changed:
            self._closed = True
            queued, self._queue = self._queue, []
            self._changed.notify_all()
        for _, _, future, _ in queued:
            future.cancel()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _pop(self, accept: Callable[[int], bool], *, wait: bool):
        with self._changed:
            while True:
                if self._queue and accept(self._queue[0][0]):
                    priority, _, future, fn = heapq.heappop(self._queue)
                    return priority, future, fn
                if self._closed or not wait:
                    return None
                self._changed.wait()

    def _serve(self, initializer: Callable[[], None] | None) -> None:
        if initializer is not None:
            initializer()
        while (job := self._pop(lambda p: True, wait=True)) is not None:
            self._run(*job)

    def _run(self, priority: int, future: Future, fn: Callable[[], Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        self._running.append(priority)
        try:
            result = fn()
        except BaseException as exc:  # the submitter raises it
            future.set_exception(exc)
        else:
            future.set_result(result)
        finally:
            self._running.pop()


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
