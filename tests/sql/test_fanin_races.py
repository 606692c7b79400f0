"""Fan-in: a join is queued exactly once, however its dependencies finish."""

from __future__ import annotations

import asyncio
import json
import random

import asyncpg
import pytest
from sqlharness import ROW_IS_FREE, Connect, Session, lock_wait_kind, sessions, wait_blocked

AUDIT = """
CREATE TABLE queued_log (job_id bigint, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION log_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.queued_log (job_id) SELECT n.id FROM new_rows n JOIN old_rows o USING (id)
    WHERE n.state = 'queued' AND o.state <> 'queued';
    RETURN NULL;
END $$;
CREATE TRIGGER log_queued AFTER UPDATE ON pgqueue.jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION log_queued();
"""


async def _parents_and_join(conn: asyncpg.Connection, n: int) -> tuple[list[int], int]:
    parents = [
        r[0]
        for r in await conn.fetch(
            "SELECT pgqueue.enqueue_many($1::jsonb)",
            [{"job_type": "p", "payload": {"i": i}} for i in range(n)],
        )
    ]
    join = await conn.fetchval(
        "SELECT pgqueue.enqueue('join', depends_on => $1::bigint[])", parents
    )
    return parents, int(join)


async def test_two_parents_finishing_concurrently_queue_the_join_once(connect: Connect) -> None:
    observer, a, b = await sessions(connect, "obs", "a", "b")
    await observer.conn.execute(AUDIT)
    (p1, p2), join = await _parents_and_join(observer.conn, 2)
    assert (
        await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", join) == "waiting"
    )
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'a')", p1)
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'b')", p2)

    await a.begin()
    assert await a.fetchval("SELECT pgqueue.complete($1, 'a')", p1)
    await b.begin()
    step = b.start(b.fetchval("SELECT pgqueue.complete($1, 'b')", p2))
    await wait_blocked(observer.conn, b)  # b waits on the join row that a locked
    await a.commit()
    assert await step is True
    # Neither saw the other's success in its own snapshot; the lock order made b see a's commit.
    assert await b.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", join) == "queued"
    await b.commit()
    assert await observer.fetchval("SELECT count(*) FROM queued_log WHERE job_id = $1", join) == 1


PENDING = "SELECT state, pending_deps FROM pgqueue.jobs WHERE id = $1"


async def test_counter_loses_no_decrement_when_completions_race(connect: Connect) -> None:
    """The fan-in counter under concurrency: a batch settling two dependencies and a
    concurrent completion of a third serialise on the join row; b subtracts from a's
    committed result, not from its own snapshot, and only the last completion queues it."""
    observer, a, b, c = await sessions(connect, "obs", "a", "b", "c")
    await observer.conn.execute(AUDIT)
    (p1, p2, p3, p4), join = await _parents_and_join(observer.conn, 4)
    assert tuple(await observer.conn.fetchrow(PENDING, join)) == ("waiting", 4)
    for pid, worker in ((p1, "a"), (p2, "a"), (p3, "b"), (p4, "c")):
        await observer.fetch("SELECT id FROM pgqueue.claim($1, $2)", pid, worker)

    await a.begin()
    done = await a.fetch("SELECT pgqueue.complete_many('a', $1::bigint[])", [p1, p2])
    assert len(done) == 2
    assert tuple(await a.conn.fetchrow(PENDING, join)) == ("waiting", 2)
    await b.begin()
    step = b.start(b.fetchval("SELECT pgqueue.complete($1, 'b')", p3))
    await wait_blocked(observer.conn, b)  # b waits for the join row a holds
    assert await observer.fetchval("SELECT pg_blocking_pids($1)", b.pid) == [a.pid]
    # b's snapshot predates a's commit (4 pending); the row it finally locks says 2.
    assert tuple(await observer.conn.fetchrow(PENDING, join)) == ("waiting", 4)
    await a.commit()
    assert await step is True
    assert tuple(await b.conn.fetchrow(PENDING, join)) == ("waiting", 1)
    await b.commit()

    assert await c.fetchval("SELECT pgqueue.complete($1, 'c')", p4)
    assert tuple(await observer.conn.fetchrow(PENDING, join)) == ("queued", 0)
    assert await observer.fetchval("SELECT count(*) FROM queued_log WHERE job_id = $1", join) == 1


