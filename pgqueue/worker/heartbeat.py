"""The heartbeat that keeps this worker's leases alive.

The period is derived from the ``stale_after`` setting (a quarter of it), so a healthy job
that runs for hours keeps its lease while a dead worker's jobs are recovered soon after
``stale_after``.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import anyio
import asyncpg

from pgqueue.worker import bounded
from pgqueue.worker.retry import Outage

DEFAULT_STALE_AFTER = timedelta(minutes=5)
_STALE_AFTER = "SELECT value::interval FROM pgqueue.settings WHERE name = 'stale_after'"


async def read_stale_after(conn: asyncpg.Connection) -> timedelta:
    """The ``stale_after`` setting, read once at start (default 5 minutes when unset)."""
    value: timedelta | None = await conn.fetchval(_STALE_AFTER)
    return value if value is not None and value.total_seconds() > 0 else DEFAULT_STALE_AFTER


def heartbeat_period(stale_after: timedelta) -> float:
    """Four heartbeats per ``stale_after``: three may be lost before a lease goes stale."""
    return max(0.05, stale_after.total_seconds() / 4)


async def heartbeat_loop(
    pool: asyncpg.Pool, worker_id: str, period: float, logger: logging.Logger
) -> None:
    """Refresh the leases of every job this worker holds, every ``period`` seconds.

    Each beat is bounded by ``period`` (the acquire, then the statement) and a connection
    cut off mid-beat is discarded (:func:`~pgqueue.worker.bounded.call`): a beat stuck on a
    half-open connection would otherwise stop all later ones while the leases go stale.
    ``pool.fetchval(timeout=...)`` is not enough: its release waits, with no bound, for the
    timed-out statement's cancel to be acknowledged on that same connection.
    """
    outage = Outage(logger, "heartbeat")
    while True:
        await anyio.sleep(period)
        try:
            await bounded.call(pool, period, _beat, worker_id)
        except Exception as exc:
            outage.failed(exc, "refreshing leases")
        else:
            outage.ok()


async def _beat(conn: asyncpg.Connection, worker_id: str) -> None:
    await conn.fetchval("SELECT pgqueue.heartbeat(worker => $1)", worker_id)
