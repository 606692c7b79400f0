"""The plan-review pipeline on pgqueue: ingest factors, recalculate what went stale, aggregate.

    ingest_factors ──┬─> recalculate {module, data_entry_type: "electricity", year}
                     ├─> recalculate {module, data_entry_type: "heating", year}   ──> aggregate
                     └─> recalculate {module, data_entry_type: null, year}        (exactly once)

``ingest_factors`` replaces a module's emission factors for a year from a CSV and decides at
run time which data-entry types went stale; it returns one ``recalculate`` per stale type and
one ``aggregate`` that joins them all. pgqueue creates them in the transaction that records
the ingest's success, runs each recalculation alone per scope ``{module, data_entry_type,
year}`` (``data_entry_type`` may be JSON null: module-level factors), and queues the
aggregation exactly once, after the last recalculation succeeded.

``coalesce="dedup"`` shows the other answer to "N recalculations each chain an aggregation":
every recalculation chains its own ``aggregate`` with ``dedup_key`` ``aggregate:<module>:<year>``,
so at most one is pending at a time (identical requests collapse into it).

Run it: see README.md next to this file (``pgqueue demo`` runs it end to end).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import anyio
import asyncpg

import pgqueue

HERE = Path(__file__).resolve().parent
SAMPLE_CSV = HERE / "factors.csv"

app = pgqueue.App()

#: Where the handlers' own connections go; ``configure()`` changes it. None: libpq PG* variables.
DSN: str | None = os.environ.get("PGQUEUE_DSN") or None
_pool: asyncpg.Pool | None = None
_pool_lock = anyio.Lock()

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS emissions;
-- classification is JSONB, so {"class":..,"sub_class":..} equals itself in any key order.
CREATE TABLE IF NOT EXISTS emissions.factors (
    module text NOT NULL,
    data_entry_type text,              -- NULL: a module-level factor
    year int NOT NULL,
    classification jsonb NOT NULL,
    kg_co2e_per_unit numeric NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS factors_identity ON emissions.factors
    (module, coalesce(data_entry_type, ''), year, classification);
CREATE TABLE IF NOT EXISTS emissions.data_entries (
    id serial PRIMARY KEY,
    module text NOT NULL,
    data_entry_type text,
    year int NOT NULL,
    classification jsonb NOT NULL,
    quantity numeric NOT NULL
);
CREATE TABLE IF NOT EXISTS emissions.entry_emissions (
    module text NOT NULL,
    data_entry_type text,
    year int NOT NULL,
    kg_co2e numeric NOT NULL,
    job_id bigint NOT NULL,
    computed_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS entry_emissions_identity ON emissions.entry_emissions
    (module, coalesce(data_entry_type, ''), year);
CREATE TABLE IF NOT EXISTS emissions.module_stats (
    module text NOT NULL,
    year int NOT NULL,
    kg_co2e numeric NOT NULL,
    aggregations int NOT NULL DEFAULT 1,   -- how many times aggregate ran for it
    job_id bigint NOT NULL,
    computed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (module, year)
);
-- What each ingest decided, by job id: a rerun of the same ingest fans out the same way.
CREATE TABLE IF NOT EXISTS emissions.ingests (
    job_id bigint PRIMARY KEY,
    module text NOT NULL,
    year int NOT NULL,
    stale jsonb NOT NULL,
    rows int NOT NULL
);
"""

# Activity data the factors apply to (what operators typed in or uploaded earlier).
SEED_ENTRIES: list[tuple[str | None, dict[str, str], float]] = [
    ("electricity", {"class": "grid"}, 120_000),
    ("electricity", {"class": "solar"}, 8_000),
    ("heating", {"class": "natural_gas"}, 45_000),
    ("heating", {"class": "heating_oil"}, 3_000),
    ("water", {"class": "tap"}, 900_000),
    (None, {"class": "commute", "sub_class": "car"}, 210_000),
    (None, {"class": "commute", "sub_class": "train"}, 95_000),
]


def configure(dsn: str | None) -> None:
    """Point the handlers' connections at ``dsn`` (before the worker starts)."""
    global DSN
    DSN = dsn


async def db() -> asyncpg.Pool:
    """The handlers' own pool (the worker's pool is pgqueue's, not the application's)."""
    global _pool
    async with _pool_lock:
        if _pool is None:
            _pool = await asyncpg.create_pool(DSN, min_size=0, max_size=4)
    return _pool


async def close() -> None:
    global _pool
    if _pool is not None:
        await _pool.close()
        _pool = None


