"""Runs handlers for claimed jobs and hands each outcome to the completer.

The executor owns the job task group and the count of busy slots; the producer asks it how
many slots are free (the claim batch size) and waits on :attr:`slot_freed` when it is full.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from pgqueue.app import App, JobType
from pgqueue.dsn import dumps
from pgqueue.job import Job, Result
from pgqueue.worker.completer import Completer
from pgqueue.worker.wake import Wake


@dataclass(frozen=True, slots=True)
class _Attempt:
    """What a handler run produced: JSON text to store, or an error to fail with."""

    result: str | None = None
    next_jobs: str | None = None
    error: str | None = None


class Executor:
    """Runs up to ``concurrency`` handlers at once, in a task group the worker provides."""

    def __init__(
        self,
        app: App,
        completer: Completer,
        concurrency: int,
        logger: logging.Logger,
        wake: Wake,
    ) -> None:
        self.app = app
        self.wake = wake
        self.completer = completer
        self.concurrency = concurrency
        self.logger = logger
        self.running: dict[int, Job] = {}
        self.slot_freed = Wake()
        self.idle = Wake()
        # Plain-def handlers need their own limiter: anyio's default thread pool has 40
        # tokens, which would silently cap a larger --concurrency.
        self._threads = anyio.CapacityLimiter(concurrency)

    @property
    def free_slots(self) -> int:
        return self.concurrency - len(self.running)

    def start(self, task_group: anyio.abc.TaskGroup, job: Job) -> None:
        """Take one slot for ``job`` and run it in ``task_group``."""
        self.running[job.id] = job
        task_group.start_soon(self._run, job, name=f"pgqueue job {job.id}")

    async def _run(self, job: Job) -> None:
        started = time.monotonic()
        try:
            try:
                attempt = await self._attempt(job)
            except anyio.get_cancelled_exc_class():
                # Shutdown after the grace period: give the job back, attempt not counted.
                released = await self.completer.release(job)
                self._log(job, "released" if released else "lease lost", started)
                raise
            await self._record(job, attempt, time.monotonic() - started)
        except Exception:
            self.logger.exception(
                "job %d: could not record its outcome; stale recovery will requeue it",
                job.id,
                extra={"job_id": job.id, "job_type": job.job_type},
            )
        finally:
            del self.running[job.id]
            self.slot_freed.set()
            if job.scope is not None:
                # The next job of this scope became claimable, and no NOTIFY says so.
                self.wake.set()
            if not self.running:
                self.idle.set()

    async def _attempt(self, job: Job) -> _Attempt:
        """Run the handler under its timeout; turn everything it does into an _Attempt."""
        job_type = self.app.job_types.get(job.job_type)
        if job_type is None:
            known = ", ".join(sorted(self.app.job_types)) or "none"
            return _Attempt(
                error=f"no handler for job type {job.job_type!r} in this worker"
                f" (registered: {known})"
            )
        if job_type.timeout is None:  # no cancel scope on the common path: it costs per job
            return await self._invoke(job_type, job)
        with anyio.move_on_after(job_type.timeout):
            return await self._invoke(job_type, job)
        return _Attempt(error=f"timed out after {job_type.timeout:g}s")

    async def _invoke(self, job_type: JobType, job: Job) -> _Attempt:
        try:
            if job_type.is_async:
                value = await job_type.handler(job)
            else:
                value = await anyio.to_thread.run_sync(
                    job_type.handler, job, abandon_on_cancel=True, limiter=self._threads
                )
        except Exception as exc:
            return _Attempt(error="".join(traceback.format_exception(exc)).rstrip())
        return _encode(value, self.app)

    async def _record(self, job: Job, attempt: _Attempt, duration: float) -> None:
        if attempt.error is None:
            try:
                held = await self.completer.complete(job, attempt.result, attempt.next_jobs)
            except Exception as exc:  # e.g. a result PostgreSQL cannot store, a bad spec
                attempt = _Attempt(error=f"could not record the result: {exc}")
            else:
                self._log(job, "succeeded" if held else "lease lost", duration=duration)
                return
        assert attempt.error is not None
        state = await self.completer.fail(job, attempt.error)
        outcome = "lease lost" if state is None else f"failed ({state})"
        self._log(job, outcome, duration=duration, error=attempt.error.splitlines()[-1])

    def _log(
        self,
        job: Job,
        outcome: str,
        started: float | None = None,
        *,
        duration: float | None = None,
        error: str | None = None,
    ) -> None:
        """One line per job outcome: id, type, attempt, duration (and the error's last line)."""
        if duration is None:
            duration = time.monotonic() - (started or time.monotonic())
        level = logging.INFO if outcome in ("succeeded", "released") else logging.WARNING
        self.logger.log(
            level,
            "job %d %s attempt %d/%d %s in %.1fms%s",
            job.id,
            job.job_type,
            job.attempts,
            job.max_attempts,
            outcome,
            duration * 1000,
            f": {error}" if error else "",
            extra={
                "job_id": job.id,
                "job_type": job.job_type,
                "queue": job.queue,
                "attempt": job.attempts,
                "outcome": outcome,
                "duration_ms": round(duration * 1000, 3),
            },
        )


def _encode(value: Any, app: App) -> _Attempt:
    """Encode a handler's return value, failing the attempt clearly if it is not JSON.

    Follow-ups of a registered type get its queue and max_attempts, as app.enqueue does.
    """
    next_jobs = None
    if isinstance(value, Result):
        if value.next_jobs is not None:
            next_jobs = [app.with_defaults(spec) for spec in value.next_jobs]
        value = value.value
    try:
        return _Attempt(
            result=None if value is None else dumps(value),
            next_jobs=None if next_jobs is None else dumps(next_jobs),
        )
    except (TypeError, ValueError) as exc:
        return _Attempt(error=f"handler result is not JSON-serialisable: {exc}")
