"""Handler outcomes, enqueue options and queue selection, with an in-process Worker."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import gc
import itertools
import json
import logging
import pickle
import re
import sys
import threading
import time
import traceback
import uuid
import warnings
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import anyio
import asyncpg
import pytest
from runtime_helpers import (
    Records,
    gate_refusal_lookup,
    held_handler_app,
    recover_as_stale,
    refuse_the_success,
    running,
)
from worker_harness import dsn_as, wait_for_states, wait_until

import pgqueue
from pgqueue.error_line import error_line
from pgqueue.migrate import SchemaError
from pgqueue.worker import executor, heartbeat, leader
from pgqueue.worker.logs import JsonFormatter
from pgqueue.worker.producer import Producer
from pgqueue.worker.retry import Outage
from pgqueue.worker.worker import FINAL_WRITE_WINDOW


def make_app() -> pgqueue.App:
    app = pgqueue.App()

    @app.job("ok")
    async def ok(job: pgqueue.Job) -> dict[str, Any]:
        return {"echo": job.payload, "attempt": job.attempts}

    @app.job("in_thread")
    def in_thread(job: pgqueue.Job) -> str:
        return threading.current_thread().name

    @app.job("boom", max_attempts=1)
    async def boom(job: pgqueue.Job) -> None:
        raise ValueError("boom goes the handler")

    @app.job("slow", timeout=0.2, max_attempts=1)
    async def slow(job: pgqueue.Job) -> None:
        await anyio.sleep(30)

    @app.job("not_json", max_attempts=1)
    async def not_json(job: pgqueue.Job) -> object:
        return {1, 2, 3}

    @app.job("nul_result", max_attempts=1)
    async def nul_result(job: pgqueue.Job) -> object:
        return {"text": "a\x00b"}  # refused before any write, the string named

    async def wrapped(job: pgqueue.Job) -> None:
        return None

    @app.job("unawaited", max_attempts=1)
    def unawaited(job: pgqueue.Job) -> object:  # a decorator's plain wrapper, say
        return wrapped(job)

    @app.job("parent")
    async def parent(job: pgqueue.Job) -> pgqueue.Result:
        return pgqueue.Result(
            {"made": 1},
            next_jobs=[{"job_type": "ok", "payload": {"c": 1}}, {"job_type": "elsewhere"}],
        )

    @app.job("elsewhere", queue="other", max_attempts=2)
    async def elsewhere(job: pgqueue.Job) -> None:
        return None

    return app


async def test_handler_outcomes(conn: asyncpg.Connection, db_dsn: str) -> None:
    app = make_app()
    ids = {
        name: await app.enqueue(conn, name, {"n": 1}, max_attempts=1)
        for name in [
            "ok",
            "in_thread",
            "boom",
            "slow",
            "not_json",
            "nul_result",
            "unawaited",
            "no_such_type",
        ]
    }
    failing = ["boom", "slow", "not_json", "nul_result", "unawaited", "no_such_type"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with running(app, db_dsn):
            await wait_for_states(conn, [ids["ok"], ids["in_thread"]], "succeeded")
            await wait_for_states(conn, [ids[n] for n in failing], "failed")
        gc.collect()
    # The coroutine the worker was handed is closed: no "coroutine ... was never awaited".
    assert not [w for w in caught if "never awaited" in str(w.message)]

    rows = {
        r["job_type"]: r
        for r in await conn.fetch("SELECT job_type, result::text, last_error FROM pgqueue.jobs")
    }
    assert json.loads(rows["ok"]["result"]) == {"echo": {"n": 1}, "attempt": 1}
    assert json.loads(rows["in_thread"]["result"]) != threading.current_thread().name
    assert "Traceback" in rows["boom"]["last_error"]
    assert "ValueError: boom goes the handler" in rows["boom"]["last_error"]
    assert rows["slow"]["last_error"] == "timed out after 0.2s"
    assert "not JSON-serialisable" in rows["not_json"]["last_error"]
    assert rows["nul_result"]["last_error"] == (
        "handler result is not JSON-serialisable: the result holds \\u0000 (NUL) in a string,"
        " which PostgreSQL's jsonb cannot store"
    )
    assert rows["unawaited"]["last_error"].startswith(
        "the handler returned <coroutine object make_app.<locals>.wrapped at "
    )
    assert "make the wrapper an async def that awaits the call" in rows["unawaited"]["last_error"]
    assert "'no_such_type'" in rows["no_such_type"]["last_error"]


async def test_handlers_that_raise_unusual_things_fail_their_attempt_and_the_worker_goes_on(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """An error text PostgreSQL cannot store (a NUL, a lone surrogate) was refused, so the
    failure was never recorded and the job stayed running under the heartbeat for good; a
    CancelledError of the handler's own ended its runner and with it the worker (the job
    released, attempt not counted, to take down the next worker too); sys.exit() in a
    handler crashed the worker and left the job running; a result too deep to encode
    (RecursionError) escaped; so did KeyboardInterrupt and a handler's own BaseException,
    and a handler that caught its timeout's cancellation and returned was recorded as a
    success. Each now fails its attempt, and the worker runs on."""
    app = pgqueue.App()

    @app.job("nul")
    async def nul(job: pgqueue.Job) -> None:
        raise ValueError("bad row: a\x00b")

    @app.job("surrogate")
    async def surrogate(job: pgqueue.Job) -> None:
        raise ValueError("bad byte: \udcff")

    @app.job("cancelled")
    async def cancelled(job: pgqueue.Job) -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    @app.job("exits")
    def exits(job: pgqueue.Job) -> None:
        sys.exit(3)

    @app.job("deep")
    async def deep(job: pgqueue.Job) -> list[Any]:
        value: list[Any] = []
        for _ in range(100_000):
            value = [value]
        return value

    class Own(BaseException):
        pass

    @app.job("own_base")
    async def own_base(job: pgqueue.Job) -> None:
        raise Own("not an Exception")

    @app.job("interrupted")
    def interrupted(job: pgqueue.Job) -> None:
        raise KeyboardInterrupt

    @app.job("swallows_timeout", timeout=0.2)
    async def swallows_timeout(job: pgqueue.Job) -> str:
        try:
            await anyio.sleep(30)
        except asyncio.CancelledError:
            return "finished anyway"
        return "finished"

    @app.job("cancels_itself")
    async def cancels_itself(job: pgqueue.Job) -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)

    @app.job("watchdog")
    async def watchdog(job: pgqueue.Job) -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_later(0.05, task.cancel)
        await asyncio.sleep(30)

    @app.job("cancels_itself_past_timeout", timeout=0.1)
    async def cancels_itself_past_timeout(job: pgqueue.Job) -> None:
        try:
            await anyio.sleep(30)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)

    @app.job("returns_past_timeout_cancelling_itself", timeout=0.1)
    async def returns_past_timeout_cancelling_itself(job: pgqueue.Job) -> str:
        try:
            await anyio.sleep(30)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
        return "done"

    @app.job("returns_cancelling_itself")
    async def returns_cancelling_itself(job: pgqueue.Job) -> str:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # never delivered inside the handler
        return "done"

    @app.job("returns_with_a_request_taken_back")
    async def returns_with_a_request_taken_back(job: pgqueue.Job) -> str:
        # What an abort() landing as the handler returns leaves: the worker takes its
        # request back by count, and Python 3.11 keeps it pending all the same.
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        task.uncancel()
        return "done"

    @app.job("generator_exit")
    async def generator_exit(job: pgqueue.Job) -> None:
        raise GeneratorExit

    @app.job("generator_exit_in_thread")
    def generator_exit_in_thread(job: pgqueue.Job) -> None:
        raise GeneratorExit

    @app.job("huge")
    async def huge(job: pgqueue.Job) -> None:
        raise ValueError("x" * 1_000_000)

    @app.job("huge_wide")
    async def huge_wide(job: pgqueue.Job) -> None:
        raise ValueError("\u20ac" * 1_000_000)  # 3 bytes each in UTF-8

    @app.job("ok")
    async def ok(job: pgqueue.Job) -> int:
        return 1

    kinds = [
        "cancels_itself",
        "cancels_itself_past_timeout",
        "returns_past_timeout_cancelling_itself",
        "watchdog",
        "generator_exit",
        "generator_exit_in_thread",
        "huge",
        "huge_wide",
        "nul",
        "surrogate",
        "cancelled",
        "exits",
        "deep",
        "own_base",
        "interrupted",
        "swallows_timeout",
    ]
    ids = {kind: await app.enqueue(conn, kind, max_attempts=1) for kind in kinds}
    returns = [
        await app.enqueue(conn, kind, max_attempts=1)
        for kind in ("returns_cancelling_itself", "returns_with_a_request_taken_back")
    ]
    async with running(app, db_dsn, concurrency=2):
        await wait_for_states(conn, list(ids.values()), "failed")
        await wait_for_states(conn, returns, "succeeded")  # what they returned stands
        after = await app.enqueue(conn, "ok")
        await wait_for_states(conn, [after], "succeeded")
    errors = {
        r["job_type"]: r["last_error"]
        for r in await conn.fetch("SELECT job_type, last_error FROM pgqueue.jobs")
    }
    # Cancelled by its own code, not the worker's: it took the worker down (every job
    # released, the worker stopped); a GeneratorExit crashed it and stranded the job.
    assert "CancelledError" in errors["cancels_itself"]
    assert "CancelledError" in errors["watchdog"]
    assert errors["cancels_itself_past_timeout"] == "timed out after 0.1s"
    assert errors["returns_past_timeout_cancelling_itself"] == "timed out after 0.1s"
    assert "GeneratorExit" in errors["generator_exit"]
    assert "GeneratorExit" in errors["generator_exit_in_thread"]
    # 50 MB in, 50 MB stored per attempt (and logged): the middle is cut.
    assert len(errors["huge"]) < 70_000 and "bytes cut" in errors["huge"]
    assert errors["huge"].rstrip().endswith("x" * 100)
    # The bound is in bytes (64 KiB), not characters (three times that in euro signs).
    assert len(errors["huge_wide"].encode()) < 70_000 and "bytes cut" in errors["huge_wide"]
    assert errors["huge_wide"].rstrip().endswith("\u20ac" * 100)
    assert "ValueError: bad row: a\\x00b" in errors["nul"]
    assert "ValueError: bad byte: \\udcff" in errors["surrogate"]
    assert "CancelledError" in errors["cancelled"]
    assert "SystemExit: 3" in errors["exits"]
    assert "not JSON-serialisable: maximum recursion depth" in errors["deep"]
    assert "Own: not an Exception" in errors["own_base"]
    assert "KeyboardInterrupt" in errors["interrupted"]
    assert errors["swallows_timeout"] == "timed out after 0.2s"
    attempts = await conn.fetch(
        "SELECT attempts FROM pgqueue.jobs WHERE id = ANY($1)", list(ids.values())
    )
    assert [r["attempts"] for r in attempts] == [1] * len(kinds)


async def test_a_handler_that_catches_its_cancellation_and_carries_on_is_named(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled again at each await, such a handler spun the worker's CPU, held its job past
    its timeout and kept the worker from exiting, and nothing in the log said why."""
    from pgqueue.worker import worker as worker_module

    monkeypatch.setattr(executor, "IGNORED_TIMEOUT_WARNING", 0.2)
    monkeypatch.setattr(worker_module, "IGNORED_TIMEOUT_WARNING", 0.2)
    logger, log = records
    app = pgqueue.App()
    release = anyio.Event()

    async def stubborn(job: pgqueue.Job) -> None:
        while not release.is_set():
            try:
                await anyio.sleep(0.01)
            except asyncio.CancelledError:
                pass

    app.job("timed", timeout=0.1, max_attempts=1)(stubborn)
    app.job("untimed", max_attempts=1)(stubborn)
    timed = await app.enqueue(conn, "timed")
    async with running(app, db_dsn, logger=logger):
        await wait_until(functools.partial(log.logged, "0.2s past its timeout of 0.1s"))
        release.set()
        await wait_for_states(conn, [timed], "failed")
    release = anyio.Event()
    untimed = await app.enqueue(conn, "untimed")
    worker = pgqueue.Worker(app, db_dsn, handle_signals=False, grace=0.1, logger=logger)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await wait_for_states(conn, [untimed], "running")
        worker.stop()
        await wait_until(functools.partial(log.logged, "still running 0.2s after this worker"))
        release.set()
    assert log.count(f"Job(s): {untimed}") == 1


