"""The notifier's test notifications: a worker finds out, and says, when the notifications
sent on its database do not reach its LISTEN connection (a LISTEN through a transaction-mode
pooler, a ``listen_dsn`` naming another database); it checks once per connection, reaches no
verdict when it could not send or lost the connection meanwhile, and test notifications
never wake a producer."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest
from runtime_helpers import Records, running
from worker_harness import wait_for_states, wait_until

import pgqueue
from pgqueue.worker import notifier, retry
from pgqueue.worker.notifier import Notifier
from pgqueue.worker.wake import Wake

pytestmark = pytest.mark.anyio

WARNING = "did not arrive on the LISTEN connection"
TERMINATE = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE datname = $1 AND application_name LIKE 'pgqueue-notifier %'"
)


def _database(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


@asynccontextmanager
async def _notifier(
    listen_dsn: str, pool: asyncpg.Pool | None, logger: logging.Logger, aborts: Wake | None = None
) -> AsyncIterator[tuple[Notifier, Wake]]:
    """A Notifier of every queue on ``listen_dsn``, running for the block."""
    wake = Wake()
    listener = Notifier(
        listen_dsn,
        wake,
        queues=None,
        application_name="pgqueue-notifier test",
        logger=logger,
        aborts=aborts,
        pool=pool,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.run)
        yield listener, wake
        tg.cancel_scope.cancel()


async def test_a_worker_hears_its_test_notification_once_per_connection(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One test notification after each LISTEN, none after the health round trips (each is a
    NOTIFY commit every worker's listener receives); it arrives. What psql's LISTEN shows of
    it is a payload PostgreSQL refuses as a queue name."""
    logger, log = records
    monkeypatch.setattr(notifier, "HEALTH_INTERVAL", 0.02)
    payloads: list[str] = []
    await conn.add_listener("pgqueue", lambda *args: payloads.append(args[-1]))
    async with running(pgqueue.App(), db_dsn, logger=logger) as worker:
        assert worker.notifier is not None
        watched = worker.notifier

        async def heard(n: int) -> bool:
            return watched.pings_heard >= n

        await wait_until(lambda: heard(1), what="the test notification heard")
        assert watched.delivered is True
        await anyio.sleep(0.5)  # some 20 health round trips
        assert watched.pings_sent == 1
        await conn.execute(TERMINATE, _database(db_dsn))
        await wait_until(lambda: heard(2), what="the next connection's test notification")
        assert watched.pings_sent == 2 and watched.connects == 2
    assert log.count(WARNING) == 0 and log.count("arrive again") == 0
    pings = [p for p in payloads if "ping pgqueue-notifier" in p]
    assert len(pings) == 2, payloads
    for payload in pings:
        with pytest.raises(asyncpg.InvalidParameterValueError, match="at most 200 bytes"):
            await conn.execute("SELECT pgqueue._check_queue_name('test', $1)", payload)


