"""A worker outlives a real PostgreSQL restart (a throwaway cluster stopped and started)."""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest
from runtime_helpers import Records, start_worker
from worker_harness import wait_for_states, wait_until

import pgqueue
from pgqueue import migrate
from pgqueue.worker import heartbeat, leader

app = pgqueue.App()


class Cluster:
    """A PostgreSQL cluster of our own, so stopping it disturbs no other test."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir, self.root = bindir, root
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args], check=True, capture_output=True
        )

    def init(self) -> None:
        self._pg("initdb", "-D", str(self.root / "data"), "-U", "postgres", "-A", "trust", "-N")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg(
            "pg_ctl",
            "-D",
            str(self.root / "data"),
            "-o",
            options,
            "-w",
            "-l",
            str(self.root / "log"),
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.root / "data"), "-m", mode, "-w", "stop")


def _bindir() -> Path | None:
    candidates = []
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    return next((Path(c) for c in candidates if (Path(c) / "initdb").exists()), None)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip("needs PostgreSQL server binaries (initdb, pg_ctl)")
    root = Path(tempfile.mkdtemp(prefix="pgqueue-restart-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    cluster = Cluster(bindir, root)
    try:
        cluster.init()
        cluster.start()
        migrate.upgrade(cluster.dsn)
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


async def test_worker_survives_a_postgres_restart(cluster: Cluster) -> None:
    conn = await asyncpg.connect(cluster.dsn)
    await conn.execute(
        "CREATE TABLE runs (job_id bigint, attempt int, pid int,"
        " started timestamptz DEFAULT clock_timestamp())"
    )
    worker = start_worker(cluster.dsn, "--poll-interval", "1")
    try:
        await worker.ready()
        before = await app.enqueue(conn, "work")
        await wait_for_states(conn, [before])
        # This one finishes while the server is down: its outcome must land afterwards.
        in_flight = await app.enqueue(conn, "work", {"sleep": 0.8})
        await wait_until(lambda: conn.fetchval("SELECT count(*) = 2 FROM runs"), what="start")
        await conn.close()

        stopped = time.monotonic()
        await anyio.to_thread.run_sync(cluster.stop)
        await anyio.sleep(1.5)  # an outage the worker must ride out, not a synchronisation
        await anyio.to_thread.run_sync(cluster.start)
        await worker.wait_for_log("listening on channel", times=2, within=20)
        print(f"\nworker listening again {time.monotonic() - stopped:.1f}s after the stop")

        conn = await asyncpg.connect(cluster.dsn)
        after = [await app.enqueue(conn, "work") for _ in range(3)]
        await wait_for_states(conn, [in_flight, *after], within=15)
        assert (
            await conn.fetchval("SELECT attempts FROM pgqueue.jobs WHERE id = $1", in_flight) == 1
        )
        assert worker.count(f"recording the success of job {in_flight}") == 1
        await conn.close()
        assert worker.proc.poll() is None
        assert worker.count("Traceback") == 0, worker.log()
        outage_lines = worker.count("database unavailable") + worker.count("no answer in time")
        assert outage_lines <= 4  # once per component, not per retry
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(within=10) == 0
    finally:
        worker.close()


async def test_stop_during_an_outage_gives_up_unwritten_successes(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A success still unwritten when the database goes away must not hold a stopping worker
    forever: after the grace period its write gets FINAL_WRITE_WINDOW, then the worker exits
    (stale recovery owns the job). A watchdog brings the server back if the worker hangs, so
    a regression fails the assertion instead of hanging the suite."""
    from pgqueue.worker import worker as worker_module

    monkeypatch.setattr(worker_module, "FINAL_WRITE_WINDOW", 1.0)
    local = pgqueue.App()
    release = anyio.Event()

    @local.job("held")
    async def held(job: pgqueue.Job) -> None:
        await release.wait()

    conn = await asyncpg.connect(cluster.dsn)
    job = await local.enqueue(conn, "held")
    worker = pgqueue.Worker(local, cluster.dsn, grace=0.5, poll_interval=0.2, handle_signals=False)
    returned = anyio.Event()
    hung = False

    async def run() -> None:
        await worker.run()
        returned.set()

    async def watchdog() -> None:
        nonlocal hung
        with anyio.move_on_after(15):  # grace 0.5 s + window 1 s + one backoff step (<= 5 s)
            await returned.wait()
            return
        hung = True
        await anyio.to_thread.run_sync(cluster.start)  # let the write land so run() returns

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_for_states(conn, [job], "running")
        await conn.close()
        await anyio.to_thread.run_sync(cluster.stop)
        release.set()  # the handler returns; its success cannot be written now
        worker.stop()
        tg.start_soon(watchdog)
    assert not hung, "the stopped worker waited for the database instead of giving up"


