"""Scope heads: queued jobs behind an older job of their scope stay out of the claim index.

A job enqueued while its scope has a running job, or an older queued one, is entered
``scope_blocked``; the transition that ends the scope's running job (complete, fail,
release, recovery) or cancels a queued one unblocks the scope's oldest queued job. The
danger is liveness: a job left blocked after the job ahead of it finished is never
claimed. Enqueue and those transitions meet on the scope's order lock (shared for
enqueue, exclusive for the transitions), and the races below force both orders with
explicit transactions, proving each wait in ``pg_locks``.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlharness import ROW_IS_FREE, Connect, Session, lock_wait_kind, sessions, wait_blocked
from test_notify import Listener

T = TypeVar("T")

SCOPE = '{"account": 7}'
ENQUEUE = "SELECT pgqueue.enqueue('t', scope => $1::text::jsonb)"
BLOCKED = "SELECT scope_blocked FROM pgqueue.jobs WHERE id = $1"


async def _claim(session: Session | asyncpg.Connection, worker: str = "w") -> list[int]:
    rows = await session.fetch(
        "SELECT id FROM pgqueue.claim_next($1, NULL, 10) ORDER BY id", worker
    )
    return [r["id"] for r in rows]


async def _scopes_in_key_order(observer: asyncpg.Connection) -> list[str]:
    """Three scopes, in the order transitions take their order locks (the lock key)."""
    scopes = ['{"type": "electricity"}', '{"type": "heating"}', '{"type": "water"}']
    keys = {s: await observer.fetchval("SELECT jsonb_hash($1::jsonb)", s) for s in scopes}
    return sorted(scopes, key=keys.__getitem__)


async def _running(conn: asyncpg.Connection) -> int:
    """One scoped job, claimed by worker 'w'."""
    job = int(await conn.fetchval(ENQUEUE, SCOPE))
    assert await _claim(conn) == [job]
    return job


async def test_jobs_behind_a_busy_scope_are_blocked_and_run_in_order(
    conn: asyncpg.Connection,
) -> None:
    first = await _running(conn)
    second = await conn.fetchval(ENQUEUE, SCOPE)
    third = await conn.fetchval(ENQUEUE, SCOPE)
    other = await conn.fetchval(ENQUEUE, '{"account": 8}')
    assert [await conn.fetchval(BLOCKED, j) for j in (second, third, other)] == [True, True, False]
    # The claim index holds only jobs a claim may take.
    ready = await conn.fetch(
        "SELECT id FROM pgqueue.jobs WHERE state = 'queued' AND NOT scope_blocked ORDER BY id"
    )
    assert [r["id"] for r in ready] == [other]
    assert await _claim(conn) == [other]
    for done, nxt in ((first, second), (second, third)):
        assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", done)
        assert await conn.fetchval(BLOCKED, nxt) is False
        assert await _claim(conn) == [nxt]
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", third)


async def test_bulk_enqueue_blocks_all_but_the_oldest_of_each_scope(
    conn: asyncpg.Connection,
) -> None:
    ids = [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM pgqueue.enqueue_many(ARRAY['t','t','t','t'], NULL,"
            " scopes => ARRAY['{\"s\": 1}', '{\"s\": 2}', '{\"s\": 1}', NULL]::jsonb[]) AS id"
        )
    ]
    blocked = [await conn.fetchval(BLOCKED, j) for j in ids]
    assert blocked == [False, False, True, False]
    assert sorted(await _claim(conn)) == [ids[0], ids[1], ids[3]]


@pytest.mark.parametrize(
    ("end", "unblocked"),
    [
        # the running job finished: the oldest queued (`ahead`) is next
        ("SELECT pgqueue.complete($1, 'w')", "ahead"),
        ("SELECT pgqueue.fail($1, 'w', 'boom')", "ahead"),  # max_attempts 1 below: failed
        # requeued: the running job is the oldest queued again, `ahead` stays behind it
        ("SELECT pgqueue.fail($1, 'w', 'boom', retry_in => interval '1 hour')", "first"),
        ("SELECT pgqueue.release($1, 'w')", "first"),
        ("SELECT pgqueue.snooze($1, 'w', interval '1 hour')", "first"),
        # the queued job ahead of ours is cancelled: ours is next (after the running one)
        ("SELECT pgqueue.cancel($1 + 1)", "ours"),
    ],
    ids=["complete", "fail-final", "fail-retry", "release", "snooze", "cancel-queued"],
)
async def test_every_transition_that_frees_the_scope_unblocks_the_next(
    conn: asyncpg.Connection, end: str, unblocked: str
) -> None:
    first = await _running(conn)
    if "retry_in" not in end:  # a failure is final
        await conn.execute("UPDATE pgqueue.jobs SET max_attempts = 1 WHERE id = $1", first)
    ahead = await conn.fetchval(ENQUEUE, SCOPE)
    ours = await conn.fetchval(ENQUEUE, SCOPE)
    assert ahead == first + 1
    await conn.fetchval(end, first)
    ready = await conn.fetch(
        "SELECT id FROM pgqueue.jobs WHERE state = 'queued' AND NOT scope_blocked ORDER BY id"
    )
    assert [r["id"] for r in ready] == [{"first": first, "ahead": ahead, "ours": ours}[unblocked]]


async def test_recovery_of_a_stale_job_unblocks_the_next(conn: asyncpg.Connection) -> None:
    first = await _running(conn)
    nxt = await conn.fetchval(ENQUEUE, SCOPE)
    await conn.execute(
        "UPDATE pgqueue.jobs SET locked_at = now() - interval '1 hour' WHERE id = $1", first
    )
    assert [r[0] for r in await conn.fetch("SELECT pgqueue.recover_stale()")] == [first]
    # The recovered job is queued again and the oldest: it runs first, nxt stays behind it.
    assert await conn.fetchval(BLOCKED, nxt) is True
    assert await _claim(conn) == [first]
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", first)
    assert await _claim(conn) == [nxt]


async def test_enqueue_in_flight_makes_the_completion_wait_and_its_job_runs_next(
    connect: Connect,
) -> None:
    """Enqueue first: it saw the running job and entered blocked, not committed yet. The
    completion must wait for it, or its unblocking would miss the new job for good."""
    producer, worker = await sessions(connect, "producer", "worker")
    observer = await connect()
    first = await _running(observer)
    await producer.begin()
    job = await producer.fetchval(ENQUEUE, SCOPE)
    assert await producer.fetchval(BLOCKED, job) is True
    complete = worker.start(worker.fetchval("SELECT pgqueue.complete($1, 'w')", first))
    await wait_blocked(observer, worker)
    assert await lock_wait_kind(observer, worker) == "advisory"
    await producer.commit()
    assert await complete
    assert await observer.fetchval(BLOCKED, job) is False
    assert await _claim(observer) == [job]


async def test_completion_in_flight_makes_the_enqueue_wait_and_see_the_scope_free(
    connect: Connect,
) -> None:
    """Completion first: it unblocked the scope's next job before ours existed. The enqueue
    must wait for its commit and then see the scope free, or it would enter blocked behind
    a job that already finished."""
    producer, worker = await sessions(connect, "producer", "worker")
    observer = await connect()
    first = await _running(observer)
    job = await _enqueue_waiting_for_a_completion(producer, worker, observer, first)
    assert await observer.fetchval(BLOCKED, job) is False
    assert await _claim(observer) == [job]


async def _enqueue_waiting_for_a_completion(
    producer: Session, worker: Session, observer: asyncpg.Connection, running: int
) -> int:
    """The worker completes ``running`` (not committed), the producer's scoped enqueue waits
    for the scope's order lock (observed), then the worker commits: the enqueued job's id."""
    await worker.begin()
    assert await worker.fetchval("SELECT pgqueue.complete($1, 'w')", running)
    enqueue = producer.start(producer.fetchval(ENQUEUE, SCOPE))
    await wait_blocked(observer, producer)
    assert await lock_wait_kind(observer, producer) == "advisory"
    await worker.commit()
    return int(await enqueue)


async def test_enqueues_of_one_scope_do_not_wait_for_each_other(connect: Connect) -> None:
    a, b = await sessions(connect, "a", "b")
    observer = await connect()
    await _running(observer)
    await a.begin()
    await a.fetchval(ENQUEUE, SCOPE)
    await b.begin()
    await b.fetchval(ENQUEUE, SCOPE)  # would hang here if the lock were exclusive
    assert await lock_wait_kind(observer, b) is None
    await a.commit()
    await b.commit()


async def test_a_job_older_than_the_running_one_enters_unblocked(
    conn: asyncpg.Connection,
) -> None:
    """Enqueue blocks a job only behind an older active job of its scope, never behind a
    newer running one (an enqueue that drew its id before that job's and inserted after its
    claim): the end of the running job unblocks only the first queued job after it, so a
    job blocked behind a newer one would never run. Here that interleaving's id order is
    made directly, by enqueueing after moving the running job to a larger id."""
    running = await _running(conn)
    await conn.execute("UPDATE pgqueue.jobs SET id = id + 1000 WHERE id = $1", running)
    older = await conn.fetchval(ENQUEUE, SCOPE)
    assert older < running + 1000
    assert await conn.fetchval(BLOCKED, older) is False  # in the index; the claim re-checks
    assert await _claim(conn) == []  # its scope is busy
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", running + 1000)
    assert await _claim(conn) == [older]


async def test_failing_member_and_cancel_pipeline_do_not_deadlock(connect: Connect) -> None:
    """Every pgqueue transaction takes the pipeline lock before the scope order lock. A
    scoped member failing (order lock, then its pipeline's lock to see whether it was
    cancelled) against cancel_pipeline (pipeline lock, then its members' order locks) was a
    deadlock when the failure took the order lock first."""
    holder, failer, canceller = await sessions(connect, "holder", "failer", "canceller")
    observer = await connect()
    pipeline = "00000000-0000-0000-0000-0000000000aa"
    ids = await observer.fetch(
        "SELECT pgqueue.enqueue_many($1::text::jsonb) AS id",
        json.dumps(
            [
                {"job_type": "m", "scope": {"u": 1}, "pipeline_id": pipeline, "max_attempts": 1},
                {"job_type": "n", "scope": {"u": 1}, "pipeline_id": pipeline},
            ]
        ),
    )
    member = ids[0]["id"]
    assert await _claim(observer) == [member]
    await holder.begin()  # holds the member's row, so the failure waits with its locks taken
    await holder.fetch("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR NO KEY UPDATE", member)
    fail = failer.start(failer.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", member))
    await wait_blocked(observer, failer)
    cancel = canceller.start(
        canceller.fetchval("SELECT pgqueue.cancel_pipeline($1::uuid)", pipeline)
    )
    await wait_blocked(observer, canceller)
    await holder.commit()
    assert await fail in ("cancelled", "failed")
    assert await cancel == 1  # the second member; no deadlock on either side


async def test_enqueue_many_with_a_dependency_and_a_completion_do_not_deadlock(
    connect: Connect,
) -> None:
    """enqueue_many takes the scope order lock before it share-locks its dependencies; a
    completion takes the order lock before it updates its row. With the dependency locked
    first, an enqueue_many depending on the completing job deadlocked against it."""
    holder, completer, producer = await sessions(connect, "holder", "completer", "producer")
    observer = await connect()
    dep = await _running(observer)
    await holder.begin()  # an enqueue in flight into the scope: the completion waits for it
    await holder.fetchval(ENQUEUE, SCOPE)
    complete = completer.start(completer.fetchval("SELECT pgqueue.complete($1, 'w')", dep))
    await wait_blocked(observer, completer)
    enqueue = producer.start(
        producer.fetch(
            "SELECT pgqueue.enqueue_many($1::text::jsonb)",
            json.dumps([{"job_type": "after", "scope": {"account": 7}, "depends_on": [dep]}]),
        )
    )
    await wait_blocked(observer, producer)
    await holder.commit()
    assert await complete
    assert len(await enqueue) == 1


async def test_requeue_with_a_dedup_key_and_enqueue_many_of_the_key_do_not_deadlock(
    connect: Connect,
) -> None:
    """A requeue takes the scope order lock, then the dedup key's lock (may it keep its
    key?); enqueue_many took the key's lock before the order lock, and the two deadlocked."""
    holder, failer, producer = await sessions(connect, "holder", "failer", "producer")
    observer = await connect()
    job = await observer.fetchval(
        "SELECT pgqueue.enqueue('k', scope => $1::text::jsonb, dedup_key => 'sync-1')", SCOPE
    )
    assert await _claim(observer) == [job]
    await holder.begin()  # an enqueue in flight into the scope: the requeue waits for it
    await holder.fetchval(ENQUEUE, SCOPE)
    fail = failer.start(failer.fetchval("SELECT pgqueue.fail($1, 'w', 'transient')", job))
    await wait_blocked(observer, failer)
    enqueue = producer.start(
        producer.fetch(
            "SELECT pgqueue.enqueue_many($1::text::jsonb)",
            json.dumps([{"job_type": "k", "scope": {"account": 7}, "dedup_key": "sync-1"}]),
        )
    )
    await wait_blocked(observer, producer)
    await holder.commit()
    assert await fail == "queued"
    assert len(await enqueue) == 1


