"""Runs handlers for claimed jobs and hands each outcome to the completer.

The executor owns ``concurrency`` long-lived runner tasks, fed from a queue, and the count
of busy slots; the producer asks it how many slots are free (the claim batch size), hands it
the jobs it claimed with :meth:`Executor.start`, and waits on :attr:`slot_freed` when it is
full. A slot is a running handler: it frees when the handler returns. A failure or release
is written by the runner before it lets go of the slot; a success goes to the completer's
flusher and the runner takes the next job at once, so claiming the next jobs overlaps with
writing the last ones (the job stays ``running`` under this worker's heartbeat until its
success lands). Unwritten successes are capped: past ``max_unwritten`` the producer stops
claiming until the flusher catches up.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import logging
import math
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.abc
import asyncpg

from pgqueue.app import App, JobType
from pgqueue.dsn import dumps
from pgqueue.error_line import error_line
from pgqueue.job import (
    Job,
    Result,
    Snooze,
    _abort_check,
    _current_job,
    _progress_saver,
    as_delay,
)
from pgqueue.worker import bounded
from pgqueue.worker.completer import (
    BOUNDED_LOCK_WAIT,
    GIVEN_UP,
    MAX_BATCH,
    UNKNOWN,
    WRITE_TIMEOUT,
    Completer,
    Success,
)
from pgqueue.worker.wake import Wake

_OUTCOME = "job %d %s attempt %d/%d %s in %.1fms%s"
# On a pooled connection, whose JSON codec encodes the value. Its lock wait is bounded like an
# outcome write's: a row another transaction keeps locked (an operator's SELECT ... FOR
# UPDATE) fails the save in the handler instead of holding a pooled connection, which claims
# and outcome writes need, for as long as the lock lasts.
_SAVE_PROGRESS = (
    "SELECT pgqueue.save_progress(job_id => $1, worker => $2, progress => $3)"
    f" FROM {BOUNDED_LOCK_WAIT}"
)
ABORTED = "aborted: pgqueue.abort() was called for this job while it ran"
# The largest JSON text of a result (or of next_jobs) a handler may return: PostgreSQL's
# largest jsonb value (2^28 - 1 bytes; the text of one is about as long). Larger, the
# database refused it, or, past its 1 GB message limit, dropped the connection.
MAX_JSON_TEXT = (1 << 28) - 1
# Logged at INFO; any other outcome at WARNING.
_QUIET = ("succeeded", "released", "snoozed")
_STILL_HELD = (
    "job %d: claimed again (attempt %d) while this worker still holds its earlier attempt,"
    " whose lease had gone stale; not run twice: the earlier attempt's outcome settles it"
)
_SETTLED_MEANWHILE = (
    "job %d: claimed again (attempt %d) while its earlier attempt here was being settled;"
    " not started: that outcome may have landed on this claim (if it did not, the claim is"
    " released and the job runs again)"
)


@dataclass(frozen=True, slots=True)
class _Attempt:
    """What a handler run produced: JSON text to store, an error to fail with, or how long
    to snooze the job for."""

    result: str | None = None
    next_jobs: str | None = None
    error: str | None = None
    snooze: datetime.timedelta | None = None


class Executor:
    """Runs up to ``concurrency`` handlers at once, in runner tasks the worker starts."""

    def __init__(
        self,
        app: App,
        completer: Completer,
        concurrency: int,
        logger: logging.Logger,
        wake: Wake,
        aborts: Wake | None = None,
    ) -> None:
        self.app = app
        self.wake = wake
        self.completer = completer
        self.concurrency = concurrency
        self.logger = logger
        # Every job holding a slot: claimed, and its handler not yet returned (or not yet
        # started). Its success may still be unwritten after it leaves: see the completer.
        self.running: dict[int, Job] = {}
        # Every job this worker holds: from its claim until its outcome is written (or
        # given up). What the database shows running under this worker and is not here was
        # claimed by a claim whose reply never arrived (see Producer._release_lost_claims).
        self.held: set[int] = set()
        # Held jobs claimed again and not started a second time (see start), or perhaps
        # claimed again by a claim whose reply was lost (see claim_lost), and whether one
        # of them has since been settled, so that the producer must look for a claim left
        # to nobody (Producer._release_lost_claims).
        self._claimed_back: set[int] = set()
        # While a claim is under way (see claim_sent): the held jobs settled since it was sent.
        self._settled_in_claim: set[int] | None = None
        self.sweep_needed = False
        # Jobs whose outcome PostgreSQL refused to record, by id: how many times in a row
        # (see _hold_back_unrecorded); an entry goes once an outcome of the job is written.
        self.unrecorded: dict[int, int] = {}
        # Running jobs whose abort this worker has heard of (see abort), and the tasks of the
        # async handlers running now, so that one can be cancelled; for each job whose
        # handler's task was cancelled here, the cancellation is taken back once it is
        # handled (see _invoke), since anyio counts a task's pending cancellations.
        self.aborting: set[int] = set()
        self._handler_tasks: dict[int, asyncio.Task[Any]] = {}
        self._abort_sent: set[int] = set()
        # Jobs the last read of the requests named that this worker did not hold yet, and
        # the reader to wake when one of them starts here (see abort).
        self._named_elsewhere: set[int] = set()
        self._abort_wake = aborts if aborts is not None else Wake()
        self.max_unwritten = max(concurrency, MAX_BATCH)
        self.slot_freed = Wake()
        self.idle = Wake()
        # Wake the producer when the last held job's outcome is written (--until-empty: its
        # jobs may have made others due, and a claim that finds none then ends the worker).
        self.wake_when_idle = False
        # Plain-def handlers need their own limiter: anyio's default thread pool has 40
        # tokens, which would silently cap a larger --concurrency.
        self._threads = anyio.CapacityLimiter(concurrency)
        # Saves of progress share the pool with claims and outcome writes: at most half of it.
        self._saves = anyio.CapacityLimiter(max(1, min(concurrency, 10) // 2))
        # Plain-def handlers running now: shutdown cannot cancel them, only wait (see _invoke).
        self.in_threads = 0
        # Claimed jobs no runner has taken yet. An asyncio queue, not anyio's primitives:
        # each job wakes exactly one waiting runner, for the price of one future (an anyio
        # Event is several times dearer to create and to wait on, and runners wait once per
        # job). asyncpg ties the worker to asyncio anyway. A job leaves the queue
        # only in a runner that is running: a runner cancelled after its wake-up leaves the
        # job and passes the wake-up on, so none is lost at shutdown.
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        completer.attach(self._recorded, self._refused)

    @property
    def free_slots(self) -> int:
        if self.completer.unwritten >= self.max_unwritten:
            return 0  # backpressure: let the flusher catch up before claiming more
        return self.concurrency - len(self.running)

    def start_runners(self, task_group: anyio.abc.TaskGroup) -> None:
        """Start the ``concurrency`` runners; cancelling ``task_group`` releases their jobs."""
        for n in range(self.concurrency):
            task_group.start_soon(self._runner, name=f"pgqueue runner {n}")

    def start(self, job: Job) -> None:
        """Take one slot for ``job`` and hand it to a runner.

        A job this worker still holds is not started again. Leases are fenced by worker, not
        by attempt: if this worker's lease on a job went stale (an operator lowered
        ``stale_after`` below the heartbeat period, or no heartbeat landed in time) while its
        handler ran or its success waited to be written, stale recovery queued the job again
        and this worker may claim it back. The attempt still under way here then settles the
        new claim (its outcome is written against the row, which is running under this
        worker again), instead of a second run of the handler beside it. If that outcome
        was refused before the claim committed (its reply arriving only after), the new
        claim is left running under this worker with no attempt behind it: see
        :meth:`_written`.

        The earlier attempt may also settle while the claim's reply is on its way (see
        :meth:`claim_sent`): its outcome then landed on the new claim (the job is succeeded,
        failed, or queued again for anyone to claim) or was refused before the claim
        committed. The worker cannot tell which, so the claim is not started: a handler run
        now would run after the job's outcome was recorded, or beside another worker's run,
        and a claim left to nobody is released by the producer's next sweep. (A job whose
        failure was retried at once and taken by a claim already on its way looks the same:
        it is released and claimed again.)
        """
        settled = self._settled_in_claim is not None and job.id in self._settled_in_claim
        if job.id in self.held or settled:
            if settled:
                self._ask_for_sweep()
                why = _SETTLED_MEANWHILE
            else:
                self._claimed_back.add(job.id)
                why = _STILL_HELD
            self.logger.warning(
                why, job.id, job.attempts, extra={"job_id": job.id, "job_type": job.job_type}
            )
            return
        self.running[job.id] = job
        self.held.add(job.id)
        self._queue.put_nowait(job)
        if self._named_elsewhere and job.id in self._named_elsewhere:
            self._named_elsewhere.discard(job.id)
            self._abort_wake.set()  # an abort read named it before its claim's reply came

    @property
    def in_handlers(self) -> list[int]:
        """The jobs whose async handler is running (not: waiting for a runner, running in a
        thread, or having its outcome written)."""
        return sorted(self._handler_tasks)

    def claim_sent(self) -> None:
        """A claim is about to be sent: until :meth:`claim_handled`, the jobs whose outcome
        is written (or given up) are remembered, since the claim may take them back (see
        :meth:`start`)."""
        self._settled_in_claim = set()

    def claim_handled(self) -> None:
        """The claim's jobs are started (or it failed): stop remembering."""
        self._settled_in_claim = None

    def claim_lost(self) -> None:
        """A claim failed after it was sent: it may have committed, and taken back any job
        this worker holds. Each of them asks for a sweep once its outcome is written, as a
        claim back that was seen does (see :meth:`_written`)."""
        self._claimed_back |= self.held

    async def release_unstarted(self) -> None:
        """After the runners are gone: release the jobs still queued for them."""
        while not self._queue.empty():
            job = self._queue.get_nowait()
            try:
                released = await self.completer.release(job)
                self._log(job, _released(released), 0.0)
            except Exception:
                self._log_unrecorded(job)
            finally:
                self._written(job)
                self._free(job)

    async def settled(self) -> None:
        """Wait until no handler runs and every outcome is written."""
        while self.running:
            await self.idle.wait()
        await self.completer.flushed()

    def abort(self, job_ids: Iterable[int], seen: Mapping[int, Job]) -> None:
        """``pgqueue.abort()`` was called for these jobs, as a read of the requests sent
        when ``seen`` ran here says (see :mod:`pgqueue.worker.aborts`): stop their handlers.

        An async handler's task is cancelled, so the handler stops at what it awaits; the
        attempt then fails, and the database, which holds the request, ends the job
        cancelled. A plain ``def`` cannot be interrupted: ``job.abort_requested`` turns true
        for it to look at. A job not started yet is not started.

        Only the very attempts in ``seen`` are aborted: by the time the read's answer
        arrives, an aborted attempt may have ended, been retried and been claimed back here,
        and that attempt has no request. A job the read named that started here since, or
        that this worker does not hold yet (a claim whose reply is on its way), is read about
        again: at once for the first, when it starts for the second (see :meth:`start`)."""
        self._named_elsewhere = set()
        for job_id in job_ids:
            job = self.running.get(job_id)
            if job is None or seen.get(job_id) is not job:
                if job is not None:
                    self._abort_wake.set()  # a later attempt: has it a request of its own?
                elif job_id not in self.held:
                    self._named_elsewhere.add(job_id)
                continue
            if job_id in self.aborting:
                continue
            self.aborting.add(job_id)
            task = self._handler_tasks.get(job_id)
            self.logger.warning(
                "job %d: abort requested%s",
                job_id,
                # Else a plain def (it sees job.abort_requested), a job not started yet (it
                # will not be), or a handler that has just returned (its outcome is voided).
                "; cancelling its handler" if task is not None else "",
                extra={"job_id": job_id, "job_type": job.job_type},
            )
            if task is not None:
                self._abort_sent.add(job_id)
                task.cancel(ABORTED)

    def _abort_requested(self, job: Job) -> bool:
        """Job.abort_requested: for the attempt running here now, by the Job it was given."""
        return job.id in self.aborting and self.running.get(job.id) is job

    def _free(self, job: Job) -> None:
        """The job's handler is done (or the job was given back): free its slot."""
        self.aborting.discard(job.id)
        del self.running[job.id]
        self.slot_freed.set()
        if not self.running:
            self.idle.set()

    def _written(self, job: Job) -> None:
        """The job's outcome is in the database (or given up).

        For a job claimed back meanwhile (see :meth:`start`), the producer then looks for
        jobs running under this worker that it no longer holds, and releases them, before
        its next claim: the outcome may have landed on the new claim, or been refused
        before it, leaving it to nobody. While a claim is on its way the job is noted, so
        that the claim does not start it (see :meth:`claim_sent`).
        """
        self.held.discard(job.id)
        if self._settled_in_claim is not None:
            self._settled_in_claim.add(job.id)
        if job.id in self._claimed_back:
            self._claimed_back.discard(job.id)
            self._ask_for_sweep()
        self.slot_freed.set()  # the producer may be waiting on the unwritten cap
        if self.wake_when_idle and not self.held:
            self.wake.set()
        if job.scope is not None:
            # The next job of this scope became claimable, and no NOTIFY says so.
            self.wake.set()

    def _ask_for_sweep(self) -> None:
        """A job may be running under this worker with nobody behind it: have the producer
        look (Producer._release_lost_claims) before its next claim, and wake it for that."""
        self.sweep_needed = True
        self.wake.set()

    def ask_for_sweep(self) -> None:
        """The heartbeat renewed more leases than this worker holds: as
        :meth:`_ask_for_sweep`, also when every slot is busy (the producer then waits for
        a free one, which a job lost that way does not take)."""
        self._ask_for_sweep()
        self.slot_freed.set()

    async def _runner(self) -> None:
        _progress_saver.set(self._save_progress)  # this runner's context, its handlers' too
        _abort_check.set(self._abort_requested)
        get = self._queue.get
        while True:
            await self._run(await get())

    async def _run(self, job: Job) -> None:
        started = time.monotonic()
        handed_over = False  # a success goes to the flusher, which reports when it is written
        try:
            try:
                attempt = await self._attempt(job)
                task = asyncio.current_task()
                if task is not None and (task.cancelling() or getattr(task, "_must_cancel", False)):
                    await _take_back_own_cancellation(task)
            except anyio.get_cancelled_exc_class():
                # Shutdown after the grace period: give the job back, attempt not counted.
                released = await self.completer.release(job)
                self._log(job, _released(released), time.monotonic() - started)
                raise
            duration = time.monotonic() - started
            if job.id in self.aborting:  # heard before the handler returned: what it did is void
                attempt = _ABORTED
            if attempt.snooze is not None:
                await self._snooze(job, attempt.snooze, duration)
            elif attempt.error is None:
                self.completer.add_success(job, attempt.result, attempt.next_jobs, duration)
                handed_over = True
            else:
                await self._fail_or_fail_plainly(job, attempt.error, duration)
        except Exception as exc:
            await self._hold_back_unrecorded(job, exc)
        finally:
            if not handed_over:
                self._written(job)
            self._free(job)

    async def _save_progress(self, job: Job, progress: Any) -> bool:
        """Job.save_progress: only for the attempt whose handler runs here now, by the very
        Job it was given. The SQL fence is by worker, so without this a task that an earlier
        attempt left behind would overwrite the checkpoint of this worker's next attempt (or
        a handler that kept another running job's Job could write that one's)."""
        if self.running.get(job.id) is not job:
            return False
        async with self._saves:
            return await bounded.call(
                self.completer.pool,
                WRITE_TIMEOUT,
                _save,
                job.id,
                self.completer.worker_id,
                progress,
            )

    def _recorded(self, item: Success, held: bool | None) -> None:
        """Completer callback: a success was written (or fencing refused it, or it was given
        up at shutdown: None)."""
        job = item.job
        try:
            outcome = "succeeded" if held else "lease lost" if held is not None else _NOT_WRITTEN
            if self.unrecorded and held is not None:
                self.unrecorded.pop(job.id, None)
            self._log(job, outcome, item.duration)
        finally:
            self._written(job)

    async def _refused(self, item: Success, error: Exception) -> None:
        """Completer callback: PostgreSQL refused this success alone; fail the attempt."""
        job = item.job
        try:
            await self._fail_or_fail_plainly(
                job, f"could not record the result: {error}", item.duration
            )
        except Exception as exc:
            await self._hold_back_unrecorded(job, exc)
        finally:
            self._written(job)

    async def _snooze(self, job: Job, delay: datetime.timedelta, duration: float) -> None:
        """Snooze the job; if PostgreSQL refuses that (a trigger of yours, say), fail the
        attempt instead: given back at once, uncounted, it would run and snooze again in a
        loop that max_attempts never ends."""
        try:
            state = await self.completer.snooze(job, delay)
        except Exception as exc:
            self.logger.error(
                "job %d: could not snooze it (%s: %s); failing the attempt instead",
                job.id,
                type(exc).__name__,
                exc,
                extra={"job_id": job.id, "job_type": job.job_type},
            )
            await self._fail_or_fail_plainly(job, f"could not snooze the job: {exc}", duration)
            return
        if state == "queued":
            self._log(job, "snoozed", duration, f"runs again in {_seconds(delay)}")
        else:
            self._log(job, _snooze_outcome(state), duration)

    async def _fail(
        self, job: Job, error: str, duration: float, retry_in: datetime.timedelta | None
    ) -> None:
        error = _storable(error)
        state, runs_in = await self.completer.fail(job, error, retry_in)
        if self.unrecorded and state != GIVEN_UP:
            self.unrecorded.pop(job.id, None)
        # "failed (unknown)" when a retry's refusal may be the earlier try's own doing.
        if state is None:
            outcome = "lease lost"
        elif state == GIVEN_UP:
            outcome = f"failure {_NOT_WRITTEN}"
        else:
            outcome = f"failed ({state})"
        detail = error_line(error)
        if runs_in is not None:
            detail += f"; runs again in {_seconds(runs_in)}"
        self._log(job, outcome, duration, detail)

    def _retry_in(self, job: Job) -> datetime.timedelta | None:
        """The delay the job type's ``backoff`` gives this attempt's retry; None (the
        settings' backoff) without one, or if it fails: the failure must be recorded. Called
        on the event loop: a backoff must be quick."""
        job_type = self.app.job_types.get(job.job_type)
        if job_type is None or job_type.backoff is None:
            return None
        if job.attempts >= job.max_attempts or job.id in self.aborting:
            return None  # no retry follows: the job ends failed (or cancelled)
        try:
            return as_delay("backoff", job_type.backoff(job.attempts))
        except Exception:
            self.logger.exception(
                "job %d: the backoff of %r failed for attempt %d; retrying after the default"
                " backoff",
                job.id,
                job.job_type,
                job.attempts,
                extra={"job_id": job.id, "job_type": job.job_type},
            )
            return None

    async def _fail_or_fail_plainly(self, job: Job, error: str, duration: float) -> None:
        """Fail the attempt; if PostgreSQL refuses that failure (for its text, or a trigger of
        the operator's), record one whose text names only the refusal's class, so that the
        attempt still counts and max_attempts still ends a job that always fails so. Raises
        if that is refused too."""
        retry_in = self._retry_in(job)  # once: the type's backoff is the user's code
        try:
            await self._fail(job, error, duration, retry_in)
        except Exception as exc:
            self.logger.error(
                "job %d: could not record its failure (%s: %s); recording it without its text",
                job.id,
                type(exc).__name__,
                exc,
                extra={"job_id": job.id, "job_type": job.job_type},
            )
            plain = f"the attempt failed; its error could not be recorded ({type(exc).__name__})"
            await self._fail(job, plain, duration, retry_in)

    async def _hold_back_unrecorded(self, job: Job, refusal: Exception) -> None:
        """PostgreSQL refused to record the outcome (a trigger of yours, a settings row
        deleted by hand). The job is still running under this worker, whose heartbeat would
        keep its lease fresh for good: it is snoozed, its attempt not counted, for a delay
        that doubles with each refusal of the same job in a row, from
        :data:`UNRECORDED_DELAY` up to :data:`UNRECORDED_DELAY_CAP`. If the snooze is refused
        too, the producer's sweep releases it, to run again at once. Released at once every
        time, a job whose failure could never be recorded ran about ten times a second, with
        a traceback each."""
        refusals = self.unrecorded[job.id] = self.unrecorded.get(job.id, 0) + 1
        if len(self.unrecorded) > UNRECORDED_KEPT:  # jobs that went elsewhere since
            del self.unrecorded[next(iter(self.unrecorded))]
        delay = datetime.timedelta(
            seconds=min(UNRECORDED_DELAY_CAP, UNRECORDED_DELAY * 2 ** min(refusals - 1, 30))
        )
        extra = {"job_id": job.id, "job_type": job.job_type}
        try:
            state = await self.completer.snooze(job, delay)
        except Exception:
            self.logger.error(
                "job %d: could not record its outcome (%s: %s), nor hold it back; releasing"
                " it to run again",
                job.id,
                type(refusal).__name__,
                refusal,
                exc_info=refusal if refusals == 1 else None,
                extra=extra,
            )
            self._ask_for_sweep()
            return
        self.logger.error(
            "job %d: could not record its outcome (%s: %s; %d time(s) in a row): %s",
            job.id,
            type(refusal).__name__,
            refusal,
            refusals,
            f"runs again in {_seconds(delay)}" if state == "queued" else _snooze_outcome(state),
            exc_info=refusal if refusals == 1 else None,  # the traceback once per job
            extra=extra,
        )

    def _log_unrecorded(self, job: Job) -> None:
        """PostgreSQL refused to record the outcome. The job is still running under this
        worker, whose heartbeat would keep its lease fresh for good: have the producer's
        sweep release it (attempt not counted) so that it runs again."""
        self.logger.exception(
            "job %d: could not record its outcome; releasing it to run again",
            job.id,
            extra={"job_id": job.id, "job_type": job.job_type},
        )
        self._ask_for_sweep()

    async def _attempt(self, job: Job) -> _Attempt:
        """Run the handler under its timeout; turn everything it does into an _Attempt."""
        job_type = self.app.job_types.get(job.job_type)
        if job_type is None:
            known = ", ".join(sorted(self.app.job_types)) or "none"
            return _Attempt(
                error=f"no handler for job type {job.job_type!r} in this worker"
                f" (registered: {known})"
            )
        if job.id in self.aborting:  # aborted before a runner took it
            return _ABORTED
        if job_type.timeout is None:  # no cancel scope on the common path: it costs per job
            return await self._invoke(job_type, job)
        if not job_type.is_async:
            return await self._invoke_overrunnable(job_type, job, limit=job_type.timeout)
        attempt: _Attempt | None = None
        # A handler that catches its cancellation and carries on is cancelled again at every
        # await (anyio), and never ends: say so once, or the worker just spins.
        timer = _IgnoredTimeout(self, job, job_type.timeout)
        try:
            with anyio.move_on_after(job_type.timeout) as deadline:
                attempt = await self._invoke(job_type, job)
        except asyncio.CancelledError:
            # The timeout's cancellation, let out of its scope because the handler's own
            # code also cancelled its task (the scope swallows only when no other request
            # is pending): released uncounted, it stopped the worker, and the next one.
            # Outside the scope, a cancelled enclosing scope (shutdown) says it is not that.
            task = asyncio.current_task()
            if task is None or not deadline.cancel_called or _cancelled_by_worker():
                raise
            _drop_cancel_requests(task)
        finally:
            timer.cancel()
        # Past the deadline, what the handler did after catching its cancellation (a result
        # it returned anyway) is not its outcome: the attempt timed out.
        if attempt is None or (deadline.cancel_called and attempt is not _ABORTED):
            return _Attempt(error=f"timed out after {job_type.timeout:g}s")
        return attempt

    async def _invoke_overrunnable(self, job_type: JobType, job: Job, *, limit: float) -> _Attempt:
        """A plain def under a timeout. Its thread cannot be interrupted, so the job keeps
        its slot and its lease (the heartbeat) until the thread returns, and the attempt
        then fails as timed out, its outcome discarded. Failed at the deadline instead, the
        job could be retried, here or elsewhere, beside its own thread still running: two
        runs at once of one job, or of one scope."""
        started = time.monotonic()
        timer = asyncio.get_running_loop().call_later(limit, self._overran, job, limit)
        try:
            attempt = await self._invoke(job_type, job)
        finally:
            timer.cancel()
        ran = time.monotonic() - started
        if ran < limit:
            return attempt
        return _Attempt(
            error=f"timed out after {limit:g}s (a plain def cannot be interrupted: its"
            f" thread returned after {ran:.1f}s, and what it did is discarded)"
        )

    def _ignores_timeout(self, job: Job, timeout: float) -> None:
        self.logger.warning(
            "job %d: %gs past its timeout of %gs, its handler has not returned: it catches"
            " the cancellation (CancelledError) and carries on; the job keeps its slot and its"
            " lease until it returns",
            job.id,
            IGNORED_TIMEOUT_WARNING,
            timeout,
            extra={"job_id": job.id, "job_type": job.job_type},
        )

    def _overran(self, job: Job, timeout: float) -> None:
        self.logger.warning(
            "job %d: past its timeout of %gs; a plain def cannot be interrupted, so the job"
            " stays running here until its thread returns, then fails as timed out",
            job.id,
            timeout,
            extra={"job_id": job.id, "job_type": job.job_type},
        )

    async def _invoke(self, job_type: JobType, job: Job) -> _Attempt:
        current = _current_job.set(job)  # reset below: the runner's next job is another
        try:
            if job_type.is_async:
                tasks = self._handler_tasks
                tasks[job.id] = asyncio.current_task()  # type: ignore[assignment]
                try:
                    value = await job_type.handler(job)
                finally:
                    del tasks[job.id]
            else:
                # Never abandoned: a thread cannot be stopped, and its job given back at
                # shutdown while it runs on could run a second time beside it (or the next
                # job of its scope). Shutdown waits for it, and records what it did.
                self.in_threads += 1
                try:
                    value = await anyio.to_thread.run_sync(
                        _call_in_thread, job_type.handler, job, limiter=self._threads
                    )
                finally:
                    self.in_threads -= 1
                    # Returned after the grace period: its outcome's write gets a whole
                    # final window from now, not what is left of one begun without it.
                    self.completer.extend_final_window()
        except Snooze as snooze:
            return _Attempt(snooze=snooze.delay)
        except ExceptionGroup as group:  # what a task group in the handler raised
            delay = _snooze_delay(group)  # only Snoozes inside: a snooze
            return _Attempt(error=_traceback(group)) if delay is None else _Attempt(snooze=delay)
        except (Exception, SystemExit) as exc:  # sys.exit() in a handler fails its attempt
            return _Attempt(error=_traceback(exc))
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if self._took_back_abort(job) and task is not None and not task.cancelling():
                return _ABORTED  # the abort alone, not the timeout or shutdown as well
            if task is None or _cancelled_by_worker():
                raise  # this worker cancelled it: the job's timeout, or shutdown
            # The handler's own: it awaited something cancelled, or its code cancelled its
            # task (a watchdog calling task.cancel()). An error like any other, not a
            # shutdown of the runner, which took the worker down with it; the request is
            # taken back, or the runner would carry it into its next await.
            _drop_cancel_requests(task)
            return _Attempt(error=_traceback(exc))
        except GeneratorExit as exc:
            if not _loop_running():
                raise  # this coroutine is being closed, its event loop gone
            return _Attempt(error=_traceback(exc))  # the handler's own: it crashed the worker
        except BaseException as exc:
            # KeyboardInterrupt or a handler's own BaseException subclass: its attempt fails,
            # where it would take the worker down, and every job running in it.
            task = asyncio.current_task()
            if isinstance(exc, BaseExceptionGroup) and task is not None and task.cancelling():
                if _cancelled_by_worker():
                    raise  # a group carrying this worker's cancellation
                _drop_cancel_requests(task)
            return _Attempt(error=_traceback(exc))
        finally:
            _current_job.reset(current)
            if self._abort_sent:  # one the handler swallowed, or turned into an error
                self._took_back_abort(job)
        return _encode(value, self.app)

    def _took_back_abort(self, job: Job) -> bool:
        """If abort() cancelled this runner's task for ``job``, take that cancellation back
        (it has been handled, or swallowed by the handler) and say so. asyncio counts a
        task's pending cancellations: once ours is taken back, one still pending is anyio's
        (the job's timeout, shutdown), and a CancelledError with none is the handler's own."""
        if job.id not in self._abort_sent:
            return False
        self._abort_sent.discard(job.id)
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True

    def _log(self, job: Job, outcome: str, duration: float, error: str | None = None) -> None:
        """One line per job outcome: id, type, attempt, duration (and the error's last line).

        Built only if the level is enabled, with the record made directly: no caller lookup
        (``findCaller`` walks the stack), the message formatted only if a handler formats it.
        """
        level = logging.INFO if outcome in _QUIET else logging.WARNING
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        duration_ms = duration * 1000
        record = logger.makeRecord(
            logger.name,
            level,
            __file__,
            _LOG_LINE,
            _OUTCOME,
            (
                job.id,
                job.job_type,
                job.attempts,
                job.max_attempts,
                outcome,
                duration_ms,
                f": {error}" if error else "",
            ),
            None,
            "_log",
            {
                "job_id": job.id,
                "job_type": job.job_type,
                "queue": job.queue,
                "attempt": job.attempts,
                "outcome": outcome,
                "duration_ms": round(duration_ms, 3),
            },
        )
        logger.handle(record)