async def test_an_outage_longer_than_stale_after_takes_no_live_workers_jobs(
    cluster: Cluster,
) -> None:
    """From a crash review: with the server down longer than stale_after, every lease was
    stale when it came back, and the first recovery round (of any worker) requeued the
    jobs of workers alive and running them before their heartbeats landed: another worker
    ran each beside its first handler (every job, in a 20 s outage with stale_after 12 s).
    Each worker's recovery now waits two heartbeat periods past its own first beat after an
    outage (and after it starts), and a failed beat is tried again sooner; the handlers
    outlive the outage."""
    local = pgqueue.App()
    runs: list[tuple[int, int]] = []

    @local.job("long", max_attempts=5)
    async def long(job: pgqueue.Job) -> None:
        runs.append((job.id, job.attempts))
        await anyio.sleep(7)

    conn = await asyncpg.connect(cluster.dsn)
    await conn.execute("UPDATE pgqueue.settings SET value = '3 seconds' WHERE name = 'stale_after'")
    jobs = [await local.enqueue(conn, "long") for _ in range(4)]
    workers = [
        pgqueue.Worker(local, cluster.dsn, concurrency=2, poll_interval=0.2, handle_signals=False)
        for _ in range(2)
    ]
    async with anyio.create_task_group() as tg:
        for worker in workers:
            tg.start_soon(worker.run)
        try:
            await wait_for_states(conn, jobs, "running")
            await conn.close()
            await anyio.to_thread.run_sync(functools.partial(cluster.stop, "immediate"))
            await anyio.sleep(4.5)  # past stale_after: every lease is stale when it is back
            await anyio.to_thread.run_sync(cluster.start)
            # And a run started as it comes back (cron, a restart loop): it cannot tell the
            # live workers' old leases from dead ones', so it holds off as long. Its first
            # recovery, until empty, runs before its first claim: without the hold, at once.
            late = pgqueue.Worker(
                local, cluster.dsn, poll_interval=0.2, handle_signals=False, until_empty=True
            )
            workers.append(late)
            tg.start_soon(late.run)
            conn = await asyncpg.connect(cluster.dsn)
            await wait_for_states(conn, jobs, "succeeded", within=30)
        finally:
            for worker in workers:
                worker.stop()
    attempts = await conn.fetch("SELECT id, attempts FROM pgqueue.jobs ORDER BY id")
    await conn.close()
    assert [tuple(row) for row in attempts] == [(job, 1) for job in jobs]
    assert sorted(runs) == [(job, 1) for job in jobs]


def test_recovery_is_held_after_a_start_and_after_beats_went_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hold itself, on a clock of the test's: at a start, while beats are missing (a
    gap longer than a beat takes), for two periods and a margin after they land again; not
    after a beat merely slow within its bound (with a period under a second, the bound is a
    second: such beats kept recovery held for good)."""
    now = [1000.0]
    monkeypatch.setattr(heartbeat.time, "monotonic", lambda: now[0])
    period = heartbeat.Period(0.25, beat_at=now[0], back_at=now[0])
    hold = heartbeat.RECOVERY_HOLD_PERIODS * 0.25 + heartbeat.RECOVERY_MARGIN
    assert period.recovery_held_off() and period.recovery_hold_left() == hold
    for _ in range(40):  # beats every period plus a slow second (the bound): no outage
        now[0] += 0.25 + 0.99
        period.landed()
    assert not period.recovery_held_off() and period.recovery_hold_left() == 0
    now[0] += 0.25 + 1.0 + heartbeat.RECOVERY_MARGIN + 0.01  # a beat missing
    assert period.recovery_held_off()
    period.landed()  # back: held for two periods and the margin
    assert period.recovery_held_off()
    now[0] += hold - 0.01
    assert period.recovery_held_off()
    now[0] += 0.02
    assert not period.recovery_held_off()


def test_a_jump_of_the_databases_clock_holds_recovery_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a clock of the test's: a beat that lands with the database's clock further on
    than this worker's by more than a beat's timing explains (a host suspended with its
    database stops the monotonic clock) ends an outage as a gap does; the same jump is
    counted once; the database's clock running on with ours, within a beat's bound, is
    none."""
    now = [1000.0]
    monkeypatch.setattr(heartbeat.time, "monotonic", lambda: now[0])
    period = heartbeat.Period(0.25, beat_at=now[0], back_at=now[0] - 100)
    db = 5_000_000.0
    assert period.landed(db) == 0.0 and not period.recovery_held_off()
    for _ in range(10):  # punctual beats, the database's reply a slow second behind ours
        now[0] += 0.25
        db += 0.25 + 0.99 * (_ % 2)
        assert period.landed(db) == 0.0
    assert not period.recovery_held_off()
    now[0] += 0.25
    db += 0.25 + 3600  # suspended with its database for an hour
    assert period.landed(db) == pytest.approx(3600)
    assert period.recovery_held_off()
    now[0] += 0.25
    db += 0.25
    assert period.landed(db) == 0.0  # once
    assert period.clock_read(db) == 0.0


