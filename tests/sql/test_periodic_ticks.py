"""enqueue_periodic: each tick of a schedule is one job, whichever sessions race for it."""

from __future__ import annotations

import asyncio
import datetime

import asyncpg
import pytest
from sqlharness import Connect, sessions, wait_blocked

TICK = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.UTC)
ENQUEUE = "SELECT pgqueue.enqueue_periodic($1, $2, $3)"
SPEC = {"job_type": "report", "payload": {"kind": "daily"}}


async def test_racers_for_one_tick_wait_and_exactly_one_enqueues(connect: Connect) -> None:
    observer, a, *others = await sessions(connect, "obs", "a", "b", "c", "d")
    await a.begin()
    first = await a.fetchval(ENQUEUE, "daily", TICK, SPEC)
    steps = [s.start(s.fetchval(ENQUEUE, "daily", TICK, SPEC)) for s in others]
    await wait_blocked(observer.conn, *others)  # on the schedule's row, not racing past it
    await a.commit()
    assert await asyncio.gather(*steps) == [None, None, None]
    rows = await observer.fetch("SELECT id, run_after, payload FROM pgqueue.jobs")
    assert [tuple(r) for r in rows] == [(first, TICK, {"kind": "daily"})]
    assert await observer.fetchval("SELECT last_job_id FROM pgqueue.periodic") == first


async def test_a_racer_enqueues_the_tick_when_the_first_rolls_back(connect: Connect) -> None:
    observer, a, b, c = await sessions(connect, "obs", "a", "b", "c")
    await a.begin()
    await a.fetchval(ENQUEUE, "daily", TICK, SPEC)
    steps = [s.start(s.fetchval(ENQUEUE, "daily", TICK, SPEC)) for s in (b, c)]
    await wait_blocked(observer.conn, b, c)
    await a.rollback()
    ids = await asyncio.gather(*steps)
    assert sorted(ids, key=lambda i: i is None)[1] is None and any(ids)
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1


async def test_only_a_later_tick_enqueues_again(connect: Connect) -> None:
    (s,) = await sessions(connect, "s")
    hour = datetime.timedelta(hours=1)
    first = await s.fetchval(ENQUEUE, "hourly", TICK, SPEC)
    assert await s.fetchval(ENQUEUE, "hourly", TICK, SPEC) is None  # the same tick
    assert await s.fetchval(ENQUEUE, "hourly", TICK - hour, SPEC) is None  # an older one
    later = await s.fetchval(ENQUEUE, "hourly", TICK + hour, {**SPEC, "run_after": "2031-01-01"})
    assert first is not None and later is not None and later != first
    # A JSON null run_after is no run_after: the job runs at its tick.
    nulled = await s.fetchval(ENQUEUE, "hourly", TICK + 2 * hour, {**SPEC, "run_after": None})
    assert await s.fetchval("SELECT run_after FROM pgqueue.jobs WHERE id = $1", nulled) == (
        TICK + 2 * hour
    )
    # Another schedule has a row of its own.
    assert await s.fetchval(ENQUEUE, "other", TICK, SPEC) is not None
    rows = await s.fetch("SELECT id, run_after FROM pgqueue.jobs ORDER BY id")
    assert [r["run_after"] for r in rows][:2] == [
        TICK,
        datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC),  # the spec's own run_after wins
    ]


async def test_a_tick_with_a_dedup_key_coalesces_into_the_pending_one(connect: Connect) -> None:
    (s,) = await sessions(connect, "s")
    spec = {**SPEC, "dedup_key": "report:daily"}
    first = await s.fetchval(ENQUEUE, "daily", TICK, spec)
    second = await s.fetchval(ENQUEUE, "daily", TICK + datetime.timedelta(days=1), spec)
    assert second == first  # still queued: no second report
    assert await s.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1
    assert await s.fetchval("SELECT last_tick FROM pgqueue.periodic") == TICK + datetime.timedelta(
        days=1
    )


@pytest.mark.parametrize(
    ("name", "tick", "spec", "message"),
    [
        ("", TICK, SPEC, "name must be a non-empty string"),
        (None, TICK, SPEC, "name must be a non-empty string"),
        ("x" * 201, TICK, SPEC, "name must be a non-empty string of at most 200 bytes"),
        ("daily", None, SPEC, "tick must be a finite timestamp, got NULL"),
        ("daily", "infinity", SPEC, "tick must be a finite timestamp, got infinity"),
        ("daily", TICK, None, "spec must be a JSON object, got NULL"),
        ("daily", TICK, [SPEC], "spec must be a JSON object, got array"),
        ("daily", TICK, {"job_type": ""}, "pgqueue.enqueue_periodic: spec: job_type must be"),
        ("daily", TICK, {**SPEC, "queue": 5}, "pgqueue.enqueue_periodic: spec: queue"),
    ],
    ids=["empty", "null", "long", "no-tick", "infinite", "no-spec", "array", "no-type", "queue"],
)
async def test_bad_input_is_named_and_writes_nothing(
    connect: Connect, name: str | None, tick: object, spec: object, message: str
) -> None:
    (s,) = await sessions(connect, "s")
    sql = ENQUEUE if tick != "infinity" else "SELECT pgqueue.enqueue_periodic($1, 'infinity', $2)"
    args = (name, tick, spec) if tick != "infinity" else (name, spec)
    with pytest.raises(asyncpg.exceptions.InvalidParameterValueError, match=message):
        await s.fetchval(sql, *args)
    counts = await s.conn.fetchrow(
        "SELECT (SELECT count(*) FROM pgqueue.periodic) AS p, (SELECT count(*) FROM pgqueue.jobs) AS j"
    )
    assert tuple(counts) == (0, 0)
