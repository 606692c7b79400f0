"""settings.notify = 'when_waiting': NOTIFY only for waiting workers, and no wake-up lost.

The handshake (sql/07_notify.sql): a worker about to sleep claims through ``claim_or_wait``,
which takes the 'waiters' advisory lock exclusively and registers; a queueing transaction
takes it shared and notifies only if it found a registration. The races below are the
two orders in which a producer and a sleeping worker can meet, each forced with explicit
transactions and proven by the observed lock wait.
"""

from __future__ import annotations

import asyncio

import asyncpg
from sqlharness import BLOCK_TIMEOUT, Connect, lock_wait_kind, sessions, wait_blocked
from test_notify import Listener

WHEN_WAITING = "UPDATE pgqueue.settings SET value = 'when_waiting' WHERE name = 'notify'"
ENQUEUE = "SELECT pgqueue.enqueue('t', queue => $1)"
CLAIM_OR_WAIT = "SELECT id FROM pgqueue.claim_or_wait('w1', ARRAY['q'], 10)"


async def _listener(connect: Connect) -> Listener:
    conn = await connect()
    listener = Listener(conn)
    await conn.add_listener("pgqueue", listener)
    return listener


async def test_notifies_only_a_waiting_worker_and_only_once(connect: Connect) -> None:
    conn = await connect()
    await conn.execute(WHEN_WAITING)
    listener = await _listener(connect)
    first = await conn.fetchval(ENQUEUE, "q")
    assert await listener.drain() == []  # nobody waits: no NOTIFY, no commit-order lock
    # The worker's pre-sleep claim takes the job and registers it as waiting.
    assert [r["id"] for r in await conn.fetch(CLAIM_OR_WAIT)] == [first]
    assert await conn.fetchval("SELECT queues FROM pgqueue.notify_waiters") == ["q"]
    await conn.fetchval(ENQUEUE, "other")  # not one of its queues: it sleeps on
    assert await listener.drain() == []
    await conn.fetchval(ENQUEUE, "q")
    assert await listener.drain(1) == ["q"]  # wakes it, and consumes the registration
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.notify_waiters") == 0
    await conn.fetchval(ENQUEUE, "q")
    assert await listener.drain() == []


async def test_requeue_and_bulk_insert_go_through_the_same_gate(connect: Connect) -> None:
    conn = await connect()
    await conn.execute(WHEN_WAITING)
    listener = await _listener(connect)
    await conn.fetch("SELECT pgqueue.claim_or_wait('w1', NULL, 1)")  # every queue, nothing to claim
    await conn.fetch(
        "SELECT pgqueue.enqueue_many($1::jsonb)",
        '[{"job_type": "t", "queue": "a"}, {"job_type": "t", "queue": "b"}]',
    )
    assert sorted(await listener.drain(2)) == ["a", "b"]
    job = await conn.fetchval("SELECT id FROM pgqueue.claim_next('w2', ARRAY['a'])")
    assert await conn.fetch("SELECT pgqueue.claim_or_wait('w1', ARRAY['a'], 1)") == []
    assert await conn.fetchval("SELECT pgqueue.release($1, 'w2')", job)
    assert await listener.drain(1) == ["a"]


async def test_always_mode_notifies_every_time_and_registers_nobody(connect: Connect) -> None:
    conn = await connect()
    listener = await _listener(connect)
    assert await conn.fetch("SELECT * FROM pgqueue.claim_or_wait('w1', ARRAY['q'], 1)") == []
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.notify_waiters") == 0
    await conn.fetchval(ENQUEUE, "q")
    await conn.fetchval(ENQUEUE, "q")
    assert await listener.drain(2) == ["q", "q"]