async def test_retry_of_failed_dependency_recounts_the_join(connect: Connect) -> None:
    """A join cancelled by one dependency's failure misses the other's success; the retry
    that makes it wait again recounts, so it is queued when the retried one succeeds."""
    (observer,) = await sessions(connect, "obs")
    (p1, p2), join = await _parents_and_join(observer.conn, 2)
    await observer.conn.execute("UPDATE pgqueue.jobs SET max_attempts = 1 WHERE id = $1", p1)
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", p1)
    assert await observer.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", p1) == "failed"
    assert (await observer.conn.fetchrow(PENDING, join))["state"] == "cancelled"
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", p2)
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'w')", p2)
    assert await observer.fetchval("SELECT pgqueue.retry($1)", p1)
    assert tuple(await observer.conn.fetchrow(PENDING, join)) == ("waiting", 1)
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", p1)
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'w')", p1)
    assert tuple(await observer.conn.fetchrow(PENDING, join)) == ("queued", 0)


async def test_retry_racing_completion_of_another_dependency_counts_it(connect: Connect) -> None:
    """retry() share-locks the dependencies before recounting: a dependency whose completion
    is in flight (and which finds the join cancelled, so does not decrement it) commits first
    and is counted as succeeded; the join is queued when the retried job succeeds."""
    observer, a, b = await sessions(connect, "obs", "a", "b")
    (p1, p2), join = await _parents_and_join(observer.conn, 2)
    await observer.conn.execute("UPDATE pgqueue.jobs SET max_attempts = 1 WHERE id = $1", p1)
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", p1)
    assert await observer.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", p1) == "failed"
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'b')", p2)

    await b.begin()
    assert await b.fetchval("SELECT pgqueue.complete($1, 'b')", p2)  # join is cancelled: untouched
    await a.begin()
    step = a.start(a.fetchval("SELECT pgqueue.retry($1)", p1))
    await wait_blocked(observer.conn, a)  # a waits for p2's row, which b holds
    assert await observer.fetchval("SELECT pg_blocking_pids($1)", a.pid) == [b.pid]
    await b.commit()
    assert await step is True
    await a.commit()
    assert tuple(await observer.conn.fetchrow(PENDING, join)) == ("waiting", 1)
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", p1)
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'w')", p1)
    assert tuple(await observer.conn.fetchrow(PENDING, join)) == ("queued", 0)


async def test_join_with_200_parents_completed_from_8_sessions_fires_once(connect: Connect) -> None:
    observer, *workers = await sessions(connect, "obs", *(f"w{i}" for i in range(8)))
    await observer.conn.execute(AUDIT)
    parents, join = await _parents_and_join(observer.conn, 200)
    random.Random(7).shuffle(parents)
    for i, pid in enumerate(parents):
        await observer.fetch("SELECT id FROM pgqueue.claim($1, $2)", pid, f"w{i % 8}")

    async def finish(idx: int) -> None:
        w = workers[idx]
        for pid in parents[idx::8]:
            assert await w.fetchval("SELECT pgqueue.complete($1, $2)", pid, w.name)

    await asyncio.gather(*(finish(i) for i in range(8)))
    assert await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", join) == "queued"
    assert await observer.fetchval("SELECT count(*) FROM queued_log WHERE job_id = $1", join) == 1


