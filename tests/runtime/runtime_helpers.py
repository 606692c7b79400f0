"""The runtime tests' worker app, log capture, claim-back set-ups and proxy addresses; the
subprocess and waiting helpers are tests/worker_harness.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import asyncpg
import pytest
from worker_harness import WorkerProcess, wait_until

import pgqueue
from pgqueue.worker import completer

HERE = Path(__file__).resolve().parent


@asynccontextmanager
async def running(app: pgqueue.App, dsn: str, **options: Any) -> AsyncIterator[pgqueue.Worker]:
    """Run a Worker in this event loop for the duration of the block."""
    options.setdefault("poll_interval", 0.5)
    worker = pgqueue.Worker(app, dsn, handle_signals=False, **options)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.started.wait()
        try:
            yield worker
        finally:
            worker.stop()


async def server_address(dsn: str) -> str | tuple[str, int]:
    """Where a proxy in front of the test server connects: the DSN's TCP host and port (as
    the fixtures reach it: a container's mapped port, say), or, where the DSN names a
    socket directory or no host (an embedded server), the path of the server's Unix
    socket, asked of the server."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    host = parts.hostname or query.get("host")
    if host and not host.startswith("/"):
        return (host, parts.port or int(query.get("port", 5432)))
    conn = await asyncpg.connect(dsn)
    try:
        addr, port, sockets = await conn.fetchrow(
            "SELECT host(inet_server_addr()), current_setting('port')::int,"
            " current_setting('unix_socket_directories')"
        )
    finally:
        await conn.close()
    if addr is None:
        return f"{sockets.split(',')[0].strip()}/.s.PGSQL.{port}"
    return (addr, port)


def dsn_through(dsn: str, port: int, **params: str) -> str:
    """``dsn`` (its user, database and options) through a proxy on loopback ``port``."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port", *params)]
    netloc = f"{parts.username or 'postgres'}@127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query + list(params.items()))))


def start_worker(dsn: str, *args: str) -> WorkerProcess:
    """A ``pgqueue worker worker_app:app`` subprocess (worker_app.py, in this folder) on ``dsn``."""
    return WorkerProcess("worker_app:app", HERE, dsn, *args)


class Records(logging.Handler):
    """Every record a worker logs, for assertions on its outcome lines (see the ``records``
    fixture: a logger of its own, so ``caplog`` and other tests' logging setup do not matter)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def outcomes(self, job_id: int) -> list[str]:
        """The outcome of each outcome line logged for ``job_id``."""
        return [
            r.__dict__["outcome"]
            for r in self.records
            if r.__dict__.get("job_id") == job_id and "outcome" in r.__dict__
        ]

    def count(self, text: str) -> int:
        return sum(text in r.getMessage() for r in self.records)

    async def logged(self, text: str) -> bool:
        """For ``wait_until``: has a line containing ``text`` been logged?"""
        return self.count(text) > 0

    async def outcome_logged(self, job_id: int) -> bool:
        """For ``wait_until``: has the outcome of ``job_id`` been logged?"""
        return bool(self.outcomes(job_id))

    def text(self) -> str:
        return "\n".join(f"{r.levelname} {r.getMessage()}" for r in self.records)


# --------------------------------------------------------------------------- claim backs


async def recover_as_stale(conn: asyncpg.Connection, job: int) -> None:
    """Make ``job``'s lease an hour old and run stale recovery, which must requeue it, in
    one transaction (no heartbeat can refresh the lease in between)."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE pgqueue.jobs SET locked_at = now() - interval '1 hour' WHERE id = $1", job
        )
        assert [r[0] for r in await conn.fetch("SELECT pgqueue.recover_stale()")] == [job]


def held_handler_app() -> tuple[pgqueue.App, anyio.Event, list[int]]:
    """An app whose ``long`` handler notes its attempt and returns once the event is set."""
    app = pgqueue.App()
    release = anyio.Event()
    runs: list[int] = []

    @app.job("long")
    async def long(job: pgqueue.Job) -> None:
        runs.append(job.attempts)
        await release.wait()

    return app, release, runs


async def gate_refusal_lookup(
    conn: asyncpg.Connection, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> asyncpg.Connection:
    """Hold up the lookup that follows a refused success (is the job already succeeded?):
    it waits on advisory lock 4242, held by the returned session until it unlocks it."""
    gate = await connect()
    await gate.execute("SELECT pg_advisory_lock(4242)")
    await conn.execute(
        """
        CREATE FUNCTION public.gated_lookup(w text, ids text) RETURNS SETOF bigint
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_lock_shared(4242);
            PERFORM pg_advisory_unlock_shared(4242);
            RETURN QUERY SELECT id FROM pgqueue.jobs
                         WHERE id = ANY (ids::bigint[]) AND state = 'succeeded' AND locked_by = w;
        END $$
        """
    )
    monkeypatch.setattr(
        completer, "_SUCCEEDED_BY", "SELECT * FROM public.gated_lookup($1, $2::text)"
    )
    return gate


async def refuse_the_success(
    conn: asyncpg.Connection,
    job: int,
    release: anyio.Event,
    *,
    due: bool = True,
    quiet: bool = False,
) -> None:
    """Recover ``job`` (its lease made stale) and keep it from being claimed back, let its
    handler return (``release``), so that its success is refused; once the lookup after the
    refusal waits on the gate (see :func:`gate_refusal_lookup`), make the job due again
    (unless not ``due``). ``quiet``: the requeue sends no notification (its trigger is
    disabled for the transaction), so no worker claims anything because of it."""
    async with conn.transaction():
        if quiet:
            await conn.execute("ALTER TABLE pgqueue.jobs DISABLE TRIGGER jobs_notify_requeued")
        await recover_as_stale(conn, job)
        await conn.execute(
            "UPDATE pgqueue.jobs SET run_after = now() + interval '1 hour' WHERE id = $1", job
        )
        if quiet:
            await conn.execute("ALTER TABLE pgqueue.jobs ENABLE TRIGGER jobs_notify_requeued")
    release.set()  # the success is refused: the row is queued

    async def waits() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                " WHERE d.datname = current_database() AND l.locktype = 'advisory'"
                " AND l.classid = 0 AND l.objid = 4242 AND l.objsubid = 1 AND NOT l.granted"
            )
        )

    await wait_until(waits, what="the lookup after the refused success waiting")
    if due:
        await conn.execute("UPDATE pgqueue.jobs SET run_after = now() WHERE id = $1", job)
