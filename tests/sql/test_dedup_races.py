"""Dedup: one pending job per key under concurrent enqueues; retries never trip on the key."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from sqlharness import (
    PIPELINE_LOCK,
    ROW_IS_FREE,
    Connect,
    Session,
    finishes_unblocked,
    sessions,
    wait_blocked,
)


async def test_concurrent_enqueues_of_one_key_create_one_job(connect: Connect) -> None:
    observer, a, *others = await sessions(connect, "obs", "a", "b", "c", "d", "e")
    await a.begin()
    first = await a.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'agg:2024')")
    steps = [
        s.start(s.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'agg:2024')"))
        for s in others
    ]
    await wait_blocked(observer.conn, *others)
    await a.commit()
    assert set(await asyncio.gather(*steps)) == {first}
    assert (
        await observer.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE dedup_key = 'agg:2024'")
        == 1
    )


async def test_concurrent_enqueues_first_rolls_back_one_still_created(connect: Connect) -> None:
    observer, a, b, c = await sessions(connect, "obs", "a", "b", "c")
    await a.begin()
    await a.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    steps = [s.start(s.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")) for s in (b, c)]
    await wait_blocked(observer.conn, b, c)
    await a.rollback()
    ids = await asyncio.gather(*steps)
    assert len(set(ids)) == 1
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE dedup_key = 'k'") == 1


async def test_free_for_all_enqueues_one_key(connect: Connect) -> None:
    observer, *workers = await sessions(connect, "obs", *(f"w{i}" for i in range(8)))

    async def burst(w: Session) -> list[int]:
        return [
            await w.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')") for _ in range(5)
        ]

    ids = [i for batch in await asyncio.gather(*(burst(w) for w in workers)) for i in batch]
    assert len(set(ids)) == 1
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1


async def test_running_job_does_not_absorb_new_requests(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    first = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", first)
    second = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    assert second != first  # the running one may have read stale data: a new run is owed


async def test_fail_meets_newer_pending_job_with_same_key(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    old = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", old)
    new = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    assert await observer.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", old) == "queued"
    rows = await observer.fetch("SELECT id, state, dedup_key FROM pgqueue.jobs ORDER BY id")
    assert [tuple(r) for r in rows] == [(old, "queued", None), (new, "queued", "k")]
    # The newer job keeps coalescing requests.
    assert await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')") == new


async def test_release_recover_and_retry_meet_newer_job_with_same_key(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    conn = observer.conn
    for action in ("release", "snooze", "recover", "retry"):
        key = f"k-{action}"
        old = await conn.fetchval(
            "SELECT pgqueue.enqueue('agg', dedup_key => $1, max_attempts => 1)", key
        )
        await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", old)
        if action == "retry":
            assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'x')", old) == "failed"
        new = await conn.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => $1)", key)
        if action == "release":
            assert await conn.fetchval("SELECT pgqueue.release($1, 'w')", old)
        elif action == "snooze":
            assert await conn.fetchval("SELECT pgqueue.snooze($1, 'w', interval '0')", old)
        elif action == "recover":
            await conn.execute("UPDATE pgqueue.jobs SET max_attempts = 3 WHERE id = $1", old)
            await conn.execute(
                "UPDATE pgqueue.jobs SET locked_at = now() - interval '1 hour' WHERE id = $1", old
            )
            assert [r[0] for r in await conn.fetch("SELECT pgqueue.recover_stale()")] == [old]
        else:
            assert await conn.fetchval("SELECT pgqueue.retry($1)", old)
        rows = await conn.fetch(
            "SELECT id, state, dedup_key FROM pgqueue.jobs WHERE id IN ($1, $2) ORDER BY id",
            old,
            new,
        )
        assert [tuple(r) for r in rows] == [(old, "queued", None), (new, "queued", key)], action


async def test_requeue_racing_enqueue_of_same_key(connect: Connect) -> None:
    """fail() waits for an in-flight enqueue of the key, then drops its own key: no 23505."""
    observer, a, b = await sessions(connect, "obs", "a", "b")
    old = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", old)
    await a.begin()
    new = await a.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    step = b.start(b.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", old))
    await wait_blocked(observer.conn, b)
    await a.commit()
    assert await step == "queued"
    rows = await observer.fetch("SELECT id, dedup_key FROM pgqueue.jobs ORDER BY id")
    assert [tuple(r) for r in rows] == [(old, None), (new, "k")]


async def test_enqueue_racing_requeue_of_same_key_merges_into_it(connect: Connect) -> None:
    observer, a, b = await sessions(connect, "obs", "a", "b")
    old = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", old)
    await a.begin()
    assert await a.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", old) == "queued"
    step = b.start(b.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')"))
    await wait_blocked(observer.conn, b)
    await a.commit()
    assert await step == old
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1


async def test_retry_revives_dependents_whose_keys_were_taken_meanwhile(connect: Connect) -> None:
    """retry() puts the dependents it cancelled back to waiting: one whose key a newer pending
    job took meanwhile drops it (no 23505), and of two revived with one key, the older keeps it."""
    (observer,) = await sessions(connect, "obs")
    conn = observer.conn
    root = await conn.fetchval("SELECT pgqueue.enqueue('load', max_attempts => 1)")
    taken, shared_a, shared_b, kept = [
        await conn.fetchval(
            "SELECT pgqueue.enqueue('agg', depends_on => ARRAY[$1::bigint], dedup_key => $2)",
            root,
            key,
        )
        for key in ("taken", "shared", "shared-later", "kept")
    ]
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", root)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", root) == "failed"
    states = await conn.fetch("SELECT state FROM pgqueue.jobs WHERE id <> $1", root)
    assert {r["state"] for r in states} == {"cancelled"}
    newer = await conn.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'taken')")
    # Two cancelled dependents come to share one key (a hand-written repair, say).
    await conn.execute("UPDATE pgqueue.jobs SET dedup_key = 'shared' WHERE id = $1", shared_b)

    assert await conn.fetchval("SELECT pgqueue.retry($1)", root)

    rows = await conn.fetch("SELECT id, state, dedup_key FROM pgqueue.jobs ORDER BY id")
    assert [tuple(r) for r in rows] == [
        (root, "queued", None),
        (taken, "waiting", None),  # the newer job keeps coalescing requests for the key
        (shared_a, "waiting", "shared"),
        (shared_b, "waiting", None),
        (kept, "waiting", "kept"),
        (newer, "queued", "taken"),
    ]
    assert await conn.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'taken')") == newer
    assert await conn.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'kept')") == kept


HOLD_KEY = "SELECT pgqueue._lock_dedup_key('k')"  # an enqueue's first step for key k


@pytest.mark.parametrize("transition", ["fail", "release"])
async def test_a_requeue_takes_its_dedup_key_before_its_row(
    connect: Connect, transition: str
) -> None:
    """An enqueue of key k that depends on the running job holding k locks the key, then
    share-locks that job's row. fail() with attempts left and release() locked the row and
    then took the key, to decide whether the job keeps it (40P01 after deadlock_timeout,
    one of the two rolled back); they take the key first now."""
    observer, enqueuer, worker = await sessions(connect, "obs", "enqueue", "worker")
    job = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)

    await enqueuer.begin()
    await enqueuer.fetchval(HOLD_KEY)
    call = {
        "fail": "SELECT pgqueue.fail($1, 'w', 'boom')",
        "release": "SELECT pgqueue.release($1, 'w')",
    }[transition]
    step = worker.start(worker.fetchval(call, job))
    await wait_blocked(observer.conn, worker)
    assert await observer.fetchval(ROW_IS_FREE, job) == job
    dependent = await enqueuer.fetchval(
        "SELECT pgqueue.enqueue('agg', dedup_key => 'k', depends_on => ARRAY[$1]::bigint[])", job
    )
    await enqueuer.commit()
    assert await step in ("queued", True)
    rows = await observer.fetch("SELECT id, state, dedup_key FROM pgqueue.jobs ORDER BY id")
    # The newer job took the key while the old one ran; requeued, the old one gives it up.
    assert [tuple(r) for r in rows] == [(job, "queued", None), (dependent, "waiting", "k")]


async def test_recover_stale_leaves_a_job_whose_key_is_being_enqueued_for_the_next_round(
    connect: Connect,
) -> None:
    """As above for stale recovery, which holds other candidates' locks while it takes the
    next one's: it try-locks the key, and a job whose key is taken right now waits for its
    next round instead of a lock wait that could close a cycle."""
    observer, enqueuer, leader = await sessions(connect, "obs", "enqueue", "leader")
    job = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    await observer.conn.execute(
        "UPDATE pgqueue.jobs SET locked_at = now() - interval '1 hour' WHERE id = $1", job
    )

    await enqueuer.begin()
    await enqueuer.fetchval(HOLD_KEY)
    recovered = await finishes_unblocked(
        observer.conn, leader, leader.fetch("SELECT pgqueue.recover_stale()")
    )
    assert recovered == []
    assert await observer.fetchval(ROW_IS_FREE, job) == job
    dependent = await enqueuer.fetchval(
        "SELECT pgqueue.enqueue('agg', dedup_key => 'k', depends_on => ARRAY[$1]::bigint[])", job
    )
    await enqueuer.commit()
    assert [r[0] for r in await leader.fetch("SELECT pgqueue.recover_stale()")] == [job]
    rows = await observer.fetch("SELECT id, state, dedup_key FROM pgqueue.jobs ORDER BY id")
    assert [tuple(r) for r in rows] == [(job, "queued", None), (dependent, "waiting", "k")]


@pytest.mark.parametrize("lock", ["pipeline", "key"])
async def test_retry_takes_its_pipeline_lock_and_dedup_key_before_its_row(
    connect: Connect, lock: str
) -> None:
    """retry() locked the failed job's row, then its pipeline's lock and its dedup key:
    the reverse of an enqueue into the pipeline, or of the key, that share-locks the row it
    depends on. It reads the job unlocked and takes both first now."""
    observer, enqueuer, operator = await sessions(connect, "obs", "enqueue", "operator")
    pipeline = uuid.uuid4()
    job = await observer.fetchval(
        "SELECT pgqueue.enqueue('agg', dedup_key => 'k', pipeline_id => $1, max_attempts => 1)",
        pipeline,
    )
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    assert await observer.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", job) == "failed"

    await enqueuer.begin()
    if lock == "pipeline":
        await enqueuer.fetchval(PIPELINE_LOCK, pipeline)
    else:
        await enqueuer.fetchval(HOLD_KEY)
    step = operator.start(operator.fetchval("SELECT pgqueue.retry($1)", job))
    await wait_blocked(observer.conn, operator)
    assert await observer.fetchval(ROW_IS_FREE, job) == job
    await enqueuer.commit()
    assert await step is True
    row = await observer.conn.fetchrow(
        "SELECT state, dedup_key FROM pgqueue.jobs WHERE id = $1", job
    )
    assert tuple(row) == ("queued", "k")


async def _done_or_blocked(observer: Connect, session: Session, step: asyncio.Task[int]) -> None:
    """Return once ``step`` has finished or its session waits on another backend's lock."""
    deadline = asyncio.get_running_loop().time() + 15
    while not step.done():
        if await observer.fetchval("SELECT cardinality(pg_blocking_pids($1)) > 0", session.pid):
            return
        assert asyncio.get_running_loop().time() < deadline, (
            f"{session.name} neither ran nor waited"
        )
        await asyncio.wait({step}, timeout=0.005)  # the observer's polling interval


