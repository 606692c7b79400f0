"""Fixtures for the pipeline tests: worker subprocesses, a ``runs`` and a ``flags`` table."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import asyncpg
import pytest
from pipelines_helpers import start_worker
from worker_harness import SpawnWorker, spawned_workers


@pytest.fixture
def spawn_worker(db_dsn: str) -> Iterator[SpawnWorker]:
    """``spawn_worker("--concurrency", "4")`` starts a worker on ``db_dsn``; killed at teardown."""
    start = functools.partial(start_worker, db_dsn, "--poll-interval", "0.5")
    with spawned_workers(start) as spawn:
        yield spawn


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
