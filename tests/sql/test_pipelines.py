"""Pipelines at the SQL level: cancellation races, retry after a fix, random DAGs."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlharness import (
    PIPELINE_LOCK,
    PIPELINE_TRY_LOCK,
    PIPELINE_UNLOCK,
    ROW_IS_FREE,
    Connect,
    finishes_unblocked,
    json_codecs,
    lock_wait_kind,
    sessions,
    wait_blocked,
)


async def _claim(conn: asyncpg.Connection, job: int, worker: str = "w") -> None:
    assert len(await conn.fetch("SELECT id FROM pgqueue.claim($1, $2)", job, worker)) == 1


async def _pipeline_states(conn: asyncpg.Connection, pipeline: uuid.UUID) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT state, count(*) FROM pgqueue.jobs WHERE pipeline_id = $1 GROUP BY 1", pipeline
    )
    return {r[0]: r[1] for r in rows}


@pytest.mark.parametrize("first", ["complete", "cancel"])
async def test_cancel_pipeline_racing_a_completion_leaves_no_live_orphan(
    connect: Connect, first: str
) -> None:
    observer, a, b = await sessions(connect, "obs", "a", "b")
    pipeline = uuid.uuid4()
    root = await observer.fetchval(
        "SELECT pgqueue.enqueue('root', pipeline_id => $1, next_jobs => $2::jsonb)",
        pipeline,
        [
            {"job_type": "kid", "key": "k1"},
            {"job_type": "kid", "key": "k2"},
            {"job_type": "join", "after": ["k1", "k2"]},
        ],
    )
    waiting = await observer.fetchval(
        "SELECT pgqueue.enqueue('later', pipeline_id => $1, depends_on => ARRAY[$2]::bigint[])",
        pipeline,
        root,
    )
    await _claim(observer.conn, root)

    complete_sql = "SELECT pgqueue.complete($1, 'w')"
    cancel_sql = "SELECT pgqueue.cancel_pipeline($1)"
    await a.begin()
    if first == "complete":
        assert await a.fetchval(complete_sql, root) is True
        step = b.start(b.fetchval(cancel_sql, pipeline))
    else:
        await a.fetchval(cancel_sql, pipeline)
        step = b.start(b.fetchval(complete_sql, root))
    await wait_blocked(observer.conn, b)
    await a.commit()
    await step

    states = await _pipeline_states(observer.conn, pipeline)
    assert states.get("waiting", 0) == 0 and states.get("queued", 0) == 0, states
    assert states["succeeded"] == 1  # the root finished its run either way
    assert (
        await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", waiting)
        == "cancelled"
    )
    assert (
        await observer.fetchval(
            "SELECT state FROM pgqueue.pipelines WHERE pipeline_id = $1", pipeline
        )
        == "cancelled"
    )


async def test_completion_creating_children_waits_for_cancel_pipeline_before_locking_dependents(
    connect: Connect,
) -> None:
    """A completion that creates children takes the pipeline lock before it locks the waiting
    dependents of its batch, as cancel_pipeline does (pipeline lock, then the members' rows).
    The other order deadlocked: the completion held the dependent's row and waited for the
    pipeline lock, cancel_pipeline held that and waited for the row (40P01 after
    deadlock_timeout, one of the two rolled back)."""
    observer, canceller, completer = await sessions(connect, "obs", "cancel", "complete")
    pipeline = uuid.uuid4()
    root = await observer.fetchval("SELECT pgqueue.enqueue('root', pipeline_id => $1)", pipeline)
    waiting = await observer.fetchval(
        "SELECT pgqueue.enqueue('later', pipeline_id => $1, depends_on => ARRAY[$2]::bigint[])",
        pipeline,
        root,
    )
    await _claim(observer.conn, root)

    await canceller.begin()  # cancel_pipeline's first step: the pipeline lock
    await canceller.fetchval(
        "SELECT pg_advisory_xact_lock(pgqueue._lock_class('pipeline'), hashtext($1::uuid::text))",
        pipeline,
    )
    step = completer.start(
        completer.fetchval(
            "SELECT pgqueue.complete($1, 'w', next_jobs => $2::jsonb)",
            root,
            [{"job_type": "kid"}],
        )
    )
    await wait_blocked(observer.conn, completer)
    # The completion holds no lock the cancel needs: its dependent's row is free.
    assert (
        await observer.fetchval(
            "SELECT id FROM pgqueue.jobs WHERE id = $1 FOR NO KEY UPDATE SKIP LOCKED", waiting
        )
        == waiting
    )
    assert await canceller.fetchval("SELECT pgqueue.cancel_pipeline($1)", pipeline) == 1
    await canceller.commit()
    assert await step is True

    rows = await observer.fetch(
        "SELECT job_type, state FROM pgqueue.jobs WHERE pipeline_id = $1 ORDER BY id", pipeline
    )
    assert [tuple(r) for r in rows] == [
        ("root", "succeeded"),
        ("later", "cancelled"),
        ("kid", "cancelled"),  # created by a member of a cancelled pipeline: recorded cancelled
    ]


async def test_completion_creating_deduplicated_children_takes_the_key_before_dependents_rows(
    connect: Connect,
) -> None:
    """As above for a child's dedup key: an enqueue of the key holds its lock and then waits
    for the pending job it merges into, here a dependent of the completing job. The
    completion locked that dependent first and then waited for the key (40P01)."""
    observer, enqueuer, completer = await sessions(connect, "obs", "enqueue", "complete")
    root = await observer.fetchval("SELECT pgqueue.enqueue('root')")
    waiting = await observer.fetchval(
        "SELECT pgqueue.enqueue('agg', depends_on => ARRAY[$1]::bigint[], dedup_key => 'k')",
        root,
    )
    await _claim(observer.conn, root)

    await enqueuer.begin()  # enqueue's first step for a key: its lock
    await enqueuer.fetchval("SELECT pgqueue._lock_dedup_key('k')")
    step = completer.start(
        completer.fetchval(
            "SELECT pgqueue.complete($1, 'w', next_jobs => $2::jsonb)",
            root,
            [{"job_type": "agg", "dedup_key": "k"}],
        )
    )
    await wait_blocked(observer.conn, completer)
    assert await observer.fetchval(ROW_IS_FREE, waiting) == waiting
    assert await enqueuer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')") == waiting
    await enqueuer.commit()
    assert await step is True
    rows = await observer.fetch("SELECT id, state, dedup_key FROM pgqueue.jobs ORDER BY id")
    # The dependent was queued by the completion, and the child merged into it.
    assert [tuple(r) for r in rows] == [(root, "succeeded", None), (waiting, "queued", "k")]


@pytest.mark.parametrize("transition", ["fail", "release", "snooze"])
async def test_fail_or_release_of_a_pipeline_member_takes_the_pipeline_lock_before_its_row(
    connect: Connect, transition: str
) -> None:
    """An enqueue into a pipeline that depends on a running member holds the pipeline's
    lock and then share-locks the member's row. fail() and release() of an unscoped member
    locked the row first and then the pipeline (40P01); they take the pipeline first now."""
    observer, enqueuer, worker = await sessions(connect, "obs", "enqueue", "worker")
    pipeline = uuid.uuid4()
    member = await observer.fetchval("SELECT pgqueue.enqueue('m', pipeline_id => $1)", pipeline)
    await _claim(observer.conn, member)

    await enqueuer.begin()
    await enqueuer.fetchval(PIPELINE_LOCK, pipeline)
    call = {
        "fail": "SELECT pgqueue.fail($1, 'w', 'boom')",
        "release": "SELECT pgqueue.release($1, 'w')",
        "snooze": "SELECT pgqueue.snooze($1, 'w', interval '0')",
    }[transition]
    step = worker.start(worker.fetchval(call, member))
    await wait_blocked(observer.conn, worker)
    assert await observer.fetchval(ROW_IS_FREE, member) == member
    dependent = await enqueuer.fetchval(
        "SELECT pgqueue.enqueue('d', pipeline_id => $1, depends_on => ARRAY[$2]::bigint[])",
        pipeline,
        member,
    )
    await enqueuer.commit()
    assert await step in ("queued", True)
    rows = await observer.fetch(
        "SELECT id, state FROM pgqueue.jobs WHERE pipeline_id = $1 ORDER BY id", pipeline
    )
    assert [tuple(r) for r in rows] == [(member, "queued"), (dependent, "waiting")]


@pytest.mark.parametrize("batch", [False, True], ids=["complete", "complete_many"])
@pytest.mark.parametrize("specs", ["stored", "given"])
async def test_completion_creating_children_takes_the_pipeline_lock_before_its_rows(
    connect: Connect, specs: str, batch: bool
) -> None:
    """As above for a completion that creates children in the pipeline (from specs stored
    on the member or given to the call): it locked the batch's rows and then the pipeline,
    and met such an enqueue in a deadlock (40P01)."""
    observer, enqueuer, worker = await sessions(connect, "obs", "enqueue", "worker")
    pipeline = uuid.uuid4()
    kids = [{"job_type": "kid"}]
    member = await observer.fetchval(
        "SELECT pgqueue.enqueue('m', pipeline_id => $1, next_jobs => $2)",
        pipeline,
        kids if specs == "stored" else None,
    )
    plain = await observer.fetchval("SELECT pgqueue.enqueue('plain')")
    _ = [await _claim(observer.conn, job) for job in (plain, member)]

    await enqueuer.begin()
    await enqueuer.fetchval(PIPELINE_LOCK, pipeline)
    given = kids if specs == "given" else []
    if batch:
        call = worker.fetchval(
            "SELECT count(*) FROM pgqueue.complete_many('w', ARRAY[$1, $2]::bigint[],"
            " next_jobs => ARRAY['[]', $3]::jsonb[])",
            plain,
            member,
            given,
        )
    else:
        call = worker.fetchval("SELECT pgqueue.complete($1, 'w', next_jobs => $2)", member, given)
    step = worker.start(call)
    await wait_blocked(observer.conn, worker)
    assert await lock_wait_kind(observer.conn, worker) == "advisory"
    assert await observer.fetchval(ROW_IS_FREE, member) == member
    dependent = await enqueuer.fetchval(
        "SELECT pgqueue.enqueue('d', pipeline_id => $1, depends_on => ARRAY[$2]::bigint[])",
        pipeline,
        member,
    )
    await enqueuer.commit()
    assert await step in (2, True)
    rows = await observer.fetch(
        "SELECT id, job_type, state FROM pgqueue.jobs WHERE pipeline_id = $1 ORDER BY id",
        pipeline,
    )
    assert [(r["job_type"], r["state"]) for r in rows] == [
        ("m", "succeeded"),
        ("d", "queued"),  # its dependency succeeded after it was enqueued
        ("kid", "queued"),
    ]
    assert rows[1]["id"] == dependent


async def _two_pipelines_in_crossed_orders(conn: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    """Two pipeline ids a < b whose lock keys (hashtext of the text) run the other way."""
    while True:
        a, b = sorted((uuid.uuid4(), uuid.uuid4()))
        if await conn.fetchval("SELECT hashtext($1::text) > hashtext($2::text)", str(a), str(b)):
            return a, b


async def test_an_enqueue_into_several_pipelines_locks_them_in_key_order(connect: Connect) -> None:
    """enqueue_many of specs naming pipelines a and b locked them in id order, a completion
    creating children in both (like every taker of several) in key order, b first. Both
    wait for b, the completion first; when b's holder commits, the completion takes b and
    waits for a, which the enqueue holds while it waits for b: 40P01 after deadlock_timeout.
    The enqueue takes them in key order now, so it holds nothing while it waits for b."""
    observer, holder, completer, enqueuer = await sessions(
        connect, "obs", "holder", "complete", "enqueue"
    )
    a, b = await _two_pipelines_in_crossed_orders(observer.conn)
    parents = [
        await observer.fetchval(
            "SELECT pgqueue.enqueue('p', pipeline_id => $1, next_jobs => $2)",
            p,
            [{"job_type": "kid"}],
        )
        for p in (a, b)
    ]
    _ = [await _claim(observer.conn, job) for job in parents]

    await holder.begin()
    await holder.fetchval(PIPELINE_LOCK, b)
    completion = completer.start(
        completer.fetchval("SELECT count(*) FROM pgqueue.complete_many('w', $1::bigint[])", parents)
    )
    await wait_blocked(observer.conn, completer)
    enqueue = enqueuer.start(
        enqueuer.fetchval(
            "SELECT count(*) FROM pgqueue.enqueue_many($1::jsonb)",
            [{"job_type": "e", "pipeline_id": str(p)} for p in (a, b)],
        )
    )
    await wait_blocked(observer.conn, enqueuer)
    # Waiting for b, the enqueue holds no other pipeline's lock.
    assert await observer.fetchval(PIPELINE_TRY_LOCK, a)
    await observer.fetchval(PIPELINE_UNLOCK, a)
    await holder.commit()
    assert await completion == 2
    assert await enqueue == 2
    states = await observer.fetch(
        "SELECT job_type, count(*) FROM pgqueue.jobs WHERE pipeline_id = ANY($1::uuid[]) GROUP BY 1 ORDER BY 1",
        [a, b],
    )
    assert [tuple(r) for r in states] == [("e", 2), ("kid", 2), ("p", 2)]


@pytest.mark.parametrize("specs", ["stored", "given"])
async def test_completion_creating_keyed_children_takes_their_keys_before_its_rows(
    connect: Connect, specs: str
) -> None:
    """As above for the children's dedup keys: an enqueue of the key that depends on the
    completing job holds the key's lock, then share-locks the job. The completion locked
    its row first and then the key (40P01): the coalescing pattern, an aggregation chained
    by each recalculation and enqueued by the application after one."""
    observer, enqueuer, worker = await sessions(connect, "obs", "enqueue", "worker")
    kids = [{"job_type": "agg", "dedup_key": "agg:2024"}]
    member = await observer.fetchval(
        "SELECT pgqueue.enqueue('recalc', next_jobs => $1)", kids if specs == "stored" else None
    )
    await _claim(observer.conn, member)
    await enqueuer.begin()
    await enqueuer.fetchval("SELECT pgqueue._lock_dedup_key('agg:2024')")
    step = worker.start(
        worker.fetchval(
            "SELECT pgqueue.complete($1, 'w', next_jobs => $2)",
            member,
            kids if specs == "given" else [],
        )
    )
    await wait_blocked(observer.conn, worker)
    assert await lock_wait_kind(observer.conn, worker) == "advisory"
    assert await observer.fetchval(ROW_IS_FREE, member) == member
    agg = await enqueuer.fetchval(
        "SELECT pgqueue.enqueue('agg', dedup_key => 'agg:2024', depends_on => ARRAY[$1]::bigint[])",
        member,
    )
    await enqueuer.commit()
    assert await step is True
    rows = await observer.fetch("SELECT id, job_type, state FROM pgqueue.jobs ORDER BY id")
    # The child merged into the application's job, which its dependency's success queued.
    assert [(r["id"], r["job_type"], r["state"]) for r in rows] == [
        (member, "recalc", "succeeded"),
        (agg, "agg", "queued"),
    ]


async def test_cancel_pipeline_lets_the_next_job_of_a_scope_it_empties_run(
    connect: Connect,
) -> None:
    """A cancelled member was its scope's next job: the one queued behind it (of another
    pipeline, or none) becomes the scope's next and is claimed."""
    conn = await connect()
    pipeline = uuid.uuid4()
    scoped = "SELECT pgqueue.enqueue('t', scope => '{\"s\": 1}', pipeline_id => $1)"
    await conn.fetchval(scoped, pipeline)
    behind = await conn.fetchval(scoped, None)
    assert await conn.fetchval("SELECT scope_blocked FROM pgqueue.jobs WHERE id = $1", behind)
    assert await conn.fetchval("SELECT pgqueue.cancel_pipeline($1)", pipeline) == 1
    assert [r["id"] for r in await conn.fetch("SELECT id FROM pgqueue.claim_next('w')")] == [behind]


