"""Pausing and resuming queues: ``pgqueue.pause_queue`` and ``pgqueue.resume_queue``.

A paused queue keeps accepting jobs, and its running jobs finish; claims just take none of
its jobs until it is resumed, which also wakes the workers listening on it.
"""

from __future__ import annotations

from pgqueue.dsn import ConnOrPool


async def pause_queue(conn_or_pool: ConnOrPool, queue: str) -> bool:
    """Stop workers from claiming jobs of ``queue``; False if it was paused already.

    Claims already under way when this commits may still take jobs of it; none that start
    after. Inside a transaction the pause takes effect when that transaction commits.
    """
    paused: bool = await conn_or_pool.fetchval("SELECT pgqueue.pause_queue(queue => $1)", queue)
    return paused


async def resume_queue(conn_or_pool: ConnOrPool, queue: str) -> bool:
    """Let workers claim jobs of ``queue`` again (idle ones are notified); False if it was
    not paused."""
    resumed: bool = await conn_or_pool.fetchval("SELECT pgqueue.resume_queue(queue => $1)", queue)
    return resumed


async def paused_queues(conn_or_pool: ConnOrPool) -> list[str]:
    """The paused queues, by name."""
    rows = await conn_or_pool.fetch("SELECT queue FROM pgqueue.paused_queues ORDER BY queue")
    return [row["queue"] for row in rows]