async def test_failed_parent_cancels_join_and_its_dependents(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    (p1, p2), join = await _parents_and_join(observer.conn, 2)
    after_join = await observer.fetchval(
        "SELECT pgqueue.enqueue('after', depends_on => ARRAY[$1]::bigint[])", join
    )
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", p1)
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'w')", p1)
    await observer.conn.execute("UPDATE pgqueue.jobs SET max_attempts = 1 WHERE id = $1", p2)
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", p2)
    assert await observer.fetchval("SELECT pgqueue.fail($1, 'w', 'broken input')", p2) == "failed"
    rows = await observer.fetch(
        "SELECT id, state, last_error FROM pgqueue.jobs WHERE id IN ($1, $2) ORDER BY id",
        join,
        after_join,
    )
    assert [r["state"] for r in rows] == ["cancelled", "cancelled"]
    assert all(f"job {p2}" in r["last_error"] for r in rows)  # names the failed ancestor


async def test_failure_racing_success_of_another_parent(connect: Connect) -> None:
    """Cancellation racing a completion: one consistent outcome, never waiting forever."""
    observer, a, b = await sessions(connect, "obs", "a", "b")
    (p1, p2), join = await _parents_and_join(observer.conn, 2)
    await observer.conn.execute("UPDATE pgqueue.jobs SET max_attempts = 1 WHERE id = $1", p2)
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'a')", p1)
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'b')", p2)
    await a.begin()
    await b.begin()
    assert await b.fetchval("SELECT pgqueue.fail($1, 'b', 'x')", p2) == "failed"
    step = a.start(a.fetchval("SELECT pgqueue.complete($1, 'a')", p1))
    await wait_blocked(observer.conn, a)
    await b.commit()
    assert await step is True
    await a.commit()
    assert (
        await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", join) == "cancelled"
    )


async def test_dependency_added_while_parent_completes_is_not_missed(connect: Connect) -> None:
    """enqueue(depends_on) racing the dependency's completion: FOR SHARE orders them."""
    observer, a, b = await sessions(connect, "obs", "a", "b")
    parent = await observer.fetchval("SELECT pgqueue.enqueue('p')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", parent)
    await a.begin()
    child = await a.fetchval(
        "SELECT pgqueue.enqueue('c', depends_on => ARRAY[$1]::bigint[])", parent
    )
    step = b.start(b.fetchval("SELECT pgqueue.complete($1, 'w')", parent))
    await wait_blocked(observer.conn, b)
    await a.commit()
    assert await step is True
    assert (
        await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", child) == "queued"
    )


async def _old_succeeded_job(observer: Session) -> int:
    """A job that succeeded ten days ago: prune(interval '7 days') takes it."""
    job = int(await observer.fetchval("SELECT pgqueue.enqueue('p')"))
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'w')", job)
    await observer.fetchval(
        "UPDATE pgqueue.jobs SET finished_at = now() - interval '10 days' WHERE id = $1", job
    )
    return job


EDGES_TO = "SELECT count(*) FROM pgqueue.job_dependencies WHERE depends_on = $1"


async def test_prune_waits_for_an_enqueue_depending_on_the_job_and_takes_its_edge(
    connect: Connect,
) -> None:
    """Edges have no foreign keys, so nothing but enqueue's FOR SHARE keeps a dependency from
    being pruned under it. Enqueue first: prune must wait for its commit, then delete the
    job and, through jobs_drop_edges, the edge the enqueue wrote (no edge left dangling)."""
    observer, a, b = await sessions(connect, "obs", "a", "b")
    dep = await _old_succeeded_job(observer)
    await a.begin()
    child = await a.fetchval("SELECT pgqueue.enqueue('c', depends_on => ARRAY[$1]::bigint[])", dep)
    prune = b.start(b.fetchval("SELECT pgqueue.prune(interval '7 days')"))
    await wait_blocked(observer.conn, b)
    assert await lock_wait_kind(observer.conn, b) in ("transactionid", "tuple")
    await a.commit()
    assert await prune == 1
    assert await observer.fetchval(EDGES_TO, dep) == 0
    # The dependency had succeeded, so the new job never waited for it.
    assert (
        await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", child) == "queued"
    )


