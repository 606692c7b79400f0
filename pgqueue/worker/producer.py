"""The producer loop: decides when to claim and how many jobs.

It claims only through ``pgqueue.claim_next``, in batches sized to the free slots. Between
claims it sleeps until something may have changed: a notification for one of its queues
(or a (re)connect of the notifier, which asks for a sweep), a freed slot when it was full,
the earliest future ``run_after`` among its queues, or a jittered safety poll. With
``until_empty`` it stops once a claim made while it held no job finds none.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import fields
from typing import TypeVar

import anyio
import asyncpg

from pgqueue.dsn import id_array
from pgqueue.job import Job, job_from_row
from pgqueue.worker import bounded
from pgqueue.worker.executor import Executor
from pgqueue.worker.heartbeat import Period
from pgqueue.worker.retry import Backoff, Outage, is_connection_error, is_pooler_error
from pgqueue.worker.wake import Wake

# The columns in Job's field order, so that a row becomes a Job by position: the JSON columns
# arrive decoded (the pool's codecs), and nothing else needs converting.
_COLUMNS = ", ".join(f.name for f in fields(Job))
_ARGS = "worker => $1, queues => $2::text[], batch_size => $3"
_CLAIM = f"SELECT {_COLUMNS} FROM pgqueue.claim_next({_ARGS})"
_T = TypeVar("_T")
# Bound on acquiring the claim connection and on each claim or lookup on it: a statement
# stuck on a half-open connection would stop this worker from claiming anything.
STATEMENT_TIMEOUT = 30.0
# Bound on the sweep still owed at shutdown (see Producer.release_lost_claims_at_stop).
STOP_SWEEP_TIMEOUT = 5.0
# Jobs running under this worker that it does not know it holds (see _release_lost_claims).
_UNKNOWN_HELD = (
    "SELECT id FROM pgqueue.jobs"
    " WHERE state = 'running' AND locked_by = $1 AND id <> ALL($2::text::bigint[]) ORDER BY id"
)
_RELEASE = "SELECT pgqueue.release(job_id => $1, worker => $2)"
_READ_ONE = f"SELECT {_COLUMNS} FROM pgqueue.jobs WHERE id = $1"
_FAIL = "SELECT pgqueue.fail(job_id => $1, worker => $2, error => $3)"
# Before sleeping: the same claim, registered as waiting (settings.notify = when_waiting).
_CLAIM_OR_WAIT = f"SELECT {_COLUMNS} FROM pgqueue.claim_or_wait({_ARGS})"
# A claim whose reply came this many seconds after it was sent has its leases checked before
# any handler starts (see Producer._still_held).
LEASE_CHECK_AFTER = 1.0
# A read, not a renewal: an UPDATE waited for row locks (an application transaction holding
# a claimed job FOR SHARE while it enqueues a dependent), and the producer with it. The
# heartbeat, woken by the same hold-up, renews the leases.
_STILL_HELD = """
SELECT id FROM pgqueue.jobs
WHERE id = ANY ($1::text::bigint[]) AND state = 'running' AND locked_by = $2"""
_UNREGISTER = "DELETE FROM pgqueue.notify_waiters WHERE worker = $1"
# The earliest scheduled job: per priority (and per queue, for a worker of some queues), the
# first entry past now() of the claim index, the priorities found by skipping through it. A
# min() over the scheduled jobs read every one of them (a seq scan of 300,000 jobs due in a
# week: 56 ms, by every idle worker after every claim that came back short). Only the first
# PRIORITIES_LOOKED_AT priorities: past them (priority used as a score) the skipping cost
# more than the scan, and a job missed there starts on the poll instead. "Past now()" is past
# the last claim ($2 seconds ago): a job that fell due between that claim's now() and this
# look was neither claimed nor scheduled, and waited for the poll. (Past the look's own now()
# alone would not do either: a due job a queue limit holds back would wake the worker at once
# for ever.)
PRIORITIES_LOOKED_AT = 64
_READY = "j.state = 'queued' AND NOT j.scope_blocked AND NOT j.queue_paused"
_NEXT_DUE = f"""
    WITH RECURSIVE prio (p, n) AS (
        (SELECT j.priority, 1 FROM pgqueue.jobs j WHERE {_READY} AND {{queue}}
         ORDER BY j.priority DESC LIMIT 1)
        UNION ALL
        SELECT (SELECT j.priority FROM pgqueue.jobs j WHERE {_READY} AND {{queue}}
                  AND j.priority < prio.p ORDER BY j.priority DESC LIMIT 1), prio.n + 1
        FROM prio WHERE prio.p IS NOT NULL AND prio.n < {PRIORITIES_LOOKED_AT})
    SELECT (SELECT j.run_after FROM pgqueue.jobs j WHERE {_READY} AND {{queue}}
              AND j.priority = prio.p AND j.run_after > now() - $2 * interval '1 second'
            ORDER BY j.run_after LIMIT 1)
    FROM prio WHERE prio.p IS NOT NULL"""
_NEXT_DUE_ANY = _NEXT_DUE.format(queue="true")
_NEXT_DUE_OF = f"""SELECT n.run_after FROM unnest($1::text[]) AS q (queue)
    CROSS JOIN LATERAL ({_NEXT_DUE.format(queue="j.queue = q.queue")}) AS n (run_after)"""
# Seconds until the earliest scheduled job of our queues, on the database's clock, and
# whether producers notify only waiting workers (settings.notify).
_BEFORE_SLEEP = """
SELECT (SELECT extract(epoch FROM min(d.run_after) - clock_timestamp())::float8
        FROM ({next_due}) AS d (run_after)),
       (SELECT value = 'when_waiting' FROM pgqueue.settings WHERE name = 'notify'),
       EXISTS (SELECT 1 FROM pgqueue.queue_limits
               WHERE $1::text[] IS NULL OR queue = ANY($1::text[]))