@pytest.mark.parametrize("call", ["enqueue", "enqueue_many"])
async def test_enqueues_merging_into_each_others_dependency_take_turns(
    connect: Connect, call: str
) -> None:
    """Two enqueues, each depending on the pending job the other's key merges into: A's
    dependency is X and its key merges into Y, B's the other way round. Each share-locked
    its dependency, then locked the job it merged into for update (ON CONFLICT DO UPDATE):
    with a third session holding Y shared, A held X and waited for Y, B held Y and waited
    for X, and once the third let go, A waited for B's share of Y (40P01). A merge holds its
    job FOR SHARE now, which neither the other merge nor a dependency's lock waits for."""
    observer, holder, a, b = await sessions(connect, "obs", "holder", "a", "b")
    x = await observer.fetchval("SELECT pgqueue.enqueue('x', dedup_key => 'kx')")
    y = await observer.fetchval("SELECT pgqueue.enqueue('y', dedup_key => 'ky')")
    await holder.begin()
    await holder.fetchval("SELECT id FROM pgqueue.jobs WHERE id = $1 FOR SHARE", y)

    def enqueue(session: Session, key: str, dependency: int) -> asyncio.Task[int]:
        if call == "enqueue":
            sql = "SELECT pgqueue.enqueue('j', dedup_key => $1, depends_on => ARRAY[$2]::bigint[])"
            return session.start(session.fetchval(sql, key, dependency))
        spec = [{"job_type": "j", "dedup_key": key, "depends_on": [dependency]}]
        return session.start(session.fetchval("SELECT pgqueue.enqueue_many($1::jsonb)", spec))

    into_y = enqueue(a, "ky", x)
    await _done_or_blocked(observer.conn, a, into_y)
    into_x = enqueue(b, "kx", y)
    await _done_or_blocked(observer.conn, b, into_x)
    await holder.commit()
    assert await into_y == y and await into_x == x
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.jobs") == 2


