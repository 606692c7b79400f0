"""prune_expired(): retention by settings.prune_after, a batch at a time, oldest first."""

from __future__ import annotations

import asyncpg
from sqlharness import Connect, finishes_unblocked, sessions

AGE = "UPDATE pgqueue.jobs SET finished_at = now() - $2::text::interval WHERE id = $1"
IDS = "SELECT id FROM pgqueue.jobs ORDER BY id"


async def _finished(
    conn: asyncpg.Connection, age: str, *, state: str = "succeeded", **spec: object
) -> int:
    """A job that ended ``state`` ``age`` ago."""
    job: int = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', scope => $1::jsonb, max_attempts => 1)", spec.get("scope")
    )
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    if state == "succeeded":
        assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job)
    else:
        assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", job) == "failed"
    await conn.execute(AGE, job, age)
    return job


async def _ids(conn: asyncpg.Connection) -> list[int]:
    return [r["id"] for r in await conn.fetch(IDS)]


async def test_it_deletes_final_jobs_past_prune_after_oldest_first_a_batch_at_a_time(
    conn: asyncpg.Connection,
) -> None:
    """The default is 7 days. Kept: younger jobs, unfinished ones, a scope's current job."""
    assert await conn.fetchval("SELECT value FROM pgqueue.settings WHERE name = 'prune_after'") == (
        "7 days"
    )
    oldest = await _finished(conn, "30 days", state="failed")
    older = await _finished(conn, "20 days")
    old = await _finished(conn, "8 days")
    current = await _finished(conn, "30 days", scope='{"s": 1}')
    young = await _finished(conn, "6 days")
    queued = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    assert await conn.fetchval("SELECT pgqueue.prune_expired(2)") == 2
    assert await _ids(conn) == [old, current, young, queued]
    assert await conn.fetchval("SELECT pgqueue.prune_expired(2)") == 1
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 0
    assert await _ids(conn) == [current, young, queued]
    assert {oldest, older}.isdisjoint(await _ids(conn))


async def test_never_keeps_everything_and_a_shorter_setting_takes_effect_at_once(
    conn: asyncpg.Connection,
) -> None:
    job = await _finished(conn, "400 days")
    await conn.execute("UPDATE pgqueue.settings SET value = 'never' WHERE name = 'prune_after'")
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 0
    assert await _ids(conn) == [job]
    young = await _finished(conn, "2 hours")
    await conn.execute("UPDATE pgqueue.settings SET value = '1 hour' WHERE name = 'prune_after'")
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 2
    assert young not in await _ids(conn)


async def test_it_never_waits_for_a_row_another_transaction_holds(connect: Connect) -> None:
    """A retry under way holds the job (and share-locks its dependencies): waiting for it,
    a batch deadlocked with retries and enqueues that lock rows in another order, and made
    them queue behind its own locks. The batch skips such rows, and deletes the rest."""
    observer, retrier, pruner = await sessions(connect, "obs", "retry", "prune")
    job = await _finished(observer.conn, "30 days", state="failed")
    other = await _finished(observer.conn, "30 days")
    await retrier.begin()
    assert await retrier.fetchval("SELECT pgqueue.retry($1)", job) is True
    assert (
        await finishes_unblocked(
            observer.conn, pruner, pruner.fetchval("SELECT pgqueue.prune_expired()")
        )
        == 1
    )
    await retrier.commit()
    assert await _ids(observer.conn) == [job]
    state = await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job)
    assert state == "queued"
    assert other not in await _ids(observer.conn)


async def test_it_drops_abort_requests_whose_job_no_longer_runs(conn: asyncpg.Connection) -> None:
    job = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    assert await conn.fetchval("SELECT pgqueue.abort($1)", job) == "running"
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job)  # a success wins
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 1
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 0


async def test_it_never_waits_for_an_abort_request_another_transaction_holds(
    connect: Connect,
) -> None:
    observer, holder, pruner = await sessions(connect, "obs", "hold", "prune")
    job = await observer.fetchval("SELECT pgqueue.enqueue('t')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    assert await observer.fetchval("SELECT pgqueue.abort($1)", job) == "running"
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'w')", job)  # a success wins
    await holder.begin()
    await holder.fetch("SELECT job_id FROM pgqueue.abort_requests FOR UPDATE")
    prune = pruner.fetchval("SELECT pgqueue.prune_expired()")
    assert await finishes_unblocked(observer.conn, pruner, prune) == 0
    await holder.commit()
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 1
    assert await observer.fetchval("SELECT pgqueue.prune_expired()") == 0
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 0
