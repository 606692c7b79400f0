"""set_queue_limit(): at most max_running jobs of a queue run at once across all claimers, the
count decided under the queue's limit lock, and a place that frees wakes the queue."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest
from sqlharness import Connect, finishes_unblocked, listen, lock_wait_kind, sessions, wait_blocked

LIMIT = "SELECT pgqueue.set_queue_limit($1, $2)"
CLAIM_NEXT = "SELECT id FROM pgqueue.claim_next('w', $1::text[], $2)"
CLAIM = "SELECT id FROM pgqueue.claim($1, 'w')"


async def _enqueue(
    conn: asyncpg.Connection, queue: str, n: int = 1, priority: int = 0, scope: str | None = None
) -> list[int]:
    return [
        await conn.fetchval(
            "SELECT pgqueue.enqueue('t', queue => $1, priority => $2, scope => $3::jsonb)",
            queue,
            priority,
            scope,
        )
        for _ in range(n)
    ]


async def _claim_next(conn: asyncpg.Connection, queues: list[str] | None, batch: int) -> list[int]:
    return sorted(r["id"] for r in await conn.fetch(CLAIM_NEXT, queues, batch))


async def _running(conn: asyncpg.Connection, queue: str) -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM pgqueue.jobs WHERE queue = $1 AND state = 'running'", queue
    )
    return n


async def _finished_current_and_next(conn: asyncpg.Connection) -> tuple[int, int]:
    """Scope {"s": 1} in queue b: a succeeded job (still its current job) and the next, queued."""
    done = (await _enqueue(conn, "b", scope='{"s": 1}'))[0]
    assert await conn.fetchval(CLAIM, done) == done
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", done) is True
    scoped = (await _enqueue(conn, "b", scope='{"s": 1}'))[0]
    return done, scoped


@pytest.mark.parametrize("queues", [None, ["r", "q"]], ids=["every queue", "two queues"])
async def test_a_batch_takes_a_limited_queues_free_places_and_fills_up_elsewhere(
    conn: asyncpg.Connection, queues: list[str] | None
) -> None:
    limited = await _enqueue(conn, "q", 5, priority=5)  # first in claim order
    other = await _enqueue(conn, "r", 3)
    assert await conn.fetchval(LIMIT, "q", 2) is None
    # The pick meets the five q jobs first; two places, so the batch is filled up from r.
    assert await _claim_next(conn, queues, 5) == limited[:2] + other
    assert await _running(conn, "q") == 2
    assert await _claim_next(conn, queues, 5) == []
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", limited[2]) == 0

    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", limited[0]) is True
    assert await _claim_next(conn, ["q"], 5) == [limited[2]]
    assert await _claim_next(conn, ["q"], 5) == []


async def test_the_scoped_path_and_claim_by_id_keep_the_limit(conn: asyncpg.Connection) -> None:
    jobs = [(await _enqueue(conn, "q", scope=f'{{"s": {i}}}'))[0] for i in range(3)]
    await conn.fetchval(LIMIT, "q", 1)
    assert await _claim_next(conn, None, 3) == [jobs[0]]
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", jobs[1]) == 0
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'x', '1 hour')", jobs[0]) == "queued"
    assert await conn.fetchval(CLAIM, jobs[1]) == jobs[1]
    assert await _claim_next(conn, None, 3) == []


async def test_raising_or_removing_a_limit_wakes_the_queue_lowering_does_not(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    await _enqueue(conn, "q", 3)
    heard = await listen(connect)
    assert await conn.fetchval(LIMIT, "q", 1) is None
    assert await _claim_next(conn, None, 3) != []
    assert await conn.fetchval(LIMIT, "q", 3) == 1
    assert await asyncio.wait_for(heard.get(), 5) == "q"
    assert await _claim_next(conn, None, 3) != []
    assert await conn.fetchval(LIMIT, "q", 2) == 3  # lowered below the 2 running: nothing stops
    assert await _running(conn, "q") == 3
    assert await conn.fetchval(LIMIT, "q", None) == 2
    assert await asyncio.wait_for(heard.get(), 5) == "q"
    assert heard.empty()
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.queue_limits") == 0
    assert await conn.fetchval(LIMIT, "q", None) is None


@pytest.mark.parametrize(
    ("queue", "max_running", "message"),
    [
        ("q", 0, "max_running must be at least 1 (NULL removes the limit), got 0"),
        ("q", -3, "max_running must be at least 1 (NULL removes the limit), got -3"),
        (None, 2, "queue must be a non-blank string of at most 200 bytes, got NULL"),
        (" ", 2, "queue must be a non-blank string of at most 200 bytes, got ' '"),
    ],
)
async def test_bad_input_is_refused_and_writes_nothing(
    conn: asyncpg.Connection, queue: str | None, max_running: int, message: str
) -> None:
    with pytest.raises(
        asyncpg.InvalidParameterValueError, match=re.escape("set_queue_limit: " + message)
    ):
        await conn.fetchval(LIMIT, queue, max_running)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.queue_limits") == 0


async def test_every_end_of_a_running_job_of_a_limited_queue_wakes_it(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """A worker that found the queue full claimed nothing and sleeps; the place freed by a
    success, a final failure, a cancelled give-back or a final recovery is announced, or it
    would sleep to its next poll (a requeued job announces itself). A queue without a limit
    is not woken by its jobs' ends."""
    await conn.fetchval(LIMIT, "q", 10)
    jobs = [
        await conn.fetchval("SELECT pgqueue.enqueue('t', queue => 'q', max_attempts => 1)")
        for _ in range(4)
    ]
    free = (await _enqueue(conn, "r"))[0]
    assert len(await _claim_next(conn, None, 10)) == 5
    await conn.fetchval("SELECT pgqueue.abort($1)", jobs[2])
    heard = await listen(connect)
    ends = [
        ("SELECT pgqueue.complete($1, 'w')", True),
        ("SELECT pgqueue.fail($1, 'w', 'x')", "failed"),
        ("SELECT pgqueue.release($1, 'w')", True),  # aborted: it ends cancelled
        ("SELECT $1 = ANY (ARRAY(SELECT pgqueue.recover_stale('1 us')))", True),
    ]
    assert await conn.fetchval(ends[0][0], free) is True
    for job, (end, result) in zip(jobs, ends, strict=True):
        assert await conn.fetchval(end, job) == result
        assert await asyncio.wait_for(heard.get(), 5) == "q", end
    assert heard.empty()
    states = await conn.fetch(
        "SELECT state FROM pgqueue.jobs WHERE id = ANY ($1) ORDER BY id", jobs
    )
    assert [r["state"] for r in states] == ["succeeded", "failed", "cancelled", "failed"]