async def test_enqueue_depending_on_a_job_being_pruned_waits_and_is_refused(
    connect: Connect,
) -> None:
    """Prune first: the enqueue must wait for its commit, then find the job gone and refuse
    the unknown id, writing nothing (a foreign key used to give this answer)."""
    observer, a, b = await sessions(connect, "obs", "a", "b")
    dep = await _old_succeeded_job(observer)
    await b.begin()
    assert await b.fetchval("SELECT pgqueue.prune(interval '7 days')") == 1
    enqueue = a.start(
        a.fetchval("SELECT pgqueue.enqueue('c', depends_on => ARRAY[$1]::bigint[])", dep)
    )
    await wait_blocked(observer.conn, a)
    assert await lock_wait_kind(observer.conn, a) in ("transactionid", "tuple")
    await b.commit()
    with pytest.raises(asyncpg.ForeignKeyViolationError, match=f"unknown job id {dep}"):
        await enqueue
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0
    assert await observer.fetchval(EDGES_TO, dep) == 0


async def test_truncate_under_repeatable_read_empties_edges_committed_after_its_snapshot(
    connect: Connect,
) -> None:
    """TRUNCATE ignores snapshots, so the trigger emptying the edges must too: a check of
    "are there edges?" read the REPEATABLE READ snapshot, missed edges committed since,
    and left them to bind the jobs that reuse the restarted ids."""
    observer, a, t = await sessions(connect, "obs", "a", "t")
    await t.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    assert await t.fetchval("SELECT count(*) FROM pgqueue.job_dependencies") == 0  # snapshot
    specs = [{"job_type": "a", "key": "a"}, {"job_type": "b", "key": "b", "after": ["a"]}]
    await a.fetch("SELECT pgqueue.enqueue_many($1::jsonb)", specs)  # committed after it
    await t.conn.execute("TRUNCATE pgqueue.jobs RESTART IDENTITY")
    await t.commit()
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.job_dependencies") == 0
    ids = [r[0] for r in await a.fetch("SELECT pgqueue.enqueue_many($1::jsonb)", specs)]
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.job_dependencies") == 1
    assert (
        await observer.fetchval("SELECT pending_deps FROM pgqueue.jobs WHERE id = $1", ids[1]) == 1
    )


async def test_sibling_keys_fan_out_then_one_aggregation(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    specs = [{"job_type": "recalc", "key": f"r{i}", "payload": {"i": i}} for i in range(5)]
    specs.append({"job_type": "aggregate", "after": [f"r{i}" for i in range(5)]})
    ingest = await observer.fetchval(
        "SELECT pgqueue.enqueue('ingest', next_jobs => $1::jsonb)", specs
    )
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", ingest)
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'w')", ingest)
    kids = await observer.fetch(
        "SELECT id, job_type, state, parent_id, pipeline_id FROM pgqueue.jobs WHERE parent_id = $1 ORDER BY id",
        ingest,
    )
    assert [r["job_type"] for r in kids] == ["recalc"] * 5 + ["aggregate"]
    assert [r["state"] for r in kids] == ["queued"] * 5 + ["waiting"]
    pipeline = await observer.fetchval("SELECT pipeline_id FROM pgqueue.jobs WHERE id = $1", ingest)
    assert pipeline is not None and {r["pipeline_id"] for r in kids} == {pipeline}
    for r in kids[:5]:
        await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", r["id"])
        assert await observer.fetchval("SELECT pgqueue.complete($1, 'w')", r["id"])
    assert (
        await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", kids[5]["id"])
        == "queued"
    )


