"""NOTIFY pgqueue, <queue>: once per queue per statement, only when jobs enter queued."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from sqlharness import Connect, json_codecs, sessions


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
    # The waiting job wakes nobody; the queued dependency it held does (see below).
    assert await listener.drain(1) == ["q1"]
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


HOLDS = {
    # an enqueue share-locks its dependencies
    "depends_on": "SELECT pgqueue.enqueue('c', queue => 'other', depends_on => ARRAY[$1::bigint])",
    # an enqueue of a pending job's key merges into it, locking it
    "dedup_key": "SELECT pgqueue.enqueue('t', queue => 'h', dedup_key => 'k') WHERE $1 > 0",
    "dedup_key_many": 'SELECT pgqueue.enqueue_many(\'[{"job_type": "t", "queue": "h",'
    ' "dedup_key": "k"}]\') WHERE $1 > 0',
    # a retry share-locks the dependencies of the job it retries
    "retry": "SELECT pgqueue.retry(f.id) FROM (SELECT max(id) AS id FROM pgqueue.jobs WHERE job_type = 'f'"
    " AND $1 > 0) f",
}


@pytest.mark.parametrize("hold", list(HOLDS))
async def test_a_queued_job_a_transaction_held_is_announced_at_its_commit(
    connect: Connect, hold: str
) -> None:
    """From review: a claim skips (SKIP LOCKED) a queued job that another transaction holds
    without changing it, and its worker sleeps; nothing announced the job when the lock went,
    so it waited for the worker's poll (5 s by default, seen at 11.7 s in a fan-in)."""
    conn, listener = await _setup(connect)
    holder, claimer = await sessions(connect, "holder", "claimer")
    job = await conn.fetchval("SELECT pgqueue.enqueue('t', queue => 'h', dedup_key => 'k')")
    if hold == "retry":
        failed = await conn.fetchval(
            "SELECT pgqueue.enqueue('f', queue => 'other', depends_on => ARRAY[$1::bigint])", job
        )
        assert await conn.fetchval("SELECT pgqueue.cancel($1)", failed)
    await listener.drain(1)
    await holder.begin()
    await holder.execute(HOLDS[hold], job)
    # The claim skips it: queued and due, but held.
    assert await claimer.fetch("SELECT id FROM pgqueue.claim_next('w', ARRAY['h'])") == []
    assert await listener.drain() == []  # nothing before the commit
    await holder.commit()
    assert await listener.drain(1) == ["h"]
    assert [r["id"] for r in await claimer.fetch("SELECT id FROM pgqueue.claim_next('w')")] == [job]


async def test_a_retry_announces_its_scopes_next_job_in_another_queue(connect: Connect) -> None:
    """From review: claims try the scope's lock and skip the scope while a retry of one of its
    jobs holds it; the scope's next job (older, in another queue: a join queued late) was not
    announced when the retry committed, and waited for the worker's poll."""
    conn, listener = await _setup(connect)
    scope = '{"s": 1}'
    dep = await conn.fetchval("SELECT pgqueue.enqueue('dep', queue => 'c')")
    head = await conn.fetchval(
        "SELECT pgqueue.enqueue('join', queue => 'b', scope => $1::jsonb,"
        " depends_on => ARRAY[$2::bigint])",
        scope,
        dep,
    )
    failed = await conn.fetchval(
        "SELECT pgqueue.enqueue('x', queue => 'a', scope => $1::jsonb, max_attempts => 1)", scope
    )
    assert [
        r["id"] for r in await conn.fetch("SELECT id FROM pgqueue.claim_next('w', ARRAY['a'])")
    ] == [failed]
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", failed) == "failed"
    assert [
        r["id"] for r in await conn.fetch("SELECT id FROM pgqueue.claim_next('w', ARRAY['c'])")
    ] == [dep]
    assert await conn.fetchval(
        "SELECT pgqueue.complete($1, 'w')", dep
    )  # the join: queued, the head
    await listener.drain(3)
    assert await conn.fetchval("SELECT pgqueue.retry($1)", failed)
    assert sorted(await listener.drain(2)) == ["a", "b"]
    assert [r["id"] for r in await conn.fetch("SELECT id FROM pgqueue.claim_next('w')")] == [head]


async def test_a_retry_announces_every_queued_job_it_held(connect: Connect) -> None:
    """From review: a retry share-locks the dependencies of every job it means to revive, and
    announced only those of the jobs it did revive; a dependent left cancelled (another of its
    dependencies failed too) left its queued dependency held and unannounced."""
    conn, listener = await _setup(connect)
    queued = await conn.fetchval("SELECT pgqueue.enqueue('q', queue => 'q2')")
    first, second = [
        await conn.fetchval("SELECT pgqueue.enqueue('f', queue => 'q1', max_attempts => 1)")
        for _ in range(2)
    ]
    dependent = await conn.fetchval(
        "SELECT pgqueue.enqueue('d', queue => 'q3', depends_on => $1::bigint[])",
        [first, second, queued],
    )
    for job in (first, second):
        assert [r["id"] for r in await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)]
        assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", job) == "failed"
    await listener.drain(2)
    assert await conn.fetchval("SELECT pgqueue.retry($1)", first)
    assert (
        await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", dependent)
        == "cancelled"
    )
    assert sorted(await listener.drain(2)) == ["q1", "q2"]