async def _a_lease_an_hour_old(conn: asyncpg.Connection) -> tuple[int, float]:
    """A job running under a live worker whose last beat landed an hour ago on the
    database's clock: its id, and that beat's time on the database's clock."""
    await conn.execute("SELECT pgqueue.enqueue('t', '{}')")
    job = await conn.fetchval("SELECT id FROM pgqueue.claim_next(worker => 'live')")
    beat = await conn.fetchval(
        "UPDATE pgqueue.jobs SET locked_at = locked_at - interval '1 hour' WHERE id = $1"
        " RETURNING extract(epoch FROM locked_at)::float8",
        job,
    )
    return job, beat


async def test_recovery_meeting_a_jump_of_the_databases_clock_recovers_nothing(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """The round that reads the database's clock an hour past this worker's last beat
    (which found its own clock a second on) recovers none of the leases that hour made
    stale, says why, and holds recovery back for two periods and the margin: after a
    suspend of the host with its database, every live worker's lease is stale until its
    beat lands, and the first round of any worker requeued them all. The same round
    without the jump recovers the job (so the test can fail)."""
    logger, logged = records
    # The lease, and this worker's last beat, an hour ago on the database's clock and a
    # moment ago on this worker's.
    job, beat = await _a_lease_an_hour_old(conn)
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=1)
    try:
        period = heartbeat.Period(1.0, back_at=time.monotonic() - 100)
        period.landed(beat)
        assert not period.recovery_held_off()
        await leader.recovery_round(pool, logger, leader.leader_outage(logger, "recovery"), period)
        assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job) == "running"
        assert period.recovery_held_off()
        assert logged.count("database's clock moved") == 1

        punctual = heartbeat.Period(1.0, back_at=time.monotonic() - 100)
        punctual.landed(await conn.fetchval(f"SELECT {heartbeat.DB_CLOCK}"))
        await leader.recovery_round(
            pool, logger, leader.leader_outage(logger, "recovery"), punctual
        )
        assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job) == "queued"
    finally:
        await pool.close()


async def test_a_round_started_before_a_hold_began_recovers_nothing(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """From a review: the round is checked against the hold before it waits for a pooled
    connection; a beat (on its own pool) that lands meanwhile with the jump starts the hold
    and takes the jump as its own, so the round, comparing with that beat, met none, and
    recovered the leases the jump made stale. The round looks at the hold again once it
    holds the leader lock."""
    logger, _ = records
    job, before = await _a_lease_an_hour_old(conn)
    period = heartbeat.Period(1.0, back_at=time.monotonic() - 100)
    period.landed(before)  # the last beat before the jump
    assert not period.recovery_held_off()  # every_period lets the round go
    period.landed(await conn.fetchval(f"SELECT {heartbeat.DB_CLOCK}"))  # the beat, meanwhile
    assert period.recovery_held_off()
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=1)
    try:
        await leader.recovery_round(pool, logger, leader.leader_outage(logger, "recovery"), period)
    finally:
        await pool.close()
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job) == "running"
