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

Every write runs in a shielded cancel scope: a shutdown that cancels the handlers cannot
cancel the write that records what they did. Connection errors are retried with backoff
until the write lands or fencing (the job is no longer held by this worker) refuses it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import asyncpg

from pgqueue.job import Job
from pgqueue.worker.retry import Backoff, Outage, is_connection_error
from pgqueue.worker.wake import Wake

T = TypeVar("T")

STATEMENT_TIMEOUT = 30.0
MAX_BATCH = 500

_COMPLETE_MANY = (
    "SELECT pgqueue.complete_many(worker => $1, job_ids => $2::bigint[],"
    " results => $3::text[]::jsonb[], next_jobs => $4::text[]::jsonb[])"
)
_FAIL = "SELECT pgqueue.fail(job_id => $1, worker => $2, error => $3)"
_RELEASE = "SELECT pgqueue.release(job_id => $1, worker => $2)"


@dataclass(eq=False, slots=True)
class Success:
    """A handler's success waiting to be written: JSON text and how long the handler took."""

    job: Job
    result: str | None
    next_jobs: str | None
    duration: float


def _unattached_recorded(item: Success, held: bool) -> None:
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
        self.give_up_at = math.inf
        self._pending: list[Success] = []
        self._in_flight = 0  # successes taken by the flusher and not yet reported
        self._kick = anyio.Event()
        self._flushed = Wake()
        self._recorded: Callable[[Success, bool], None] = _unattached_recorded
        self._refused: Callable[[Success, Exception], Awaitable[None]] = _unattached_refused

    def attach(
        self,
        recorded: Callable[[Success, bool], None],
        refused: Callable[[Success, Exception], Awaitable[None]],
    ) -> None:
        """Say what to do once a success is written (``recorded(item, held)``: plain call,
        ``held`` False if the lease was lost or the write was given up at shutdown) or once
        PostgreSQL refused it alone (``refused(item, error)``: awaited by the flusher, in
        its shielded scope; it should fail the attempt).
        """
        self._recorded = recorded
        self._refused = refused

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
        while True:
            await self._kick.wait()
            self._kick = anyio.Event()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._in_flight = len(batch)
                try:
                    with anyio.CancelScope(shield=True):
                        await self._flush(batch)
                finally:
                    self._in_flight = 0
                    self._flushed.set()

    def add_success(
        self, job: Job, result: str | None, next_jobs: str | None, duration: float
    ) -> None:
        """Queue the job's success (JSON-encoded result) for the flusher; returns at once.

        What happens next is reported through the callbacks given to :meth:`attach`.
        """
        self._pending.append(Success(job, result, next_jobs, duration))
        self._kick.set()

    async def fail(self, job: Job, error: str) -> str | None:
        """Fail the attempt; returns the job's new state, or None if the lease was lost."""
        state: str | None = await self._write(
            f"the failure of job {job.id}",
            lambda c: c.fetchval(_FAIL, job.id, self.worker_id, error),
        )
        return state

    async def release(self, job: Job) -> bool:
        """Give the job back unfinished (the attempt is not counted); False if not held."""
        held: bool | None = await self._write(
            f"the release of job {job.id}", lambda c: c.fetchval(_RELEASE, job.id, self.worker_id)
        )
        return bool(held)

    async def _flush(self, batch: list[Success]) -> None:
        """Write one batch; if PostgreSQL refuses it, write its jobs one by one to find why."""
        try:
            ids = [i.job.id for i in batch]
            what = (
                f"the success of job {ids[0]}"
                if len(ids) == 1
                else f"the successes of {len(ids)} jobs ({ids[0]}, ... {ids[-1]})"
            )
            rows = await self._write(
                what,
                lambda c: c.fetch(
                    _COMPLETE_MANY,
                    self.worker_id,
                    ids,
                    [i.result for i in batch],
                    [i.next_jobs for i in batch],
                ),
            )
        except Exception as exc:
            if len(batch) == 1:
                self._in_flight -= 1
                await self._refused(batch[0], exc)
                return
            for item in batch:
                await self._flush([item])
            return
        recorded = self._recorded
        if rows is None:  # given up at shutdown
            for item in batch:
                self._in_flight -= 1
                recorded(item, False)
            return
        held = {row[0] for row in rows}
        for item in batch:
            self._in_flight -= 1  # counted down first: the callback sees what is left
            recorded(item, item.job.id in held)

    async def _write(self, what: str, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T | None:
        """Run ``op`` on a pooled connection, retrying outages; None if given up at shutdown."""
        backoff = Backoff(base=0.05, cap=5.0)
        with anyio.CancelScope(shield=True):
            while True:
                try:
                    async with self.pool.acquire(timeout=STATEMENT_TIMEOUT) as conn:
                        value = await op(conn)
                    self.outage.ok()
                    return value
                except Exception as exc:
                    if not is_connection_error(exc):
                        raise
                    self.outage.failed(exc, f"recording {what}")
                    if time.monotonic() >= self.give_up_at:
                        self.logger.error(
                            "gave up recording %s at shutdown; stale recovery will requeue it",
                            what,
                        )
                        return None
                    await backoff.sleep()
        raise AssertionError("unreachable: a shield scope never swallows an exception")
