"""Where one call's time goes: the call against variants that each leave one part out.

Two probes, for the two single-call targets that do not hold (analysis section 15):

* ``claim``: a one-job claim on an idle connection (20 ms after its last statement, as an idle
  worker's is), the round trip timed from the client: ``claim_next``; its pick-and-update
  statement sent bare; the same statement on a copy of ``pgqueue.jobs`` without CHECK
  constraints; on a copy with neither CHECKs nor any index but the primary key and the claim
  index; the raw ceiling's UPDATE on its plain table.
* ``enqueue``: single ``enqueue()`` calls back to back on one connection, 1 s blocks:
  the function; with the insert trigger disabled; a plain INSERT into ``pgqueue.jobs``
  with and without the trigger; copies of the table as above; the raw ceiling's INSERT.
* ``trigger``: ``enqueue()`` with the insert trigger's function replaced by parts of itself.

Variants take turns in a fresh random order every round, in a database of their own
(``pgqueue_bench_parts``, dropped at the end). ``--sync off`` sets
``synchronous_commit = off`` on the timed connections, which leaves the CPU: the commit's
WAL flush is the same for every variant and only adds noise.

    python -m bench.parts claim --rounds 400 --sync off
    python -m bench.parts enqueue --rounds 6 --sync off
    python -m bench.parts trigger --rounds 8 --sync off
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable

import asyncpg

from bench import raw
from bench.common import DEFAULT_DSN, drop_database, recreate_database
from pgqueue import migrate
from pgqueue.worker.producer import _COLUMNS

DBNAME = "pgqueue_bench_parts"

# Copies of pgqueue.jobs: without the CHECK constraints (every index kept), and with
# neither CHECKs nor any index but the primary key and the claim index (jobs_ready's).
COPIES = """
CREATE TABLE pgqueue.jobs_nochecks (LIKE pgqueue.jobs INCLUDING DEFAULTS INCLUDING INDEXES
                                    INCLUDING IDENTITY);
CREATE TABLE pgqueue.jobs_checks_2idx (LIKE pgqueue.jobs INCLUDING DEFAULTS INCLUDING CONSTRAINTS
                                       INCLUDING IDENTITY);
CREATE TABLE pgqueue.jobs_plain (LIKE pgqueue.jobs INCLUDING DEFAULTS INCLUDING IDENTITY);
ALTER TABLE pgqueue.jobs_checks_2idx ADD PRIMARY KEY (id);
ALTER TABLE pgqueue.jobs_plain ADD PRIMARY KEY (id);
CREATE INDEX ON pgqueue.jobs_checks_2idx (priority DESC, run_after, id)
    WHERE state = 'queued' AND NOT scope_blocked AND NOT queue_paused;
CREATE INDEX ON pgqueue.jobs_plain (priority DESC, run_after, id)
    WHERE state = 'queued' AND NOT scope_blocked AND NOT queue_paused;
