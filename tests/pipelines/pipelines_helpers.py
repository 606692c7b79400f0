"""The pipeline tests' worker app and pipeline wait; the rest is tests/worker_harness.py."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
from worker_harness import WorkerProcess, wait_until

HERE = Path(__file__).resolve().parent


def start_worker(dsn: str, *args: str) -> WorkerProcess:
    """A ``pgqueue worker pipelines_app:app`` subprocess (pipelines_app.py, here) on ``dsn``."""
    return WorkerProcess("pipelines_app:app", HERE, dsn, *args)


async def wait_pipeline_done(
    conn: asyncpg.Connection, pipeline_id: uuid.UUID, within: float = 30
) -> asyncpg.Record:
    """Wait until ``pgqueue.pipelines`` says the pipeline is done; return its row."""

    async def done() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await conn.fetchrow(
            "SELECT * FROM pgqueue.pipelines WHERE pipeline_id = $1 AND done", pipeline_id
        )
        return row

    row: asyncpg.Record = await wait_until(
        done, within=within, what=f"pipeline {pipeline_id}", every=0.05
    )
    return row
