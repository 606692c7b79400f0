"""pgqueue's side of every measurement: the public API and real ``pgqueue worker`` processes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.apps import app
from bench.common import (
    CpuMeter,
    drain_loops,
    peak_mib,
    proc_memory_mib,
    python_env,
    read_stamps,
    spawn_python,
    stop_process,
    traced_peak_kib,
    wait_until,
)
from bench.raw import interleaved, timed_loop

ENQUEUE_MANY = "SELECT id FROM pgqueue.enqueue_many($1::text::jsonb) AS id"
ALL_DONE = """
SELECT NOT EXISTS (SELECT 1 FROM pgqueue.jobs WHERE state = 'queued')
   AND NOT EXISTS (SELECT 1 FROM pgqueue.jobs WHERE state = 'running')
   AND NOT EXISTS (SELECT 1 FROM pgqueue.jobs WHERE state = 'waiting')
"""


async def reset(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE pgqueue.jobs, pgqueue.job_dependencies RESTART IDENTITY")


class Workers:
    """``pgqueue worker bench.apps:app`` subprocesses, started idle and stopped by pid."""

    def __init__(
        self,
        dsn: str,
        concurrency: int,
        procs: int = 1,
        env: dict[str, str] | None = None,
        lean: bool = False,
        args: tuple[str, ...] = (),
    ):
        self.dsn = dsn
        self.args = args  # more `pgqueue worker` options
        self.concurrency = concurrency
        self.procs = procs
        self.env = env or {}
        self.lean = lean  # bench.lean_worker instead of `pgqueue worker`
        self.running: list[subprocess.Popen[bytes]] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="pgqueue-bench-"))

    async def __aenter__(self) -> Workers:
        env = python_env({"PGQUEUE_DSN": self.dsn, **self.env})
        if self.lean:
            args = ["-m", "bench.lean_worker", self.dsn, str(self.concurrency)]
        else:
            args = ["-m", "pgqueue.cli", "worker", "bench.apps:app"]
            args += ["--concurrency", str(self.concurrency), "--grace", "5", *self.args]
        for i in range(self.procs):
            self.running.append(spawn_python(args, self.logdir / f"worker-{i}.log", env))
        conn = await asyncpg.connect(self.dsn)
        try:

            async def ready() -> bool:
                for p in self.running:
                    if p.poll() is not None:
                        raise RuntimeError(f"worker exited early; see {self.logdir}")
                if self.lean:
                    logs = [(self.logdir / f"worker-{i}.log") for i in range(self.procs)]
                    return all(p.exists() and "ready" in p.read_text() for p in logs)
                n = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name LIKE 'pgqueue-notifier %'"
                )
                return bool(n >= self.procs)

            await wait_until(ready, 60, 0.05)
        finally:
            await conn.close()
        await asyncio.sleep(0.5)  # LISTEN is issued right after the connection appears
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.running]

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        for p in self.running:
            await asyncio.to_thread(stop_process, p)
        if exc_type is None:  # keep the worker logs only when something went wrong
            shutil.rmtree(self.logdir, ignore_errors=True)


async def wait_drained(conn: asyncpg.Connection, limit: float = 600) -> float:
    async def done() -> bool:
        return bool(await conn.fetchval(ALL_DONE))

    return await wait_until(done, limit, 0.01)


# --------------------------------------------------------------------------- enqueue


async def enqueue_single(conns: list[asyncpg.Connection], seconds: float) -> float:
    await reset(conns[0])
    return await timed_loop(conns, seconds, lambda c: app.enqueue(c, "noop", {}))


async def enqueue_many(conn: asyncpg.Connection, n: int) -> float:
    await reset(conn)
    specs = [{"job_type": "noop"}] * n
    t0 = time.perf_counter()
    ids = await app.enqueue_many(conn, specs)
    assert len(ids) == n
    return n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- drain


async def drain(
    dsn: str,
    n: int,
    concurrency: int,
    procs: int = 1,
    scopes: int | None = None,
    lean: bool = False,
    args: tuple[str, ...] = (),
) -> dict[str, float | None]:
    """Start the worker(s) idle, enqueue n no-op jobs in one call, time until all succeeded."""
    conn = await asyncpg.connect(dsn)
    try:
        await reset(conn)
        if scopes:
            specs: list[dict[str, Any]] = [
                {"job_type": "noop", "scope": {"s": i % scopes}} for i in range(n)
            ]
        else:
            specs = [{"job_type": "noop"}] * n
        payload = json.dumps(specs)
        async with Workers(dsn, concurrency, procs, lean=lean, args=args) as workers:
            meter = CpuMeter(conn, pids=workers.pids)
            # Fresh statistics, as for the raw table (ANALYZE after its COPY): ANALYZE inside
            # the enqueue transaction counts its own uncommitted rows. Committed on return.
            async with conn.transaction():
                await conn.fetch(ENQUEUE_MANY, payload)
                await conn.execute("ANALYZE pgqueue.jobs")
            await meter.start()
            t_committed = time.perf_counter()
            t_done = await wait_drained(conn)
            cpu = await meter.stop()
            wall = t_done - t_committed
            peak = peak_mib(workers.pids)
        counts = dict(await conn.fetch("SELECT state, count(*) FROM pgqueue.jobs GROUP BY 1"))
        assert counts.get("succeeded") == n, counts
        db_span = await conn.fetchval(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8"
            " FROM pgqueue.jobs"
        )
    finally:
        await conn.close()
    return {
        "jobs_per_s": n / wall,
        "db_span_jobs_per_s": n / db_span if db_span else None,
        "worker_cpu_ms_per_1k": cpu["client_cpu_s"] * 1e6 / n,
        "pg_cpu_ms_per_1k": cpu["pg_cpu_s"] * 1e6 / n,
        "worker_peak_mib": peak,
    }


async def memory_rounds(
    dsn: str, n: int, concurrency: int, rounds: int, lean: bool = False
) -> dict[str, float]:
    """One worker process drains ``rounds`` batches of ``n`` no-op jobs; its resident memory
    is read once it is ready (idle) and after each batch.

    The first batches include warm-up (imports on first use, plan and statement caches,
    buffers sized to the concurrency); what the last batch adds, per 1,000 jobs, is what a
    worker that runs for weeks would keep adding: a leak, if it is not about zero.
    """
    conn = await asyncpg.connect(dsn)
    out: dict[str, float] = {}
    try:
        await reset(conn)
        async with Workers(dsn, concurrency, lean=lean) as workers:
            pid = workers.pids[0]

            def rss() -> float:
                memory = proc_memory_mib(pid)
                assert memory is not None, "the worker exited"
                return memory["rss"]

            readings = [rss()]
            for _ in range(rounds):
                await conn.fetch(ENQUEUE_MANY, json.dumps([{"job_type": "noop"}] * n))
                await wait_drained(conn)
                await asyncio.sleep(0.2)  # the last outcomes' log lines and frees
                readings.append(rss())
            out["peak_mib"] = peak_mib([pid]) or 0.0
    finally:
        await conn.close()
    out["idle_mib"] = readings[0]
    out["after_first_mib"] = readings[1]
    out["after_last_mib"] = readings[-1]
    out["last_round_kib_per_1k"] = (readings[-1] - readings[-2]) * 1024 / (n / 1000)
    return out


async def enqueue_many_traced(conn: asyncpg.Connection, n: int) -> float:
    """Peak Python memory (KiB, tracemalloc) of one ``app.enqueue_many`` of ``n`` plain specs,
    the spec list made beforehand."""
    await reset(conn)
    specs = [{"job_type": "noop"}] * n
    return await traced_peak_kib(lambda: app.enqueue_many(conn, specs))


async def sql_drain(dsn: str, conns: list[asyncpg.Connection], n: int, k: int) -> dict[str, float]:
    """pgqueue's SQL without the Python runtime: the raw loop's shape on pgqueue's functions.

    ``claim_next(batch_size => k)``, then ``complete_many`` of the claimed ids (one statement,
    one commit per batch), on every connection until empty.
    It separates what the SQL costs from what the worker adds.
    """
    await reset(conns[0])
    async with conns[0].transaction():
        await conns[0].fetch(ENQUEUE_MANY, json.dumps([{"job_type": "noop"}] * n))
        await conns[0].execute("ANALYZE pgqueue.jobs")
    claim = "SELECT id FROM pgqueue.claim_next(worker => $1, batch_size => $2)"

    async def step(conn: asyncpg.Connection, me: str) -> int:
        rows = await conn.fetch(claim, me, k)
        if rows:
            await conn.fetch(COMPLETE_MANY, me, [r["id"] for r in rows])
        return len(rows)

    return await drain_loops(dsn, conns, n, step, "sql")


# --------------------------------------------------------------------------- latency


async def pickup_latency(dsn: str, n: int, rate: float) -> list[float]:
    stamp = Path(tempfile.mkdtemp(prefix="pgqueue-bench-")) / "stamps.txt"
    stamp.touch()
    conn = await asyncpg.connect(dsn)
    try:
        await reset(conn)
        async with Workers(dsn, 10, 1, env={"BENCH_STAMP_FILE": str(stamp)}):
            acks: dict[int, float] = {}
            interval = 1.0 / rate
            nxt = time.perf_counter()
            for seq in range(n):
                await app.enqueue(conn, "stamp", {"seq": seq})
                acks[seq] = time.time()
                nxt += interval
                await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
            await wait_drained(conn, 30)
        starts = read_stamps(stamp)
        shutil.rmtree(stamp.parent, ignore_errors=True)
    finally:
        await conn.close()
    return [(starts[s] - acks[s]) * 1000 for s in range(n)]


# --------------------------------------------------------------------------- claim cost vs growth

SEED_FINISHED = """
INSERT INTO pgqueue.jobs (job_type, state, attempts, max_attempts, locked_by, locked_at,
                          started_at, finished_at, run_after, created_at)