async def test_an_enqueue_merging_into_a_waiting_dependent_takes_none_of_its_dependencies(
    connect: Connect,
) -> None:
    """R waits on X and holds key K. A batch completion of X and D holds both rows, then
    locks their waiting dependents in id order. An enqueue of K depending on D merges into R
    without taking D (a merge takes none of its dependencies): holding R while it waited
    for D (as one fix tried, taking R in id order with its dependencies) it deadlocked with
    the completion, which waits for R (40P01). A third session holding W (a dependent of X
    older than R) lines them up: the completion holds X and D while it waits for W, then
    waits for the merge's transaction, which waits for nothing."""
    observer, holder, completer, enqueuer = await sessions(
        connect, "obs", "holder", "completer", "enqueuer"
    )
    x = await observer.fetchval("SELECT pgqueue.enqueue('x')")
    w = await observer.fetchval("SELECT pgqueue.enqueue('w', depends_on => ARRAY[$1]::bigint[])", x)
    r = await observer.fetchval(
        "SELECT pgqueue.enqueue('r', dedup_key => 'K', depends_on => ARRAY[$1]::bigint[])", x
    )
    d = await observer.fetchval("SELECT pgqueue.enqueue('d')")
    for job in (x, d):
        assert len(await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)) == 1
    await holder.begin()
    await holder.fetchval("SELECT id FROM pgqueue.jobs WHERE id = $1 FOR SHARE", w)
    completion = completer.start(
        completer.fetchval(
            "SELECT count(*) FROM pgqueue.complete_many('w', ARRAY[$1, $2]::bigint[])", x, d
        )
    )
    await wait_blocked(observer.conn, completer)  # holding X and D, on W
    await enqueuer.begin()
    merge = enqueuer.fetchval(
        "SELECT pgqueue.enqueue('z', dedup_key => 'K', depends_on => ARRAY[$1]::bigint[])", d
    )
    assert await finishes_unblocked(observer.conn, enqueuer, merge) == r  # D not waited for
    await holder.commit()
    blocking = "SELECT pg_blocking_pids($1)"
    while await observer.fetchval(blocking, completer.pid) != [enqueuer.pid]:
        assert not completion.done(), "the completion took R while the merge held it"
        await asyncio.sleep(0.005)  # the observer's polling interval
    await enqueuer.commit()
    assert await completion == 2
    states = await observer.fetch(
        "SELECT state FROM pgqueue.jobs WHERE id = ANY($1::bigint[]) ORDER BY id", [w, r]
    )
    assert [s["state"] for s in states] == ["queued", "queued"]