"""

# claim_next's one-statement path (no scoped job active), on any copy of the table.
PICK_AND_CLAIM = f"""
WITH picked AS (
    SELECT j.id FROM pgqueue.{{table}} j
    WHERE j.state = 'queued' AND NOT j.scope_blocked AND NOT j.queue_paused AND j.run_after <= now()
      AND j.scope IS NULL
    ORDER BY j.priority DESC, j.run_after, j.id
    LIMIT $2
    FOR NO KEY UPDATE OF j SKIP LOCKED
), claimed AS (
    UPDATE pgqueue.{{table}} j
       SET state = 'running', is_current = false, locked_by = $1, locked_at = now(),
           started_at = coalesce(j.started_at, now()), attempts = j.attempts + 1
     WHERE j.id = ANY (ARRAY(SELECT p.id FROM picked p))
    RETURNING j.*
)
SELECT {_COLUMNS} FROM claimed c ORDER BY c.priority DESC, c.run_after, c.id
"""
INSERT_INTO = "INSERT INTO pgqueue.{table} (job_type, payload) VALUES ($1, $2::jsonb) RETURNING id"
ENQUEUE = "SELECT pgqueue.enqueue($1, $2::jsonb)"
FINISH_COPY = (
    "UPDATE pgqueue.{table} SET state = 'succeeded', finished_at = now(), locked_by = NULL,"
    " locked_at = NULL WHERE id = $1 AND locked_by = $2"
)

# (claim statement, insert statement, completion statement, claim takes a queues argument)
CLAIMS: dict[str, tuple[str, str, str, bool]] = {
    "claim_next()": (
        f"SELECT {_COLUMNS} FROM pgqueue.claim_next(worker => $1, queues => $2::text[],"
        " batch_size => $3)",
        ENQUEUE,
        "SELECT * FROM pgqueue.complete_many($2, ARRAY[$1::bigint])",
        True,
    ),
    "its statement, bare": (
        PICK_AND_CLAIM.format(table="jobs"),
        ENQUEUE,
        "SELECT * FROM pgqueue.complete_many($2, ARRAY[$1::bigint])",
        False,
    ),
    "statement, no CHECKs": (
        PICK_AND_CLAIM.format(table="jobs_nochecks"),
        INSERT_INTO.format(table="jobs_nochecks"),
        FINISH_COPY.format(table="jobs_nochecks"),
        False,
    ),
    "statement, no CHECKs, 2 indexes": (
        PICK_AND_CLAIM.format(table="jobs_plain"),
        INSERT_INTO.format(table="jobs_plain"),
        FINISH_COPY.format(table="jobs_plain"),
        False,
    ),
    "raw UPDATE": (
        raw.CLAIM.format(table="jobs"),
        raw.INSERT_ONE,
        "UPDATE bench_raw.jobs SET state = 'succeeded', finished_at = now()"
        " WHERE id = $1 AND locked_by = $2",
        False,
    ),
}

# (statement, insert trigger enabled)
ENQUEUES: dict[str, tuple[str, bool]] = {
    "raw INSERT": (raw.INSERT_ONE, True),
    "enqueue()": (ENQUEUE, True),
    "enqueue(), trigger off": (ENQUEUE, False),
    "INSERT into jobs": (INSERT_INTO.format(table="jobs"), True),
    "INSERT into jobs, trigger off": (INSERT_INTO.format(table="jobs"), False),
    "copy: no CHECKs, no trigger": (INSERT_INTO.format(table="jobs_nochecks"), True),
    "copy: CHECKs, 2 indexes, no trigger": (INSERT_INTO.format(table="jobs_checks_2idx"), True),
    "copy: no CHECKs, 2 indexes, no trigger": (INSERT_INTO.format(table="jobs_plain"), True),
}

# Bodies for the insert trigger's function (None: as shipped; "off": trigger disabled).
TRIGGER_BODIES: dict[str, str | None] = {
    "as shipped": None,
    "trigger off": "off",
    "RETURN NULL only": "BEGIN RETURN NULL; END",
    "pg_notify only": "BEGIN PERFORM pg_notify('pgqueue', 'default'); RETURN NULL; END",
}


async def _rounds(
    rounds: int, variants: list[str], one: Callable[[str], Awaitable[float]]
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k in random.sample(variants, len(variants)):
            out[k].append(await one(k))
    return out


async def _back_to_back(conn: asyncpg.Connection, sql: str, seconds: float = 1.0) -> float:
    """Microseconds per call of ``sql`` run back to back for ``seconds``."""
    await conn.fetchval(sql, "noop", "{}")
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        await conn.fetchval(sql, "noop", "{}")
        n += 1
    return (time.perf_counter() - start) / n * 1e6


async def probe_claim(dsn: str, rounds: int, sync: str) -> dict[str, list[float]]:
    producer, finisher = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    claimers = {k: await asyncpg.connect(dsn) for k in CLAIMS}
    for c in claimers.values():
        await c.execute(f"SET synchronous_commit = {sync}")
    # No worker listens; the NOTIFY would only add the same commit work to every variant.
    await producer.execute("ALTER TABLE pgqueue.jobs DISABLE TRIGGER jobs_notify_inserted")

    async def one(k: str) -> float:
        claim, insert, finish, has_queues = CLAIMS[k]
        conn = claimers[k]
        await conn.fetchval("SELECT 1")  # an idle worker's last statement before it sleeps
        await asyncio.sleep(0.02)
        await producer.fetchval(insert, "noop", "{}")
        args = ("probe", None, 10) if has_queues else ("probe", 10)
        start = time.perf_counter()
        rows = await conn.fetch(claim, *args)
        took = (time.perf_counter() - start) * 1000
        assert len(rows) == 1, (k, rows)
        await finisher.execute(finish, rows[0]["id"], "probe")
        return took

    return await _rounds(rounds, list(CLAIMS), one)


async def probe_enqueue(dsn: str, rounds: int, sync: str) -> dict[str, list[float]]:
    admin, conn = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    await conn.execute(f"SET synchronous_commit = {sync}")

    async def one(k: str) -> float:
        sql, trigger = ENQUEUES[k]
        switch = "ENABLE" if trigger else "DISABLE"
        await admin.execute(f"ALTER TABLE pgqueue.jobs {switch} TRIGGER jobs_notify_inserted")
        return await _back_to_back(conn, sql)

    return await _rounds(rounds, list(ENQUEUES), one)


async def probe_trigger(dsn: str, rounds: int, sync: str) -> dict[str, list[float]]:
    admin, conn = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    await conn.execute(f"SET synchronous_commit = {sync}")
    shipped = await admin.fetchval(
        "SELECT prosrc FROM pg_proc WHERE oid = 'pgqueue._notify_inserted'::regproc"
    )

    async def one(k: str) -> float:
        body = TRIGGER_BODIES[k]
        switch = "DISABLE" if body == "off" else "ENABLE"
        await admin.execute(f"ALTER TABLE pgqueue.jobs {switch} TRIGGER jobs_notify_inserted")
        src = shipped if body in (None, "off") else body
        await admin.execute(
            "CREATE OR REPLACE FUNCTION pgqueue._notify_inserted() RETURNS trigger"
            f" LANGUAGE plpgsql AS $body${src}$body$"
        )
        return await _back_to_back(conn, ENQUEUE)

    return await _rounds(rounds, list(TRIGGER_BODIES), one)


PROBES = {
    "claim": (probe_claim, "ms per claim"),
    "enqueue": (probe_enqueue, "us per call"),
    "trigger": (probe_trigger, "us per call"),
}


async def main(server_dsn: str, probe: str, rounds: int, sync: str) -> None:
    dsn = await recreate_database(server_dsn, DBNAME)
    try:
        await asyncio.to_thread(migrate.upgrade, dsn)
        await raw.setup(dsn)
        conn = await asyncpg.connect(dsn)
        await conn.execute(COPIES)
        await conn.close()
        fn, unit = PROBES[probe]
        results = await fn(dsn, rounds, sync)
    finally:
        await drop_database(server_dsn, DBNAME)
    print(f"{probe}: {rounds} rounds, synchronous_commit = {sync}; median (min-max), {unit}")
    for k, v in results.items():
        print(f"  {k:40s} {statistics.median(v):8.3f} ({min(v):.3f}-{max(v):.3f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=sorted(PROBES))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--sync", choices=["on", "off"], default="off")
    parser.add_argument("--dsn", default=os.environ.get("PGQUEUE_BENCH_DSN", DEFAULT_DSN))
    a = parser.parse_args()
    asyncio.run(main(a.dsn, a.probe, a.rounds, a.sync))
