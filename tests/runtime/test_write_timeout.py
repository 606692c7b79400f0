"""Outcome writes are bounded and settle exactly once, whatever holds them up.

A success write that waits behind an operator's row lock, or whose reply is lost on a
half-open connection, must neither hang the worker nor be misreported: it is cut off after
the write timeout, retried on a fresh connection, and recorded as the success it is, never
as a failed attempt or a lost lease. Workers run in-process so that the timeouts can be made
small (module constants, monkeypatched); everything else is real PostgreSQL, and the
half-open connection is a real TCP connection through a proxy that stops passing on the
server's replies.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import asyncpg
import pytest
from runtime_helpers import (
    Records,
    dsn_through,
    gate_refusal_lookup,
    held_handler_app,
    refuse_the_success,
    server_address,
)
from worker_harness import wait_for_states, wait_until

import pgqueue
from pgqueue.worker import bounded, completer, leader, producer
from pgqueue.worker import worker as worker_module

_BLOCKED_WRITES = """
SELECT pid FROM pg_stat_activity
WHERE $1 = ANY (pg_blocking_pids(pid)) AND query LIKE '%complete_many%'
ORDER BY pid
"""


async def _writes_blocked_by(conn: asyncpg.Connection, pid: int) -> list[int]:
    """For ``wait_until``: the backends whose success write waits on a lock ``pid`` holds."""
    return [r["pid"] for r in await conn.fetch(_BLOCKED_WRITES, pid)]


def _gated_app() -> tuple[pgqueue.App, anyio.Event]:
    """An app whose ``ok`` handler returns ``{"n": ...}`` once the event is set."""
    app = pgqueue.App()
    release = anyio.Event()

    @app.job("ok")
    async def ok(job: pgqueue.Job) -> dict[str, Any]:
        await release.wait()
        return {"n": job.payload["n"]}

    return app, release


async def _assert_succeeded_once(conn: asyncpg.Connection, job: int, log: Records) -> None:
    row = await conn.fetchrow(
        "SELECT state, attempts, result, last_error FROM pgqueue.jobs WHERE id = $1", job
    )
    assert row["state"] == "succeeded"
    assert row["attempts"] == 1  # no failed attempt, no second run
    assert json.loads(row["result"]) == {"n": 7}
    assert row["last_error"] is None
    assert log.outcomes(job) == ["succeeded"], log.text()


async def test_success_behind_a_row_lock_is_retried_not_failed(
    conn: asyncpg.Connection,
    connect: Any,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    """An operator holds the job's row lock for longer than the write timeout. The write is
    cut off, its statement cancelled on the server (no orphan backend left to finish it
    later), and retried on another connection; once the lock goes, the job has succeeded
    once. Without a bound the first write simply waits, and no retry ever appears."""
    monkeypatch.setattr(completer, "WRITE_TIMEOUT", 0.5)
    logger, log = records
    app, release = _gated_app()
    job = await app.enqueue(conn, "ok", {"n": 7})
    locker = await connect()
    locker_pid = await locker.fetchval("SELECT pg_backend_pid()")
    blocked = functools.partial(_writes_blocked_by, conn, locker_pid)

    async with _worker_running(app, db_dsn, logger):
        await wait_for_states(conn, [job], "running")
        async with locker.transaction():
            await locker.execute("SELECT FROM pgqueue.jobs WHERE id = $1 FOR UPDATE", job)
            release.set()
            first = (await wait_until(blocked, what="the success write waiting on the lock"))[0]

            async def retried_elsewhere() -> bool:
                gone = not await conn.fetchval(
                    "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", first
                )
                waiting = await blocked()
                return gone and bool(waiting) and first not in waiting

            await wait_until(
                retried_elsewhere,
                within=10,
                what=f"backend {first} cancelled and the write retried on another connection",
            )
        await wait_for_states(conn, [job], "succeeded")
        await wait_until(functools.partial(log.outcome_logged, job), what="the outcome line")
    await _assert_succeeded_once(conn, job, log)
    assert log.count(f"recording the success of job {job} (NoAnswer") == 1, log.text()


async def test_lock_timeout_on_a_success_is_retried_not_a_refusal(
    conn: asyncpg.Connection,
    connect: Any,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
) -> None:
    """With a server-side ``lock_timeout``, the wait behind the lock ends in an error
    (55P03) instead of a client timeout. That says nothing against the result: the write is
    retried, not taken as PostgreSQL refusing the success (which would fail the attempt)."""
    logger, log = records
    alter = "SELECT format('ALTER DATABASE %I SET lock_timeout = %L', current_database(), '100ms')"
    await conn.execute(await conn.fetchval(alter))
    app, release = _gated_app()
    job = await app.enqueue(conn, "ok", {"n": 7})
    locker = await connect()
    interrupted = (
        f"statement interrupted while recording the success of job {job} (LockNotAvailable"
    )
    async with _worker_running(app, db_dsn, logger):
        await wait_for_states(conn, [job], "running")
        async with locker.transaction():
            await locker.execute("SELECT FROM pgqueue.jobs WHERE id = $1 FOR UPDATE", job)
            release.set()
            await wait_until(
                functools.partial(log.logged, interrupted), what="a lock timeout", within=10
            )
        await wait_for_states(conn, [job], "succeeded")
        await wait_until(functools.partial(log.outcome_logged, job), what="the outcome line")
    await _assert_succeeded_once(conn, job, log)


@pytest.mark.parametrize("cut_by", ["write timeout", "lock_timeout"])
async def test_batch_cut_short_is_written_job_by_job(
    conn: asyncpg.Connection,
    connect: Any,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
    cut_by: str,
) -> None:
    """Two successes share a batch, the second behind a row lock. Cut short, the batch is
    written job by job: the free job is recorded while the lock is still held, the locked
    one once it goes. Retried whole, a batch that is cut short every time (a lock held for
    an hour, a ``statement_timeout`` smaller than the batch needs) would hold every success
    of the worker."""
    if cut_by == "write timeout":
        monkeypatch.setattr(completer, "WRITE_TIMEOUT", 0.5)
    else:
        alter = (
            "SELECT format('ALTER DATABASE %I SET lock_timeout = %L', current_database(), '100ms')"
        )
        await conn.execute(await conn.fetchval(alter))
    logger, log = records
    app = pgqueue.App()
    release, free_returned = anyio.Event(), anyio.Event()

    @app.job("free")
    async def free(job: pgqueue.Job) -> dict[str, Any]:
        await release.wait()
        free_returned.set()
        return {"n": 1}

    @app.job("locked")
    async def locked(job: pgqueue.Job) -> dict[str, Any]:
        # Resumes right after `free` returns and before the flusher runs: one batch,
        # [free, locked], the locked row last.
        await free_returned.wait()
        return {"n": 2}

    free_job = await app.enqueue(conn, "free")
    locked_job = await app.enqueue(conn, "locked")
    locker = await connect()
    async with _worker_running(app, db_dsn, logger, concurrency=2):
        await wait_for_states(conn, [free_job, locked_job], "running")
        async with locker.transaction():
            await locker.execute("SELECT FROM pgqueue.jobs WHERE id = $1 FOR UPDATE", locked_job)
            release.set()
            await wait_for_states(conn, [free_job], "succeeded", within=10)
            assert log.count(f"the successes of 2 jobs ({free_job}, ... {locked_job})"), log.text()
        await wait_for_states(conn, [locked_job], "succeeded")
        await wait_until(functools.partial(log.outcome_logged, locked_job), what="the outcome line")
    assert log.outcomes(free_job) == ["succeeded"], log.text()
    assert log.outcomes(locked_job) == ["succeeded"], log.text()
    rows = await conn.fetch("SELECT id, attempts, result FROM pgqueue.jobs ORDER BY id")
    assert [(r["attempts"], json.loads(r["result"])) for r in rows] == [
        (1, {"n": 1}),
        (1, {"n": 2}),
    ]


async def test_a_success_behind_a_held_row_lock_does_not_hold_up_later_ones(
    conn: asyncpg.Connection,
    connect: Any,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    """An application transaction enqueues a dependent of a running job and stays open: it
    holds the job FOR SHARE, and the job's success cannot be written until it commits. The
    write gives up its lock wait after LOCK_WAIT and is retried on its own, while the
    worker's later successes land. Retried in the flusher, it held every later success for
    as long as the transaction stayed open (or, with no bound on the lock wait, for the
    30-second write timeout at each try)."""
    monkeypatch.setattr(completer, "LOCK_WAIT", "200ms")
    logger, log = records
    app = pgqueue.App()
    gates = {"first": anyio.Event(), "later": anyio.Event()}

    @app.job("gated")
    async def gated(job: pgqueue.Job) -> dict[str, Any]:
        await gates[job.payload["gate"]].wait()
        return {"gate": job.payload["gate"]}

    first = await app.enqueue(conn, "gated", {"gate": "first"})
    later = await app.enqueue(conn, "gated", {"gate": "later"})
    app_conn = await connect()
    app_pid = await app_conn.fetchval("SELECT pg_backend_pid()")
    blocked = functools.partial(_writes_blocked_by, conn, app_pid)

    async with _worker_running(app, db_dsn, logger, concurrency=2):
        await wait_for_states(conn, [first, later], "running")
        async with app_conn.transaction():
            await app_conn.fetchval(
                "SELECT pgqueue.enqueue('child', depends_on => ARRAY[$1]::bigint[])", first
            )
            gates["first"].set()
            await wait_until(blocked, what="the first success waiting on the FOR SHARE lock")
            gates["later"].set()
            await wait_for_states(conn, [later], "succeeded", within=10)
            assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", first) == (
                "running"
            )
        await wait_for_states(conn, [first], "succeeded")
        await wait_until(functools.partial(log.outcome_logged, first), what="the outcome line")
    assert log.outcomes(first) == ["succeeded"], log.text()
    assert log.outcomes(later) == ["succeeded"], log.text()
    rows = await conn.fetch(
        "SELECT attempts, result FROM pgqueue.jobs WHERE id = ANY($1::bigint[]) ORDER BY id",
        [first, later],
    )
    assert [(r["attempts"], json.loads(r["result"])) for r in rows] == [
        (1, {"gate": "first"}),
        (1, {"gate": "later"}),
    ]


async def test_a_success_that_needs_longer_than_the_write_timeout_still_lands(
    conn: asyncpg.Connection,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    """A success whose write takes longer than the write timeout every time (here: its
    follow-up's insert is slowed down by a trigger) is cut off, and each later try gets
    twice as long, until one is long enough. With a fixed bound it was cut off at every try
    until the worker stopped."""
    monkeypatch.setattr(completer, "WRITE_TIMEOUT", 0.3)
    await conn.execute(
        """
        CREATE FUNCTION public.slow_child() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(0.5); RETURN NEW; END $$;
        CREATE TRIGGER slow_child BEFORE INSERT ON pgqueue.jobs
            FOR EACH ROW WHEN (NEW.job_type = 'slow_child') EXECUTE FUNCTION public.slow_child();
        """
    )
    logger, log = records
    app = pgqueue.App()

    @app.job("parent")
    async def parent(job: pgqueue.Job) -> pgqueue.Result:
        return pgqueue.Result({"n": 7}).then(pgqueue.Spec("slow_child"))

    job = await app.enqueue(conn, "parent")
    async with _worker_running(app, db_dsn, logger):
        await wait_for_states(conn, [job], "succeeded", within=20)
        await wait_until(functools.partial(log.outcome_logged, job), what="the outcome line")
    await _assert_succeeded_once(conn, job, log)
    assert log.count(f"recording the success of job {job} (NoAnswer") == 1, log.text()
    children = await conn.fetch("SELECT job_type FROM pgqueue.jobs WHERE parent_id = $1", job)
    assert [r["job_type"] for r in children] == ["slow_child"]


async def test_stop_cuts_a_write_under_way_when_the_final_window_ends(
    conn: asyncpg.Connection,
    connect: Any,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    """A success write has waited on a row lock since before the stop, under a bound of a
    minute. At the end of the grace period the final window begins: the try under way must
    end with it, not a minute later (the job stays running under the worker, for stale
    recovery). Only tries started after the window began used to be bounded by it."""
    monkeypatch.setattr(completer, "LOCK_WAIT", "10min")
    monkeypatch.setattr(completer, "WRITE_TIMEOUT", 60.0)
    monkeypatch.setattr(worker_module, "FINAL_WRITE_WINDOW", 1.0)
    logger, log = records
    app, release = _gated_app()
    job = await app.enqueue(conn, "ok", {"n": 7})
    locker = await connect()
    locker_pid = await locker.fetchval("SELECT pg_backend_pid()")
    blocked = functools.partial(_writes_blocked_by, conn, locker_pid)

    worker = pgqueue.Worker(app, db_dsn, grace=0.5, handle_signals=False, logger=logger)
    returned = anyio.Event()
    stopped_after = None

    async def run() -> None:
        await worker.run()
        returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_for_states(conn, [job], "running")
        await locker.execute("BEGIN")
        try:
            await locker.execute("SELECT FROM pgqueue.jobs WHERE id = $1 FOR UPDATE", job)
            release.set()
            await wait_until(blocked, what="the success write waiting on the lock")
            started = time.monotonic()
            worker.stop()
            with anyio.move_on_after(20):  # a regression fails below instead of hanging
                await returned.wait()
                stopped_after = time.monotonic() - started
        finally:
            # Lets a regression's write (or one held up by an earlier failure) land, and the
            # worker stop.
            await locker.execute("ROLLBACK")
            worker.stop()
    assert stopped_after is not None and stopped_after < 10, (stopped_after, log.text())
    assert log.count(f"gave up recording the success of job {job} at shutdown"), log.text()
    # Given up is not refused: the lease was not lost (a log line said so).
    assert log.count(" not recorded (given up at shutdown)") == 1, log.text()
    assert not log.count("lease lost"), log.text()
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job) == "running"


async def test_a_cut_reaches_a_call_still_waiting_for_a_pooled_connection(db_dsn: str) -> None:
    """bounded.Deadlines brings forward the bound of a call that is still waiting for a
    connection (the pool is exhausted), not only of one whose statement runs; a call that
    starts after the cut gets the earlier deadline too, with at least ``min_try``."""
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=1)
    deadlines = bounded.Deadlines(min_try=0.2)
    outcome: dict[str, Any] = {}

    async def op(conn: asyncpg.Connection) -> Any:
        return await conn.fetchval("SELECT 1")

    async def attempt() -> None:
        started = time.monotonic()
        try:
            await bounded.call(pool, 60, op, deadlines=deadlines)
        except TimeoutError as exc:
            outcome["error"], outcome["after"] = exc, time.monotonic() - started

    try:
        async with pool.acquire():  # the pool's only connection
            async with anyio.create_task_group() as tg:
                tg.start_soon(attempt)
                await anyio.wait_all_tasks_blocked()  # the call waits for a connection
                deadlines.cut(anyio.current_time())
            assert outcome["after"] < 5, outcome
            assert not isinstance(outcome["error"], bounded.NoAnswer)  # it never got one
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await bounded.call(pool, 60, op, deadlines=deadlines)
            assert time.monotonic() - started < 5
        assert await bounded.call(pool, 60, op) == 1  # the pool is fine afterwards
    finally:
        await pool.close()


async def test_success_whose_reply_is_lost_is_recorded_not_lease_lost(
    conn: asyncpg.Connection,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    """The first ``complete_many`` reaches the server and commits, but its reply never
    arrives, and the connection is neither closed nor reset (a half-open connection).
    The write must be cut off, and its retry, which fencing refuses because the job has
    already succeeded, must recognise the earlier try's own success: logged as succeeded,
    not as a lost lease. Without a bound the worker waits for that reply forever."""
    monkeypatch.setattr(completer, "WRITE_TIMEOUT", 1.0)
    monkeypatch.setattr(bounded, "CANCEL_WAIT", 0.5)
    logger, log = records
    app, release = _gated_app()
    release.set()
    job = await app.enqueue(conn, "ok", {"n": 7})
    async with _proxied(db_dsn, b"pgqueue.complete_many") as (proxy, dsn):
        worker = pgqueue.Worker(app, dsn, concurrency=1, handle_signals=False, logger=logger)
        returned = anyio.Event()

        async def run() -> None:
            await worker.run()
            returned.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            try:
                await wait_for_states(conn, [job], "succeeded")
                # The first write completed the job and committed (CommandComplete, then
                # ReadyForQuery outside a transaction), and its reply was lost.
                assert proxy.swallowed.is_set()
                await wait_until(proxy.reply_lost, what="the end of the lost reply")
                assert ("C", b"SELECT 1\0") in proxy.lost, proxy.lost
                await wait_until(
                    functools.partial(log.outcome_logged, job), what="the outcome line", within=15
                )
            finally:
                worker.stop()
                with anyio.move_on_after(15):
                    await returned.wait()
                if not returned.is_set():
                    # An unbounded write waits for the lost reply forever, shielded from
                    # cancellation: close its connection so the test fails, not hangs.
                    proxy.drop()
    await _assert_succeeded_once(conn, job, log)
    assert log.count(f"recording the success of job {job} (NoAnswer") == 1, log.text()


async def test_heartbeat_whose_reply_is_lost_keeps_beating(
    conn: asyncpg.Connection,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    """The same half-open connection under a heartbeat: the beat is cut off after its period
    and the next one lands on a fresh connection, so the running job keeps its lease.
    ``pool.fetchval(timeout=...)`` alone is not enough: its release then waits, with no
    bound, for the cancel to be acknowledged on the dead connection, and the heartbeat loop
    stops while the lease goes stale."""
    monkeypatch.setattr(bounded, "CANCEL_WAIT", 0.2)
    # A beat every 1.5 s; stale once the lease is 6 s old, leaving room for a lost beat.
    await conn.execute("UPDATE pgqueue.settings SET value = '6 seconds' WHERE name = 'stale_after'")
    logger, log = records
    app, release = _gated_app()
    job = await app.enqueue(conn, "ok", {"n": 7})
    async with _proxied(db_dsn, b"pgqueue.heartbeat") as (proxy, dsn):
        async with _worker_running(app, dsn, logger):
            await wait_for_states(conn, [job], "running")
            await wait_until(proxy.reply_lost, what="a heartbeat whose reply is lost")
            lost_at = await conn.fetchval("SELECT locked_at FROM pgqueue.jobs WHERE id = $1", job)

            async def beaten_since() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT locked_at > $2 FROM pgqueue.jobs WHERE id = $1", job, lost_at
                    )
                )

            await wait_until(beaten_since, within=10, what="a heartbeat after the lost one")
            release.set()
            await wait_for_states(conn, [job], "succeeded")
            await wait_until(functools.partial(log.outcome_logged, job), what="the outcome line")
    await _assert_succeeded_once(conn, job, log)  # never recovered as stale
    assert (
        log.count(
            "heartbeat: no answer in time (the database is unreachable, or a lock is held)"
            " while refreshing leases (NoAnswer"
        )
        == 1
    )


async def test_jobs_of_a_claim_whose_reply_is_lost_are_given_back(
    conn: asyncpg.Connection,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    """The worker's first claim commits, but its reply is lost on a half-open connection: the
    job is running under this worker, which does not know it, and the heartbeat (by worker)
    keeps its lease fresh, so stale recovery never takes it either. The claim is cut off, and
    before the next one the worker gives back what it holds without knowing; the job then
    runs once, its first attempt not counted. Without that it stays running for as long as
    the worker lives."""
    monkeypatch.setattr(producer, "STATEMENT_TIMEOUT", 1.0)
    monkeypatch.setattr(bounded, "CANCEL_WAIT", 0.2)
    logger, log = records
    app, release = _gated_app()
    release.set()
    job = await app.enqueue(conn, "ok", {"n": 7})
    async with _proxied(db_dsn, b"pgqueue.claim_next") as (proxy, dsn):
        async with _worker_running(app, dsn, logger):
            await wait_until(proxy.reply_lost, what="a claim whose reply is lost")
            assert ("C", b"SELECT 1\0") in proxy.lost, proxy.lost  # it claimed our job
            await wait_for_states(conn, [job], "succeeded", within=15)
            await wait_until(functools.partial(log.outcome_logged, job), what="the outcome line")
    await _assert_succeeded_once(conn, job, log)
    lost = f"job {job}: running under this worker, which does not hold it"
    assert log.count(lost) == 1 and log.count("an outcome the database lost); released") == 1, (
        log.text()
    )


async def test_a_claim_back_whose_reply_is_lost_is_released_once_its_attempt_settles(
    conn: asyncpg.Connection,
    connect: Any,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    """A claim whose reply is lost takes back a job whose earlier attempt this worker still
    holds, and that attempt's success was refused before the claim committed (recovery had
    queued the job). The sweep before the next claim leaves the job alone (it is held), so
    once the refusal arrives nothing would give the job back: it would stay running under
    this worker, its lease kept fresh by the heartbeat, for as long as the worker lives. The
    lost claim must count as a possible claim back of every held job, and each asks for a
    sweep once its outcome is written."""
    monkeypatch.setattr(producer, "STATEMENT_TIMEOUT", 1.0)
    monkeypatch.setattr(bounded, "CANCEL_WAIT", 0.2)
    gate = await gate_refusal_lookup(conn, connect, monkeypatch)
    app, release, runs = held_handler_app()
    job = await app.enqueue(conn, "long")
    logger, log = records
    async with _proxied(db_dsn, b"pgqueue.claim_next") as (proxy, dsn):
        proxy.armed = False
        worker = pgqueue.Worker(
            app, dsn, concurrency=2, poll_interval=60, handle_signals=False, logger=logger
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            try:
                await wait_for_states(conn, [job], "running")
                # No claim runs from here until our notification: the requeue sends none
                # (quiet), the safety poll is a minute away, and a freed slot wakes a
                # producer only when every slot was busy.
                await refuse_the_success(conn, job, release, due=False, quiet=True)
                proxy.armed = True
                await conn.execute("UPDATE pgqueue.jobs SET run_after = now() WHERE id = $1", job)
                await conn.execute("SELECT pg_notify('pgqueue', 'default')")
                await wait_until(proxy.reply_lost, what="the claim back whose reply is lost")
                row = await conn.fetchrow(
                    "SELECT state, attempts FROM pgqueue.jobs WHERE id = $1", job
                )
                assert tuple(row) == ("running", 2)
                # Logged once a claim after the lost one went through, so the sweep that
                # precedes it has run while the job was still held.
                await wait_until(
                    lambda: log.logged("producer: working again"), what="a claim after the lost one"
                )
                await gate.execute("SELECT pg_advisory_unlock(4242)")  # the refusal arrives
                await wait_for_states(conn, [job], "succeeded", within=15)
            finally:
                worker.stop()
    assert runs == [1, 2], log.text()
    assert log.count("which does not hold it") == 1, log.text()


async def test_recovery_whose_reply_is_lost_frees_the_leader_lock(
    conn: asyncpg.Connection,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A recovery round whose client vanishes mid-transaction (its reply lost on a half-open
    connection) must neither hang the worker nor keep the leader lock, which every worker
    needs to recover stale jobs: the round is cut off, and the server ends the abandoned
    transaction. Without both, the call waits forever and the lock stays taken until TCP
    keepalives notice, hours later by default."""
    monkeypatch.setattr(leader, "RECOVERY_TIMEOUT", 1.0)
    monkeypatch.setattr(leader, "ABANDONED_AFTER", 1.0)
    monkeypatch.setattr(bounded, "CANCEL_WAIT", 0.2)

    async def leader_lock_free() -> bool:
        return not await conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory'"
            " AND classid = $1 AND objid = 0)",
            leader.LEADER_LOCK_CLASS,
        )

    async with _proxied(db_dsn, b"pgqueue.recover_stale", mute_client=True) as (proxy, dsn):
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        try:
            with anyio.fail_after(10):  # unbounded, the call would wait here forever
                with pytest.raises(TimeoutError):
                    await leader._recover_once(pool)
            assert proxy.swallowed.is_set()
            await wait_until(leader_lock_free, within=10, what="the leader lock released")
        finally:
            proxy.drop()
            with anyio.move_on_after(5):
                await pool.close()


