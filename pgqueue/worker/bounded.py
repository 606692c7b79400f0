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
from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple

import anyio
import asyncpg

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# How long a statement cut off by its deadline gets for its cancel request to be answered
# before its connection is dropped without it.
CANCEL_WAIT = 5.0


class NoAnswer(TimeoutError):
    """The statement was sent and no answer came within the bound (as opposed to a
    ``TimeoutError`` while waiting for a pooled connection)."""


async def call(
    pool: asyncpg.Pool,
    bound: float,
    op: Callable[[asyncpg.Connection, *Ts], Awaitable[T]],
    *args: *Ts,
    under_way: set[anyio.CancelScope] | None = None,
) -> T:
    """``await op(conn, *args)`` on a pooled connection, within ``bound`` seconds for the
    acquire and ``bound`` more for ``op`` (however many statements it runs).

    Raises ``TimeoutError`` (which :func:`~pgqueue.worker.retry.is_connection_error`
    counts) once either is exceeded: :class:`NoAnswer` for ``op``. If ``op`` was cut off,
    its connection is :func:`discard`-ed, so a retry gets another one. Whether its
    statement took effect is then unknown: it may have committed just before the deadline,
    or its reply may have been lost on the way back.

    While ``op`` runs, its deadline's scope is in ``under_way`` (if given): a caller may
    bring the deadline forward (``scope.deadline``), with the same outcome as the bound.
    """
    async with pool.acquire(timeout=bound) as conn:
        try:
            with anyio.fail_after(bound) as scope:
                if under_way is not None:
                    under_way.add(scope)
                try:
                    return await op(conn, *args)
                finally:
                    if under_way is not None:
                        under_way.discard(scope)
        except TimeoutError:
            await discard(conn)
            raise NoAnswer(f"no answer from the database within {bound:g}s") from None


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
