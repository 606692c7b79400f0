"""pause_queue() / resume_queue(): no claim takes a job of a paused queue, everything else
goes on, and resuming wakes the queue's workers."""

from __future__ import annotations

import asyncio

import anyio
import asyncpg
import pytest
from sqlharness import Connect, finishes_unblocked, listen, lock_wait_kind, sessions, wait_blocked

PAUSE = "SELECT pgqueue.pause_queue($1)"
RESUME = "SELECT pgqueue.resume_queue($1)"
CLAIM_NEXT = "SELECT id FROM pgqueue.claim_next('w', $1::text[], 10) ORDER BY id"
CLAIM_OR_WAIT = "SELECT id FROM pgqueue.claim_or_wait('w', $1::text[], 10) ORDER BY id"


async def _enqueue(conn: asyncpg.Connection, queue: str, scope: str | None = None) -> int:
    job: int = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', queue => $1, scope => $2::jsonb)", queue, scope
    )
    return job


async def _claim_next(conn: asyncpg.Connection, queues: list[str] | None = None) -> list[int]:
    return [r["id"] for r in await conn.fetch(CLAIM_NEXT, queues)]


async def test_no_claim_takes_a_job_of_a_paused_queue(conn: asyncpg.Connection) -> None:
    # Only unscoped jobs: claim_next's one-statement path.
    paused = await _enqueue(conn, "p")
    other = await _enqueue(conn, "q")
    assert await conn.fetchval(PAUSE, "p") is True
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", paused) == 0
    assert [r["id"] for r in await conn.fetch(CLAIM_OR_WAIT, ["p"])] == []
    assert await _claim_next(conn, ["p"]) == []
    assert await _claim_next(conn) == [other]
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", paused) == "queued"

    assert await conn.fetchval(RESUME, "p") is True
    assert await _claim_next(conn) == [paused]


async def test_the_scoped_claim_path_skips_paused_queues_too(conn: asyncpg.Connection) -> None:
    # A scoped job queued sends claim_next down its general path.
    paused = await _enqueue(conn, "p")
    paused_scoped = await _enqueue(conn, "p", '{"s": 1}')
    other_scoped = await _enqueue(conn, "q", '{"s": 2}')
    await conn.fetchval(PAUSE, "p")
    assert await _claim_next(conn) == [other_scoped]
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", paused_scoped) == 0
    await conn.fetchval(RESUME, "p")
    assert await _claim_next(conn) == [paused, paused_scoped]


@pytest.mark.parametrize("path", ["one statement", "general"])
async def test_a_claim_of_one_queue_skips_its_unflagged_paused_jobs(
    conn: asyncpg.Connection, path: str
) -> None:
    """A job an enqueue under way at the pause left unflagged is in the claim indexes; a
    claim naming only its queue (read through jobs_ready_in_queue) skips it by name too."""
    if path == "general":
        await _enqueue(conn, "q", '{"s": 1}')
    job = await _enqueue(conn, "p")
    await conn.fetchval(PAUSE, "p")
    await conn.execute("UPDATE pgqueue.jobs SET queue_paused = false WHERE id = $1", job)
    assert await _claim_next(conn, ["p"]) == []
    await conn.fetchval(RESUME, "p")
    assert await _claim_next(conn, ["p"]) == [job]


async def test_a_scope_waits_behind_its_head_in_a_paused_queue(conn: asyncpg.Connection) -> None:
    """Scopes run in id order across queues: pausing the queue of a scope's next job holds
    up the scope's later jobs in other queues."""
    head = await _enqueue(conn, "p", '{"s": 1}')
    behind = await _enqueue(conn, "q", '{"s": 1}')
    await conn.fetchval(PAUSE, "p")
    assert await _claim_next(conn) == []
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", behind) == 0
    await conn.fetchval(RESUME, "p")
    assert await _claim_next(conn) == [head]


