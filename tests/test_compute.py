"""PriorityWorker: the one thread that runs LLM work, most urgent first, with a running job
stepping aside for more urgent work. Plain Python jobs stand in for llama.cpp calls here; the
same worker under the real model is tested in test_llm_real.py."""

from __future__ import annotations

import threading

import pytest

from companion.compute import PriorityWorker, WorkerClosedError
from companion.stages.llm import Priority

LIMIT_S = 5.0


def _blocked_worker() -> tuple[PriorityWorker, threading.Event]:
    """A worker whose thread is held by a first job until the returned event is set."""
    worker = PriorityWorker("test-worker")
    release, running = threading.Event(), threading.Event()

    def hold() -> None:
        running.set()
        assert release.wait(LIMIT_S)

    worker.submit(Priority.VOICE, hold)
    assert running.wait(LIMIT_S)
    return worker, release


def test_waiting_jobs_run_most_urgent_first_and_in_order_among_equals() -> None:
    worker, release = _blocked_worker()
    ran: list[str] = []
    jobs = [("background", Priority.BACKGROUND), ("http", Priority.INTERACTIVE),
            ("voice-1", Priority.VOICE), ("voice-2", Priority.VOICE)]
    futures = [worker.submit(priority, lambda name=name: ran.append(name))
               for name, priority in jobs]
    release.set()
    for future in futures:
        future.result(LIMIT_S)
    assert ran == ["voice-1", "voice-2", "http", "background"]
    worker.close(LIMIT_S)


def test_a_running_job_steps_aside_for_more_urgent_work_on_the_same_thread() -> None:
    worker = PriorityWorker("test-worker")
    events: list[str] = []
    threads: set[int] = set()
    started = threading.Event()

    def long_background_job() -> str:
        threads.add(threading.get_ident())
        events.append("background-start")
        started.set()
        for _ in range(int(LIMIT_S / 0.001)):  # one "token" per step, until urgent work comes
            if worker.more_urgent(Priority.BACKGROUND):
                assert not worker.more_urgent(Priority.VOICE)  # nothing beats VOICE
                ran = worker.run_more_urgent(Priority.BACKGROUND)
                events.append(f"background-resumed-after-{ran}")
                return "finished"
            threading.Event().wait(0.001)
        return "never stepped aside"

    def voice_job() -> None:
        threads.add(threading.get_ident())
        events.append("voice")

    background = worker.submit(Priority.BACKGROUND, long_background_job)
    assert started.wait(LIMIT_S)
    voice = worker.submit(Priority.VOICE, voice_job)
    voice.result(LIMIT_S)
    assert background.result(LIMIT_S) == "finished"
    assert events == ["background-start", "voice", "background-resumed-after-1"]
    assert len(threads) == 1  # llama.cpp is only ever called from one thread
    worker.close(LIMIT_S)


def test_only_a_job_on_the_worker_thread_can_step_aside() -> None:
    worker = PriorityWorker("test-worker")
    with pytest.raises(AssertionError):
        worker.run_more_urgent(Priority.BACKGROUND)
    worker.close(LIMIT_S)


def test_close_cancels_queued_work_ends_the_thread_and_refuses_more() -> None:
    worker, release = _blocked_worker()
    queued = worker.submit(Priority.BACKGROUND, lambda: None)
    closing = threading.Thread(target=worker.close, args=(LIMIT_S,))
    closing.start()
    for _ in range(int(LIMIT_S / 0.001)):  # close() has taken the queue: let the job end
        if worker.closed:
            break
        threading.Event().wait(0.001)
    release.set()
    closing.join(LIMIT_S)
    assert queued.cancelled() and not worker.alive
    with pytest.raises(WorkerClosedError):
        worker.submit(Priority.VOICE, lambda: None)


def test_a_failing_job_hands_its_error_to_the_submitter_and_the_worker_goes_on() -> None:
    worker = PriorityWorker("test-worker")

    def fail() -> None:
        raise ValueError("bad prompt")

    with pytest.raises(ValueError, match="bad prompt"):
        worker.submit(Priority.INTERACTIVE, fail).result(LIMIT_S)
    assert worker.submit(Priority.INTERACTIVE, lambda: 42).result(LIMIT_S) == 42
    worker.close(LIMIT_S)
