"""The heartbeat that keeps this worker's leases alive.

The period is derived from the ``stale_after`` setting (a quarter of it, at most
:data:`MAX_PERIOD`), so a healthy job that runs for hours keeps its lease while a dead
worker's jobs are recovered soon after ``stale_after``. Every beat reads the setting again (in
the same round trip), so a changed ``stale_after`` reaches a running worker at its next beat:
an operator who lowers it a lot does not leave workers beating at a period the new lease no
longer covers. The cap bounds how long that takes: raised to a day and lowered again, the
setting reached workers only after their six-hour sleep, while a dead worker's jobs stayed
running and a worker started meanwhile recovered the healthy ones too, running them twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta

import anyio
import asyncpg

from pgqueue.worker import bounded
from pgqueue.worker.aborts import REQUESTED_COUNT
from pgqueue.worker.retry import Backoff, Outage
from pgqueue.worker.wake import Wake

DEFAULT_STALE_AFTER = timedelta(minutes=5)
# Longest heartbeat period, whatever stale_after is: a changed stale_after reaches every
# worker within it, and stale recovery and retention (which run on the same period) run at
# least this often. A beat costs one UPDATE of the worker's running jobs.
MAX_PERIOD = 30.0
# Least bound on a beat. Without it a stale_after set so low that a beat cannot land within
# a quarter of it would time out every beat, so the worker would never read a raised value.
MIN_BEAT_BOUND = 1.0
# Stale recovery holds back for this many periods, and RECOVERY_MARGIN seconds, after this
# worker starts and after its beats were missing for as long (see Period.recovery_held_off).
RECOVERY_HOLD_PERIODS = 2
RECOVERY_MARGIN = 2.0
_STALE_AFTER = "SELECT value::interval FROM pgqueue.settings WHERE name = 'stale_after'"
DB_CLOCK = "extract(epoch FROM clock_timestamp())::float8"


# With the beat, how many jobs running under this worker pgqueue.abort() was called for: a
# notification the LISTEN connection missed is made up for within a period (see aborts.py).
# Last, the database's clock after the renewal (epoch seconds; see Period.clock_read).
_BEAT = f"SELECT pgqueue.heartbeat(worker => $1), ({_STALE_AFTER}), {REQUESTED_COUNT}, {DB_CLOCK}"


def _usable(value: timedelta | None) -> timedelta:
    return value if value is not None and value.total_seconds() > 0 else DEFAULT_STALE_AFTER


async def read_stale_after(conn: asyncpg.Connection) -> timedelta:
    """The ``stale_after`` setting (default 5 minutes when unset)."""
    return _usable(await conn.fetchval(_STALE_AFTER))


def heartbeat_period(stale_after: timedelta) -> float:
    """Four heartbeats per ``stale_after`` (three may be lost before a lease goes stale), at
    most :data:`MAX_PERIOD` seconds apart."""
    return max(0.05, min(MAX_PERIOD, stale_after.total_seconds() / 4))


@dataclass
class Period:
    """The heartbeat period, from ``stale_after`` as the last beat read it; stale recovery
    runs on the same period, and holds back after an outage (see :meth:`recovery_held_off`)."""

    seconds: float
    # Monotonic times: of the last beat that landed (the start, before the first), and of
    # the last start of the worker or end of a gap in its beats.
    beat_at: float = field(default_factory=time.monotonic)
    back_at: float = field(default_factory=time.monotonic)
    # The database's clock (epoch seconds) at the last beat that landed; None before it.
    beat_db: float | None = None

    @classmethod
    def of(cls, stale_after: timedelta) -> Period:
        return cls(heartbeat_period(stale_after))

    def _gap(self) -> float:
        """Seconds between two beats that landed past which one was missing: the sleep
        (a period) and the longest a beat may take (its bound), and a margin."""
        return self.seconds + max(self.seconds, MIN_BEAT_BOUND) + RECOVERY_MARGIN

    def _hold(self) -> float:
        return RECOVERY_HOLD_PERIODS * self.seconds + RECOVERY_MARGIN

    def _skew(self) -> float:
        """How much further the database's clock may move than this worker's between a
        beat and a later reading without a jump: a beat's bound (its clock is read
        before its reply arrives, maybe after a lock wait), and the margin."""
        return max(self.seconds, MIN_BEAT_BOUND) + RECOVERY_MARGIN

    def landed(self, db_now: float | None = None) -> float:
        """A beat landed, at ``db_now`` on the database's clock: one that ends a gap longer
        than beats take (see :meth:`_gap`) ends an outage as far as recovery is concerned,
        and so does a jump of the database's clock (see :meth:`clock_read`), whose size
        it returns (0.0: none)."""
        now = time.monotonic()
        jump = 0.0 if db_now is None else self.clock_read(db_now, now)
        if now - self.beat_at > self._gap():
            self.back_at = now
        self.beat_at = now
        if db_now is not None:
            self.beat_db = db_now
        return jump

    def clock_read(self, db_now: float, now: float | None = None) -> float:
        """The database's clock read ``db_now``: how far it moved ahead of this worker's
        monotonic clock since the last beat, past what a beat's timing explains (0.0:
        not). Such a jump starts a hold (see :meth:`recovery_held_off`), once per jump.

        Leases age on the database's clock, the gaps :meth:`landed` sees on this
        worker's. A host suspended with its database (a laptop, a paused VM) stops the
        monotonic clock while the database's wall clock runs on, and a stepped clock
        of the database's host jumps alone: every lease is stale at once, and this
        worker's beats look punctual. Only the two clocks side by side show it."""
        if self.beat_db is None:
            return 0.0
        now = time.monotonic() if now is None else now
        jump = (db_now - self.beat_db) - (now - self.beat_at)
        if jump <= self._skew():
            return 0.0
        self.back_at = now
        self.beat_db += jump  # counted once: the next beat measures from here
        return jump

    def recovery_held_off(self) -> bool:
        """Whether stale recovery waits: while this worker's beats are missing (see
        :meth:`_gap`), for :data:`RECOVERY_HOLD_PERIODS` periods and
        :data:`RECOVERY_MARGIN` after they land again, and as long after the worker starts.

        Leases are read on the database's clock alone: after an outage of the database or
        of the network longer than ``stale_after``, every worker's leases are stale until
        its beats land again, and the first recovery requeued live workers' jobs, which
        another worker then ran beside the handlers still running (a crash review: every
        job of an outage longer than ``stale_after``). Each live worker's beat lands within
        two periods of the database's return (a beat under way may hold on for its bound,
        a period, before its retry); a worker started meanwhile cannot tell, so it waits as
        long from its start. What is stale after that belongs to a worker that did not come
        back. A host suspended with its database, or a step of the database's clock, is
        seen by :meth:`clock_read` instead (the monotonic clock stops in a suspend)."""
        now = time.monotonic()
        return now - self.beat_at > self._gap() or now - self.back_at < self._hold()

    def recovery_hold_left(self) -> float:
        """Seconds until the hold after the last start or outage ends (0: none)."""
        return max(0.0, self.back_at + self._hold() - time.monotonic())


