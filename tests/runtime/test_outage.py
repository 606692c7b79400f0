"""An outage is logged once when it starts (saying what the component does next) and once
when it ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import anyio
import asyncpg
import pytest
from runtime_helpers import Records, dsn_through, server_address
from worker_harness import wait_for_states, wait_until

import pgqueue
from pgqueue.dsn import create_pool
from pgqueue.worker import bounded, retry
from pgqueue.worker.retry import Outage, is_transient_error


def test_an_outage_is_logged_once_saying_what_happens_next(
    records: tuple[logging.Logger, Records],
) -> None:
    logger, log = records
    lost = asyncpg.ConnectionDoesNotExistError("connection was closed")
    default = Outage(logger, "producer")
    default.failed(lost, "claiming")
    default.failed(lost, "claiming")
    default.ok()
    # The abort reader does not back off: it waits for the next notification or heartbeat.
    aborts = Outage(logger, "aborts", "trying again at the next notification or heartbeat")
    aborts.failed(RuntimeError("boom"), "reading abort requests")
    lines = [r.getMessage() for r in log.records]
    assert lines[0] == (
        "producer: database unavailable while claiming"
        " (ConnectionDoesNotExistError: connection was closed); retrying with backoff"
    )
    assert lines[1].startswith("producer: working again after ")
    assert lines[2] == (
        "aborts: unexpected error while reading abort requests;"
        " trying again at the next notification or heartbeat"
    )
    assert len(lines) == 3


def test_brief_outages_after_a_logged_one_are_counted_not_logged(
    records: tuple[logging.Logger, Records], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flapping connection logged a warning and a recovery per outage (100 of each in 12 s
    in a chaos soak). After one is logged, the next within RELAPSE_WINDOW that fail the same
    way are counted; one of them lasting RELAPSE_LOGGED_AFTER is logged, and so is the first
    past the window; each logged line counts the relapses before it."""
    now = [0.0]
    monkeypatch.setattr(retry.time, "monotonic", lambda: now[0])
    logger, log = records
    lost = asyncpg.ConnectionDoesNotExistError("connection was closed")
    outage = Outage(logger, "notifier")

    def brief() -> None:
        outage.failed(lost, "listening")
        now[0] += 1.0
        outage.ok()
        now[0] += 1.0

    for _ in range(5):
        brief()
    lines = [r.getMessage() for r in log.records]
    assert len(lines) == 2 and lines[1] == "notifier: working again after 1.0s", lines
    outage.failed(lost, "listening")  # a sixth: it lasts
    now[0] += retry.RELAPSE_LOGGED_AFTER - 0.5
    outage.failed(lost, "listening")
    assert len(log.records) == 2
    now[0] += 0.5
    outage.failed(lost, "listening")
    outage.failed(lost, "listening")
    outage.ok()
    lines = [r.getMessage() for r in log.records][2:]
    assert len(lines) == 2, lines
    assert lines[0].endswith("(4 brief outage(s) since the last one logged were not logged)")
    assert lines[1] == f"notifier: working again after {retry.RELAPSE_LOGGED_AFTER:.1f}s"
    now[0] += retry.RELAPSE_WINDOW  # past the window: logged at once
    brief()
    assert len(log.records) == 6
    assert log.records[4].getMessage().endswith("; retrying with backoff")
    # Within the window, a relapse that fails another way is news: logged at once, and so
    # is a change of cause during a quiet relapse. The same message but for a number in it
    # (a statement's name, an address) is the same way.
    lost_elsewhere = asyncpg.ConnectionDoesNotExistError("connection was closed (pid 4711)")
    outage.failed(lost_elsewhere, "listening")
    outage.ok()
    assert len(log.records) == 8, [r.getMessage() for r in log.records]
    outage.failed(asyncpg.ConnectionDoesNotExistError("connection was closed (pid 4712)"), "x")
    outage.failed(asyncpg.exceptions.InsufficientPrivilegeError("permission denied"), "x")
    lines = [r.getMessage() for r in log.records][8:]
    assert len(lines) == 1 and "permission denied" in lines[0], lines
    assert lines[0].endswith("; retrying with backoff")  # the relapse logged is this one


