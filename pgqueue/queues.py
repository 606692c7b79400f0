"""Steering queues: pausing and resuming them (``pgqueue.pause_queue``,
``pgqueue.resume_queue``) and capping their running jobs (``pgqueue.set_queue_limit``).

A paused queue keeps accepting jobs, and its running jobs finish; claims just take none of
its jobs until it is resumed, which also wakes the workers listening on it. A limited queue
has at most ``max_running`` jobs running at once across every worker.
"""

from __future__ import annotations

from pgqueue.dsn import INT4_MAX, ConnOrPool, asyncpg_target


async def pause_queue(conn_or_pool: ConnOrPool, queue: str) -> bool:
    """Stop workers from claiming jobs of ``queue``; False if it was paused already.

    Claims already under way when this commits may still take jobs of it; none that start
    after. Inside a transaction the pause takes effect when that transaction commits.
    """
    asyncpg_target("pause_queue", conn_or_pool)
    paused: bool = await conn_or_pool.fetchval("SELECT pgqueue.pause_queue(queue => $1)", queue)
    return paused


async def resume_queue(conn_or_pool: ConnOrPool, queue: str) -> bool:
    """Let workers claim jobs of ``queue`` again (idle ones are notified); False if it was
    not paused."""
    asyncpg_target("resume_queue", conn_or_pool)
    resumed: bool = await conn_or_pool.fetchval("SELECT pgqueue.resume_queue(queue => $1)", queue)
    return resumed


async def paused_queues(conn_or_pool: ConnOrPool) -> list[str]:
    """The paused queues, by name."""
    asyncpg_target("paused_queues", conn_or_pool)
    rows = await conn_or_pool.fetch("SELECT queue FROM pgqueue.paused_queues ORDER BY queue")
    return [row["queue"] for row in rows]


async def set_queue_limit(
    conn_or_pool: ConnOrPool, queue: str, max_running: int | None
) -> int | None:
    """Let at most ``max_running`` jobs of ``queue`` run at once across all workers (None: no
    limit); returns the previous limit, None if there was none.

    Jobs running past a lowered limit finish; claims take more once fewer run. Raising or
    removing a limit wakes the queue's workers.
    """
    asyncpg_target("set_queue_limit", conn_or_pool)
    if max_running is not None and type(max_running) is not int:  # a bool is an int to Python
        raise TypeError(f"max_running must be an int or None, got {max_running!r}")
    if max_running is not None and not 1 <= max_running <= INT4_MAX:
        raise ValueError(
            f"max_running must be from 1 to {INT4_MAX} (None removes the limit), got {max_running}"
        )
    was: int | None = await conn_or_pool.fetchval(
        "SELECT pgqueue.set_queue_limit(queue => $1, max_running => $2)", queue, max_running
    )
    return was


async def queue_limits(conn_or_pool: ConnOrPool) -> dict[str, int]:
    """The limited queues and their ``max_running``, by name."""
    asyncpg_target("queue_limits", conn_or_pool)
    rows = await conn_or_pool.fetch(
        "SELECT queue, max_running FROM pgqueue.queue_limits ORDER BY queue"
    )
    return {row["queue"]: row["max_running"] for row in rows}
