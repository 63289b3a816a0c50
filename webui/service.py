"""One generation at a time, from a bounded queue: what the API, the standalone UI and the A1111 tab share.

Every front-end submits jobs here (a callable doing one generation, a batch series or a benchmark) and waits on
the job's future, so two requests never run
the engine at once (one pipeline in memory, one machine's cores) and a full queue is refused at once instead of
piling up. Interrupt stops the running job at its next step boundary; the pipeline cache stays usable.
A `job_scope` wraps every job (the A1111/Forge tab uses it to take the host's queue and make room for its
pipeline). No gradio, FastAPI or host import here.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from ..optim.spec.errors import GenerationInterrupted, SDAccelError

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 16


class QueueFull(SDAccelError):
    """The bounded queue holds as many jobs as it may: the caller should retry later."""

    def __init__(self, size: int):
        self.size = size
        super().__init__(f"the generation queue is full ({size} waiting); retry when a job has finished, or start "
                         "the server with a larger --queue-size")


class ServiceClosed(SDAccelError):
    """The service was shut down; no job is taken any more."""


class BatchesInterrupted(GenerationInterrupted):
    """An interrupt during batch `len(results) + 1` of a series: `results` holds the batches finished before it,
    whose images A1111 returns too. (The batch that was running gives none: the engine stops without decoding.)"""

    def __init__(self, cause: GenerationInterrupted, results: list, batches: int):
        super().__init__(cause.step, cause.total)
        self.results = list(results)
        if batches > 1:
            self.args = (f"{cause}, in batch {len(results) + 1} of {batches} ({len(results)} finished, kept)",)


@dataclass
class Job:
    """One queued generation. `future` resolves to the engine's RunResult (or its exception)."""

    work: Callable  # work(progress, should_interrupt) -> result; progress(step, total)
    label: str = "txt2img"
    id: int = 0
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.time)
    step: int = 0
    total: int = 0
    started: float | None = None


def engine_job(spec, requests, *, fit: dict | None = None) -> Callable:
    """A job running the engine on each request in turn (A1111's n_iter batches); progress spans all of them.

    `fit` ({"budget", "quality", "tiny_vae"}) plans the optimizations for a memory budget first, inside the job:
    a profile that must be measured then runs in the queue, never beside another generation."""
    from ..optim.run.sampler import run

    requests = list(requests)

    def work(progress, should_interrupt):
        nonlocal spec, requests
        chosen = []
        if fit:
            from ..optim.bench.presets import resolve_preset
            from ..optim.plan.planner import plan_for

            spec, _, plan, _ = plan_for(spec, requests[0], fit["budget"], quality=fit.get("quality", "any"),
                                        tiny_vae=fit.get("tiny_vae", ""), say=log.info)
            requests = [resolve_preset(plan.preset).apply_request(request) for request in requests]
            chosen.append(f"fit to {fit['budget']}: {plan.preset}, expected {plan.expected_s:.1f} s and "
                          f"{plan.peak_mb:.0f} MB peak" + "".join(f"; {c.part} {c.psnr_db or float('inf'):.1f} dB"
                                                                 for c in plan.lossy_parts))
        results = []
        for i, request in enumerate(requests):
            def step(done, total, i=i):
                progress(i * total + done, len(requests) * total)
            try:
                results.append(run(spec, request, progress=step, should_interrupt=should_interrupt))
            except GenerationInterrupted as exc:
                raise BatchesInterrupted(exc, results, len(requests)) from exc
            results[-1].stats.notes.extend(chosen)
        return results

    work.spec = spec  # what the job will load, for a job scope that makes room for it (the A1111/Forge tab)
    return work


class GenerationService:
    """A worker thread running queued jobs in order, one at a time."""

    def __init__(self, *, queue_size: int = DEFAULT_QUEUE_SIZE, job_scope: Callable | None = None):
        """`job_scope(job)`: a context manager each job runs inside (its error fails that job only)."""
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.queue_size = queue_size
        self.job_scope = job_scope
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._interrupt = threading.Event()
        self._current: Job | None = None
        self._worker: threading.Thread | None = None
        self._closed = False
        self.completed = 0
        self.failed = 0

    # submitting -------------------------------------------------------------------------------------------
    def submit(self, work: Callable, *, label: str = "txt2img") -> Job:
        """Queue a job; raises QueueFull at once when `queue_size` jobs already wait."""
        with self._lock:
            if self._closed:
                raise ServiceClosed("the generation service has stopped")
            job = Job(work=work, label=label, id=next(self._ids))
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(self.queue_size) from None
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="sdaccel-generation", daemon=True)
                self._worker.start()
        return job

    def interrupt(self) -> bool:
        """Stop the running job at its next step (queued jobs still run). True if one was running."""
        with self._lock:
            if self._current is None:
                return False
            self._interrupt.set()
            return True

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, cancel the waiting ones, interrupt the running one and stop the worker."""
        with self._lock:
            self._closed = True
            worker = self._worker
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.future.cancel()
        self._interrupt.set()
        if worker is not None:
            self._queue.put(None)
            worker.join(timeout)

    # what is going on -------------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def state(self) -> dict:
        """The running job (id, label, step, total, elapsed) and the queue length, as plain data."""
        with self._lock:
            job = self._current
            running = None
            if job is not None:
                running = {"id": job.id, "label": job.label, "step": job.step, "total": job.total,
                           "started": job.started, "elapsed_s": time.time() - (job.started or time.time()),
                           "interrupting": self._interrupt.is_set()}
        return {"running": running, "waiting": self.waiting, "queue_size": self.queue_size,
                "completed": self.completed, "failed": self.failed}

    # the worker -------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._interrupt.clear()
                self._current = job
                job.started = time.time()

            def progress(step, total, job=job):
                job.step, job.total = step, total

            try:
                with (self.job_scope(job) if self.job_scope is not None else contextlib.nullcontext()):
                    result = job.work(progress, self._interrupt.is_set)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller, the worker goes on
                self.failed += 1
                job.future.set_exception(exc)
            else:
                self.completed += 1
                job.future.set_result(result)
            finally:
                with self._lock:
                    self._current = None
                    self._interrupt.clear()