async def test_the_end_of_a_scoped_job_wakes_the_queue_of_the_scope_s_next_job(
    connect: Connect,
) -> None:
    """A scope's next job becomes claimable without entering 'queued', so the end of the job
    ahead must NOTIFY its queue: the job after it (entered blocked), and a queued job older
    than it (here queued by fan-in while the newer one ran), which is never blocked."""
    conn = await connect()
    listen_conn = await connect()
    listener = Listener(listen_conn)
    await listen_conn.add_listener("pgqueue", listener)
    enqueue = "SELECT pgqueue.enqueue($1, queue => $2, scope => $3::text::jsonb)"
    first = await conn.fetchval(enqueue, "t", "qa", SCOPE)
    assert await _claim(conn) == [first]
    after = await conn.fetchval(enqueue, "t", "qb", SCOPE)
    assert await conn.fetchval(BLOCKED, after)
    assert sorted(await listener.drain(1)) == ["qa"]  # the blocked one woke nobody
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", first)
    assert await listener.drain(1) == ["qb"]

    assert [r["id"] for r in await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", after)]
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", after)

    dep = await conn.fetchval("SELECT pgqueue.enqueue('x', queue => 'qx')")
    older = await conn.fetchval(
        "SELECT pgqueue.enqueue('d', queue => 'qd', scope => $1::text::jsonb,"
        " depends_on => ARRAY[$2::bigint])",
        SCOPE,
        dep,
    )
    newer = await conn.fetchval(enqueue, "t", "qc", SCOPE)  # not blocked: d is waiting
    assert not await conn.fetchval(BLOCKED, newer)
    for job in (newer, dep):
        assert [r["id"] for r in await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)]
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", dep)  # d queued, not free
    assert await conn.fetch("SELECT id FROM pgqueue.claim_next('w', ARRAY['qd'], 10)") == []
    await listener.drain()
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", newer)
    assert "qd" in await listener.drain(1)
    assert [r["id"] for r in await conn.fetch("SELECT id FROM pgqueue.claim_next('w')")] == [older]


