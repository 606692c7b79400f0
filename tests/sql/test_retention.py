"""prune_expired(): retention by settings.prune_after, a batch at a time, oldest first."""

from __future__ import annotations

import asyncpg
import pytest
from sqlharness import ROW_IS_FREE, Connect, finishes_unblocked, sessions, wait_blocked

AGE = "UPDATE pgqueue.jobs SET finished_at = now() - $2::text::interval WHERE id = $1"
IDS = "SELECT id FROM pgqueue.jobs ORDER BY id"


async def _finished(
    conn: asyncpg.Connection, age: str, *, state: str = "succeeded", **spec: object
) -> int:
    """A job that ended ``state`` ``age`` ago."""
    job: int = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', scope => $1::jsonb, max_attempts => 1)", spec.get("scope")
    )
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    if state == "succeeded":
        assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job)
    else:
        assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", job) == "failed"
    await conn.execute(AGE, job, age)
    return job


async def _ids(conn: asyncpg.Connection) -> list[int]:
    return [r["id"] for r in await conn.fetch(IDS)]


async def test_it_deletes_final_jobs_past_prune_after_oldest_first_a_batch_at_a_time(
    conn: asyncpg.Connection,
) -> None:
    """The default is 7 days. Kept: younger jobs, unfinished ones, a scope's current job."""
    assert await conn.fetchval("SELECT value FROM pgqueue.settings WHERE name = 'prune_after'") == (
        "7 days"
    )
    oldest = await _finished(conn, "30 days", state="failed")
    older = await _finished(conn, "20 days")
    old = await _finished(conn, "8 days")
    current = await _finished(conn, "30 days", scope='{"s": 1}')
    young = await _finished(conn, "6 days")
    queued = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    assert await conn.fetchval("SELECT pgqueue.prune_expired(2)") == 2
    assert await _ids(conn) == [old, current, young, queued]
    assert await conn.fetchval("SELECT pgqueue.prune_expired(2)") == 1
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 0
    assert await _ids(conn) == [current, young, queued]
    assert {oldest, older}.isdisjoint(await _ids(conn))


async def test_never_keeps_everything_and_a_shorter_setting_takes_effect_at_once(
    conn: asyncpg.Connection,
) -> None:
    job = await _finished(conn, "400 days")
    await conn.execute("UPDATE pgqueue.settings SET value = 'never' WHERE name = 'prune_after'")
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 0
    assert await _ids(conn) == [job]
    young = await _finished(conn, "2 hours")
    await conn.execute("UPDATE pgqueue.settings SET value = '1 hour' WHERE name = 'prune_after'")
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 2
    assert young not in await _ids(conn)


async def test_it_never_waits_for_a_row_another_transaction_holds(connect: Connect) -> None:
    """A retry under way holds the job (and share-locks its dependencies): waiting for it,
    a batch deadlocked with retries and enqueues that lock rows in another order, and made
    them queue behind its own locks. The batch skips such rows, and deletes the rest."""
    observer, retrier, pruner = await sessions(connect, "obs", "retry", "prune")
    job = await _finished(observer.conn, "30 days", state="failed")
    other = await _finished(observer.conn, "30 days")
    await retrier.begin()
    assert await retrier.fetchval("SELECT pgqueue.retry($1)", job) is True
    assert (
        await finishes_unblocked(
            observer.conn, pruner, pruner.fetchval("SELECT pgqueue.prune_expired()")
        )
        == 1
    )
    await retrier.commit()
    assert await _ids(observer.conn) == [job]
    state = await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job)
    assert state == "queued"
    assert other not in await _ids(observer.conn)


async def test_it_drops_abort_requests_whose_job_no_longer_runs(conn: asyncpg.Connection) -> None:
    job = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    assert await conn.fetchval("SELECT pgqueue.abort($1)", job) == "running"
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job)  # a success wins
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 1
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 0


async def test_it_never_waits_for_an_abort_request_another_transaction_holds(
    connect: Connect,
) -> None:
    observer, holder, pruner = await sessions(connect, "obs", "hold", "prune")
    job = await observer.fetchval("SELECT pgqueue.enqueue('t')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    assert await observer.fetchval("SELECT pgqueue.abort($1)", job) == "running"
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'w')", job)  # a success wins
    await holder.begin()
    await holder.fetch("SELECT job_id FROM pgqueue.abort_requests FOR UPDATE")
    prune = pruner.fetchval("SELECT pgqueue.prune_expired()")
    assert await finishes_unblocked(observer.conn, pruner, prune) == 0
    await holder.commit()
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 1
    assert await observer.fetchval("SELECT pgqueue.prune_expired()") == 0
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 0