@pytest.mark.parametrize("transition", ["complete", "cancel"])
async def test_an_enqueue_merging_into_an_older_job_a_transition_takes_with_its_dependency(
    connect: Connect, transition: str
) -> None:
    """T (key K) and D both wait on X, T the older. The completion of X queues them, and a
    cancellation of X cancels them, each locking T, then D. An enqueue of K depending on D
    share-locked D first, then waited for T, held by the transition, which waited for D:
    40P01 (a known exception until session 25). A merge now takes T (its target) and none
    of its dependencies. A session holding D shared lines them up: the transition holds T
    and waits for D."""
    observer, holder, mover, enqueuer = await sessions(
        connect, "obs", "holder", "mover", "enqueuer"
    )
    x = await observer.fetchval("SELECT pgqueue.enqueue('x')")
    after_x = "SELECT pgqueue.enqueue($1, dedup_key => $2, depends_on => ARRAY[$3]::bigint[])"
    t = await observer.fetchval(after_x, "t", "K", x)
    d = await observer.fetchval(after_x, "d", None, x)
    if transition == "complete":
        assert len(await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", x)) == 1
        step = "SELECT pgqueue.complete($1, 'w')"
    else:
        step = "SELECT pgqueue.cancel($1)"
    await holder.begin()
    await holder.fetchval("SELECT id FROM pgqueue.jobs WHERE id = $1 FOR SHARE", d)
    moved = mover.start(mover.fetchval(step, x))
    await wait_blocked(observer.conn, mover)  # holding X and T, on D
    merge = enqueuer.start(
        enqueuer.fetchval(
            "SELECT pgqueue.enqueue('z', dedup_key => 'K', depends_on => ARRAY[$1]::bigint[])", d
        )
    )
    await wait_blocked(observer.conn, enqueuer)  # on T
    await holder.commit()
    assert await moved is True
    if transition == "complete":
        assert await merge == t
        expected = ["queued", "queued"]
    else:  # cancelled with X: nothing pending to merge into, and D is cancelled
        with pytest.raises(asyncpg.InvalidParameterValueError, match="already cancelled"):
            await merge
        expected = ["cancelled", "cancelled"]
    states = await observer.fetch(
        "SELECT state FROM pgqueue.jobs WHERE id = ANY($1::bigint[]) ORDER BY id", [t, d]
    )
    assert [s["state"] for s in states] == expected


async def test_a_merge_target_that_leaves_pending_while_the_enqueue_waits_is_let_go(
    connect: Connect,
) -> None:
    """T (key K) and D are members of pipeline P, D the older. A claim of T is under way when
    an enqueue of K depending on D waits for T; cancel_pipeline(P) then locks D and waits
    for T too. Once the claim commits, T is running: the enqueue's lookup does not return it,
    but PostgreSQL kept the enqueue's lock on it, and the enqueue went on to wait for D, held
    by cancel_pipeline, which waited for T: 40P01. The wait is in a subtransaction now, which
    lets T go when it is not returned."""
    observer, claimer, enqueuer, canceller = await sessions(
        connect, "obs", "claimer", "enqueuer", "canceller"
    )
    pipeline = uuid.uuid4()
    d = await observer.fetchval("SELECT pgqueue.enqueue('d', pipeline_id => $1)", pipeline)
    t = await observer.fetchval(
        "SELECT pgqueue.enqueue('t', pipeline_id => $1, dedup_key => 'K')", pipeline
    )
    await claimer.begin()
    assert [r["id"] for r in await claimer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", t)] == [t]
    merge = enqueuer.start(
        enqueuer.fetchval(
            "SELECT pgqueue.enqueue('z', dedup_key => 'K', depends_on => ARRAY[$1]::bigint[])", d
        )
    )
    await wait_blocked(observer.conn, enqueuer)  # on T, held by the claim
    cancel = canceller.start(canceller.fetchval("SELECT pgqueue.cancel_pipeline($1)", pipeline))
    await wait_blocked(observer.conn, canceller)  # holding D, on T
    await claimer.commit()
    assert await cancel == 1  # D; T runs on
    with pytest.raises(asyncpg.InvalidParameterValueError, match=f"dependency {d} is already"):
        await merge  # nothing pending to merge into, and D was cancelled meanwhile
    states = await observer.fetch(
        "SELECT state FROM pgqueue.jobs WHERE id = ANY($1::bigint[]) ORDER BY id", [d, t]
    )
    assert [s["state"] for s in states] == ["cancelled", "running"]