async def _colliding_scopes(conn: asyncpg.Connection) -> tuple[str, str]:
    """Two different scopes with the same jsonb_hash, found on this server (the scope
    indexes lead with the hash, so this is the case where only the scope test separates
    them). A 32-bit hash over 300,000 values collides many times over."""
    row = await conn.fetchrow(
        """SELECT min(s::text) AS a, max(s::text) AS b
           FROM (SELECT jsonb_build_object('t', i) AS s FROM generate_series(1, 300000) i) x
           GROUP BY jsonb_hash(s) HAVING count(*) > 1 LIMIT 1"""
    )
    assert row is not None, "no jsonb_hash collision among 300,000 scopes"
    assert row["a"] != row["b"]
    return row["a"], row["b"]


async def test_scopes_with_the_same_hash_are_still_different_scopes(
    conn: asyncpg.Connection,
) -> None:
    a, b = await _colliding_scopes(conn)
    a1 = int(await conn.fetchval(ENQUEUE, a))
    b1 = int(await conn.fetchval(ENQUEUE, b))  # a1 shares its hash, not its scope
    a2 = int(await conn.fetchval(ENQUEUE, a))
    b2 = int(await conn.fetchval(ENQUEUE, b))
    assert [await conn.fetchval(BLOCKED, j) for j in (a1, b1, a2, b2)] == [
        False,
        False,
        True,
        True,
    ]
    # Both heads run at once: each is current and running in its own scope, which the
    # unique indexes on (hash, scope) allow.
    assert await _claim(conn) == [a1, b1]
    current = "SELECT id FROM pgqueue.jobs WHERE is_current ORDER BY id"
    assert [r["id"] for r in await conn.fetch(current)] == [a1, b1]
    # Ending a1 frees scope a only; claiming a2 clears a1's current flag, not b1's.
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", a1)
    assert await _claim(conn) == [a2]
    assert [r["id"] for r in await conn.fetch(current)] == [b1, a2]
    assert await conn.fetchval(BLOCKED, b2) is True
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", b1)
    assert await _claim(conn) == [b2]
    assert [r["id"] for r in await conn.fetch(current)] == [a2, b2]
    # claim() by id takes the same path for a scope with a twin.
    a3 = int(await conn.fetchval(ENQUEUE, a))
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", a2)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", a3) == 1
    assert [r["id"] for r in await conn.fetch(current)] == [b2, a3]


