"""An outage is logged once when it starts (saying what the component does next) and once
when it ends."""

from __future__ import annotations

import collections
import logging

import anyio
import asyncpg
from runtime_helpers import Records

from pgqueue.worker import bounded
from pgqueue.worker.retry import Outage, is_transient_error


def test_an_outage_is_logged_once_saying_what_happens_next(
    records: tuple[logging.Logger, Records],
) -> None:
    logger, log = records
    lost = asyncpg.ConnectionDoesNotExistError("connection was closed")
    default = Outage(logger, "producer")
    default.failed(lost, "claiming")
    default.failed(lost, "claiming")
    default.ok()
    # The abort reader does not back off: it waits for the next notification or heartbeat.
    aborts = Outage(logger, "aborts", "trying again at the next notification or heartbeat")
    aborts.failed(RuntimeError("boom"), "reading abort requests")
    lines = [r.getMessage() for r in log.records]
    assert lines[0] == (
        "producer: database unavailable while claiming"
        " (ConnectionDoesNotExistError: connection was closed); retrying with backoff"
    )
    assert lines[1].startswith("producer: working again after ")
    assert lines[2] == (
        "aborts: unexpected error while reading abort requests;"
        " trying again at the next notification or heartbeat"
    )
    assert len(lines) == 3


async def test_a_statement_on_a_connection_its_server_just_ended_is_a_connection_error(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """Right after ``pg_terminate_backend``, asyncpg may have read the server's FATAL message
    but not the socket's end: the next statement raises ``InternalClientError: cannot switch
    to state ...``. Taken for PostgreSQL refusing the write, it turned successes into failed
    attempts (a soak: jobs with one attempt ended ``failed``). Pooled connections are killed
    and used at once until that state is met; every error must be one a retry cures."""
    seen: collections.Counter[str] = collections.Counter()

    async def one(c: asyncpg.Connection) -> object:
        return await c.fetchval("SELECT 1")

    for _ in range(200):
        pool = await asyncpg.create_pool(db_dsn, min_size=4, max_size=4)
        try:
            held = [await pool.acquire() for _ in range(4)]
            pids = [c.get_server_pid() for c in held]
            for c in held:
                await pool.release(c)
            await conn.execute("SELECT pg_terminate_backend(p) FROM unnest($1::int[]) p", pids)
            for delay in (0, 0, 0.0005, 0.001, 0.002):
                await anyio.sleep(delay)
                try:
                    await bounded.call(pool, 5, one)
                except Exception as exc:
                    assert is_transient_error(exc), repr(exc)
                    seen[type(exc).__name__] += 1
        finally:
            await pool.close()
        if seen["InternalClientError"]:
            break
    assert seen["InternalClientError"], f"the state was never met in 200 rounds: {seen}"
