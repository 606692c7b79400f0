"""Real ``pgqueue worker`` subprocesses against real PostgreSQL: the "Prove" list of issue 3."""

from __future__ import annotations

import json
import signal
import statistics
import time

import anyio
import asyncpg
import pytest
from runtime_helpers import HERE
from worker_harness import (
    SpawnWorker,
    WorkerProcess,
    spawned_workers,
    wait_for_states,
    wait_until,
)

import pgqueue

app = pgqueue.App()  # enqueue-only: the handlers live in worker_app.py, in the subprocesses


async def test_three_workers_run_1000_jobs_exactly_once(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    workers = [spawn_worker("--concurrency", "10") for _ in range(3)]
    for worker in workers:
        await worker.ready()
    ids = await app.enqueue_many(
        db, [{"job_type": "work", "payload": {"n": i}} for i in range(1000)]
    )
    assert len(set(ids)) == 1000

    await wait_for_states(db, ids, "succeeded", within=60)
    runs = await db.fetchrow(
        "SELECT count(*) AS n, count(DISTINCT job_id) AS jobs, max(attempt) AS max_attempt,"
        " count(DISTINCT pid) AS pids FROM runs"
    )
    assert (runs["n"], runs["jobs"], runs["max_attempt"]) == (1000, 1000, 1)
    assert await db.fetchval("SELECT max(attempts) FROM pgqueue.jobs") == 1
    print(f"\n1000 jobs drained by {runs['pids']} of 3 workers")
    for worker in workers:
        worker.signal(signal.SIGTERM)
    for worker in workers:
        assert await worker.wait_exit(within=10) == 0


async def test_kill_9_mid_job_is_rerun_after_stale_after(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    await db.execute("UPDATE pgqueue.settings SET value = '1 second' WHERE name = 'stale_after'")
    first = spawn_worker("--concurrency", "1")
    await first.ready()
    job_id = await app.enqueue(db, "work", {"sleep": 60, "sleep_on_attempt": 1})
    await wait_until(lambda: db.fetchval("SELECT count(*) FROM runs"), what="first run")
    first.kill()  # SIGKILL: no release, no outcome; only the lease expiring can save the job

    second = spawn_worker("--concurrency", "1")
    await wait_for_states(db, [job_id], "succeeded", within=20)
    attempts = [r["attempt"] for r in await db.fetch("SELECT attempt FROM runs ORDER BY started")]
    assert attempts == [1, 2]
    assert await db.fetchval("SELECT attempts FROM pgqueue.jobs WHERE id = $1", job_id) == 2
    await second.wait_for_log("recovered 1 stale job")


async def test_long_healthy_job_keeps_its_lease(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    await db.execute("UPDATE pgqueue.settings SET value = '1 second' WHERE name = 'stale_after'")
    runner = spawn_worker("--concurrency", "1")
    watcher = spawn_worker("--concurrency", "1")  # runs recover_stale too, and would rerun it
    await runner.ready()
    await watcher.ready()
    job_id = await app.enqueue(db, "work", {"sleep": 3})
    await wait_for_states(db, [job_id], "succeeded", within=15)
    row = await db.fetchrow("SELECT attempts, last_error FROM pgqueue.jobs WHERE id = $1", job_id)
    assert (row["attempts"], row["last_error"]) == (1, None)
    assert await db.fetchval("SELECT count(*) FROM runs") == 1


async def test_lowered_stale_after_reaches_running_workers_at_their_next_beat(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    """stale_after lowered while a job runs, 8 s -> 3 s -> 1 s (each step above the period the
    workers beat at until their next beat reads it, as docs/sql.md asks): the worker follows
    at its next beat each time, so the job keeps its lease and no worker recovers it. A worker
    that sized its heartbeat once at start kept beating every 2 s under a 1 s stale_after, and
    the job was recovered and run again."""
    set_stale_after = "UPDATE pgqueue.settings SET value = $1 WHERE name = 'stale_after'"
    await db.execute(set_stale_after, "8 seconds")
    runner = spawn_worker("--concurrency", "1")
    watcher = spawn_worker("--concurrency", "1")  # runs recover_stale too, and would rerun it
    await runner.ready()
    await watcher.ready()
    job_id = await app.enqueue(db, "work", {"sleep": 8})
    await wait_until(lambda: db.fetchval("SELECT count(*) FROM runs"), what="the run")
    await db.execute(set_stale_after, "3 seconds")
    await runner.wait_for_log("heartbeat every 0.75s (was 2.00s)", within=5)
    await db.execute(set_stale_after, "1 second")
    await runner.wait_for_log("heartbeat every 0.25s (was 0.75s)", within=5)
    await wait_for_states(db, [job_id], "succeeded", within=15)
    row = await db.fetchrow("SELECT attempts, last_error FROM pgqueue.jobs WHERE id = $1", job_id)
    assert (row["attempts"], row["last_error"]) == (1, None)
    assert await db.fetchval("SELECT count(*) FROM runs") == 1


async def test_sigterm_finishes_within_grace_and_releases_the_rest(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    worker = spawn_worker("--concurrency", "4", "--grace", "2")
    await worker.ready()
    short = [await app.enqueue(db, "work", {"sleep": 0.5}) for _ in range(2)]
    long = [await app.enqueue(db, "work", {"sleep": 60}) for _ in range(2)]
    await wait_until(lambda: db.fetchval("SELECT count(*) = 4 FROM runs"), what="4 runs started")

    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert await worker.wait_exit(within=10) == 0
    elapsed = time.monotonic() - signalled
    assert 1.5 < elapsed < 2 + 3, elapsed  # waited for the grace, not much longer

    assert await db.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'") == 0
    await wait_for_states(db, short, "succeeded", within=0)
    released = await db.fetch("SELECT state, locked_by FROM pgqueue.jobs WHERE id = ANY($1)", long)
    assert [(r["state"], r["locked_by"]) for r in released] == [("queued", None)] * 2
    assert worker.count("released") == 2


async def test_sigterm_when_idle_exits_at_once_json_logs(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    worker = spawn_worker("--grace", "30", "--log-format", "json")
    await worker.ready()
    job_id = await app.enqueue(db, "work")
    await wait_for_states(db, [job_id])
    worker.signal(signal.SIGTERM)
    assert await worker.wait_exit(within=5) == 0
    lines = [json.loads(line) for line in worker.lines]
    outcome = next(line for line in lines if line.get("job_id") == job_id)
    assert (outcome["job_type"], outcome["attempt"], outcome["outcome"]) == ("work", 1, "succeeded")
    assert outcome["duration_ms"] >= 0


async def test_log_level_warning_drops_success_lines_and_keeps_failures(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    worker = spawn_worker("--log-level", "warning")  # no "listening" line to wait for:
    ok = await app.enqueue(db, "work")  # its first sweep finds the jobs
    bad = await app.enqueue(db, "no_such_type", max_attempts=1)
    await wait_for_states(db, [ok])
    await wait_for_states(db, [bad], "failed")
    worker.signal(signal.SIGTERM)
    assert await worker.wait_exit(within=5) == 0
    assert not [line for line in worker.lines if f"job {ok} " in line]
    assert [
        line for line in worker.lines if f"job {bad} no_such_type" in line and "WARNING" in line
    ]


async def test_second_sigterm_skips_the_grace_period(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    worker = spawn_worker("--grace", "60")
    await worker.ready()
    job_id = await app.enqueue(db, "work", {"sleep": 60})
    await wait_until(lambda: db.fetchval("SELECT count(*) FROM runs"), what="job started")
    worker.signal(signal.SIGTERM)
    await worker.wait_for_log("waiting up to 60s for 1 running job")
    worker.signal(signal.SIGTERM)
    assert await worker.wait_exit(within=5) == 0
    assert await db.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job_id) == "queued"


async def test_worker_survives_all_backends_terminated(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    worker = spawn_worker("--concurrency", "4", "--poll-interval", "1")
    await worker.ready()
    in_flight = await app.enqueue(db, "work", {"sleep": 1})
    await wait_until(lambda: db.fetchval("SELECT count(*) FROM runs"), what="job started")

    # What a PostgreSQL restart looks like from the worker: every connection dies at once.
    killed = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    assert killed >= 2  # at least the LISTEN connection and a pool connection
    await worker.wait_for_log("listening on channel", times=2)
    later = [await app.enqueue(db, "work") for _ in range(5)]
    await wait_for_states(db, [in_flight, *later], "succeeded", within=15)
    assert worker.proc.poll() is None
    assert worker.count("Traceback") == 0


async def test_listen_connection_killed_notifier_reconnects(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    worker = spawn_worker("--poll-interval", "1")
    await worker.ready()
    await db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE 'pgqueue-notifier%'"
    )
    during = await app.enqueue(db, "work")  # its NOTIFY may well be lost
    await wait_for_states(db, [during], "succeeded", within=3)  # the poll or the sweep gets it
    await worker.wait_for_log("listening on channel", times=2)

    enqueued = time.monotonic()
    after = await app.enqueue(db, "work")
    await wait_for_states(db, [after], "succeeded", within=3)
    assert time.monotonic() - enqueued < 0.9  # by notification, not by the 1 s poll


async def test_scheduled_job_starts_within_100ms_of_run_after(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    worker = spawn_worker("--poll-interval", "30")  # the safety poll cannot help
    await worker.ready()
    job_id = await app.enqueue(db, "work", delay=1.0)
    await wait_for_states(db, [job_id], "succeeded", within=5)
    lag = await db.fetchval(
        "SELECT extract(epoch FROM r.started - j.run_after)::float8"
        " FROM runs r JOIN pgqueue.jobs j ON j.id = r.job_id"
    )
    print(f"\nscheduled job started {lag * 1000:.1f} ms after its run_after")
    assert 0 <= lag < 0.1


async def test_transactional_enqueue_runs_only_if_committed(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    worker = spawn_worker()
    await worker.ready()

    class Rollback(Exception):
        pass

    try:
        async with db.transaction():
            rolled_back = await app.enqueue(db, "work")
            raise Rollback
    except Rollback:
        pass
    async with db.transaction():
        committed = await app.enqueue(db, "work")
    await wait_for_states(db, [committed], "succeeded", within=5)
    assert await db.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE id = $1", rolled_back) == 0
    assert [r["job_id"] for r in await db.fetch("SELECT job_id FROM runs")] == [committed]


async def test_pickup_latency_of_an_idle_worker(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    worker = spawn_worker("--poll-interval", "30")
    await worker.ready()
    lags = []
    for _ in range(101):
        job_id = await app.enqueue(db, "work")
        await wait_for_states(db, [job_id], "succeeded", within=5)
        # Enqueue commit to claim, on the database clock (both are transaction start times).
        lags.append(
            await db.fetchval(
                "SELECT extract(epoch FROM started_at - created_at)::float8"
                " FROM pgqueue.jobs WHERE id = $1",
                job_id,
            )
        )
    first, lags = lags[0], sorted(lags[1:])  # the first one pays for warming up statements
    median, p99 = statistics.median(lags) * 1000, lags[98] * 1000
    print(
        f"\npickup latency over 100 jobs: median {median:.2f} ms, p99 {p99:.2f} ms"
        f" (first job after start: {first * 1000:.1f} ms)"
    )
    assert median < 100


async def test_signals_during_the_last_steps_of_shutdown_do_not_abort_it(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    """An idle worker stops in milliseconds; a second Ctrl-C in that time (a double tap, or
    `timeout -s INT`) arrived after the signal watcher had gone and raised KeyboardInterrupt
    in the middle of closing connections: exit 1 ("Aborted!") or 130, sometimes a traceback.
    Once the watcher is gone the worker is stopping anyway; later signals are ignored."""
    worker = spawn_worker()
    await worker.ready()
    worker.signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    while worker.proc.poll() is None and time.monotonic() < deadline:
        try:
            worker.signal(signal.SIGINT)  # a burst over the whole shutdown
        except ProcessLookupError:
            break
        await anyio.sleep(0.001)
    assert await worker.wait_exit(within=10) == 0
    assert worker.count("Traceback") == 0 and worker.count("Aborted") == 0


async def test_until_empty_runs_the_backlog_then_exits(
    db: asyncpg.Connection, spawn_worker: SpawnWorker
) -> None:
    """`pgqueue worker --until-empty` runs what is due and exits 0; a job scheduled for later
    stays queued for the next run."""
    due = [await app.enqueue(db, "work", {"sleep": 0.2}) for _ in range(3)]
    later = await app.enqueue(db, "work", delay=3600)
    worker = spawn_worker("--until-empty", "--poll-interval", "60")
    assert await worker.wait_exit(within=30) == 0, worker.log()
    await wait_for_states(db, due, "succeeded", within=1)
    assert await db.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", later) == "queued"
    assert "stopping (until empty)" in worker.log()


async def test_a_worker_held_up_past_its_lease_between_claim_and_reply_starts_nothing(
    db: asyncpg.Connection, db_dsn: str, spawn_worker: SpawnWorker
) -> None:
    """From a chaos review: a worker stopped (SIGSTOP, a paused container) after its claim
    committed and before it read the reply found the job recovered and run elsewhere by
    then, and started its handler anyway: a second run after the job had succeeded, beside
    the next job of its scope. Here the claim waits for a queue's limit lock (taken after
    the pick), the worker is stopped, the lock let go: the claim commits into a stopped
    process, whose job is recovered and completed by another before it resumes."""
    await db.execute("SELECT pgqueue.set_queue_limit('lq', 5)")
    worker = spawn_worker("--concurrency", "1", "--queues", "lq")
    await worker.ready()
    gate = await asyncpg.connect(db_dsn)
    try:
        tx = gate.transaction()
        await tx.start()
        await gate.execute(
            "SELECT pg_advisory_xact_lock(pgqueue._lock_class('limit'), hashtext('lq'))"
        )
        job_id = await app.enqueue(db, "work", queue="lq")
        waiting = (
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND NOT l.granted"
            " AND a.application_name LIKE 'pgqueue%'"
        )
        await wait_until(lambda: db.fetchval(waiting), what="the claim waiting for the lock")
        worker.signal(signal.SIGSTOP)
        try:
            await tx.commit()  # the claim commits; its reply waits for a stopped process
            await wait_for_states(db, [job_id], "running")
            await db.execute("SELECT pgqueue.recover_stale(interval '0')")
            claim = "SELECT id FROM pgqueue.claim_next('other', ARRAY['lq'])"
            assert await db.fetchval(claim) == job_id
            assert await db.fetchval("SELECT pgqueue.complete($1, 'other')", job_id)
            await anyio.sleep(1.1)  # the reply comes later than LEASE_CHECK_AFTER
        finally:
            worker.signal(signal.SIGCONT)
        await worker.wait_for_log(f"job {job_id}: not started")
    finally:
        await gate.close()
    assert await db.fetchval("SELECT count(*) FROM runs") == 0


@pytest.mark.parametrize("log_format", [None, "text"])
async def test_an_apps_own_logging_is_left_working(
    db: asyncpg.Connection, db_dsn: str, log_format: str | None
) -> None:
    """From a review of pgqueue in an application: ``pgqueue worker`` switched off logging's
    process and thread lookups for the whole process, so an application's format with
    ``%(process)d`` failed on every line (a "Logging error" traceback each), and it sent its
    own lines past the handlers the application configured. Now the app's handlers get
    pgqueue's lines too, unless a --log-format is chosen; either way the app's own lines
    keep their format."""
    args = ("--log-format", log_format) if log_format else ()
    with spawned_workers(
        lambda *more: WorkerProcess("logging_app:app", HERE, db_dsn, *args, *more)
    ) as spawn:
        worker = spawn()
        await worker.ready()
        job_id = await app.enqueue(db, "hello")
        await wait_for_states(db, [job_id])
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(within=5) == 0
    pid = f"app pid={worker.pid} "
    assert not [line for line in worker.lines if "Logging error" in line], worker.log()
    assert worker.count(f"{pid}INFO logging_app: hello from job {job_id}") == 1, worker.log()
    outcome = [line for line in worker.lines if f"job {job_id} hello" in line]
    assert len(outcome) == 1 and outcome[0].startswith(pid) == (log_format is None), outcome
