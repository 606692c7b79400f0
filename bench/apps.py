"""The handlers the benchmarked ``pgqueue worker`` runs (``bench.apps:app``).

``noop`` does nothing, so a drain measures the queue, not the handler. ``stamp`` records the
wall-clock time its handler started (the pickup-latency probe); it appends to the file named
by ``$BENCH_STAMP_FILE`` rather than returning it so that every system measured (pgqueue and
the peers) reports its handler start the same way. ``fanout`` returns N children plus a join.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pgqueue

app = pgqueue.App()

_stamp_file = None


@app.job("noop")
async def noop(job: pgqueue.Job) -> None:
    return None


@app.job("stamp")
async def stamp(job: pgqueue.Job) -> None:
    now = time.time()
    global _stamp_file
    if _stamp_file is None:
        _stamp_file = open(os.environ["BENCH_STAMP_FILE"], "a", buffering=1)  # noqa: ASYNC230
    _stamp_file.write(f"{job.payload['seq']} {now!r}\n")


@app.job("fanout")
async def fanout(job: pgqueue.Job) -> Any:
    n = int(job.payload["n"])
    children: list[dict[str, Any]] = [{"job_type": "noop", "key": f"c{i}"} for i in range(n)]
    children.append({"job_type": "noop", "key": "join", "after": [f"c{i}" for i in range(n)]})
    return pgqueue.Result(None, next_jobs=children)