async def test_sleeping_worker_waits_for_a_silent_producer_and_claims_its_job(
    connect: Connect,
) -> None:
    """Producer first: it saw no waiter and will not notify. The worker's pre-sleep claim
    must wait for its commit and then take the job, or the job would sit until the poll."""
    producer, worker = await sessions(connect, "producer", "worker")
    observer = await connect()
    await observer.execute(WHEN_WAITING)
    listener = await _listener(connect)
    await producer.begin()
    job = await producer.fetchval(ENQUEUE, "q")
    claim = worker.start(worker.fetch(CLAIM_OR_WAIT))
    await wait_blocked(observer, worker)
    assert await lock_wait_kind(observer, worker) == "advisory"
    await producer.commit()
    assert [r["id"] for r in await claim] == [job]
    assert await listener.drain() == []


async def test_producer_meeting_a_registering_worker_notifies_without_waiting(
    connect: Connect,
) -> None:
    """Worker first: its registration is not committed yet when the producer queues. The
    producer notifies without looking (the lock is not free), or the worker would sleep
    through its job; it does not wait for the worker (see the next test for why)."""
    producer, worker = await sessions(connect, "producer", "worker")
    observer = await connect()
    await observer.execute(WHEN_WAITING)
    listener = await _listener(connect)
    await worker.begin()
    assert await worker.fetch(CLAIM_OR_WAIT) == []
    await asyncio.wait_for(producer.fetchval(ENQUEUE, "q"), BLOCK_TIMEOUT)
    assert await listener.drain(1) == ["q"]  # at the producer's commit, the worker's still open
    await worker.commit()
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.notify_waiters") == 1


async def test_a_producer_holding_a_scope_lock_and_a_registering_worker_do_not_deadlock(
    connect: Connect,
) -> None:
    """From a fuzzing review: a transaction holding a scope's order lock from an earlier call
    (a cancel of a scoped job) enqueued and waited for the 'waiters' lock shared, queued
    behind a worker's claim_or_wait, which waited for a completion's shared lock, which
    waited for that scope's order lock: a cycle, which PostgreSQL's deadlock detector broke
    after deadlock_timeout by reordering the queue, or else with 40P01 (seen by the
    fuzzer). Producers now only try the lock: the enqueue waits for nothing (a lock_timeout
    far below deadlock_timeout shows it)."""
    app_tx, completer, worker = await sessions(connect, "app", "completer", "worker")
    observer = await connect()
    await observer.execute(WHEN_WAITING)
    scoped = "SELECT pgqueue.enqueue('t', scope => '{\"s\": 1}')"
    running = await observer.fetchval(scoped)
    assert await observer.fetchval("SELECT id FROM pgqueue.claim_next('w0')") == running
    behind = await observer.fetchval(scoped)
    await app_tx.begin()
    assert await app_tx.fetchval("SELECT pgqueue.cancel($1)", behind)  # holds the scope's lock
    await completer.begin()
    await completer.fetchval(ENQUEUE, "other")  # holds the 'waiters' lock shared
    completing = completer.start(completer.fetchval("SELECT pgqueue.complete($1, 'w0')", running))
    await wait_blocked(observer, completer)  # for the scope's order lock
    claiming = worker.start(worker.fetch(CLAIM_OR_WAIT))
    await wait_blocked(observer, worker)  # for the 'waiters' lock, exclusively
    assert await lock_wait_kind(observer, worker) == "advisory"
    await app_tx.execute("SET LOCAL lock_timeout = '100ms'")
    await asyncio.wait_for(app_tx.fetchval(ENQUEUE, "q"), BLOCK_TIMEOUT)  # 55P03 before
    await app_tx.commit()
    assert await asyncio.wait_for(completing, BLOCK_TIMEOUT) is True
    await completer.commit()
    claimed = [r["id"] for r in await asyncio.wait_for(claiming, BLOCK_TIMEOUT)]
    assert len(claimed) == 1  # the job the app transaction queued in q