"""
_BEFORE_SLEEP_ANY = _BEFORE_SLEEP.format(next_due=_NEXT_DUE_ANY)
_BEFORE_SLEEP_OF = _BEFORE_SLEEP.format(next_due=_NEXT_DUE_OF)


class Producer:
    """Claims jobs for one worker and starts them on the executor."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        executor: Executor,
        wake: Wake,
        *,
        worker_id: str,
        queues: Sequence[str] | None,
        poll_interval: float,
        logger: logging.Logger,
        batch_window: float = 0.005,
        until_empty: bool = False,
        period: Period | None = None,
    ) -> None:
        self.pool = pool
        self.period = period  # the heartbeat's: a claim's reply later than it is checked
        self.executor = executor
        self.wake = wake
        self.worker_id = worker_id
        self.queues = None if queues is None else list(queues)
        self.poll_interval = poll_interval
        self.batch_window = batch_window
        self.until_empty = until_empty
        executor.wake_when_idle = until_empty
        self.logger = logger
        self.stopping = False
        self.when_waiting = False  # settings.notify, read before each sleep
        self.limited = False  # a queue limit names one of our queues, read before each sleep
        self._backoff = Backoff()
        self._outage = Outage(logger, "producer")
        self._wait_failed = False  # the failing claims of an outage include claim_or_wait
        # Claims run on one pooled connection kept between claims: acquiring and releasing
        # per claim costs ~60 us of Python, on the path from notification to handler.
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None
        # A claim failed after it was sent: it may have committed, its jobs unknown to us.
        self._claim_unknown = False
        # A claim_or_wait was sent: this worker may be in pgqueue.notify_waiters.
        self._registered = False
        # The last claim failed on a connection its server had ended: retried at once.
        self._renewed = False
        # When the last claim was sent (monotonic): the look before sleeping reads from there.
        self._claim_sent = time.monotonic()

    def stop(self) -> None:
        """Stop claiming; :meth:`run` returns promptly (running jobs are not touched)."""
        self.stopping = True
        self.wake.set()
        self.executor.slot_freed.set()

    async def run(self) -> None:
        """Claim until :meth:`stop`; the claim connection goes back to the pool on the way out."""
        try:
            await self._run()
        finally:
            await self._release()

    async def _run(self) -> None:
        """Claim while there are free slots and work; otherwise sleep until that may change.

        With ``settings.notify = 'when_waiting'`` producers notify only registered waiters, so
        a claim that comes back short is followed by one through ``claim_or_wait``, which
        registers this worker; only when that one comes back short too does it sleep. The
        mode is read before each sleep: a switch reaches a sleeping worker at its next poll.
        """
        more = True  # start with a sweep: jobs may have been queued while nobody listened
        armed = False  # the last claim registered us as waiting and came back short
        woken = False  # a notification ended that wait, and one of our queues is limited
        while not self.stopping:
            if self.executor.free_slots == 0:
                if self.executor.sweep_needed:  # not only before a claim: slots may stay busy
                    await self._sweep()
                else:
                    await self.executor.slot_freed.wait()
                continue
            if more:
                await self._gather_slots()
            else:
                timeout = await self._before_sleep()
                if armed or not self.when_waiting:
                    notified = await self.wake.wait(timeout)
                    # A notification consumed the registration: renew it; but where a limit
                    # names one of our queues, claim without first. claim_or_wait only tries
                    # a limited queue's lock (it holds one that every enqueue needs) and
                    # announces the queue when it finds the lock taken; a plain claim waits
                    # for it, so that announcement cannot loop.
                    woken, armed = armed and notified and self.limited, False
                    if self.stopping:
                        break
            # Nothing held here: what this claim does not find is due nowhere in our queues
            # (every outcome of ours is written, so every job it made due is committed).
            idle = not self.executor.held
            last = self.until_empty and idle  # if it finds nothing: no registration to leave
            wanted = self.executor.free_slots
            wait = not more and self.when_waiting and not last and not woken
            woken = False
            if wanted == 0:
                # Slots filled while it waited: successes piled up past the unwritten cap.
                # Claim once a slot frees; a wake-up consumed here announced work.
                more = True
                continue
            try:
                claimed = await self._claim(wanted, wait=wait)
                for job in claimed or ():
                    self.executor.start(job)
            finally:
                self.executor.claim_handled()
            if last and claimed == []:
                self.logger.info("no job is due in this worker's queues: stopping (until empty)")
                self.stopping = True
                await self._unregister()
                break
            # A full batch means there is probably more; an error means try again.
            more = claimed is None or len(claimed) == wanted
            if claimed and not more:
                # Let the runners start these jobs before the next round trip is prepared.
                await anyio.lowlevel.checkpoint()
            armed = wait and not more

    async def _unregister(self) -> None:
        """Leaving for good (until empty): drop the registration an earlier claim_or_wait
        left (a run from cron would leave one every time, for a queueing transaction to
        notify for nothing). A failure leaves it: one such notification."""
        if not self._registered:
            return
        try:
            conn = await self._connection()
            with anyio.fail_after(STATEMENT_TIMEOUT):
                await conn.execute(_UNREGISTER, self.worker_id)
        except Exception as exc:
            await self._release(broken=isinstance(exc, TimeoutError))
            self.logger.warning(
                "could not leave pgqueue.notify_waiters (%s): the next job queued in its queues"
                " notifies it once, for nothing",
                exc,
            )

    async def _gather_slots(self) -> None:
        """With a backlog, let freed slots add up briefly so claims come in batches.

        Claiming the moment one slot frees costs one round trip per job; waiting up to
        ``batch_window`` seconds for half the slots costs at most that much latency.
        """
        wanted = max(1, self.executor.concurrency // 2)
        with anyio.move_on_after(self.batch_window):
            while self.executor.free_slots < wanted and not self.stopping:
                await self.executor.slot_freed.wait()

    async def _claim(self, batch_size: int, *, wait: bool) -> list[Job] | None:
        """Claim up to ``batch_size`` jobs (registering as waiting if ``wait``); None if the
        database failed: after a backoff, or at once for a claim sent again on a fresh
        connection (the kept one ended by its server, see below)."""
        query = _CLAIM_OR_WAIT if wait else _CLAIM
        self._registered = self._registered or wait
        try:
            conn = await self._connection()
            if self._claim_unknown or self.executor.sweep_needed:
                await self._release_lost_claims(conn)
            self._claim_unknown = True  # until its rows are in hand
            self.executor.claim_sent()
            sent = self._claim_sent = time.monotonic()
            with anyio.fail_after(STATEMENT_TIMEOUT):
                rows = await conn.fetch(query, self.worker_id, self.queues, batch_size)
                if rows and time.monotonic() - sent > self._lease_check_after():
                    rows = await self._still_held(conn, rows, time.monotonic() - sent)
            self._claim_unknown = False
        except Exception as exc:
            if self._claim_unknown:
                self.executor.claim_lost()
            if _undecodable(exc):
                await self._settle_undecodable(exc)
                return None
            if _renewable(exc) and not self._renewed:
                # The kept connection's server ended it, before the claim (the end not yet
                # seen, so it passed _connection's check: nothing was sent) or during it
                # (its jobs unknown: the next claim sweeps first). Once, at once, on a
                # fresh one; a second failure is an outage.
                self._renewed = True
                await self._release()
                return None
            if is_pooler_error(exc):
                # Its statement cache names statements its server connection lacks: a fresh
                # connection starts with none (a kept one failed every claim after).
                await self._release(broken=True)
            await self._failed(exc, "claiming jobs")
            self._wait_failed = self._wait_failed or wait
            await self.wake.wait(self._backoff.next_delay())
            return None
        self._renewed = False
        # A plain claim's success ends no outage of claim_or_wait, which does more (it
        # registers the worker as waiting: a privilege the plain claim does not need). It
        # did, and a worker whose every claim_or_wait failed claimed, waited and failed in
        # a loop without backoff, a traceback each time.
        if wait or not (self._wait_failed and self.when_waiting):
            self._wait_failed = False
            self._outage.ok()
            self._backoff.reset()
        return [job_from_row(row) for row in rows]

    def _lease_check_after(self) -> float:
        """Seconds after which a claim's reply may come too late for its leases: at most
        :data:`LEASE_CHECK_AFTER`, and less under a short ``stale_after`` (its heartbeat
        period, a quarter of it)."""
        if self.period is None:
            return LEASE_CHECK_AFTER
        return min(LEASE_CHECK_AFTER, self.period.seconds)

    async def _still_held(
        self, conn: asyncpg.pool.PoolConnectionProxy, rows: list[asyncpg.Record], took: float
    ) -> list[asyncpg.Record]:
        """The claimed rows whose jobs still run under this worker.

        A worker held up between a claim and its reply (a paused container, a SIGSTOP, a
        starved host) for longer than ``stale_after`` found its jobs recovered, and often
        run elsewhere, by then; it started their handlers all the same, beside the next job
        of their scope or after they had succeeded (only their outcomes were fenced off).
        A failure here leaves the claim unknown: the next claim sweeps first."""
        held = {
            r[0]
            for r in await conn.fetch(_STILL_HELD, id_array([r[0] for r in rows]), self.worker_id)
        }
        for row in rows:
            if row[0] not in held:
                self.logger.warning(
                    "job %d: not started: its claim's reply came %.1fs after the claim was"
                    " sent (this worker was held up), and the job is no longer held by this"
                    " worker (stale recovery requeued it)",
                    row[0],
                    took,
                    extra={"job_id": row[0]},
                )
        return [row for row in rows if row[0] in held]

    async def _settle_undecodable(self, exc: Exception) -> None:
        """The claim ran, and its reply held a value Python cannot hold. Released and claimed
        again, the same batch failed the same way, in a loop that ran nothing (the releases'
        own notifications cut every backoff short). Each job running here that the executor
        does not hold is read on its own: one that cannot be read fails its attempt (retried
        like any failure, up to max_attempts: the row can be mended meanwhile), the others
        are released."""
        self.logger.warning(
            "claimed jobs could not be read (%s: %s); failing the ones that cannot be,"
            " releasing the others",
            type(exc).__name__,
            str(exc)[:200],
        )
        try:
            await self._release_lost_claims(await self._connection(), read_each=True)
        except Exception as failure:
            await self._failed(failure, "releasing jobs this worker does not hold")
            await self.wake.wait(self._backoff.next_delay())

    async def _fail_if_unreadable(
        self, conn: asyncpg.pool.PoolConnectionProxy, job_id: int
    ) -> bool:
        """Fail the attempt of a job whose row this worker cannot decode; False if it can."""
        try:
            await conn.fetchrow(_READ_ONE, job_id)
        except Exception as exc:
            if not _undecodable(exc):
                raise
            why = f"{type(exc).__name__}: {str(exc)[:500]}"
            error = f"pgqueue worker {self.worker_id} cannot read the job's row ({why})"
            state = await conn.fetchval(_FAIL, job_id, self.worker_id, error)
            self.logger.warning(
                "job %d: its row cannot be read here (%s); attempt failed (%s)",
                job_id,
                why,
                state,
                extra={"job_id": job_id},
            )
            return True
        return False

    async def _failed(self, exc: Exception, doing: str) -> None:
        """After a failed statement on the claim connection: give the connection back
        (discarded if the statement timed out, see :meth:`_release`), log the outage."""
        await self._release(broken=isinstance(exc, TimeoutError))
        self._outage.failed(exc, doing)

    async def _sweep(self) -> None:
        """:meth:`_release_lost_claims` on its own (a claim runs it first anyway); after a
        failure, a backoff."""
        try:
            await self._renewing(self._release_lost_claims)
        except Exception as exc:
            await self._failed(exc, "releasing jobs this worker does not hold")
            await self.wake.wait(self._backoff.next_delay())

    async def release_lost_claims_at_stop(self) -> None:
        """After :meth:`run` returned and every outcome is written: the sweep still owed.

        A claim back that was not started, or a claim whose reply was lost, asks for a
        sweep before the next claim; at shutdown there is no next claim, and the job would
        stay running under this worker until stale recovery requeued it, counting an
        attempt (a job on its last one would end failed without running again). Bounded by
        :data:`STOP_SWEEP_TIMEOUT`: a database that does not answer cannot hold the exit.
        """
        if not (self.executor.sweep_needed or self._claim_unknown):
            return
        try:
            with anyio.move_on_after(STOP_SWEEP_TIMEOUT) as scope:
                await self._renewing(self._release_lost_claims)
        except Exception as exc:
            await self._failed(exc, "releasing jobs this worker does not hold, at stop")
        finally:
            # A statement cut off by the bound leaves its connection unfit for reuse (and a
            # pool release would wait for its cancel): discarded, within CANCEL_WAIT.
            await self._release(broken=scope.cancelled_caught)
        if scope.cancelled_caught:
            self.logger.warning(
                "stopping: could not release the jobs running under this worker that it does"
                " not hold within %gs; stale recovery will requeue them",
                STOP_SWEEP_TIMEOUT,
            )

    async def _release_lost_claims(
        self, conn: asyncpg.pool.PoolConnectionProxy, *, read_each: bool = False
    ) -> None:
        """Give back the jobs running under this worker that it does not hold.

        A claim cut off by its timeout or a lost connection may have committed: its jobs
        are then running under this worker, which does not know them, and the heartbeat
        (by worker, not by job) would keep their leases fresh for as long as the worker
        lives. The same happens to a job claimed back while an earlier attempt of it was
        still held here, if that attempt's outcome was refused before the claim committed
        (see Executor.start). Before the next claim, every job the database shows running
        under this worker that the executor does not hold is released (queued again at
        once, the attempt not counted). The producer is the only claimer, so nothing can be
        claimed for this worker between the look and the releases. With ``read_each``, a
        job whose row cannot be decoded fails its attempt instead (see
        :meth:`_settle_undecodable`).
        """
        # Cleared first: an attempt settled while the look runs asks for the next sweep.
        self.executor.sweep_needed = False
        try:
            with anyio.fail_after(STATEMENT_TIMEOUT):
                held = id_array(self.executor.held)
                lost = await conn.fetch(_UNKNOWN_HELD, self.worker_id, held)
                for row in lost:
                    if read_each and await self._fail_if_unreadable(conn, row["id"]):
                        continue
                    released = await conn.fetchval(_RELEASE, row["id"], self.worker_id)
                    why = (
                        "its outcome could not be recorded"
                        if row["id"] in self.executor.unrecorded
                        else "a claim whose reply was lost, a claim back of a job whose"
                        " earlier attempt was settling, or an outcome the database lost"
                    )
                    self.logger.warning(
                        "job %d: running under this worker, which does not hold it (%s); %s",
                        row["id"],
                        why,
                        "released" if released else "no longer held",
                        extra={"job_id": row["id"]},
                    )
        except BaseException:
            self.executor.sweep_needed = True  # not done: the next claim (or loop) tries again
            raise
        self._claim_unknown = False

    async def _before_sleep(self) -> float:
        """How long to sleep: until the jittered safety poll or the earliest scheduled job,
        if sooner. Also refreshes :attr:`when_waiting`."""
        poll = self.poll_interval * random.uniform(0.8, 1.0)

        async def look(conn: asyncpg.pool.PoolConnectionProxy) -> asyncpg.Record:
            with anyio.fail_after(STATEMENT_TIMEOUT):
                sql = _BEFORE_SLEEP_ANY if self.queues is None else _BEFORE_SLEEP_OF
                since = max(0.0, time.monotonic() - self._claim_sent)
                row: asyncpg.Record = await conn.fetchrow(sql, self.queues, since)
            return row

        try:
            seconds, when_waiting, limited = await self._renewing(look)
        except Exception as exc:
            await self._failed(exc, "looking up the next scheduled job")
            return poll
        self.when_waiting = bool(when_waiting)
        self.limited = bool(limited)
        return poll if seconds is None else max(0.0, min(poll, seconds))

    async def _renewing(
        self, statement: Callable[[asyncpg.pool.PoolConnectionProxy], Awaitable[_T]]
    ) -> _T:
        """``statement`` on the claim connection; if its server ended that connection (see
        :func:`_renewable`), once more at once on a fresh one. For statements that may run
        twice: the sweep, the look before sleeping. The kept connection, ended while the
        worker idled and used before asyncpg saw its end, or ended while the statement
        ran, is no outage: one was logged (and the next claim delayed by a backoff) for a
        connection the pool replaces at once."""
        conn = await self._connection()  # failing here is an outage: no fresh one either
        try:
            return await statement(conn)
        except Exception as exc:
            if not _renewable(exc):
                raise
        await self._release()
        return await statement(await self._connection())

    async def _connection(self) -> asyncpg.pool.PoolConnectionProxy:
        """The claim connection, acquired from the pool when there is none, or when the one
        kept between claims was ended by its server meanwhile and asyncpg saw its end (its
        next statement would fail, logged as an outage in asyncpg's words for a connection
        it gave back). Before asyncpg sees the end, the statement fails and is sent again on a
        fresh connection: see :meth:`_claim` and :meth:`_renewing`."""
        if self._conn is not None and bounded.unusable(self._conn):
            await self._release(broken=True)
        if self._conn is None:
            self._conn = await self.pool.acquire(timeout=STATEMENT_TIMEOUT)
        return self._conn

    async def _release(self, *, broken: bool = False) -> None:
        """Give the claim connection back (the pool replaces it if it broke); one whose
        statement timed out (``broken``), or that its server ended, is discarded instead, see
        :func:`pgqueue.worker.bounded.discard`."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if broken or bounded.unusable(conn):
            await bounded.discard(conn)
        else:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.pool.release(conn)


def _renewable(exc: BaseException) -> bool:
    """The claim connection's server ended it (a restart, ``pg_terminate_backend``, an idle
    session timeout), before the statement was sent or while it ran: a fresh connection may
    not fail. Not a statement that got no answer in time: the database may be unreachable,
    or the statement waiting for a lock, and a second try would wait as long again."""
    return is_connection_error(exc) and not isinstance(exc, TimeoutError)


def _undecodable(exc: BaseException) -> bool:
    """Raised decoding a row the database sent, after its statement ran: a value Python
    cannot hold (a JSON number of more than 4,300 digits, JSON nested past the recursion
    limit, a timestamp before year 1). Not a database or connection error."""
    return isinstance(exc, ValueError | OverflowError | RecursionError) and not isinstance(
        exc, asyncpg.PostgresError | asyncpg.InterfaceError
    )