async def test_enqueues_running_jobs_and_outcomes_go_on(conn: asyncpg.Connection) -> None:
    running = await _enqueue(conn, "p")
    failing = await _enqueue(conn, "p")
    assert await _claim_next(conn) == [running, failing]
    await conn.fetchval(PAUSE, "p")
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", running) is True
    # A failed attempt is requeued as usual, and waits for the resume like any queued job.
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom', '0 s')", failing) == "queued"
    assert await _claim_next(conn) == []
    late = await _enqueue(conn, "p")
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", late) == "queued"
    await conn.fetchval(RESUME, "p")
    assert await _claim_next(conn) == [failing, late]


async def test_pause_and_resume_say_whether_they_changed_anything(
    conn: asyncpg.Connection,
) -> None:
    assert await conn.fetchval(PAUSE, "p") is True
    assert await conn.fetchval(PAUSE, "p") is False
    assert await conn.fetchval(PAUSE, "q") is True
    assert [
        r[0] for r in await conn.fetch("SELECT queue FROM pgqueue.paused_queues ORDER BY 1")
    ] == [
        "p",
        "q",
    ]
    assert await conn.fetchval(RESUME, "p") is True
    assert await conn.fetchval(RESUME, "p") is False
    assert await conn.fetchval(RESUME, "never") is False
    assert [r[0] for r in await conn.fetch("SELECT queue FROM pgqueue.paused_queues")] == ["q"]