async def test_cancel_of_a_running_job_requeued_meanwhile_unblocks_the_next(
    connect: Connect,
) -> None:
    """cancel() read the job's state, saw it running, took no scope order lock, then found it
    queued (released meanwhile) under the row lock and cancelled it without unblocking the
    job behind it: the scope stayed stuck for good. It now takes the order lock for any
    scoped job, so it waits for the release's commit and unblocks the next job."""
    observer, releaser, canceller = await sessions(connect, "obs", "release", "cancel")
    running = await _running(observer.conn)
    behind = await observer.fetchval(ENQUEUE, SCOPE)
    assert await observer.fetchval(BLOCKED, behind) is True

    await releaser.begin()
    assert await releaser.fetchval("SELECT pgqueue.release($1, 'w')", running) is True
    step = canceller.start(canceller.fetchval("SELECT pgqueue.cancel($1)", running))
    await wait_blocked(observer.conn, canceller)
    assert await lock_wait_kind(observer.conn, canceller) == "advisory"  # the order lock
    await releaser.commit()
    assert await step is True

    assert await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", running) == (
        "cancelled"
    )
    assert await observer.fetchval(BLOCKED, behind) is False
    assert await _claim(observer.conn) == [behind]


@pytest.mark.parametrize("state", ["running", "queued"])
async def test_a_hand_delete_of_the_scopes_active_job_lets_the_next_run(
    conn: asyncpg.Connection, state: str
) -> None:
    """From review: the delete trigger cancelled the deleted job's dependents but left the job
    entered blocked behind it blocked for good (every later job of the scope too)."""
    first = await _running(conn) if state == "running" else await conn.fetchval(ENQUEUE, SCOPE)
    nxt = await conn.fetchval(ENQUEUE, SCOPE)
    assert await conn.fetchval(BLOCKED, nxt) is True
    await conn.execute("DELETE FROM pgqueue.jobs WHERE id = $1", first)
    assert await conn.fetchval(BLOCKED, nxt) is False
    assert await _claim(conn) == [nxt]


