"""Stale recovery, run by one worker at a time.

Every worker runs this loop, but ``pgqueue.recover_stale()`` only runs under a
transaction-scoped advisory lock, so at most one worker recovers at any moment. There is no
leader connection to keep alive and nothing to hand over when a worker dies.
"""

from __future__ import annotations

import logging
import random

import anyio
import asyncpg

from pgqueue.worker.retry import Outage

# pgqueue's advisory lock class for the recovery leader (pgqueue._lock_class('leader')).
LEADER_LOCK_CLASS = 7216003


async def recovery_loop(pool: asyncpg.Pool, period: float, logger: logging.Logger) -> None:
    """Every ``period`` (jittered), requeue jobs whose worker stopped heartbeating."""
    outage = Outage(logger, "recovery")
    while True:
        await anyio.sleep(period * random.uniform(0.5, 1.0))
        try:
            recovered = await _recover_once(pool)
        except Exception as exc:
            outage.failed(exc, "recovering stale jobs")
            continue
        outage.ok()
        if recovered:
            logger.warning(
                "recovered %d stale job(s) (lease older than stale_after): %s",
                len(recovered),
                ", ".join(map(str, recovered)),
                extra={"job_ids": recovered},
            )


async def _recover_once(pool: asyncpg.Pool) -> list[int]:
    """Run ``pgqueue.recover_stale()`` unless another worker is running it right now."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1, 0)", LEADER_LOCK_CLASS):
            return []
        rows = await conn.fetch("SELECT id FROM pgqueue.recover_stale() AS id")
    return [row["id"] for row in rows]