def test_an_outage_that_lasts_is_logged_again_less_and_less_often(
    records: tuple[logging.Logger, Records], monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a review behind PgBouncer: a component failing for ever (every claim refused)
    logged one line, at its start, and nothing after it. Now again after REMIND_AFTER, then
    twice as late each time (up to REMIND_MAX apart); a later outage starts afresh."""
    now = [0.0]
    monkeypatch.setattr(retry.time, "monotonic", lambda: now[0])
    logger, log = records
    refused = asyncpg.exceptions.InsufficientPrivilegeError("permission denied for table jobs")
    outage = Outage(logger, "producer")
    for _ in range(int(4 * retry.REMIND_AFTER)):  # a try a second
        outage.failed(refused, "claiming jobs")
        now[0] += 1.0
    lines = [r.getMessage() for r in log.records]
    assert len(lines) == 3, lines  # the start, after REMIND_AFTER, after 3 * REMIND_AFTER
    assert lines[1] == (
        f"producer: still failing after {retry.REMIND_AFTER:.0f}s, while claiming jobs"
        " (InsufficientPrivilegeError: permission denied for table jobs); retrying with backoff"
    )
    assert f"still failing after {3 * retry.REMIND_AFTER:.0f}s" in lines[2]
    assert [r.levelname for r in log.records] == ["ERROR"] * 3


class _EofHoldingProxy:
    """A TCP proxy to PostgreSQL that passes every byte but holds back the end of the
    server's side once the server hangs up, until told to let it go: it keeps asyncpg in the
    window where it has read the server's FATAL message and not the socket's end."""

    def __init__(self, upstream: str | tuple[str, int]) -> None:
        self.upstream = upstream  # a Unix socket's path, or a TCP address
        self.hung_up = asyncio.Event()
        self.let_go = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> _EofHoldingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.let_go.set()
        assert self.server is not None
        self.server.close()

    def dsn(self, dsn: str) -> str:
        assert self.server is not None
        return dsn_through(dsn, self.server.sockets[0].getsockname()[1])

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if isinstance(self.upstream, str):
            server_r, server_w = await asyncio.open_unix_connection(self.upstream)
        else:
            server_r, server_w = await asyncio.open_connection(*self.upstream)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, hold: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            if hold:
                self.hung_up.set()
                await self.let_go.wait()
            w.close()

        await asyncio.gather(pipe(client_r, server_w, False), pipe(server_r, client_w, True))


async def test_a_statement_on_a_connection_its_server_just_ended_is_a_connection_error(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """After ``pg_terminate_backend``, asyncpg may have read the server's FATAL message but
    not the socket's end: the next statement raises ``InternalClientError: cannot switch to
    state ...`` (inside a transaction, ``Transaction.__aexit__`` an ``InterfaceError`` in
    its place). Taken for PostgreSQL refusing the write, it turned successes into failed
    attempts (a soak: jobs with one attempt ended ``failed``). It must be one a retry
    cures, on a fresh connection."""

    async def end(pid: int) -> None:
        proxy.hung_up.clear()
        await conn.execute("SELECT pg_terminate_backend($1)", pid)
        await proxy.hung_up.wait()  # the FATAL is on its way to asyncpg, the end held

    async def backend(c: asyncpg.Connection) -> int:
        pid: int = await c.fetchval("SELECT pg_backend_pid()")
        return pid

    async def ended_before(c: asyncpg.Connection) -> int:
        return await backend(c)

    async def ended_in_a_transaction(c: asyncpg.Connection) -> int:
        async with c.transaction():
            await end(await backend(c))
            return await backend(c)

    async with _EofHoldingProxy(await server_address(db_dsn)) as proxy:
        pool = await create_pool(proxy.dsn(db_dsn), warm=1, max_size=1)
        try:
            with anyio.fail_after(30):
                for op in (ended_before, ended_in_a_transaction):
                    pid = await bounded.call(pool, 5, backend)
                    proxy.let_go.clear()
                    if op is ended_before:
                        await end(pid)
                    with pytest.raises(Exception) as caught:
                        await bounded.call(pool, 5, op)
                    assert is_transient_error(caught.value), repr(caught.value)
                    wanted = (
                        asyncpg.exceptions.InternalClientError
                        if op is ended_before
                        else asyncpg.InterfaceError
                    )
                    assert isinstance(caught.value, wanted), repr(caught.value)
                    # Not pooled again, even before its end arrives: the next call runs.
                    assert await bounded.call(pool, 5, backend) != pid
                    proxy.let_go.set()
        finally:
            proxy.let_go.set()
            pool.terminate()


@pytest.mark.parametrize("end_seen", [True, False], ids=["end seen", "end not yet seen"])
async def test_a_worker_whose_idle_claim_connection_was_ended_claims_on_a_fresh_one_quietly(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    end_seen: bool,
) -> None:
    """The producer keeps its claim connection between claims. Ended by its server while the
    worker idled, it was used all the same: the next claim failed (``connection has been
    released back to the pool``, or before asyncpg saw the socket's end ``cannot switch to
    state``), was logged as an outage and waited out a backoff. It is replaced before the
    claim, or right after that claim fails, quietly."""
    logger, log = records
    app = pgqueue.App()

    @app.job("t")
    async def t(job: pgqueue.Job) -> None:
        return None

    async with _EofHoldingProxy(await server_address(db_dsn)) as proxy:
        worker = pgqueue.Worker(
            app, proxy.dsn(db_dsn), poll_interval=30, handle_signals=False, logger=logger
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            try:
                with anyio.fail_after(30):
                    await worker.started.wait()
                    first = await app.enqueue(conn, "t")
                    await wait_for_states(conn, [first], "succeeded")
                    assert worker._producer is not None
                    held = worker._producer._conn  # kept
                    assert held is not None
                    # Idle: asleep until the next notification, nothing in flight on it (ended
                    # while a statement runs on it: the next test).
                    wake = worker._producer.wake._event
                    while True:
                        if wake.statistics().tasks_waiting > 0:
                            break
                        await anyio.sleep(0.01)
                    await conn.execute("SELECT pg_terminate_backend($1)", held.get_server_pid())
                    await proxy.hung_up.wait()
                    if end_seen:
                        proxy.let_go.set()
                        while True:  # until asyncpg has seen the socket close
                            if bounded.unusable(held):
                                break
                            await anyio.sleep(0.01)
                    job = await app.enqueue(conn, "t")
                    await wait_for_states(conn, [job], "succeeded")
            finally:
                proxy.let_go.set()
                worker.stop()
    producer = [r.getMessage() for r in log.records if r.getMessage().startswith("producer:")]
    assert producer == []


async def test_a_claim_connection_ended_while_the_worker_looks_before_sleeping_is_replaced_quietly(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
) -> None:
    """Before it sleeps the producer looks up the next scheduled job on its kept claim
    connection. Ended by its server during that statement (a restart, an operator's
    ``pg_terminate_backend``), it was logged as an outage (a flaky line in the test above,
    ended a moment too early) and the worker slept a whole poll interval on a guess. The
    look is sent again at once on a fresh connection, quietly. The statement is held in
    flight by a lock on ``pgqueue.settings``, which it reads (a claim does not)."""
    logger, log = records
    app = pgqueue.App()

    @app.job("t")
    async def t(job: pgqueue.Job) -> None:
        return None

    worker = pgqueue.Worker(app, db_dsn, poll_interval=30, handle_signals=False, logger=logger)
    locker = await asyncpg.connect(db_dsn)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            try:
                with anyio.fail_after(30):
                    await worker.started.wait()
                    first = await app.enqueue(conn, "t")
                    await wait_for_states(conn, [first], "succeeded")
                    producer = worker._producer
                    assert producer is not None
                    wake = producer.wake._event

                    async def asleep() -> bool:
                        return wake.statistics().tasks_waiting > 0

                    await wait_until(asleep, what="the producer asleep")
                    held = producer._conn
                    assert held is not None
                    pid = held.get_server_pid()

                    async def looking() -> bool:
                        return bool(
                            await conn.fetchval(
                                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity"
                                " WHERE pid = $1",
                                pid,
                            )
                        )

                    async def ended() -> bool:
                        n = await conn.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
                        )
                        return bool(n == 0)

                    async with locker.transaction():
                        await locker.execute("LOCK TABLE pgqueue.settings IN ACCESS EXCLUSIVE MODE")
                        await conn.execute("NOTIFY pgqueue, 'default'")  # claims nothing, looks
                        await wait_until(looking, what="the look waiting for the lock")
                        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
                        await wait_until(ended, what="the claim connection's backend gone")
                    job = await app.enqueue(conn, "t")
                    await wait_for_states(conn, [job], "succeeded")
                    assert producer._conn is not None and producer._conn is not held
            finally:
                worker.stop()
    finally:
        await locker.close()
    lines = [r.getMessage() for r in log.records if r.getMessage().startswith("producer:")]
    assert lines == []
