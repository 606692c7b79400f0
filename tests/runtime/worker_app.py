"""The app the runtime tests run in real ``pgqueue worker`` subprocesses.

``work`` records every run it starts in ``public.runs`` (on its own small pool), so tests can
count runs per job independently of what the queue itself says.
Payload: ``sleep`` (seconds), ``sleep_on_attempt`` (only sleep on that attempt).
"""

from __future__ import annotations

import os
from typing import Any

import anyio
from worker_harness import AppPool

import pgqueue

app = pgqueue.App()
_db = AppPool()  # the app's own small pool on $PGQUEUE_DSN


@app.job("work")
async def work(job: pgqueue.Job) -> dict[str, Any]:
    pool = await _db()
    await pool.execute(
        "INSERT INTO runs (job_id, attempt, pid) VALUES ($1, $2, $3)",
        job.id,
        job.attempts,
        os.getpid(),
    )
    seconds = float(job.payload.get("sleep", 0))
    only_on = job.payload.get("sleep_on_attempt")
    if seconds and (only_on is None or only_on == job.attempts):
        await anyio.sleep(seconds)
    return {"pid": os.getpid()}
