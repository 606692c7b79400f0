"""Peers measured in the same run: PGQueuer and procrastinate (the ``bench`` extra).

Each peer gets its own database and is driven through its own public API, configured at
its best for a no-op workload: PGQueuer with batch sizes 50 and 200 on asyncpg,
procrastinate with its psycopg connector at concurrency 10 (and 50 in full mode). Their
workers run as subprocesses started from this module (``python -m bench.peers ...``), so
their CPU is measured the same way as ``pgqueue worker``'s.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import CpuMeter, peak_mib, python_env, spawn_python, stop_process, wait_until
from bench.raw import timed_loop


def available(name: str) -> str | None:
    """The installed version of a peer, or None."""
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def libpq_dsn(dsn: str) -> str:
    return dsn.replace("postgresql+asyncpg://", "postgresql://")


class PeerWorker:
    """A peer's worker subprocess; ready once it printed 'ready' and had time to LISTEN."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = env or {}
        self.log = Path(tempfile.mkdtemp(prefix="pgqueue-bench-peer-")) / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> PeerWorker:
        self.proc = spawn_python(["-m", "bench.peers", *self.args], self.log, python_env(self.env))

        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer worker exited: {self.log.read_text()[-2000:]}")
            return self.log.exists() and "ready" in self.log.read_text()

        await wait_until(ready, 60, 0.05)
        await asyncio.sleep(1.5)
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if self.proc is not None:
            await asyncio.to_thread(stop_process, self.proc)
        if exc_type is None:  # keep the log only when something went wrong
            shutil.rmtree(self.log.parent, ignore_errors=True)


async def _drain(
    dsn: str, worker_args: list[str], enqueue, done_sql: str, n: int
) -> dict[str, float]:  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(dsn)
    try:
        async with PeerWorker(worker_args) as w:
            assert w.proc is not None
            meter = CpuMeter(conn, pids=[w.proc.pid])
            await enqueue(n)
            await meter.start()
            t0 = time.perf_counter()

            async def done() -> bool:
                return bool(await conn.fetchval(done_sql))

            t1 = await wait_until(done, 600, 0.01)
            cpu = await meter.stop()
            peak = peak_mib([w.proc.pid])
    finally:
        await conn.close()
    return {
        "jobs_per_s": n / (t1 - t0),
        "worker_cpu_ms_per_1k": cpu["client_cpu_s"] * 1e6 / n,
        "pg_cpu_ms_per_1k": cpu["pg_cpu_s"] * 1e6 / n,
        "worker_peak_mib": peak,
    }


async def _latency(
    dsn: str, worker_args: list[str], enqueue_one, n: int, rate: float
) -> list[float]:  # type: ignore[no-untyped-def]
    stamp = Path(tempfile.mkdtemp(prefix="pgqueue-bench-peer-")) / "stamps.txt"
    stamp.touch()
    acks: dict[int, float] = {}
    async with PeerWorker(worker_args, {"BENCH_STAMP_FILE": str(stamp)}):
        interval = 1.0 / rate
        nxt = time.perf_counter()
        for seq in range(n):
            await enqueue_one(seq)
            acks[seq] = time.time()
            nxt += interval
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

        async def all_stamped() -> bool:
            return len(stamp.read_text().splitlines()) >= n

        await wait_until(all_stamped, 30, 0.05)
    from bench.common import read_stamps

    starts = read_stamps(stamp)
    shutil.rmtree(stamp.parent, ignore_errors=True)
    return [(starts[s] - acks[s]) * 1000 for s in range(n)]


# =========================================================================== PGQueuer


class PGQueuer:
    name = "pgqueuer"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def setup(self) -> None:
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(self.dsn)
        try:
            await Queries.from_asyncpg_connection(conn).install()
        finally:
            await conn.close()

    async def _reset(self, conn: asyncpg.Connection) -> None:
        await conn.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")

    async def enqueue_single(self, seconds: float) -> float:
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(self.dsn)
        try:
            await self._reset(conn)
            q = Queries.from_asyncpg_connection(conn)
            return await timed_loop([conn], seconds, lambda _c: q.enqueue("noop", None))
        finally:
            await conn.close()

    async def enqueue_bulk(self, n: int) -> float:
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(self.dsn)
        try:
            await self._reset(conn)
            q = Queries.from_asyncpg_connection(conn)
            t0 = time.perf_counter()
            await q.enqueue(["noop"] * n, [None] * n, [0] * n)
            return n / (time.perf_counter() - t0)
        finally:
            await conn.close()

    async def drain(self, n: int, batch: int) -> dict[str, float]:
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(self.dsn)
        try:
            await self._reset(conn)
            q = Queries.from_asyncpg_connection(conn)

            async def enqueue(count: int) -> None:
                await q.enqueue(["noop"] * count, [None] * count, [0] * count)

            return await _drain(
                self.dsn,
                ["pgqueuer", self.dsn, str(batch)],
                enqueue,
                "SELECT NOT EXISTS (SELECT 1 FROM pgqueuer)",
                n,
            )
        finally:
            await conn.close()

    async def latency(self, n: int, rate: float) -> list[float]:
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(self.dsn)
        try:
            await self._reset(conn)
            q = Queries.from_asyncpg_connection(conn)
            return await _latency(
                self.dsn,
                ["pgqueuer", self.dsn, "10"],
                lambda seq: q.enqueue("stamp", str(seq).encode()),
                n,
                rate,
            )
        finally:
            await conn.close()


