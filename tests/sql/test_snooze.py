"""snooze(): a running job goes back to the queue for later, the attempt not counted.

Its locks and its abort/pipeline handling are release()'s (one function does both); the
race and lock-order tests that cover release are parametrized with snooze too
(test_pipelines, test_scope_heads, test_abort, test_notify). These are its own semantics.
"""

from __future__ import annotations

import asyncpg
import pytest

SNOOZE = "SELECT pgqueue.snooze($1, $2, $3::text::interval)"
ROW = (
    "SELECT state, attempts, locked_by, locked_at, is_current, dedup_key, last_error,"
    " run_after - now() AS wait FROM pgqueue.jobs WHERE id = $1"
)


async def _running(conn: asyncpg.Connection, **spec: object) -> int:
    job: int = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', max_attempts => $1, scope => $2::jsonb, dedup_key => $3)",
        spec.get("max_attempts", 1),
        spec.get("scope"),
        spec.get("dedup_key"),
    )
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", job) == 1
    return job


async def test_a_snoozed_job_waits_for_its_delay_and_keeps_its_attempts(
    conn: asyncpg.Connection,
) -> None:
    """max_attempts 1: were the attempt counted, the job could never run again."""
    job = await _running(conn)
    for _ in range(3):
        assert await conn.fetchval(SNOOZE, job, "w", "1 hour") == "queued"
        row = await conn.fetchrow(ROW, job)
        assert (row["state"], row["attempts"], row["locked_by"], row["locked_at"]) == (
            "queued",
            0,
            None,
            None,
        )
        assert 3590 < row["wait"].total_seconds() <= 3600
        assert await conn.fetch("SELECT id FROM pgqueue.claim_next('w')") == []
        await conn.execute("UPDATE pgqueue.jobs SET run_after = now() WHERE id = $1", job)
        claimed = await conn.fetch("SELECT id, attempts FROM pgqueue.claim_next('w')")
        assert [tuple(r) for r in claimed] == [(job, 1)]
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job) is True


async def test_a_zero_delay_makes_it_claimable_at_once_behind_jobs_due_earlier(
    conn: asyncpg.Connection,
) -> None:
    """release keeps run_after (the job goes back to the front); snooze sets it to now()."""
    job = await _running(conn)
    await conn.execute(
        "UPDATE pgqueue.jobs SET run_after = now() - interval '1 hour' WHERE id = $1", job
    )
    due = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', run_after => now() - interval '1 minute')"
    )
    assert await conn.fetchval(SNOOZE, job, "w", "0") == "queued"
    claimed = await conn.fetch("SELECT id FROM pgqueue.claim_next('w', batch_size => 2)")
    assert [r["id"] for r in claimed] == [due, job]


async def test_only_the_holder_can_snooze(conn: asyncpg.Connection) -> None:
    job = await _running(conn)
    before = await conn.fetchrow(ROW, job)
    assert await conn.fetchval(SNOOZE, job, "other", "1 minute") is None
    assert await conn.fetchval(SNOOZE, job + 1000, "w", "1 minute") is None
    after = await conn.fetchrow(ROW, job)
    assert {k: after[k] for k in after.keys() if k != "wait"} == {
        k: before[k] for k in before.keys() if k != "wait"
    }
    assert before["locked_by"] == "w"
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job) is True
    assert await conn.fetchval(SNOOZE, job, "w", "1 minute") is None


@pytest.mark.parametrize(
    "delay", [None, "-1 second", "1 day -25 hours", "101 years", "300000 years", "-300000 years"]
)
async def test_a_delay_that_is_missing_negative_or_past_a_century_is_refused_by_name(
    conn: asyncpg.Connection, delay: str | None
) -> None:
    """Checked on the time it gives, not on the interval; 300,000 years would overflow
    timestamptz with an error naming neither snooze nor the delay."""
    job = await _running(conn)
    with pytest.raises(asyncpg.InvalidParameterValueError) as raised:
        await conn.fetchval(SNOOZE, job, "w", delay)
    shown = (
        "NULL" if delay is None else await conn.fetchval("SELECT $1::text::interval::text", delay)
    )
    assert str(raised.value) == f"pgqueue.snooze: delay must be from 0 to 100 years, got {shown}"
    row = await conn.fetchrow(ROW, job)
    assert (row["state"], row["attempts"], row["locked_by"]) == ("running", 1, "w")


async def test_a_century_of_days_is_within_the_bound(conn: asyncpg.Connection) -> None:
    """pgqueue.Snooze's own bound, 36,500 days, is less than 100 calendar years."""
    job = await _running(conn)
    assert await conn.fetchval(SNOOZE, job, "w", "36500 days") == "queued"


async def test_a_snoozed_scoped_job_stays_current_and_ahead_of_its_scope(
    conn: asyncpg.Connection,
) -> None:
    scope = '{"tenant": 1}'
    job = await _running(conn, scope=scope)
    later = await conn.fetchval("SELECT pgqueue.enqueue('t', scope => $1::jsonb)", scope)
    assert await conn.fetchval(SNOOZE, job, "w", "1 hour") == "queued"
    assert (await conn.fetchrow(ROW, job))["is_current"] is True
    # The later job of the scope waits for the snoozed one, whatever its own run_after.
    assert await conn.fetch("SELECT id FROM pgqueue.claim_next('w')") == []
    assert await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", later) == []
    await conn.execute("UPDATE pgqueue.jobs SET run_after = now() WHERE id = $1", job)
    assert [r["id"] for r in await conn.fetch("SELECT id FROM pgqueue.claim_next('w')")] == [job]


async def test_a_snoozed_job_keeps_its_dedup_key_and_absorbs_new_enqueues(
    conn: asyncpg.Connection,
) -> None:
    job = await _running(conn, dedup_key="k")
    assert await conn.fetchval(SNOOZE, job, "w", "1 hour") == "queued"
    assert (await conn.fetchrow(ROW, job))["dedup_key"] == "k"
    assert await conn.fetchval("SELECT pgqueue.enqueue('t', dedup_key => 'k')") == job


async def test_a_snoozed_job_of_a_paused_queue_is_flagged_out_of_the_claim_index(
    conn: asyncpg.Connection,
) -> None:
    job = await _running(conn)
    assert await conn.fetchval("SELECT pgqueue.pause_queue('default')") is True
    assert await conn.fetchval(SNOOZE, job, "w", "0") == "queued"
    assert await conn.fetchval("SELECT queue_paused FROM pgqueue.jobs WHERE id = $1", job)
    assert await conn.fetch("SELECT id FROM pgqueue.claim_next('w')") == []
    assert await conn.fetchval("SELECT pgqueue.resume_queue('default')") is True
    assert [r["id"] for r in await conn.fetch("SELECT id FROM pgqueue.claim_next('w')")] == [job]


async def test_a_snoozed_member_of_a_cancelled_pipeline_ends_cancelled(
    conn: asyncpg.Connection,
) -> None:
    pipeline = await conn.fetchval("SELECT gen_random_uuid()")
    job = await conn.fetchval("SELECT pgqueue.enqueue('t', pipeline_id => $1)", pipeline)
    await conn.fetch("SELECT pgqueue.claim($1, 'w')", job)
    await conn.fetchval("SELECT pgqueue.cancel_pipeline($1)", pipeline)
    assert await conn.fetchval(SNOOZE, job, "w", "1 minute") == "cancelled"
    row = await conn.fetchrow(ROW, job)
    assert (row["state"], row["last_error"]) == (
        "cancelled",
        "snoozed after its pipeline was cancelled",
    )