async def test_producers_queueing_in_opposite_orders_neither_wait_nor_deadlock(
    connect: Connect,
) -> None:
    """From a fuzzing review: each producer deleted the waiters of its queues, waiting for a
    registration another uncommitted producer had consumed; two transactions queueing in
    queues qa and qb in opposite orders (or one completion queueing dependents of both)
    deadlocked, 40P01. A registration another producer holds is skipped and its worker
    notified all the same (at most one wake-up more, and none lost if that one rolls back)."""
    a, b = await sessions(connect, "a", "b")
    observer = await connect()
    await observer.execute(WHEN_WAITING)
    for worker, queue in (("wa", "qa"), ("wb", "qb")):
        await observer.fetch("SELECT pgqueue.claim_or_wait($1, ARRAY[$2], 1)", worker, queue)
    listener = await _listener(connect)
    await a.begin()
    await b.begin()
    await a.fetchval(ENQUEUE, "qa")  # consumes wa's registration
    await b.fetchval(ENQUEUE, "qb")  # consumes wb's
    crossing = [a.start(a.fetchval(ENQUEUE, "qb")), b.start(b.fetchval(ENQUEUE, "qa"))]
    done, _ = await asyncio.wait(crossing, timeout=BLOCK_TIMEOUT)
    assert len(done) == 2, await lock_wait_kind(observer, a)  # it waited: 'transactionid'
    assert all(isinstance(t.result(), int) for t in crossing)  # 40P01 raised here before
    await b.rollback()  # wb's registration back: b's notification for qb is gone with it...
    await a.commit()
    assert sorted(set(await listener.drain(2))) == ["qa", "qb"]  # ...but a told qb too
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.notify_waiters") == 1  # wb


async def test_a_repeatable_read_producer_notifies_a_worker_registered_after_its_snapshot(
    connect: Connect,
) -> None:
    """From a review: a producer at REPEATABLE READ whose snapshot was taken before a worker
    registered read no waiter and did not notify; the worker slept through its job. Above
    READ COMMITTED a producer notifies without looking."""
    producer, worker = await sessions(connect, "producer", "worker")
    observer = await connect()
    await observer.execute(WHEN_WAITING)
    listener = await _listener(connect)
    await producer.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    await producer.fetchval("SELECT 1")  # the snapshot
    assert await worker.fetch(CLAIM_OR_WAIT) == []  # registered, committed
    await producer.fetchval(ENQUEUE, "q")
    await producer.commit()
    assert await listener.drain(1) == ["q"]


async def test_bad_notify_setting_is_refused(conn: asyncpg.Connection) -> None:
    try:
        await conn.execute("UPDATE pgqueue.settings SET value = 'sometimes' WHERE name = 'notify'")
    except asyncpg.PostgresError as exc:
        assert "notify must be 'always' or 'when_waiting'" in str(exc)
    else:
        raise AssertionError("an unknown notify mode was accepted")
    assert (
        await conn.fetchval("SELECT value FROM pgqueue.settings WHERE name = 'notify'") == "always"
    )


async def test_a_dependency_an_enqueue_holds_wakes_the_worker_that_skipped_it(
    connect: Connect,
) -> None:
    """From review: a worker's pre-sleep claim skipped a queued job that a producer's
    transaction held (here first by a plain row lock, then as the dependency of its enqueue)
    and registered; the enqueue's insert trigger saw the waiter but had only a waiting job to
    announce, so the worker slept until its poll. The held dependency is announced now."""
    producer, worker = await sessions(connect, "producer", "worker")
    observer = await connect()
    await observer.execute(WHEN_WAITING)
    listener = await _listener(connect)
    job = await observer.fetchval(ENQUEUE, "q")
    await producer.begin()
    await producer.execute("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR SHARE", job)
    assert await worker.fetch(CLAIM_OR_WAIT) == []  # skipped: held; the worker sleeps
    await producer.fetchval(
        "SELECT pgqueue.enqueue('c', queue => 'other', depends_on => ARRAY[$1::bigint])", job
    )
    await producer.commit()
    assert await listener.drain(1) == ["q"]
    assert [r["id"] for r in await worker.fetch(CLAIM_OR_WAIT)] == [job]