async def test_retry_leaves_cancelled_a_join_whose_other_dependency_failed_too(
    connect: Connect,
) -> None:
    """Both dependencies of a join fail; retrying one must not put the join back to waiting,
    where it would wait for good on the other, still failed (a failed dependency cancels its
    dependents). Nor what waits on the join. Retrying the other then revives both."""
    (observer,) = await sessions(connect, "obs")
    conn = observer.conn
    (p1, p2), join = await _parents_and_join(conn, 2)
    after_join = await conn.fetchval(
        "SELECT pgqueue.enqueue('after', depends_on => ARRAY[$1]::bigint[])", join
    )
    for parent in (p1, p2):
        await conn.execute("UPDATE pgqueue.jobs SET max_attempts = 1 WHERE id = $1", parent)
        await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", parent)
        assert await observer.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", parent) == "failed"
    assert await observer.fetchval("SELECT pgqueue.retry($1)", p1)
    states = "SELECT state FROM pgqueue.jobs WHERE id = ANY($1::bigint[]) ORDER BY id"
    assert [r[0] for r in await conn.fetch(states, [join, after_join])] == ["cancelled"] * 2
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", p1)
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'w')", p1)
    assert await observer.fetchval("SELECT pgqueue.retry($1)", p2)
    assert tuple(await conn.fetchrow(PENDING, join)) == ("waiting", 1)
    assert [r[0] for r in await conn.fetch(states, [join, after_join])] == ["waiting"] * 2
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", p2)
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'w')", p2)
    assert tuple(await conn.fetchrow(PENDING, join)) == ("queued", 0)


async def test_retry_racing_the_failure_of_another_dependency_leaves_the_join_cancelled(
    connect: Connect,
) -> None:
    """retry(p1) while p2, the join's other dependency, is failing for good: retry must see
    p2 failed, or it revives a join that waits for good. It share-locks the dependencies
    before it decides whom to revive, so it waits for p2's failure to commit."""
    observer, failer, retrier = await sessions(connect, "obs", "fail", "retry")
    (p1, p2), join = await _parents_and_join(observer.conn, 2)
    await observer.conn.execute("UPDATE pgqueue.jobs SET max_attempts = 1")
    for parent in (p1, p2):
        await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", parent)
    assert await observer.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", p1) == "failed"
    await failer.begin()
    assert await failer.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", p2) == "failed"
    step = retrier.start(retrier.fetchval("SELECT pgqueue.retry($1)", p1))
    await wait_blocked(observer.conn, retrier)
    await failer.commit()
    assert await step is True
    assert (await observer.conn.fetchrow(PENDING, join))["state"] == "cancelled"


