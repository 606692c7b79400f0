"""The runtime tests' worker app and log capture; the subprocess and waiting helpers are
tests/worker_harness.py."""

from __future__ import annotations

import logging
from pathlib import Path

from worker_harness import WorkerProcess

HERE = Path(__file__).resolve().parent


def start_worker(dsn: str, *args: str) -> WorkerProcess:
    """A ``pgqueue worker worker_app:app`` subprocess (worker_app.py, in this folder) on ``dsn``."""
    return WorkerProcess("worker_app:app", HERE, dsn, *args)


class Records(logging.Handler):
    """Every record a worker logs, for assertions on its outcome lines (see the ``records``
    fixture: a logger of its own, so ``caplog`` and other tests' logging setup do not matter)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def outcomes(self, job_id: int) -> list[str]:
        """The outcome of each outcome line logged for ``job_id``."""
        return [
            r.__dict__["outcome"]
            for r in self.records
            if r.__dict__.get("job_id") == job_id and "outcome" in r.__dict__
        ]

    def count(self, text: str) -> int:
        return sum(text in r.getMessage() for r in self.records)

    async def logged(self, text: str) -> bool:
        """For ``wait_until``: has a line containing ``text`` been logged?"""
        return self.count(text) > 0

    async def outcome_logged(self, job_id: int) -> bool:
        """For ``wait_until``: has the outcome of ``job_id`` been logged?"""
        return bool(self.outcomes(job_id))

    def text(self) -> str:
        return "\n".join(f"{r.levelname} {r.getMessage()}" for r in self.records)