async def setup(conn: asyncpg.Connection, module: str = "buildings", year: int = 2024) -> None:
    """Create the example's tables and seed activity data for ``module``/``year`` (idempotent)."""
    await conn.execute(SCHEMA)
    if not await conn.fetchval(
        "SELECT count(*) FROM emissions.data_entries WHERE module = $1 AND year = $2",
        module,
        year,
    ):
        await conn.executemany(
            "INSERT INTO emissions.data_entries (module, data_entry_type, year, classification,"
            " quantity) VALUES ($1, $2, $3, $4::text::jsonb, $5)",
            [(module, t, year, json.dumps(c), q) for t, c, q in SEED_ENTRIES],
        )


def parse_factors(csv_text: str) -> list[tuple[str | None, dict[str, str], Decimal]]:
    """CSV rows as (data_entry_type or None, classification, factor)."""
    rows = []
    for line in csv.DictReader(io.StringIO(csv_text)):
        classification = {
            k: v for k, v in (("class", line["class"]), ("sub_class", line["sub_class"])) if v
        }
        rows.append(
            (line["data_entry_type"] or None, classification, Decimal(line["kg_co2e_per_unit"]))
        )
    return rows


# --------------------------------------------------------------------------- handlers


@app.job("ingest_factors", queue="ingest", max_attempts=3)
async def ingest_factors(job: pgqueue.Job) -> pgqueue.Result:
    """Replace the module's factors for the year; fan out one recalculation per stale type."""
    module, year = job.payload["module"], int(job.payload["year"])
    pool = await db()
    async with pool.acquire() as conn, conn.transaction():
        done = await conn.fetchrow(
            "SELECT stale, rows FROM emissions.ingests WHERE job_id = $1", job.id
        )
        if done is not None:  # a rerun after the first attempt committed: same answer
            stale, count = json.loads(done["stale"]), done["rows"]
        else:
            stale, count = await _replace_factors(conn, job.id, module, year, job.payload["csv"])
    work = {"simulate_seconds": job.payload.get("simulate_seconds", 0)}
    recalculations = [
        app.spec(
            "recalculate",
            {"module": module, "data_entry_type": t, "year": year, **work},
            scope={"module": module, "data_entry_type": t, "year": year},
        )
        for t in stale
    ]
    summary = {"factors": count, "stale": stale}
    if job.payload.get("coalesce", "join") == "dedup":
        # Answer 2: no join; every recalculation chains an aggregate that coalesces (dedup_key).
        chained = [
            app.spec(s.job_type, {**(s.payload or {}), "then_aggregate": True}, scope=s.scope)
            for s in recalculations
        ]
        return pgqueue.Result(summary).fan_out(chained)
    # Answer 1: a join that runs exactly once, after every recalculation (at once if none).
    return pgqueue.Result(summary).fan_out(recalculations, join=aggregation(module, year))


async def _replace_factors(
    conn: asyncpg.Connection, job_id: int, module: str, year: int, csv_text: str
) -> tuple[list[str | None], int]:
    """Write the CSV's factors (deleting those it no longer has); return the stale types."""
    new = {(t, json.dumps(c, sort_keys=True)): value for t, c, value in parse_factors(csv_text)}
    old = {
        (r["data_entry_type"], json.dumps(json.loads(r["classification"]), sort_keys=True)): r[
            "kg_co2e_per_unit"
        ]
        for r in await conn.fetch(
            "SELECT data_entry_type, classification::text AS classification, kg_co2e_per_unit"
            " FROM emissions.factors WHERE module = $1 AND year = $2",
            module,
            year,
        )
    }
    changed = {k[0] for k in new.keys() ^ old.keys()}
    changed |= {k[0] for k in new.keys() & old.keys() if new[k] != old[k]}
    stale = sorted(changed, key=lambda t: (t is None, t or ""))
    await conn.execute(
        "DELETE FROM emissions.factors WHERE module = $1 AND year = $2", module, year
    )
    await conn.executemany(
        "INSERT INTO emissions.factors (module, data_entry_type, year, classification,"
        " kg_co2e_per_unit) VALUES ($1, $2, $3, $4::text::jsonb, $5)",
        [(module, t, year, c, value) for (t, c), value in new.items()],
    )
    await conn.execute(
        "INSERT INTO emissions.ingests (job_id, module, year, stale, rows)"
        " VALUES ($1, $2, $3, $4::text::jsonb, $5)",
        job_id,
        module,
        year,
        json.dumps(stale),
        len(new),
    )
    return stale, len(new)