async def test_running_member_of_cancelled_pipeline_is_not_retried(connect: Connect) -> None:
    conn = await json_codecs(await connect())
    pipeline = uuid.uuid4()
    job = await conn.fetchval("SELECT pgqueue.enqueue('t', pipeline_id => $1)", pipeline)
    await _claim(conn, job)
    assert await conn.fetchval("SELECT pgqueue.cancel_pipeline($1)", pipeline) == 0
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", job) == "cancelled"
    with pytest.raises(asyncpg.PostgresError, match="was cancelled"):
        await conn.fetchval("SELECT pgqueue.enqueue('t', pipeline_id => $1)", pipeline)
    # An operator retry resumes the pipeline.
    assert await conn.fetchval("SELECT pgqueue.retry($1)", job) is True
    assert await conn.fetchval("SELECT pgqueue.enqueue('t2', pipeline_id => $1)", pipeline) > job


async def test_retry_of_failed_member_after_a_fix_finishes_the_pipeline(connect: Connect) -> None:
    conn = await json_codecs(await connect())
    pipeline = str(uuid.uuid4())
    ids = [
        r[0]
        for r in await conn.fetch(
            "SELECT pgqueue.enqueue_many($1::jsonb)",
            [
                {"job_type": "a", "key": "a", "pipeline_id": pipeline, "max_attempts": 1},
                {"job_type": "b", "key": "b", "after": ["a"], "pipeline_id": pipeline},
                {"job_type": "c", "after": ["b"], "pipeline_id": pipeline},
            ],
        )
    ]
    await _claim(conn, ids[0])
    assert (
        await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'bad factor file')", ids[0]) == "failed"
    )
    row = await conn.fetchrow("SELECT state, done, failed, cancelled FROM pgqueue.pipelines")
    assert tuple(row) == ("failed", True, 1, 2)
    assert await conn.fetchval("SELECT pgqueue.retry($1)", ids[0])
    for job in ids:
        await _claim(conn, job)
        assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job)
    row = await conn.fetchrow("SELECT state, done, succeeded FROM pgqueue.pipelines")
    assert tuple(row) == ("succeeded", True, 3)


