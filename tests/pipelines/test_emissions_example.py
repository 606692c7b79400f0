"""examples/emissions: both answers to "N recalculations each chain an aggregation", and the demo.

The handlers are driven step by step here (claim, run the handler, complete with what it
returned), so the interleaving is fixed: every recalculation finishes before any aggregation
is claimed, the worst case for the plan review's "N aggregation jobs" problem.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest

import pgqueue
from pgqueue.demo import load_example
from pgqueue.dsn import dumps

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def example(db_dsn: str, conn: asyncpg.Connection) -> AsyncIterator[ModuleType]:
    module = load_example()
    module.configure(db_dsn)
    await module.setup(conn)
    try:
        yield module
    finally:
        await module.close()


async def _step(conn: asyncpg.Connection, example: ModuleType, job_type: str) -> list[int]:
    """Claim every queued job of ``job_type``, run its handler, complete it; return the ids."""
    done = []
    for row in await conn.fetch(
        "SELECT * FROM pgqueue.jobs WHERE job_type = $1 AND state = 'queued' ORDER BY id", job_type
    ):
        claimed = await conn.fetchrow("SELECT * FROM pgqueue.claim($1, 'test')", row["id"])
        assert claimed is not None
        job = pgqueue.Job.from_record(claimed)
        value: Any = await example.app.job_types[job_type].handler(job)
        result = value if isinstance(value, pgqueue.Result) else pgqueue.Result(value)
        assert await conn.fetchval(
            "SELECT pgqueue.complete($1, 'test', $2::text::jsonb, $3::text::jsonb)",
            job.id,
            dumps(result.value),
            None if result.next_jobs is None else dumps(result.next_jobs),
        )
        done.append(job.id)
    return done


async def _aggregate_jobs(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT id, state, parent_id, dedup_key FROM pgqueue.jobs"
        " WHERE job_type = 'aggregate' ORDER BY id"
    )
    return rows


async def test_join_answer_one_aggregation_after_all_recalculations(
    conn: asyncpg.Connection, example: ModuleType
) -> None:
    run = await example.start_ingest(conn, example.SAMPLE_CSV.read_text())
    await _step(conn, example, "ingest_factors")
    scopes = await conn.fetch(
        "SELECT scope FROM pgqueue.jobs WHERE job_type = 'recalculate' ORDER BY id"
    )
    assert [s["scope"] for s in scopes][-1] == (
        '{"year": 2024, "module": "buildings", "data_entry_type": null}'
    )
    assert [a["state"] for a in await _aggregate_jobs(conn)] == ["waiting"]

    recalcs = await _step(conn, example, "recalculate")
    assert len(recalcs) == 4  # electricity, heating, water and the module-level (null) type
    assert [a["state"] for a in await _aggregate_jobs(conn)] == ["queued"]
    await _step(conn, example, "aggregate")
    assert await conn.fetchval("SELECT aggregations FROM emissions.module_stats") == 1
    status = await example.app.pipeline_status(conn, run.pipeline_id)
    assert (status.state, status.jobs) == ("succeeded", 6)


async def test_dedup_answer_at_most_one_pending_aggregation(
    conn: asyncpg.Connection, example: ModuleType
) -> None:
    run = await example.start_ingest(conn, example.SAMPLE_CSV.read_text(), coalesce="dedup")
    await _step(conn, example, "ingest_factors")
    assert await _aggregate_jobs(conn) == []  # no join: each recalculation chains its own

    recalcs = await _step(conn, example, "recalculate")
    assert len(recalcs) == 4
    (pending,) = await _aggregate_jobs(conn)  # four requests collapsed into one pending job
    assert (pending["state"], pending["dedup_key"]) == ("queued", "aggregate:buildings:2024")
    await _step(conn, example, "aggregate")
    assert await conn.fetchval("SELECT aggregations FROM emissions.module_stats") == 1
    status = await example.app.pipeline_status(conn, run.pipeline_id)
    assert (status.state, status.jobs) == ("succeeded", 6)


@pytest.mark.parametrize("coalesce", ["dedup", "join"])
async def test_an_aggregation_waits_for_the_one_running_before_it(
    conn: asyncpg.Connection, example: ModuleType, coalesce: str
) -> None:
    """A recalculation that finishes while an aggregation runs queues another (dedup), and two
    uploads make two joins (join). Unscoped, the second ran beside the first, and the first,
    which read its totals earlier, could write them last: module_stats kept a stale total."""
    csv = example.SAMPLE_CSV.read_text()
    await example.start_ingest(conn, csv, coalesce=coalesce)
    await _step(conn, example, "ingest_factors")
    await _step(conn, example, "recalculate")
    first = await conn.fetchrow(
        "SELECT * FROM pgqueue.claim_next('test', ARRAY['recalc'])"
    )  # the aggregation: running, not completed yet
    assert first is not None and first["job_type"] == "aggregate"
    # More work for the same module and year while it runs.
    await example.start_ingest(conn, csv.replace(",0.128\n", ",0.5\n"), coalesce=coalesce)
    await _step(conn, example, "ingest_factors")
    await _step(conn, example, "recalculate")
    (second,) = [a for a in await _aggregate_jobs(conn) if a["id"] != first["id"]]
    assert second["state"] == "queued"
    assert await conn.fetch("SELECT id FROM pgqueue.claim_next('test', ARRAY['recalc'])") == []
    value = await example.app.job_types["aggregate"].handler(pgqueue.Job.from_record(first))
    assert await conn.fetchval(
        "SELECT pgqueue.complete($1, 'test', $2::text::jsonb)", first["id"], dumps(value)
    )
    assert await _step(conn, example, "aggregate") == [second["id"]]
    stats = await conn.fetchrow("SELECT kg_co2e, job_id FROM emissions.module_stats")
    total = await conn.fetchval("SELECT sum(kg_co2e) FROM emissions.entry_emissions")
    assert (stats["kg_co2e"], stats["job_id"]) == (total, second["id"])


def test_pgqueue_demo_runs_the_pipeline_on_the_given_database(db_dsn: str) -> None:
    """And leaves the database's other jobs alone: its worker claimed every queue, and failed
    the user's jobs for want of a handler."""
    from pgqueue.migrate import upgrade

    upgrade(db_dsn)

    async def enqueue_others() -> None:
        conn = await asyncpg.connect(db_dsn)
        try:
            for queue in ("default", "billing"):
                await conn.fetchval(
                    "SELECT pgqueue.enqueue('send_invoice', queue => $1, max_attempts => 1)", queue
                )
        finally:
            await conn.close()

    async def others() -> list[tuple[str, int]]:
        conn = await asyncpg.connect(db_dsn)
        try:
            rows = await conn.fetch(
                "SELECT state, attempts FROM pgqueue.jobs WHERE job_type = 'send_invoice'"
            )
            return [(r["state"], r["attempts"]) for r in rows]
        finally:
            await conn.close()

    asyncio.run(enqueue_others())
    env = {k: v for k, v in os.environ.items() if k != "PGQUEUE_DSN"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-m", "pgqueue.cli", "--dsn", db_dsn, "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| succeeded" in out.stdout
    assert "aggregations = 3" in out.stdout
    assert "-- stale: electricity, heating, water, (no type): one recalculation each" in out.stdout
    assert asyncio.run(others()) == [("queued", 0), ("queued", 0)]
    # Run again on the same database: each step told from what its own run found (a rerun
    # said "every data-entry type is stale" above a single recalculation, "aggregations = 3"
    # under a counter at 6).
    again = subprocess.run(out.args, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    lines = [
        line for line in again.stdout.splitlines() if line.startswith(("-- stale", "-- nothing"))
    ]
    assert lines == [
        "-- stale: heating: one recalculation each, then one aggregation joins them",
        "-- nothing stale: no recalculation, the aggregation ran at once",
        "-- stale: heating: one recalculation each, then one aggregation joins them",
    ], again.stdout
    assert "aggregations 3 -> 6: one per upload" in again.stdout


def test_the_demo_names_an_embedded_server_that_would_not_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An OSError starting pgserver (a full disk, a directory it may not write) was reported
    as "cannot connect to PostgreSQL", the CLI's reading of an OSError."""
    from click.testing import CliRunner

    pgserver = pytest.importorskip("pgserver.postgres_server")
    from pgqueue.cli import main

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", "/tmp/x/pgdata")

    monkeypatch.setattr(pgserver, "get_server", refuse)
    monkeypatch.delenv("PGQUEUE_DSN", raising=False)
    out = CliRunner().invoke(main, ["demo"])
    assert out.exit_code == 1, out.output
    assert out.output.endswith(
        "Error: could not start the embedded PostgreSQL (pgserver): PermissionError:"
        " [Errno 13] Permission denied: '/tmp/x/pgdata'\n"
    ), out.output