async def test_an_idle_session_timeout_does_not_end_the_listen_connection(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """From a review of separate roles: a role's idle_session_timeout ended the LISTEN
    connection, idle between health checks, every few seconds: an outage logged each time."""
    logger, log = records
    await conn.execute(f"ALTER DATABASE {_database(db_dsn)} SET idle_session_timeout = '300ms'")
    async with _notifier(db_dsn, None, logger) as (listener, _wake):
        await listener.listening.wait()
        await anyio.sleep(1.0)  # three idle_session_timeouts
        assert listener.connects == 1, log.text()
    assert log.count("database unavailable") == 0


async def test_test_notifications_wake_no_producer(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """Every worker hears every worker's test notifications; one listening to every queue
    must not take them for a queue's. Notifications on one connection arrive in the order
    they were sent, so once the abort notification sent after a test notification is heard,
    that one was heard too."""
    aborts = Wake()
    async with _notifier(db_dsn, None, records[0], aborts) as (listener, wake):
        await listener.listening.wait()
        assert await wake.wait(5) and await aborts.wait(5)  # the sweep after connecting
        other_worker = "ping pgqueue-notifier other-host-1-abc 1".rjust(notifier.PING_WIDTH)
        await conn.execute("SELECT pg_notify('pgqueue', $1)", other_worker)
        await conn.execute("SELECT pg_notify('pgqueue', '')")
        assert await aborts.wait(5)
        assert not wake.is_set()
        await conn.execute("SELECT pg_notify('pgqueue', 'default')")
        assert await wake.wait(5)


async def test_no_verdict_while_the_pool_cannot_send(
    db_dsn: str, records: tuple[logging.Logger, Records], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test notification cannot be sent (every pooled connection busy): no verdict, no
    warning; it is tried again after each health round trip, and heard once it is sent."""
    logger, log = records
    monkeypatch.setattr(notifier, "HEALTH_INTERVAL", 0.02)
    monkeypatch.setattr(notifier, "HEALTH_TIMEOUT", 0.2)
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=1)
    try:
        held = await pool.acquire()
        async with _notifier(db_dsn, pool, logger) as (listener, _wake):

            async def tried(n: int) -> bool:
                return listener.pings_sent >= n

            await wait_until(lambda: tried(3), what="three tries")
            assert listener.delivered is None and listener.pings_missed == 0
            await pool.release(held)
            await wait_until(lambda: _true(listener.pings_heard == 1), what="the one heard")
            assert listener.delivered is True
    finally:
        await pool.close()
    assert log.count(WARNING) == 0


async def test_a_connection_lost_during_the_check_is_no_verdict(
    db_dsn: str,
    empty_db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
    conn: asyncpg.Connection,
) -> None:
    """The LISTEN connection (on a database where the test notification would never arrive)
    is lost while the notifier waits for it: no warning, and the notifier reconnects at once
    instead of waiting out the check's bound first."""
    logger, log = records
    monkeypatch.setattr(notifier, "HEALTH_TIMEOUT", 3.0)
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=1)
    try:
        async with _notifier(empty_db_dsn, pool, logger) as (listener, _wake):
            await wait_until(lambda: _true(listener.pings_sent == 1), what="the check")
            lost_at = time.monotonic()
            await conn.execute(TERMINATE, _database(empty_db_dsn))
            await wait_until(lambda: _true(listener.connects == 2), what="the reconnect")
            assert time.monotonic() - lost_at < 2.0
            assert listener.pings_missed == 0 and listener.delivered is None
    finally:
        await pool.close()
    assert log.count(WARNING) == 0


async def test_a_worker_that_hears_no_notifications_says_so_once_and_polls(
    conn: asyncpg.Connection,
    db_dsn: str,
    empty_db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A listen_dsn naming another database: the LISTEN works and answers its health round
    trips, and hears nothing. One WARNING for the whole episode (two connections here), jobs
    still run (by polling), and an INFO line once a connection hears its test notification
    (the notifier moved to the right database and reconnected)."""
    logger, log = records
    monkeypatch.setattr(notifier, "HEALTH_INTERVAL", 0.05)
    monkeypatch.setattr(notifier, "HEALTH_TIMEOUT", 0.5)
    app = pgqueue.App()

    @app.job("ok")
    async def ok(job: pgqueue.Job) -> None:
        return None

    elsewhere = _database(empty_db_dsn)
    async with running(app, db_dsn, logger=logger, listen_dsn=empty_db_dsn) as worker:
        assert worker.notifier is not None
        watched = worker.notifier
        await wait_until(lambda: log.logged(WARNING), what="the warning")
        assert watched.delivered is False
        job = await app.enqueue(conn, "ok")
        await wait_for_states(conn, [job], "succeeded", within=10)
        await conn.execute(TERMINATE, elsewhere)
        await wait_until(lambda: _true(watched.pings_missed == 2), what="the second miss")
        assert log.count(WARNING) == 1

        watched.dsn = db_dsn

        async def moved() -> bool:
            # Again until it is back: a reconnect under way may still reach the old database.
            await conn.execute(TERMINATE, elsewhere)
            return await log.logged("notifications arrive again")

        await wait_until(moved, what="notifications arriving again", every=0.2)
        assert watched.delivered is True
    assert log.count(WARNING) == 1


async def _true(value: bool) -> bool:
    return value


async def test_a_flapping_listen_connection_is_logged_once_until_an_outage_lasts(
    conn: asyncpg.Connection,
    db_dsn: str,
    pg_base_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From a chaos soak: a LISTEN connection killed 362 times in 12 s logged 100 warnings and
    as many recoveries. Now the first outage is logged and the brief ones after it that fail
    the same way are not; one failing another way (the database refusing connections) is,
    and says how many were not."""
    logger, log = records
    monkeypatch.setattr(retry, "RELAPSE_LOGGED_AFTER", 1.0)
    database = _database(db_dsn)
    async with _notifier(db_dsn, None, logger) as (listener, _wake):
        await listener.listening.wait()
        for n in range(2, 10):
            await conn.execute(TERMINATE, database)
            await wait_until(lambda n=n: _true(listener.connects == n), what=f"connection #{n}")
        assert log.count("notifier: database unavailable") == 1, log.text()
        assert log.count("notifier: working again") == 1, log.text()

        admin = await asyncpg.connect(pg_base_dsn)  # not from the database it closes
        try:
            await admin.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
            await conn.execute(TERMINATE, database)
            await wait_until(lambda: log.logged("7 brief outage(s)"), what="the lasting one")
        finally:
            await admin.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
            await admin.close()
        await wait_until(lambda: _true(listener.connects == 10), what="the last connection")
        assert log.count("notifier: working again") == 2, log.text()
    # The lasting outage's line names the refusal it met, once.
    assert log.count("not currently accepting connections") == 1, log.text()