async def run_pgqueuer_worker(dsn: str, batch: int) -> None:
    from pgqueuer import QueueManager
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries.from_asyncpg_connection(conn))
    stamp_file = None

    @qm.entrypoint("noop")
    async def noop(job: Any) -> None:
        return None

    @qm.entrypoint("stamp")
    async def stamp(job: Any) -> None:
        now = time.time()
        nonlocal stamp_file
        if stamp_file is None:
            stamp_file = open(os.environ["BENCH_STAMP_FILE"], "a", buffering=1)  # noqa: ASYNC230
        stamp_file.write(f"{job.payload.decode()} {now!r}\n")

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, qm.shutdown.set)
    print("ready", flush=True)
    await qm.run(batch_size=batch, dequeue_timeout=timedelta(seconds=5))
    await conn.close()


# =========================================================================== procrastinate


def _procrastinate_app(dsn: str, pool_size: int = 10):  # type: ignore[no-untyped-def]
    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=libpq_dsn(dsn), min_size=1, max_size=pool_size
        )
    )
    stamp_file = None

    @app.task(name="noop")
    async def noop() -> None:
        return None

    @app.task(name="stamp")
    async def stamp(seq: int) -> None:
        now = time.time()
        nonlocal stamp_file
        if stamp_file is None:
            stamp_file = open(os.environ["BENCH_STAMP_FILE"], "a", buffering=1)  # noqa: ASYNC230
        stamp_file.write(f"{seq} {now!r}\n")

    return app, noop, stamp


class Procrastinate:
    name = "procrastinate"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def setup(self) -> None:
        app, _, _ = _procrastinate_app(self.dsn, 1)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    async def _reset(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(
                "TRUNCATE procrastinate_jobs, procrastinate_events,"
                " procrastinate_periodic_defers CASCADE"
            )
        finally:
            await conn.close()

    async def enqueue_single(self, seconds: float) -> float:
        await self._reset()
        app, noop, _ = _procrastinate_app(self.dsn, 1)
        async with app.open_async():
            return await timed_loop([None], seconds, lambda _c: noop.defer_async())  # type: ignore[list-item]

    async def enqueue_bulk(self, n: int) -> float:
        await self._reset()
        app, noop, _ = _procrastinate_app(self.dsn, 1)
        async with app.open_async():
            t0 = time.perf_counter()
            await noop.batch_defer_async(*([{}] * n))
            return n / (time.perf_counter() - t0)

    async def drain(self, n: int, concurrency: int) -> dict[str, float]:
        await self._reset()
        app, noop, _ = _procrastinate_app(self.dsn, 1)

        async def enqueue(count: int) -> None:
            async with app.open_async():
                await noop.batch_defer_async(*([{}] * count))

        return await _drain(
            self.dsn,
            ["procrastinate", self.dsn, str(concurrency)],
            enqueue,
            "SELECT NOT EXISTS (SELECT 1 FROM procrastinate_jobs"
            " WHERE status IN ('todo', 'doing'))",
            n,
        )

    async def latency(self, n: int, rate: float) -> list[float]:
        await self._reset()
        app, _, stamp = _procrastinate_app(self.dsn, 1)
        async with app.open_async():
            return await _latency(
                self.dsn,
                ["procrastinate", self.dsn, "10"],
                lambda seq: stamp.defer_async(seq=seq),
                n,
                rate,
            )


async def run_procrastinate_worker(dsn: str, concurrency: int) -> None:
    app, _, _ = _procrastinate_app(dsn, concurrency + 2)
    async with app.open_async():
        print("ready", flush=True)
        await app.run_worker_async(concurrency=concurrency, wait=True, listen_notify=True)


def main() -> None:
    kind, dsn, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kind == "pgqueuer":
        asyncio.run(run_pgqueuer_worker(dsn, arg))
    elif kind == "procrastinate":
        import logging

        logging.basicConfig(level=logging.WARNING)
        asyncio.run(run_procrastinate_worker(dsn, arg))
    else:
        raise SystemExit(f"unknown peer {kind}")


if __name__ == "__main__":
    main()