async def test_two_claimers_never_both_take_the_last_place(
    connect: Connect, conn: asyncpg.Connection
) -> None:
    jobs = await _enqueue(conn, "q", 3)
    await conn.fetchval(LIMIT, "q", 1)
    a, b = await sessions(connect, "a", "b")
    await a.begin()
    assert await _claim_next(a.conn, None, 1) == [jobs[0]]
    # b picks the next job and waits for the queue's limit lock a holds until it commits.
    claim = b.start(_claim_next(b.conn, None, 1))
    await wait_blocked(conn, b)
    assert await lock_wait_kind(conn, b) == "advisory"
    await a.commit()
    # Counted after the lock was granted: a's claim is seen, no place is left.
    assert await claim == []
    assert await _running(conn, "q") == 1


async def test_a_claim_by_id_waits_for_a_claim_under_way_and_then_counts_it(
    connect: Connect, conn: asyncpg.Connection
) -> None:
    jobs = await _enqueue(conn, "q", 2)
    await conn.fetchval(LIMIT, "q", 1)
    a, b = await sessions(connect, "a", "b")
    await a.begin()
    assert await _claim_next(a.conn, None, 1) == [jobs[0]]
    claim = b.start(b.fetch(CLAIM, jobs[1]))
    await wait_blocked(conn, b)
    assert await lock_wait_kind(conn, b) == "advisory"
    await a.rollback()
    # The claim before it rolled back: its place is free again.
    assert [r["id"] for r in await claim] == [jobs[1]]


async def test_a_later_round_never_waits_for_a_limit_lock(
    connect: Connect, conn: asyncpg.Connection
) -> None:
    """Rounds after the first hold some limit locks already; waiting for another there could
    close a cycle with a claim that took them in key order. A queue locked by another claim
    counts as full for this one."""
    first = await _enqueue(conn, "q", 3, priority=5)
    held = await _enqueue(conn, "r", 2)
    await conn.fetchval(LIMIT, "q", 1)
    await conn.fetchval(LIMIT, "r", 5)
    a, b = await sessions(connect, "a", "b")
    heard = await listen(connect)
    await a.begin()
    assert await a.fetchval(CLAIM, held[0]) == held[0]  # a holds r's limit lock
    # b: round 1 takes q's one place; round 2 meets r, whose lock a holds.
    assert await finishes_unblocked(conn, b, _claim_next(b.conn, None, 3)) == [first[0]]
    # ... and announces r: its workers claim again (and wait for a's lock then).
    assert await asyncio.wait_for(heard.get(), 5) == "r"
    await a.commit()
    assert await _claim_next(b.conn, None, 3) == [held[1]]


