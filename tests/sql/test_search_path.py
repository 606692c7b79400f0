"""pgqueue's functions run under a search path of their own (sql/10_search_path.sql).

They call built-ins by bare name. A function in a schema on the caller's path that takes the
exact argument type wins over a polymorphic built-in, and ran as whoever called pgqueue: a
role that may create in ``public`` (any role, on databases made before PostgreSQL 15) could
have a superuser's psql session or every worker run its code.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import asyncpg
import pytest

import pgqueue

# Each shadow raises: reached from inside pgqueue, it fails the call that reached it.
SHADOWS = """
CREATE SCHEMA shadow;
CREATE FUNCTION shadow.trap() RETURNS int LANGUAGE plpgsql
    AS $$ BEGIN RAISE EXCEPTION 'a shadowing function ran'; END $$;
CREATE FUNCTION shadow.cardinality(bigint[]) RETURNS int LANGUAGE sql AS 'SELECT shadow.trap()';
CREATE FUNCTION shadow.cardinality(text[]) RETURNS int LANGUAGE sql AS 'SELECT shadow.trap()';
CREATE FUNCTION shadow.cardinality(jsonb[]) RETURNS int LANGUAGE sql AS 'SELECT shadow.trap()';
CREATE FUNCTION shadow.unnest(bigint[]) RETURNS SETOF bigint LANGUAGE sql
    AS 'SELECT shadow.trap()::bigint';
CREATE FUNCTION shadow.unnest(text[]) RETURNS SETOF text LANGUAGE sql
    AS 'SELECT shadow.trap()::text';
CREATE FUNCTION shadow.agg_step(bigint[], bigint) RETURNS bigint[] LANGUAGE sql
    AS 'SELECT ARRAY[shadow.trap()::bigint]';
CREATE AGGREGATE shadow.array_agg(bigint) (SFUNC = shadow.agg_step, STYPE = bigint[]);
CREATE FUNCTION shadow.format(text, text, text) RETURNS text LANGUAGE sql
    AS 'SELECT shadow.trap()::text';
