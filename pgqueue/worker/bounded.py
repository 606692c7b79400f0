"""Database calls that cannot hang: every wait has a bound, and a connection cut off in the
middle of a statement is never used again.

A TCP connection whose peer vanished without a FIN or RST (a host gone, a NAT or firewall
that dropped its state) looks healthy: a statement sent on it waits for an answer that
never comes, until the kernel gives up minutes later, or never if the statement reached
the server and only the reply is lost. asyncpg bounds a statement only when asked to, so
every call here has a deadline.

When the deadline passes, asyncpg sends PostgreSQL a cancel request on a new connection,
and the old connection stays in the middle of its statement until the server acknowledges
the cancel. Such a connection must not serve the next caller. Closing it at once is not
enough either: that also drops the pending cancel request, and the server goes on running
the statement, waiting on whatever lock held it up (tried: the statement committed after
the client had given up). So :func:`discard` closes the connection gracefully, which lets
the cancel land first, and cuts the close short after :data:`CANCEL_WAIT`. On a
half-open connection the acknowledgement never arrives and the connection is dropped
unacknowledged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar, TypeVarTuple

import anyio
import asyncpg

from pgqueue.worker.retry import is_pooler_error

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# How long a statement cut off by its deadline gets for its cancel request to be answered
# before its connection is dropped without it.
CANCEL_WAIT = 5.0


class NoAnswer(TimeoutError):
    """The statement was sent and no answer came within the bound (as opposed to a
    ``TimeoutError`` while waiting for a pooled connection)."""


class Deadlines:
    """The deadlines of calls under way, which their owner can bring forward all at once (a
    worker's final window at shutdown). A call that starts later gets the earlier deadline
    too. Either way a call keeps at least ``min_try`` seconds from the moment it is cut."""

    def __init__(self, min_try: float) -> None:
        self.min_try = min_try
        self._cut = math.inf
        self._scopes: set[anyio.CancelScope] = set()

    def cut(self, at: float) -> None:
        """Bring every deadline forward to ``at`` (on anyio's clock), now and from now on."""
        self._cut = min(self._cut, at)
        for scope in self._scopes:
            self._apply(scope)

    def extend(self, at: float) -> None:
        """Move the cut later, to ``at``, for calls that start from now on; calls under way
        keep the deadline they were cut to."""
        self._cut = max(self._cut, at)

    def _apply(self, scope: anyio.CancelScope) -> None:
        latest = max(self._cut, anyio.current_time() + self.min_try)
        scope.deadline = min(scope.deadline, latest)

    @contextlib.contextmanager
    def bound(self, seconds: float) -> Iterator[anyio.CancelScope]:
        """``anyio.fail_after(seconds)``, brought forward by :meth:`cut`."""
        with anyio.fail_after(seconds) as scope:
            self._apply(scope)
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)


async def call(
    pool: asyncpg.Pool,
    bound: float,
    op: Callable[[asyncpg.Connection, *Ts], Awaitable[T]],
    *args: *Ts,
    deadlines: Deadlines | None = None,
) -> T:
    """``await op(conn, *args)`` on a pooled connection, within ``bound`` seconds for the
    acquire and ``bound`` more for ``op`` (however many statements it runs).

    Raises ``TimeoutError`` (which :func:`~pgqueue.worker.retry.is_connection_error`
    counts) once either is exceeded: :class:`NoAnswer` for ``op``. If ``op`` was cut off,
    its connection is :func:`discard`-ed, so a retry gets another one. Whether its
    statement took effect is then unknown: it may have committed just before the deadline,
    or its reply may have been lost on the way back.

    With ``deadlines``, both bounds can be brought forward while they run (see
    :class:`Deadlines`), with the same outcome as reaching them.
    """
    within = anyio.fail_after if deadlines is None else deadlines.bound
    with within(bound):
        conn = await pool.acquire()
    try:
        started = anyio.current_time()
        try:
            with within(bound):
                return await op(conn, *args)
        except TimeoutError:
            await discard(conn)
            waited = anyio.current_time() - started
            cut = f" (cut short at {waited:.1f}s)" if waited < bound else ""
            raise NoAnswer(f"no answer from the database within {bound:g}s{cut}") from None
        except Exception as exc:
            if is_pooler_error(exc):
                # Its statement cache names statements its server connection lacks (a
                # pooler in transaction mode): kept, it failed every try after, for ever.
                await discard(conn)
            raise
    finally:
        await pool.release(conn)


def unusable(conn: asyncpg.Connection) -> bool:
    """The connection's server ended it: asyncpg has aborted it (see
    :func:`~pgqueue.worker.retry.is_broken_protocol`), or, once it saw the socket close,
    given a pooled one back to its pool already (any call on the proxy then raises)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


async def discard(conn: asyncpg.Connection) -> None:
    """Close a connection whose statement was cut off, never to be reused.

    A graceful close first waits for asyncpg's pending cancel request to be sent and
    acknowledged, so the server stops the statement instead of finishing it later behind
    our back. The wait is bounded by :data:`CANCEL_WAIT`. asyncpg aborts the connection on
    every path out of ``close()``, including a failed or cut-off close, and a pooled
    connection closed this way leaves the pool, which opens a fresh one for the next
    acquire.
    """
    with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_WAIT):
        with contextlib.suppress(Exception):
            await conn.close(timeout=CANCEL_WAIT)