async def test_claim_or_wait_never_waits_for_a_limit_lock(
    connect: Connect, conn: asyncpg.Connection
) -> None:
    """claim_or_wait holds the 'waiters' lock, which every enqueue and completion takes too in
    when_waiting mode: waiting there for a limit lock held by an application transaction held
    up every enqueue, and deadlocked with that transaction's completion."""
    await conn.execute("UPDATE pgqueue.settings SET value = 'when_waiting' WHERE name = 'notify'")
    jobs = await _enqueue(conn, "api", 2)
    await conn.fetchval(LIMIT, "api", 5)
    app, worker = await sessions(connect, "app", "worker")
    heard = await listen(connect)
    await app.begin()
    assert await app.fetchval(CLAIM, jobs[0]) == jobs[0]  # holds api's limit lock
    claimed = await finishes_unblocked(
        conn, worker, worker.fetch("SELECT id FROM pgqueue.claim_or_wait('w', '{api}', 1)")
    )
    assert claimed == []
    # The queue it could not count is announced: the worker claims again at once.
    assert await asyncio.wait_for(heard.get(), 5) == "api"
    assert await finishes_unblocked(
        conn, app, app.fetchval("SELECT pgqueue.complete($1, 'w')", jobs[0])
    )
    await app.commit()
    assert await _claim_next(worker.conn, ["api"], 1) == [jobs[1]]


async def test_a_claim_locks_the_rows_it_writes_before_the_limit_lock(
    connect: Connect, conn: asyncpg.Connection
) -> None:
    """A claim holding a limit lock must wait for no row: one that cleared the previous
    current job of its scope after the lock waited for a claim that had picked that job and
    queued up for the same limit lock (deadlock)."""
    await conn.fetchval(LIMIT, "q", 10)
    older = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', queue => 'q', scope => '{\"s\": 1}', max_attempts => 1)"
    )
    current = (await _enqueue(conn, "q", scope='{"s": 1}'))[0]
    assert await conn.fetchval(CLAIM, older) == older
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'x')", older) == "failed"
    assert await conn.fetchval(CLAIM, current) == current
    # Requeued, it is still its scope's current job.
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'x', '0')", current) == "queued"
    other = (await _enqueue(conn, "q", priority=-1))[0]
    last = (await _enqueue(conn, "q", priority=-5))[0]
    holder, app, worker = await sessions(connect, "holder", "app", "worker")
    await holder.begin()
    assert await holder.fetchval(CLAIM, last) == last  # holds q's limit lock
    await app.begin()
    assert await app.fetchval("SELECT pgqueue.retry($1)", older) is True  # now the head again
    app_claim = app.start(app.fetch(CLAIM, older))
    await wait_blocked(conn, app)
    assert await lock_wait_kind(conn, app) == "advisory"
    # The worker's snapshot still has `current` as the scope's head: it picks it (the scope's
    # try-lock fails: app holds it), and `other`, then queues up for q's limit lock.
    worker_claim = worker.start(_claim_next(worker.conn, None, 2))
    await wait_blocked(conn, worker)
    await holder.commit()
    assert [r["id"] for r in await app_claim] == [older]
    await app.commit()
    assert await worker_claim == [other]


async def test_under_repeatable_read_no_limited_job_is_claimed(conn: asyncpg.Connection) -> None:
    limited = await _enqueue(conn, "q")
    other = await _enqueue(conn, "r")
    await conn.fetchval(LIMIT, "q", 5)
    async with conn.transaction(isolation="repeatable_read"):
        assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", limited[0]) == 0
        assert await _claim_next(conn, None, 5) == other
    assert await _claim_next(conn, None, 5) == limited


