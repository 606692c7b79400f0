"""pgqueue.abort() of a job a worker runs: the handler stops and the job ends cancelled."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import anyio
import asyncpg
from runtime_helpers import Records, running
from worker_harness import wait_for_states, wait_until

import pgqueue

ABORT = "SELECT pgqueue.abort($1)"


class Probe:
    """What the handlers saw: which started, which were cancelled, which finished."""

    def __init__(self) -> None:
        self.started: dict[int, anyio.Event] = {}
        self.cancelled: list[int] = []
        self.finished: list[int] = []
        self.release = threading.Event()  # lets the plain-def handler's loop go on

    def start(self, job: pgqueue.Job) -> None:
        self.started.setdefault(job.id, anyio.Event()).set()

    async def started_(self, job_id: int) -> None:
        with anyio.fail_after(10):
            await self.started.setdefault(job_id, anyio.Event()).wait()


def make_app(probe: Probe) -> pgqueue.App:
    app = pgqueue.App()

    @app.job("long", max_attempts=5)
    async def long(job: pgqueue.Job) -> str:
        probe.start(job)
        try:
            await anyio.sleep(60)
        except BaseException:
            probe.cancelled.append(job.id)
            raise
        return "finished"

    @app.job("long_timed", max_attempts=5, timeout=60)
    async def long_timed(job: pgqueue.Job) -> str:
        return await long(job)

    @app.job("stubborn", max_attempts=5)
    async def stubborn(job: pgqueue.Job) -> str:
        """Swallows the cancellation and returns: the attempt is aborted all the same."""
        probe.start(job)
        try:
            await anyio.sleep(60)
        except BaseException:
            probe.cancelled.append(job.id)
        return "pretends to have finished"

    @app.job("steps", max_attempts=5)
    def steps(job: pgqueue.Job) -> str:
        anyio.from_thread.run_sync(probe.start, job)
        while not job.abort_requested:
            probe.release.wait(0.01)
        probe.finished.append(job.id)
        return "stopped early"

    @app.job("ok")
    async def ok(job: pgqueue.Job) -> None:
        return None

    return app


async def _enqueue(conn: asyncpg.Connection, job_type: str) -> tuple[int, int]:
    """A job and a dependent waiting on it."""
    job: int = await conn.fetchval("SELECT pgqueue.enqueue($1)", job_type)
    dependent: int = await conn.fetchval(
        "SELECT pgqueue.enqueue('ok', depends_on => ARRAY[$1::bigint])", job
    )
    return job, dependent


async def test_an_async_handler_is_cancelled_and_the_job_ends_cancelled(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    probe = Probe()
    async with running(make_app(probe), db_dsn, concurrency=4, grace=0.5) as worker:
        jobs = {t: await _enqueue(conn, t) for t in ("long", "long_timed", "stubborn")}
        other = await conn.fetchval("SELECT pgqueue.enqueue('long')")
        for job, _ in jobs.values():
            await probe.started_(job)
        await probe.started_(other)
        for job, _ in jobs.values():
            assert await conn.fetchval(ABORT, job) == "running"
        await wait_for_states(conn, [job for job, _ in jobs.values()], "cancelled", within=10)
        await wait_for_states(conn, [dep for _, dep in jobs.values()], "cancelled", within=10)
        assert sorted(probe.cancelled) == sorted(job for job, _ in jobs.values())
        errors = await conn.fetch(
            "SELECT last_error FROM pgqueue.jobs WHERE id = ANY($1)",
            [job for job, _ in jobs.values()],
        )
        assert all(e["last_error"].startswith("aborted: pgqueue.abort()") for e in errors)
        # The other job of the worker runs on, and the worker takes new work.
        assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", other) == (
            "running"
        )
        fresh = await conn.fetchval("SELECT pgqueue.enqueue('ok')")
        await wait_for_states(conn, [fresh])
        executor = worker._executor  # type: ignore[attr-defined]
        assert executor is not None and not executor._abort_sent and not executor.aborting


async def test_a_plain_def_sees_abort_requested_and_its_return_does_not_count(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    probe = Probe()
    async with running(make_app(probe), db_dsn, concurrency=2):
        job, dependent = await _enqueue(conn, "steps")
        await probe.started_(job)
        assert await conn.fetchval(ABORT, job) == "running"
        await wait_for_states(conn, [job, dependent], "cancelled", within=10)
        assert probe.finished == [job]
        row = await conn.fetchrow("SELECT result, attempts FROM pgqueue.jobs WHERE id = $1", job)
        assert row is not None and row["result"] is None and row["attempts"] == 1


async def test_an_abort_whose_notification_was_missed_is_found_by_the_heartbeat(
    db_dsn: str, conn: asyncpg.Connection, records: tuple[Any, Records]
) -> None:
    """The request is written without its NOTIFY (as if the LISTEN connection had been
    reconnecting): the next heartbeat finds it."""
    logger, logged = records
    await conn.execute("UPDATE pgqueue.settings SET value = '2 seconds' WHERE name = 'stale_after'")
    probe = Probe()
    async with running(make_app(probe), db_dsn, concurrency=2, logger=logger):
        job, _ = await _enqueue(conn, "long")
        await probe.started_(job)
        await conn.execute("INSERT INTO pgqueue.abort_requests (job_id) VALUES ($1)", job)
        await wait_for_states(conn, [job], "cancelled", within=10)
        assert probe.cancelled == [job]
        assert await logged.logged(f"job {job}: abort requested; cancelling its handler")


async def test_an_abort_at_shutdown_does_not_hold_it_up_and_the_job_ends_cancelled(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """An abort and the grace period's end together: the shutdown's cancellation is not
    mistaken for the abort's alone, the job is released, and the release ends it cancelled."""
    probe = Probe()
    worker = pgqueue.Worker(make_app(probe), db_dsn, handle_signals=False, concurrency=2, grace=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.started.wait()
        job, _ = await _enqueue(conn, "long")
        await probe.started_(job)
        await conn.execute("INSERT INTO pgqueue.abort_requests (job_id) VALUES ($1)", job)
        executor = worker._executor  # type: ignore[attr-defined]
        assert executor is not None
        executor.abort([job], dict(executor.running))
        worker.stop()
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job) == "cancelled"