@pytest.mark.parametrize("waits", [True, False], ids=["waits-for-the-completion", "snapshot-older"])
async def test_an_enqueue_under_repeatable_read_never_enters_blocked_behind_an_ended_job(
    connect: Connect, waits: bool
) -> None:
    """From review: under REPEATABLE READ the enqueue's snapshot could predate the end of the
    scope's running job (a completion its order lock waited for, or one that committed after
    the transaction's first statement): the new job entered blocked, and nothing ever
    unblocked it. Entered unblocked it is safe: claims re-check the scope."""
    producer, worker = await sessions(connect, "producer", "worker")
    observer = await connect()
    first = await _running(observer)
    await producer.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    if waits:
        job = await _enqueue_waiting_for_a_completion(producer, worker, observer, first)
    else:
        await producer.fetchval("SELECT count(*) FROM pgqueue.jobs")  # the snapshot
        assert await worker.fetchval("SELECT pgqueue.complete($1, 'w')", first)
        job = await producer.fetchval(ENQUEUE, SCOPE)
    await producer.commit()
    assert await observer.fetchval(BLOCKED, job) is False
    assert await _claim(observer) == [job]


@pytest.mark.parametrize(
    "transition",
    [
        "SELECT pgqueue.complete($1, 'w')",
        "SELECT pgqueue.fail($1, 'w', 'boom')",
        "SELECT pgqueue.cancel($1)",
        "SELECT pgqueue.recover_stale('0')",
    ],
    ids=["complete", "fail", "cancel", "recover_stale"],
)
async def test_a_transition_of_a_scoped_job_refuses_repeatable_read(
    conn: asyncpg.Connection, transition: str
) -> None:
    """Its unblocking reads a snapshot that may predate a job entered blocked meanwhile, which
    would then stay blocked, silently: refused, as pause_queue refuses it."""
    first = await _running(conn)
    args = [first] if "$1" in transition else []
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    try:
        with pytest.raises(asyncpg.InvalidTransactionStateError, match="needs READ COMMITTED"):
            await conn.execute(transition, *args)
    finally:
        await conn.execute("ROLLBACK")
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", first) == "running"