"""

# Every public function, and a hand write of each kind to jobs (its triggers).
WORKLOAD = [
    "SELECT pgqueue.enqueue('t', '{}', scope => '{\"s\": 1}')",
    "SELECT pgqueue.enqueue('t', '{}', scope => '{\"s\": 1}', dedup_key => 'k')",
    "SELECT pgqueue.enqueue('t', '{}', scope => '{\"s\": 1}', dedup_key => 'k')",
    f"""SELECT pgqueue.enqueue_many('[{{"job_type": "t", "key": "a"}},
        {{"job_type": "t", "after": ["a"], "pipeline_id": "{uuid.uuid4()}"}}]')""",
    "SELECT pgqueue.enqueue_many(ARRAY['t', 't'], NULL, ARRAY['q1', 'q2'], NULL, NULL, NULL, NULL)",
    'SELECT pgqueue.enqueue(\'p\', next_jobs => \'[{"job_type": "c"}, {"job_type": "c"}]\')',
    "SELECT count(*) FROM pgqueue.claim_next('w', NULL, 3)",
    "SELECT count(*) FROM pgqueue.claim_or_wait('w', ARRAY['q1', 'q2'], 1)",
    "SELECT pgqueue.complete_many('w', (SELECT pg_catalog.array_agg(id ORDER BY id) FROM pgqueue.jobs"
    " WHERE state = 'running' AND job_type = 't'), NULL, NULL)",
    "SELECT pgqueue.heartbeat('w')",
    "SELECT count(*) FROM pgqueue.claim_next('w', NULL, 10)",
    "SELECT pgqueue.save_progress(min(id), 'w', '{\"p\": 1}') FROM pgqueue.jobs WHERE state = 'running'",
    "SELECT pgqueue.complete(min(id), 'w', '{}', '[{\"job_type\": \"d\"}]') FROM pgqueue.jobs"
    " WHERE state = 'running'",
    "SELECT pgqueue.fail(min(id), 'w', 'boom', interval '0') FROM pgqueue.jobs WHERE state = 'running'",
    "SELECT count(*) FROM pgqueue.claim_next('w', NULL, 10)",
    # What the worker and the CLI call: a final failure cancels the job's dependents.
    "SELECT pgqueue._fail(min(id), 'w', 'boom', NULL) FROM pgqueue.jobs WHERE state = 'running'",
    "SELECT pgqueue._lock_pause(ARRAY['q1', 'q2'])",
    "SELECT pgqueue.snooze(min(id), 'w', interval '1 hour') FROM pgqueue.jobs WHERE state = 'running'",
    "SELECT pgqueue.release(min(id), 'w') FROM pgqueue.jobs WHERE state = 'running'",
    "SELECT pgqueue.abort(min(id)) FROM pgqueue.jobs WHERE state = 'running'",
    "SELECT pgqueue.claim(min(id), 'w2') FROM pgqueue.jobs WHERE state = 'queued'",
    "SELECT pgqueue.recover_stale(interval '0')",
    "SELECT pgqueue.cancel(max(id)) FROM pgqueue.jobs WHERE state = 'queued'",
    "SELECT pgqueue.retry(max(id)) FROM pgqueue.jobs WHERE state = 'cancelled'",
    "SELECT pgqueue.cancel_pipeline(pipeline_id) FROM pgqueue.jobs WHERE pipeline_id IS NOT NULL"
    " LIMIT 1",
    "SELECT pgqueue.abort_pipeline(gen_random_uuid())",
    "SELECT pgqueue.pause_queue('q1')",
    "SELECT pgqueue.resume_queue('q1')",
    "SELECT pgqueue.set_queue_limit('q2', 1)",
    "SELECT pgqueue.set_queue_limit('q2', NULL)",
    "SELECT pgqueue.enqueue_periodic('every', now(), '{\"job_type\": \"t\"}')",
    "SELECT pgqueue.error_line('Traceback (most recent call last):\n  x\nValueError: v')",
    "UPDATE pgqueue.jobs SET queue = 'q3' WHERE state = 'queued'",
    "DELETE FROM pgqueue.jobs WHERE state = 'cancelled'",
    "SELECT pgqueue.prune(interval '0')",
    "SELECT pgqueue.prune_expired(100)",
    "SELECT count(*) FROM pgqueue.queue_stats",
    # The settings' CHECK calls pgqueue._setting_valid, which formats its message.
    "UPDATE pgqueue.settings SET value = '6 minutes' WHERE name = 'stale_after'",
]


async def test_a_function_shadowing_a_builtin_is_never_called(conn: asyncpg.Connection) -> None:
    await conn.execute(SHADOWS)
    await conn.execute("SET search_path = shadow, public")
    with pytest.raises(asyncpg.RaiseError, match="a shadowing function ran"):
        await conn.fetchval("SELECT cardinality(ARRAY[1::bigint])")  # it does shadow
    for statement in WORKLOAD:
        try:
            await conn.execute(statement)
        except asyncpg.PostgresError as exc:
            pytest.fail(f"{statement}: {exc}")


def _called_by_the_package() -> list[str]:
    """The internal functions the Python package calls by name (``pgqueue._fail(``)."""
    package = Path(pgqueue.__file__).parent
    code = [
        line
        for path in package.rglob("*.py")
        for line in path.read_text("utf-8").splitlines()
        if not line.lstrip().startswith("#")
    ]
    return sorted({name for line in code for name in CALLED.findall(line)})


CALLED = re.compile(r"pgqueue\.(_[a-z_]+)\(")


async def test_every_function_a_caller_reaches_pins_its_search_path(
    conn: asyncpg.Connection,
) -> None:
    called = _called_by_the_package()
    assert "_fail" in called  # the search finds them
    unpinned = await conn.fetch(
        """SELECT p.oid::regprocedure::text AS f FROM pg_proc p
           WHERE p.pronamespace = 'pgqueue'::regnamespace
             AND (p.proname !~ '^_' OR p.prorettype = 'trigger'::regtype OR p.prosecdef
                  OR p.proname = ANY ($1::text[]))
             AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)""",
        called,
    )
    assert [r["f"] for r in unpinned] == []
