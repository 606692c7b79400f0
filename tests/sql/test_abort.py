"""abort(): a job not started is cancelled; a running one ends cancelled, never retried, by
whichever transition ends its attempt, unless it succeeds first."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlharness import Connect, finishes_unblocked, sessions, wait_blocked

ABORT = "SELECT pgqueue.abort($1)"
STALE = "UPDATE pgqueue.jobs SET locked_at = now() - interval '1 hour' WHERE id = $1"


async def _running(conn: asyncpg.Connection, *, max_attempts: int = 5, **spec: object) -> int:
    """A job claimed by worker 'w', with a dependent waiting on it; returns the job's id."""
    job: int = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', max_attempts => $1, scope => $2::jsonb)",
        max_attempts,
        spec.get("scope"),
    )
    await conn.fetchval("SELECT pgqueue.enqueue('after', depends_on => ARRAY[$1::bigint])", job)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", job) == 1
    return job


async def _state(conn: asyncpg.Connection, job: int) -> tuple[str, str | None]:
    row = await conn.fetchrow("SELECT state, last_error FROM pgqueue.jobs WHERE id = $1", job)
    assert row is not None
    return row["state"], row["last_error"]


async def _dependent_state(conn: asyncpg.Connection, job: int) -> str:
    state: str = await conn.fetchval(
        "SELECT j.state FROM pgqueue.jobs j JOIN pgqueue.job_dependencies d ON d.job_id = j.id"
        " WHERE d.depends_on = $1",
        job,
    )
    return state


async def test_a_queued_or_waiting_job_is_cancelled_as_cancel_does(
    conn: asyncpg.Connection,
) -> None:
    job = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    dependent = await conn.fetchval(
        "SELECT pgqueue.enqueue('after', depends_on => ARRAY[$1::bigint])", job
    )
    assert await conn.fetchval(ABORT, job) == "cancelled"
    assert (await _state(conn, job))[0] == "cancelled"
    assert (await _state(conn, dependent))[0] == "cancelled"
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 0


async def test_finished_or_unknown_jobs_have_nothing_to_abort(conn: asyncpg.Connection) -> None:
    job = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    await conn.fetch("SELECT pgqueue.claim($1, 'w')", job)
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job)
    assert await conn.fetchval(ABORT, job) is None
    assert await conn.fetchval(ABORT, 999_999) is None
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 0


async def test_a_running_job_is_asked_and_its_workers_are_told(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    job = await _running(conn)
    listener = await connect()
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("pgqueue", lambda *args: heard.put_nowait(args[-1]))
    assert await conn.fetchval(ABORT, job) == "running"
    assert await asyncio.wait_for(heard.get(), 5) == ""  # no queue is named ''
    # Still running: the worker decides when the attempt ends. A second call keeps the first
    # request's time.
    first = await conn.fetchval("SELECT requested_at FROM pgqueue.abort_requests")
    assert await conn.fetchval(ABORT, job) == "running"
    assert await conn.fetchval("SELECT requested_at FROM pgqueue.abort_requests") == first
    assert (await _state(conn, job))[0] == "running"


@pytest.mark.parametrize("scope", [None, '{"tenant": 1}'])
async def test_the_failed_attempt_ends_cancelled_with_attempts_left(
    conn: asyncpg.Connection, scope: str | None
) -> None:
    job = await _running(conn, scope=scope)
    behind = None
    if scope:  # the scope's next job is free to run once the aborted one ends
        behind = await conn.fetchval("SELECT pgqueue.enqueue('t', scope => $1::jsonb)", scope)
    await conn.fetchval(ABORT, job)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'stopped')", job) == "cancelled"
    state, error = await _state(conn, job)
    assert state == "cancelled" and error == "stopped\n(aborted: not retried)"
    assert await _dependent_state(conn, job) == "cancelled"
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 0
    if behind is not None:
        claimed = await conn.fetch("SELECT id FROM pgqueue.claim_next('w2')")
        assert [r["id"] for r in claimed] == [behind]


@pytest.mark.parametrize(
    ("give_back", "verb"),
    [
        ("SELECT pgqueue.release($1, 'w')", "released"),
        ("SELECT pgqueue.snooze($1, 'w', interval '1 minute')", "snoozed"),
    ],
    ids=["release", "snooze"],
)
async def test_a_release_or_snooze_ends_it_cancelled_instead_of_queued(
    conn: asyncpg.Connection, give_back: str, verb: str
) -> None:
    job = await _running(conn)
    await conn.fetchval(ABORT, job)
    assert await conn.fetchval(give_back, job) in (True, "cancelled")  # release, snooze
    state, error = await _state(conn, job)
    assert state == "cancelled"
    assert error == f"aborted: {verb} unfinished after abort() was called"
    assert await _dependent_state(conn, job) == "cancelled"


async def test_recovery_of_a_dead_workers_aborted_job_cancels_it(
    conn: asyncpg.Connection,
) -> None:
    job = await _running(conn)
    await conn.fetchval(ABORT, job)
    await conn.execute(STALE, job)
    assert [r[0] for r in await conn.fetch("SELECT pgqueue.recover_stale()")] == [job]
    state, error = await _state(conn, job)
    assert state == "cancelled" and error is not None and "stale" in error and "aborted" in error


async def test_a_success_that_lands_first_wins_and_prune_drops_the_request(
    conn: asyncpg.Connection,
) -> None:
    job = await _running(conn)
    await conn.fetchval(ABORT, job)
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job)
    assert (await _state(conn, job))[0] == "succeeded"
    assert await _dependent_state(conn, job) == "queued"
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 1
    await conn.fetchval("SELECT pgqueue.prune(interval '1 day')")  # deletes no job
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 0


