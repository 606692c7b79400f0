"""Pipelines under real ``pgqueue worker`` subprocesses (issue 4's "Prove" list, runtime side).

The SQL-level races (200-parent join from 8 sessions, cancel racing complete, random DAGs)
are in tests/sql; these run whole pipelines through handlers that return follow-ups.
"""

from __future__ import annotations

import asyncpg
import pytest
from pipelines_helpers import wait_pipeline_done
from worker_harness import SpawnWorker

import pgqueue

app = pgqueue.App()  # enqueue-only: the handlers live in pipelines_app.py, in the subprocesses


async def test_three_levels_1_50_1_10_under_two_workers(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    workers = [spawn_worker("--concurrency", "8") for _ in range(2)]
    for worker in workers:
        await worker.ready()
    pipe = app.pipeline()
    root_node = pipe.add(
        "spread",
        {"n": 50, "child": "work", "join": "spread", "join_payload": {"n": 10, "child": "work"}},
    )
    run = await pipe.enqueue(db)
    root = run[root_node]

    status = await wait_pipeline_done(db, run.pipeline_id, within=60)
    assert (status["state"], status["jobs"], status["succeeded"]) == ("succeeded", 62, 62)

    jobs = await db.fetch(
        "SELECT id, job_type, pipeline_id, parent_id, attempts, started_at, finished_at"
        " FROM pgqueue.jobs ORDER BY id"
    )
    assert len(jobs) == 62
    assert {j["pipeline_id"] for j in jobs} == {run.pipeline_id}
    by_parent: dict[int | None, list[asyncpg.Record]] = {}
    for j in jobs:
        by_parent.setdefault(j["parent_id"], []).append(j)
    assert [j["id"] for j in by_parent[None]] == [root]
    level2 = by_parent[root]
    assert sorted(j["job_type"] for j in level2) == ["spread"] + ["work"] * 50
    (join,) = [j for j in level2 if j["job_type"] == "spread"]
    mids = [j for j in level2 if j["job_type"] == "work"]
    leaves = by_parent[join["id"]]
    assert [j["job_type"] for j in leaves] == ["work"] * 10
    assert set(by_parent) == {None, root, join["id"]}
    # the join started only after all 50 had succeeded; the leaves only after the join
    assert join["started_at"] >= max(m["finished_at"] for m in mids)
    assert min(leaf["started_at"] for leaf in leaves) >= join["finished_at"]

    # every job ran exactly once, and its handler saw the same pipeline_id and parent_id
    runs = await db.fetch("SELECT job_id, pipeline_id, parent_id FROM runs")
    assert sorted(r["job_id"] for r in runs) == [j["id"] for j in jobs]
    parents = {j["id"]: j["parent_id"] for j in jobs}
    for r in runs:
        assert r["pipeline_id"] == run.pipeline_id
        assert r["parent_id"] == parents[r["job_id"]]


@pytest.mark.parametrize("n", [0, 20])
async def test_dynamic_fan_out_then_a_join_that_runs_exactly_once(
    db: asyncpg.Connection, spawn_worker: SpawnWorker, n: int
) -> None:
    worker = spawn_worker("--concurrency", "8")
    await worker.ready()
    pipe = app.pipeline()
    pipe.add("spread", {"n": n, "child": "work", "child_payload": {"sleep": 0.05}, "join": "work"})
    run = await pipe.enqueue(db)

    await wait_pipeline_done(db, run.pipeline_id)
    status = await app.pipeline_status(db, run.pipeline_id)
    assert status is not None
    assert (status.state, status.jobs, status.succeeded) == ("succeeded", n + 2, n + 2)
    join = await db.fetchrow(
        "SELECT id, started_at FROM pgqueue.jobs WHERE job_type = 'work' AND payload = '{}'"
    )
    assert join is not None
    assert await db.fetchval("SELECT count(*) FROM runs WHERE job_id = $1", join["id"]) == 1
    children = await db.fetch(
        "SELECT finished_at FROM pgqueue.jobs WHERE payload ? 'i' AND state = 'succeeded'"
    )
    assert len(children) == n
    if children:
        assert join["started_at"] >= max(c["finished_at"] for c in children)


async def test_retry_of_a_failed_member_after_a_fix_finishes_the_pipeline(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    await db.execute("UPDATE pgqueue.settings SET value = '1' WHERE name = 'max_attempts'")
    worker = spawn_worker("--concurrency", "4")
    await worker.ready()
    pipe = app.pipeline()
    pipe.add(
        "spread",
        {
            "n": 3,
            "child": "work",
            "child_payload": {"fail_unless_flag": "fixed", "fail_i": 1},
            "join": "work",
        },
    )
    run = await pipe.enqueue(db)

    await wait_pipeline_done(db, run.pipeline_id)
    status = await app.pipeline_status(db, run.pipeline_id)
    assert status is not None
    assert (status.state, status.succeeded, status.failed, status.cancelled) == ("failed", 3, 1, 1)
    failed = await db.fetchrow("SELECT id, last_error FROM pgqueue.jobs WHERE state = 'failed'")
    assert failed is not None and "flag 'fixed' is not set" in failed["last_error"]
    join = await db.fetchrow("SELECT id, last_error FROM pgqueue.jobs WHERE state = 'cancelled'")
    assert join is not None
    assert f"job {failed['id']} failed" in join["last_error"]  # names the failed ancestor

    await db.execute("INSERT INTO flags VALUES ('fixed')")  # the fix
    async with db.transaction():
        assert await db.fetchval("SELECT pgqueue.retry($1)", failed["id"]) is True
        revived = await db.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", join["id"])
        assert revived == "waiting"

    await wait_pipeline_done(db, run.pipeline_id)
    status = await app.pipeline_status(db, run.pipeline_id)
    assert status is not None
    assert (status.state, status.succeeded, status.jobs) == ("succeeded", 5, 5)
    assert await db.fetchval("SELECT count(*) FROM runs WHERE job_id = $1", join["id"]) == 1