async def test_schema_check_whose_reply_is_lost_stops_the_worker(
    db_dsn: str, monkeypatch: pytest.MonkeyPatch, records: tuple[logging.Logger, Records]
) -> None:
    """A connection that goes half-open during the start-up schema check must not hold the
    worker forever before it claims anything: the check is cut off and the worker stops
    with a timeout, which the CLI reports as "cannot connect to PostgreSQL"."""
    monkeypatch.setattr(worker_module, "STARTUP_TIMEOUT", 1.0)
    monkeypatch.setattr(bounded, "CANCEL_WAIT", 0.2)
    logger, _ = records
    async with _proxied(db_dsn, b"pgqueue.alembic_version") as (proxy, dsn):
        worker = pgqueue.Worker(
            pgqueue.App(), dsn, concurrency=1, handle_signals=False, logger=logger
        )
        try:
            with anyio.fail_after(15):  # unbounded, the worker would wait here forever
                with pytest.raises(TimeoutError, match="no answer from the database"):
                    await worker.run()
            assert proxy.swallowed.is_set()
        finally:
            proxy.drop()


@contextlib.asynccontextmanager
async def _worker_running(
    app: pgqueue.App, dsn: str, logger: logging.Logger, concurrency: int = 1
) -> AsyncIterator[None]:
    """A worker for ``app`` running in the background, asked to stop on the way out."""
    worker = pgqueue.Worker(app, dsn, concurrency=concurrency, handle_signals=False, logger=logger)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            yield
        finally:
            worker.stop()