async def test_retry_of_an_aborted_job_runs_it_and_its_dependents_again(
    conn: asyncpg.Connection,
) -> None:
    job = await _running(conn)
    await conn.fetchval(ABORT, job)
    await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'stopped')", job)
    assert await conn.fetchval("SELECT pgqueue.retry($1)", job)
    assert await _dependent_state(conn, job) == "waiting"
    await conn.fetch("SELECT pgqueue.claim($1, 'w')", job)
    # Not aborted again: this attempt fails as any other and is retried.
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'again')", job) == "queued"


async def test_an_abort_waits_for_a_failure_under_way_and_cancels_the_requeued_job(
    connect: Connect,
) -> None:
    """The failure holds the row: abort waits on it (observed), then finds the job queued
    again and cancels it, instead of recording a request that nothing would read."""
    observer, worker, operator = await sessions(connect, "obs", "w", "op")
    job = await _running(observer.conn)
    await worker.begin()
    assert await worker.fetchval("SELECT pgqueue.fail($1, 'w', 'flaky')", job) == "queued"
    step = operator.start(operator.fetchval(ABORT, job))
    await wait_blocked(observer.conn, operator)
    await worker.commit()
    assert await step == "cancelled"
    assert (await _state(observer.conn, job))[0] == "cancelled"
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 0


async def test_a_failure_waits_for_an_abort_under_way_and_reads_its_request(
    connect: Connect,
) -> None:
    """abort holds the row until it commits: the failure waits (observed), then sees the
    request and ends the job cancelled, not queued."""
    observer, worker, operator = await sessions(connect, "obs", "w", "op")
    job = await _running(observer.conn)
    await operator.begin()
    assert await operator.fetchval(ABORT, job) == "running"
    step = worker.start(worker.fetchval("SELECT pgqueue.fail($1, 'w', 'flaky')", job))
    await wait_blocked(observer.conn, worker)
    await operator.commit()
    assert await step == "cancelled"


async def test_two_aborts_of_a_job_requeued_meanwhile_take_turns(connect: Connect) -> None:
    """Both wait on the failure under way (observed); then one cancels the job and the
    other finds it cancelled. With the row share-locked, both held the lock and deadlocked
    upgrading it in cancel() (40P01, in about half of the runs)."""
    observer, worker, a, b = await sessions(connect, "obs", "w", "a", "b")
    job = await _running(observer.conn)
    await worker.begin()
    assert await worker.fetchval("SELECT pgqueue.fail($1, 'w', 'flaky')", job) == "queued"
    steps = [s.start(s.fetchval(ABORT, job)) for s in (a, b)]
    await wait_blocked(observer.conn, a, b)
    await worker.commit()
    assert sorted(await asyncio.gather(*steps), key=str) == [None, "cancelled"]


async def test_abort_pipeline_cancels_what_waits_and_stops_what_runs(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    root = await conn.fetchval(
        'SELECT pgqueue.enqueue(\'root\', next_jobs => \'[{"job_type": "a"}, {"job_type": "b"}]\')'
    )
    await conn.fetch("SELECT pgqueue.claim($1, 'w')", root)
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", root)
    pipeline, a, b = await conn.fetchrow(
        "SELECT min(pipeline_id::text)::uuid, min(id) FILTER (WHERE job_type = 'a'),"
        " min(id) FILTER (WHERE job_type = 'b') FROM pgqueue.jobs WHERE parent_id = $1",
        root,
    )
    await conn.fetch("SELECT pgqueue.claim($1, 'w')", a)
    listener = await connect()
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("pgqueue", lambda *args: heard.put_nowait(args[-1]))
    assert await conn.fetchval("SELECT pgqueue.abort_pipeline($1)", pipeline) == 2  # b and a
    assert await asyncio.wait_for(heard.get(), 5) == ""
    assert (await _state(conn, b))[0] == "cancelled"
    assert await conn.fetchval("SELECT array_agg(job_id) FROM pgqueue.abort_requests") == [a]
    # The handler stops; its failure ends the member cancelled, and the pipeline with it.
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'stopped')", a) == "cancelled"
    assert (
        await conn.fetchval("SELECT state FROM pgqueue.pipelines WHERE pipeline_id = $1", pipeline)
        == "cancelled"
    )
    # Called again, nothing is left to cancel or stop.
    assert await conn.fetchval("SELECT pgqueue.abort_pipeline($1)", pipeline) == 0


async def test_an_abort_does_not_wait_for_a_transaction_that_enqueued_a_dependent(
    connect: Connect,
) -> None:
    """An application's transaction enqueued a job depending on a running scoped job (it
    holds that job's row FOR SHARE until it commits), and goes on to enqueue into the same
    scope. The abort must not wait for it while holding the scope's order lock, which that
    enqueue needs: with the row locked FOR NO KEY UPDATE the two deadlocked (40P01)."""
    observer, app, operator = await sessions(connect, "obs", "app", "op")
    job = await _running(observer.conn, scope='{"tenant": 1}')
    await app.begin()
    await app.fetchval("SELECT pgqueue.enqueue('report', depends_on => ARRAY[$1::bigint])", job)
    assert await finishes_unblocked(observer.conn, operator, operator.fetchval(ABORT, job)) == (
        "running"
    )
    await app.fetchval("SELECT pgqueue.enqueue('y', scope => '{\"tenant\": 1}')")
    await app.commit()
