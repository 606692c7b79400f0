"""The runtime tests' worker app; the subprocess and waiting helpers are tests/worker_harness.py."""

from __future__ import annotations

from pathlib import Path

from worker_harness import WorkerProcess

HERE = Path(__file__).resolve().parent


def start_worker(dsn: str, *args: str) -> WorkerProcess:
    """A ``pgqueue worker worker_app:app`` subprocess (worker_app.py, in this folder) on ``dsn``."""
    return WorkerProcess("worker_app:app", HERE, dsn, *args)
