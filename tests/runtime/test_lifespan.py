"""app.lifespan: what handlers use, set up in the worker's event loop before its first claim
and torn down after its last outcome is written."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from runtime_helpers import running
from worker_harness import wait_for_states

import pgqueue


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