async def _failed_with_dependent(conn: asyncpg.Connection) -> tuple[int, int]:
    """A dependency that failed 30 days ago, and its dependent, cancelled by it then."""
    dependency: int = await conn.fetchval("SELECT pgqueue.enqueue('t', max_attempts => 1)")
    dependent: int = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', depends_on => ARRAY[$1::bigint])", dependency
    )
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", dependency)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", dependency) == "failed"
    await conn.execute(AGE, dependency, "30 days")
    await conn.execute(AGE, dependent, "30 days")
    return dependency, dependent


async def _retried_dependent(conn: asyncpg.Connection) -> tuple[int, int]:
    """As _failed_with_dependent, and the dependent retried since: waiting for it."""
    dependency, dependent = await _failed_with_dependent(conn)
    assert await conn.fetchval("SELECT pgqueue.retry($1)", dependent)
    row = await conn.fetchrow(
        "SELECT state, pending_deps FROM pgqueue.jobs WHERE id = $1", dependent
    )
    assert (row["state"], row["pending_deps"]) == ("waiting", 1)
    return dependency, dependent


async def test_a_failed_job_a_retried_dependent_waits_for_is_kept(
    conn: asyncpg.Connection,
) -> None:
    """retry() of a dependent makes it wait again for its failed dependency. Pruned, that
    dependency would be waited for for good (pending_deps counts it and nothing would ever
    settle it); kept, retrying it still queues the dependent when it succeeds."""
    dependency, dependent = await _retried_dependent(conn)
    other = await _finished(conn, "30 days", state="failed")
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 1
    assert await conn.fetchval("SELECT pgqueue.prune('0')") == 0
    assert await _ids(conn) == [dependency, dependent]
    assert other not in await _ids(conn)
    assert await conn.fetchval("SELECT pgqueue.retry($1)", dependency)
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", dependency)
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", dependency)
    state = await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", dependent)
    assert state == "queued"


async def test_a_failed_job_goes_after_the_last_job_depending_on_it(
    conn: asyncpg.Connection,
) -> None:
    """Kept while any job depends on it, not only a waiting one: a chain that failed at its
    root is pruned from its end, so no retry ever finds its dependency gone. Retention takes
    a link a round; prune follows the chain in later statements of one call."""
    root: int = await conn.fetchval("SELECT pgqueue.enqueue('t', max_attempts => 1)")
    middle = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', depends_on => ARRAY[$1::bigint])", root
    )
    await conn.fetchval("SELECT pgqueue.enqueue('t', depends_on => ARRAY[$1::bigint])", middle)
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", root)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", root) == "failed"
    await conn.execute("UPDATE pgqueue.jobs SET finished_at = now() - interval '30 days'")
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 1
    assert await _ids(conn) == [root, middle]
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 1
    assert await _ids(conn) == [root]
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 1
    assert await _ids(conn) == []
    # Again, for prune: root <- a <- b and root <- c (all cancelled by root's failure) and an
    # unrelated job; d depends on root too but is recent, so root is kept for it.
    root = await conn.fetchval("SELECT pgqueue.enqueue('t', max_attempts => 1)")
    a = await conn.fetchval("SELECT pgqueue.enqueue('t', depends_on => ARRAY[$1::bigint])", root)
    await conn.fetchval("SELECT pgqueue.enqueue('t', depends_on => ARRAY[$1::bigint])", a)
    await conn.fetchval("SELECT pgqueue.enqueue('t', depends_on => ARRAY[$1::bigint])", root)
    d = await conn.fetchval("SELECT pgqueue.enqueue('t', depends_on => ARRAY[$1::bigint])", root)
    await _finished(conn, "30 days", state="failed")
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", root)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", root) == "failed"
    await conn.execute(
        "UPDATE pgqueue.jobs SET finished_at = now() - interval '30 days' WHERE id <> $1", d
    )
    assert await conn.fetchval("SELECT pgqueue.prune('1 day')") == 4
    assert await _ids(conn) == [root, d]
    await conn.execute(AGE, d, "30 days")
    assert await conn.fetchval("SELECT pgqueue.prune('1 day')") == 2
    assert await _ids(conn) == []