@pytest.mark.parametrize("second", ["enqueue", "enqueue_many", "enqueue_many_typed"])
async def test_an_application_enqueueing_two_scopes_in_turn_never_deadlocks_a_completion(
    connect: Connect, second: str
) -> None:
    """An application transaction enqueues into scope B, then A (A before B in lock-key
    order), while a worker completes a job of each: the completion takes A's order lock,
    then waits for B's, which the application holds. The application's second enqueue then
    waited for A's lock: 40P01, one of the two rolled back. It does not wait now (it holds a
    later lock): its job enters unblocked, the completion waits for its commit, and the job
    still runs only at its turn (the claim re-checks the scope)."""
    app, worker = await sessions(connect, "app", "worker")
    observer = await connect()
    a, b, _ = await _scopes_in_key_order(observer)
    running = [await observer.fetchval(ENQUEUE, s) for s in (a, b)]
    assert await _claim(observer) == running
    await app.begin()
    later = await app.fetchval(ENQUEUE, b)
    completion = worker.start(
        worker.fetchval("SELECT count(*) FROM pgqueue.complete_many('w', $1::bigint[])", running)
    )
    await wait_blocked(observer, worker)  # holding A's order lock, on B's
    if second == "enqueue":
        earlier = await app.fetchval(ENQUEUE, a)
    elif second == "enqueue_many":
        earlier = await app.fetchval(
            "SELECT pgqueue.enqueue_many(jsonb_build_array(jsonb_build_object("
            "'job_type', 't', 'scope', $1::text::jsonb)))",
            a,
        )
    else:
        earlier = await app.fetchval(
            "SELECT pgqueue.enqueue_many(ARRAY['t'], NULL, scopes => ARRAY[$1::text::jsonb])", a
        )
    assert await lock_wait_kind(observer, app) is None
    assert not completion.done()
    await app.commit()
    assert await completion == 2
    assert await observer.fetchval(BLOCKED, earlier) is False  # entered without the lock
    assert await observer.fetchval(BLOCKED, later) is False  # unblocked by the completion
    assert sorted(await _claim(observer)) == sorted([earlier, later])
    # A third, behind the unblocked one, waits for its turn.
    third = await observer.fetchval(ENQUEUE, a)
    assert await observer.fetchval(BLOCKED, third) is True
    assert await _claim(observer) == []


async def test_holding_an_earlier_scopes_order_lock_an_enqueue_still_waits_its_turn(
    connect: Connect,
) -> None:
    """The other way round (scope A, then B) no cycle is possible: a completion waiting for
    A's lock holds none after it. So the enqueue into B waits for the completion of B's job
    in flight, and enters blocked behind the job that completion unblocked."""
    app, worker = await sessions(connect, "app", "worker")
    observer = await connect()
    a, b, _ = await _scopes_in_key_order(observer)
    running = await observer.fetchval(ENQUEUE, b)
    assert await _claim(observer) == [running]
    next_in_b = await observer.fetchval(ENQUEUE, b)
    await app.begin()
    await app.fetchval(ENQUEUE, a)
    await worker.begin()
    assert await worker.fetchval("SELECT pgqueue.complete($1, 'w')", running)
    job = await _waits_for_the_completion(observer, app, worker, app.fetchval(ENQUEUE, b))
    assert await observer.fetchval(BLOCKED, next_in_b) is False
    assert await observer.fetchval(BLOCKED, job) is True


async def _waits_for_the_completion(
    observer: asyncpg.Connection, app: Session, worker: Session, step: Coroutine[Any, Any, T]
) -> T:
    """Run the application's ``step`` while the worker's completion is uncommitted: it must
    wait for that completion's scope order lock; the completion commits, then the
    application does. Returns what the step returned."""
    started = app.start(step)
    await wait_blocked(observer, app)
    assert await lock_wait_kind(observer, app) == "advisory"
    await worker.commit()
    result = await started
    await app.commit()
    return result