async def heartbeat_loop(
    pool: asyncpg.Pool,
    worker_id: str,
    period: Period,
    logger: logging.Logger,
    aborts: Wake | None = None,
    held: Collection[int] = (),
    unheld: Callable[[], None] | None = None,
) -> None:
    """Refresh the leases of every job this worker holds, every ``period`` seconds, and
    follow ``stale_after``: the period changes at the beat that reads a new value. When
    ``pgqueue.abort()`` was called for jobs it runs, it wakes ``aborts``. A beat that
    failed is tried again sooner (backoff, up to a period): after an outage, the leases it
    renews are the ones stale recovery is about to take.

    When a beat renews more leases than this worker holds (``held``), it calls ``unheld``
    (the producer then releases what runs under this worker with nobody behind it): an
    outcome the database acknowledged and then lost (a crash with ``synchronous_commit``
    off, a failover to an asynchronous standby) put the job back in ``running`` under this
    live worker, whose beats kept it from stale recovery for as long as it lived. (A claim
    whose reply is still on its way counts too: one sweep more, which finds nothing.)

    Each beat is bounded by ``period`` (at least :data:`MIN_BEAT_BOUND`; the acquire, then
    the statement) and a connection
    cut off mid-beat is discarded (:func:`~pgqueue.worker.bounded.call`): a beat stuck on a
    half-open connection would otherwise stop all later ones while the leases go stale.
    ``pool.fetchval(timeout=...)`` is not enough: its release waits, with no bound, for the
    timed-out statement's cancel to be acknowledged on that same connection.
    """
    outage = Outage(logger, "heartbeat")
    backoff = Backoff()
    delay = period.seconds
    while True:
        await anyio.sleep(delay)
        try:
            bound = max(period.seconds, MIN_BEAT_BOUND)
            beat = await bounded.call(pool, bound, _beat, worker_id)
        except Exception as exc:
            outage.failed(exc, "refreshing leases")
            delay = min(backoff.next_delay(), period.seconds)
            continue
        stale_after, requested, renewed, db_now = beat
        outage.ok()
        backoff.reset()
        log_clock_jump(logger, period.landed(db_now), period)
        if requested and aborts is not None:
            aborts.set()
        if renewed > len(held) and unheld is not None:
            unheld()
        seconds = heartbeat_period(stale_after)
        if seconds != period.seconds:
            logger.info(
                "stale_after is now %s: heartbeat every %.2fs (was %.2fs)",
                stale_after,
                seconds,
                period.seconds,
            )
            period.seconds = seconds
        delay = period.seconds


def log_clock_jump(logger: logging.Logger, jump: float, period: Period) -> None:
    """Say that a jump of the database's clock holds stale recovery back (see
    :meth:`Period.clock_read`); nothing when there was none."""
    if jump:
        logger.warning(
            "the database's clock moved %.1fs further than this worker's since its last"
            " heartbeat (a host suspended with its database, or a clock stepped): stale"
            " recovery waits %.1fs for live workers' heartbeats",
            jump,
            period.recovery_hold_left(),
        )


async def _beat(
    conn: asyncpg.Connection, worker_id: str
) -> tuple[timedelta, int, int, float | None]:
    row = await conn.fetchrow(_BEAT, worker_id)
    if row is None:
        return _usable(None), 0, 0, None
    return _usable(row[1]), int(row[2]), int(row[0]), row[3]
