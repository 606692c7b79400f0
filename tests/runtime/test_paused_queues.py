"""A worker claims nothing of a paused queue, and takes its jobs as soon as it is resumed."""

from __future__ import annotations

import asyncpg
from runtime_helpers import running
from worker_harness import wait_for_states

import pgqueue


def make_app() -> pgqueue.App:
    app = pgqueue.App()

    @app.job("ok")
    async def ok(job: pgqueue.Job) -> None:
        return None

    @app.job("elsewhere", queue="other")
    async def elsewhere(job: pgqueue.Job) -> None:
        return None

    return app


async def test_a_worker_skips_a_paused_queue_and_is_woken_by_its_resume(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    app = make_app()
    assert await pgqueue.pause_queue(conn, "default") is True
    # A long poll: only the resume's notification can wake the worker in time.
    async with running(app, db_dsn, concurrency=4, poll_interval=60):
        paused = await app.enqueue(conn, "ok")
        # Newer, in another queue: the claim that takes it would have taken the older job
        # first, had its queue not been paused.
        other = await app.enqueue(conn, "elsewhere")
        await wait_for_states(conn, [other])
        assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", paused) == (
            "queued"
        )
        assert await pgqueue.paused_queues(conn) == ["default"]
        assert await pgqueue.resume_queue(conn, "default") is True
        await wait_for_states(conn, [paused], within=10)
    assert await pgqueue.paused_queues(conn) == []