async def test_retention_never_reads_a_dependent_a_retry_is_reviving_as_gone(
    connect: Connect,
) -> None:
    """retry(J) shares its failed dependency's row, so a prune behind it deleted the row once
    the retry committed, having read J as cancelled: J was left waiting for a deleted job.
    Now the dependency is not a candidate while J exists: retention skips J's held row and
    deletes nothing, and prune, having waited for J, deletes nothing either."""
    observer, retrier, pruner = await sessions(connect, "obs", "retry", "prune")
    dependency, dependent = await _failed_with_dependent(observer.conn)
    await retrier.begin()
    assert await retrier.fetchval("SELECT pgqueue.retry($1)", dependent) is True
    prune_expired = pruner.fetchval("SELECT pgqueue.prune_expired()")
    assert await finishes_unblocked(observer.conn, pruner, prune_expired) == 0
    # prune() waits for the dependent the retry holds (a candidate: cancelled 30 days ago,
    # in its snapshot), then finds it waiting; the dependency was never a candidate.
    prune = pruner.start(pruner.fetchval("SELECT pgqueue.prune('0')"))
    await wait_blocked(observer.conn, pruner)
    await retrier.commit()
    assert await prune == 0
    assert await _ids(observer.conn) == [dependency, dependent]
    row = await observer.conn.fetchrow(
        "SELECT state, pending_deps FROM pgqueue.jobs WHERE id = $1", dependent
    )
    assert (row["state"], row["pending_deps"]) == ("waiting", 1)


async def test_deleting_a_job_that_had_not_succeeded_cancels_what_waits_for_it(
    conn: asyncpg.Connection,
) -> None:
    """A hand delete (or retention that read a dependent as cancelled just before a retry of
    it committed) of a job that never succeeded: what waits for it could never run, and is
    cancelled as if it had failed, transitively. A deleted success settles nothing more."""
    queued = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    done = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", done)
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", done)
    open_ = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    join = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', depends_on => ARRAY[$1, $2]::bigint[])", done, open_
    )
    direct = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', depends_on => ARRAY[$1::bigint])", queued
    )
    further = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', depends_on => ARRAY[$1::bigint])", direct
    )
    await conn.execute("DELETE FROM pgqueue.jobs WHERE id = ANY ($1::bigint[])", [queued, done])
    rows = await conn.fetch(
        "SELECT id, state, pending_deps, last_error FROM pgqueue.jobs WHERE id = ANY ($1::bigint[])"
        " ORDER BY id",
        [join, direct, further],
    )
    assert [(r["state"], r["pending_deps"], r["last_error"]) for r in rows] == [
        ("waiting", 1, None),
        # Named apart from a failure: a retry of another dependency of it would revive it
        # by that name and run it without the deleted one (session 22's review).
        ("cancelled", 1, f"cancelled: dependency job {queued} was deleted"),
        ("cancelled", 1, f"dependency failed: job {queued} was deleted"),
    ]
    edges = await conn.fetch(
        "SELECT job_id, depends_on FROM pgqueue.job_dependencies ORDER BY 1, 2"
    )
    assert [tuple(e) for e in edges] == [(join, open_), (further, direct)]


@pytest.mark.parametrize("retried", ["dependent", "dependency"])
async def test_prune_following_a_chain_never_waits_for_a_retry(
    connect: Connect, retried: str
) -> None:
    """prune's first statement deletes the old cancelled dependent D and then waits for a
    row another session holds (an old success X); meanwhile retry(D) or retry(J) locks the
    failed dependency J (rows in id order) and waits for D. Had prune's next statement
    waited for J, the two would deadlock; it skips J, which the next call prunes."""
    observer, holder, pruner, retrier = await sessions(connect, "obs", "hold", "prune", "retry")
    conn = observer.conn
    dependency, dependent = await _failed_with_dependent(conn)
    success = await _finished(conn, "10 days")
    await conn.execute(AGE, dependent, "20 days")
    await holder.begin()
    await holder.fetch("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR SHARE", success)
    prune = pruner.start(pruner.fetchval("SELECT pgqueue.prune('1 day')"))
    await wait_blocked(conn, pruner)  # D deleted, waiting for X
    target = dependent if retried == "dependent" else dependency
    retry = retrier.start(retrier.fetchval("SELECT pgqueue.retry($1)", target))
    await wait_blocked(conn, retrier)  # J locked, waiting for D
    await holder.commit()
    assert await prune == 2
    assert await retry is (retried == "dependency")
    left = await conn.fetch("SELECT id, state FROM pgqueue.jobs ORDER BY id")
    expected = "failed" if retried == "dependent" else "queued"
    assert [tuple(r) for r in left] == [(dependency, expected)]