async def test_resuming_wakes_the_queues_workers(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    heard = await listen(connect)
    await conn.fetchval(PAUSE, "p")
    await conn.fetchval(RESUME, "p")
    assert await asyncio.wait_for(heard.get(), 5) == "p"
    # Nothing to resume, nothing sent: the next notification is the marker.
    await conn.fetchval(RESUME, "p")
    await conn.execute("NOTIFY pgqueue, 'marker'")
    assert await asyncio.wait_for(heard.get(), 5) == "marker"


async def test_in_when_waiting_mode_resuming_wakes_a_waiting_worker(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    await conn.execute("UPDATE pgqueue.settings SET value = 'when_waiting' WHERE name = 'notify'")
    heard = await listen(connect)
    await _enqueue(conn, "p")
    await conn.fetchval(PAUSE, "p")
    assert [r["id"] for r in await conn.fetch(CLAIM_OR_WAIT, ["p"])] == []  # registers
    await conn.fetchval(RESUME, "p")
    assert await asyncio.wait_for(heard.get(), 5) == "p"
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.notify_waiters") == 0


@pytest.mark.parametrize(
    ("function", "queue", "message"),
    [
        (
            "pause_queue",
            None,
            "pgqueue.pause_queue: queue must be a non-blank string of at most 200 bytes, got NULL",
        ),
        (
            "pause_queue",
            "",
            "pgqueue.pause_queue: queue must be a non-blank string of at most 200 bytes, got ''",
        ),
        (
            "pause_queue",
            "  ",
            "pgqueue.pause_queue: queue must be a non-blank string of at most 200 bytes, got '  '",
        ),
        (
            "resume_queue",
            None,
            "pgqueue.resume_queue: queue must be a non-blank string of at most 200 bytes, got NULL",
        ),
        (
            "resume_queue",
            " ",
            "pgqueue.resume_queue: queue must be a non-blank string of at most 200 bytes, got ' '",
        ),
    ],
)
async def test_a_missing_queue_name_is_refused(
    conn: asyncpg.Connection, function: str, queue: str | None, message: str
) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError) as raised:
        await conn.fetchval(f"SELECT pgqueue.{function}($1)", queue)
    assert str(raised.value) == message
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.paused_queues") == 0


async def test_a_queue_name_no_job_could_have_is_refused(conn: asyncpg.Connection) -> None:
    for function in ("pause_queue", "resume_queue"):
        with pytest.raises(asyncpg.InvalidParameterValueError) as raised:
            await conn.fetchval(f"SELECT pgqueue.{function}($1)", "q" * 201)
        assert str(raised.value) == (
            f"pgqueue.{function}: queue must be a non-blank string of at most 200 bytes,"
            " got 201 bytes"
        )
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.paused_queues") == 0


READY = (
    "SELECT id FROM pgqueue.jobs WHERE state = 'queued' AND NOT scope_blocked"
    " AND NOT queue_paused ORDER BY id"
)
FLAGGED = "SELECT id FROM pgqueue.jobs WHERE queue_paused ORDER BY id"


async def _ids(conn: asyncpg.Connection, sql: str) -> list[int]:
    return [r["id"] for r in await conn.fetch(sql)]


async def test_a_paused_queues_jobs_are_kept_out_of_the_claim_index(
    conn: asyncpg.Connection,
) -> None:
    """Whichever way a job enters queued while its queue is paused, it is flagged out of
    jobs_ready (a claim never reads a paused backlog); resuming clears every flag."""
    before = [await _enqueue(conn, "p"), await _enqueue(conn, "p", '{"s": 1}')]
    blocked = await _enqueue(conn, "p", '{"s": 1}')  # behind the scoped one: scope_blocked
    failing = await _enqueue(conn, "p")
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", failing) == 1
    waiting = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', queue => 'p', depends_on => ARRAY[$1::bigint])", failing
    )
    elsewhere = await _enqueue(conn, "q")
    await conn.fetchval(PAUSE, "p")
    assert await _ids(conn, FLAGGED) == [*before, blocked]
    # While paused: enqueued one by one and in bulk, failed with attempts left, retried by
    # hand, queued by fan-in.
    single = await _enqueue(conn, "p")
    bulk = await _ids(
        conn,
        """SELECT id FROM pgqueue.enqueue_many('[{"job_type": "t", "queue": "p"},
                                                     {"job_type": "t", "queue": "q"}]') id""",
    )
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom', '0 s')", failing) == "queued"
    await conn.execute(
        "UPDATE pgqueue.jobs SET state = 'failed', finished_at = now() WHERE id = $1", failing
    )
    assert await conn.fetchval("SELECT pgqueue.retry($1)", failing) is True
    await conn.execute("SELECT pgqueue.cancel($1)", before[0])  # a flagged job that ends
    assert await _ids(conn, READY) == [elsewhere, bulk[1]]
    assert await _ids(conn, FLAGGED) == [*before, blocked, failing, single, bulk[0]]
    # The fan-in dependent of the retried job is still waiting; it is queued by the
    # completion, while the queue is still paused.
    await conn.fetch("SELECT pgqueue.claim_next('w', ARRAY['q'], 10)")
    assert await conn.fetchval("SELECT pgqueue.resume_queue('p')") is True
    assert await _ids(conn, FLAGGED) == []
    await conn.fetchval(PAUSE, "p")
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", failing) == 0
    await conn.fetchval(RESUME, "p")
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", failing) == 1
    await conn.fetchval(PAUSE, "p")
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", failing) is True
    assert waiting in await _ids(conn, FLAGGED)
    await conn.fetchval(RESUME, "p")
    assert await _ids(conn, FLAGGED) == []
    claimed = await _claim_next(conn, ["p"])
    assert claimed == sorted([before[1], single, bulk[0], waiting])  # blocked: behind 2


