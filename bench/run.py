"""``python -m bench [--quick]``: run every measurement, write JSON, the chart and the doc."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py` (the Makefile target) as well as -m
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from bench import pgq, raw
from bench.common import (
    DEFAULT_DSN,
    REPO,
    alternate,
    drop_database,
    log,
    percentile,
    recreate_database,
    repeat,
    summary,
)
from bench.peers import PGQueuer, Procrastinate, available

# The pipeline section repeats each shape this many times the configured repetitions.
PIPELINE_REPS = 3
SECTIONS = ["enqueue", "drain", "latency", "growth", "notify", "pipeline", "scopes", "memory"]


def config(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "mode": "quick",
            "reps": 1,
            "enqueue_seconds": 1.0,
            "bulk_n": 10_000,
            "drain_n": 4_000,
            "drain_n_c1": 500,
            "raw_k1_n": 500,
            "raw_k100_n": 20_000,
            "peer_drain_n": 4_000,
            "procrastinate_n": 500,
            "procrastinate_conc": [10],
            "latency_n": 100,
            "latency_rate": 50.0,
            "growth_sizes": [0, 100_000],
            "growth_claims": 1_000,
            "bloat_n": 10_000,
            "notify_seconds": 1.0,
            "fanouts": [100, 1_000],
            "scoped_n": 2_000,
            "memory_n": 4_000,
            "memory_rounds": 3,
        }
    return {
        "mode": "full",
        "reps": 3,
        "enqueue_seconds": 3.0,
        "bulk_n": 10_000,
        "drain_n": 20_000,
        "drain_n_c1": 2_000,
        "raw_k1_n": 2_000,
        "raw_k100_n": 100_000,
        "peer_drain_n": 20_000,
        "procrastinate_n": 2_000,
        "procrastinate_conc": [10, 50],
        "latency_n": 500,
        "latency_rate": 50.0,
        "growth_sizes": [0, 100_000, 1_000_000],
        "growth_claims": 3_000,
        "bloat_n": 100_000,
        "notify_seconds": 3.0,
        "fanouts": [100, 1_000],
        "scoped_n": 20_000,
        "memory_n": 20_000,
        "memory_rounds": 5,
    }


# --------------------------------------------------------------------------- environment


async def environment(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SELECT version()")
        settings = dict(
            await conn.fetch(
                "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings WHERE name IN ("
                "'shared_buffers','synchronous_commit','fsync','wal_level','max_connections',"
                "'work_mem','checkpoint_timeout','max_wal_size','full_page_writes','wal_sync_method',"
                "'commit_delay','autovacuum','jit','effective_cache_size','huge_pages') ORDER BY 1"
            )
        )
    finally:
        await conn.close()
    return {
        "postgres": version,
        "pg_settings": settings,
        **_machine(),
    }


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "sql", "pgqueue"],
                cwd=REPO,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "unknown", False
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "asyncpg": available("asyncpg"),
        "pgqueuer": available("pgqueuer"),
        "procrastinate": available("procrastinate"),
        "git_commit": commit + (" + uncommitted changes" if dirty else ""),
        "loadavg_at_start": os.getloadavg(),
        "speed_probe_ms_at_start": speed_probe_ms(),
    }


def speed_probe_ms() -> float:
    """Best of five runs of a fixed pure-Python loop, in ms: how fast this machine runs
    Python right now. Ratios cancel the machine's speed out, absolute CPU figures (the
    worker's ms per 1,000 jobs) do not; this says which kind of machine they came from."""
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i & 7
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 1)


# --------------------------------------------------------------------------- sections