async def test_a_notification_without_a_request_aborts_nothing(
    db_dsn: str, conn: asyncpg.Connection, records: tuple[Any, Records]
) -> None:
    """Notifications are hints: the worker acts on the requests it reads, not on a payload
    (before, a bare NOTIFY with a running job's id cancelled its handler, and the job, with
    no request to read, was queued again with an attempt used)."""
    logger, logged = records
    probe = Probe()
    async with running(make_app(probe), db_dsn, concurrency=2, logger=logger, grace=0.5):
        job, _ = await _enqueue(conn, "long")
        await probe.started_(job)
        await conn.execute("NOTIFY pgqueue, ''")
        # The worker reads the requests once it hears a notification; an abort of another job,
        # sent after these, is heard and carried out after them.
        other = await conn.fetchval("SELECT pgqueue.enqueue('long')")
        await probe.started_(other)
        assert await conn.fetchval(ABORT, other) == "running"
        await wait_for_states(conn, [other], "cancelled", within=10)
        assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job) == (
            "running"
        )
        assert probe.cancelled == [other]
        assert logged.count("abort requested") == 1


async def test_cancel_pipeline_with_abort_running_stops_its_running_members(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    probe = Probe()
    app = make_app(probe)
    async with running(app, db_dsn, concurrency=4, grace=0.5):
        pipe = app.pipeline()
        long = pipe.add("long")
        pipe.add("ok", after=long)
        run = await pipe.enqueue(conn)
        first = run[long]
        await probe.started_(first)
        assert await app.cancel_pipeline(conn, run.pipeline_id, abort_running=True) == 2
        status = None
        with anyio.fail_after(10):
            while status is None or not status.done:
                status = await app.pipeline_status(conn, run.pipeline_id)
                await anyio.sleep(0.02)
        assert status.state == "cancelled" and status.counts.get("cancelled") == 2
        assert probe.cancelled == [first]


async def test_a_read_answered_after_the_attempt_changed_aborts_nothing(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """A read of the requests is matched with the attempts running when it was sent. One
    whose answer arrives after the aborted attempt ended and the job was claimed back here
    (another Job object for the same id) leaves that new attempt alone; before, it cancelled
    the new attempt, whose failure then requeued the job."""
    probe = Probe()
    async with running(make_app(probe), db_dsn, concurrency=2, grace=0.5) as worker:
        job, _ = await _enqueue(conn, "long")
        await probe.started_(job)
        executor = worker._executor  # type: ignore[attr-defined]
        assert executor is not None
        executor.abort([job], {job: dataclasses.replace(executor.running[job])})
        assert not executor.aborting and probe.cancelled == []
        await conn.execute("INSERT INTO pgqueue.abort_requests (job_id) VALUES ($1)", job)
        executor.abort([job], dict(executor.running))  # the attempt the read was about
        await wait_for_states(conn, [job], "cancelled", within=10)
        assert probe.cancelled == [job]


async def test_a_job_a_read_named_before_its_claim_came_back_is_aborted_when_it_starts(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """The read can name a job whose claim has committed but whose reply has not reached the
    worker: once the job starts here, the worker reads again and aborts it, instead of
    waiting for the heartbeat (75 s here). The request is written without a NOTIFY."""
    probe = Probe()
    async with running(make_app(probe), db_dsn, concurrency=2, grace=0.5) as worker:
        executor = worker._executor  # type: ignore[attr-defined]
        assert executor is not None
        heard = worker._aborts_heard  # type: ignore[attr-defined]

        async def reader_idle() -> bool:  # the read after connecting is done
            return not heard.is_set() and heard._event.statistics().tasks_waiting == 1

        await worker.notifier.listening.wait()
        await wait_until(reader_idle, what="the abort reader waiting")
        job = await conn.fetchval(
            "SELECT pgqueue.enqueue('long', run_after => now() + interval '0.5 seconds')"
        )
        await conn.execute("INSERT INTO pgqueue.abort_requests (job_id) VALUES ($1)", job)
        executor.abort([job], {})  # the read's answer, before the job is held here
        await probe.started_(job)
        await wait_for_states(conn, [job], "cancelled", within=10)
        assert probe.cancelled == [job]
