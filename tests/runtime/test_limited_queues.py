"""Two workers share a queue's limit, and a place freed by one wakes the other."""

from __future__ import annotations

import anyio
import asyncpg
from runtime_helpers import running
from worker_harness import wait_for_states

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
