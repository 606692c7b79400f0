"""Which of this worker's running jobs ``pgqueue.abort()`` was called for.

A notification on ``pgqueue_abort`` is a hint, like the queues' notifications: anyone who can
connect can send one, and one sent while the LISTEN connection was reconnecting is lost. So
the worker never acts on a notification's payload. A notification wakes
:func:`abort_loop`, which reads the requests for the jobs running under this worker from
``pgqueue.abort_requests``; the heartbeat reads the same in its round trip, which makes up
for a lost notification within a period. Only a job with a request in the table is
aborted: a stray notification changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import asyncpg

from pgqueue.worker import bounded
from pgqueue.worker.retry import Outage
from pgqueue.worker.wake import Wake

# The jobs running under worker $1 that an abort was asked for, as an array expression (the
# heartbeat selects it beside its beat).
ABORTED_JOBS = (
    "ARRAY(SELECT r.job_id FROM pgqueue.abort_requests r JOIN pgqueue.jobs j ON j.id = r.job_id"
    " WHERE j.state = 'running' AND j.locked_by = $1)"
)
# Bound on one read; past it, the heartbeat's read is the fallback.
READ_TIMEOUT = 10.0


async def abort_loop(
    pool: asyncpg.Pool,
    worker_id: str,
    heard: Wake,
    on_abort: Callable[[list[int]], None],
    logger: logging.Logger,
) -> None:
    """Each time an abort is heard of (``heard``), read this worker's requests and pass the
    job ids to ``on_abort``. Notifications heard during a read are answered by one more
    read. A failed read is logged and left to the heartbeat's."""
    outage = Outage(logger, "aborts")
    while True:
        await heard.wait()
        try:
            ids = await bounded.call(pool, READ_TIMEOUT, _read, worker_id)
        except Exception as exc:
            outage.failed(exc, "reading abort requests")
            continue
        outage.ok()
        if ids:
            on_abort(ids)


async def _read(conn: asyncpg.Connection, worker_id: str) -> list[int]:
    return list(await conn.fetchval(f"SELECT {ABORTED_JOBS}", worker_id) or ())
