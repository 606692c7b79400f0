"""app.lifespan: what handlers use, set up in the worker's event loop before its first claim
and torn down after its last outcome is written."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import asyncpg
import pytest
from runtime_helpers import Records, running
from worker_harness import wait_for_states

import pgqueue
from pgqueue.worker import worker as worker_module


async def test_lifespans_wrap_every_job_in_the_workers_loop(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """From a review of pgqueue in an application: there was no place for what handlers
    share (an engine, a client), so apps made it lazily in a module global, bound to the
    event loop of the first run: under a second loop (every test gets one) their jobs
    failed with "attached to a different loop". A lifespan runs in each run's loop, set up
    before the first claim, torn down after the last outcome is written, the two forms in
    registration order and in reverse."""
    app = pgqueue.App()
    events: list[str] = []
    loops: dict[str, asyncio.AbstractEventLoop] = {}

    @app.lifespan
    async def engine() -> AsyncIterator[None]:
        loops["lifespan"] = asyncio.get_running_loop()
        jobs = await conn.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE state <> 'queued'")
        events.append(f"engine up, {jobs} claimed")
        yield
        outcomes = await conn.fetchval(
            "SELECT count(*) FROM pgqueue.jobs WHERE state = 'succeeded'"
        )
        events.append(f"engine down, {outcomes} succeeded")

    @asynccontextmanager
    async def client_cm() -> AsyncIterator[None]:
        events.append("client up")
        yield
        events.append("client down")

    app.lifespan(client_cm)

    @app.job("use")
    async def use(job: pgqueue.Job) -> None:
        loops["handler"] = asyncio.get_running_loop()
        events.append("job")

    job_ids = [await app.enqueue(conn, "use") for _ in range(3)]
    async with running(app, db_dsn):
        await wait_for_states(conn, job_ids)
    assert events == [
        "engine up, 0 claimed",
        "client up",
        "job",
        "job",
        "job",
        "client down",
        "engine down, 3 succeeded",
    ]
    assert loops["lifespan"] is loops["handler"]


async def test_a_lifespan_that_fails_to_set_up_stops_the_worker_before_any_claim(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    app = pgqueue.App()

    @app.lifespan
    async def broken() -> AsyncIterator[None]:
        raise ConnectionRefusedError("the cache is down")
        yield

    @app.job("never")
    async def never(job: pgqueue.Job) -> None: ...

    job_id = await app.enqueue(conn, "never")
    worker = pgqueue.Worker(app, db_dsn, handle_signals=False)
    with pytest.raises(pgqueue.LifespanError, match="broken failed to set up") as raised:
        await worker.run()
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job_id) == "queued"


def test_lifespan_takes_generators_and_context_manager_factories_only() -> None:
    app = pgqueue.App()

    async def coroutine() -> None: ...

    with pytest.raises(TypeError, match="async generator function"):
        app.lifespan(coroutine)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async generator function"):
        app.lifespan(None)  # type: ignore[type-var]


async def test_a_context_variable_a_lifespan_sets_is_seen_by_every_handler(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """As docs/worker.md says: a value shared without a global, in async handlers and in
    plain def ones (their threads)."""
    app = pgqueue.App()
    client: contextvars.ContextVar[str] = contextvars.ContextVar("client")
    seen: list[str] = []

    @app.lifespan
    async def make_client() -> AsyncIterator[None]:
        client.set("the client")
        yield

    @app.job("in_loop")
    async def in_loop(job: pgqueue.Job) -> None:
        seen.append(client.get("none"))

    @app.job("in_thread")
    def in_thread(job: pgqueue.Job) -> None:
        seen.append(client.get("none"))

    job_ids = [await app.enqueue(conn, "in_loop"), await app.enqueue(conn, "in_thread")]
    async with running(app, db_dsn):
        await wait_for_states(conn, job_ids)
    assert seen == ["the client", "the client"]


async def test_a_cancelled_run_tears_the_lifespans_down_all_the_same(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """From a review: the teardown ran unshielded with the run's exception, so an embedding
    app's cancellation of Worker.run cut it at its first await, and a lifespan written as
    docs/worker.md shows (code after its yield, no try/finally) skipped it. It runs as on a
    normal stop, and may await."""
    app = pgqueue.App()
    events: list[str] = []

    @app.lifespan
    async def plain() -> AsyncIterator[None]:
        events.append("up")
        yield
        await anyio.sleep(0.01)  # an engine's dispose(), say
        events.append("down")

    worker = pgqueue.Worker(app, db_dsn, handle_signals=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.started.wait()
        tg.cancel_scope.cancel()
    assert events == ["up", "down"]


async def test_a_stop_during_set_up_ends_it_and_claims_nothing(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """A stop (SIGTERM) while a lifespan sets up (a service that does not answer) ends the
    set-up; the worker leaves what it entered, claims nothing, and returns."""
    app = pgqueue.App()
    events: list[str] = []
    setting_up = anyio.Event()

    @app.lifespan
    async def first() -> AsyncIterator[None]:
        events.append("first up")
        yield
        events.append("first down")

    @app.lifespan
    async def hangs() -> AsyncIterator[None]:
        setting_up.set()
        await anyio.sleep_forever()
        yield

    @app.job("never")
    async def never(job: pgqueue.Job) -> None: ...

    job_id = await app.enqueue(conn, "never")
    worker = pgqueue.Worker(app, db_dsn, handle_signals=False)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await setting_up.wait()
            worker.stop()
    assert events == ["first up", "first down"]
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job_id) == "queued"


async def test_a_teardown_that_hangs_is_left_after_its_bound(
    conn: asyncpg.Connection,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    records: tuple[logging.Logger, Records],
) -> None:
    logger, logged = records
    monkeypatch.setattr(worker_module, "LIFESPAN_TEARDOWN", 0.2)
    app = pgqueue.App()

    @app.lifespan
    async def stuck() -> AsyncIterator[None]:
        yield
        await anyio.sleep_forever()

    with anyio.fail_after(10):
        async with running(app, db_dsn, logger=logger):
            pass
    assert logged.count("did not finish tearing down within 0.2s") == 1
