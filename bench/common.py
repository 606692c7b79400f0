"""Shared helpers: databases, repetition statistics, CPU accounting from /proc, subprocesses."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def with_database(dsn: str, dbname: str) -> str:
    """The same server DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


async def recreate_database(server_dsn: str, dbname: str) -> str:
    """Drop (forcing sessions out) and create ``dbname``; return its DSN."""
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{dbname}"')
    finally:
        await conn.close()
    return with_database(server_dsn, dbname)


async def drop_database(server_dsn: str, dbname: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    finally:
        await conn.close()


# --------------------------------------------------------------------------- statistics


def summary(values: Iterable[float]) -> dict[str, Any]:
    """Median and range of the repetitions of one measurement."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "runs": vals,
    }


def percentile(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, round(p / 100 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[k]


async def repeat(
    reps: int, fn: Callable[[], Awaitable[Mapping[str, float | None]]]
) -> dict[str, Any]:
    """Run ``fn`` ``reps`` times; every key it returns gets a median/min/max summary."""
    return (await alternate(reps, {"": fn}))[""]


async def alternate(
    reps: int, fns: Mapping[str, Callable[[], Awaitable[Mapping[str, float | None]]]]
) -> dict[str, dict[str, Any]]:
    """Run each of ``fns`` ``reps`` times, taking turns (a, b, a, b...), so that the
    machine's drift over the minutes this takes hits every variant alike; every key each
    returns gets a median/min/max summary, per variant."""
    runs: dict[str, list[Mapping[str, float | None]]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            runs[name].append(await fn())
    return {
        name: {k: summary(v for r in rs if (v := r.get(k)) is not None) for k in rs[0]}
        for name, rs in runs.items()
    }


# --------------------------------------------------------------------------- CPU from /proc


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (its threads included), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_memory_mib(pid: int) -> dict[str, float] | None:
    """Resident memory of one process from /proc: ``rss`` now and ``peak`` (the most it has
    held since it started, VmHWM), in MiB; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    kib = {name: int(fields[key].split()[0]) for name, key in (("rss", "VmRSS"), ("peak", "VmHWM"))}
    return {name: value / 1024 for name, value in kib.items()}


def peak_mib(pids: Iterable[int]) -> float | None:
    """The largest peak resident memory among ``pids`` (each worker process on its own)."""
    peaks = [m["peak"] for p in pids if (m := proc_memory_mib(p)) is not None]
    return max(peaks) if peaks else None


async def traced_peak_kib(call: Any) -> float:
    """The most Python memory allocated at once while ``call()`` runs, in KiB (what was
    allocated before it does not count)."""
    tracemalloc.start()
    try:
        await call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 1024


_PG_PIDS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
   OR backend_type IN ('walwriter', 'checkpointer', 'background writer', 'autovacuum launcher',
                       'autovacuum worker', 'walsender')
"""


async def postgres_pids(conn: asyncpg.Connection) -> list[int]:
    """Backends of the benchmark's database and the server's shared writers (WAL, checkpoints).

    Other databases on the same server (a test suite running meanwhile) are left out.
    """
    return [r["pid"] for r in await conn.fetch(_PG_PIDS)]


@dataclass
class CpuMeter:
    """CPU seconds spent by chosen client processes and by PostgreSQL over a window.

    A backend that connects inside the window counts from zero; one that exits inside it is
    lost, so windows are closed before the clients disconnect. The measuring connection's
    own backend is left out.
    """

    conn: asyncpg.Connection
    pids: list[int] = field(default_factory=list)
    _start: dict[int, float] = field(default_factory=dict)
    _pg_start: dict[int, float] = field(default_factory=dict)
    _t0: float = 0.0

    async def start(self) -> None:
        self._pg_start = {
            p: c for p in await postgres_pids(self.conn) if (c := proc_cpu_seconds(p)) is not None
        }
        self._start = {p: proc_cpu_seconds(p) or 0.0 for p in self.pids}
        self._t0 = time.perf_counter()

    async def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._t0
        own = 0.0
        for p in self.pids:
            now = proc_cpu_seconds(p)
            if now is not None:
                own += now - self._start.get(p, 0.0)
        pg = 0.0
        for p in await postgres_pids(self.conn):
            now = proc_cpu_seconds(p)
            if now is not None:
                pg += now - self._pg_start.get(p, 0.0)
        return {"wall_s": wall, "client_cpu_s": own, "pg_cpu_s": pg}


# --------------------------------------------------------------------------- subprocesses


async def drain_loops(
    dsn: str,
    conns: list[asyncpg.Connection],
    n: int,
    step: Callable[[asyncpg.Connection, str], Awaitable[int]],
    prefix: str,
) -> dict[str, float]:
    """Run ``step`` (claim a batch, finish it, return how many) on every connection until
    each gets 0, metering this process's and PostgreSQL's CPU; every one of ``n`` jobs must be
    done. The shared shape of the raw ceiling and the SQL-only drain.
    """
    done = [0] * len(conns)

    async def loop(i: int, conn: asyncpg.Connection) -> None:
        me = f"{prefix}-{i}"
        while count := await step(conn, me):
            done[i] += count

    admin = await asyncpg.connect(dsn)
    try:
        meter = CpuMeter(admin, pids=[os.getpid()])
        await meter.start()
        await asyncio.gather(*(loop(i, c) for i, c in enumerate(conns)))
        cpu = await meter.stop()
    finally:
        await admin.close()
    assert sum(done) == n, (sum(done), n)
    return {
        "jobs_per_s": n / cpu["wall_s"],
        "client_cpu_ms_per_1k": cpu["client_cpu_s"] * 1e6 / n,
        "pg_cpu_ms_per_1k": cpu["pg_cpu_s"] * 1e6 / n,
    }


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.pop("PYTHONSTARTUP", None)
    if extra:
        env.update(extra)
    return env


def spawn_python(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``python ARGS`` from the repository root, stdout and stderr to ``log``."""
    out = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env or python_env(),
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL: only the process we started, by its pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_until(
    check: Callable[[], Awaitable[bool]], limit: float, every: float = 0.01
) -> float:
    """Poll ``check`` until true (at most ``limit`` seconds); return when it was first true."""
    deadline = time.perf_counter() + limit
    while True:
        if await check():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(every)


def read_stamps(path: Path) -> dict[int, float]:
    """A stamp file's ``seq wall_time`` lines (handler starts, written by the consumers)."""
    out = {}
    for line in path.read_text().splitlines():
        seq, t = line.split()
        out[int(seq)] = float(t)
    return out


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
