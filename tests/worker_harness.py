"""Real ``pgqueue worker`` subprocesses for the tests, and waiting on the database.

Shared by tests/runtime and tests/pipelines (tests/ is on ``sys.path`` because
tests/conftest.py lives here; the subprocesses get it on ``PYTHONPATH``). Each folder
names its own app (``worker_app:app``, ``pipelines_app:app``) in its ``*_helpers.py``.

Synchronisation is by polling with deadlines (a log line, a row), never by bare sleeps.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


class WorkerProcess:
    """A ``pgqueue worker APP`` subprocess whose stderr is collected line by line.

    ``app`` is ``module:attribute``, importable from ``app_dir`` (the working directory).
    """

    def __init__(self, app: str, app_dir: Path, dsn: str, *args: str) -> None:
        env = dict(os.environ)
        env["PGQUEUE_DSN"] = dsn
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(app_dir), str(TESTS), *filter(None, [env.get("PYTHONPATH")])]
        )
        self.args = [sys.executable, "-m", "pgqueue.cli", "worker", app, *args]
        self.proc = subprocess.Popen(
            self.args,
            env=env,
            cwd=app_dir,
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

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return "\n".join(self.lines)

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    async def wait_for_log(self, text: str, *, times: int = 1, within: float = 15) -> None:
        """Wait until ``text`` has appeared in ``times`` log lines (fail on exit or deadline)."""
        deadline = time.monotonic() + within
        while self.count(text) < times:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} x{times} within {within}s:\n{self.log()}")
            await anyio.sleep(0.02)

    async def ready(self, within: float = 15) -> None:
        """Wait until the worker LISTENs (and has therefore swept once)."""
        await self.wait_for_log("listening on channel", within=within)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait_exit(self, within: float) -> int:
        deadline = time.monotonic() + within
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"worker still running after {within}s:\n{self.log()}")
            await anyio.sleep(0.02)
        self._reader.join(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Kill if needed, then close the stderr pipe once the reader has drained it."""
        self.kill()
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


SpawnWorker = Callable[..., WorkerProcess]


@contextlib.contextmanager
def spawned_workers(start: SpawnWorker) -> Iterator[SpawnWorker]:
    """``start`` (extra args -> a worker), remembering every worker to close it on the way out.

    The body of the folders' ``spawn_worker`` fixtures.
    """
    started: list[WorkerProcess] = []

    def spawn(*args: str) -> WorkerProcess:
        worker = start(*args)
        started.append(worker)
        return worker

    try:
        yield spawn
    finally:
        for worker in started:
            worker.close()


async def wait_until(
    check: Callable[[], Awaitable[Any]],
    *,
    within: float = 15,
    what: str = "condition",
    every: float = 0.02,
) -> Any:
    """Poll ``check`` every ``every`` seconds until it returns something truthy; fail after
    ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await anyio.sleep(every)


async def wait_for_states(
    conn: asyncpg.Connection, ids: list[int], state: str = "succeeded", within: float = 15
) -> None:
    """Wait until every job in ``ids`` is in ``state``."""

    async def done() -> bool:
        n = await conn.fetchval(
            "SELECT count(*) FROM pgqueue.jobs WHERE id = ANY($1) AND state = $2", ids, state
        )
        return bool(n == len(ids))

    await wait_until(done, within=within, what=f"{len(ids)} job(s) {state}")


class AppPool:
    """For the test apps, inside the worker: ``await pool()`` is one small asyncpg pool on
    ``$PGQUEUE_DSN``, created on first use (on the worker's event loop)."""

    def __init__(self) -> None:
        self._pool: asyncpg.Pool | None = None
        self._lock = anyio.Lock()

    async def __call__(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    os.environ["PGQUEUE_DSN"], min_size=0, max_size=4
                )
        return self._pool


def dsn_as(dsn: str, user: str, password: str) -> str:
    """``dsn`` (its host, port, database and options) for another role."""
    parts = urlsplit(dsn)
    host_and_port = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host_and_port}"))
