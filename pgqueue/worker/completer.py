"""Writes attempt outcomes (complete, fail, release) so that they land exactly once.

Successes are batched: runners hand them to :meth:`Completer.add_success` (no await, no
per-job event) and move on, and one flusher task writes everything that has piled up with a
single ``pgqueue.complete_many`` call while the previous write was in flight. Nothing waits
for a batch to fill, so an idle worker still records a lone success at once, and a busy one
pays one round trip per batch, not per job. Once a batch lands the flusher reports each job
through the ``recorded`` callback (the executor logs it; its slot was freed when the handler
returned); a batch that PostgreSQL refuses is written again one job at a time, and a success
refused on its own (a result it cannot store, a bad next_jobs spec) goes to the ``refused``
callback, which fails the attempt with the error.

One job must not hold up the others. A success write waits at most :data:`LOCK_WAIT` for a
lock (an operator's ``SELECT ... FOR UPDATE`` on the row, an application transaction that
enqueued a dependent of the job and holds it ``FOR SHARE`` until it commits); a batch cut
short is written job by job, and a single success that is still cut short is retried in a
task of its own, with backoff, while the flusher goes on with the next batches.

Every write runs in a shielded cancel scope: a shutdown that cancels the handlers cannot
cancel the write that records what they did. Each try is bounded (:data:`WRITE_TIMEOUT`, see
:mod:`pgqueue.worker.bounded`), so a half-open connection cannot hold a write, and with it
the worker's shutdown, for the many minutes until the kernel gives up. Connection errors,
timeouts and statements the server interrupted (a long lock wait behind an operator's
transaction, with or without ``lock_timeout``/``statement_timeout``) are retried with
backoff until the write lands or fencing (the job is no longer held by this worker) refuses
it; so are errors of the database's set-up (a privilege revoked, a read-only session, a
function shadowed on the search path: :func:`~pgqueue.worker.retry.is_setup_error`), which
say nothing against the outcome and end with an operator's fix. Taken for a refusal, a
success meeting one failed its attempt and its handler ran again, once per try.

A try that timed out or lost its connection may still have committed, so a retry can be
refused by fencing because of the very write it repeats. Each kind of write deals with that
in its own way (see :meth:`Completer._write`): a success written by this worker's earlier
try is recognised as recorded (see :meth:`Completer._flush`), and a refused failure or
release is reported as unknown rather than as a lost lease.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import anyio
import anyio.abc
import asyncpg

from pgqueue.dsn import id_array
from pgqueue.job import Job
from pgqueue.worker import bounded
from pgqueue.worker.retry import (
    Backoff,
    Outage,
    is_connection_error,
    is_retryable,
    is_setup_error,
    is_transient_error,
)
from pgqueue.worker.wake import Wake

T = TypeVar("T")

# Bound on one try of a write: acquiring a connection, then the statements. Generous (an
# outcome write takes milliseconds, a batch of MAX_BATCH with next_jobs rarely a second):
# past it the try is cut off and retried on a fresh connection, or, for a batch, written job
# by job. Each later try of a single write gets twice as long as the one before, up to
# MAX_WRITE_STRETCH times the bound: a write that needs longer than the bound every time (a
# success creating a huge number of next_jobs) would otherwise be cut off until shutdown.
WRITE_TIMEOUT = 30.0
MAX_WRITE_STRETCH = 4
# At shutdown each try is bounded by what is left of the final window instead, but is given
# at least this long.
MIN_TRY = 1.0
# Successes set aside by the flusher (see Completer._retry_alone) try at most this many at
# a time, so that rows held for long cannot take every pooled connection.
RETRY_TRIES = 2
MAX_BATCH = 500
# ... and at most this much JSON text (results and next_jobs), unless one success alone is more:
# counted in jobs only, 40 results of 30 MB made one message past PostgreSQL's 1 GB limit,
# whose server dropped the connection, and the batch was sent again, whole, for ever (a
# review). One success is at most twice MAX_JSON_TEXT (see executor._encode).
MAX_BATCH_TEXT = 64 << 20
# Bound on each lock wait of a success write (the session's lock_timeout, if smaller, wins).
# Every lock complete_many takes is held for milliseconds by pgqueue's own transactions, so a
# longer wait means another transaction keeps one of these rows, and the write is better
# retried later than left to hold up the worker's other successes.
LOCK_WAIT = "2s"
# The same bound for other statements of the worker, as a FROM item: it runs before the
# select list, and set_config(..., true) lasts until the end of the statement's own
# transaction. A stricter lock_timeout of the role or database is kept.
BOUNDED_LOCK_WAIT = (
    "set_config('lock_timeout', CASE WHEN current_setting('lock_timeout')::interval"
    f" BETWEEN '1 microsecond' AND '{LOCK_WAIT}' THEN current_setting('lock_timeout')"
    f" ELSE '{LOCK_WAIT}' END, true)"
)
# Returned by Completer.fail in place of the job's state: see there.
UNKNOWN = "unknown"
# Returned by Completer.fail, snooze and release (and given to the success callback) when the
# write was given up at shutdown: nothing is known of the lease, which was not lost (the job
# stays running under this worker until stale recovery requeues it).
GIVEN_UP: Final = "given up"


def _cut_short(exc: BaseException) -> bool:
    """A transient error that stopped the statement before it finished: no answer within
    the bound, or an interruption by the server. The other transient errors are lost
    connections and waits for a pooled connection, which no way of splitting or setting
    aside a write can help."""
    return isinstance(exc, bounded.NoAnswer) or (
        is_transient_error(exc) and not is_connection_error(exc)
    )


async def _write_nothing(conn: asyncpg.Connection, worker_id: str) -> None:
    await conn.execute(_COMPLETE_MANY, worker_id, "{}", [], [], LOCK_WAIT)


def _describe(ids: list[int]) -> str:
    """The successes of these jobs, for log lines."""
    if len(ids) == 1:
        return f"the success of job {ids[0]}"
    return f"the successes of {len(ids)} jobs ({ids[0]}, ... {ids[-1]})"


def _batch_size(pending: list[Success]) -> int:
    """How many of the first successes make the next batch: :data:`MAX_BATCH` at most, and
    as many as fit in :data:`MAX_BATCH_TEXT` of JSON (one at least)."""
    text = 0
    for n, item in enumerate(pending[:MAX_BATCH]):
        text += len(item.result or "") + len(item.next_jobs or "")
        if text > MAX_BATCH_TEXT and n:
            return n
    return min(len(pending), MAX_BATCH)


def _stretched(bound: float) -> float:
    """The bound for the next try of a write whose last try got no answer within ``bound``."""
    return min(2 * bound, MAX_WRITE_STRETCH * WRITE_TIMEOUT)


class _GivenUp(enum.Enum):
    """What Completer._write returns when it gave up at shutdown (a value no write has)."""

    GIVEN_UP = enum.auto()


_GIVEN_UP: Literal[_GivenUp.GIVEN_UP] = _GivenUp.GIVEN_UP

# The FROM item runs before the select list, and set_config(..., true) lasts until the end of
# the statement's own transaction: one round trip, as without the bound.
_COMPLETE_MANY = (
    "SELECT pgqueue.complete_many(worker => $1, job_ids => $2::text::bigint[],"
    " results => $3::text[]::jsonb[], next_jobs => $4::text[]::jsonb[])"
    " FROM set_config('lock_timeout', CASE WHEN current_setting('lock_timeout')::interval"
    " BETWEEN '1 microsecond' AND $5::text::interval THEN current_setting('lock_timeout')"
    " ELSE $5::text END, true)"
)
# pgqueue.fail, with how long until a requeued job runs again (for the log line).
_FAIL = "SELECT state, runs_in FROM pgqueue._fail($1, $2, $3, $4)"
_RELEASE = "SELECT pgqueue.release(job_id => $1, worker => $2)"
_SNOOZE = "SELECT pgqueue.snooze(job_id => $1, worker => $2, delay => $3)"
# Which of these jobs, left out by complete_many, had this worker already completed? A row
# keeps locked_by when it succeeds, and only a complete by the worker holding the job makes
# it 'succeeded', so this names exactly the jobs our own writes completed.
_SUCCEEDED_BY = (
    "SELECT id FROM pgqueue.jobs"
    " WHERE id = ANY($2::text::bigint[]) AND state = 'succeeded' AND locked_by = $1"
)


@dataclass(eq=False, slots=True)
class Success:
    """A handler's success waiting to be written: JSON text and how long the handler took."""

    job: Job
    result: str | None
    next_jobs: str | None
    duration: float