SELECT 'noop', 'succeeded', 1, 5, 'seed', now() - interval '2 days', now() - interval '2 days',
       now() - interval '2 days', now() - interval '2 days', now() - interval '2 days'
FROM generate_series(1, $1)
"""
CLAIM_ONE = "SELECT id FROM pgqueue.claim_next(worker => $1, batch_size => 1)"
COMPLETE = "SELECT pgqueue.complete(job_id => $1, worker => $2)"
COMPLETE_MANY = "SELECT pgqueue.complete_many(worker => $1, job_ids => $2::bigint[])"
# The pick of claim_next's one-statement path for every queue (sql/04_claim.sql), the path
# the growth claims take (no scoped jobs, no queue limits).
EXPLAIN_PICK = """
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
SELECT j.id FROM pgqueue.jobs j
WHERE j.state = 'queued' AND NOT j.scope_blocked AND NOT j.queue_paused AND j.run_after <= now()
  AND j.scope IS NULL
  AND j.queue <> ALL (ARRAY(SELECT p.queue FROM pgqueue.paused_queues p))
ORDER BY j.priority DESC, j.run_after, j.id
LIMIT 1 FOR NO KEY UPDATE OF j SKIP LOCKED
"""
TABLE_STATS = """
SELECT n_live_tup, n_dead_tup,
       pg_relation_size('pgqueue.jobs') AS table_bytes,
       pg_indexes_size('pgqueue.jobs') AS index_bytes,
       pg_relation_size('pgqueue.jobs_ready') AS ready_index_bytes