@contextlib.asynccontextmanager
async def _proxied(
    db_dsn: str, marker: bytes, *, mute_client: bool = False
) -> AsyncIterator[tuple[SwallowingProxy, str]]:
    """A :class:`SwallowingProxy` in front of the test server, and a DSN through it."""
    proxy = SwallowingProxy(await server_address(db_dsn), marker, mute_client=mute_client)
    async with anyio.create_task_group() as tg:
        port = await tg.start(proxy.serve)
        yield proxy, dsn_through(db_dsn, port, sslmode="disable")
        tg.cancel_scope.cancel()


# PostgreSQL's untyped first messages that are followed by another untyped one.
_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104


class SwallowingProxy:
    """A TCP proxy to PostgreSQL that, once, turns a connection half-open after a statement.

    The first statement prepared with ``marker`` in its text is run normally, but from its
    first Bind while :attr:`armed` on, everything the server sends on that connection is read
    and dropped, while both
    sockets stay open: the statement runs and commits, and the client waits for a reply that
    never comes, as on a connection whose peer vanished without FIN or RST. Everything else
    is passed through unchanged.

    The trigger is the Bind that names the prepared statement, not the first Bind after its
    Parse: asyncpg may run a type introspection query in between, on the same connection.
    The client sends a Bind only once it has read the replies to everything before it, so
    nothing it waits for is dropped but the statement's own reply.
    """

    def __init__(
        self, upstream: str | tuple[str, int], marker: bytes, *, mute_client: bool = False
    ) -> None:
        self.upstream, self.marker = upstream, marker  # a Unix socket's path, or TCP
        # Also stop passing on what the client sends once the reply is swallowed, and keep
        # the server's socket open when the client closes: a client that vanished.
        self.mute_client = mute_client
        self.swallowed = anyio.Event()
        # Only a Bind made while armed triggers (a test may let earlier ones pass).
        self.armed = True
        self.lost: list[tuple[str, bytes]] = []  # the server messages swallowed: (type, body)
        self._connections: set[anyio.CancelScope] = set()

    async def reply_lost(self) -> bool:
        """For ``wait_until``: has a whole reply been swallowed (up to ReadyForQuery, idle)?"""
        return ("Z", b"I") in self.lost

    def drop(self) -> None:
        """Close every proxied connection now (new ones are still accepted)."""
        for scope in self._connections:
            scope.cancel()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int]) -> None:
        """Listen on a free loopback port, reported through ``task_status``, until cancelled."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
            await listener.serve(self._handle)

    async def _connect(self) -> anyio.abc.SocketStream:
        if isinstance(self.upstream, str):
            return await anyio.connect_unix(self.upstream)
        return await anyio.connect_tcp(*self.upstream)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client, await self._connect() as server:
            swallow = anyio.Event()
            async with anyio.create_task_group() as tg:
                self._connections.add(tg.cancel_scope)
                tg.start_soon(self._to_server, client, server, swallow, tg.cancel_scope)
                tg.start_soon(self._to_client, server, client, swallow, tg.cancel_scope)
            self._connections.discard(tg.cancel_scope)

    async def _to_server(
        self,
        client: anyio.abc.SocketStream,
        server: anyio.abc.SocketStream,
        swallow: anyio.Event,
        scope: anyio.CancelScope,
    ) -> None:
        """Pass the client's bytes on, reading its protocol messages to spot the Bind."""
        buf = bytearray()
        startup = True  # untyped messages first: (SSL/GSSENC request,) startup or cancel
        marked: bytes | None = None  # the name of the marked prepared statement, if any
        try:
            async for data in client:
                buf += data
                while True:
                    if startup:
                        if len(buf) < 8 or len(buf) < int.from_bytes(buf[:4], "big"):
                            break
                        size, code = int.from_bytes(buf[:4], "big"), int.from_bytes(buf[4:8], "big")
                        del buf[:size]
                        startup = code in (_SSL_REQUEST, _GSSENC_REQUEST)
                        continue
                    if len(buf) < 5 or len(buf) < 1 + int.from_bytes(buf[1:5], "big"):
                        break
                    kind, size = buf[0], int.from_bytes(buf[1:5], "big")
                    body = bytes(buf[5 : 1 + size])
                    del buf[: 1 + size]
                    if self.swallowed.is_set():
                        continue
                    if kind == ord("P"):  # Parse: statement name, query, ...
                        name = body.split(b"\0", 1)[0]
                        if self.marker in body:
                            marked = name
                        elif name == marked:
                            marked = None  # the name now means another statement
                    elif kind == ord("B") and marked is not None and self.armed:  # Bind
                        if body.split(b"\0", 2)[1] == marked:
                            swallow.set()  # before passing it on: its reply is the first lost
                            self.swallowed.set()
                            await server.send(data)
                            data = b""
                if data and not (self.mute_client and swallow.is_set()):
                    await server.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            if self.mute_client and swallow.is_set():
                await anyio.sleep_forever()  # the server never hears the client go
            scope.cancel()

    async def _to_client(
        self,
        server: anyio.abc.SocketStream,
        client: anyio.abc.SocketStream,
        swallow: anyio.Event,
        scope: anyio.CancelScope,
    ) -> None:
        """Pass the server's bytes on until ``swallow``; then read them into :attr:`lost`."""
        lost = bytearray()
        try:
            async for data in server:
                if not swallow.is_set():
                    await client.send(data)
                    continue
                lost += data  # starts at a message: the client had read all before the Bind
                while len(lost) >= 5 and len(lost) >= 1 + int.from_bytes(lost[1:5], "big"):
                    size = int.from_bytes(lost[1:5], "big")
                    self.lost.append((chr(lost[0]), bytes(lost[5 : 1 + size])))
                    del lost[: 1 + size]
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            scope.cancel()