@app.job("recalculate", queue="recalc", max_attempts=5)
async def recalculate(job: pgqueue.Job) -> pgqueue.Result:
    """Recompute the emissions of one (module, data_entry_type, year); type may be null."""
    module, entry_type, year = (
        job.payload["module"],
        job.payload["data_entry_type"],
        int(job.payload["year"]),
    )
    await anyio.sleep(float(job.payload.get("simulate_seconds", 0)))
    pool = await db()
    total = await pool.fetchval(
        """
        WITH total AS (
            SELECT coalesce(sum(e.quantity * f.kg_co2e_per_unit), 0) AS kg
            FROM emissions.data_entries e
            JOIN emissions.factors f
              ON f.module = e.module AND f.year = e.year
             AND f.data_entry_type IS NOT DISTINCT FROM e.data_entry_type
             AND f.classification = e.classification
            WHERE e.module = $1 AND e.data_entry_type IS NOT DISTINCT FROM $2 AND e.year = $3
        )
        INSERT INTO emissions.entry_emissions (module, data_entry_type, year, kg_co2e, job_id)
        SELECT $1, $2, $3, kg, $4 FROM total
        ON CONFLICT (module, coalesce(data_entry_type, ''), year)
        DO UPDATE SET kg_co2e = excluded.kg_co2e, job_id = excluded.job_id, computed_at = now()
        RETURNING kg_co2e
        """,
        module,
        entry_type,
        year,
        job.id,
    )
    result = pgqueue.Result({"kg_co2e": float(total)})
    if job.payload.get("then_aggregate"):
        # Identical requests collapse: while one aggregate for the module/year is pending,
        # this returns that one instead of creating another.
        return result.then(aggregation(module, year, dedup_key=f"aggregate:{module}:{year}"))
    return result


def aggregation(module: str, year: int, dedup_key: str | None = None) -> pgqueue.Spec:
    """An aggregate of the module's year. Scoped: two of them (the one running while a later
    recalculation queues another, or two uploads' joins) run one at a time, in the order
    they were created; at once, the older could write its total last, over the newer's."""
    return app.spec(
        "aggregate",
        {"module": module, "year": year},
        scope={"aggregate": module, "year": year},
        dedup_key=dedup_key,
    )


@app.job("aggregate", queue="recalc", max_attempts=5)
async def aggregate(job: pgqueue.Job) -> dict[str, Any]:
    """Sum the module's emissions for the year into module_stats."""
    module, year = job.payload["module"], int(job.payload["year"])
    pool = await db()
    row = await pool.fetchrow(
        """
        INSERT INTO emissions.module_stats (module, year, kg_co2e, job_id)
        SELECT $1, $2, coalesce(sum(kg_co2e), 0), $3 FROM emissions.entry_emissions
        WHERE module = $1 AND year = $2
        ON CONFLICT (module, year) DO UPDATE
            SET kg_co2e = excluded.kg_co2e, job_id = excluded.job_id, computed_at = now(),
                aggregations = emissions.module_stats.aggregations + 1
        RETURNING kg_co2e, aggregations
        """,
        module,
        year,
        job.id,
    )
    assert row is not None
    return {"kg_co2e": float(row["kg_co2e"]), "aggregations": row["aggregations"]}


# --------------------------------------------------------------------------- enqueueing


async def start_ingest(
    conn: asyncpg.Connection | asyncpg.Pool,
    csv_text: str,
    *,
    module: str = "buildings",
    year: int = 2024,
    coalesce: Literal["join", "dedup"] = "join",
    simulate_seconds: float = 0,
) -> pgqueue.EnqueuedPipeline:
    """What the upload endpoint does: enqueue the ingest as a new pipeline, return its id."""
    pipeline = app.pipeline()
    pipeline.add(
        "ingest_factors",
        {
            "module": module,
            "year": year,
            "csv": csv_text,
            "coalesce": coalesce,
            "simulate_seconds": simulate_seconds,
        },
        scope={"module": module, "year": year, "ingest": True},
    )
    return await pipeline.enqueue(conn)


async def _main(args: argparse.Namespace) -> None:
    configure(args.dsn or DSN)
    conn = await asyncpg.connect(DSN)
    try:
        await setup(conn, args.module, args.year)
        if args.command == "ingest":
            run = await start_ingest(
                conn,
                await anyio.Path(args.csv).read_text(encoding="utf-8"),
                module=args.module,
                year=args.year,
                coalesce=args.coalesce,
            )
            print(run.pipeline_id)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["setup", "ingest"])
    parser.add_argument("--dsn", help="default: $PGQUEUE_DSN, else the libpq PG* variables")
    parser.add_argument("--csv", default=str(SAMPLE_CSV))
    parser.add_argument("--module", default="buildings")
    parser.add_argument("--year", type=int, default=2024)
    parser.add_argument("--coalesce", choices=["join", "dedup"], default="join")
    anyio.run(_main, parser.parse_args())


if __name__ == "__main__":
    main()
