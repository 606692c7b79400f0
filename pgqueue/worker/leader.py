"""Stale recovery and retention, each run by one worker at a time.

Every worker runs these loops, but ``pgqueue.recover_stale()`` and
``pgqueue.prune_expired()`` only run under transaction-scoped advisory locks (one each), so
at most one worker recovers, and one prunes, at any moment. There is no leader connection to
keep alive and nothing to hand over when a worker dies.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import anyio
import asyncpg

from pgqueue.worker import bounded
from pgqueue.worker.heartbeat import DB_CLOCK, Period, log_clock_jump
from pgqueue.worker.retry import Outage

# pgqueue's advisory lock class for the leaders (pgqueue._lock_class('leader')): key 0 for
# recovery, key 1 for retention.
LEADER_LOCK_CLASS = 7216003
RECOVERY_KEY = 0
RETENTION_KEY = 1
# Jobs one retention transaction deletes at most; a round repeats until a batch comes back
# short. Each batch is a short transaction whatever the backlog.
PRUNE_BATCH = 10_000
# Bound on one recovery round, from the client. Generous: recovering even a large backlog
# takes seconds, and a round cut short is rolled back and repeated whole.
RECOVERY_TIMEOUT = 300.0
# Seconds after which the server ends the recovery transaction if its client goes quiet
# inside it: the transaction holds the leader lock, and a client that vanished without FIN
# or RST would otherwise keep every worker from recovering until TCP keepalives notice
# (hours, by default).
ABANDONED_AFTER = 60.0


async def every_period(
    round_: Callable[[asyncpg.Pool, logging.Logger, Outage], Awaitable[None]],
    pool: asyncpg.Pool,
    period: Period,
    logger: logging.Logger,
    outage: Outage,
    held_off: Callable[[], bool] | None = None,
) -> None:
    """``round_`` (:func:`recovery_round`, :func:`retention_round`) every heartbeat period,
    jittered, until cancelled; not while ``held_off()`` says so (the recovery, after the
    worker's start or an outage: see :meth:`Period.recovery_held_off`)."""
    while True:
        await anyio.sleep(period.seconds * random.uniform(0.5, 1.0))
        if held_off is not None and held_off():
            logger.debug(
                "stale recovery held back (the worker started, its heartbeats were missing,"
                " or the database's clock jumped)"
            )
            continue
        await round_(pool, logger, outage)


def leader_outage(logger: logging.Logger, component: str) -> Outage:
    """The Outage a component's rounds report to: a failed round is tried again next period."""
    return Outage(logger, component, "trying again next period")


async def recovery_round(
    pool: asyncpg.Pool, logger: logging.Logger, outage: Outage, period: Period | None = None
) -> None:
    """One round of stale recovery (none if another worker runs one now, or if the
    database's clock jumped since ``period``'s last beat: see :meth:`Period.clock_read`);
    failures are reported through ``outage``."""
    try:
        recovered = await _recover_once(pool, period)
    except Exception as exc:
        outage.failed(exc, "recovering stale jobs")
        return
    outage.ok()
    if isinstance(recovered, float):
        assert period is not None
        log_clock_jump(logger, recovered, period)
    elif recovered:
        logger.warning(
            "recovered %d stale job(s) (lease older than stale_after): %s",
            len(recovered),
            ", ".join(map(str, recovered)),
            extra={"job_ids": recovered},
        )


async def _recover_once(pool: asyncpg.Pool, period: Period | None = None) -> list[int] | float:
    """Run ``pgqueue.recover_stale()`` unless another worker is running it right now."""
    return await bounded.call(pool, RECOVERY_TIMEOUT, _recover_in_transaction, period)


async def _recover_in_transaction(
    conn: asyncpg.Connection, period: Period | None
) -> list[int] | float:
    """The ids ``pgqueue.recover_stale()`` recovered (none if another worker is running it
    right now), or, with nothing recovered, how far the database's clock jumped."""
    async with conn.transaction():
        took, db_now = await _lead(conn, RECOVERY_KEY)
        if not took:
            return []
        if period is not None:
            jump = period.clock_read(db_now)
            if jump:
                return jump
            if period.recovery_held_off():
                # Checked by every_period before the round too, but a beat that landed while
                # the round waited for its connection may have seen the jump (or ended a
                # gap) and started a hold: the round then met no jump of its own, and
                # recovered live workers' jobs (a review).
                return []
        rows = await conn.fetch("SELECT id FROM pgqueue.recover_stale() AS id")
    return [row["id"] for row in rows]


async def _lead(conn: asyncpg.Connection, key: int) -> tuple[bool, float]:
    """Take the leader lock ``key`` for this transaction, unless another worker holds it,
    and read the database's clock; the server ends the transaction if its client goes
    quiet inside it (see ABANDONED_AFTER)."""
    await conn.execute(
        f"SET LOCAL idle_in_transaction_session_timeout = '{int(ABANDONED_AFTER * 1000)}ms'"
    )
    row = await conn.fetchrow(
        f"SELECT pg_try_advisory_xact_lock($1, $2), {DB_CLOCK}", LEADER_LOCK_CLASS, key
    )
    return bool(row[0]), float(row[1])


async def retention_round(pool: asyncpg.Pool, logger: logging.Logger, outage: Outage) -> None:
    """Delete the final jobs past settings.prune_after, a batch per transaction, until a batch
    comes back short (nothing if another worker prunes now); failures go to ``outage``."""
    pruned, batch = 0, PRUNE_BATCH
    try:
        while True:
            try:
                n = await bounded.call(pool, RECOVERY_TIMEOUT, _prune_in_transaction, batch)
            except asyncpg.QueryCanceledError:
                # A statement_timeout of the role shorter than a batch's delete: each round
                # timed out on the same batch and pruned nothing, for ever. Smaller ones fit.
                if batch == 1:
                    raise
                batch = max(1, batch // 4)
                continue
            pruned += n
            if n < batch:
                break
    except Exception as exc:
        outage.failed(exc, "pruning finished jobs")
    else:
        outage.ok()
    if pruned:
        logger.info("pruned %d finished job(s) past settings.prune_after", pruned)


async def _prune_in_transaction(conn: asyncpg.Connection, batch: int) -> int:
    async with conn.transaction():
        took, _ = await _lead(conn, RETENTION_KEY)
        if not took:
            return 0
        pruned: int = await conn.fetchval("SELECT pgqueue.prune_expired($1)", batch)
    return pruned
