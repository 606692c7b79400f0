"""Fixtures for the runtime tests: worker subprocesses, a ``runs`` table, log capture."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from runtime_helpers import Records, start_worker
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


@pytest.fixture
def records() -> Iterator[tuple[logging.Logger, Records]]:
    """A logger of its own for a Worker (``logger=``), and what it logged."""
    logger = logging.getLogger(f"pgqueue.test.{uuid.uuid4().hex}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = Records()
    logger.addHandler(handler)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
