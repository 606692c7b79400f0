"""pgqueue behind a real PgBouncer (Debian's package; these tests skip without it).

Transaction mode hands each transaction to any server connection: asyncpg's named prepared
statements, cached per client connection, then meet server connections that lack them (or
hold another client's of the same name). Before 1.21 PgBouncer cannot relay them at all.
From a review: a worker so placed failed successful jobs ("prepared statement ... does not
exist"), ran them again, and its producer stopped claiming for good; statement mode made
stale recovery and retention fail for ever after one line logged.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest
from click.testing import CliRunner
from runtime_helpers import Records, dsn_through, server_address
from worker_harness import wait_for_states

import pgqueue
from pgqueue.cli import main
from pgqueue.migrate import SchemaError

pytestmark = pytest.mark.skipif(
    shutil.which("pgbouncer") is None, reason="needs PgBouncer (Debian package pgbouncer)"
)

HINT = "add statement_cache_size=0 to the DSN"


@contextlib.asynccontextmanager
async def bouncer(dsn: str, mode: str, *, pool_size: int = 20) -> AsyncIterator[int]:
    """A PgBouncer of our own in front of ``dsn``'s server, in ``mode``; yields its port."""
    address = await server_address(dsn)
    start = functools.partial(_start, dsn, address, mode, pool_size)
    proc, root, listen = await anyio.to_thread.run_sync(start)
    try:
        yield listen
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await anyio.to_thread.run_sync(proc.wait, 5)
        proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def _start(
    dsn: str, address: str | tuple[str, int], mode: str, pool_size: int
) -> tuple[subprocess.Popen[bytes], Path, int]:
    if isinstance(address, str):  # a socket file: PgBouncer takes its directory and port
        directory, _, name = address.rpartition("/")
        host, port = directory, int(name.rsplit(".", 1)[1])
    else:
        host, port = address
    parts = urlsplit(dsn)
    root = Path(tempfile.mkdtemp(prefix="pgqueue-bouncer-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        listen = int(sock.getsockname()[1])
    (root / "users.txt").write_text(f'"{parts.username or "postgres"}" "{parts.password or ""}"\n')
    (root / "pgbouncer.ini").write_text(
        f"[databases]\n* = host={host} port={port}\n[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {root}/users.txt\npool_mode = {mode}\n"
        f"default_pool_size = {pool_size}\nmax_client_conn = 200\n"
        f"logfile = {root}/log\npidfile = {root}/pid\n"
    )
    as_user: list[str] = []
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        for path in (root, *root.iterdir()):
            shutil.chown(path, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    command = [*as_user, "pgbouncer", "-q", str(root / "pgbouncer.ini")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", listen), 1):
            return proc, root, listen
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            log = (root / "log").read_text() if (root / "log").exists() else ""
            raise RuntimeError(f"PgBouncer did not start: {log[-2000:]}")
        time.sleep(0.05)


async def _drain_through(
    conn: asyncpg.Connection, worker_dsn: str, listen_dsn: str, logger: object, n: int
) -> collections.Counter[int]:
    """Enqueue ``n`` jobs in bursts while a worker on ``worker_dsn`` runs them; return how
    many times each ran once all succeeded."""
    app = pgqueue.App()
    runs: collections.Counter[int] = collections.Counter()

    @app.job("t", max_attempts=3)
    async def t(job: pgqueue.Job) -> None:
        runs[job.id] += 1
        await anyio.sleep(0.01)

    worker = pgqueue.Worker(
        app,
        worker_dsn,
        listen_dsn=listen_dsn,
        concurrency=10,
        poll_interval=0.5,
        handle_signals=False,
        logger=logger,  # type: ignore[arg-type]
    )
    jobs: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            for _ in range(n // 10):
                jobs += [await app.enqueue(conn, "t") for _ in range(10)]
                await anyio.sleep(0.05)
            await wait_for_states(conn, jobs, "succeeded", within=60)
        finally:
            worker.stop()
    assert sorted(runs) == sorted(jobs)
    return runs


async def test_a_worker_through_a_transaction_pooler_with_the_cache_off_runs_each_job_once(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[object, Records]
) -> None:
    logger, log = records
    async with bouncer(db_dsn, "transaction") as port:
        through = dsn_through(db_dsn, port, statement_cache_size="0")
        runs = await _drain_through(conn, through, db_dsn, logger, 100)
        assert set(runs.values()) == {1}
        for command in (["jobs"], ["stats"], ["pause", "q"], ["resume", "q"], ["jobs"]):
            args = [*command, "--dsn", through]
            out = await anyio.to_thread.run_sync(functools.partial(CliRunner().invoke, main, args))
            assert out.exit_code == 0, out.output
    assert log.count("as it is set up") == 0, log.text()


async def test_a_worker_whose_statements_the_pooler_loses_fails_no_job_and_says_why(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[object, Records]
) -> None:
    """Two server connections for the worker's dozen: its cached statements soon meet one
    that lacks them. Every such error is waited out (the job neither failed nor run again),
    the claim connection is replaced, and the log says what to change."""
    logger, log = records
    async with bouncer(db_dsn, "transaction", pool_size=2) as port:
        runs = await _drain_through(conn, dsn_through(db_dsn, port), db_dsn, logger, 60)
    assert set(runs.values()) == {1}, runs
    assert log.count(HINT) > 0, log.text()
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE attempts > 1") == 0


async def test_the_cli_through_a_transaction_pooler_names_the_setting(db_dsn: str) -> None:
    """One server connection: the second command (a process of its own, whose statement
    names start where the first one's did) meets the first one's statement of the same
    name ("already exists"), and says which setting avoids it; with it, none does."""
    async with bouncer(db_dsn, "transaction", pool_size=1) as port:
        for through, failing in (
            (dsn_through(db_dsn, port), True),
            (dsn_through(db_dsn, port, statement_cache_size="0"), False),
        ):
            outs = [
                await anyio.run_process(
                    [sys.executable, "-m", "pgqueue", "--dsn", through, "jobs"], check=False
                )
                for _ in range(2)
            ]
            if failing:
                error = outs[1].stderr.decode()
                assert outs[1].returncode == 1, error
                assert HINT in error and error.count("\n") == 1, error
            else:
                assert [o.returncode for o in outs] == [0, 0], [o.stderr for o in outs]


async def test_a_worker_behind_a_statement_pooler_does_not_start(db_dsn: str) -> None:
    async with bouncer(db_dsn, "statement") as port:
        worker = pgqueue.Worker(
            pgqueue.App(), dsn_through(db_dsn, port, statement_cache_size="0"), handle_signals=False
        )
        with anyio.fail_after(30), pytest.raises(SchemaError, match="pooler in statement mode"):
            await worker.run()
