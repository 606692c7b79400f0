"""Pickup latency of two trees at once: ``python -m bench.side_by_side OTHER_TREE``.

The latency section of ``python -m bench`` measures one system at a time, and this machine's
speed drifts between runs by more than a small change costs (section 19 of bench/analysis.md:
a 0.05-0.09 ms "regression" over 4-8 alternating runs each was drift). Here an idle
``pgqueue worker`` of each tree (this one, and OTHER_TREE, e.g. a ``git worktree`` of an
earlier commit) runs on a database migrated by that tree, and one producer offers jobs to the
two in turn, so both see the same minutes. Prints p50 / p90 / p99 of handler start minus the
producer's commit acknowledgement, per tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.common import REPO, drop_database, read_stamps, recreate_database
from bench.run import DEFAULT_DSN


async def _side(server_dsn: str, name: str, tree: Path, stamps: Path) -> subprocess.Popen[bytes]:
    """A database migrated by ``tree`` and an idle worker of ``tree`` on it."""
    dsn = await recreate_database(server_dsn, f"pgqueue_side_{name}")
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "PGQUEUE_DSN": dsn,
        "BENCH_STAMP_FILE": str(stamps),
    }
    cli = [sys.executable, "-m", "pgqueue.cli"]
    migrate = [*cli, "migrate"]
    await asyncio.to_thread(
        subprocess.run, migrate, cwd=tree, env=env, check=True, capture_output=True
    )
    worker = [*cli, "worker", "bench.apps:app", "--concurrency", "10", "--log-level", "warning"]
    return await asyncio.to_thread(
        subprocess.Popen, worker, cwd=tree, env=env, stdout=subprocess.DEVNULL
    )


async def main(server_dsn: str, other: Path, n: int, rate: float) -> None:
    trees = {"this": REPO, "other": other}
    tmp = Path(tempfile.mkdtemp(prefix="pgqueue-side-"))
    stamps = {name: tmp / f"{name}.txt" for name in trees}
    procs = {name: await _side(server_dsn, name, trees[name], stamps[name]) for name in trees}
    conns = {
        name: await asyncpg.connect(server_dsn.rsplit("/", 1)[0] + f"/pgqueue_side_{name}")
        for name in trees
    }
    try:
        await asyncio.sleep(3)  # both workers idle and listening
        acks: dict[str, dict[int, float]] = {name: {} for name in trees}
        order = ("this", "other")
        nxt = time.perf_counter()
        for seq in range(n):
            name = order[(seq + seq // 2) % 2]  # this, other, other, this, ...: no fixed lead
            payload = json.dumps({"seq": seq})
            await conns[name].fetchval("SELECT pgqueue.enqueue('stamp', $1::jsonb)", payload)
            acks[name][seq] = time.time()
            nxt += 1.0 / rate
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
        await asyncio.sleep(2)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(20)
        for name, conn in conns.items():
            await conn.close()
            await drop_database(server_dsn, f"pgqueue_side_{name}")
    for name in trees:
        starts = read_stamps(stamps[name])
        ms = sorted((starts[s] - t) * 1000 for s, t in acks[name].items() if s in starts)
        print(
            f"{name:5} {trees[name]}: {len(ms)}/{len(acks[name])} jobs, p50"
            f" {statistics.median(ms):.3f} ms, p90 {_at(ms, 0.9):.3f}, p99 {_at(ms, 0.99):.3f}"
        )


def _at(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other tree (a checkout of pgqueue)")
    parser.add_argument("--dsn", default=os.environ.get("PGQUEUE_BENCH_DSN", DEFAULT_DSN))
    parser.add_argument("-n", type=int, default=1500, help="jobs offered in all (default 1500)")
    parser.add_argument("--rate", type=float, default=50.0, help="jobs per second (default 50)")
    args = parser.parse_args()
    asyncio.run(main(args.dsn, args.other.resolve(), args.n, args.rate))
