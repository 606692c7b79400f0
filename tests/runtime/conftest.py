"""Fixtures for the runtime tests: worker subprocesses and a ``runs`` table."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import asyncpg
import pytest
from runtime_helpers import start_worker
from worker_harness import SpawnWorker, spawned_workers


@pytest.fixture
def spawn_worker(db_dsn: str) -> Iterator[SpawnWorker]:
    """``spawn_worker("--concurrency", "4")`` starts a worker on ``db_dsn``; killed at teardown."""
    with spawned_workers(functools.partial(start_worker, db_dsn)) as spawn:
        yield spawn


@pytest.fixture
async def db(conn: asyncpg.Connection) -> asyncpg.Connection:
    """``conn`` plus the ``runs`` table the test app writes to."""
    await conn.execute(
        """CREATE TABLE runs (
            job_id bigint NOT NULL, attempt int NOT NULL, pid int NOT NULL,
            started timestamptz NOT NULL DEFAULT clock_timestamp())"""
    )
    return conn