async def test_prune_drops_the_marks_of_cancelled_pipelines_with_no_job_left(
    conn: asyncpg.Connection,
) -> None:
    """From the review: the marks were kept for good (the table grew with every cancel, and
    a reused id was refused forever). A mark goes with the pipeline's last job, once older
    than the bound; a recent mark of an id with no jobs stays (a pipeline cancelled while its
    first jobs are enqueued); one whose pipeline still has jobs stays."""
    gone, fresh, kept = (
        "11111111-1111-1111-1111-111111111111",
        "22222222-2222-2222-2222-222222222222",
        "33333333-3333-3333-3333-333333333333",
    )
    await conn.fetchval("SELECT pgqueue.enqueue('t', pipeline_id => $1::uuid)", kept)
    for pid in (gone, fresh, kept):
        await conn.fetchval("SELECT pgqueue.cancel_pipeline($1::uuid)", pid)
    await conn.execute(
        "UPDATE pgqueue.cancelled_pipelines SET cancelled_at = now() - interval '2 days'"
        " WHERE pipeline_id <> $1::uuid",
        fresh,
    )
    await conn.execute(  # the kept pipeline's job: cancelled, but not old enough to prune
        "UPDATE pgqueue.jobs SET finished_at = now() WHERE pipeline_id = $1::uuid", kept
    )
    assert await conn.fetchval("SELECT pgqueue.prune(interval '1 day')") == 0
    marks = await conn.fetch("SELECT pipeline_id::text FROM pgqueue.cancelled_pipelines ORDER BY 1")
    assert [m[0] for m in marks] == [fresh, kept]
    await conn.execute("UPDATE pgqueue.settings SET value = '1 day' WHERE name = 'prune_after'")
    await conn.execute(
        "UPDATE pgqueue.jobs SET finished_at = now() - interval '3 days' WHERE pipeline_id = $1::uuid",
        kept,
    )
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 1
    marks = await conn.fetch("SELECT pipeline_id::text FROM pgqueue.cancelled_pipelines ORDER BY 1")
    assert [m[0] for m in marks] == [fresh]
    # The id can be used again.
    await conn.fetchval("SELECT pgqueue.enqueue('t', pipeline_id => $1::uuid)", gone)


async def test_retention_leaves_a_mark_another_transaction_holds(connect: Connect) -> None:
    """From the second review: dropping the marks waited for a transaction holding one (a
    prune deleting it), where retention never waits."""
    holder, retention, observer = await sessions(connect, "holder", "retention", "observer")
    gone = "44444444-4444-4444-4444-444444444444"
    await observer.fetchval("SELECT pgqueue.cancel_pipeline($1::uuid)", gone)
    await observer.conn.execute(
        "UPDATE pgqueue.cancelled_pipelines SET cancelled_at = now() - interval '30 days'"
    )
    await holder.begin()
    await holder.fetchval(
        "SELECT pipeline_id FROM pgqueue.cancelled_pipelines WHERE pipeline_id = $1::uuid FOR UPDATE",
        gone,
    )
    step = retention.fetchval("SELECT pgqueue.prune_expired()")
    assert await finishes_unblocked(observer.conn, retention, step) == 0
    await holder.rollback()
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.cancelled_pipelines") == 1
    assert await retention.fetchval("SELECT pgqueue.prune_expired()") == 0
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.cancelled_pipelines") == 0


async def test_prune_locks_the_jobs_it_deletes_in_id_order(connect: Connect) -> None:
    """From the lock-order audit: prune's DELETE locked its rows in the order its plan read them
    (by finished_at here): it held y and waited for the older x, which an enqueue depending on
    both had share-locked (in id order) and then waited for y: 40P01. It locks them in id
    order first now, so it holds nothing newer while it waits for x."""
    observer, holder, pruner, enqueuer = await sessions(
        connect, "obs", "holder", "prune", "enqueue"
    )
    x = await _finished(observer.conn, "2 days")
    y = await _finished(observer.conn, "3 days")  # finished first: read first by finished_at
    await holder.begin()
    await holder.execute("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR SHARE", x)
    prune = pruner.start(pruner.fetchval("SELECT pgqueue.prune('1 day')"))
    await wait_blocked(observer.conn, pruner)
    assert await observer.fetchval(ROW_IS_FREE, y) == y  # not locked while it waits for x
    dependent = await enqueuer.fetchval(
        "SELECT pgqueue.enqueue('d', depends_on => $1::bigint[])", [x, y]
    )
    await holder.commit()
    assert await prune == 2  # succeeded: deleted whatever depends on them
    rows = await observer.fetch("SELECT id, state FROM pgqueue.jobs ORDER BY id")
    assert [tuple(r) for r in rows] == [(dependent, "queued")]