async def test_a_failure_cancels_its_dependents_in_id_order(connect: Connect) -> None:
    """A completion queueing dependents locks them in id order (_unblock_dependents); a
    failure cancelling them locked them in whatever order the UPDATE's plan read them, so
    a failure and a completion sharing two dependents could each hold one and wait for the
    other (40P01). The plan here reads the recursion's order, which puts a dependent of a
    dependent (whose id is lower: "after" may name a later sibling) last, as a plan with
    real statistics may; the failure now waits for the lowest id first, holding nothing."""
    observer, blocker, worker = await sessions(connect, "obs", "block", "worker")
    parent = await observer.fetchval("SELECT pgqueue.enqueue('p', max_attempts => 1)")
    lower, higher = [
        r[0]
        for r in await observer.fetch(
            "SELECT pgqueue.enqueue_many($1::jsonb)",
            [
                {"job_type": "grandchild", "key": "g", "after": ["c"]},
                {"job_type": "child", "key": "c", "depends_on": [parent]},
            ],
        )
    ]
    assert lower < higher
    assert len(await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", parent)) == 1

    await blocker.begin()  # what a completion queueing `lower` holds first
    await blocker.fetch("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR NO KEY UPDATE", lower)
    await worker.conn.execute("SET enable_seqscan = off")  # the plan that reads downstream first
    step = worker.start(worker.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", parent))
    await wait_blocked(observer.conn, worker)
    assert await observer.fetchval(ROW_IS_FREE, higher) == higher
    await blocker.commit()
    assert await step == "failed"
    rows = await observer.fetch(
        "SELECT id, state FROM pgqueue.jobs WHERE id = ANY($1::bigint[]) ORDER BY id",
        [lower, higher],
    )
    assert [tuple(r) for r in rows] == [(lower, "cancelled"), (higher, "cancelled")]


async def test_enqueue_locks_its_dependencies_in_id_order(connect: Connect) -> None:
    """They were share-locked in the order DISTINCT's hash gave ({10, 11, 12, 13} as 11, 13,
    10, 12): a transaction locking two of them in id order, as every multi-row transition
    does, could deadlock with the enqueue. Waiting for the lowest id, it holds none of the
    others yet."""
    observer, holder, enqueuer = await sessions(connect, "obs", "hold", "enqueue")
    ids = [await observer.fetchval("SELECT pgqueue.enqueue('t')") for _ in range(13)]
    deps = ids[9:13]
    await holder.begin()
    await holder.fetchval("SELECT id FROM pgqueue.jobs WHERE id = $1 FOR NO KEY UPDATE", deps[0])
    step = enqueuer.start(
        enqueuer.fetchval("SELECT pgqueue.enqueue('j', depends_on => $1::bigint[])", deps[::-1])
    )
    await wait_blocked(observer.conn, enqueuer)
    for dep in deps[1:]:
        assert await observer.fetchval(ROW_IS_FREE, dep) == dep, f"job {dep} held early"
    await holder.commit()
    assert await step


async def test_a_batch_completion_locks_its_childrens_dependencies_in_id_order(
    connect: Connect,
) -> None:
    """Each parent's children had their dependencies locked in order, but parent by parent:
    the first parent's child depending on `high` and the second's on `low` locked `high`
    first. Waiting for `low`, the completion must hold nothing of `high`."""
    observer, holder, worker = await sessions(connect, "obs", "hold", "worker")
    low = await observer.fetchval("SELECT pgqueue.enqueue('t')")
    high = await observer.fetchval("SELECT pgqueue.enqueue('t')")
    parents = [await observer.fetchval("SELECT pgqueue.enqueue('p')") for _ in range(2)]
    for parent in parents:
        await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", parent)
    await holder.begin()
    await holder.fetchval("SELECT id FROM pgqueue.jobs WHERE id = $1 FOR NO KEY UPDATE", low)
    children = [[{"job_type": "c", "depends_on": [dep]}] for dep in (high, low)]
    step = worker.start(
        worker.fetch(
            "SELECT pgqueue.complete_many('w', ARRAY[$1, $2]::bigint[], NULL,"
            " ARRAY[$3::text::jsonb, $4::text::jsonb])",
            *parents,
            *(json.dumps(c) for c in children),
        )
    )
    await wait_blocked(observer.conn, worker)
    assert await observer.fetchval(ROW_IS_FREE, high) == high, "high held before low"
    await holder.commit()
    assert sorted(r[0] for r in await step) == parents


async def test_a_batch_of_parents_whose_children_mix_dependencies_completes(
    connect: Connect,
) -> None:
    """The batch-wide dependency lock read every child's depends_on strictly: a child without
    one, or with null, in a batch where another had one, made the whole batch fail. A
    dependency written 7.0 is the id 7 (JSON has one number type)."""
    (observer,) = await sessions(connect, "obs")
    dep = await observer.fetchval("SELECT pgqueue.enqueue('t')")
    parents = [await observer.fetchval("SELECT pgqueue.enqueue('p')") for _ in range(2)]
    for parent in parents:
        await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", parent)
    first = [{"job_type": "c", "depends_on": [dep]}, {"job_type": "c"}, {"job_type": "c"}]
    second = [{"job_type": "c", "depends_on": None}, {"job_type": "c", "depends_on": [f"{dep}.0"]}]
    second_json = json.dumps(second).replace(f'"{dep}.0"', f"{dep}.0")  # a JSON number 7.0
    done = await observer.fetch(
        "SELECT pgqueue.complete_many('w', ARRAY[$1, $2]::bigint[], NULL,"
        " ARRAY[$3::text::jsonb, $4::text::jsonb])",
        *parents,
        json.dumps(first),
        second_json,
    )
    assert sorted(r[0] for r in done) == parents
    rows = await observer.fetch(
        "SELECT j.state, count(*) FROM pgqueue.jobs j WHERE j.parent_id IS NOT NULL"
        " GROUP BY 1 ORDER BY 1"
    )
    assert [tuple(r) for r in rows] == [("queued", 3), ("waiting", 2)]
    edges = await observer.fetch("SELECT depends_on FROM pgqueue.job_dependencies")
    assert [r[0] for r in edges] == [dep, dep]


async def test_retries_of_a_job_and_its_dependency_lock_in_id_order(connect: Connect) -> None:
    """retry() locks its rows in id order: the dependency (older) before the job. Locking its
    own row first, retry(job) held it while it waited for the dependency, which a retry of the
    dependency queued ahead of it then held while it wanted the job as its dependent: 40P01."""
    observer, holder, a, b, probe = await sessions(connect, "obs", "holder", "a", "b", "probe")
    dep = await observer.fetchval("SELECT pgqueue.enqueue('p', max_attempts => 1)")
    job = await observer.fetchval(
        "SELECT pgqueue.enqueue('j', depends_on => ARRAY[$1::bigint])", dep
    )
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", dep)
    assert await observer.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", dep) == "failed"
    assert await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job) == (
        "cancelled"
    )
    await holder.begin()
    await holder.execute("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR NO KEY UPDATE", dep)
    retry_dep = b.start(b.fetchval("SELECT pgqueue.retry($1)", dep))
    await wait_blocked(observer.conn, b)
    retry_job = a.start(a.fetchval("SELECT pgqueue.retry($1)", job))
    await wait_blocked(observer.conn, a)
    # a waits at the dependency's row, behind b, and holds no lock on its own job yet.
    await probe.begin()
    await probe.execute("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR NO KEY UPDATE NOWAIT", job)
    await probe.rollback()
    await holder.commit()
    # b revives both; a then finds its job waiting again, no longer failed or cancelled.
    assert await asyncio.gather(retry_dep, retry_job) == [True, False]
    rows = await observer.fetch(
        "SELECT state, pending_deps FROM pgqueue.jobs WHERE id = ANY($1) ORDER BY id", [dep, job]
    )
    assert [tuple(r) for r in rows] == [("queued", 0), ("waiting", 1)]


async def test_a_dependent_enqueued_while_a_failure_cancels_its_dependency_is_cancelled_too(
    connect: Connect,
) -> None:
    """fail(P) cancels J (waiting for P) while an enqueue of K depending on J is open: the
    enqueue share-locks J, so the cancellation waits for it. Its downstream had been read
    before that wait, without K: K was left waiting for a cancelled J for good."""
    observer, enqueuer, worker = await sessions(connect, "obs", "enqueue", "worker")
    parent = await observer.fetchval("SELECT pgqueue.enqueue('p', max_attempts => 1)")
    child = await observer.fetchval(
        "SELECT pgqueue.enqueue('c', depends_on => ARRAY[$1]::bigint[])", parent
    )
    assert len(await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", parent)) == 1
    await enqueuer.begin()
    grandchild = await enqueuer.fetchval(
        "SELECT pgqueue.enqueue('g', depends_on => ARRAY[$1]::bigint[])", child
    )
    step = worker.start(worker.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", parent))
    await wait_blocked(observer.conn, worker)
    assert await lock_wait_kind(observer.conn, worker) == "transactionid"
    await enqueuer.commit()
    assert await step == "failed"
    rows = await observer.fetch(
        "SELECT id, state, last_error FROM pgqueue.jobs WHERE id = ANY($1::bigint[]) ORDER BY id",
        [child, grandchild],
    )
    assert [tuple(r) for r in rows] == [
        (child, "cancelled", f"dependency failed: job {parent} failed"),
        (grandchild, "cancelled", f"dependency failed: job {parent} failed"),
    ]


@pytest.mark.parametrize("other", ["retry", "prune"])
async def test_a_child_of_an_ended_dependency_created_during_its_retry_or_prune_never_runs_without_it(
    connect: Connect, other: str
) -> None:
    """A parent's stored spec depends on a job that failed meanwhile; the parent completes
    while that job is retried or pruned. The completion share-locks it, so the other waits
    (observed), then goes on with what it read before: a retry does not re-read the jobs
    downstream, a prune does not re-check that nothing depends on it. The child is created
    cancelled with an edge to the failed job (session 22: as any dependent of it). The
    retry reads its downstream again once it holds its locks, so it revives the child as
    it would have one there before (the second review: it missed it); the prune leaves it
    with no edge and a name retry does not revive by, so that a retry of another of its
    dependencies leaves it be (it would run without the job)."""
    observer, completer, rival = await sessions(connect, "obs", "complete", other)
    dep = await observer.fetchval("SELECT pgqueue.enqueue('dep', max_attempts => 1)")
    live = await observer.fetchval("SELECT pgqueue.enqueue('live', max_attempts => 1)")
    parent = await observer.fetchval(
        "SELECT pgqueue.enqueue('parent', next_jobs => $1::jsonb)",
        [
            {"job_type": "child", "key": "c", "depends_on": [dep, live]},
            {"job_type": "sibling", "after": ["c"]},
        ],
    )
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", dep)
    assert await observer.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", dep) == "failed"
    await observer.conn.execute(
        "UPDATE pgqueue.jobs SET finished_at = now() - interval '2 days' WHERE id = $1", dep
    )
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", parent)

    await completer.begin()
    assert await completer.fetchval("SELECT pgqueue.complete($1, 'w')", parent) is True
    call = "SELECT pgqueue.retry($1)" if other == "retry" else "SELECT pgqueue.prune('1 day')"
    step = rival.start(rival.fetchval(call, dep) if other == "retry" else rival.fetchval(call))
    await wait_blocked(observer.conn, rival)
    await completer.commit()
    try:
        result = await step
    except asyncpg.LockNotAvailableError:
        # A commit releases row locks a moment before advisory locks (PostgreSQL frees its
        # two lock tables one after the other): the woken retry can find the completion's
        # pipeline lock still taken, and refuses, writing nothing (documented: try again).
        assert other == "retry"
        result = await rival.fetchval(call, dep)
    assert result == (True if other == "retry" else 1)

    kids = await observer.fetch(
        "SELECT id, job_type, state, last_error FROM pgqueue.jobs WHERE parent_id = $1 ORDER BY id",
        parent,
    )
    child = kids[0]["id"]
    edges = await observer.fetch(
        "SELECT depends_on FROM pgqueue.job_dependencies WHERE job_id = $1 ORDER BY 1", child
    )
    state = "SELECT state, pending_deps FROM pgqueue.jobs WHERE id = $1"
    if other == "retry":
        assert [(k["job_type"], k["state"], k["last_error"]) for k in kids] == [
            ("child", "waiting", None),
            ("sibling", "waiting", None),
        ]
        assert [e["depends_on"] for e in edges] == [dep, live]
        assert tuple(await observer.conn.fetchrow(state, child)) == ("waiting", 2)
    else:
        assert [(k["job_type"], k["state"]) for k in kids] == [
            ("child", "cancelled"),
            ("sibling", "cancelled"),
        ]
        assert [e["depends_on"] for e in edges] == [live]
        assert kids[0]["last_error"] == f"cancelled: dependency job {dep} was deleted"
        await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", live)
        assert await observer.fetchval("SELECT pgqueue.fail($1, 'w', 'x')", live) == "failed"
        assert await observer.fetchval("SELECT pgqueue.retry($1)", live) is True
        assert (await observer.conn.fetchrow(state, child))[0] == "cancelled"