async def test_after_claim_or_wait_a_transactions_claims_only_try_limit_locks(
    connect: Connect, conn: asyncpg.Connection
) -> None:
    """The 'waiters' lock claim_or_wait took lasts to commit: a claim later in that transaction
    that waited for a limit lock would deadlock with a holder that then enqueues."""
    await conn.execute("UPDATE pgqueue.settings SET value = 'when_waiting' WHERE name = 'notify'")
    jobs = await _enqueue(conn, "api", 3)
    await conn.fetchval(LIMIT, "api", 5)
    holder, worker = await sessions(connect, "holder", "worker")
    await holder.begin()
    assert await holder.fetchval(CLAIM, jobs[0]) == jobs[0]
    await worker.begin()
    assert await worker.fetch("SELECT id FROM pgqueue.claim_or_wait('w', '{other}', 1)") == []
    assert await finishes_unblocked(conn, worker, _claim_next(worker.conn, ["api"], 1)) == []
    assert await finishes_unblocked(conn, worker, worker.fetch(CLAIM, jobs[1])) == []
    await worker.commit()
    await holder.commit()
    assert await _claim_next(worker.conn, ["api"], 1) == [jobs[1]]


async def test_a_later_round_skips_a_scope_whose_current_row_is_held(
    connect: Connect, conn: asyncpg.Connection
) -> None:
    """Rounds after the first hold a limit lock: waiting there for the previous current job's
    row (held FOR SHARE by an enqueue that depends on it) held up every claim of the queue."""
    done, scoped = await _finished_current_and_next(conn)
    first = await _enqueue(conn, "a", 3, priority=10)
    await conn.fetchval(LIMIT, "a", 1)
    app, worker = await sessions(connect, "app", "worker")
    heard = await listen(connect)
    await app.begin()
    await app.fetchval(
        "SELECT pgqueue.enqueue('report', queue => 'c', depends_on => ARRAY[$1::bigint])", done
    )
    claimed = await finishes_unblocked(conn, worker, _claim_next(worker.conn, ["a", "b"], 2))
    assert claimed == [first[0]]
    assert await asyncio.wait_for(heard.get(), 5) == "b"  # its workers claim it again
    await app.commit()
    assert await _claim_next(worker.conn, ["b"], 2) == [scoped]


async def test_two_limit_changes_take_turns(connect: Connect, conn: asyncpg.Connection) -> None:
    a, b = await sessions(connect, "a", "b")
    heard = await listen(connect)
    await a.begin()
    assert await a.fetchval(LIMIT, "r", 1) is None
    raised = b.start(b.fetchval(LIMIT, "r", 5))
    await wait_blocked(conn, b)
    assert await lock_wait_kind(conn, b) == "advisory"
    await a.commit()
    assert await raised == 1  # it saw a's limit, and raised it
    assert await asyncio.wait_for(heard.get(), 5) == "r"
    assert await conn.fetchval("SELECT max_running FROM pgqueue.queue_limits") == 5


async def test_a_limit_change_needs_read_committed(conn: asyncpg.Connection) -> None:
    async with conn.transaction(isolation="repeatable_read"):
        with pytest.raises(
            asyncpg.InvalidTransactionStateError,
            match=re.escape("pgqueue.set_queue_limit: needs READ COMMITTED"),
        ):
            await conn.fetchval(LIMIT, "q", 2)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.queue_limits") == 0


async def test_claim_or_wait_skips_a_scope_whose_current_row_is_held(
    connect: Connect, conn: asyncpg.Connection
) -> None:
    """claim_or_wait holds the 'waiters' lock: clearing the flag of a scope's current job held
    FOR SHARE by an enqueue that depends on it, it waited there, and every enqueue behind it
    (with or without limits)."""
    await conn.execute("UPDATE pgqueue.settings SET value = 'when_waiting' WHERE name = 'notify'")
    done, scoped = await _finished_current_and_next(conn)
    app, worker = await sessions(connect, "app", "worker")
    heard = await listen(connect)
    await app.begin()
    # What an enqueue that depends on it holds until it commits (without the 'waiters' lock an
    # enqueue of a queued job also takes, shared, which claim_or_wait waits for by design).
    await app.fetchval("SELECT id FROM pgqueue.jobs WHERE id = $1 FOR SHARE", done)
    claimed = await finishes_unblocked(
        conn, worker, worker.fetch("SELECT id FROM pgqueue.claim_or_wait('w', '{b}', 2)")
    )
    assert claimed == []
    assert await asyncio.wait_for(heard.get(), 5) == "b"  # its workers claim it again
    await app.commit()
    assert await _claim_next(worker.conn, ["b"], 2) == [scoped]


