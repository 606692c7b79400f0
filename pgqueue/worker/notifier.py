"""The Notifier owns the worker's single LISTEN connection.

It lives outside the pool on purpose: a pooled connection would be handed to other work
and a LISTEN on it would be lost or leak. It reconnects with jittered backoff, LISTENs again,
checks the connection with a periodic round trip (a half-open TCP connection otherwise
looks healthy forever), and after every (re)connect wakes the producer so that it sweeps
for jobs whose notifications were missed while it was away.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import anyio
import asyncpg

from pgqueue.dsn import connect
from pgqueue.worker.retry import Backoff, Outage
from pgqueue.worker.wake import Wake

CHANNEL = "pgqueue"
# The payload of pgqueue.abort()'s notification on the same channel: no queue name is empty.
# (A channel of its own, LISTENed too, measured ~0.2 ms more per idle pickup.)
ABORTS = ""


class Notifier:
    """Turns ``NOTIFY pgqueue, '<queue>'`` for our queues into wake-ups of the producer, and
    ``NOTIFY pgqueue, ''`` (``pgqueue.abort()``) into wake-ups of ``aborts`` (see
    :mod:`pgqueue.worker.aborts`)."""

    def __init__(
        self,
        dsn: str | None,
        wake: Wake,
        *,
        queues: Iterable[str] | None,
        application_name: str,
        logger: logging.Logger,
        aborts: Wake | None = None,
        health_interval: float = 15.0,
        health_timeout: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.wake = wake
        self.queues = None if queues is None else frozenset(queues)
        self.application_name = application_name
        self.logger = logger
        self.aborts = aborts
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.listening = anyio.Event()  # set while LISTEN is active; replaced when lost
        self.connects = 0  # successful LISTENs so far, for tests and logs

    async def run(self) -> None:
        """Keep a LISTEN connection up until cancelled."""
        backoff = Backoff()
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
        conn.add_termination_listener(lambda _conn: lost.set())
        with anyio.fail_after(self.health_timeout):  # a LISTEN can hang like any statement
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
        while True:
            with anyio.move_on_after(self.health_interval):
                await lost.wait()
            if lost.is_set():
                raise ConnectionError("the LISTEN connection was closed")
            with anyio.fail_after(self.health_timeout):
                await conn.fetchval("SELECT 1")

    def _on_notify(self, _conn: asyncpg.Connection, _pid: int, _channel: str, payload: str) -> None:
        if payload == ABORTS:
            if self.aborts is not None:
                self.aborts.set()
        elif self.queues is None or payload in self.queues:
            self.wake.set()
