"""Writes attempt outcomes (complete, fail, release) so that they land exactly once.

Every write runs in a shielded cancel scope: a shutdown that cancels the handlers cannot
cancel the write that records what they did. Connection errors are retried with backoff
until the write lands or fencing (the job is no longer held by this worker) refuses it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import anyio
import asyncpg

from pgqueue.job import Job
from pgqueue.worker.retry import Backoff, Outage, is_connection_error

STATEMENT_TIMEOUT = 30.0

_COMPLETE = (
    "SELECT pgqueue.complete(job_id => $1, worker => $2, result => $3::text::jsonb,"
    " next_jobs => $4::text::jsonb)"
)
_FAIL = "SELECT pgqueue.fail(job_id => $1, worker => $2, error => $3)"
_RELEASE = "SELECT pgqueue.release(job_id => $1, worker => $2)"


class Completer:
    """Records outcomes for one worker through the fenced SQL functions."""

    def __init__(self, pool: asyncpg.Pool, worker_id: str, logger: logging.Logger) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.logger = logger
        self.outage = Outage(logger, "completer")
        # Past this monotonic time retries stop: set at shutdown so that a database that
        # stays down cannot hold the process forever (stale recovery takes over).
        self.give_up_at = math.inf

    async def complete(self, job: Job, result: str | None, next_jobs: str | None) -> bool:
        """Mark the job succeeded with its JSON-encoded result; False if the lease was lost."""
        held: bool | None = await self._write(job, "success", _COMPLETE, result, next_jobs)
        return bool(held)

    async def fail(self, job: Job, error: str) -> str | None:
        """Fail the attempt; returns the job's new state, or None if the lease was lost."""
        state: str | None = await self._write(job, "failure", _FAIL, error)
        return state

    async def release(self, job: Job) -> bool:
        """Give the job back unfinished (the attempt is not counted); False if not held."""
        held: bool | None = await self._write(job, "release", _RELEASE)
        return bool(held)

    async def _write(self, job: Job, what: str, sql: str, *args: Any) -> Any:
        backoff = Backoff(base=0.05, cap=5.0)
        with anyio.CancelScope(shield=True):
            while True:
                try:
                    async with self.pool.acquire(timeout=STATEMENT_TIMEOUT) as conn:
                        value = await conn.fetchval(
                            sql, job.id, self.worker_id, *args, timeout=STATEMENT_TIMEOUT
                        )
                    self.outage.ok()
                    return value
                except Exception as exc:
                    if not is_connection_error(exc):
                        raise
                    self.outage.failed(exc, f"recording the {what} of job {job.id}")
                    if time.monotonic() >= self.give_up_at:
                        self.logger.error(
                            "job %d: gave up recording its %s at shutdown; stale recovery"
                            " will requeue it",
                            job.id,
                            what,
                            extra={"job_id": job.id, "job_type": job.job_type},
                        )
                        return None
                    await backoff.sleep()