async def test_a_claim_reads_none_of_a_paused_backlog(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """Pausing rewrites the queue's queued jobs once; the first scan of the claim index after
    it steps over their old entries (and marks them dead), later claims never meet them."""
    await conn.execute(
        "SELECT pgqueue.enqueue_many(array_fill('t'::text, ARRAY[2000]),"
        " NULL, array_fill('p'::text, ARRAY[2000]), NULL, NULL, NULL, NULL)"
    )
    pause_xid = await conn.fetchval(
        "SELECT pg_current_xact_id()::text::bigint FROM pgqueue.pause_queue('p')"
    )
    # A scan marks an index entry dead only once no snapshot can see its tuple: while any
    # transaction older than the pause runs on the server (another test run's, in any
    # database), every claim's own snapshot keeps the old entries alive, and so does any
    # snapshot taken in this database (an autovacuum ANALYZE of the new rows, say, where
    # autovacuum is on). Wait for both to end.
    horizon_passed = """
        SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint > $1
           AND NOT EXISTS (SELECT 1 FROM pg_stat_activity
                           WHERE datname = current_database() AND pid <> pg_backend_pid()
                             AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL))"""
    with anyio.fail_after(120):
        while True:
            if await conn.fetchval(horizon_passed, pause_xid):
                break
            await anyio.sleep(0.05)  # polling interval: the wait is for other sessions' commits
    first = await _enqueue(conn, "q")
    assert await _claim_next(conn) == [first]
    observer = await connect()
    read = (
        "SELECT idx_tup_read FROM pg_stat_user_indexes"
        " WHERE indexrelid = 'pgqueue.jobs_ready'::regclass"
    )

    async def entries_read() -> int:
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT 1")  # the flush happens when the backend goes idle
        await observer.execute("SELECT pg_stat_clear_snapshot()")
        count: int = await observer.fetchval(read)
        return count

    # Were the paused jobs in the index, or left alive by that first claim, this claim would
    # read the 2,000 entries.
    before = await entries_read()
    second = await _enqueue(conn, "q")
    assert await _claim_next(conn) == [second]
    assert await entries_read() - before < 10


async def test_enqueues_into_a_paused_queue_wake_nobody(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    heard = await listen(connect)
    await conn.fetchval(PAUSE, "p")
    await _enqueue(conn, "p")
    await conn.execute('SELECT pgqueue.enqueue_many(\'[{"job_type": "t", "queue": "p"}]\')')
    await _enqueue(conn, "q")
    assert await asyncio.wait_for(heard.get(), 5) == "q"


async def test_a_scope_head_freed_in_a_paused_queue_wakes_nobody(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """The completion of a scope's running job frees its next job: no NOTIFY for it while
    its queue is paused (no claim could take it); the resume sends one."""
    heard = await listen(connect)
    running = await _enqueue(conn, "p", '{"s": 1}')
    assert await _claim_next(conn) == [running]
    await _enqueue(conn, "p", '{"s": 1}')  # entered blocked: no notification
    assert await asyncio.wait_for(heard.get(), 5) == "p"  # the first enqueue's
    await conn.fetchval(PAUSE, "p")
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", running) is True
    await conn.execute("NOTIFY pgqueue, 'marker'")
    assert await asyncio.wait_for(heard.get(), 5) == "marker"
    await conn.fetchval(RESUME, "p")
    assert await asyncio.wait_for(heard.get(), 5) == "p"


async def test_a_head_freed_while_a_resume_commits_is_still_notified(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """The completion frees the next job of its scope while a resume of the queue is under
    way: it waits for the resume (which holds the job's row to clear its flag), whose
    NOTIFY then finds the job still blocked. Its own NOTIFY must not be skipped: deciding
    "paused" from its statement's snapshot (taken before the resume committed) lost the
    wake-up; it asks in a later statement, under the queue's pause lock."""
    heard = await listen(connect)
    resumer, completer = await sessions(connect, "resume", "complete")
    running = await _enqueue(conn, "p", '{"s": 1}')
    assert await _claim_next(conn) == [running]
    head = await _enqueue(conn, "p", '{"s": 1}')
    assert await asyncio.wait_for(heard.get(), 5) == "p"  # the first enqueue's
    await conn.fetchval(PAUSE, "p")
    await resumer.begin()
    assert await resumer.fetchval(RESUME, "p") is True
    step = completer.start(completer.fetchval("SELECT pgqueue.complete($1, 'w')", running))
    await wait_blocked(conn, completer)
    await resumer.commit()
    assert await asyncio.wait_for(heard.get(), 5) == "p"  # the resume's
    assert await step is True
    await conn.execute("NOTIFY pgqueue, 'marker'")
    assert await asyncio.wait_for(heard.get(), 5) == "p"  # the completion's
    assert await asyncio.wait_for(heard.get(), 5) == "marker"
    assert await _claim_next(conn) == [head]


@pytest.mark.parametrize("how", ["resume", "delete"])
async def test_a_resume_waits_for_an_enqueue_that_flagged_jobs_and_clears_them(
    conn: asyncpg.Connection, connect: Connect, how: str
) -> None:
    """An enqueue under way in the paused queue holds the queue's pause lock shared; the
    resume (or a hand DELETE of the queue's row) waits for its commit, then sees and clears
    its job's flag."""
    app, operator = await sessions(connect, "app", "operator")
    await conn.fetchval(PAUSE, "p")
    await app.begin()
    job = await app.fetchval("SELECT pgqueue.enqueue('t', queue => 'p')")
    if how == "resume":
        resume = operator.start(operator.fetchval(RESUME, "p"))
    else:
        resume = operator.start(
            operator.execute("DELETE FROM pgqueue.paused_queues WHERE queue = 'p'")
        )
    await wait_blocked(conn, operator)
    assert await lock_wait_kind(conn, operator) == "advisory"
    await app.commit()
    assert await resume in (True, "DELETE 1")
    assert await _ids(conn, FLAGGED) == []
    assert await _claim_next(conn) == [job]


async def test_an_enqueue_never_waits_for_a_resume_under_way_and_flags_nothing(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """The other order: a resume holds the queue's lock. The enqueue does not wait for it (it
    may hold row locks the resume needs): it leaves its job unflagged, and the job is
    claimable once the resume commits."""
    app, operator = await sessions(connect, "app", "operator")
    await conn.fetchval(PAUSE, "p")
    await operator.begin()
    assert await operator.fetchval(RESUME, "p") is True
    job = await finishes_unblocked(
        conn, app, app.fetchval("SELECT pgqueue.enqueue('t', queue => 'p')")
    )
    assert await _ids(conn, FLAGGED) == []
    assert await _claim_next(conn) == []  # still paused: skipped by name
    await operator.commit()
    assert await _claim_next(conn) == [job]


async def test_a_resume_waiting_for_a_row_never_deadlocks_with_its_holder(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """An application transaction cancels a flagged job (its row stays locked until commit),
    a resume waits for that row while holding the queue's lock, and the transaction then
    enqueues into the queue: the enqueue must not wait for the lock (that was a deadlock)."""
    app, operator = await sessions(connect, "app", "operator")
    cancelled = await _enqueue(conn, "p")
    await conn.fetchval(PAUSE, "p")
    await app.begin()
    assert await app.fetchval("SELECT pgqueue.cancel($1)", cancelled) is True
    resume = operator.start(operator.fetchval(RESUME, "p"))
    await wait_blocked(conn, operator)
    assert await lock_wait_kind(conn, operator) == "transactionid"
    job = await finishes_unblocked(
        conn, app, app.fetchval("SELECT pgqueue.enqueue('t', queue => 'p')")
    )
    await app.commit()
    assert await resume is True
    assert await _ids(conn, FLAGGED) == []
    assert await _claim_next(conn) == [job]


async def test_under_repeatable_read_nothing_is_flagged_and_resume_refuses(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """A transaction whose snapshot predates a resume would flag its job in a queue no longer
    paused (for good): above READ COMMITTED the triggers flag nothing, and pause_queue and
    resume_queue refuse to run."""
    (app,) = await sessions(connect, "app")
    await conn.fetchval(PAUSE, "p")
    await app.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    assert await app.fetchval("SELECT count(*) FROM pgqueue.paused_queues") == 1  # snapshot
    await conn.fetchval(RESUME, "p")
    job = await app.fetchval("SELECT pgqueue.enqueue('t', queue => 'p')")
    await app.commit()
    assert await _ids(conn, FLAGGED) == []
    assert await _claim_next(conn) == [job]
    for function in ("pause_queue", "resume_queue"):
        await app.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(asyncpg.InvalidTransactionStateError) as raised:
            await app.fetchval(f"SELECT pgqueue.{function}('p')")
        assert str(raised.value) == (
            f"pgqueue.{function}: needs READ COMMITTED, the transaction is REPEATABLE READ"
        )
        await app.rollback()


async def test_read_uncommitted_is_read_committed_pauses_and_flags(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """PostgreSQL runs READ UNCOMMITTED as READ COMMITTED: nothing to refuse or skip."""
    (app,) = await sessions(connect, "app")
    queued = await _enqueue(conn, "p")
    await app.execute("BEGIN ISOLATION LEVEL READ UNCOMMITTED")
    assert await app.fetchval(PAUSE, "p") is True
    job = await app.fetchval("SELECT pgqueue.enqueue('t', queue => 'p')")
    await app.commit()
    assert await _ids(conn, FLAGGED) == [queued, job]
    await app.execute("BEGIN ISOLATION LEVEL READ UNCOMMITTED")
    assert await app.fetchval(RESUME, "p") is True
    await app.commit()
    assert await _ids(conn, FLAGGED) == []


async def test_a_pause_skips_the_rows_others_hold_and_waits_for_none(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    """A pause that waited for the rows other transactions held, holding those it had flagged,
    deadlocked: with a completion holding one and then locking another (the fuzzer), with a
    cancel_pipeline. The flag only keeps jobs out of the claim index: a row another
    transaction holds is skipped, left unflagged, and still not handed out (by name)."""
    helper, operator = await sessions(connect, "helper", "operator")
    j0, j1, j2 = [await _enqueue(conn, "p") for _ in range(3)]
    await helper.begin()
    await helper.fetch("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR SHARE", j1)
    assert await finishes_unblocked(conn, operator, operator.fetchval(PAUSE, "p")) is True
    assert await _ids(conn, FLAGGED) == [j0, j2]
    await helper.commit()
    assert await _ids(conn, CLAIM_NEXT.replace("$1::text[]", "ARRAY['p']")) == []
    assert await _ids(conn, CLAIM_NEXT.replace("$1::text[]", "NULL")) == []
    assert await conn.fetchval(RESUME, "p") is True
    assert await _ids(conn, FLAGGED) == []
    assert await _ids(conn, CLAIM_NEXT.replace("$1::text[]", "NULL")) == [j0, j1, j2]


@pytest.mark.parametrize("how", ["delete", "truncate", "rename", "move"])
async def test_a_queue_unpaused_by_hand_hands_out_its_jobs(
    conn: asyncpg.Connection, connect: Connect, how: str
) -> None:
    """Its jobs kept their pause flags (out of the claim index) with no pause behind them, and
    resume_queue, finding the queue not paused, cleared nothing: they were never claimed."""
    heard = await listen(connect)
    await conn.fetchval(PAUSE, "p")
    job = await _enqueue(conn, "p")
    queue = "p"
    if how == "delete":
        await conn.execute("DELETE FROM pgqueue.paused_queues WHERE queue = 'p'")
    elif how == "truncate":
        await conn.execute("TRUNCATE pgqueue.paused_queues")
    elif how == "rename":
        await conn.execute("UPDATE pgqueue.paused_queues SET queue = 'other' WHERE queue = 'p'")
    else:
        await conn.execute("UPDATE pgqueue.jobs SET queue = 'q' WHERE id = $1", job)
        queue = "q"
    if how != "move":
        assert await asyncio.wait_for(heard.get(), 5) == "p"  # its workers are woken
    assert await _claim_next(conn, [queue]) == [job]


async def test_a_job_moved_into_a_paused_queue_is_flagged(conn: asyncpg.Connection) -> None:
    await conn.fetchval(PAUSE, "p")
    job = await _enqueue(conn, "q")
    await conn.execute("UPDATE pgqueue.jobs SET queue = 'p' WHERE id = $1", job)
    assert await conn.fetchval("SELECT queue_paused FROM pgqueue.jobs WHERE id = $1", job) is True
    await conn.fetchval(RESUME, "p")
    assert await _claim_next(conn, ["p"]) == [job]