async def test_dynamic_fan_out_of_zero_runs_the_join_at_once(connect: Connect) -> None:
    conn = await json_codecs(await connect())
    root = await conn.fetchval("SELECT pgqueue.enqueue('root')")
    await _claim(conn, root)
    assert await conn.fetchval(
        "SELECT pgqueue.complete($1, 'w', NULL, $2::jsonb)",
        root,
        [{"job_type": "join", "after": []}],
    )
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE job_type = 'join'") == "queued"


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[list[int]], set[int], bool]:
    n = draw(st.integers(1, 12))
    deps = [sorted(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else [] for i in range(n)]
    failing = draw(st.sets(st.integers(0, n - 1), max_size=2))
    retry = draw(st.booleans())
    return deps, failing, retry


async def test_random_dags_finish_consistently_with_their_ancestors(connect: Connect) -> None:
    """No job runs before its dependencies succeeded; every job ends consistent with its ancestors."""
    conn = await json_codecs(await connect())
    checked = 0

    @settings(
        max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(dags())
    def one(dag: tuple[list[list[int]], set[int], bool]) -> None:
        nonlocal checked
        examples.append(dag)
        checked += 1

    examples: list[tuple[list[list[int]], set[int], bool]] = []
    one()
    assert checked >= 20
    for deps, failing, retry in examples:
        await conn.execute("TRUNCATE pgqueue.jobs RESTART IDENTITY CASCADE")
        pipeline = str(uuid.uuid4())
        specs = [
            {
                "job_type": f"n{i}",
                "key": f"n{i}",
                "after": [f"n{d}" for d in ds],
                "pipeline_id": pipeline,
                "max_attempts": 1,
            }
            for i, ds in enumerate(deps)
        ]
        ids = [r[0] for r in await conn.fetch("SELECT pgqueue.enqueue_many($1::jsonb)", specs)]
        node = {job: i for i, job in enumerate(ids)}
        broken = set(failing)
        rng = random.Random(len(deps))
        for _round in range(4 * len(deps) + 4):
            batch = await conn.fetch("SELECT id FROM pgqueue.claim_next('w', NULL, 3)")
            if not batch:
                if retry and broken:
                    # the fix lands; retry every failed member
                    broken.clear()
                    for r in await conn.fetch("SELECT id FROM pgqueue.jobs WHERE state = 'failed'"):
                        assert await conn.fetchval("SELECT pgqueue.retry($1)", r[0])
                    continue
                break
            for r in rng.sample(list(batch), len(batch)):
                i = node[r["id"]]
                unfinished = await conn.fetchval(
                    "SELECT count(*) FROM pgqueue.jobs WHERE id = ANY($1::bigint[]) AND state <> 'succeeded'",
                    [ids[d] for d in deps[i]],
                )
                assert unfinished == 0, f"node {i} ran before its dependencies succeeded"
                if i in broken:
                    assert (
                        await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'x')", r["id"])
                        == "failed"
                    )
                else:
                    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", r["id"])
        states = {
            node[r["id"]]: r["state"]
            for r in await conn.fetch("SELECT id, state FROM pgqueue.jobs")
        }

        def doomed(i: int, deps: list[list[int]] = deps, broken: set[int] = broken) -> bool:
            return i in broken or any(doomed(d) for d in deps[i])

        for i in range(len(deps)):
            if any(doomed(d) for d in deps[i]):
                expected = "cancelled"
            elif i in broken:
                expected = "failed"
            else:
                expected = "succeeded"
            assert states[i] == expected, (i, deps, failing, retry, states)


async def test_cancel_pipeline_locks_its_members_in_id_order(connect: Connect) -> None:
    """Two members waiting on a job outside the pipeline: its completion locks them in id
    order (_unblock_dependents). cancel_pipeline's UPDATE locked them in heap order, which
    an update of the older member had turned around, so each could hold one and wait for
    the other (40P01). It locks them in id order first now, holding nothing while it waits
    for the lowest."""
    observer, blocker, canceller = await sessions(connect, "obs", "block", "cancel")
    pipeline = uuid.uuid4()
    outside = await observer.fetchval("SELECT pgqueue.enqueue('x')")
    older, newer = [
        await observer.fetchval(
            "SELECT pgqueue.enqueue('m', pipeline_id => $1, depends_on => ARRAY[$2]::bigint[])",
            pipeline,
            outside,
        )
        for _ in range(2)
    ]
    # A new row version for the older member, after the newer one's in the heap.
    await observer.conn.execute("UPDATE pgqueue.jobs SET priority = 1 WHERE id = $1", older)

    await blocker.begin()  # what the completion of `outside` holds first
    await blocker.fetch("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR NO KEY UPDATE", older)
    step = canceller.start(canceller.fetchval("SELECT pgqueue.cancel_pipeline($1)", pipeline))
    await wait_blocked(observer.conn, canceller)
    assert await observer.fetchval(ROW_IS_FREE, newer) == newer
    await blocker.commit()
    assert await step == 2


async def test_cancel_pipeline_locks_outside_dependents_of_all_members_in_id_order(
    connect: Connect,
) -> None:
    """Jobs outside the pipeline waiting on its members were cancelled one member at a
    time, each call locking only its own dependents in id order: E5 (waiting on M1) before
    E3 (waiting on M2), while a completion of a job both wait on locks E3 and then E5
    (40P01). One call for all members locks them all in id order now."""
    observer, blocker, canceller = await sessions(connect, "obs", "block", "cancel")
    pipeline = uuid.uuid4()
    m1, m2 = [
        await observer.fetchval("SELECT pgqueue.enqueue('m', pipeline_id => $1)", pipeline)
        for _ in range(2)
    ]
    outside = await observer.fetchval("SELECT pgqueue.enqueue('y')")
    depends = "SELECT pgqueue.enqueue('e', depends_on => ARRAY[$1, $2]::bigint[])"
    e_low = await observer.fetchval(depends, m2, outside)
    e_high = await observer.fetchval(depends, m1, outside)

    await blocker.begin()  # what the completion of `outside` holds first
    await blocker.fetch("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR NO KEY UPDATE", e_low)
    step = canceller.start(canceller.fetchval("SELECT pgqueue.cancel_pipeline($1)", pipeline))
    await wait_blocked(observer.conn, canceller)
    assert await observer.fetchval(ROW_IS_FREE, e_high) == e_high
    await blocker.commit()
    assert await step == 2
    rows = await observer.fetch(
        "SELECT id, state, last_error FROM pgqueue.jobs WHERE id = ANY($1::bigint[]) ORDER BY id",
        [e_low, e_high],
    )
    assert [tuple(r) for r in rows] == [
        (e_low, "cancelled", f"dependency failed: job {m2} was cancelled with its pipeline"),
        (e_high, "cancelled", f"dependency failed: job {m1} was cancelled with its pipeline"),
    ]


async def test_cancel_pipeline_locks_members_and_outside_dependents_in_one_id_order(
    connect: Connect,
) -> None:
    """Members were locked first, then the jobs outside waiting on them, each group in id
    order: with M1 < E (outside, waiting on M1) < M2, M2 was held while E was waited for,
    the reverse of a completion locking E and then M2 (review of session 10's fix; the
    reviewer's deadlock had a completion of a job both wait on). One id order now."""
    observer, blocker, canceller = await sessions(connect, "obs", "block", "cancel")
    pipeline = uuid.uuid4()
    m1 = await observer.fetchval("SELECT pgqueue.enqueue('m', pipeline_id => $1)", pipeline)
    outside = await observer.fetchval(
        "SELECT pgqueue.enqueue('e', depends_on => ARRAY[$1]::bigint[])", m1
    )
    m2 = await observer.fetchval("SELECT pgqueue.enqueue('m', pipeline_id => $1)", pipeline)
    assert m1 < outside < m2

    await blocker.begin()
    await blocker.fetch("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR NO KEY UPDATE", outside)
    step = canceller.start(canceller.fetchval("SELECT pgqueue.cancel_pipeline($1)", pipeline))
    await wait_blocked(observer.conn, canceller)
    assert await observer.fetchval(ROW_IS_FREE, m2) == m2
    await blocker.commit()
    assert await step == 2
    states = await observer.fetch(
        "SELECT state FROM pgqueue.jobs WHERE id = ANY($1::bigint[])", [m1, outside, m2]
    )
    assert {r["state"] for r in states} == {"cancelled"}


async def _failed_with_dependent_in(
    conn: asyncpg.Connection, pipeline: uuid.UUID
) -> tuple[int, int]:
    """x (no pipeline) failed; d, a member of ``pipeline`` that depends on it, cancelled."""
    x = await conn.fetchval("SELECT pgqueue.enqueue('x', max_attempts => 1)")
    d = await conn.fetchval(
        "SELECT pgqueue.enqueue('d', depends_on => ARRAY[$1::bigint], pipeline_id => $2)",
        x,
        pipeline,
    )
    await _claim(conn, x)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", x) == "failed"
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", d) == "cancelled"
    return x, d


async def _blocked_or_done(
    observer: asyncpg.Connection, pid: int, task: asyncio.Task[object]
) -> bool:
    """Whether the session waits for a lock (True) or its step finished (False): the old code
    did not wait, and the test must then fail on its outcome, not hang."""
    while not task.done():
        if await observer.fetchval("SELECT cardinality(pg_blocking_pids($1)) > 0", pid):
            return True
        await asyncio.wait({task}, timeout=0.005)  # the observer's polling interval
    return False


RETRY = "SELECT pgqueue.retry($1)"
STATE = "SELECT state FROM pgqueue.jobs WHERE id = $1"


@pytest.mark.parametrize("holder_is", ["cancel_pipeline", "a completion"])
async def test_a_retry_waits_for_a_dependents_busy_pipeline_before_locking_any_row(
    connect: Connect, holder_is: str
) -> None:
    """From review: retry(x) revived a dependent of a pipeline cancelled while it waited, so
    it takes its dependents' pipeline locks. It took them after its rows, by try only, and
    refused (55P03) whenever one was held, e.g. while any member of the pipeline was being
    completed, failed or released. Every pgqueue transaction takes pipeline locks before rows
    (a completion creating children too, since it locks them first), so it now waits for
    them before its first row lock: nothing to refuse, and no cycle."""
    observer, holder, retrier = await sessions(connect, "obs", "holder", "retrier")
    pipeline = uuid.uuid4()
    x, d = await _failed_with_dependent_in(observer.conn, pipeline)
    member = await observer.fetchval(
        "SELECT pgqueue.enqueue('m', pipeline_id => $1, next_jobs => $2)",
        pipeline,
        [{"job_type": "kid"}],
    )
    await _claim(observer.conn, member)
    await holder.begin()
    if holder_is == "cancel_pipeline":  # m runs on: nothing cancelled
        assert await holder.fetchval("SELECT pgqueue.cancel_pipeline($1)", pipeline) == 0
    else:
        assert await holder.fetchval("SELECT pgqueue.complete($1, 'w')", member) is True
    step = retrier.start(retrier.fetchval(RETRY, x))
    await wait_blocked(observer.conn, retrier)
    assert await lock_wait_kind(observer.conn, retrier) == "advisory"
    assert [await observer.fetchval(ROW_IS_FREE, job) for job in (x, d)] == [x, d]
    await holder.commit()
    assert await step is True
    assert await observer.fetchval(STATE, x) == "queued"
    revived = "cancelled" if holder_is == "cancel_pipeline" else "waiting"
    assert await observer.fetchval(STATE, d) == revived


async def test_a_cancel_pipeline_during_a_retry_cancels_what_the_retry_revives(
    connect: Connect,
) -> None:
    """The other order: retry(x) has revived d (waiting, not committed) when cancel_pipeline of
    d's pipeline runs, whose snapshot sees d cancelled: it waits for the pipeline lock the
    retry holds, then cancels d."""
    observer, canceller, retrier = await sessions(connect, "obs", "canceller", "retrier")
    pipeline = uuid.uuid4()
    x, d = await _failed_with_dependent_in(observer.conn, pipeline)
    await retrier.begin()
    assert await retrier.fetchval(RETRY, x) is True
    cancel = canceller.start(canceller.fetchval("SELECT pgqueue.cancel_pipeline($1)", pipeline))
    if await _blocked_or_done(observer.conn, canceller.pid, cancel):
        assert await lock_wait_kind(observer.conn, canceller) == "advisory"  # the pipeline's
    await retrier.commit()
    assert await cancel == 1
    assert await observer.fetchval(STATE, d) == "cancelled"


async def test_retry_refuses_repeatable_read(conn: asyncpg.Connection) -> None:
    """Its reads after lock waits (rows, pipelines' marks) would read an old snapshot."""
    x, _ = await _failed_with_dependent_in(conn, uuid.uuid4())
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    try:
        with pytest.raises(
            asyncpg.InvalidTransactionStateError, match="retry: needs READ COMMITTED"
        ):
            await conn.fetchval(RETRY, x)
    finally:
        await conn.execute("ROLLBACK")


async def test_a_cancel_pipeline_while_a_retry_waits_for_a_row_waits_for_the_retry(
    connect: Connect,
) -> None:
    """The reviewer's interleaving: retry(x) waits for x's row (held by another transaction)
    while cancel_pipeline of d's pipeline runs. The retry revived d into the pipeline that
    committed its cancel meanwhile. It holds the pipeline's lock before any row now, so the
    cancel waits for it, then cancels d, which the retry revived. (A cancel that commits
    before the retry takes that lock: the test above.)"""
    observer, holder, canceller, retrier = await sessions(
        connect, "obs", "holder", "canceller", "retrier"
    )
    pipeline = uuid.uuid4()
    x, d = await _failed_with_dependent_in(observer.conn, pipeline)
    await holder.begin()
    await holder.execute("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR UPDATE", x)
    retry = retrier.start(retrier.fetchval("SELECT pgqueue.retry($1)", x))
    await wait_blocked(observer.conn, retrier)
    assert await lock_wait_kind(observer.conn, retrier) in ("transactionid", "tuple")  # x's row
    cancel = canceller.start(canceller.fetchval("SELECT pgqueue.cancel_pipeline($1)", pipeline))
    await wait_blocked(observer.conn, canceller)
    assert await lock_wait_kind(observer.conn, canceller) == "advisory"  # the pipeline's
    await holder.commit()
    assert await retry is True
    assert await cancel == 1
    assert await observer.fetchval(STATE, d) == "cancelled"


async def test_a_retry_after_another_in_one_transaction_only_tries_its_dependents_pipelines(
    connect: Connect,
) -> None:
    """From review: retrying every failed job in one statement (the cookbook's recipe), the
    second retry waited for its dependent's pipeline holding the rows of the first, while an
    enqueue into that pipeline depending on the first job held the pipeline and waited for
    its row: 40P01, and PostgreSQL picked the application's enqueue. A call in a transaction
    that holds rows already only tries those locks, as before, and refuses (55P03)."""
    observer, bulk, app = await sessions(connect, "obs", "bulk", "app")
    p2 = uuid.uuid4()
    x1, _ = await _failed_with_dependent_in(observer.conn, uuid.uuid4())
    x2, d2 = await _failed_with_dependent_in(observer.conn, p2)
    await bulk.begin()
    assert await bulk.fetchval(RETRY, x1) is True
    enqueue = app.start(
        app.fetchval(
            "SELECT pgqueue.enqueue('e', pipeline_id => $1, depends_on => ARRAY[$2::bigint])",
            p2,
            x1,
        )
    )
    await wait_blocked(observer.conn, app)  # holding p2's lock, on x1's row
    with pytest.raises(asyncpg.LockNotAvailableError, match=f"pipeline {p2} of a job"):
        await finishes_unblocked(observer.conn, bulk, bulk.fetchval(RETRY, x2))
    await bulk.rollback()
    with pytest.raises(asyncpg.InvalidParameterValueError, match="already failed"):
        await enqueue  # x1 is failed again: refused as such, not rolled back by a 40P01
    assert await observer.fetchval(STATE, x2) == "failed"
    assert await observer.fetchval(STATE, d2) == "cancelled"


async def test_a_retry_refuses_when_the_pipeline_of_a_dependent_created_meanwhile_is_busy(
    connect: Connect,
) -> None:
    """A completion creates a child of x (a stored spec, x failed: it is created cancelled)
    in pipeline p while retry(x) waits for x's row, which the completion share-locks; a
    cancel_pipeline of p, in a transaction left open, waits for the completion's lock on p.
    The retry finds the child only once it holds its rows, so it can only try p's lock,
    which the completion or the cancel holds (a release grants a waiter at once, and the
    cancel's transaction is still open): it refuses, and writes nothing."""
    observer, completer, retrier, canceller = await sessions(
        connect, "obs", "complete", "retry", "cancel"
    )
    pipeline = uuid.uuid4()
    x = await observer.fetchval("SELECT pgqueue.enqueue('x', max_attempts => 1)")
    parent = await observer.fetchval(
        "SELECT pgqueue.enqueue('parent', pipeline_id => $1, next_jobs => $2::jsonb)",
        pipeline,
        [{"job_type": "child", "depends_on": [x]}],
    )
    await _claim(observer.conn, x)
    assert await observer.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", x) == "failed"
    await _claim(observer.conn, parent)
    await completer.begin()
    assert await completer.fetchval("SELECT pgqueue.complete($1, 'w')", parent) is True
    retry = retrier.start(retrier.fetchval(RETRY, x))
    await wait_blocked(observer.conn, retrier)  # on x's row
    await canceller.begin()
    cancel = canceller.start(canceller.fetchval("SELECT pgqueue.cancel_pipeline($1)", pipeline))
    await wait_blocked(observer.conn, canceller)  # on p's lock
    await completer.commit()
    with pytest.raises(asyncpg.LockNotAvailableError, match=f"pipeline {pipeline} of a job"):
        await retry
    await cancel
    await canceller.commit()
    assert await observer.fetchval(STATE, x) == "failed"
    child = await observer.fetchval("SELECT id FROM pgqueue.jobs WHERE parent_id = $1", parent)
    assert await observer.fetchval(STATE, child) == "cancelled"
    assert await retrier.fetchval(RETRY, x) is True  # the pipeline is cancelled: child stays
    assert await observer.fetchval(STATE, child) == "cancelled"
