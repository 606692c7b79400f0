"""Fixtures for the pipeline tests: worker subprocesses, a ``runs`` and a ``flags`` table."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest
from pipelines_helpers import SpawnWorker, WorkerProcess


@pytest.fixture
def spawn_worker(db_dsn: str) -> Iterator[SpawnWorker]:
    """``spawn_worker("--concurrency", "4")`` starts a worker on ``db_dsn``; killed at teardown."""
    started: list[WorkerProcess] = []

    def spawn(*args: str) -> WorkerProcess:
        worker = WorkerProcess(db_dsn, "--poll-interval", "0.5", *args)
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        worker.close()


@pytest.fixture
async def db(conn: asyncpg.Connection) -> asyncpg.Connection:
    """``conn`` plus the tables pipelines_app writes to and reads."""
    await conn.execute(
        """CREATE TABLE runs (
            id bigserial PRIMARY KEY, job_id bigint NOT NULL, job_type text NOT NULL,
            pipeline_id uuid, parent_id bigint, attempt int NOT NULL, pid int NOT NULL,
            started timestamptz NOT NULL DEFAULT clock_timestamp(), ended timestamptz);
        CREATE TABLE flags (name text PRIMARY KEY);"""
    )
    return conn