async def test_a_limit_set_elsewhere_binds_a_session_that_claimed_before(
    connect: Connect, conn: asyncpg.Connection
) -> None:
    """Whether any queue is limited is a constant in claim_next's cached plan (reading the
    table cost every idle pickup); set_queue_limit replaces it, and so every session's plan."""
    worker = (await sessions(connect, "worker"))[0]
    first = await _enqueue(conn, "q", 4)
    assert await _claim_next(worker.conn, None, 1) == first[:1]  # planned without a limit
    assert await conn.fetchval(LIMIT, "q", 2) is None
    assert await conn.fetchval("SELECT pgqueue._any_queue_limit()") is True
    assert await _claim_next(worker.conn, None, 3) == first[1:2]
    assert await conn.fetchval(LIMIT, "q", None) == 2
    assert await conn.fetchval("SELECT pgqueue._any_queue_limit()") is False
    assert await _claim_next(worker.conn, None, 3) == first[2:]


async def test_a_claim_of_several_queues_waits_for_a_limit_lock_it_does_not_hold(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """The share of q, first in claim order, finds every q job held by another claim, so a
    further round fills the batch from L. That round holds no limit lock yet, so it waits for
    L's, as any claim's first take of a limit lock does; an earlier version only tried it in
    any round but the first, came back empty with L's places free and announced L, and a
    worker woken by its own notification claimed nothing again, as long as the lock was held."""
    q = await _enqueue(conn, "q", 2, priority=10)
    limited = await _enqueue(conn, "L", 5)
    assert await conn.fetchval(LIMIT, "L", 5) is None
    observer, holder_q, holder_l, me = await sessions(connect, "obs", "q", "l", "me")
    await holder_q.begin()
    assert _ids(await holder_q.fetch("SELECT id FROM pgqueue.claim_next('hq', '{q}', 2)")) == q
    await holder_l.begin()
    assert _ids(await holder_l.fetch("SELECT id FROM pgqueue.claim_next('hl', '{L}', 1)")) == [
        limited[0]
    ]
    claim = me.start(me.fetch("SELECT id FROM pgqueue.claim_next('me', '{q,L}', 2)"))
    await wait_blocked(observer.conn, me)
    assert await lock_wait_kind(observer.conn, me) == "advisory"
    await holder_l.commit()
    assert _ids(await claim) == limited[1:3]
    await holder_q.rollback()


def _ids(rows: list[asyncpg.Record]) -> list[int]:
    return sorted(r["id"] for r in rows)


async def test_a_limit_written_by_hand_holds_for_claim_next(connect: Connect) -> None:
    """claim_next reads limits only while _any_queue_limit says one exists, which only
    set_queue_limit updated: a hand INSERT was ignored (3 running under a limit of 1)."""
    conn = await connect()
    await conn.execute("INSERT INTO pgqueue.queue_limits VALUES ('api', 1)")
    await conn.execute("SELECT pgqueue.enqueue('call', queue => 'api') FROM generate_series(1, 3)")
    assert len(await conn.fetch("SELECT id FROM pgqueue.claim_next('w', ARRAY['api'], 3)")) == 1
    await conn.execute("DELETE FROM pgqueue.queue_limits")
    assert await conn.fetchval("SELECT pgqueue._any_queue_limit()") is False
    assert len(await conn.fetch("SELECT id FROM pgqueue.claim_next('w', ARRAY['api'], 3)")) == 2


LIMIT_READS = """
SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables
WHERE relid = 'pgqueue.queue_limits'::regclass
"""


async def test_while_no_queue_has_a_limit_no_claim_reads_the_table(connect: Connect) -> None:
    """The one-statement path asked a constant; the general path (any scoped job queued or
    running anywhere sends every claim_next down it) and claim by id read queue_limits on
    every call: a relation opened, 3-12 us per claim, for nothing."""
    conn, observer = await connect(), await connect()
    ids = await _enqueue(conn, "q", 4, scope='{"s": 1}') + await _enqueue(conn, "q", 3)
    await conn.execute("SELECT pg_stat_force_next_flush()")
    before = await observer.fetchval(LIMIT_READS)
    assert await _claim_next(conn, None, 2) == [ids[0], ids[4]]  # the scope's head, a plain job
    assert await _claim_next(conn, ["q"], 1) == [ids[5]]
    assert [r["id"] for r in await conn.fetch(CLAIM, ids[6])] == [ids[6]]
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await observer.execute("SELECT pg_stat_clear_snapshot()")
    assert await observer.fetchval(LIMIT_READS) == before
    await conn.execute("SELECT pgqueue.set_queue_limit('other', 1)")  # and once one has, it reads
    await _claim_next(conn, None, 1)
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await observer.execute("SELECT pg_stat_clear_snapshot()")
    assert await observer.fetchval(LIMIT_READS) > before