_LOG_LINE = Executor._log.__code__.co_firstlineno
_NO_RESULT = _Attempt()
_ABORTED = _Attempt(error=ABORTED)


# The logged outcome of a write given up at shutdown (Completer.GIVEN_UP), which has
# already logged why; the lease was not lost.
_NOT_WRITTEN = "not recorded (given up at shutdown)"


def _released(released: bool | Literal["given up"] | None) -> str:
    """The logged outcome of a release (None: a retry was refused after a try whose outcome
    is unknown, see Completer.release)."""
    if released is None:
        return "released or lease lost (unknown)"
    if released == GIVEN_UP:
        return f"release {_NOT_WRITTEN}"
    return "released" if released else "lease lost"


def _seconds(delay: datetime.timedelta) -> str:
    """A delay for the log: seconds below a minute and a half, else what timedelta prints."""
    seconds = delay.total_seconds()
    if seconds < 90:
        return f"{seconds:.3g}s"
    return str(datetime.timedelta(seconds=round(seconds)))


# What handlers return most often: not awaitable, no need to ask.
_PLAIN_RESULTS = frozenset({dict, list, str, int, float, bool})


def _encode(value: Any, app: App) -> _Attempt:
    """Encode a handler's return value, failing the attempt clearly if it is not JSON.

    Follow-ups of a registered type get its queue and max_attempts, as app.enqueue does.
    """
    if value is None:
        return _NO_RESULT
    if type(value) not in _PLAIN_RESULTS and inspect.isawaitable(value):  # its ABC check: 0.3 us
        if inspect.iscoroutine(value):
            value.close()  # never awaited: without a warning at garbage collection
        return _Attempt(
            error=f"the handler returned {value!r} without awaiting it (a plain def that calls"
            " an async function runs in a thread, and what it returns is never awaited): make"
            " the wrapper an async def that awaits the call, or register the async function"
        )
    next_jobs = None
    if isinstance(value, Result):
        if value.next_jobs is not None:
            next_jobs = [app.with_defaults(spec) for spec in value.next_jobs]
        value = value.value
    try:
        attempt = _Attempt(
            result=None if value is None else dumps(value, "the result"),
            next_jobs=None if next_jobs is None else dumps(next_jobs, "next_jobs"),
        )
    except Exception as exc:  # TypeError, ValueError, RecursionError, a failing default
        return _Attempt(error=f"handler result is not JSON-serialisable: {exc}")
    for what, text in (("result", attempt.result), ("next_jobs", attempt.next_jobs)):
        # Characters first: the UTF-8 length of a large text only (an encode per result
        # would cost every job).
        if text is not None and len(text) > MAX_JSON_TEXT // 4 and _utf8(text) > MAX_JSON_TEXT:
            return _Attempt(
                error=f"the handler's {what} is {_utf8(text) / (1 << 20):,.0f} MiB of JSON,"
                f" more than one jsonb value holds ({MAX_JSON_TEXT >> 20} MiB): store it"
                " elsewhere (a table of yours, object storage) and return its key"
            )
    return attempt


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _snooze_delay(group: BaseExceptionGroup[BaseException]) -> datetime.timedelta | None:
    """The longest delay of a group of Snoozes only (nested groups too): each task asked to
    wait, the longest wait satisfies them all. None if anything else is in it."""
    snoozes, rest = group.split(Snooze)
    if snoozes is None or rest is not None:
        return None
    return max(_delays(snoozes))


