"""NOTIFY pgqueue, <queue>: once per queue per statement, only when jobs enter queued."""

from __future__ import annotations

import asyncio
import time

import asyncpg
from sqlharness import Connect, json_codecs


class Listener:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.got: list[str] = []

    def __call__(self, _c: object, _pid: int, channel: str, payload: str) -> None:
        assert channel == "pgqueue"
        self.got.append(payload)

    async def drain(self, expect: int = 0) -> list[str]:
        """Everything delivered so far, after waiting for ``expect`` notifications.

        A notification that reaches the listening backend while it runs a query is sent after
        that query's reply, so one round trip is not enough: poll with round trips until the
        expected count arrived (bounded), and for an expected silence give late ones a moment.
        """
        deadline = time.monotonic() + 5.0
        settled = False  # once the expected count is in, extras get 0.1 s more to show up
        while time.monotonic() < deadline:
            await self.conn.execute("SELECT 1")
            await asyncio.sleep(0.005)
            if not settled and len(self.got) >= expect:
                settled, deadline = True, time.monotonic() + 0.1
        out, self.got = self.got, []
        return out


async def _setup(connect: Connect) -> tuple[asyncpg.Connection, Listener]:
    listen_conn = await connect()
    listener = Listener(listen_conn)
    await listen_conn.add_listener("pgqueue", listener)
    conn = await json_codecs(await connect())
    return conn, listener


async def test_bulk_insert_sends_one_notification_per_queue(connect: Connect) -> None:
    conn, listener = await _setup(connect)
    specs = [{"job_type": "t", "queue": "a" if i % 2 else "b"} for i in range(1000)]
    await conn.fetch("SELECT pgqueue.enqueue_many($1::jsonb)", specs)
    assert sorted(await listener.drain(2)) == ["a", "b"]


async def test_silent_for_zero_rows_waiting_jobs_and_claims(connect: Connect) -> None:
    conn, listener = await _setup(connect)
    await conn.execute("INSERT INTO pgqueue.jobs (job_type) SELECT 't' WHERE false")
    await conn.execute("UPDATE pgqueue.jobs SET priority = 1 WHERE false")
    parent = await conn.fetchval("SELECT pgqueue.enqueue('p', queue => 'q1')")
    assert await listener.drain(1) == ["q1"]
    await conn.fetchval(
        "SELECT pgqueue.enqueue('c', queue => 'q2', depends_on => ARRAY[$1]::bigint[])", parent
    )
    await conn.fetch("SELECT id FROM pgqueue.claim_next('w')")
    assert await listener.drain() == []
    # Unblocking by fan-in notifies the child's queue.
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", parent)
    assert await listener.drain(1) == ["q2"]


async def test_requeue_paths_notify(connect: Connect) -> None:
    conn, listener = await _setup(connect)
    job = await conn.fetchval("SELECT pgqueue.enqueue('t', queue => 'r', max_attempts => 3)")
    await listener.drain()
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'x', interval '0')", job)
    assert await listener.drain(1) == ["r"]  # retried
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    assert await conn.fetchval("SELECT pgqueue.release($1, 'w')", job)
    assert await listener.drain(1) == ["r"]  # released
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    assert await conn.fetchval("SELECT pgqueue.snooze($1, 'w', interval '0')", job)
    assert await listener.drain(1) == ["r"]  # snoozed
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    await conn.execute(
        "UPDATE pgqueue.jobs SET locked_at = now() - interval '1 day' WHERE id = $1", job
    )
    await conn.fetch("SELECT pgqueue.recover_stale()")
    assert await listener.drain(1) == ["r"]  # recovered
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'x')", job) == "failed"
    assert await listener.drain() == []
    assert await conn.fetchval("SELECT pgqueue.retry($1)", job)
    assert await listener.drain(1) == ["r"]  # retried by an operator


async def test_nothing_delivered_before_commit(connect: Connect) -> None:
    conn, listener = await _setup(connect)
    async with conn.transaction():
        await conn.fetchval("SELECT pgqueue.enqueue('t')")
        assert await listener.drain() == []
    assert await listener.drain(1) == ["default"]