def _unattached_recorded(item: Success, held: bool | None) -> None:
    raise RuntimeError("Completer.attach() was not called")


async def _unattached_refused(item: Success, error: Exception) -> None:
    raise RuntimeError("Completer.attach() was not called")


class Completer:
    """Records outcomes for one worker through the fenced SQL functions."""

    def __init__(self, pool: asyncpg.Pool, worker_id: str, logger: logging.Logger) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.logger = logger
        self.outage = Outage(logger, "completer")
        # Past this monotonic time retries stop: set at shutdown so that a database that
        # stays down cannot hold the process forever (stale recovery takes over).
        self._give_up_at = math.inf
        self._final_window: float | None = None  # see start_final_window
        # The deadlines of the tries under way (see give_up_at).
        self._deadlines = bounded.Deadlines(MIN_TRY)
        self._pending: list[Success] = []
        # Successes taken by the flusher (or a retry of its own) and not yet reported.
        self._in_flight = 0
        self._retries: anyio.abc.TaskGroup | None = None  # see _retry_alone
        self._retry_tries = anyio.CapacityLimiter(RETRY_TRIES)
        # Their own outage (set aside for a row lock, or a trigger refusing one row for a set-up
        # reason): a row locked for an hour must not make the flusher's writes look
        # like an outage that keeps ending and starting again.
        self._retry_outage = Outage(logger, "completer (retries of single successes set aside)")
        self._kick = anyio.Event()
        self._flushed = Wake()
        self._recorded: Callable[[Success, bool | None], None] = _unattached_recorded
        self._refused: Callable[[Success, Exception], Awaitable[None]] = _unattached_refused

    def attach(
        self,
        recorded: Callable[[Success, bool | None], None],
        refused: Callable[[Success, Exception], Awaitable[None]],
    ) -> None:
        """Say what to do once a success is written (``recorded(item, held)``: plain call,
        ``held`` False if the lease was lost, None if the write was given up at shutdown) or once
        PostgreSQL refused it alone (``refused(item, error)``: awaited by the flusher, in
        its shielded scope; it should fail the attempt).
        """
        self._recorded = recorded
        self._refused = refused

    @property
    def give_up_at(self) -> float:
        """The monotonic time past which writes stop being retried (infinite until the
        worker stops). Setting it also bounds every try by it, those under way included
        (each keeps :data:`MIN_TRY` from now at least): a try that started with a bound of
        minutes, or is still waiting for a pooled connection, would otherwise hold the stop
        that long."""
        return self._give_up_at

    @give_up_at.setter
    def give_up_at(self, when: float) -> None:
        self._give_up_at = when
        self._deadlines.cut(anyio.current_time() + (when - time.monotonic()))

    def start_final_window(self, seconds: float) -> None:
        """Writes are retried for ``seconds`` more, then given up (see :attr:`give_up_at`)."""
        self._final_window = seconds
        self.give_up_at = time.monotonic() + seconds

    def extend_final_window(self) -> None:
        """Once the final window has started, give the writes still to come a whole window
        from now (a plain def handler returning after the grace period: its outcome).
        Tries already cut keep their bound; later ones get the new one."""
        if self._final_window is None:
            return
        when = time.monotonic() + self._final_window
        if when > self._give_up_at:
            self._give_up_at = when
            self._deadlines.extend(anyio.current_time() + self._final_window)

    @property
    def unwritten(self) -> int:
        """Successes handed over and not yet reported as written."""
        return len(self._pending) + self._in_flight

    async def flushed(self) -> None:
        """Wait until every success handed over so far has been written (or given up)."""
        while self.unwritten:
            await self._flushed.wait()

    async def run(self) -> None:
        """The flusher: write pending successes in batches until cancelled."""
        async with anyio.create_task_group() as self._retries:
            while True:
                await self._kick.wait()
                self._kick = anyio.Event()
                while self._pending:
                    n = _batch_size(self._pending)
                    batch, self._pending = self._pending[:n], self._pending[n:]
                    self._in_flight += len(batch)
                    try:
                        with anyio.CancelScope(shield=True):
                            await self._flush(batch, alone=False)
                    finally:
                        self._flushed.set()

    def add_success(
        self, job: Job, result: str | None, next_jobs: str | None, duration: float
    ) -> None:
        """Queue the job's success (JSON-encoded result) for the flusher; returns at once.

        What happens next is reported through the callbacks given to :meth:`attach`.
        """
        self._pending.append(Success(job, result, next_jobs, duration))
        self._kick.set()

    async def fail(
        self, job: Job, error: str, retry_in: datetime.timedelta | None = None
    ) -> tuple[str | None, datetime.timedelta | None]:
        """Fail the attempt (retried after ``retry_in``, default: the settings' backoff);
        returns the job's new state, None if the lease was lost, :data:`GIVEN_UP` if the
        write was given up at shutdown, or :data:`UNKNOWN`; and, when it was requeued, how
        long until it runs again.

        :data:`UNKNOWN`: fencing refused a retry after a try whose outcome is unknown. That
        try may have failed the attempt itself, or the lease may have been lost. The row
        cannot tell these apart: a failed attempt leaves the job queued and unlocked, or
        failed under this worker, and stale recovery does exactly the same.
        """

        return await self._write_state(f"the failure of job {job.id}", _FAIL, job, error, retry_in)

    async def release(self, job: Job) -> bool | Literal["given up"] | None:
        """Give the job back unfinished (the attempt is not counted); False if not held,
        :data:`GIVEN_UP` if given up at shutdown, None if unknown.

        None: fencing refused a retry after a try whose outcome is unknown; as with
        :meth:`fail`, a released job (queued, unlocked) looks the same as a recovered one.
        """

        async def op(conn: asyncpg.Connection, uncertain: bool) -> bool | None:
            held: bool = await conn.fetchval(_RELEASE, job.id, self.worker_id)
            return None if not held and uncertain else held

        outcome = await self._write(f"the release of job {job.id}", op)
        return GIVEN_UP if outcome is _GIVEN_UP else outcome

    async def snooze(self, job: Job, delay: datetime.timedelta) -> str | None:
        """Give the job back to run again not before ``delay`` from now (the attempt is not
        counted); returns its new state (queued, or cancelled: it was aborted meanwhile), None
        if not held, :data:`GIVEN_UP` (given up at shutdown), or :data:`UNKNOWN` (as for
        :meth:`fail`).
        Raises if PostgreSQL refuses the write."""
        state, _ = await self._write_state(f"the snooze of job {job.id}", _SNOOZE, job, delay)
        return state

    async def _write_state(
        self, what: str, sql: str, job: Job, *args: object
    ) -> tuple[str | None, Any]:
        """Run ``sql`` (job id, worker, ``args``), whose row holds the job's new state (no row,
        or NULL, when this worker does not hold it) and perhaps a detail after it, through
        :meth:`_write`. Returns the state and the detail; the state is None if not held,
        :data:`GIVEN_UP` if given up at shutdown, :data:`UNKNOWN` if a retry was refused after
        a try whose outcome is unknown."""

        async def op(conn: asyncpg.Connection, uncertain: bool) -> tuple[str | None, Any]:
            row = await conn.fetchrow(sql, job.id, self.worker_id, *args)
            if row is None or row[0] is None:
                return (UNKNOWN if uncertain else None), None
            return row[0], (row[1] if len(row) > 1 else None)

        outcome = await self._write(what, op)
        return (GIVEN_UP, None) if outcome is _GIVEN_UP else outcome

    async def _flush(
        self,
        batch: list[Success],
        *,
        alone: bool,
        bound: float | None = None,
        hold: bool = False,
    ) -> None:
        """Write one batch; if PostgreSQL refuses it, write its jobs one by one to find why.

        A batch that was cut short (timed out, or interrupted by the server: a
        ``statement_timeout``, the :data:`LOCK_WAIT` bound) is written one by one too,
        instead of retried whole: a batch too big for the bound would fail the same way
        every time, and retrying it would stall every success of this worker. A single
        write cut short again goes to :meth:`_retry_alone`, unless ``alone`` (it is that
        retry, its first try bounded by ``bound``, default :data:`WRITE_TIMEOUT`), in which
        case it retries such errors itself. So does one that meets an error of the set-up
        (:func:`~pgqueue.worker.retry.is_setup_error`): a privilege revoked holds up every
        write alike, but a trigger of yours raising such an error for one row holds up that
        job's alone.

        A job missing from ``complete_many``'s answer is either no longer held by this
        worker (lease lost) or already completed by this worker: by an earlier try whose
        reply was lost, or by the batch it was in before it was split. A lookup tells which.
        It runs only when something is missing, which is rare.
        """
        bound = WRITE_TIMEOUT if bound is None else bound
        try:
            ids = [i.job.id for i in batch]
            what = _describe(ids)
            results = [i.result for i in batch]
            next_jobs = [i.next_jobs for i in batch]

            async def op(conn: asyncpg.Connection, uncertain: bool) -> set[int]:
                rows = await conn.fetch(
                    _COMPLETE_MANY, self.worker_id, id_array(ids), results, next_jobs, LOCK_WAIT
                )
                done = {row[0] for row in rows}
                if len(done) < len(ids):
                    missing = [i for i in ids if i not in done]
                    rows = await conn.fetch(_SUCCEEDED_BY, self.worker_id, id_array(missing))
                    done.update(row[0] for row in rows)
                return done

            held = await self._write(what, op, whole=alone or hold, bound=bound, set_aside=alone)
        except Exception as exc:
            if is_setup_error(exc) and not await self._writes_go_through():
                # A write of no job meets it too: every write would (a privilege revoked, a
                # role made NOLOGIN, a failover to a read-only server). Waited out here, the
                # batch whole: split, each job retried on its own, it was a storm of failing
                # statements and logins (135 a second at 500 successes).
                await self._flush(batch, alone=False, bound=bound, hold=True)
                return
            if len(batch) > 1:
                for n, item in enumerate(batch):
                    if time.monotonic() >= self.give_up_at:  # not a try each, past the window
                        self._give_up(batch[n:], logged=False)
                        break
                    await self._flush([item], alone=False)
            elif is_retryable(exc):  # cut short, or held up by the set-up: not refused
                no_answer = isinstance(exc, bounded.NoAnswer)
                self._retry_alone(batch[0], _stretched(bound) if no_answer else WRITE_TIMEOUT)
            else:
                self._in_flight -= 1
                await self._refused(batch[0], exc)
            return
        if held is _GIVEN_UP:
            self._give_up(batch, logged=True)
            return
        recorded = self._recorded
        for item in batch:
            self._in_flight -= 1  # counted down first: the callback sees what is left
            recorded(item, item.job.id in held)

    async def _writes_go_through(self) -> bool:
        """Does a success write of no job go through? It meets what every write meets (the
        rights on pgqueue.jobs, a read-only session, a login refused), and no trigger's
        refusal of one row."""
        try:
            await bounded.call(self.pool, WRITE_TIMEOUT, _write_nothing, self.worker_id)
        except Exception:
            return False
        return True

    def _give_up(self, items: list[Success], *, logged: bool) -> None:
        """Report successes left unwritten at shutdown (their jobs stay running under this
        worker until stale recovery requeues them); log it unless ``_write`` did."""
        if not logged:
            self._log_given_up(_describe([i.job.id for i in items]))
        for item in items:
            self._in_flight -= 1
            self._recorded(item, None)

    def _log_given_up(self, what: str) -> None:
        self.logger.error("gave up recording %s at shutdown; stale recovery will requeue it", what)

    def _retry_alone(self, item: Success, bound: float) -> None:
        """Retry a success that keeps being cut short (its row locked by another transaction
        for longer than :data:`LOCK_WAIT`, or a write that needs longer than ``bound``) in a
        task of its own, until it lands or fencing refuses it, so that the flusher writes
        the worker's other successes meanwhile."""
        assert self._retries is not None, "Completer.run() is not running"

        async def retry() -> None:
            try:
                with anyio.CancelScope(shield=True):
                    await self._flush([item], alone=True, bound=bound)
            finally:
                self._flushed.set()

        self._retries.start_soon(retry, name=f"pgqueue retry of job {item.job.id}")

    async def _write(
        self,
        what: str,
        op: Callable[[asyncpg.Connection, bool], Awaitable[T]],
        *,
        whole: bool = True,
        bound: float | None = None,
        set_aside: bool = False,
    ) -> T | Literal[_GivenUp.GIVEN_UP]:
        """Run ``op(conn, uncertain)`` on a pooled connection until it lands, each try bounded
        by ``bound`` (default :data:`WRITE_TIMEOUT`, doubled after each try that got no
        answer within it; at shutdown, by what is left of the final window); returns
        its value, or ``_GIVEN_UP`` if given up at shutdown. Errors that are neither transient
        nor of the database's set-up are PostgreSQL refusing the write: raised. Unless
        ``whole``, a try cut short (no answer, or a statement the server interrupted) is
        raised too, for the caller to split the write. A write the flusher ``set_aside``
        tries only when one of the :data:`RETRY_TRIES` slots is free, and reports its
        failures as its own outage.

        ``uncertain`` is True once a failed try may have taken effect: a timeout, or a
        connection lost after the COMMIT reached the server, may hide a write that landed.
        A retry's fenced refusal (a job not running under this worker) may then be this
        write's own doing, and ``op`` must not take it for a lost lease (fail and release
        report it as unknown; a success is looked up whatever ``uncertain`` says). Failures
        before the statement was sent (no connection) count too: a precise count is not
        worth the bookkeeping, and the cost is only a wider "unknown". A set-up error does
        not: PostgreSQL refused the statement before it ran (a privilege, a read-only
        session), so that try wrote nothing.
        """
        backoff = Backoff(base=0.05, cap=5.0)
        retried = False  # a try failed: past the final window, no more tries
        uncertain = False
        bound = WRITE_TIMEOUT if bound is None else bound
        outage = self._retry_outage if set_aside else self.outage
        tries = self._retry_tries if set_aside else contextlib.nullcontext()
        with anyio.CancelScope(shield=True):
            while True:
                try:
                    async with tries:
                        # Past the final window a write that already failed (a set-aside
                        # one has) is not tried again; the others get one short try.
                        if (retried or set_aside) and time.monotonic() >= self.give_up_at:
                            self._log_given_up(what)
                            return _GIVEN_UP
                        value = await bounded.call(
                            self.pool, bound, op, uncertain, deadlines=self._deadlines
                        )
                    outage.ok()
                    return value
                except Exception as exc:
                    if not is_retryable(exc):
                        raise
                    retried = True
                    uncertain = uncertain or not is_setup_error(exc)
                    outage.failed(exc, f"recording {what}")
                    if not whole and (_cut_short(exc) or is_setup_error(exc)):
                        raise  # split: one job's trigger, say, must not hold up the rest
                    if isinstance(exc, bounded.NoAnswer):
                        bound = _stretched(bound)
                    left = max(0.0, self.give_up_at - time.monotonic())
                    await anyio.sleep(min(backoff.next_delay(), left))
        raise AssertionError("unreachable: a shield scope never swallows an exception")
