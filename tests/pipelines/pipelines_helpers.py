"""Helpers for the pipeline tests: ``pgqueue worker pipelines_app:app`` subprocesses, waits.

Synchronisation is by polling with deadlines, never by bare sleeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


class WorkerProcess:
    """A worker subprocess whose stderr is collected line by line."""

    def __init__(self, dsn: str, *args: str) -> None:
        env = dict(os.environ)
        env["PGQUEUE_DSN"] = dsn
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(HERE), *filter(None, [env.get("PYTHONPATH")])]
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgqueue.cli", "worker", "pipelines_app:app", *args],
            env=env,
            cwd=HERE,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines)

    async def ready(self, within: float = 15) -> None:
        """Wait until the worker LISTENs."""
        deadline = time.monotonic() + within
        while not any("listening on channel" in line for line in list(self.lines)):
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not listening within {within}s:\n{self.log()}")
            await anyio.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


SpawnWorker = Callable[..., WorkerProcess]


async def wait_until(
    check: Callable[[], Awaitable[Any]], *, within: float = 30, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await anyio.sleep(0.05)


async def wait_pipeline_done(
    conn: asyncpg.Connection, pipeline_id: uuid.UUID, within: float = 30
) -> asyncpg.Record:
    """Wait until ``pgqueue.pipelines`` says the pipeline is done; return its row."""

    async def done() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await conn.fetchrow(
            "SELECT * FROM pgqueue.pipelines WHERE pipeline_id = $1 AND done", pipeline_id
        )
        return row

    row: asyncpg.Record = await wait_until(done, within=within, what=f"pipeline {pipeline_id}")
    return row
