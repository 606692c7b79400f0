"""The app the pipeline tests run in real ``pgqueue worker`` subprocesses.

Every run is recorded in ``public.runs`` (job id, type, pipeline, parent, start and end time)
on the app's own pool, so tests can count runs and check ordering independently of the queue.

``spread`` fans out: payload ``{"n": N, "child": TYPE, "child_payload": {...},
"join": TYPE or absent, "join_payload": {...}}``. Child ``i`` gets ``{"i": i}`` merged in.
``work`` fails while ``payload["fail_unless_flag"]`` names a flag missing from ``public.flags``.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
from worker_harness import AppPool

import pgqueue

app = pgqueue.App()
_db = AppPool()  # the app's own small pool on $PGQUEUE_DSN


async def _record(job: pgqueue.Job) -> int:
    pool = await _db()
    run_id: int = await pool.fetchval(
        "INSERT INTO runs (job_id, job_type, pipeline_id, parent_id, attempt, pid)"
        " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        job.id,
        job.job_type,
        job.pipeline_id,
        job.parent_id,
        job.attempts,
        os.getpid(),
    )
    return run_id


async def _finish(run_id: int) -> None:
    pool = await _db()
    await pool.execute("UPDATE runs SET ended = clock_timestamp() WHERE id = $1", run_id)


@app.job("spread")
async def spread(job: pgqueue.Job) -> pgqueue.Result:
    run_id = await _record(job)
    p = job.payload
    children = (
        pgqueue.Spec(p["child"], {**p.get("child_payload", {}), "i": i}) for i in range(p["n"])
    )
    join = pgqueue.Spec(p["join"], p.get("join_payload", {})) if p.get("join") else None
    await _finish(run_id)
    return pgqueue.Result({"n": p["n"]}).fan_out(children, join=join)


@app.job("work")
async def work(job: pgqueue.Job) -> dict[str, Any]:
    run_id = await _record(job)
    flag = job.payload.get("fail_unless_flag")
    fail_i = job.payload.get("fail_i")
    if flag and (fail_i is None or fail_i == job.payload.get("i")):
        pool = await _db()
        if not await pool.fetchval("SELECT count(*) FROM flags WHERE name = $1", flag):
            raise RuntimeError(f"flag {flag!r} is not set")
    await anyio.sleep(float(job.payload.get("sleep", 0)))
    await _finish(run_id)
    return {"i": job.payload.get("i")}