async def section_enqueue(cfg: dict[str, Any], dsn: str, peers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    secs, reps = cfg["enqueue_seconds"], cfg["reps"]
    conns = [await asyncpg.connect(dsn) for _ in range(8)]

    def mode(m: str) -> Callable[[], Awaitable[None]]:
        return lambda: pgq.set_notify_mode(conns[0], m)

    try:
        await raw.reset(conns[0])
        await pgq.reset(conns[0])
        for n_conn in (1, 8):
            log(f"enqueue: single calls from {n_conn} connection(s), raw and pgqueue interleaved")
            for _ in range(reps):
                rates = await raw.interleaved(
                    conns[:n_conn],
                    3 * secs,
                    [
                        ("raw", None, lambda c: c.fetchval(raw.INSERT_ONE, "noop", "{}")),
                        ("pgqueue", mode("always"), lambda c: pgq.app.enqueue(c, "noop", {})),
                        (
                            "pgqueue_ww",
                            mode("when_waiting"),
                            lambda c: pgq.app.enqueue(c, "noop", {}),
                        ),
                    ],
                )
                out.setdefault(f"raw_single_{n_conn}", []).append(rates["raw"])
                out.setdefault(f"pgqueue_single_{n_conn}", []).append(rates["pgqueue"])
                out.setdefault(f"pgqueue_ww_single_{n_conn}", []).append(rates["pgqueue_ww"])
        await pgq.set_notify_mode(conns[0], "always")
        log("enqueue: bulk")
        for _ in range(reps):
            out.setdefault("raw_unnest", []).append(
                await raw.enqueue_unnest(conns[0], cfg["bulk_n"])
            )
            out.setdefault("raw_copy", []).append(await raw.enqueue_copy(conns[0], cfg["bulk_n"]))
            out.setdefault("pgqueue_many", []).append(
                await pgq.enqueue_many(conns[0], cfg["bulk_n"])
            )
    finally:
        for c in conns:
            await c.close()
    for name, peer in peers.items():
        for _ in range(reps):
            out.setdefault(f"{name}_single_1", []).append(await peer.enqueue_single(secs))
            out.setdefault(f"{name}_bulk", []).append(await peer.enqueue_bulk(cfg["bulk_n"]))
    return {k: summary(v) for k, v in out.items()}


# `pgqueue worker` configured like the peers, which log nothing per job: failures, lost
# leases and faults are still logged, successes are not.
QUIET_WORKER = ("--log-level", "warning")


async def section_drain(cfg: dict[str, Any], dsn: str, peers: dict[str, Any]) -> dict[str, Any]:
    reps, n = cfg["reps"], cfg["drain_n"]
    out: dict[str, Any] = {}
    conns = [await asyncpg.connect(dsn) for _ in range(10)]
    try:
        log("drain: raw k=1 (1 connection)")
        out["raw_k1_c1"] = await repeat(reps, lambda: raw.drain(dsn, conns[:1], cfg["raw_k1_n"], 1))
        log("drain: raw k=100 (10 connections)")
        out["raw_k100_c10"] = await repeat(
            reps, lambda: raw.drain(dsn, conns, cfg["raw_k100_n"], 100)
        )
        log(
            "drain: pgqueue SQL in the raw loop's shape:"
            " claim_next(100) + complete_many, 10 connections"
        )
        out["pgqueue_sql_k100_c10"] = await repeat(
            reps, lambda: pgq.sql_drain(dsn, conns, cfg["raw_k100_n"] // 2, 100)
        )
    finally:
        for c in conns:
            await c.close()
    for conc in (1, 10, 50, 200):
        jobs = cfg["drain_n_c1"] if conc == 1 else n
        log(f"drain: pgqueue worker --concurrency {conc} ({jobs} jobs)")
        out[f"pgqueue_c{conc}"] = await repeat(reps, lambda c=conc, j=jobs: pgq.drain(dsn, j, c))
    # The drain target compares these two: they take turns, so that a fast or slow minute
    # of the machine falls on both (PGQueuer's runs spread by a third within one section).
    rivals: dict[str, Callable[[], Awaitable[dict[str, float]]]] = {
        "pgqueue_c200_quiet": lambda: pgq.drain(dsn, n, 200, args=QUIET_WORKER)
    }
    if "pgqueuer" in peers:
        for batch in (50, 200):
            rivals[f"pgqueuer_b{batch}"] = lambda b=batch: peers["pgqueuer"].drain(
                cfg["peer_drain_n"], b
            )
    log(
        "drain: pgqueue worker --concurrency 200 --log-level warning (no line per success)"
        + (", taking turns with PGQueuer batch_size=50 and 200" if len(rivals) > 1 else "")
    )
    out.update(await alternate(reps, rivals))
    log("drain: minimal asyncpg worker on pgqueue's SQL (bench.lean_worker), concurrency 50")
    out["lean_c50"] = await repeat(reps, lambda: pgq.drain(dsn, n, 50, lean=True))
    log("drain: two pgqueue worker processes --concurrency 50")
    out["pgqueue_2x_c50"] = await repeat(reps, lambda: pgq.drain(dsn, n, 50, procs=2))
    if cfg.get("profile"):
        log("drain: extra run of the concurrency-200 drain under py-spy")
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        path = await pgq.profile_worker(
            dsn, n, 200, REPO / "bench" / "results" / f"{stamp}-pyspy-worker-c200"
        )
        out["profile"] = str(path.relative_to(REPO)) if path else None
    if "procrastinate" in peers:
        for conc in cfg["procrastinate_conc"]:
            log(f"drain: procrastinate concurrency={conc}")
            out[f"procrastinate_c{conc}"] = await repeat(
                reps, lambda c=conc: peers["procrastinate"].drain(cfg["procrastinate_n"], c)
            )
    return out


def latency_stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50": percentile(s, 50),
        "p95": percentile(s, 95),
        "p99": percentile(s, 99),
        "max": s[-1],
    }


async def section_latency(cfg: dict[str, Any], dsn: str, peers: dict[str, Any]) -> dict[str, Any]:
    n, rate, reps = cfg["latency_n"], cfg["latency_rate"], cfg["reps"]
    systems = {
        "raw": lambda: raw.pickup_latency(dsn, n, rate),
        "raw_process": lambda: raw.pickup_latency_process(dsn, n, rate),
        "pgqueue": lambda: pgq.pickup_latency(dsn, n, rate),
    }
    for name, peer in peers.items():
        systems[name] = lambda p=peer: p.latency(n, rate)
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(reps):
        for name, fn in systems.items():
            log(f"latency: {name}")
            runs.setdefault(name, []).append(latency_stats(await fn()))
    return {name: {k: summary(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


async def section_growth(cfg: dict[str, Any], dsn: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    conn = await asyncpg.connect(dsn)
    try:
        for size in cfg["growth_sizes"]:
            log(f"growth: claim+complete with {size} finished jobs")
            await pgq.seed_finished(conn, size)
            rates, plan = [], ""
            for _ in range(cfg["reps"]):
                r = await pgq.claim_complete_rate(conn, cfg["growth_claims"])
                rates.append(r["jobs_per_s"])
                plan = r["plan"]
            out[str(size)] = {
                "jobs_per_s": summary(rates),
                "plan": plan,
                "table": await pgq.table_stats(conn),
            }
        biggest = max(cfg["growth_sizes"])
        pruned = await conn.fetchval("SELECT pgqueue.prune(interval '0')")
        log(f"growth: after prune ({pruned} deleted, no vacuum)")
        rates, plan = [], ""
        for _ in range(cfg["reps"]):
            r = await pgq.claim_complete_rate(conn, cfg["growth_claims"])
            rates.append(r["jobs_per_s"])
            plan = r["plan"]
        out["after_prune"] = {
            "jobs_per_s": summary(rates),
            "plan": plan,
            "pruned": pruned,
            "from": biggest,
            "table": await pgq.table_stats(conn),
        }
        # Bloat: dead tuples and sizes around a drain by the real worker.
        log(f"growth: dead tuples and sizes around a {cfg['bloat_n']}-job drain")
        await pgq.reset(conn)
        await conn.execute("VACUUM ANALYZE pgqueue.jobs")
        await conn.fetch(pgq.ENQUEUE_MANY, json.dumps([{"job_type": "noop"}] * cfg["bloat_n"]))
        before = await pgq.table_stats(conn)
        async with pgq.Workers(dsn, 50):
            await pgq.wait_drained(conn)
        after = await pgq.table_stats(conn)
        out["bloat"] = {"jobs": cfg["bloat_n"], "before": before, "after": after}
    finally:
        await conn.close()
    return out


async def section_notify(cfg: dict[str, Any], dsn: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for producers in (8, 32):
        cell: dict[str, Any] = {v: [] for v in pgq.NOTIFY_VARIANTS}
        log(f"notify: {producers} producers, trigger on / on when_waiting / off interleaved")
        for _ in range(cfg["reps"]):
            r = await pgq.notify_run(dsn, producers, cfg["notify_seconds"])
            for v in pgq.NOTIFY_VARIANTS:
                cell[v].append(r[v])
        out[str(producers)] = {
            state: {
                "jobs_per_s": summary(r["jobs_per_s"] for r in runs),
                "waits": _merge_waits(runs),
            }
            for state, runs in cell.items()
        }
    return out


def _merge_waits(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Average number of producer backends in each wait state per sample."""
    total: dict[str, int] = {}
    samples = sum(r["samples"] for r in runs) or 1
    for r in runs:
        for k, v in r["waits"].items():
            total[k] = total.get(k, 0) + v
    return {k: round(v / samples, 2) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


async def section_pipeline(cfg: dict[str, Any], dsn: str) -> dict[str, Any]:
    """Three times the usual repetitions: a run takes a tenth of a second, and its spread
    (a fifth of the median) is wider than the target's margin."""
    out: dict[str, list[float]] = {}
    async with pgq.Workers(dsn, 50) as workers:
        for _ in range(PIPELINE_REPS * cfg["reps"]):
            for n in cfg["fanouts"]:
                log(f"pipeline: 1 -> {n} -> join")
                out.setdefault(f"fanout_{n}", []).append(
                    await pgq.pipeline(dsn, workers, "fanout", n)
                )
            n = max(cfg["fanouts"])
            log(f"pipeline: {n} independent jobs")
            out.setdefault(f"independent_{n}", []).append(
                await pgq.pipeline(dsn, workers, "independent", n)
            )
    return {k: summary(v) for k, v in out.items()}


async def section_scopes(cfg: dict[str, Any], dsn: str) -> dict[str, Any]:
    n = cfg["scoped_n"]
    out: dict[str, Any] = {}
    log(f"scopes: {n} jobs unscoped and over 100 scopes, concurrency 50, taking turns")
    out.update(
        await alternate(
            cfg["reps"],
            {
                "unscoped": lambda: pgq.drain(dsn, n, 50),
                "scoped_100": lambda: pgq.drain(dsn, n, 50, scopes=100),
            },
        )
    )
    return out


async def section_memory(cfg: dict[str, Any], dsn: str) -> dict[str, Any]:
    """Resident memory of a worker process over several drains, against the minimal asyncpg
    worker (the floor for any Python worker on this SQL); Python memory of one bulk enqueue,
    against the raw unnest insert of the same rows. The drains' peaks are in the drain section."""
    n, rounds = cfg["memory_n"], cfg["memory_rounds"]
    out: dict[str, Any] = {}
    log(
        f"memory: one worker process, {rounds} drains of {n} jobs each, concurrency 50;"
        " the lean worker too"
    )
    out.update(
        await alternate(
            cfg["reps"],
            {
                "pgqueue_c50": lambda: pgq.memory_rounds(dsn, n, 50, rounds),
                "lean_c50": lambda: pgq.memory_rounds(dsn, n, 50, rounds, lean=True),
            },
        )
    )
    log(f"memory: Python memory of one enqueue of {cfg['bulk_n']} jobs (tracemalloc)")
    conn = await asyncpg.connect(dsn)
    try:
        runs: dict[str, list[float]] = {"pgqueue_many_kib": [], "raw_unnest_kib": []}
        for _ in range(cfg["reps"]):
            runs["raw_unnest_kib"].append(await raw.enqueue_unnest_traced(conn, cfg["bulk_n"]))
            runs["pgqueue_many_kib"].append(await pgq.enqueue_many_traced(conn, cfg["bulk_n"]))
    finally:
        await conn.close()
    out["enqueue"] = {k: summary(v) for k, v in runs.items()}
    return out


# --------------------------------------------------------------------------- main


async def amain(args: argparse.Namespace) -> Path:
    cfg = config(args.quick)
    if args.reps:
        cfg["reps"] = args.reps
    cfg["profile"] = args.profile
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    server = args.dsn
    started = time.time()
    chosen = ", ".join(s for s in SECTIONS if s in only)
    log(f"{cfg['mode']} run, {cfg['reps']} repetition(s), sections: {chosen}")
    dsn = await recreate_database(server, "pgqueue_bench")
    from pgqueue.migrate import upgrade

    await asyncio.to_thread(upgrade, dsn)
    await raw.setup(dsn)
    peers: dict[str, Any] = {}
    if not args.no_peers:
        if available("pgqueuer"):
            peers["pgqueuer"] = PGQueuer(await recreate_database(server, "pgqueue_bench_pgqueuer"))
        if available("procrastinate"):
            peers["procrastinate"] = Procrastinate(
                await recreate_database(server, "pgqueue_bench_procrastinate")
            )
        for p in peers.values():
            await p.setup()
    result: dict[str, Any] = {
        "meta": {
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": cfg,
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "environment": await environment(dsn),
            "peers": sorted(peers),
        },
    }
    if "enqueue" in only:
        log("enqueue")
        result["enqueue"] = await section_enqueue(cfg, dsn, peers)
    if "drain" in only:
        result["drain"] = await section_drain(cfg, dsn, peers)
    if "latency" in only:
        result["latency"] = await section_latency(cfg, dsn, peers)
    if "growth" in only:
        result["growth"] = await section_growth(cfg, dsn)
    if "notify" in only:
        result["notify"] = await section_notify(cfg, dsn)
    if "pipeline" in only:
        result["pipeline"] = await section_pipeline(cfg, dsn)
    if "scopes" in only:
        result["scopes"] = await section_scopes(cfg, dsn)
    if "memory" in only:
        result["memory"] = await section_memory(cfg, dsn)
    result["meta"]["seconds"] = round(time.time() - started, 1)
    result["meta"]["loadavg_at_end"] = os.getloadavg()
    result["meta"]["speed_probe_ms_at_end"] = speed_probe_ms()
    if not args.keep:
        for db in ("pgqueue_bench", "pgqueue_bench_pgqueuer", "pgqueue_bench_procrastinate"):
            await drop_database(server, db)

    from bench.report import evaluate

    result["targets"] = evaluate(result)
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    path = out_dir / f"{stamp}-{cfg['mode']}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"results: {path.relative_to(REPO)} ({result['meta']['seconds']} s)")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("PGQUEUE_BENCH_DSN", DEFAULT_DSN),
        help="server to benchmark on (a maintenance DSN; databases pgqueue_bench* "
        "are dropped and created). Default: $PGQUEUE_BENCH_DSN or %(default)s",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, one repetition (< 2 min)"
    )
    parser.add_argument("--reps", type=int, help="override the number of repetitions")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--no-peers", action="store_true", help="skip PGQueuer and procrastinate")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also drain once under py-spy and save the worker's profile in bench/results/",
    )
    parser.add_argument("--keep", action="store_true", help="keep the benchmark databases")
    parser.add_argument(
        "--no-report", action="store_true", help="do not rewrite docs/benchmarks.md and the chart"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="rewrite docs/benchmarks.md and the chart even after a --quick or --only run",
    )
    args = parser.parse_args()
    path = asyncio.run(amain(args))
    from bench.report import print_summary, write_report

    print_summary(json.loads(path.read_text()))
    # A quick or partial run is for development: it leaves the published page alone.
    if args.report or (not args.quick and not args.only and not args.no_report):
        write_report(path)


if __name__ == "__main__":
    main()
