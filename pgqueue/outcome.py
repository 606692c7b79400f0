"""A job's outcome, read or awaited from the application side.

``wait_for_job`` polls the job's row until it reaches a final state: completions send no
notification (a NOTIFY per finished job would put PostgreSQL's commit-order lock on every
worker's hot path), and a poll of one row by primary key costs next to nothing. The poll
starts at 10 ms and backs off to ``max_interval``, so a short job is seen finished within
milliseconds and a long one costs one query a second.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

from pgqueue.dsn import INT8_MAX, ConnOrPool, as_job_id, asyncpg_target

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
# The result as text: the caller's connection may have no JSON codecs.
_OUTCOME_SQL = (
    "SELECT state, result::text AS result, last_error, finished_at FROM pgqueue.jobs WHERE id = $1"
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where a job stands: its state and, once it is final, what it ended with."""

    job_id: int
    state: str
    result: Any  # what the handler returned (decoded JSON), None until it succeeded
    last_error: str | None  # the last failed attempt's error and traceback
    finished_at: datetime.datetime | None

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES


async def job_outcome(conn_or_pool: ConnOrPool, job_id: int) -> Outcome | None:
    """The job's state now (final or not), or None if there is no such job."""
    asyncpg_target("job_outcome", conn_or_pool)
    job_id = as_job_id(job_id)
    if not 0 < job_id <= INT8_MAX:
        return None  # no such id can exist (and asyncpg would refuse to send one past bigint)
    row = await conn_or_pool.fetchrow(_OUTCOME_SQL, job_id)
    if row is None:
        return None
    result = row["result"]
    return Outcome(
        job_id=job_id,
        state=row["state"],
        result=None if result is None else json.loads(result),
        last_error=row["last_error"],
        finished_at=row["finished_at"],
    )


async def wait_for_job(
    conn_or_pool: ConnOrPool, job_id: int, *, max_interval: float = 1.0
) -> Outcome:
    """Wait until the job is succeeded, failed or cancelled, and return its outcome.

    It waits as long as that takes: bound it as any other wait, ``with anyio.fail_after(30):``
    (or ``asyncio.timeout(30)``). Raises ``LookupError`` if there is no such job (never
    enqueued, or pruned). Refuses a connection inside a transaction: a job enqueued in it
    cannot run before it commits, and under REPEATABLE READ no other job's progress would
    ever be seen.
    """
    asyncpg_target("wait_for_job", conn_or_pool)
    job_id = as_job_id(job_id)
    if isinstance(conn_or_pool, asyncpg.Connection) and conn_or_pool.is_in_transaction():
        raise RuntimeError(
            f"job {job_id}: wait_for_job in a transaction would wait for its own commit;"
            " commit first, or pass the pool"
        )
    if not (math.isfinite(max_interval) and max_interval > 0):
        raise ValueError(f"max_interval must be a positive number of seconds, got {max_interval}")
    delay = 0.01
    while True:
        outcome = await job_outcome(conn_or_pool, job_id)
        if outcome is None:
            raise LookupError(f"no job {job_id} (never enqueued, or pruned)")
        if outcome.done:
            return outcome
        await anyio.sleep(delay)
        delay = min(delay * 1.5, max_interval)
