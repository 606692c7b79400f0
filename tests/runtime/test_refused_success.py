"""A success PostgreSQL refuses still ends as a failed attempt, without holding up the rest.

Successes are written in batches by the completer's flusher; a batch that PostgreSQL refuses
is written again job by job, and the job refused on its own is failed with the error.
"""

from __future__ import annotations

import json

import anyio
import asyncpg
import pytest
from runtime_helpers import running
from worker_harness import wait_for_states

import pgqueue
from pgqueue.worker import completer, executor


async def test_refused_success_fails_the_attempt(conn: asyncpg.Connection, db_dsn: str) -> None:
    app = pgqueue.App()
    release = anyio.Event()

    @app.job("ok")
    async def ok(job: pgqueue.Job) -> dict[str, int]:
        await release.wait()  # finish together, so the refused result shares their batch
        return {"n": job.payload["n"]}

    @app.job("nul", max_attempts=1)
    async def nul(job: pgqueue.Job) -> dict[str, str]:
        await release.wait()
        return {"text": "poison"}

    # PostgreSQL refuses that one result (once a NUL in a string, which the worker now
    # refuses itself, before any write).
    await conn.execute(
        """CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'no poison here'; END $$;
        CREATE TRIGGER refuse_poison BEFORE UPDATE ON pgqueue.jobs FOR EACH ROW
        WHEN (NEW.result ? 'text') EXECUTE FUNCTION refuse_poison();"""
    )

    good = [await app.enqueue(conn, "ok", {"n": n}) for n in range(5)]
    bad = await app.enqueue(conn, "nul")
    worker = pgqueue.Worker(app, db_dsn, concurrency=10, poll_interval=0.5, handle_signals=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.started.wait()
        try:
            await wait_for_states(conn, [*good, bad], "running")
            release.set()
            await wait_for_states(conn, good, "succeeded")
            await wait_for_states(conn, [bad], "failed")
        finally:
            worker.stop()
    rows = await conn.fetch("SELECT id, result, last_error FROM pgqueue.jobs ORDER BY id")
    by_id = {r["id"]: r for r in rows}
    assert [json.loads(by_id[i]["result"]) for i in good] == [{"n": n} for n in range(5)]
    assert by_id[bad]["result"] is None
    assert by_id[bad]["last_error"].startswith("could not record the result: no poison here")
    # Every slot was freed: the worker stopped at once with nothing left running.
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE state = 'running'") == 0


async def test_a_set_up_error_for_one_success_holds_up_that_job_alone(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """A trigger of yours raising an error of the set-up's kind (here 42501, a per-row
    authorization check) for one success: its write is retried until the trigger lets it
    through, and the batch it came in is written without it. Retried whole, the batch held
    up every success of the worker (found by a review of the change that retries such errors
    instead of failing the attempt)."""
    app = pgqueue.App()
    release = anyio.Event()
    runs: list[int] = []

    @app.job("ok")
    async def ok(job: pgqueue.Job) -> None:
        runs.append(job.id)
        await release.wait()  # finish together, so the held one shares their batch

    await conn.execute(
        """CREATE FUNCTION public.check_owner() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'not yours' USING ERRCODE = 'insufficient_privilege'; END $$;
        CREATE TRIGGER check_owner BEFORE UPDATE ON pgqueue.jobs FOR EACH ROW
        WHEN (NEW.state = 'succeeded' AND NEW.payload ? 'foreign')
        EXECUTE FUNCTION public.check_owner();"""
    )
    good = [await app.enqueue(conn, "ok") for _ in range(5)]
    held = await app.enqueue(conn, "ok", {"foreign": True})
    worker = pgqueue.Worker(app, db_dsn, concurrency=10, poll_interval=0.5, handle_signals=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            await wait_for_states(conn, [*good, held], "running")
            release.set()
            await wait_for_states(conn, good, "succeeded")
            late = await app.enqueue(conn, "ok")  # and the worker goes on claiming
            await wait_for_states(conn, [late], "succeeded")
            assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", held) == (
                "running"
            )
            await conn.execute("DROP TRIGGER check_owner ON pgqueue.jobs")
            await wait_for_states(conn, [held], "succeeded")
        finally:
            worker.stop()
    assert sorted(runs) == sorted([*good, held, late])  # each ran once


def test_a_batch_of_successes_is_bounded_by_its_json_as_well() -> None:
    """From a scale review: batches were bounded by count alone, so 40 results of 30 MB made
    one message past PostgreSQL's 1 GB limit: the server dropped the connection, and the
    same batch went again, whole, for ever, every job stuck running. A batch now holds at
    most MAX_BATCH_TEXT of JSON, one success at least."""

    def success(n: int, size: int) -> completer.Success:
        job = pgqueue.Job(id=n, job_type="t", queue="q", payload={}, attempts=1, max_attempts=1)
        return completer.Success(job, "x" * size, None, 0.0)

    limit = completer.MAX_BATCH_TEXT
    big = [success(n, limit // 3) for n in range(7)]
    assert completer._batch_size(big) == 3
    assert completer._batch_size([success(0, 2 * limit), *big]) == 1  # alone, however big
    assert completer._batch_size([success(n, 10) for n in range(2000)]) == completer.MAX_BATCH
    assert completer._batch_size([success(0, 10)]) == 1


async def test_a_result_larger_than_a_jsonb_value_fails_its_attempt_by_name(
    conn: asyncpg.Connection, db_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the largest jsonb value the write was refused (or, past 1 GB, its connection
    dropped and the write sent again for ever): the attempt fails, saying what to do."""
    monkeypatch.setattr(executor, "MAX_JSON_TEXT", 1000)
    app = pgqueue.App()

    @app.job("huge", max_attempts=1)
    async def huge(job: pgqueue.Job) -> dict[str, str]:
        return {"text": "é" * 600}  # 600 characters, 1,200 bytes

    job_id = await app.enqueue(conn, "huge")
    async with running(app, db_dsn):
        await wait_for_states(conn, [job_id], "failed")
    error = await conn.fetchval("SELECT last_error FROM pgqueue.jobs WHERE id = $1", job_id)
    assert "the handler's result is 0 MiB of JSON, more than one jsonb value holds" in error