def _delays(exc: BaseException) -> list[datetime.timedelta]:
    if isinstance(exc, BaseExceptionGroup):
        return [d for e in exc.exceptions for d in _delays(e)]
    return [exc.delay] if isinstance(exc, Snooze) else []


def _traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc)).rstrip()
    except Exception as failure:
        # CPython 3.11 places a frame's carets with ast.parse, which can raise SystemError
        # ("AST constructor recursion depth mismatch", gh-106905) while other threads parse.
        # Raised here, it escaped the attempt: its outcome went unrecorded and the job was
        # released uncounted, to fail the same way again with no end.
        frames = "".join(
            f'  File "{f.filename}", line {f.lineno}, in {f.name}\n'
            + (f"    {f.line.strip()}\n" if f.line else "")
            for f in traceback.extract_tb(exc.__traceback__)
        )
        error = "".join(traceback.format_exception_only(exc)).rstrip()
        return (
            f"Traceback (most recent call last; without its details: formatting it raised"
            f" {type(failure).__name__}: {failure}):\n{frames}{error}"
        )


class _IgnoredTimeout:
    """Calls ``executor._ignores_timeout`` :data:`IGNORED_TIMEOUT_WARNING` seconds past the
    job's timeout, unless cancelled first. A timer that fires late (the loop was held up: a
    SIGSTOP, a paused container, a blocking call) is set again instead, once: the timeout's
    own cancellation came due in the same pass and has not reached the handler yet, and every
    handler so held up was said to catch its cancellation. (Once only: a handler that
    catches its cancellation and blocks the loop for seconds at a time would otherwise make
    every firing late, and never be named.)"""

    def __init__(self, executor: Executor, job: Job, timeout: float) -> None:
        self.executor, self.job, self.timeout = executor, job, timeout
        self.set_again = False
        self._set(timeout + IGNORED_TIMEOUT_WARNING)

    def _set(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self.due = loop.time() + delay
        self.handle = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        if not self.set_again and asyncio.get_running_loop().time() - self.due > _LATE_TIMER:
            self.set_again = True
            self._set(IGNORED_TIMEOUT_WARNING)
        else:
            self.executor._ignores_timeout(self.job, self.timeout)

    def cancel(self) -> None:
        self.handle.cancel()


# A timer firing this many seconds after it was due says the event loop was held up.
_LATE_TIMER = 1.0


def _call_in_thread(handler: Any, job: Job) -> Any:
    """A plain def's call. A GeneratorExit it raises would reach the awaiting coroutine
    thrown into it (asyncio throws a future's exception in), which closes the coroutine
    instead of raising there: the runner was torn down and the worker with it."""
    try:
        return handler(job)
    except GeneratorExit as exc:
        raise RuntimeError("the handler raised GeneratorExit") from exc


def _cancelled_by_worker() -> bool:
    """Is a cancel scope around the running handler cancelled: the job's timeout, or the
    worker's shutdown? (Not a task.cancel() of the handler's own code, which cancels no
    scope.) In a cancelled scope anyio's effective deadline is minus infinity."""
    return anyio.current_effective_deadline() == -math.inf


async def _take_back_own_cancellation(task: asyncio.Task[Any]) -> None:
    """A handler whose code cancelled its task and returned before the request was
    delivered left it pending: at the runner's next await it ended the runner, and the
    worker with it. Delivered and taken back here (not the worker's: no enclosing scope is
    cancelled). Called only when a request is pending (not after a normal attempt): also an
    abort's, taken back by count as the handler returned (Python 3.11's uncancel() leaves a
    request not yet delivered pending; anyio reads the same flag)."""
    if _cancelled_by_worker():
        return
    try:
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        pass
    _drop_cancel_requests(task)


def _drop_cancel_requests(task: asyncio.Task[Any]) -> None:
    """Take back every cancellation request counted on the task: called only where none
    of them is the worker's (no enclosing cancel scope is cancelled)."""
    while task.cancelling():
        task.uncancel()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# A job whose outcome PostgreSQL refuses to record is held back this long before it runs
# again, twice as long after each refusal in a row, up to the cap (see
# Executor._hold_back_unrecorded); refusal counts are kept for this many jobs at most.
UNRECORDED_DELAY = 1.0
UNRECORDED_DELAY_CAP = 600.0
UNRECORDED_KEPT = 10_000


def _snooze_outcome(state: str | None) -> str:
    """The logged outcome of a snooze (a handler's, or a refused outcome's hold-back) that
    did not queue the job."""
    if state is None:
        return "lease lost"
    if state == GIVEN_UP:
        return f"snooze {_NOT_WRITTEN}"
    if state == UNKNOWN:
        return "snoozed or lease lost (unknown)"
    return f"snoozed ({state})"  # cancelled: abort() was called, or its pipeline cancelled


# Seconds past a job's timeout after which a handler still running is said to ignore it.
IGNORED_TIMEOUT_WARNING = 5.0

# last_error keeps this many bytes of an error (the head and the tail, where a traceback's
# exception line is): a handler raising a 50 MB message stored 50 MB per attempt.
ERROR_LIMIT = 64 * 1024
# How far from the cut a line's end is looked for, to cut between lines (see _storable).
_CUT_REACH = 4096


def _storable(text: str) -> str:
    """``text`` as PostgreSQL can store it: no NUL (text cannot hold one) and no lone
    surrogate (not encodable as UTF-8); each is written out as its escape instead. An error
    message carrying one would otherwise be refused, and the failure never recorded. Past
    :data:`ERROR_LIMIT` bytes of UTF-8, its middle is cut (at character boundaries)."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= ERROR_LIMIT:
        return data.decode("utf-8")
    head, tail = data[: ERROR_LIMIT // 4], data[-(ERROR_LIMIT * 3 // 4) :]
    # Cut between lines where one ends near the cut, so that the mark is a line of its own
    # between whole lines (error_line reads past it to the exception's line; a frame's
    # piece after it was taken for that line); a line longer than that is cut in two.
    end, start = head.rfind(b"\n", -_CUT_REACH), tail.find(b"\n", 0, _CUT_REACH)
    if end >= 0:
        head = head[: end + 1]
    if start >= 0:
        tail = tail[start + 1 :]
    cut = len(data) - len(head) - len(tail)
    # "ignore" drops the pieces of the characters cut in two, at most 3 bytes each side.
    head_text, tail_text = head.decode("utf-8", "ignore"), tail.decode("utf-8", "ignore")
    return f"{head_text.removesuffix(chr(10))}\n[... {cut} bytes cut ...]\n{tail_text}"


async def _save(conn: asyncpg.Connection, job_id: int, worker: str, progress: Any) -> bool:
    saved: bool = await conn.fetchval(_SAVE_PROGRESS, job_id, worker, progress)
    return saved
