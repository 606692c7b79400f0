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

from pgqueue.worker import bounded
from pgqueue.worker.heartbeat import Period
from pgqueue.worker.retry import Outage

# pgqueue's advisory lock class for the recovery leader (pgqueue._lock_class('leader')).
LEADER_LOCK_CLASS = 7216003
# Bound on one recovery round, from the client. Generous: recovering even a large backlog
# takes seconds, and a round cut short is rolled back and repeated whole.
RECOVERY_TIMEOUT = 300.0
# Seconds after which the server ends the recovery transaction if its client goes quiet
# inside it: the transaction holds the leader lock, and a client that vanished without FIN
# or RST would otherwise keep every worker from recovering until TCP keepalives notice
# (hours, by default).
ABANDONED_AFTER = 60.0


async def recovery_loop(pool: asyncpg.Pool, period: Period, logger: logging.Logger) -> None:
    """Every heartbeat period (jittered), requeue jobs whose worker stopped heartbeating."""
    outage = Outage(logger, "recovery")
    while True:
        await anyio.sleep(period.seconds * random.uniform(0.5, 1.0))
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
    return await bounded.call(pool, RECOVERY_TIMEOUT, _recover_in_transaction)


async def _recover_in_transaction(conn: asyncpg.Connection) -> list[int]:
    async with conn.transaction():
        await conn.execute(
            f"SET LOCAL idle_in_transaction_session_timeout = '{int(ABANDONED_AFTER * 1000)}ms'"
        )
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1, 0)", LEADER_LOCK_CLASS):
            return []
        rows = await conn.fetch("SELECT id FROM pgqueue.recover_stale() AS id")
    return [row["id"] for row in rows]
