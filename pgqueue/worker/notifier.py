"""The Notifier owns the worker's single LISTEN connection.

It lives outside the pool on purpose: a pooled connection would be handed to other work
and a LISTEN on it would be lost or leak. It reconnects with jittered backoff, LISTENs again,
checks the connection with a periodic round trip (a half-open TCP connection otherwise
looks healthy forever), and after every (re)connect wakes the producer so that it sweeps
for jobs whose notifications were missed while it was away.

A connection that answers can still hear nothing: a LISTEN through a pooler in transaction
mode listens on whichever server connection ran it, and a ``listen_dsn`` naming another
database or server listens where nobody notifies. Both leave the worker polling, quietly. So
after each LISTEN the notifier sends a test notification through the worker's pool, the way
jobs' notifications travel, and waits for it to arrive: a WARNING says when it does not (once,
until a later connection hears its own), and an INFO line when one arrives again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import anyio
import asyncpg

from pgqueue.dsn import connect
from pgqueue.worker import bounded
from pgqueue.worker.retry import Backoff, Outage
from pgqueue.worker.wake import Wake

CHANNEL = "pgqueue"
# The payload of pgqueue.abort()'s notification on the same channel: no queue name is empty.
# (A channel of its own, LISTENed too, measured ~0.2 ms more per idle pickup.)
ABORTS = ""
# A test notification's payload is at least this long: no queue name is (at most 200 bytes),
# so no worker takes it for one.
PING_WIDTH = 201
# The health round trip's period and bound (also the bound on a test notification's trip).
# The connection is idle by design between health checks: a role's or database's
# idle_session_timeout (PostgreSQL 14+) ended it every few seconds, an outage logged each time.
_KEEP_IDLE = (
    "SELECT set_config('idle_session_timeout', '0', false)"
    " WHERE current_setting('idle_session_timeout', true) IS NOT NULL"
)
HEALTH_INTERVAL = 15.0
HEALTH_TIMEOUT = 5.0
# Longest wait between reconnects. The backoff's usual 10 s left an idle worker deaf for up
# to 10 s after the server came back (a crash review: LISTEN again 5.3 s after a 5 s outage),
# while the producer, polling, claimed meanwhile. A refused connection costs little.
RECONNECT_CAP = 2.0

# A test notification, sent like any job's.
_PING = f"SELECT pg_notify('{CHANNEL}', $1)"


async def _send(conn: asyncpg.Connection, payload: str) -> None:
    await conn.execute(_PING, payload)


class Notifier:
    """Turns ``NOTIFY pgqueue, '<queue>'`` for our queues into wake-ups of the producer, and
    ``NOTIFY pgqueue, ''`` (``pgqueue.abort()``) into wake-ups of ``aborts`` (see
    :mod:`pgqueue.worker.aborts`). The test notifications go through ``pool`` (none without
    one)."""

    def __init__(
        self,
        dsn: str | None,
        wake: Wake,
        *,
        queues: Iterable[str] | None,
        application_name: str,
        logger: logging.Logger,
        aborts: Wake | None = None,
        pool: asyncpg.Pool | None = None,
    ) -> None:
        self.dsn = dsn
        self.wake = wake
        self.queues = None if queues is None else frozenset(queues)
        self.application_name = application_name
        self.logger = logger
        self.aborts = aborts
        self.pool = pool
        self.listening = anyio.Event()  # set while LISTEN is active; replaced when lost
        self.connects = 0  # successful LISTENs so far, for tests and logs
        self.delivered: bool | None = None  # whether the last test notification arrived
        self.pings_sent = 0  # test notifications tried so far, for tests
        self.pings_heard = 0  # those that arrived
        self.pings_missed = 0  # those that did not, on a connection that still answers
        self._ping = ""  # the payload of the test notification awaited
        self._pong = anyio.Event()

    async def run(self) -> None:
        """Keep a LISTEN connection up until cancelled."""
        backoff = Backoff(cap=RECONNECT_CAP)
        outage = Outage(self.logger, "notifier")
        while True:
            try:
                conn = await connect(self.dsn, application_name=self.application_name)
            except Exception as exc:
                outage.failed(exc, "opening the LISTEN connection")
                await backoff.sleep()
                continue
            try:
                await self._listen(conn, backoff, outage)
            except Exception as exc:
                outage.failed(exc, "listening")
            finally:
                if self.listening.is_set():
                    self.listening = anyio.Event()
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await conn.close()
                conn.terminate()
            await backoff.sleep()

    async def _listen(self, conn: asyncpg.Connection, backoff: Backoff, outage: Outage) -> None:
        """LISTEN, wake the producer for a sweep, then watch the connection until it dies."""
        lost = anyio.Event()

        def on_lost(_conn: object) -> None:
            lost.set()
            self._pong.set()  # a test notification under way will not come: stop waiting

        conn.add_termination_listener(on_lost)
        with anyio.fail_after(HEALTH_TIMEOUT):  # a LISTEN can hang like any statement
            await conn.execute(_KEEP_IDLE)
            await conn.add_listener(CHANNEL, self._on_notify)
        self.connects += 1
        backoff.reset()
        outage.ok()
        self.logger.info(
            "notifier: listening on channel %s (connection #%d)", CHANNEL, self.connects
        )
        self.listening.set()
        self.wake.set()  # sweep: notifications sent while we were not listening are gone
        if self.aborts is not None:
            self.aborts.set()  # and read the abort requests, for the same reason
        checked = False  # whether this connection's delivery check came to a verdict
        while True:
            if not checked:
                checked = await self._check_delivery(conn, lost)
            with anyio.move_on_after(HEALTH_INTERVAL):
                await lost.wait()
            if lost.is_set():
                raise ConnectionError("the LISTEN connection was closed")
            with anyio.fail_after(HEALTH_TIMEOUT):
                await conn.fetchval("SELECT 1")

    async def _check_delivery(self, conn: asyncpg.Connection, lost: anyio.Event) -> bool:
        """Send a test notification through the pool and wait for it on this connection;
        return whether that came to a verdict. Once per connection: what a backend hears
        does not change while it lives, and each test notification is a NOTIFY commit
        delivered to every worker's listener. No verdict (nothing sent, the connection lost
        meanwhile): the caller tries again after its next health round trip."""
        if self.pool is None:
            return True
        self.pings_sent += 1
        self._ping = f"ping {self.application_name} {self.pings_sent}".rjust(PING_WIDTH)
        self._pong = anyio.Event()
        try:
            await bounded.call(self.pool, HEALTH_TIMEOUT, _send, self._ping)
        except Exception as exc:  # the pool's trouble, which its users report
            self.logger.debug("notifier: test notification not sent: %r", exc)
            return False
        with anyio.move_on_after(HEALTH_TIMEOUT):
            await self._pong.wait()
        if lost.is_set():
            return False
        if self._pong.is_set():
            self.pings_heard += 1
            if self.delivered is False:
                self.logger.info("notifier: notifications arrive again")
            self.delivered = True
            return True
        with anyio.fail_after(HEALTH_TIMEOUT):  # a dead connection is not a deaf one
            await conn.fetchval("SELECT 1")
        self.pings_missed += 1
        if self.delivered is not False:
            self.logger.warning(
                "notifier: a test notification sent through the worker's pool did not arrive"
                " on the LISTEN connection within %gs: this worker hears no notifications and"
                " finds new jobs only by polling (a LISTEN through a transaction-mode pooler,"
                " or a listen_dsn naming another database or server? see --listen-dsn)",
                HEALTH_TIMEOUT,
            )
        self.delivered = False
        return True

    def _on_notify(self, _conn: asyncpg.Connection, _pid: int, _channel: str, payload: str) -> None:
        if payload == ABORTS:
            if self.aborts is not None:
                self.aborts.set()
        elif len(payload) >= PING_WIDTH:  # a test notification: this worker's, or another's
            if payload == self._ping:
                self._pong.set()
        elif self.queues is None or payload in self.queues:
            self.wake.set()
