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
from dataclasses import dataclass
from datetime import timedelta

import anyio
import asyncpg

from pgqueue.worker import bounded
from pgqueue.worker.aborts import REQUESTED_COUNT
from pgqueue.worker.retry import Outage
from pgqueue.worker.wake import Wake

DEFAULT_STALE_AFTER = timedelta(minutes=5)
# Longest heartbeat period, whatever stale_after is: a changed stale_after reaches every
# worker within it, and stale recovery and retention (which run on the same period) run at
# least this often. A beat costs one UPDATE of the worker's running jobs.
MAX_PERIOD = 30.0
# Least bound on a beat. Without it a stale_after set so low that a beat cannot land within
# a quarter of it would time out every beat, so the worker would never read a raised value.
MIN_BEAT_BOUND = 1.0
_STALE_AFTER = "SELECT value::interval FROM pgqueue.settings WHERE name = 'stale_after'"


# With the beat, how many jobs running under this worker pgqueue.abort() was called for: a
# notification the LISTEN connection missed is made up for within a period (see aborts.py).
_BEAT = f"SELECT pgqueue.heartbeat(worker => $1), ({_STALE_AFTER}), {REQUESTED_COUNT}"


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
    runs on the same period."""

    seconds: float

    @classmethod
    def of(cls, stale_after: timedelta) -> Period:
        return cls(heartbeat_period(stale_after))


async def heartbeat_loop(
    pool: asyncpg.Pool,
    worker_id: str,
    period: Period,
    logger: logging.Logger,
    aborts: Wake | None = None,
) -> None:
    """Refresh the leases of every job this worker holds, every ``period`` seconds, and
    follow ``stale_after``: the period changes at the beat that reads a new value. When
    ``pgqueue.abort()`` was called for jobs it runs, it wakes ``aborts``.

    Each beat is bounded by ``period`` (at least :data:`MIN_BEAT_BOUND`; the acquire, then
    the statement) and a connection
    cut off mid-beat is discarded (:func:`~pgqueue.worker.bounded.call`): a beat stuck on a
    half-open connection would otherwise stop all later ones while the leases go stale.
    ``pool.fetchval(timeout=...)`` is not enough: its release waits, with no bound, for the
    timed-out statement's cancel to be acknowledged on that same connection.
    """
    outage = Outage(logger, "heartbeat")
    while True:
        await anyio.sleep(period.seconds)
        try:
            bound = max(period.seconds, MIN_BEAT_BOUND)
            stale_after, requested = await bounded.call(pool, bound, _beat, worker_id)
        except Exception as exc:
            outage.failed(exc, "refreshing leases")
            continue
        outage.ok()
        if requested and aborts is not None:
            aborts.set()
        seconds = heartbeat_period(stale_after)
        if seconds != period.seconds:
            logger.info(
                "stale_after is now %s: heartbeat every %.2fs (was %.2fs)",
                stale_after,
                seconds,
                period.seconds,
            )
            period.seconds = seconds


async def _beat(conn: asyncpg.Connection, worker_id: str) -> tuple[timedelta, int]:
    row = await conn.fetchrow(_BEAT, worker_id)
    if row is None:
        return _usable(None), 0
    return _usable(row[1]), int(row[2])