FROM pg_stat_user_tables WHERE relid = 'pgqueue.jobs'::regclass
"""


async def seed_finished(conn: asyncpg.Connection, n: int) -> None:
    await reset(conn)
    if n:
        await conn.execute(SEED_FINISHED, n)
    await conn.execute("VACUUM ANALYZE pgqueue.jobs")


async def claim_complete_rate(conn: asyncpg.Connection, n: int) -> dict[str, Any]:
    """claim_next(batch 1) + complete per job on one connection, commits not waited for.

    ``synchronous_commit = off`` for this session only: with it on, both calls wait for a WAL
    flush and the figure would measure the disk, not the claim's plan.
    """
    await conn.execute("SET synchronous_commit = off")
    await conn.fetch(ENQUEUE_MANY, json.dumps([{"job_type": "noop"}] * n))
    plan = "\n".join(r[0] for r in await conn.fetch(EXPLAIN_PICK))
    t0 = time.perf_counter()
    done = 0
    while True:
        job_id = await conn.fetchval(CLAIM_ONE, "growth")
        if job_id is None:
            break
        await conn.fetchval(COMPLETE, job_id, "growth")
        done += 1
    rate = done / (time.perf_counter() - t0)
    await conn.execute("RESET synchronous_commit")
    return {"jobs_per_s": rate, "plan": plan}


async def table_stats(conn: asyncpg.Connection) -> dict[str, Any]:
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await asyncio.sleep(0.6)
    row = await conn.fetchrow(TABLE_STATS)
    return dict(row) if row else {}


# --------------------------------------------------------------------------- pipelines


async def pipeline(dsn: str, workers: Workers, kind: str, n: int) -> float:
    """Seconds from commit of the root (or of n independent jobs) to the last job finished.

    The end is the last ``finished_at`` (the server's clock, on this machine), not the moment
    the 10 ms poll saw everything done: on a ~70 ms drain the poll's granularity was noise
    of the size of the difference being measured.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await reset(conn)
        if kind == "fanout":
            await app.enqueue(conn, "fanout", {"n": n})
        else:
            await conn.fetch(ENQUEUE_MANY, json.dumps([{"job_type": "noop"}] * n))
        t0 = time.time()
        await wait_drained(conn, 120)
        expected = n + 2 if kind == "fanout" else n
        got, t1 = await conn.fetchrow(
            "SELECT count(*), extract(epoch FROM max(finished_at))::float8"
            " FROM pgqueue.jobs WHERE state = 'succeeded'"
        )
        assert got == expected, (kind, got, expected)
        return float(t1) - t0
    finally:
        await conn.close()


async def set_notify_mode(conn: asyncpg.Connection, mode: str) -> None:
    """``settings.notify``: ``always`` (the default) or ``when_waiting``."""
    await conn.execute("UPDATE pgqueue.settings SET value = $1 WHERE name = 'notify'", mode)


NOTIFY_VARIANTS = ("on", "when_waiting", "off")


async def notify_run(dsn: str, producers: int, seconds: float) -> dict[str, Any]:
    """Single-call enqueue from ``producers`` connections in alternating slices: trigger on
    (``notify = always``), trigger on with ``notify = when_waiting`` (no worker waits, so
    nothing is sent), trigger off; the producers' wait events are sampled every 100 ms and
    attributed to the live variant."""
    admin = await asyncpg.connect(dsn)
    sampler_conn = await asyncpg.connect(dsn)
    conns = [
        await asyncpg.connect(dsn, server_settings={"application_name": "bench-producer"})
        for _ in range(producers)
    ]
    current = ["on"]
    waits: dict[str, dict[str, int]] = {v: {} for v in NOTIFY_VARIANTS}
    samples = dict.fromkeys(NOTIFY_VARIANTS, 0)
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            variant = current[0]
            rows = await sampler_conn.fetch(
                "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w, count(*) AS n"
                " FROM pg_stat_activity WHERE application_name = 'bench-producer'"
                " AND state = 'active' AND datname = current_database() GROUP BY 1"
            )
            samples[variant] += 1
            for r in rows:
                waits[variant][r["w"]] = waits[variant].get(r["w"], 0) + r["n"]
            await asyncio.sleep(0.1)

    def switch(state: str):  # type: ignore[no-untyped-def]
        async def before() -> None:
            action = "DISABLE" if state == "off" else "ENABLE"
            await admin.execute(f"ALTER TABLE pgqueue.jobs {action} TRIGGER jobs_notify_inserted")
            await set_notify_mode(admin, "when_waiting" if state == "when_waiting" else "always")
            current[0] = state

        return before

    try:
        await reset(admin)
        sampler = asyncio.create_task(sample())
        rates = await interleaved(
            conns,
            len(NOTIFY_VARIANTS) * seconds,
            [(v, switch(v), lambda c: app.enqueue(c, "noop", {})) for v in NOTIFY_VARIANTS],
        )
        stop.set()
        await sampler
        return {
            s: {"jobs_per_s": rates[s], "samples": samples[s], "waits": waits[s]} for s in rates
        }
    finally:
        await admin.execute("ALTER TABLE pgqueue.jobs ENABLE TRIGGER jobs_notify_inserted")
        await set_notify_mode(admin, "always")
        for c in conns:
            await c.close()
        await sampler_conn.close()
        await admin.close()


def os_pid() -> int:
    return os.getpid()


# --------------------------------------------------------------------------- profiling


async def profile_worker(
    dsn: str, n: int, concurrency: int, out: Path, args: tuple[str, ...] = ()
) -> Path | None:
    """One extra drain with py-spy sampling the worker; writes ``out``.txt (collapsed stacks)
    and ``out``-summary.txt (self and inclusive time per frame, socket writes and idle
    epoll waits listed apart, since they are mostly time spent descheduled, not CPU)."""
    if shutil.which("py-spy") is None:
        return None
    conn = await asyncpg.connect(dsn)
    raw_path = out.with_suffix(".txt")
    try:
        await reset(conn)
        async with Workers(dsn, concurrency, args=args) as workers:
            spy = subprocess.Popen(  # noqa: ASYNC220 - must run alongside the drain
                [
                    "py-spy",
                    "record",
                    "-p",
                    str(workers.pids[0]),
                    "-o",
                    str(raw_path),
                    "-f",
                    "raw",
                    "-r",
                    "250",
                    "-d",
                    "600",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await asyncio.sleep(1.0)
            async with conn.transaction():
                await conn.fetch(ENQUEUE_MANY, json.dumps([{"job_type": "noop"}] * n))
                await conn.execute("ANALYZE pgqueue.jobs")
            await wait_drained(conn)
            spy.send_signal(2)  # py-spy writes its file on SIGINT
            await asyncio.to_thread(spy.wait, 30)
    finally:
        await conn.close()
    if not raw_path.exists():
        return None
    summary_path = out.with_name(out.name + "-summary.txt")
    summary_path.write_text(summarise_stacks(raw_path))
    return summary_path


def summarise_stacks(path: Path, top: int = 40) -> str:
    from collections import Counter

    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    waiting = 0
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        n = int(count)
        if (
            ("selector_events.py" in frames[-1] and "write" in frames[-1])
            or "select (selectors" in frames[-1]
            or "_flush_forever" in frames[-1]  # the log flush thread, asleep
        ):
            waiting += n
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [
        f"{total} samples on CPU-side frames; {waiting} more in socket send, epoll wait or"
        " the log flush thread's sleep (mostly descheduled or idle, left out)",
        "",
        "self:",
    ]
    lines += [f"  {c / total * 100:5.1f}%  {f}" for f, c in own.most_common(top)]
    lines += ["", "inclusive (pgqueue, asyncpg pool, logging, anyio frames):"]
    keep = [
        f
        for f, _ in incl.most_common(400)
        if any(k in f for k in ("pgqueue/", "asyncpg/pool", "logging/", "anyio/", "json/"))
    ]
    lines += [f"  {incl[f] / total * 100:5.1f}%  {f}" for f in keep[:top]]
    return "\n".join(lines) + "\n"