async def test_one_call_enqueueing_two_scopes_waits_for_a_busy_one_and_enters_blocked(
    connect: Connect,
) -> None:
    """One enqueue_many into A and B while a completion of A's running job is in flight: the
    call takes its locks in key order, so it holds no later one when it meets A's busy lock,
    and waits (as it always did); its job enters blocked behind the job that completion
    unblocked. (A first version took every free lock first, B's too, then skipped A's as if
    an earlier call held B's, and entered such jobs unblocked: claims stepped over
    thousands of them.)"""
    app, worker = await sessions(connect, "app", "worker")
    observer = await connect()
    a, b, _ = await _scopes_in_key_order(observer)
    running = await observer.fetchval(ENQUEUE, a)
    assert await _claim(observer) == [running]
    next_in_a = await observer.fetchval(ENQUEUE, a)
    await worker.begin()
    assert await worker.fetchval("SELECT pgqueue.complete($1, 'w')", running)
    await app.begin()
    many = app.fetchval(
        "SELECT array_agg(id ORDER BY id) FROM pgqueue.enqueue_many("
        "ARRAY['t', 't'], NULL, scopes => ARRAY[$1::text::jsonb, $2::text::jsonb]) id",
        a,
        b,
    )
    job = (await _waits_for_the_completion(observer, app, worker, many))[0]
    assert await observer.fetchval(BLOCKED, next_in_a) is False
    assert await observer.fetchval(BLOCKED, job) is True


async def test_holding_an_earlier_scopes_order_lock_an_enqueue_waits_for_a_waiting_transition(
    connect: Connect,
) -> None:
    """Scopes A < B < C in key order. The application holds A's lock (an earlier call); a
    completion of B's and C's jobs holds B's and waits for C's, which a third transaction
    holds. An enqueue into B waits: a transition holding B's lock takes no lock before B's
    after it, so it cannot be waiting for anything this transaction holds."""
    app, worker, other = await sessions(connect, "app", "worker", "other")
    observer = await connect()
    a, b, c = await _scopes_in_key_order(observer)
    running = [await observer.fetchval(ENQUEUE, s) for s in (b, c)]
    assert await _claim(observer) == running
    await app.begin()
    await app.fetchval(ENQUEUE, a)
    await other.begin()
    await other.fetchval(ENQUEUE, c)
    completion = worker.start(
        worker.fetchval("SELECT count(*) FROM pgqueue.complete_many('w', $1::bigint[])", running)
    )
    await wait_blocked(observer, worker)  # holding B's order lock, on C's
    enqueue = app.start(app.fetchval(ENQUEUE, b))
    await wait_blocked(observer, app)
    assert await lock_wait_kind(observer, app) == "advisory"
    await other.commit()
    assert await completion == 2
    job = await enqueue
    await app.commit()
    assert await observer.fetchval(BLOCKED, job) is False  # the scope was free once it waited
    assert await _claim(observer) != []


async def test_a_completion_unblocks_the_next_jobs_of_its_scopes_in_id_order(
    connect: Connect,
) -> None:
    """From the lock-order audit: a completion of jobs of two scopes unblocked their next jobs
    h1 < h2 with an UPDATE joined to the scopes, which locked h2 first (in the order of the
    scopes' hashes here). While it waited for h1, which an enqueue depending on h1 and h2 had
    share-locked (in id order, as every dependency), that enqueue waited for h2: 40P01. It
    locks them in id order now, so it holds h2 only once it has h1."""
    observer, holder, worker, enqueuer = await sessions(
        connect, "obs", "holder", "worker", "enqueue"
    )
    scopes = ['{"s": "a"}', '{"s": "b"}']
    running = [await observer.fetchval(ENQUEUE, s) for s in scopes]
    assert await _claim(observer) == running
    h1, h2 = [await observer.fetchval(ENQUEUE, s) for s in scopes]
    assert [await observer.fetchval(BLOCKED, h) for h in (h1, h2)] == [True, True]
    await holder.begin()
    await holder.execute("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR SHARE", h1)
    completion = worker.start(
        worker.fetchval("SELECT count(*) FROM pgqueue.complete_many('w', $1::bigint[])", running)
    )
    await wait_blocked(observer.conn, worker)
    assert await lock_wait_kind(observer.conn, worker) in ("transactionid", "tuple")  # h1
    assert await observer.fetchval(ROW_IS_FREE, h2) == h2
    join = await enqueuer.fetchval(
        "SELECT pgqueue.enqueue('join', depends_on => $1::bigint[])", [h1, h2]
    )
    await holder.commit()
    assert await completion == 2
    assert [await observer.fetchval(BLOCKED, h) for h in (h1, h2)] == [False, False]
    assert (
        await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", join) == "waiting"
    )
