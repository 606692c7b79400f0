"""The floor for a Python worker: the least a worker can do per job on pgqueue's SQL.

``python -m bench.lean_worker DSN CONCURRENCY`` runs no-op jobs with plain asyncio and three
dedicated asyncpg connections: one ``LISTEN``, one claiming (``claim_next`` sized to the free
slots), one writing outcomes (``complete_many`` of whatever finished while the previous
write was in flight). ``concurrency`` long-lived runner tasks take jobs from a queue. No
retries, timeouts, heartbeats, logging or shutdown grace: it is a measuring stick for the
runtime's own cost per job, not a worker to use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

import asyncpg

CLAIM = "SELECT id, job_type, payload FROM pgqueue.claim_next(worker => $1, batch_size => $2)"
DONE = "SELECT pgqueue.complete_many(worker => $1, job_ids => $2::bigint[])"


async def main(dsn: str, concurrency: int) -> None:
    me = f"lean-{os.getpid()}"
    claimer = await asyncpg.connect(dsn)
    writer = await asyncpg.connect(dsn)
    listener = await asyncpg.connect(dsn)
    wake = asyncio.Event()
    await listener.add_listener("pgqueue", lambda *_: wake.set())
    jobs: asyncio.Queue[Any] = asyncio.Queue()
    finished: list[int] = []
    flush = asyncio.Event()
    slot = asyncio.Event()
    stop = asyncio.Event()
    free = concurrency
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def handler(job: Any) -> None:
        return None

    async def runner() -> None:
        while True:
            job = await jobs.get()
            await handler(job)
            finished.append(job["id"])
            flush.set()

    async def flusher() -> None:
        nonlocal free
        while True:
            await flush.wait()
            flush.clear()
            while finished:
                batch = finished[:500]
                del finished[:500]
                await writer.fetch(DONE, me, batch)
                free += len(batch)
                slot.set()

    async def producer() -> None:
        nonlocal free
        more = True
        while not stop.is_set():
            if free == 0:
                slot.clear()
                await slot.wait()
                continue
            if not more:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 5)
            want = free
            rows = await claimer.fetch(CLAIM, me, want)
            free -= len(rows)
            for row in rows:
                jobs.put_nowait(row)
            more = len(rows) == want

    tasks = [asyncio.create_task(runner()) for _ in range(concurrency)]
    tasks += [asyncio.create_task(flusher()), asyncio.create_task(producer())]
    print("ready", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