async def test_a_failure_still_being_written_at_shutdown_is_no_stubborn_handler(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure a trigger holds back for a set-up reason is retried by its runner; at
    shutdown that runner was counted as a handler catching its cancellation. It is not one:
    its write is given up when the final window ends, and says so."""
    from pgqueue.worker import worker as worker_module

    monkeypatch.setattr(worker_module, "IGNORED_TIMEOUT_WARNING", 0.2)
    monkeypatch.setattr(worker_module, "FINAL_WRITE_WINDOW", 1.0)
    logger, log = records
    app = pgqueue.App()

    @app.job("boom", max_attempts=1)
    async def boom(job: pgqueue.Job) -> None:
        raise ValueError("boom")

    await conn.execute(
        """CREATE FUNCTION public.hold_failure() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'not yours' USING ERRCODE = 'insufficient_privilege'; END $$;
        CREATE TRIGGER hold_failure BEFORE UPDATE ON pgqueue.jobs FOR EACH ROW
        WHEN (NEW.state = 'failed') EXECUTE FUNCTION public.hold_failure();"""
    )
    job_id = await app.enqueue(conn, "boom")
    worker = pgqueue.Worker(app, db_dsn, handle_signals=False, grace=0.1, logger=logger)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await wait_until(functools.partial(log.logged, "as it is set up"))
            worker.stop()
    assert log.count("after this worker cancelled them") == 0, log.text()
    assert log.outcomes(job_id) == [f"failure {executor._NOT_WRITTEN}"], log.text()
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job_id) == (
        "running"  # for stale recovery, as for a worker gone silent
    )


async def test_a_handler_held_up_with_its_worker_is_not_said_to_catch_its_cancellation(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From a chaos review: after a worker was stopped (SIGSTOP) past a job's timeout and
    the warning's delay, the warning's timer fired in the same pass as the timeout, before
    the cancellation reached the handler: a plain ``await`` was said to catch it. A handler
    blocking the event loop holds the worker up the same way."""
    monkeypatch.setattr(executor, "IGNORED_TIMEOUT_WARNING", 0.2)
    logger, log = records
    app = pgqueue.App()

    @app.job("held", timeout=0.1, max_attempts=1)
    async def held(job: pgqueue.Job) -> None:
        time.sleep(1.5)  # noqa: ASYNC251 (the worker's loop held up, as by a SIGSTOP)
        await anyio.sleep(30)

    job_id = await app.enqueue(conn, "held")
    async with running(app, db_dsn, logger=logger):
        await wait_for_states(conn, [job_id], "failed")
        await anyio.sleep(0.5)  # past the warning's delay, set again after the hold-up
    assert log.count("past its timeout") == 0, log.text()
    assert "timed out after 0.1s" in await conn.fetchval(
        "SELECT last_error FROM pgqueue.jobs WHERE id = $1", job_id
    )


async def test_a_handler_catching_its_cancellation_while_blocking_the_loop_is_named(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The warning's timer, set again when it fires late, is set again once: a handler that
    catches its cancellation and blocks the loop for seconds at a time made every firing
    late, and was never named (a review of that change)."""
    monkeypatch.setattr(executor, "IGNORED_TIMEOUT_WARNING", 0.2)
    logger, log = records
    app = pgqueue.App()
    release = threading.Event()

    @app.job("stubborn", timeout=0.1, max_attempts=1)
    async def stubborn(job: pgqueue.Job) -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                pass
            time.sleep(1.2)  # noqa: ASYNC251 (blocks the loop past the late-timer mark)

    job_id = await app.enqueue(conn, "stubborn")
    async with running(app, db_dsn, logger=logger):
        try:
            await wait_until(
                functools.partial(log.logged, "0.2s past its timeout of 0.1s"), within=15
            )
        finally:
            release.set()
        await wait_for_states(conn, [job_id], "failed")


async def test_a_job_whose_row_python_cannot_read_fails_and_the_others_run(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """A JSON number of 5,001 digits (Python's int() refuses it) in one job's payload made
    the claim of its batch fail after it committed: the batch was released, claimed again
    at once (the releases' notifications cut the backoff short) and failed again, about
    1,200 transactions a second that ran nothing; the job never failed. It fails its
    attempt now, and the others run."""
    app = pgqueue.App()

    @app.job("ok")
    async def ok(job: pgqueue.Job) -> int:
        return 1

    bad = await conn.fetchval(
        "SELECT pgqueue.enqueue('ok', '{\"n\": 1e5000}', priority => 5, max_attempts => 1)"
    )
    good = [await app.enqueue(conn, "ok") for _ in range(3)]
    async with running(app, db_dsn, concurrency=4):
        await wait_for_states(conn, good, "succeeded")
        await wait_for_states(conn, [bad], "failed")
    row = await conn.fetchrow("SELECT attempts, last_error FROM pgqueue.jobs WHERE id = $1", bad)
    assert row["attempts"] == 1
    assert "cannot read the job's row (ValueError: Exceeds the limit" in row["last_error"]


def test_the_logged_line_of_a_task_group_failure_names_the_exception() -> None:
    """It was the group traceback's closing frame line, "+------------"."""
    try:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [ValueError("boom")])
    except ExceptionGroup as group:
        text = executor._traceback(group)
    assert error_line(text) == "ValueError: boom"
    assert error_line("timed out after 1s") == "timed out after 1s"


@pytest.mark.parametrize(
    ("refused", "runs", "logged"),
    [
        # The failure's text is refused: a plain one is recorded, and the attempt counts.
        ("NEW.last_error LIKE '%poison%'", [1, 2], "recording it without its text"),
        # Every failure is refused: the job is held back (snoozed, attempt not counted) for a
        # second, then runs again. It was released at once, and a failure never recorded
        # ran again ten times a second.
        (
            "NEW.last_error IS NOT NULL",
            [1, 1],
            "1 time(s) in a row): runs again in 1s",
        ),
        # The snooze is refused too (its run_after is ahead): the sweep releases it at once.
        (
            "NEW.last_error IS NOT NULL OR NEW.run_after > now()",
            [1, 1],
            "nor hold it back; releasing it to run again",
        ),
    ],
)
async def test_a_failure_postgresql_refuses_to_record_does_not_strand_the_job(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    refused: str,
    runs: list[int],
    logged: str,
) -> None:
    """A failure the database refuses (here a trigger an operator added) left the job running
    under this worker, its lease kept fresh by the heartbeat, for the worker's life. A plain
    failure (the refusal's class only) is recorded instead; if that is refused too, the job is
    snoozed (attempt not counted) and runs again a second later (twice as long after each
    refusal in a row); if the snooze is refused as well, the sweep releases it."""
    logger, log = records
    await conn.execute(
        f"""CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'no poison here'; END $$;
            CREATE TRIGGER refuse_poison BEFORE UPDATE ON pgqueue.jobs FOR EACH ROW
            WHEN ({refused}) EXECUTE FUNCTION refuse_poison();"""
    )
    app = pgqueue.App()
    attempts: list[int] = []

    @app.job("flaky")
    async def flaky(job: pgqueue.Job) -> None:
        attempts.append(job.attempts)
        if len(attempts) == 1:
            raise ValueError("poison")

    job_id = await app.enqueue(conn, "flaky")
    async with running(app, db_dsn, logger=logger):
        await wait_for_states(conn, [job_id], "succeeded")
    assert attempts == runs
    assert log.count(logged) == 1
    if "release" in logged:
        assert log.count("(its outcome could not be recorded); released") == 1


async def test_a_job_whose_failure_is_refused_again_and_again_waits_longer_each_time(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure that can never be recorded (an operator's trigger; a settings row deleted by
    hand did it too, now refused) had the job released at once, every time: it ran about ten
    times a second, with a traceback each, for as long as the refusal lasted. It is held back
    for a delay that doubles with each refusal in a row (here from 0.1 s), the traceback
    logged once; once the refusal ends, the failure is recorded and counts."""
    logger, log = records
    monkeypatch.setattr(executor, "UNRECORDED_DELAY", 0.1)
    await conn.execute(
        """CREATE FUNCTION refuse_failures() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'no failures here'; END $$;
            CREATE TRIGGER refuse_failures BEFORE UPDATE ON pgqueue.jobs FOR EACH ROW
            WHEN (NEW.last_error IS NOT NULL) EXECUTE FUNCTION refuse_failures();"""
    )
    app = pgqueue.App()
    runs: list[float] = []

    @app.job("doomed", max_attempts=1)
    async def doomed(job: pgqueue.Job) -> None:
        runs.append(time.monotonic())
        raise ValueError("always")

    job_id = await app.enqueue(conn, "doomed")
    async with running(app, db_dsn, logger=logger) as worker:

        async def held_back_four_times() -> bool:
            # Not while a run's failure is being written: dropped between its refusal and
            # the plain failure written in its place, the trigger let that one land.
            state = await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job_id)
            return len(runs) >= 4 and state == "queued"

        await wait_until(held_back_four_times, what="four runs held back", within=10)
        await conn.execute("DROP TRIGGER refuse_failures ON pgqueue.jobs")
        await wait_for_states(conn, [job_id], "failed")
        held = worker._executor
        assert held is not None

        async def forgotten() -> bool:  # once the worker has the failure's reply
            return held.unrecorded == {}

        await wait_until(forgotten, what="the refusals forgotten")
    gaps = [later - earlier for earlier, later in itertools.pairwise(runs[:4])]
    assert all(gap >= wanted * 0.9 for gap, wanted in zip(gaps, (0.1, 0.2, 0.4), strict=True))
    for n, delay in ((1, "0.1s"), (2, "0.2s"), (3, "0.4s")):
        assert log.count(f"{n} time(s) in a row): runs again in {delay}") == 1
    held_back = [r for r in log.records if "could not record its outcome" in r.getMessage()]
    assert [r.exc_info is not None for r in held_back[:3]] == [True, False, False]
    row = await conn.fetchrow("SELECT attempts, last_error FROM pgqueue.jobs WHERE id = $1", job_id)
    assert row["attempts"] == 1 and "ValueError: always" in row["last_error"]


async def test_a_heartbeat_slower_than_its_period_still_reads_a_raised_stale_after(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """stale_after set so low (0.2 s: a beat every 0.05 s) that a beat takes longer than its
    period (here 0.1 s, a slow network's round trip): every beat, bounded by the period,
    timed out, so raising stale_after again never reached the worker. Beats are bounded by
    at least a second now."""
    logger, log = records
    set_stale_after = "UPDATE pgqueue.settings SET value = $1 WHERE name = 'stale_after'"
    await conn.execute(set_stale_after, "8 seconds")
    body = await conn.fetchval(
        "SELECT prosrc FROM pg_proc WHERE oid = 'pgqueue.heartbeat(text)'::regprocedure"
    )
    slow = body.replace("\nBEGIN\n", "\nBEGIN\n    PERFORM pg_sleep(0.1);\n", 1)
    assert slow != body
    await conn.execute(
        "CREATE OR REPLACE FUNCTION pgqueue.heartbeat(worker text) RETURNS int"
        f" LANGUAGE plpgsql AS $body${slow}$body$"
    )
    async with running(pgqueue.App(), db_dsn, logger=logger):
        await conn.execute(set_stale_after, "0.2 seconds")
        await wait_until(functools.partial(log.logged, "heartbeat every 0.05s (was 2.00s)"))
        await conn.execute(set_stale_after, "8 seconds")
        await wait_until(
            functools.partial(log.logged, "heartbeat every 2.00s (was 0.05s)"), within=5
        )


async def test_a_stale_after_raised_a_lot_and_lowered_again_reaches_the_worker_within_the_cap(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Raised to a day, stale_after set the period to six hours: lowered again, it reached the
    worker only when that sleep ended, while a dead worker's jobs stayed running and a worker
    started meanwhile recovered every job, the healthy ones too. The period is capped
    (MAX_PERIOD, here 1 s), so the lowered value arrives within it."""
    logger, log = records
    monkeypatch.setattr(heartbeat, "MAX_PERIOD", 1.0)
    set_stale_after = "UPDATE pgqueue.settings SET value = $1 WHERE name = 'stale_after'"
    await conn.execute(set_stale_after, "8 seconds")  # a period of 2 s, capped: 1 s
    app, release, _ = held_handler_app()
    job = await app.enqueue(conn, "long")
    lease = "SELECT locked_at FROM pgqueue.jobs WHERE id = $1 AND state = 'running'"
    async with running(app, db_dsn, logger=logger):
        await wait_for_states(conn, [job], "running")
        await conn.execute(set_stale_after, "1 day")  # 6 hours, capped: unchanged
        before = await conn.fetchval(lease, job)

        async def beaten() -> bool:  # a beat after the raise, which read it with the lease
            return bool(await conn.fetchval(lease, job) > before)

        await wait_until(beaten, what="a beat after the raise", within=5)
        await conn.execute(set_stale_after, "2 seconds")
        await wait_until(
            functools.partial(log.logged, "heartbeat every 0.50s (was 1.00s)"), within=5
        )
        release.set()
        await wait_for_states(conn, [job], "succeeded")
    assert log.count("stale_after is now") == 1  # the raise changed nothing


@pytest.mark.parametrize("how", ["stop(force=True)", "cancel run()"])
async def test_a_hard_stop_before_the_grace_period_gives_the_jobs_back_at_once(
    conn: asyncpg.Connection, db_dsn: str, how: str
) -> None:
    """stop(force=True) while jobs run (an embedding application's hard stop, or a second
    SIGTERM while the producer still winds down) was ignored until the grace period had
    begun, so the worker waited out the whole grace; it now releases at once. Cancelling
    run() is how asyncio.run and anyio.run stop it on Ctrl-C with handle_signals=False:
    worker.md says its running jobs are given back, their attempts not counted."""
    app = pgqueue.App()

    @app.job("long")
    async def long(job: pgqueue.Job) -> None:
        await anyio.sleep(60)

    job_id = await app.enqueue(conn, "long")
    worker = pgqueue.Worker(app, db_dsn, handle_signals=False, grace=30, poll_interval=0.5)
    with anyio.fail_after(10):  # the grace is 30 s
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await wait_for_states(conn, [job_id], "running")
            if how == "stop(force=True)":
                worker.stop(force=True)
            else:
                tg.cancel_scope.cancel()
    row = await conn.fetchrow(
        "SELECT state, attempts, locked_by FROM pgqueue.jobs WHERE id = $1", job_id
    )
    assert tuple(row) == ("queued", 0, None)  # released: the attempt not counted


def _gated_thread_app(
    timeout: float | None = None, max_attempts: int = 3
) -> tuple[pgqueue.App, threading.Event, list[int]]:
    """A plain def handler that blocks its thread until the event is set; each run is
    counted (by attempt number)."""
    app = pgqueue.App()
    gate = threading.Event()
    runs: list[int] = []

    @app.job("blocking", timeout=timeout, max_attempts=max_attempts)
    def blocking(job: pgqueue.Job) -> str:
        runs.append(job.attempts)
        if not gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return "done"

    return app, gate, runs


async def test_a_plain_def_still_running_after_the_grace_period_is_waited_for_not_released(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """A thread cannot be cancelled. The worker released its job at the end of the grace
    period while the thread ran on, so another worker (or the next job of its scope) could
    start beside it. The job now stays running under this worker, its lease kept, and the
    thread's outcome is recorded when it returns."""
    logger, log = records
    app, gate, runs = _gated_thread_app()
    job_id = await app.enqueue(conn, "blocking", scope={"site": 1})
    behind = await app.enqueue(conn, "blocking", scope={"site": 1})
    await conn.execute("UPDATE pgqueue.settings SET value = '2 seconds' WHERE name = 'stale_after'")
    worker = pgqueue.Worker(app, db_dsn, handle_signals=False, grace=0.2, logger=logger)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await wait_for_states(conn, [job_id], "running")
            worker.stop()
            await wait_until(functools.partial(log.logged, "waiting for 1 plain def handler"))
            row = await conn.fetchrow(
                "SELECT state, locked_by, (SELECT state FROM pgqueue.jobs WHERE id = $2) AS behind"
                " FROM pgqueue.jobs WHERE id = $1",
                job_id,
                behind,
            )
            assert tuple(row) == ("running", worker.id, "queued")
            # The heartbeat still runs (every 0.5 s): the lease stays fresh while the thread does.
            beat = await conn.fetchval("SELECT locked_at FROM pgqueue.jobs WHERE id = $1", job_id)
            await wait_until(
                functools.partial(
                    conn.fetchval,
                    "SELECT locked_at > $2 FROM pgqueue.jobs WHERE id = $1",
                    job_id,
                    beat,
                ),
                what="a heartbeat after the grace period",
            )
            gate.set()
            returned = time.monotonic()
    # Its outcome got the whole final window from the moment the thread returned, not what
    # was left of one begun at the end of the grace period.
    assert worker._executor is not None
    assert worker._executor.completer.give_up_at >= returned + FINAL_WRITE_WINDOW
    row = await conn.fetchrow(
        "SELECT state, attempts, result FROM pgqueue.jobs WHERE id = $1", job_id
    )
    assert tuple(row) == ("succeeded", 1, '"done"')
    assert runs == [1]  # the scope's next job was never started beside it
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", behind) == "queued"


async def test_waiting_for_a_plain_def_still_bounds_the_other_writes_of_the_shutdown(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the shutdown waited for a plain def, no final window had begun at all: the
    release of a cancelled async job whose row stayed locked was retried without end, and
    the worker never exited (review of session 10's first fix). The window now begins at
    the end of the grace period as before, and a thread returning later extends it."""
    from pgqueue.worker import worker as worker_module

    monkeypatch.setattr(worker_module, "FINAL_WRITE_WINDOW", 1.0)
    logger, log = records
    app, gate, _ = _gated_thread_app()

    @app.job("long")
    async def long(job: pgqueue.Job) -> None:
        await anyio.sleep(60)

    thread_job = await app.enqueue(conn, "blocking")
    async_job = await app.enqueue(conn, "long")
    locker = await asyncpg.connect(db_dsn)
    worker = pgqueue.Worker(app, db_dsn, handle_signals=False, grace=0.2, logger=logger)
    hung = False

    async def run_worker() -> None:
        await worker.run()
        tg.cancel_scope.cancel()  # the watchdog's job is done

    async def watchdog() -> None:
        """The writes are shielded: a hung worker cannot be cancelled, only let go of."""
        nonlocal hung
        await anyio.sleep(15)
        hung = True
        gate.set()
        await locker.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_worker)
        tg.start_soon(watchdog)
        await wait_for_states(conn, [thread_job, async_job], "running")
        await locker.execute("BEGIN")
        await locker.execute("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR UPDATE", async_job)
        worker.stop()
        await wait_until(functools.partial(log.logged, "waiting for 1 plain def"))
        gate.set()
    await locker.close()
    assert not hung, "the worker did not stop while a row it had to release stayed locked"
    assert log.count("gave up recording the release of job") == 1
    assert log.count("release not recorded (given up at shutdown)") == 1, log.text()
    assert not log.count("lease lost"), log.text()
    row = await conn.fetchrow("SELECT state, result FROM pgqueue.jobs WHERE id = $1", thread_job)
    assert tuple(row) == ("succeeded", '"done"')


async def test_a_plain_def_past_its_timeout_keeps_its_job_until_the_thread_returns(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """A plain def past its timeout was failed at the deadline and its thread abandoned: a
    retry (attempts left) could run beside the first run, still going, and the scope's next
    job could start. The job now stays running here until the thread returns; only then
    does the attempt fail as timed out, what the thread did discarded."""
    logger, log = records
    app, gate, runs = _gated_thread_app(timeout=0.2, max_attempts=1)
    job_id = await app.enqueue(conn, "blocking")
    async with running(app, db_dsn, logger=logger):
        await wait_until(functools.partial(log.logged, "past its timeout of 0.2s"))
        row = await conn.fetchrow("SELECT state, attempts FROM pgqueue.jobs WHERE id = $1", job_id)
        assert tuple(row) == ("running", 1)
        gate.set()
        await wait_for_states(conn, [job_id], "failed")
    row = await conn.fetchrow("SELECT result, last_error FROM pgqueue.jobs WHERE id = $1", job_id)
    assert row["result"] is None
    assert row["last_error"].startswith("timed out after 0.2s (a plain def cannot be interrupted")
    assert runs == [1]


async def test_result_with_next_jobs_creates_children(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    app = make_app()
    parent_id = await app.enqueue(conn, "parent")
    async with running(app, db_dsn):
        await wait_for_states(conn, [parent_id], "succeeded")
        children = await conn.fetch(
            "SELECT id, parent_id, job_type, queue, max_attempts FROM pgqueue.jobs"
            " WHERE id <> $1 ORDER BY id",
            parent_id,
        )
        await wait_for_states(conn, [c["id"] for c in children], "succeeded")
    assert [c["parent_id"] for c in children] == [parent_id, parent_id]
    # A follow-up of a registered type gets its queue and max_attempts, as enqueue does.
    assert (children[1]["job_type"], children[1]["queue"], children[1]["max_attempts"]) == (
        "elsewhere",
        "other",
        2,
    )


async def test_enqueue_options_and_registered_defaults(conn: asyncpg.Connection) -> None:
    app = pgqueue.App()

    @app.job("recalc", queue="recalc", max_attempts=3)
    async def recalc(job: pgqueue.Job) -> None: ...

    pipeline = uuid.uuid4()
    first = await app.enqueue(conn, "recalc", {"year": 2024}, scope={"site": 1}, dedup_key="k")
    again = await app.enqueue(conn, "recalc", {"year": 2024}, dedup_key="k")
    assert again == first
    later = await app.enqueue(
        conn,
        "recalc",
        queue="other",
        max_attempts=7,
        priority=5,
        pipeline_id=pipeline,
        run_after=datetime.now(UTC) + timedelta(hours=1),
        depends_on=[first],
    )
    row = await conn.fetchrow("SELECT * FROM pgqueue.jobs WHERE id = $1", first)
    assert (row["queue"], row["max_attempts"], json.loads(row["scope"])) == (
        "recalc",
        3,
        {"site": 1},
    )
    row = await conn.fetchrow("SELECT * FROM pgqueue.jobs WHERE id = $1", later)
    assert (row["queue"], row["max_attempts"], row["priority"]) == ("other", 7, 5)
    assert (row["pipeline_id"], row["state"]) == (pipeline, "waiting")

    many = await app.enqueue_many(conn, [{"job_type": "recalc"}, {"job_type": "x", "queue": "q"}])
    rows = await conn.fetch(
        "SELECT queue, max_attempts FROM pgqueue.jobs WHERE id = ANY($1) ORDER BY id", many
    )
    assert [(r["queue"], r["max_attempts"]) for r in rows] == [("recalc", 3), ("q", 5)]


async def test_scoped_jobs_run_in_order_without_waiting_for_the_poll(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    app = make_app()
    ids = [await app.enqueue(conn, "ok", {"i": i}, scope={"site": 1}) for i in range(3)]
    async with running(app, db_dsn, poll_interval=30):
        await wait_for_states(conn, ids, "succeeded", within=3)
    started = await conn.fetch("SELECT id FROM pgqueue.jobs ORDER BY started_at, id")
    assert [r["id"] for r in started] == ids


async def test_worker_claims_only_its_queues(conn: asyncpg.Connection, db_dsn: str) -> None:
    app = make_app()
    mine = await app.enqueue(conn, "ok", queue="a")
    other = await app.enqueue(conn, "ok", queue="b")
    async with running(app, db_dsn, queues=["a"]):
        await wait_for_states(conn, [mine], "succeeded")
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", other) == "queued"


async def test_worker_refuses_an_unmigrated_database(empty_db_dsn: str) -> None:
    with pytest.raises(SchemaError, match="pgqueue migrate"):
        await pgqueue.Worker(pgqueue.App(), empty_db_dsn, handle_signals=False).run()


def test_json_log_lines_carry_the_job_context() -> None:
    record = logging.LogRecord(
        "pgqueue.worker", logging.INFO, __file__, 1, "job %d done", (7,), None
    )
    record.job_id = 7
    record.duration_ms = 1.5
    line = json.loads(JsonFormatter().format(record))
    assert (line["msg"], line["job_id"], line["duration_ms"], line["level"]) == (
        "job 7 done",
        7,
        1.5,
        "info",
    )


@pytest.mark.parametrize("mode", ["always", "when_waiting"])
async def test_idle_workers_wake_for_each_job_in_either_notify_mode(
    conn: asyncpg.Connection, db_dsn: str, mode: str
) -> None:
    """With a 30 s poll, only notifications can deliver these jobs within the deadline; in
    when_waiting mode each one must reach a worker that registered before sleeping."""
    await conn.execute("UPDATE pgqueue.settings SET value = $1 WHERE name = 'notify'", mode)
    app = make_app()
    async with running(app, db_dsn, poll_interval=30), running(app, db_dsn, poll_interval=30):
        for i in range(20):
            job = await app.enqueue(conn, "ok", {"i": i})
            await wait_for_states(conn, [job], "succeeded", within=3)
        burst = [await app.enqueue(conn, "ok", {"i": i}) for i in range(50)]
        await wait_for_states(conn, burst, "succeeded", within=5)
        late = await app.enqueue(conn, "ok", {"i": "late"})
        await wait_for_states(conn, [late], "succeeded", within=3)
    waiting = await conn.fetchval("SELECT count(*) FROM pgqueue.notify_waiters")
    assert waiting <= (2 if mode == "when_waiting" else 0)


async def test_producer_stops_claiming_while_successes_pile_up_unwritten(
    conn: asyncpg.Connection, db_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot frees when its handler returns, before the success is written; the number of
    unwritten successes is capped (here at 1), so a stalled write stops the claiming."""
    from pgqueue.worker import executor

    monkeypatch.setattr(executor, "MAX_BATCH", 1)  # max_unwritten = max(concurrency, 1) = 1
    app = pgqueue.App()
    gate = anyio.Event()

    @app.job("gated")
    async def gated(job: pgqueue.Job) -> None:
        await gate.wait()

    first = await app.enqueue(conn, "gated")
    rest = [await app.enqueue(conn, "gated") for _ in range(3)]
    locker = await asyncpg.connect(db_dsn)
    async with running(app, db_dsn, concurrency=1, poll_interval=30):
        await wait_for_states(conn, [first], "running")
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR UPDATE", first)
            gate.set()  # the handler returns; its complete_many now waits for our row lock
            await wait_until_success_write_blocked(conn)
            # The slot is free but one success is unwritten: no further claim. Without the cap
            # the producer would claim the next job within milliseconds of the slot freeing.
            for _ in range(25):  # watch for 0.5 s
                queued = await conn.fetchval(
                    "SELECT count(*) FROM pgqueue.jobs WHERE id = ANY($1) AND state = 'queued'",
                    rest,
                )
                if queued != len(rest):
                    break
                await anyio.sleep(0.02)
            states = await conn.fetch("SELECT state FROM pgqueue.jobs WHERE id = ANY($1)", rest)
            assert {r["state"] for r in states} == {"queued"}
        await wait_for_states(conn, [first, *rest], "succeeded", within=5)
    await locker.close()


async def wait_until_success_write_blocked(conn: asyncpg.Connection) -> None:
    """Until a worker backend's ``complete_many`` waits for a lock."""

    async def blocked() -> bool:
        n = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'pgqueue-worker %'"
            " AND wait_event_type = 'Lock' AND query LIKE '%complete_many%'"
        )
        return bool(n)

    await wait_until(blocked, within=10, what="the success write waiting for our row lock")


async def test_a_job_claimed_back_while_its_stale_attempt_still_runs_is_not_run_twice(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """Leases are fenced by worker: when recovery requeues a job whose lease went stale while
    its handler still runs, the same worker may claim it back. The running attempt settles
    the new claim; the handler does not start a second time beside it (which also used to
    free the same slot twice)."""
    app = pgqueue.App()
    release = anyio.Event()
    runs: list[int] = []

    @app.job("long")
    async def long(job: pgqueue.Job) -> dict[str, int]:
        runs.append(job.attempts)
        await release.wait()
        return {"runs": len(runs)}

    job = await app.enqueue(conn, "long")
    logger, log = records
    async with running(app, db_dsn, concurrency=2, poll_interval=0.2, logger=logger) as worker:
        await wait_for_states(conn, [job], "running")
        await recover_as_stale(conn, job)

        async def claimed_back() -> bool:
            row = await conn.fetchrow(
                "SELECT state, attempts, locked_by FROM pgqueue.jobs WHERE id = $1", job
            )
            return tuple(row) == ("running", 2, worker.id)

        await wait_until(claimed_back, what="the worker claiming the job back")

        async def warned() -> bool:
            return log.count("claimed again (attempt 2)") > 0 or len(runs) > 1

        await wait_until(warned, what="the claim handled")
        release.set()
        await wait_for_states(conn, [job], "succeeded")
    assert runs == [1]
    assert log.count("claimed again (attempt 2)") > 0, log.text()
    row = await conn.fetchrow("SELECT attempts, result FROM pgqueue.jobs WHERE id = $1", job)
    assert (row["attempts"], json.loads(row["result"])) == (2, {"runs": 1})


async def test_a_claim_back_left_to_nobody_is_released_and_the_job_runs_again(
    conn: asyncpg.Connection,
    connect: Any,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    """The earlier attempt's success is refused (recovery had queued the job) and the worker
    claims the job back before that refusal reaches it: the claim is not started (the worker
    still holds the attempt), and once the refusal arrives nobody runs the job, while the
    heartbeat keeps its lease fresh. The worker must release such a claim and run the job.
    The refusal is held up deterministically: the lookup that follows a refused success
    waits on an advisory lock the test holds."""
    gate = await gate_refusal_lookup(conn, connect, monkeypatch)
    app, release, runs = held_handler_app()
    job = await app.enqueue(conn, "long")
    logger, log = records
    async with running(app, db_dsn, concurrency=2, poll_interval=0.2, logger=logger):
        await wait_for_states(conn, [job], "running")
        await refuse_the_success(conn, job, release)
        await wait_until(
            lambda: log.logged("claimed again (attempt 2)"), what="the claim back, not started"
        )
        await gate.execute("SELECT pg_advisory_unlock(4242)")
        await wait_for_states(conn, [job], "succeeded")
    assert runs == [1, 2]
    assert log.count("which does not hold it") > 0, log.text()


@pytest.mark.parametrize("outcome", ["success", "failure"])
async def test_an_attempt_settled_while_its_claim_back_is_on_its_way_is_not_run_again(
    conn: asyncpg.Connection,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
    outcome: str,
) -> None:
    """The worker claims back a job whose lease went stale while its handler still runs, and
    the handler returns before the claim's reply is handled: the earlier attempt's outcome
    lands on the new claim (fencing is by worker) and settles it. Starting the claim then
    would run the handler a second time after the job's success or failure (a retried
    failure would also let another worker run it meanwhile). The reply is held up
    deterministically: the producer's claim waits, after its statement returned, for the
    test to let it go."""
    app = pgqueue.App()
    release = anyio.Event()
    runs: list[int] = []

    @app.job("long", max_attempts=2)  # recovery requeues attempt 1; attempt 2 is the last
    async def long(job: pgqueue.Job) -> None:
        runs.append(job.attempts)
        await release.wait()
        if outcome == "failure":
            raise RuntimeError("the earlier attempt fails")

    job = await app.enqueue(conn, "long")
    claim_back_returned, let_go = hold_up_claim(monkeypatch, job, attempt=2)
    logger, log = records
    async with running(app, db_dsn, concurrency=2, poll_interval=0.2, logger=logger) as worker:
        await wait_for_states(conn, [job], "running")
        await recover_as_stale(conn, job)
        with anyio.fail_after(10):
            await claim_back_returned.wait()
        row = await conn.fetchrow(
            "SELECT state, attempts, locked_by FROM pgqueue.jobs WHERE id = $1", job
        )
        assert tuple(row) == ("running", 2, worker.id)
        release.set()  # attempt 1 returns; its outcome lands on the claim of attempt 2
        settled = "succeeded" if outcome == "success" else "failed"
        await wait_for_states(conn, [job], settled)
        # Logged right before the worker lets go of the attempt, with no await in between:
        # from here the worker no longer holds the job when the claim's reply is handled.
        await wait_until(lambda: log.outcome_logged(job), what="attempt 1's outcome")
        let_go.set()

        async def handled() -> bool:
            return log.count("claimed again (attempt 2)") > 0 or len(runs) > 1

        await wait_until(handled, what="the claim back handled")
        await anyio.sleep(0.3)  # a second run, if started, would show in the meantime
        assert runs == [1], log.text()
        assert log.count("was being settled") == 1, log.text()
        row = await conn.fetchrow(
            "SELECT state, attempts, locked_by FROM pgqueue.jobs WHERE id = $1", job
        )
        assert tuple(row) == (settled, 2, worker.id)


async def test_a_refusal_that_arrives_while_the_claim_back_is_on_its_way_leaves_no_job_behind(
    conn: asyncpg.Connection,
    connect: Any,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    """As above, but the earlier attempt's success was refused before the claim back committed
    (recovery had queued the job), and the refusal reaches the worker while the claim's reply
    is held up. The claim is not started (the worker cannot tell a refusal before the claim
    from an outcome that landed on it), so nobody runs the job while the heartbeat keeps its
    lease fresh: the worker must release it and run the job again."""
    gate = await gate_refusal_lookup(conn, connect, monkeypatch)
    app, release, runs = held_handler_app()
    job = await app.enqueue(conn, "long")
    claim_back_returned, let_go = hold_up_claim(monkeypatch, job, attempt=2)
    logger, log = records
    async with running(app, db_dsn, concurrency=2, poll_interval=0.2, logger=logger):
        await wait_for_states(conn, [job], "running")
        await refuse_the_success(conn, job, release)
        with anyio.fail_after(10):
            await claim_back_returned.wait()
        await gate.execute("SELECT pg_advisory_unlock(4242)")
        await wait_until(lambda: log.logged("lease lost"), what="the refusal reaching the worker")
        let_go.set()
        await wait_for_states(conn, [job], "succeeded")
    assert runs == [1, 2], log.text()
    assert log.count("was being settled") > 0, log.text()
    assert log.count("which does not hold it") > 0, log.text()


def hold_up_claim(
    monkeypatch: pytest.MonkeyPatch, job: int, *, attempt: int
) -> tuple[anyio.Event, anyio.Event]:
    """Hold up the producer's claim that takes ``attempt`` of ``job`` after its statement
    returned (the claim committed) and before its jobs are started, until the test sets the
    second event; the first is set when the claim returned."""
    original = Producer._claim
    returned, let_go = anyio.Event(), anyio.Event()

    async def held_up(self: Producer, batch_size: int, *, wait: bool) -> list[pgqueue.Job] | None:
        jobs = await original(self, batch_size, wait=wait)
        if jobs and any(j.id == job and j.attempts == attempt for j in jobs):
            returned.set()
            await let_go.wait()
        return jobs

    monkeypatch.setattr(Producer, "_claim", held_up)
    return returned, let_go


async def test_a_claim_left_to_nobody_is_released_while_every_slot_is_busy(
    conn: asyncpg.Connection,
    connect: Any,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    """A claim back left to nobody (its earlier attempt's success refused, the refusal
    arriving after the claim) is released even while every slot is busy: the worker must
    not wait for a slot to free before it gives the job back, since until then nobody runs
    it and the heartbeat keeps its lease fresh, so no other worker can take it either."""
    gate = await gate_refusal_lookup(conn, connect, monkeypatch)
    app, release, runs = held_handler_app()
    let_busy_go = anyio.Event()

    @app.job("busy")
    async def busy(job: pgqueue.Job) -> None:
        await let_busy_go.wait()

    job = await app.enqueue(conn, "long")
    first_busy = await app.enqueue(conn, "busy")
    logger, log = records
    async with running(app, db_dsn, concurrency=2, poll_interval=0.2, logger=logger):
        await wait_for_states(conn, [job, first_busy], "running")
        await refuse_the_success(conn, job, release)
        await wait_until(
            lambda: log.logged("claimed again (attempt 2)"), what="the claim back, not started"
        )
        second_busy = await app.enqueue(conn, "busy")  # takes the slot the job's handler left
        await wait_for_states(conn, [second_busy], "running")
        await gate.execute("SELECT pg_advisory_unlock(4242)")  # the refusal arrives
        await wait_for_states(conn, [job], "queued")
        states = await conn.fetch(
            "SELECT state FROM pgqueue.jobs WHERE id = ANY($1)", [first_busy, second_busy]
        )
        assert [r["state"] for r in states] == ["running", "running"]
        let_busy_go.set()
        await wait_for_states(conn, [job, first_busy, second_busy], "succeeded")
    assert runs == [1, 2]
    assert log.count("which does not hold it") > 0, log.text()


async def test_an_outcome_the_database_lost_is_released_while_every_slot_is_busy(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """From a crash review (synchronous_commit off): a success the database acknowledged and
    then lost in a crash put the job back in running under its live worker, whose heartbeat
    renewed that lease for as long as it lived: never recovered, and its scope (and a join
    waiting on it) blocked behind it. A beat renewing more leases than the worker holds now
    has the producer release what nobody runs, with every slot busy too."""
    await conn.execute("UPDATE pgqueue.settings SET value = '2 seconds' WHERE name = 'stale_after'")
    app = pgqueue.App()
    runs: list[int] = []
    let_busy_go = anyio.Event()

    @app.job("once")
    async def once(job: pgqueue.Job) -> None:
        runs.append(job.id)

    @app.job("busy")
    async def busy(job: pgqueue.Job) -> None:
        await let_busy_go.wait()

    logger, log = records
    async with running(app, db_dsn, concurrency=2, poll_interval=0.2, logger=logger):
        job = await app.enqueue(conn, "once")
        await wait_for_states(conn, [job], "succeeded")
        others = [await app.enqueue(conn, "busy") for _ in range(2)]
        await wait_for_states(conn, others, "running")
        # What a lost commit of the success leaves: the row as its claim wrote it.
        await conn.execute(
            "UPDATE pgqueue.jobs SET state = 'running', finished_at = NULL, result = NULL,"
            " locked_at = now() WHERE id = $1",
            job,
        )
        await wait_for_states(conn, [job], "queued", within=5)
        let_busy_go.set()
        await wait_for_states(conn, [job, *others], "succeeded")
    assert runs == [job, job]
    assert log.count("or an outcome the database lost); released") == 1, log.text()


async def test_a_claim_back_left_to_nobody_is_released_when_the_worker_stops(
    conn: asyncpg.Connection,
    connect: Any,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    """As above, but the worker is told to stop while the claim's reply is held up, so there
    is no next claim to sweep before: the sweep still owed runs before the worker exits.
    Without it the job stays running under a worker that is gone, until stale recovery
    requeues it and counts the attempt (on its last attempt it would end failed unrun)."""
    gate = await gate_refusal_lookup(conn, connect, monkeypatch)
    app, release, runs = held_handler_app()
    job = await app.enqueue(conn, "long")
    claim_back_returned, let_go = hold_up_claim(monkeypatch, job, attempt=2)
    logger, log = records
    async with running(app, db_dsn, concurrency=2, poll_interval=0.2, logger=logger) as worker:
        await wait_for_states(conn, [job], "running")
        await refuse_the_success(conn, job, release)
        with anyio.fail_after(10):
            await claim_back_returned.wait()
        await gate.execute("SELECT pg_advisory_unlock(4242)")
        await wait_until(lambda: log.logged("lease lost"), what="the refusal reaching the worker")
        worker.stop()
        let_go.set()
    row = await conn.fetchrow(
        "SELECT state, attempts, locked_by FROM pgqueue.jobs WHERE id = $1", job
    )
    assert tuple(row) == ("queued", 1, None), log.text()  # released: attempt 2 not counted
    assert runs == [1]
    assert log.count("was being settled") == 1, log.text()
    assert log.count("which does not hold it") == 1, log.text()


async def test_the_heartbeat_beats_while_every_pooled_connection_waits_on_a_locked_row(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """A failure whose row another transaction holds keeps a pooled connection for up to the
    write timeout (30 s). Enough of them took the whole pool, and the heartbeat, which waits
    for a pooled connection within its period, missed beat after beat: the leases of this
    worker's healthy jobs went stale and recovery handed them to other workers while they
    still ran here. The heartbeat has a connection of its own now."""
    app = pgqueue.App()
    go, done = anyio.Event(), anyio.Event()

    @app.job("fails", max_attempts=1)
    async def fails(job: pgqueue.Job) -> None:
        await go.wait()
        raise RuntimeError("fails while its row is locked")

    @app.job("long")
    async def long(job: pgqueue.Job) -> None:
        await done.wait()

    failing = [await app.enqueue(conn, "fails") for _ in range(20)]  # more than the pool holds
    healthy = await app.enqueue(conn, "long")
    await conn.execute("UPDATE pgqueue.settings SET value = '2 seconds' WHERE name = 'stale_after'")
    blocker = await asyncpg.connect(db_dsn)
    async with running(app, db_dsn, concurrency=len(failing) + 1):
        try:
            await wait_for_states(conn, [*failing, healthy], "running")
            await blocker.execute("BEGIN")
            await blocker.execute(
                "SELECT 1 FROM pgqueue.jobs WHERE id = ANY($1) FOR UPDATE", failing
            )
            go.set()

            async def pool_taken() -> bool:
                """Every pooled connection but the producer's (kept for its claims) waits
                on a failure's row, and the pool is at its size (10 + 2 here; 10 + 3 when
                the heartbeat shared it)."""
                row = await conn.fetchrow(
                    "SELECT count(*) AS n, count(*) FILTER (WHERE wait_event_type = 'Lock'"
                    "  AND query LIKE '%pgqueue._fail(%') AS waiting"
                    " FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name LIKE 'pgqueue-worker %'"
                )
                return bool(row["waiting"] == row["n"] - 1 and row["waiting"] >= 11)

            await wait_until(pool_taken, what="every pooled connection waiting on a failure's row")
            lease = await conn.fetchval("SELECT locked_at FROM pgqueue.jobs WHERE id = $1", healthy)
            await wait_until(
                functools.partial(
                    conn.fetchval,
                    "SELECT locked_at > $2 FROM pgqueue.jobs WHERE id = $1",
                    healthy,
                    lease,
                ),
                within=5,  # beats every 0.5 s
                what="a heartbeat while the pool is taken",
            )
            await blocker.execute("ROLLBACK")
            await wait_for_states(conn, failing, "failed")
            done.set()
            await wait_for_states(conn, [healthy], "succeeded")
        finally:
            done.set()
            await blocker.close()  # its locks go with it, so the worker can stop


@pytest.mark.parametrize(
    "delay", [float("nan"), float("inf"), 1e20, 1e12, -3600, timedelta(seconds=-30)]
)
async def test_enqueue_refuses_a_delay_that_is_no_number_of_seconds(
    conn: asyncpg.Connection, delay: float | timedelta
) -> None:
    """NaN reached PostgreSQL as an interval; inf and 1e20 raised from timedelta itself; 1e12
    was stored (year 33715: the row could no longer be read into Python), and a negative
    delay jumped the job ahead of older ones. As the CLI, Snooze and backoff: 0 to 100 years."""
    with pytest.raises(ValueError, match="delay must be from 0 seconds to 100 years"):
        await pgqueue.App().enqueue(conn, "x", delay=delay)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0


async def test_an_error_whose_traceback_cannot_be_formatted_still_fails_its_attempt(
    conn: asyncpg.Connection, db_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPython 3.11 formats a traceback with ast.parse, which raises SystemError while other
    threads parse (gh-106905). That escaped the attempt: its outcome went unrecorded, the job
    was released uncounted and failed the same way again, with no end."""
    formatted = traceback.format_exception

    def format_exception(exc: BaseException, *args: Any, **kwargs: Any) -> list[str]:
        if "unformattable" in str(exc):
            raise SystemError("AST constructor recursion depth mismatch (before=45, after=167)")
        return formatted(exc, *args, **kwargs)

    monkeypatch.setattr(executor.traceback, "format_exception", format_exception)
    app = pgqueue.App()

    @app.job("fails", max_attempts=2)
    async def fails(job: pgqueue.Job) -> None:
        raise ValueError("unformattable")

    await conn.execute(
        "UPDATE pgqueue.settings SET value = '1 millisecond' WHERE name = 'backoff_base'"
    )
    job = await app.enqueue(conn, "fails")
    async with running(app, db_dsn):
        await wait_for_states(conn, [job], "failed", within=10)
    row = await conn.fetchrow("SELECT attempts, last_error FROM pgqueue.jobs WHERE id = $1", job)
    assert row["attempts"] == 2
    assert row["last_error"].endswith("ValueError: unformattable"), row["last_error"]
    assert "formatting it raised SystemError: AST constructor" in row["last_error"]
    assert 'in fails\n    raise ValueError("unformattable")' in row["last_error"]


async def test_a_delay_counts_from_the_call_not_from_the_start_of_the_transaction(
    conn: asyncpg.Connection,
) -> None:
    """Measured from now(), a delay of 5 s in a transaction open for 3 s made the job due
    2 s after its commit."""
    async with conn.transaction():
        started = await conn.fetchval("SELECT now()")
        await conn.execute("SELECT pg_sleep(0.3)")
        job = await pgqueue.App().enqueue(conn, "x", delay=1)
    run_after = await conn.fetchval("SELECT run_after FROM pgqueue.jobs WHERE id = $1", job)
    assert run_after - started >= timedelta(seconds=1.3)


async def test_a_handler_saves_progress_and_its_next_attempt_goes_on_from_there(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """``job.progress`` is the last checkpoint an earlier attempt saved, from an async handler
    or (through anyio's portal) a plain def; only the job the handler was given is saved."""
    app = pgqueue.App()
    seen: dict[str, list[Any]] = {"async": [], "thread": []}

    @app.job("pages", max_attempts=2)
    async def pages(job: pgqueue.Job) -> Any:
        seen["async"].append(job.progress)
        if job.attempts == 1:
            assert await job.save_progress({"page": 7}) is True
            other = dataclasses.replace(job, id=job.id + 1000)  # not the job it runs
            assert await other.save_progress({"page": 0}) is False
            raise RuntimeError("the connection dropped at page 8")
        return job.progress

    @app.job("pages_in_thread", max_attempts=2)
    def pages_in_thread(job: pgqueue.Job) -> Any:
        seen["thread"].append(job.progress)
        if job.attempts == 1:
            assert anyio.from_thread.run(job.save_progress, ["a", "b"]) is True
            raise RuntimeError("stopped after b")
        return job.progress

    await conn.execute(
        "UPDATE pgqueue.settings SET value = '1 millisecond' WHERE name = 'backoff_base'"
    )
    ids = [await app.enqueue(conn, name) for name in ("pages", "pages_in_thread")]
    async with running(app, db_dsn):
        await wait_for_states(conn, ids, "succeeded")
    results = await conn.fetch(
        "SELECT result::text FROM pgqueue.jobs WHERE id = ANY($1) ORDER BY id", ids
    )
    assert [r["result"] and json.loads(r["result"]) for r in results] == [
        {"page": 7},
        ["a", "b"],
    ], (results, seen)
    assert seen == {"async": [None, {"page": 7}], "thread": [None, ["a", "b"]]}


async def test_save_progress_outside_a_worker_says_where_it_works() -> None:
    job = pgqueue.Job(id=5, job_type="t", queue="q", payload={}, attempts=1, max_attempts=1)
    with pytest.raises(RuntimeError, match="job 5: save_progress works inside a handler"):
        await job.save_progress({"page": 1})


async def test_a_task_an_attempt_left_behind_cannot_overwrite_the_next_attempts_progress(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """The SQL fence is by worker: a task the first attempt left running saves after the
    same worker claimed the retry. Only the Job the running attempt was given may save."""
    app = pgqueue.App()
    second_saved = anyio.Event()
    saved: dict[str, bool] = {}
    left_behind: list[asyncio.Task[None]] = []

    @app.job("leaky", max_attempts=2)
    async def leaky(job: pgqueue.Job) -> None:
        if job.attempts == 1:

            async def late() -> None:
                await second_saved.wait()
                saved["attempt 1, late"] = await job.save_progress({"by": "attempt 1"})

            left_behind.append(asyncio.get_running_loop().create_task(late()))
            raise RuntimeError("the first attempt fails, its task runs on")
        saved["attempt 2"] = await job.save_progress({"by": "attempt 2"})
        second_saved.set()
        await left_behind[0]

    await conn.execute(
        "UPDATE pgqueue.settings SET value = '1 millisecond' WHERE name = 'backoff_base'"
    )
    job_id = await app.enqueue(conn, "leaky")
    async with running(app, db_dsn):
        await wait_for_states(conn, [job_id], "succeeded")
    assert saved == {"attempt 2": True, "attempt 1, late": False}
    progress = await conn.fetchval("SELECT progress::text FROM pgqueue.jobs WHERE id = $1", job_id)
    assert json.loads(progress) == {"by": "attempt 2"}


async def test_save_progress_behind_a_locked_row_fails_instead_of_holding_a_connection(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """An open transaction holding the job's row (psql, SELECT ... FOR UPDATE) made the save
    wait as long as it lasted, on a pooled connection claims and outcome writes need."""
    app = pgqueue.App()
    started, locked = anyio.Event(), anyio.Event()
    raised: list[BaseException] = []

    @app.job("saver", max_attempts=1)
    async def saver(job: pgqueue.Job) -> str:
        started.set()
        await locked.wait()
        try:
            await job.save_progress({"page": 1})
        except Exception as exc:
            raised.append(exc)
        return "went on"

    job_id = await app.enqueue(conn, "saver")
    async with running(app, db_dsn):
        await started.wait()
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR UPDATE", job_id)
            locked.set()

            async def save_gave_up() -> bool:
                return bool(raised)

            await wait_until(save_gave_up, within=10, what="the save to give up on the lock")
        await wait_for_states(conn, [job_id], "succeeded")
    assert [type(e) for e in raised] == [asyncpg.exceptions.LockNotAvailableError]


async def test_wait_for_job_returns_each_final_outcome(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """The application side of a job: what it ended with, awaited without a worker's help
    (procrastinate #370). A pool or a connection outside a transaction; never inside one."""
    app = make_app()
    ok = await app.enqueue(conn, "ok", {"n": 2}, max_attempts=1)
    boom = await app.enqueue(conn, "boom", max_attempts=1)
    waiting = await app.enqueue(conn, "ok", depends_on=[boom])  # cancelled when boom fails
    pending = await pgqueue.job_outcome(conn, ok)
    assert pending is not None and (pending.state, pending.done) == ("queued", False)
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.2):  # no worker yet: it waits
            await pgqueue.wait_for_job(conn, ok)
    async with running(app, db_dsn):
        pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=2)
        try:
            with anyio.fail_after(15):
                done = await pgqueue.wait_for_job(pool, ok)
                failed = await pgqueue.wait_for_job(conn, boom)
                cancelled = await pgqueue.wait_for_job(conn, waiting)
        finally:
            await pool.close()
    assert (done.state, done.result, done.done) == (
        "succeeded",
        {"echo": {"n": 2}, "attempt": 1},
        True,
    )
    assert failed.state == "failed" and "ValueError: boom goes the handler" in str(
        failed.last_error
    )
    assert cancelled.state == "cancelled" and cancelled.result is None
    assert done.finished_at is not None
    with pytest.raises(LookupError, match="no job 999999"):
        await pgqueue.wait_for_job(conn, 999999)
    with pytest.raises(LookupError, match="no job 9223372036854775808"):  # past bigint
        await pgqueue.wait_for_job(conn, 2**63)
    with pytest.raises(ValueError, match="max_interval must be a positive number"):
        await pgqueue.wait_for_job(conn, ok, max_interval=float("inf"))  # slept forever
    async with conn.transaction():
        with pytest.raises(RuntimeError, match="would wait for its own commit"):
            await pgqueue.wait_for_job(conn, ok)
        with pytest.raises(TypeError, match="a job id must be an integer"):
            await pgqueue.wait_for_job(conn, "7")  # type: ignore[arg-type]


async def test_queues_no_handler_is_registered_to_are_named_at_start(
    db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """`--queues recalcs` for `recalc`: the worker idled without a word."""
    logger, log = records
    app = make_app()  # its handlers are registered to 'default'
    app.periodic("ok", cron="0 0 1 1 *", queue="yearly")  # a schedule's queue counts too
    async with running(app, db_dsn, queues=["default", "defualt", "yearly"], logger=logger):
        pass
    warnings = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert warnings == [
        "queue(s) defualt: no handler or schedule of this app is registered to them; only"
        " jobs enqueued there with an explicit queue will be claimed"
    ]


async def test_a_handler_that_raises_snooze_runs_again_later_without_spending_an_attempt(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """max_attempts 1: a snooze counted as an attempt would end the job failed. An async and
    a plain def handler each snooze twice, then succeed; a bad delay fails the attempt."""
    logger, log = records
    app = pgqueue.App()
    runs: dict[str, list[float]] = {"async": [], "def": []}

    @app.job("snoozes", max_attempts=1)
    async def snoozes(job: pgqueue.Job) -> int:
        runs["async"].append(time.monotonic())
        if len(runs["async"]) < 3:
            raise pgqueue.Snooze(0.3)
        return job.attempts

    @app.job("snoozes_in_thread", max_attempts=1)
    def snoozes_in_thread(job: pgqueue.Job) -> int:
        runs["def"].append(time.monotonic())
        if len(runs["def"]) < 3:
            raise pgqueue.Snooze(timedelta(seconds=0.3))
        return job.attempts

    @app.job("bad_delay", max_attempts=1)
    async def bad_delay(job: pgqueue.Job) -> None:
        raise pgqueue.Snooze(-1)

    ids = [await app.enqueue(conn, t) for t in ("snoozes", "snoozes_in_thread", "bad_delay")]
    async with running(app, db_dsn, poll_interval=0.1, logger=logger):
        await wait_for_states(conn, ids[:2], "succeeded")
        await wait_for_states(conn, ids[2:], "failed")
    rows = await conn.fetch(
        "SELECT id, attempts, result::text, last_error FROM pgqueue.jobs ORDER BY id"
    )
    assert [(r["attempts"], r["result"]) for r in rows[:2]] == [(1, "1"), (1, "1")]
    assert "Snooze delay must be from 0 seconds to 100 years, got -1" in rows[2]["last_error"]
    for kind in runs:
        gaps = [b - a for a, b in itertools.pairwise(runs[kind])]
        assert len(gaps) == 2 and min(gaps) >= 0.25, (kind, gaps)
    assert log.outcomes(ids[0]) == ["snoozed", "snoozed", "succeeded"]
    assert log.count("snoozed in") == 4 and log.count(": runs again in 0.3s") == 4


async def test_snoozes_from_a_handlers_task_group_snooze_the_job_for_the_longest_delay(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """A task group raises what its tasks raised as an ExceptionGroup: Snoozes alone (nested
    groups too) snooze the job for the longest of their delays; a Snooze beside an error
    fails the attempt with the error."""
    logger, log = records
    app = pgqueue.App()
    runs: list[float] = []

    async def snooze(seconds: float) -> None:
        raise pgqueue.Snooze(seconds)

    async def snooze_in_tasks(seconds: float) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(snooze, seconds)

    @app.job("snoozes_in_tasks", max_attempts=1)
    async def snoozes_in_tasks(job: pgqueue.Job) -> int:
        runs.append(time.monotonic())
        if len(runs) == 1:
            async with anyio.create_task_group() as tg:
                tg.start_soon(snooze, 0.1)
                tg.start_soon(snooze_in_tasks, 0.6)  # a group inside the group
        return len(runs)

    @app.job("snooze_and_error", max_attempts=1)
    async def snooze_and_error(job: pgqueue.Job) -> None:
        async def error() -> None:
            raise ValueError("the real problem")

        async with anyio.create_task_group() as tg:
            tg.start_soon(snooze, 0.1)
            tg.start_soon(error)

    ids = [await app.enqueue(conn, t) for t in ("snoozes_in_tasks", "snooze_and_error")]
    async with running(app, db_dsn, poll_interval=0.1, logger=logger):
        await wait_for_states(conn, ids[:1], "succeeded")
        await wait_for_states(conn, ids[1:], "failed")
    assert len(runs) == 2 and runs[1] - runs[0] >= 0.55, runs
    assert log.outcomes(ids[0]) == ["snoozed", "succeeded"]
    assert log.count(": runs again in 0.6s") == 1
    error = await conn.fetchval("SELECT last_error FROM pgqueue.jobs WHERE id = $1", ids[1])
    assert "ValueError: the real problem" in error


async def test_until_empty_stops_after_what_is_due_and_what_it_made_due(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """A fan-out's children and join (due only once the parent and then the children are
    done) run before the worker stops; so do a slow job and a retried one. The safety poll is
    a minute: the worker stops because the last outcome it wrote woke it for a final claim,
    which found nothing. A job scheduled later stays queued; an idle worker stops at once."""
    logger, log = records
    app = pgqueue.App()
    tries: list[int] = []

    @app.job("leaf")
    async def leaf(job: pgqueue.Job) -> None:
        return None

    @app.job("parent")
    async def parent(job: pgqueue.Job) -> pgqueue.Result:
        return pgqueue.Result(None).fan_out([{"job_type": "leaf"}] * 3, join={"job_type": "leaf"})

    @app.job("slow")
    async def slow(job: pgqueue.Job) -> None:
        await anyio.sleep(0.5)

    @app.job("flaky", max_attempts=2, backoff=0)  # due again at once
    async def flaky(job: pgqueue.Job) -> None:
        tries.append(job.attempts)
        if job.attempts == 1:
            raise RuntimeError("once")

    for job_type in ("parent", "slow", "flaky"):
        await app.enqueue(conn, job_type)
    later = await app.enqueue(conn, "leaf", delay=3600)
    worker = pgqueue.Worker(
        app, db_dsn, handle_signals=False, logger=logger, poll_interval=60, until_empty=True
    )
    with anyio.fail_after(20):
        await worker.run()
    states = dict(await conn.fetch("SELECT id, state FROM pgqueue.jobs"))
    assert states.pop(later) == "queued"
    assert set(states.values()) == {"succeeded"} and len(states) == 3 + 3 + 1, states
    assert tries == [1, 2]
    assert log.count("stopping (until empty)") == 1

    idle = pgqueue.Worker(
        app, db_dsn, handle_signals=False, logger=logger, poll_interval=60, until_empty=True
    )
    with anyio.fail_after(10):
        await idle.run()
    assert log.count("stopping (until empty)") == 2


async def test_until_empty_recovers_first_runs_no_schedules_and_leaves_no_registration(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """A run from cron: a job an earlier run left running (its lease stale) is recovered
    before the first claim and runs in this run, and a job finished past prune_after is
    deleted; a schedule of the app enqueues nothing (the
    run lasts past one of its ticks); in when_waiting mode, the last claim does not register
    the worker as waiting (the row would outlive it, and make producers notify nobody)."""
    logger, log = records
    await conn.execute(
        "UPDATE pgqueue.settings SET value = CASE name WHEN 'notify' THEN 'when_waiting'"
        " ELSE '1 millisecond' END WHERE name IN ('notify', 'backoff_base', 'backoff_cap')"
    )
    app = pgqueue.App()
    ran: list[int] = []

    @app.job("slow")
    async def slow(job: pgqueue.Job) -> None:
        ran.append(job.id)
        await anyio.sleep(1.2)  # past a tick of the schedule

    app.periodic("slow", every=1, name="often")
    await conn.execute(
        "INSERT INTO pgqueue.jobs (job_type, state, attempts, finished_at)"
        " VALUES ('slow', 'succeeded', 1, now() - interval '8 days')"
    )
    left = await app.enqueue(conn, "slow")
    await conn.execute(
        "UPDATE pgqueue.jobs SET state = 'running', attempts = 1, locked_by = 'killed-run',"
        " locked_at = now() - interval '1 hour', started_at = now() - interval '1 hour'"
        " WHERE id = $1",
        left,
    )
    worker = pgqueue.Worker(
        app, db_dsn, handle_signals=False, logger=logger, poll_interval=60, until_empty=True
    )
    with anyio.fail_after(20):
        await worker.run()
    assert ran == [left]
    assert log.count("recovered 1 stale job(s)") == 1
    assert log.count("pruned 1 finished job(s) past settings.prune_after") == 1
    row = await conn.fetchrow("SELECT state, attempts FROM pgqueue.jobs WHERE id = $1", left)
    assert tuple(row) == ("succeeded", 2)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1  # no tick enqueued
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.notify_waiters") == 0


def test_snooze_takes_seconds_or_a_timedelta_and_refuses_anything_else() -> None:
    assert pgqueue.Snooze(2).delay == timedelta(seconds=2)
    assert pgqueue.Snooze(0.5).delay == timedelta(seconds=0.5)
    assert pgqueue.Snooze(Fraction(1, 4)).delay == timedelta(seconds=0.25)
    assert pgqueue.Snooze(timedelta(minutes=1)).delay == timedelta(minutes=1)
    assert pgqueue.Snooze(0).delay == timedelta(0)
    century = timedelta(days=36500)
    assert pgqueue.Snooze(century).delay == pgqueue.Snooze(century.total_seconds()).delay
    too_big = (10**400, century.total_seconds() + 1, century + timedelta(microseconds=1))
    for bad in (-1, float("nan"), float("inf"), timedelta(seconds=-1), *too_big):
        with pytest.raises(ValueError, match="Snooze delay must be from 0 seconds to 100 years"):
            pgqueue.Snooze(bad)
    for wrong in (True, "5", None, Decimal(5)):
        with pytest.raises(TypeError, match="Snooze delay must be seconds or a timedelta"):
            pgqueue.Snooze(wrong)  # type: ignore[arg-type]
    snooze = pgqueue.Snooze(30)
    assert pickle.loads(pickle.dumps(snooze)).delay == copy.copy(snooze).delay == snooze.delay
    assert str(snooze) == "snooze for 0:00:30"


async def test_a_snooze_postgresql_refuses_fails_the_attempt_instead(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """Given back at once instead, uncounted, the job ran and snoozed again in a loop
    max_attempts never ended (654 runs in 3 s when a reviewer tried)."""
    logger, log = records
    await conn.execute(
        """CREATE FUNCTION no_far_snoozes() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.run_after > now() + interval '1 day' THEN
                RAISE EXCEPTION 'run_after too far for this shop';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER no_far_snoozes BEFORE UPDATE ON pgqueue.jobs
            FOR EACH ROW EXECUTE FUNCTION no_far_snoozes()"""
    )
    app = pgqueue.App()
    runs: list[int] = []

    @app.job("far", max_attempts=2)
    async def far(job: pgqueue.Job) -> None:
        runs.append(job.attempts)
        raise pgqueue.Snooze(timedelta(days=2))

    job = await app.enqueue(conn, "far")
    await conn.execute(
        "UPDATE pgqueue.settings SET value = '1 millisecond'"
        " WHERE name IN ('backoff_base', 'backoff_cap')"
    )
    async with running(app, db_dsn, poll_interval=0.1, logger=logger):
        await wait_for_states(conn, [job], "failed")
    assert runs == [1, 2]
    error = await conn.fetchval("SELECT last_error FROM pgqueue.jobs WHERE id = $1", job)
    assert error == "could not snooze the job: run_after too far for this shop"
    assert log.count("could not snooze it (RaiseError: run_after too far for this shop)") == 2


async def test_a_snooze_of_a_job_aborted_meanwhile_is_logged_as_cancelled(
    conn: asyncpg.Connection,
    db_dsn: str,
    empty_db_dsn: str,
    records: tuple[logging.Logger, Records],
) -> None:
    logger, log = records
    app = pgqueue.App()

    async def abort(job_id: int) -> None:
        other = await asyncpg.connect(db_dsn)
        try:
            await other.fetchval("SELECT pgqueue.abort($1)", job_id)
        finally:
            await other.close()

    # A plain def handler, in a thread: the worker cannot cancel it on the abort's notice (an
    # async one could be cancelled before it raised Snooze: "failed (cancelled)", seen in CI),
    # so its outcome is the snooze, which finds the request. Nor may the worker hear the
    # abort before the thread's return reaches it (what the handler did is then void: also
    # "failed (cancelled)", seen under load): it listens on another database, and claims by
    # polling; the heartbeat, which reads requests too, is minutes away. And the job is
    # enqueued once that LISTEN is up: its first one reads the requests too (for those sent
    # while nobody listened), and one that came up late under load found this abort.
    @app.job("aborted")
    def aborted(job: pgqueue.Job) -> None:
        asyncio.run(abort(job.id))
        raise pgqueue.Snooze(3600)

    options = {"poll_interval": 0.1, "listen_dsn": empty_db_dsn}
    async with running(app, db_dsn, logger=logger, **options) as worker:
        with anyio.fail_after(15):
            await worker.notifier.listening.wait()
        job = await app.enqueue(conn, "aborted")
        await wait_for_states(conn, [job], "cancelled")
        await wait_until(lambda: log.outcome_logged(job), what="the outcome line")
    assert log.outcomes(job) == ["snoozed (cancelled)"]
    assert "runs again" not in log.text()


async def test_a_job_types_backoff_sets_the_delay_before_each_retry(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """The settings' backoff is an hour here: only the type's own backoff (0.3 s, then 0.6 s)
    lets the attempts run within the test. A backoff that raises falls back to the settings'
    (the failure is recorded all the same)."""
    logger, log = records
    await conn.execute(
        "UPDATE pgqueue.settings SET value = '1 hour' WHERE name IN ('backoff_base', 'backoff_cap')"
    )
    app = pgqueue.App()
    runs: list[float] = []
    asked: list[int] = []

    def backoff(attempt: int) -> float:
        asked.append(attempt)
        return 0.3 * attempt

    @app.job("flaky", max_attempts=3, backoff=backoff)
    async def flaky(job: pgqueue.Job) -> None:
        runs.append(time.monotonic())
        raise RuntimeError("still down")

    @app.job("broken_backoff", max_attempts=3, backoff=lambda attempt: 1 / 0)
    async def broken_backoff(job: pgqueue.Job) -> None:
        raise RuntimeError("down")

    flaky_id = await app.enqueue(conn, "flaky")
    broken = await app.enqueue(conn, "broken_backoff")
    async with running(app, db_dsn, poll_interval=0.1, logger=logger):
        await wait_for_states(conn, [flaky_id], "failed")
        await wait_until(lambda: log.outcome_logged(broken), what="the broken backoff's failure")
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert len(gaps) == 2 and gaps[0] >= 0.28 and gaps[1] >= 0.58, gaps
    assert asked == [1, 2]  # not for the last attempt: no retry follows it
    state, wait = await conn.fetchrow(
        "SELECT state, extract(epoch FROM run_after - now()) FROM pgqueue.jobs WHERE id = $1",
        broken,
    )
    assert state == "queued" and wait > 1200  # the settings' hour, with its jitter
    assert log.count("the backoff of 'broken_backoff' failed for attempt 1") == 1
    # Each failure's line says when the job runs again: the type's delay, or the one the
    # settings' backoff drew (in SQL) for broken_backoff; a last attempt's says nothing.
    lines = [r.getMessage() for r in log.records if "RuntimeError" in r.getMessage()]
    assert sum("runs again in 0.3s" in line for line in lines) == 1
    assert sum("runs again in 0.6s" in line for line in lines) == 1
    drawn = [line for line in lines if "broken_backoff" in line]
    assert len(drawn) == 1 and re.search(r"runs again in \d+:\d\d:\d\d$", drawn[0])
    assert sum("failed (failed)" in line and "runs again" not in line for line in lines) == 1


def test_a_backoff_is_seconds_a_timedelta_or_a_function() -> None:
    app = pgqueue.App()

    def handler(job: pgqueue.Job) -> None:
        return None

    app.job("fixed", backoff=5)(handler)
    app.job("delta", backoff=timedelta(minutes=2))(handler)
    app.job("curve", backoff=lambda n: 2**n)(handler)
    types = app.job_types
    assert types["fixed"].backoff is not None and types["fixed"].backoff(3) == timedelta(seconds=5)
    assert types["delta"].backoff is not None and types["delta"].backoff(1) == timedelta(minutes=2)
    assert types["curve"].backoff is not None and types["curve"].backoff(3) == 8
    with pytest.raises(ValueError, match="backoff must be from 0 seconds to 100 years, got -1"):
        app.job("negative", backoff=-1)
    with pytest.raises(TypeError, match="backoff must be seconds or a timedelta, got '5'"):
        app.job("text", backoff="5")  # type: ignore[arg-type]

    async def later(attempt: int) -> float:
        return 1.0

    with pytest.raises(TypeError, match="backoff must be a plain function"):
        app.job("async", backoff=later)  # type: ignore[arg-type]


async def test_workers_delete_finished_jobs_past_prune_after(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retention runs on the heartbeat period (0.5 s with stale_after at 2 s), in batches
    (of 10 here) until one comes back short: one round, one line, for 25 jobs. A job finished
    more recently, and unfinished ones, stay."""
    logger, log = records
    monkeypatch.setattr(leader, "PRUNE_BATCH", 10)
    await conn.execute("UPDATE pgqueue.settings SET value = '2 seconds' WHERE name = 'stale_after'")
    await conn.execute(
        "INSERT INTO pgqueue.jobs (job_type, state, attempts, finished_at, run_after)"
        " SELECT 'old', 'succeeded', 1, now() - interval '8 days', now() - interval '8 days'"
        " FROM generate_series(1, 25)"
    )
    recent = await conn.fetchval(
        "INSERT INTO pgqueue.jobs (job_type, state, attempts, finished_at)"
        " VALUES ('recent', 'failed', 1, now() - interval '6 days') RETURNING id"
    )
    waiting = await conn.fetchval("SELECT pgqueue.enqueue('elsewhere', queue => 'nobody')")
    async with running(pgqueue.App(), db_dsn, logger=logger, queues=["unused"]):
        await wait_until(
            lambda: log.logged("pruned 25 finished job(s) past settings.prune_after"),
            what="the retention round",
        )
    left = [r["id"] for r in await conn.fetch("SELECT id FROM pgqueue.jobs ORDER BY id")]
    assert left == [recent, waiting]


async def test_retention_under_a_short_statement_timeout_prunes_in_smaller_batches(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From a review of separate roles: with a statement_timeout (of the role, say) shorter
    than a batch's delete, every retention round timed out on the same batch and pruned
    nothing, for ever. A timed-out batch is tried again a quarter the size."""
    logger, log = records
    monkeypatch.setattr(leader, "PRUNE_BATCH", 40)
    await conn.execute(
        "INSERT INTO pgqueue.jobs (job_type, state, attempts, finished_at, run_after)"
        " SELECT 'old', 'succeeded', 1, now() - interval '8 days', now() - interval '8 days'"
        " FROM generate_series(1, 40);"
        # Each row's delete takes 10 ms: 40 take 400 ms, past the timeout; 10 take 100.
        "CREATE FUNCTION public.slow_delete() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN PERFORM pg_sleep(0.01); RETURN OLD; END $$;"
        "CREATE TRIGGER slow_delete BEFORE DELETE ON pgqueue.jobs"
        " FOR EACH ROW EXECUTE FUNCTION public.slow_delete();"
    )
    database = await conn.fetchval("SELECT current_database()")
    await conn.execute(f"ALTER DATABASE {database} SET statement_timeout = '250ms'")
    outage = Outage(logger, "retention")
    async with asyncpg.create_pool(db_dsn, min_size=1, max_size=1) as pool:
        await leader.retention_round(pool, logger, outage)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0, log.text()
    assert log.count("pruned 40 finished job(s)") == 1


async def test_the_listen_connection_can_go_to_another_dsn(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """With a pooler in transaction mode in front of the main DSN, LISTEN must go straight
    to PostgreSQL: listen_dsn takes only the LISTEN connection (here as another role, to
    tell it apart), and its notifications wake an idle worker at once (the poll is a
    minute)."""
    role = f"pgqueue_listen_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'listen'")
    listen_dsn = dsn_as(db_dsn, role, "listen")
    app = pgqueue.App()

    @app.job("ok")
    async def ok(job: pgqueue.Job) -> None:
        return None

    try:
        async with running(app, db_dsn, poll_interval=60, listen_dsn=listen_dsn) as worker:
            assert worker.notifier is not None
            await worker.notifier.listening.wait()  # it connects after the worker started
            rows = await conn.fetch(
                "SELECT split_part(application_name, ' ', 1) AS who, usename FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE 'pgqueue-%'"
            )
            users = {(r["who"], r["usename"]) for r in rows}
            assert ("pgqueue-notifier", role) in users
            me = await conn.fetchval("SELECT current_user")
            assert {u for who, u in users if who != "pgqueue-notifier"} == {me}
            job = await app.enqueue(conn, "ok")
            await wait_for_states(conn, [job], "succeeded", within=10)
    finally:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await conn.execute(f"DROP ROLE {role}")


def test_an_empty_or_malformed_listen_dsn_is_refused_when_the_worker_is_made() -> None:
    with pytest.raises(ValueError, match="listen_dsn is empty"):
        pgqueue.Worker(pgqueue.App(), "postgresql://x/y", listen_dsn=" ")
    with pytest.raises(ValueError, match="postgresql://"):
        pgqueue.Worker(pgqueue.App(), "postgresql://x/y", listen_dsn="mysql://x")
