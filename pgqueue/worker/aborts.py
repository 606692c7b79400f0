"""Which of this worker's running jobs ``pgqueue.abort()`` was called for.

``pgqueue.abort()``'s notification (``NOTIFY pgqueue, ''``) is a hint, like the queues' ones:
anyone who can connect can send one, and one sent while the LISTEN connection was
reconnecting is lost. So a notification only wakes :func:`abort_loop`, which reads the
requests for the jobs running under this worker from ``pgqueue.abort_requests``; the
heartbeat counts the same requests in its round trip and wakes the loop when there are any,
which makes up for a lost notification within a period. Only a job with a request in the
table is aborted: a stray notification changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Protocol

import anyio
import asyncpg

from pgqueue.job import Job
from pgqueue.worker import bounded
from pgqueue.worker.retry import Outage
from pgqueue.worker.wake import Wake

# The jobs running under worker $1 that an abort was asked for.
_REQUESTED = (
    " FROM pgqueue.abort_requests r JOIN pgqueue.jobs j ON j.id = r.job_id"
    " WHERE j.state = 'running' AND j.locked_by = $1"
)
# How many there are, as an expression the heartbeat selects beside its beat.
REQUESTED_COUNT = f"(SELECT count(*){_REQUESTED})"
_READ = f"SELECT coalesce(array_agg(r.job_id), '{{}}'){_REQUESTED}"
# Bound on one read; past it, the heartbeat's count wakes the loop again.
READ_TIMEOUT = 10.0
# Least time between two reads, failed ones included: a flood of notifications costs each
# worker at most ten reads a second.
READ_GAP = 0.1


class Target(Protocol):
    """What the loop aborts: the executor (see :meth:`Executor.abort`)."""

    @property
    def running(self) -> Mapping[int, Job]: ...

    def abort(self, job_ids: Iterable[int], seen: Mapping[int, Job]) -> None: ...


async def abort_loop(
    pool: asyncpg.Pool, worker_id: str, heard: Wake, target: Target, logger: logging.Logger
) -> None:
    """Each time an abort is heard of (``heard``), read this worker's requests and abort
    those jobs in ``target``. Notifications heard during a read are answered by one more
    read. A failed read is logged; the next notification or the heartbeat, which wakes the
    loop every period while a request is pending, tries again.

    The jobs running here are noted before the read is sent: by the time its answer arrives
    an aborted attempt may have ended, been retried and claimed back by this worker, and
    that new attempt has no request (see :meth:`Executor.abort`, which also wakes the loop
    when a job the read named starts here later).
    """
    outage = Outage(logger, "aborts", "trying again at the next notification or heartbeat")
    while True:
        await heard.wait()
        seen = dict(target.running)
        try:
            ids = await bounded.call(pool, READ_TIMEOUT, _read, worker_id)
        except Exception as exc:
            outage.failed(exc, "reading abort requests")
        else:
            outage.ok()
            target.abort(ids, seen)
        await anyio.sleep(READ_GAP)


async def _read(conn: asyncpg.Connection, worker_id: str) -> list[int]:
    return list(await conn.fetchval(_READ, worker_id))
