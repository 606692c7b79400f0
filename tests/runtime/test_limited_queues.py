"""Two workers share a queue's limit, and a place freed by one wakes the other."""

from __future__ import annotations

import datetime
import re
import time
from typing import Any

import anyio
import asyncpg
import pytest
from runtime_helpers import running
from worker_harness import wait_for_states, wait_until

import pgqueue


async def test_two_workers_never_run_more_than_the_limit_and_need_no_poll(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    app = pgqueue.App()
    now_running = 0
    most = 0
    finish = anyio.Event()

    @app.job("slow", queue="api")
    async def slow(job: pgqueue.Job) -> None:
        nonlocal now_running, most
        now_running += 1
        most = max(most, now_running)
        try:
            with anyio.move_on_after(0.05):
                await finish.wait()
        finally:
            now_running -= 1

    assert await pgqueue.set_queue_limit(conn, "api", 2) is None
    assert await pgqueue.queue_limits(conn) == {"api": 2}
    # A poll once a minute: only the notifications of freed places keep the jobs going.
    async with (
        running(app, db_dsn, concurrency=5, poll_interval=60),
        running(app, db_dsn, concurrency=5, poll_interval=60),
    ):
        jobs = [await app.enqueue(conn, "slow") for _ in range(12)]
        await wait_for_states(conn, jobs, within=20)
    assert most == 2


async def test_a_woken_worker_waits_for_a_busy_limit_lock_instead_of_notifying_in_a_loop(
    db_dsn: str, conn: asyncpg.Connection, connect: Any
) -> None:
    """In when_waiting mode claim_or_wait only tries a limit lock and announces a queue whose
    lock is taken; the worker it wakes claims with claim_next, which waits for the lock. A
    worker that went on with claim_or_wait announced the queue to itself again and again
    while the lock's holder stayed open."""
    await conn.execute("UPDATE pgqueue.settings SET value = 'when_waiting' WHERE name = 'notify'")
    app = pgqueue.App()

    @app.job("call", queue="api")
    async def call(job: pgqueue.Job) -> None:
        return None

    await pgqueue.set_queue_limit(conn, "api", 3)
    held = await app.enqueue(conn, "call", delay=datetime.timedelta(hours=1))
    holder = await connect()
    announced = 0

    def count(*args: object) -> None:
        nonlocal announced
        announced += args[-1] == "api"

    listener = await connect()
    await listener.add_listener("pgqueue", count)
    async with running(app, db_dsn, concurrency=2, poll_interval=60, queues=["api"]):
        async with holder.transaction():
            # An application's claim holds the queue's limit lock until it commits.
            await holder.execute("UPDATE pgqueue.jobs SET run_after = now() WHERE id = $1", held)
            assert await holder.fetchval("SELECT id FROM pgqueue.claim($1, 'app')", held) == held
            job = await app.enqueue(conn, "call")

            async def worker_waits_for_the_lock() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                        " AND classid = 7216009 AND NOT granted AND database ="
                        " (SELECT oid FROM pg_database WHERE datname = current_database())"
                    )
                )

            await wait_until(worker_waits_for_the_lock, what="the worker waiting for the lock")
            seen = announced
            await anyio.sleep(0.3)  # a looping worker sent hundreds in this time
            assert announced - seen <= 1
        await wait_for_states(conn, [job])


@pytest.mark.parametrize(
    ("max_running", "error", "message"),
    [
        (True, TypeError, "max_running must be an int or None, got True"),
        ("3", TypeError, "max_running must be an int or None, got '3'"),
        (2.0, TypeError, "max_running must be an int or None, got 2.0"),
        (0, ValueError, "max_running must be from 1 to 2147483647 (None removes the limit), got 0"),
        (2**31, ValueError, "max_running must be from 1 to 2147483647"),
    ],
)
async def test_a_bad_limit_is_refused_before_anything_is_written(
    conn: asyncpg.Connection, max_running: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        await pgqueue.set_queue_limit(conn, "api", max_running)  # type: ignore[arg-type]
    assert await pgqueue.queue_limits(conn) == {}


async def test_the_look_before_sleeping_reads_from_the_last_claim(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[Any, Any]
) -> None:
    """From a review of time handling: a job that fell due after a claim's now() and before
    the look for the next scheduled job was neither claimed nor looked at, and waited for
    the poll. The producer passes the look the seconds since its last claim was sent: a
    job due since then wakes it at once; one due before it (a limited queue's job it could
    not take) does not, or it would claim in a loop."""
    from pgqueue.worker.completer import Completer
    from pgqueue.worker.executor import Executor
    from pgqueue.worker.producer import Producer
    from pgqueue.worker.wake import Wake

    logger, _ = records
    await conn.execute(
        "SELECT pgqueue.enqueue('t', queue => 'q', run_after => clock_timestamp()"
        " - interval '0.5 seconds')"
    )
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=2)
    try:
        wake = Wake()
        executor = Executor(pgqueue.App(), Completer(pool, "w", logger), 1, logger, wake)
        producer = Producer(
            pool, executor, wake, worker_id="w", queues=["q"], poll_interval=30, logger=logger
        )
        try:
            producer._claim_sent = time.monotonic() - 1.0  # the claim before it fell due
            assert await producer._before_sleep() == 0.0
            producer._claim_sent = time.monotonic()  # a claim after: it saw the job due
            assert await producer._before_sleep() >= 0.8 * 30
        finally:
            await producer._release()
    finally:
        await pool.close()
