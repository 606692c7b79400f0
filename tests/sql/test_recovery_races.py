"""Leases and fencing: recovery never loses a job or lets a stale worker overwrite it."""

from __future__ import annotations

import asyncpg
import pytest
from sqlharness import Connect, finishes_unblocked, sessions, wait_blocked

STALE = "UPDATE pgqueue.jobs SET locked_at = now() - interval '1 hour' WHERE id = $1"


async def test_recover_first_then_late_complete_is_fenced(connect: Connect) -> None:
    observer, recoverer, worker = await sessions(connect, "obs", "r", "w")
    job = await observer.fetchval("SELECT pgqueue.enqueue('t')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w-old')", job)
    await observer.conn.execute(STALE, job)

    await recoverer.begin()
    assert [r[0] for r in await recoverer.fetch("SELECT pgqueue.recover_stale()")] == [job]
    step = worker.start(
        worker.fetchval("SELECT pgqueue.complete($1, 'w-old', '{\"late\": true}')", job)
    )
    await wait_blocked(observer.conn, worker)
    await recoverer.commit()
    assert await step is False
    row = await observer.conn.fetchrow(
        "SELECT state, attempts, locked_by, result, last_error FROM pgqueue.jobs WHERE id = $1", job
    )
    assert (row["state"], row["attempts"], row["locked_by"], row["result"]) == (
        "queued",
        1,
        None,
        None,
    )
    assert "stale" in row["last_error"] and "w-old" in row["last_error"]
    # The job runs again under a new worker; the old one still cannot touch it.
    assert [
        r["attempts"]
        for r in await observer.fetch("SELECT attempts FROM pgqueue.claim($1, 'w-new')", job)
    ] == [2]
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'w-old')", job) is False
    assert await observer.fetchval("SELECT pgqueue.fail($1, 'w-old', 'x')", job) is None
    assert await observer.fetchval("SELECT pgqueue.release($1, 'w-old')", job) is False
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'w-new')", job) is True


async def test_complete_first_then_recover_finds_nothing(connect: Connect) -> None:
    observer, recoverer, worker = await sessions(connect, "obs", "r", "w")
    job = await observer.fetchval("SELECT pgqueue.enqueue('t')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    await observer.conn.execute(STALE, job)
    await worker.begin()
    assert await worker.fetchval("SELECT pgqueue.complete($1, 'w')", job) is True
    # The row is locked by the completing worker: recovery skips it instead of waiting.
    assert await recoverer.fetch("SELECT pgqueue.recover_stale()") == []
    await worker.commit()
    assert await recoverer.fetch("SELECT pgqueue.recover_stale()") == []
    assert (
        await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job) == "succeeded"
    )


async def test_recovery_fails_job_when_attempts_are_spent(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    job = await observer.fetchval("SELECT pgqueue.enqueue('t', max_attempts => 1)")
    child = await observer.fetchval(
        "SELECT pgqueue.enqueue('c', depends_on => ARRAY[$1]::bigint[])", job
    )
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    await observer.conn.execute(STALE, job)
    assert [r[0] for r in await observer.fetch("SELECT pgqueue.recover_stale()")] == [job]
    row = await observer.conn.fetchrow(
        "SELECT state, finished_at, locked_by FROM pgqueue.jobs WHERE id = $1", job
    )
    assert row["state"] == "failed" and row["finished_at"] is not None and row["locked_by"] == "w"
    assert (
        await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", child)
        == "cancelled"
    )


async def test_zero_recovers_every_lease_taken_before_the_call(connect: Connect) -> None:
    """``recover_stale(interval '0')``: every job claimed in an earlier transaction is stale
    (a test, or an operator who knows every worker is dead); one claimed in the calling
    transaction is not. A negative interval is refused (test_bad_input)."""
    (observer,) = await sessions(connect, "obs")
    earlier = await observer.fetchval("SELECT pgqueue.enqueue('t')")
    now = await observer.fetchval("SELECT pgqueue.enqueue('t')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", earlier)
    await observer.begin()
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", now)
    recovered = await observer.fetch("SELECT pgqueue.recover_stale(interval '0')")
    await observer.commit()
    assert [r[0] for r in recovered] == [earlier]
    states = await observer.fetch("SELECT id, state FROM pgqueue.jobs ORDER BY id")
    assert [tuple(r) for r in states] == [(earlier, "queued"), (now, "running")]


async def test_heartbeat_keeps_long_job_and_stale_after_comes_from_settings(
    connect: Connect,
) -> None:
    (observer,) = await sessions(connect, "obs")
    conn = observer.conn
    job = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    other = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w1')", job)
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w2')", other)
    await conn.execute(
        "UPDATE pgqueue.jobs SET locked_at = now() - interval '10 minutes' WHERE state = 'running'"
    )
    assert await conn.fetchval("SELECT pgqueue.heartbeat('w1')") == 1
    assert [r["id"] for r in await conn.fetch("SELECT id FROM pgqueue.stale_jobs")] == [other]
    await conn.execute("UPDATE pgqueue.settings SET value = '1 hour' WHERE name = 'stale_after'")
    assert await conn.fetch("SELECT pgqueue.recover_stale()") == []
    assert [
        r[0] for r in await conn.fetch("SELECT pgqueue.recover_stale(interval '5 minutes')")
    ] == [other]
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job) == "running"


async def test_heartbeat_skips_a_job_locked_elsewhere_instead_of_waiting(connect: Connect) -> None:
    """An application transaction that enqueued a dependent of a running job holds that job
    FOR SHARE until it commits. The worker's heartbeat must not queue behind it: a waiting
    beat refreshes none of the worker's leases, and they all go stale together."""
    observer, app, beat = await sessions(connect, "obs", "app", "beat")
    held = await observer.fetchval("SELECT pgqueue.enqueue('t')")
    free = await observer.fetchval("SELECT pgqueue.enqueue('t')")
    for job in (held, free):
        await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
        await observer.conn.execute(STALE, job)
    await app.begin()
    await app.fetchval("SELECT pgqueue.enqueue('child', depends_on => ARRAY[$1]::bigint[])", held)
    with pytest.raises(asyncpg.LockNotAvailableError):  # the row lock is really held
        await observer.fetch("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR UPDATE NOWAIT", held)

    assert (
        await finishes_unblocked(
            observer.conn, beat, beat.fetchval("SELECT pgqueue.heartbeat('w')")
        )
        == 1
    )
    fresh = "SELECT id FROM pgqueue.jobs WHERE state = 'running' AND locked_at > now() - interval '1 minute'"
    assert [r["id"] for r in await observer.fetch(fresh)] == [free]
    # Recovery skips the locked row as well: nothing is requeued under the live worker.
    assert await observer.fetch("SELECT pgqueue.recover_stale()") == []

    await app.commit()
    assert await beat.fetchval("SELECT pgqueue.heartbeat('w')") == 2
    assert sorted(r["id"] for r in await observer.fetch(fresh)) == sorted([held, free])


async def test_release_gives_back_without_counting_the_attempt(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    conn = observer.conn
    job = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    first = await conn.fetchrow("SELECT attempts, started_at FROM pgqueue.claim($1, 'w')", job)
    assert first["attempts"] == 1
    assert await conn.fetchval("SELECT pgqueue.release($1, 'w')", job) is True
    row = await conn.fetchrow(
        "SELECT state, attempts, locked_by, locked_at, started_at FROM pgqueue.jobs WHERE id = $1",
        job,
    )
    assert tuple(row) == ("queued", 0, None, None, first["started_at"])
    assert await conn.fetchval("SELECT pgqueue.release($1, 'w')", job) is False
