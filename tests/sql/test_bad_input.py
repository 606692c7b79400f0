"""Bad input raises an error naming the problem and writes nothing."""

from __future__ import annotations

import json
import re

import asyncpg
import pytest
from sqlharness import Connect, json_codecs

P1, P2 = "5d1c0ad4-3a29-4c1e-9a57-2f0f7b1f0001", "5d1c0ad4-3a29-4c1e-9a57-2f0f7b1f0002"
CASES = [
    ("SELECT pgqueue.enqueue('')", "job_type must be a non-blank string"),
    ("SELECT pgqueue.enqueue(NULL)", "job_type must be a non-blank string"),
    ("SELECT pgqueue.enqueue('t', '[1, 2]')", "payload must be a JSON object, got array"),
    ("SELECT pgqueue.enqueue('t', '\"x\"')", "payload must be a JSON object, got string"),
    ("SELECT pgqueue.enqueue('t', max_attempts => 0)", "max_attempts must be >= 1"),
    (
        "SELECT pgqueue.enqueue('t', depends_on => ARRAY[424242]::bigint[])",
        "depends_on names unknown job id 424242",
    ),
    (
        "SELECT pgqueue.enqueue('t', next_jobs => '{\"job_type\": \"x\"}')",
        "next_jobs: must be a JSON array of job specs, got object",
    ),
    (
        "SELECT pgqueue.enqueue('t', next_jobs => '[{\"payload\": {}}]')",
        "next_jobs[0]: job_type is required",
    ),
    (
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "x", "bogus": 1}]\')',
        'unknown key(s) "bogus"',
    ),
    (
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "x", "payload": []}]\')',
        "next_jobs[0]: payload must be a JSON object, got array",
    ),
    (
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "x", "max_attempts": 0}]\')',
        "next_jobs[0]: max_attempts must be an integer >= 1",
    ),
    (
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "x", "after": ["nope"]}]\')',
        'after names unknown key "nope"',
    ),
    (
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "x", "key": "a"}, '
        '{"job_type": "y", "key": "a"}]\')',
        'key "a" is used by more than one spec',
    ),
    (
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "x", "key": "a", "after": ["b"]}, '
        '{"job_type": "y", "key": "b", "after": ["a"]}]\')',
        "form a cycle",
    ),
    (
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "x", "key": "a", "after": ["a"]}]\')',
        'form a cycle through key "a"',
    ),
    (
        # a three-node cycle whose nodes also wait for a leaf (left out of the walk)
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "l", "key": "leaf"}, '
        '{"job_type": "x", "key": "a", "after": ["leaf", "c"]}, '
        '{"job_type": "y", "key": "b", "after": ["a", "leaf"]}, '
        '{"job_type": "z", "key": "c", "after": ["b"]}]\')',
        "form a cycle",
    ),
    (
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "x", "run_after": "soon"}]\')',
        "run_after is not a valid timestamp",
    ),
    (
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "x", "next_jobs": [{"job_type": 3}]}]\')',
        "next_jobs[0]: next_jobs[0]: job_type must be a non-blank string",
    ),
    (
        'SELECT pgqueue.enqueue_many(\'[{"job_type": "ok"}, {"job_type": ""}]\')',
        "enqueue_many[1]: job_type must be a non-blank string",
    ),
    ("SELECT pgqueue.enqueue_many('{}')", "must be a JSON array"),
    # The typed-array overload: the same checks, naming the first bad element.
    (
        "SELECT pgqueue.enqueue_many(ARRAY['ok', ''], NULL)",
        "enqueue_many[1]: job_type must be a non-blank string",
    ),
    (
        "SELECT pgqueue.enqueue_many(ARRAY['ok', NULL], NULL)",
        "enqueue_many[1]: job_type must be a non-blank string",
    ),
    (
        "SELECT pgqueue.enqueue_many(ARRAY['a', 'b'], ARRAY['{}', '[1]']::jsonb[])",
        "enqueue_many[1]: payload must be a JSON object, got array",
    ),
    (
        "SELECT pgqueue.enqueue_many(ARRAY['a', 'b'], NULL, ARRAY[NULL, ' '])",
        "enqueue_many[1]: queue must be a non-blank string of at most 200 bytes",
    ),
    (
        "SELECT pgqueue.enqueue_many(ARRAY['a'], NULL, ARRAY[repeat('q', 201)])",
        "enqueue_many[0]: queue must be a non-blank string of at most 200 bytes",
    ),
    (
        "SELECT pgqueue.enqueue_many(ARRAY['a', 'b'], NULL, max_attempts => ARRAY[3, 0])",
        "enqueue_many[1]: max_attempts must be an integer >= 1, got 0",
    ),
    (
        "SELECT pgqueue.enqueue_many(ARRAY['a'], NULL,"
        " scopes => ARRAY[jsonb_build_object('k', repeat('x', 1000))])",
        "enqueue_many[0]: scope must be at most 1000 bytes of JSON",
    ),
    (
        "SELECT pgqueue.enqueue_many(ARRAY['a', 'b'], ARRAY['{}']::jsonb[])",
        "payloads has 1 elements but job_types has 2",
    ),
    (
        "SELECT pgqueue.enqueue_many(ARRAY['a', 'b'], NULL, priorities => '{}'::int[])",
        "priorities has 0 elements but job_types has 2",
    ),
    (
        "SELECT pgqueue.enqueue_many(ARRAY[['a', 'b']], NULL)",
        "job_types must be a one-dimensional array",
    ),
    ("SELECT pgqueue.enqueue('t', queue => '')", "queue must be a non-blank string"),
    ("SELECT pgqueue.enqueue('t', dedup_key => '')", "dedup_key must be a non-blank string"),
    ("SELECT * FROM pgqueue.claim_next('w', NULL, 0)", "batch_size must be >= 1"),
    ("SELECT * FROM pgqueue.claim_next('')", "worker must be a non-empty string"),
    ("SELECT pgqueue.prune(NULL)", "older_than must be a non-negative interval"),
    ("SELECT pgqueue.recover_stale(interval '-1 second')", "stale_after must not be negative"),
    (
        "UPDATE pgqueue.settings SET value = 'soon' WHERE name = 'stale_after'",
        "stale_after must be a positive interval",
    ),
    (
        "UPDATE pgqueue.settings SET value = '0' WHERE name = 'max_attempts'",
        "max_attempts must be a positive integer",
    ),
    (
        # past bigint: was "value ... is out of range for type bigint"
        "UPDATE pgqueue.settings SET value = '99999999999999999999' WHERE name = 'max_attempts'",
        'max_attempts must be a positive integer, got "99999999999999999999"',
    ),
    (
        # an unbalanced brace passed the check, then failed the uuid cast unnamed
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "x",'
        ' "pipeline_id": "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}]\')',
        "next_jobs[0]: pipeline_id must be a UUID string",
    ),
    (
        'SELECT pgqueue.enqueue_many(\'[{"job_type": "x",'
        ' "pipeline_id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"}]\')',
        "enqueue_many[0]: pipeline_id must be a UUID string",
    ),
    (
        # now() + that leaves timestamptz's range: every retry would fail
        "UPDATE pgqueue.settings SET value = '300000 years' WHERE name = 'backoff_cap'",
        "backoff_cap must be a positive interval of at most 100 years",
    ),
    ("INSERT INTO pgqueue.settings VALUES ('poll', '1')", "settings_name_known"),
    (
        "UPDATE pgqueue.settings SET value = 'forever' WHERE name = 'prune_after'",
        "prune_after must be 'never' or an interval from 0 to 100 years such as '7 days',"
        ' got "forever"',
    ),
    (
        "UPDATE pgqueue.settings SET value = '-1 day' WHERE name = 'prune_after'",
        "prune_after must be 'never' or an interval",
    ),
    (
        # now() minus that is out of timestamptz's range: every retention round would fail
        "UPDATE pgqueue.settings SET value = '10000 years' WHERE name = 'prune_after'",
        "prune_after must be 'never' or an interval from 0 to 100 years",
    ),
    ("SELECT pgqueue.prune_expired(0)", "prune_expired: batch_size must be >= 1, got 0"),
    (
        "SELECT pgqueue.complete_many('w', ARRAY[1, 2], ARRAY['{}']::jsonb[])",
        "complete_many: job_ids, results and next_jobs must have the same length,"
        " got 2 job id(s), 1 result(s), 2 next_jobs",
    ),
    (
        # past bigint: accepted, every completion of the parent failed on the cast
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "x", "depends_on": [1e30]}]\')',
        "next_jobs[0]: depends_on must be an array of job ids",
    ),
    ("SELECT pgqueue.prune_expired(NULL)", "prune_expired: batch_size must be >= 1, got NULL"),
    (
        "SELECT pgqueue.snooze(1, 'w', interval '-1 hour')",
        "snooze: delay must be from 0 to 100 years, got -01:00:00",
    ),
    (
        # a cycle behind a chain, with a spec downstream of it: a key on the cycle is named
        # (the linear check of session 10 takes what it could not order, then walks that)
        'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{"job_type": "x", "key": "a"}, '
        '{"job_type": "x", "key": "b", "after": ["a"]}, '
        '{"job_type": "x", "key": "c", "after": ["b", "d"]}, '
        '{"job_type": "x", "key": "d", "after": ["c"]}, '
        '{"job_type": "x", "key": "e", "after": ["d"]}]\')',
        'form a cycle through key "c"',
    ),
    # A stored child naming another pipeline would make every completion of its parent fail.
    (
        f'SELECT pgqueue.enqueue(\'t\', next_jobs => \'[{{"job_type": "x", "pipeline_id": "{P2}"}}]\')',
        "next_jobs[0]: pipeline_id differs from the parent's",
    ),
    (
        f"SELECT pgqueue.enqueue('t', pipeline_id => '{P1}', next_jobs => '[{{\"job_type\": \"x\","
        f' "next_jobs": [{{"job_type": "y", "pipeline_id": "{P2}"}}]}}]\')',
        "next_jobs[0]: next_jobs[0]: pipeline_id differs from the parent's",
    ),
    (
        f'SELECT pgqueue.enqueue_many(\'[{{"job_type": "t", "pipeline_id": "{P1}",'
        f' "next_jobs": [{{"job_type": "x", "pipeline_id": "{P2}"}}]}}]\')',
        "enqueue_many[0]: next_jobs[0]: pipeline_id differs from the parent's",
    ),
    # Blank is any whitespace, not only spaces.
    ("SELECT pgqueue.enqueue(E'\\t\\n')", "job_type must be a non-blank string"),
    # A blank key is most likely built from a missing value: it would coalesce unrelated work.
    ("SELECT pgqueue.enqueue('t', dedup_key => E' \\t')", "dedup_key must be a non-blank string"),
    (
        'SELECT pgqueue.enqueue_many(\'[{"job_type": "t", "dedup_key": " "}]\')',
        "enqueue_many[0]: dedup_key must be a non-blank string",
    ),
    ("INSERT INTO pgqueue.jobs (job_type, dedup_key) VALUES ('t', ' ')", "jobs_dedup_key_valid"),
    (
        'SELECT pgqueue.enqueue_many(\'[{"job_type": "t", "queue": "\\t"}]\')',
        "queue must be a non-blank string of at most 200 bytes",
    ),
    # Past the claim indexes' row size, named by the parameter, not the index.
    (
        "SELECT pgqueue.enqueue('t', dedup_key => repeat('k', 1001))",
        "dedup_key must be a non-blank string of at most 1000 bytes",
    ),
    (
        'SELECT pgqueue.enqueue_many((\'[{"job_type": "t", "dedup_key": "\' || repeat(\'k\', 1001)'
        " || '\"}]')::jsonb)",
        "enqueue_many[0]: dedup_key must be a non-blank string of at most 1000 bytes",
    ),
    (
        "SELECT * FROM pgqueue.claim_next(repeat('w', 201))",
        "claim_next: worker must be a non-empty string of at most 200 bytes",
    ),
    (
        'SELECT pgqueue.enqueue_many(\'[{"job_type": "t", "priority": 2147483648}]\')',
        "priority must be an integer from -2147483648 to 2147483647",
    ),
    # Mixed signs: '-1 month 31 days' compares as positive, and subtracts to now().
    (
        "SELECT * FROM pgqueue.recover_stale('-1 month 31 days')",
        "recover_stale: stale_after must not be negative (nor mix signs",
    ),
    (
        "SELECT pgqueue.prune('1 month -29 days')",
        "prune: older_than must be a non-negative interval",
    ),
    (
        "UPDATE pgqueue.settings SET value = '-1 month 31 days' WHERE name = 'stale_after'",
        "stale_after must be a positive interval of at most 100 years",
    ),
    (
        "UPDATE pgqueue.settings SET value = '1 day -23 hours' WHERE name = 'prune_after'",
        "prune_after must be 'never' or an interval from 0 to 100 years",
    ),
    (
        "UPDATE pgqueue.jobs SET run_after = 'infinity'",
        'violates check constraint "jobs_run_after_finite"',
    ),
    # A deleted setting made every function that reads it fail: a failure could not be
    # recorded, and the worker could only hold the job back and run it again.
    (
        "DELETE FROM pgqueue.settings WHERE name = 'backoff_base'",
        "pgqueue.settings: backoff_base cannot be deleted",
    ),
    ("TRUNCATE pgqueue.settings", "pgqueue.settings cannot be truncated"),
    (
        "UPDATE pgqueue.settings SET value = 'never' WHERE name = 'stale_after'",
        "stale_after must be a positive interval",
    ),
]


@pytest.mark.parametrize(("sql", "message"), CASES, ids=[c[1][:40] for c in CASES])
async def test_bad_input_is_refused_with_a_clear_error(
    connect: Connect, sql: str, message: str
) -> None:
    conn = await json_codecs(await connect())
    existing = await conn.fetchval("SELECT pgqueue.enqueue('existing')")
    before = await conn.fetchval("SELECT count(*) FROM pgqueue.jobs")
    with pytest.raises(asyncpg.PostgresError) as err:
        await conn.execute(sql)
    assert message in str(err.value)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == before
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.job_dependencies") == 0
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", existing) == "queued"


@pytest.mark.parametrize(
    ("value", "hinted"),
    [("soon", False), ("0", False), ("200 years", False), ("-1 month 31 days", True)],
)
async def test_a_refused_interval_setting_hints_at_mixed_signs_only_where_they_mix(
    connect: Connect, value: str, hinted: bool
) -> None:
    """Every refusal carried the mixed-signs hint, "soon" too."""
    conn = await connect()
    with pytest.raises(asyncpg.PostgresError) as err:
        await conn.execute(
            "UPDATE pgqueue.settings SET value = $1 WHERE name = 'stale_after'", value
        )
    assert "stale_after must be a positive interval" in str(err.value)
    hint = getattr(err.value, "hint", None)
    assert (hint is not None and "must not mix signs" in hint) is hinted
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.settings") == 6


async def test_dependency_on_failed_job_is_refused(connect: Connect) -> None:
    conn = await json_codecs(await connect())
    job = await conn.fetchval("SELECT pgqueue.enqueue('t', max_attempts => 1)")
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'x')", job)
    with pytest.raises(asyncpg.PostgresError, match=f"dependency {job} is already failed"):
        await conn.fetchval("SELECT pgqueue.enqueue('c', depends_on => ARRAY[$1]::bigint[])", job)


async def test_bad_next_jobs_at_complete_leaves_job_running(connect: Connect) -> None:
    conn = await json_codecs(await connect())
    job = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    with pytest.raises(
        asyncpg.PostgresError, match=r"pgqueue.complete: next_jobs\[0\]: job_type is required"
    ):
        await conn.fetchval("SELECT pgqueue.complete($1, 'w', NULL, '[{}]')", job)
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job) == "running"


async def test_a_refused_spec_at_complete_is_named_where_the_caller_put_it(
    connect: Connect,
) -> None:
    """A completion checks the job's stored specs and the passed ones as one array: a refusal
    names a passed spec by its place in the caller's array, a stored one as stored, and a
    batch's refusal names the job."""
    conn = await json_codecs(await connect())
    stored = [{"job_type": "a"}, {"job_type": "b"}]
    job = await conn.fetchval("SELECT pgqueue.enqueue('t', next_jobs => $1::jsonb)", stored)
    other = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    await conn.fetch("SELECT id FROM pgqueue.claim_next('w', batch_size => 2)")
    passed = [{"job_type": "x"}, {"job_type": "y", "payload": 3}]
    with pytest.raises(
        asyncpg.PostgresError,
        match=r"^pgqueue.complete: next_jobs\[1\]: payload must be a JSON object, got number$",
    ):
        await conn.fetchval("SELECT pgqueue.complete($1, 'w', NULL, $2::jsonb)", job, passed)
    with pytest.raises(
        asyncpg.PostgresError,
        match=r"^pgqueue.complete: next_jobs\[0\]: pipeline_id differs from the parent's",
    ):
        await conn.fetchval(
            "SELECT pgqueue.complete($1, 'w', NULL, $2::jsonb)",
            job,
            [{"job_type": "x", "pipeline_id": "00000000-0000-0000-0000-000000000001"}],
        )
    with pytest.raises(
        asyncpg.PostgresError,
        match=rf"^pgqueue.complete_many: job {job}: next_jobs\[1\]: payload must be a JSON object",
    ):
        await conn.fetch(
            "SELECT pgqueue.complete_many('w', ARRAY[$1, $2]::bigint[], NULL, ARRAY[NULL, $3]::jsonb[])",
            other,
            job,
            passed,
        )
    # A stored spec made invalid by hand is named as stored.
    await conn.execute(
        """UPDATE pgqueue.jobs SET next_jobs = '[{"job_type": "a"}, {"job_type": ""}]' WHERE id = $1""",
        job,
    )
    with pytest.raises(
        asyncpg.PostgresError,
        match=r"^pgqueue.complete: next_jobs\[1\] \(stored in the job's next_jobs\): job_type",
    ):
        await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job)
    states = await conn.fetch(
        "SELECT state FROM pgqueue.jobs WHERE id = ANY($1::bigint[])", [job, other]
    )
    assert [r["state"] for r in states] == ["running", "running"]
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 2


@pytest.mark.parametrize(
    ("values", "constraint"),
    [
        ("('t', '[]'::jsonb, 'queued')", "jobs_payload_is_object"),
        ("('', '{}'::jsonb, 'queued')", "jobs_job_type_not_empty"),
        ("('t', '{}'::jsonb, 'paused')", "jobs_state_known"),
        ("('t', '{}'::jsonb, 'running')", "jobs_running_has_lease"),
        ("('t', '{}'::jsonb, 'succeeded')", "jobs_finished_at_iff_final"),
    ],
)
async def test_direct_inserts_fail_on_named_constraints(
    connect: Connect, values: str, constraint: str
) -> None:
    conn = await connect()
    with pytest.raises(asyncpg.CheckViolationError, match=constraint):
        await conn.execute(f"INSERT INTO pgqueue.jobs (job_type, payload, state) VALUES {values}")
    with pytest.raises(asyncpg.NotNullViolationError, match="job_type"):
        await conn.execute("INSERT INTO pgqueue.jobs (payload) VALUES ('{}')")


async def test_a_stored_child_may_name_its_parents_pipeline(connect: Connect) -> None:
    conn = await json_codecs(await connect())
    parent = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', pipeline_id => $1::uuid, next_jobs => $2::jsonb)",
        P1,
        [{"job_type": "x", "pipeline_id": P1, "next_jobs": [{"job_type": "y", "pipeline_id": P1}]}],
    )
    assert len(await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", parent)) == 1
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", parent) is True
    rows = await conn.fetch("SELECT job_type, pipeline_id::text FROM pgqueue.jobs ORDER BY id")
    assert [tuple(r) for r in rows] == [("t", P1), ("x", P1)]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            "SELECT pgqueue.enqueue('x', run_after => '-infinity')",
            "pgqueue.enqueue: run_after must be a finite timestamp, got -infinity",
        ),
        (
            "SELECT pgqueue.enqueue('x', run_after => 'infinity')",
            "pgqueue.enqueue: run_after must be a finite timestamp, got infinity",
        ),
        (
            """SELECT * FROM pgqueue.enqueue_many('[{"job_type": "x"}, {"job_type": "y", "run_after": "infinity"}]')""",
            "pgqueue.enqueue_many[1]: run_after must be a finite timestamp, got infinity",
        ),
        (
            """SELECT pgqueue.enqueue('x', next_jobs => '[{"job_type": "y", "run_after": "-infinity"}]')""",
            "pgqueue.enqueue: next_jobs[0]: run_after must be a finite timestamp, got -infinity",
        ),
        (
            "SELECT * FROM pgqueue.enqueue_many(ARRAY['x', 'y'], ARRAY['{}', '{}']::jsonb[],"
            " run_afters => ARRAY[now(), '-infinity']::timestamptz[])",
            "pgqueue.enqueue_many[1]: run_after must be a finite timestamp, got -infinity",
        ),
    ],
)
async def test_an_infinite_run_after_is_refused(connect: Connect, call: str, message: str) -> None:
    """-infinity put a job before every other and broke queue_stats ("cannot subtract infinite
    timestamps"); infinity made a job that never runs and broke the worker's wake-up query."""
    conn = await connect()
    with pytest.raises(asyncpg.InvalidParameterValueError, match=re.escape(message)):
        await conn.execute(call)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0


@pytest.mark.parametrize(
    ("retry_in", "message"),
    [
        ("-2 months 60 days", "retry_in must not be negative"),  # compares equal to zero
        ("1000000 years", "retry_in must be at most 100 years"),  # was: timestamp out of range
        ("101 years", "retry_in must be at most 100 years"),
    ],
)
async def test_a_retry_in_that_lands_in_the_past_or_too_far_is_refused(
    connect: Connect, retry_in: str, message: str
) -> None:
    conn = await connect()
    job = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
    with pytest.raises(asyncpg.InvalidParameterValueError, match=re.escape(message)):
        await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'e', $2::text::interval)", job, retry_in)
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job) == "running"
    assert (
        await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'e', interval '100 years')", job)
        == "queued"
    )


async def test_a_null_dependency_id_is_named_as_null(connect: Connect) -> None:
    conn = await connect()
    with pytest.raises(
        asyncpg.InvalidParameterValueError,
        match=re.escape("pgqueue.enqueue: depends_on must not contain NULL"),
    ):
        await conn.fetchval("SELECT pgqueue.enqueue('x', depends_on => ARRAY[NULL]::bigint[])")
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            "SELECT pgqueue.prune('10000 years')",
            "pgqueue.prune: older_than must be at most 1000 years",
        ),
        (
            "SELECT * FROM pgqueue.recover_stale('10000 years')",
            "pgqueue.recover_stale: stale_after must be at most 1000 years",
        ),
    ],
)
async def test_an_interval_past_the_timestamp_range_is_refused_by_name(
    connect: Connect, call: str, message: str
) -> None:
    """Both said "timestamp out of range"."""
    conn = await connect()
    with pytest.raises(asyncpg.InvalidParameterValueError, match=re.escape(message)):
        await conn.execute(call)
    assert await conn.fetchval("SELECT pgqueue.prune('1000 years')") == 0  # the bound itself works


async def test_complete_many_naming_a_job_twice_is_refused(connect: Connect) -> None:
    """Completed once with one entry's result and children: the other's were lost."""
    conn = await connect()
    parent = await conn.fetchval("SELECT pgqueue.enqueue('parent')")
    assert len(await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", parent)) == 1
    with pytest.raises(
        asyncpg.InvalidParameterValueError, match=f"names job {parent} more than once"
    ):
        await conn.execute(
            "SELECT pgqueue.complete_many('w', ARRAY[$1, $1]::bigint[], NULL,"
            """ ARRAY['[{"job_type": "a"}]', '[{"job_type": "b"}]']::jsonb[])""",
            parent,
        )
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", parent) == "running"
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1


async def test_truncate_with_restart_identity_leaves_no_abort_request_for_a_new_job(
    connect: Connect,
) -> None:
    conn = await connect()
    job = await conn.fetchval("SELECT pgqueue.enqueue('a')")
    assert len(await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w1')", job)) == 1
    assert await conn.fetchval("SELECT pgqueue.abort($1)", job) == "running"
    await conn.execute("TRUNCATE pgqueue.jobs RESTART IDENTITY")
    again = await conn.fetchval("SELECT pgqueue.enqueue('new', max_attempts => 5)")
    assert again == job  # the id is reused
    assert len(await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w2')", again)) == 1
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w2', 'transient', '0')", again) == "queued"


async def test_retention_set_to_never_still_drops_ended_abort_requests(connect: Connect) -> None:
    conn = await connect()
    job = await conn.fetchval("SELECT pgqueue.enqueue('a')")
    assert len(await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)) == 1
    assert await conn.fetchval("SELECT pgqueue.abort($1)", job) == "running"
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job) is True  # success wins
    await conn.execute("UPDATE pgqueue.settings SET value = 'never' WHERE name = 'prune_after'")
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 1
    assert await conn.fetchval("SELECT pgqueue.prune_expired()") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.abort_requests") == 0


async def test_complete_many_of_no_ids_completes_nothing(connect: Connect) -> None:
    """complete(NULL, w) returns false; complete_many(w, NULL) raised "dimension values cannot
    be null" (the array it builds for the missing results was sized by a NULL)."""
    conn = await connect()
    job = await conn.fetchval("SELECT pgqueue.enqueue('x')")
    await conn.fetchval("SELECT id FROM pgqueue.claim_next('w')")
    for call in (
        "SELECT pgqueue.complete_many('w', NULL)",
        "SELECT pgqueue.complete_many('w', NULL, NULL, NULL)",
        "SELECT pgqueue.complete_many('w', '{}')",
    ):
        assert await conn.fetch(call) == []
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job) == "running"


@pytest.mark.parametrize(
    "form",
    [
        "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
        "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",  # a hyphen after any group of four
        "A0EEBC999C0B4EF8BB6D6BB9BD380A11",
    ],
)
async def test_a_spec_pipeline_id_takes_every_form_uuid_input_takes(
    connect: Connect, form: str
) -> None:
    """The spec check follows uuid's input syntax: the second form was refused."""
    conn = await connect()
    specs = json.dumps([{"job_type": "x", "pipeline_id": form}])
    await conn.fetchval("SELECT pgqueue.enqueue_many($1::jsonb)", specs)
    assert (
        await conn.fetchval("SELECT pipeline_id::text FROM pgqueue.jobs")
        == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    )


def _chain(depth: int) -> str:
    """A spec array whose specs nest next_jobs ``depth`` levels deep in all."""
    spec: dict[str, object] = {"job_type": "step"}
    for _ in range(depth - 1):
        spec = {"job_type": "step", "next_jobs": [spec]}
    return json.dumps([spec])


@pytest.mark.parametrize(
    ("call", "levels"),
    [
        # The job enqueue() creates is the first level (as the same spec in enqueue_many).
        ("SELECT pgqueue.enqueue('root', next_jobs => $1::jsonb)", 99),
        ("SELECT pgqueue.enqueue_many($1::jsonb)", 100),
        ("SELECT pgqueue.complete($2, 'w', next_jobs => $1::jsonb)", 100),
    ],
    ids=["enqueue", "enqueue_many", "complete"],
)
async def test_specs_nested_past_100_levels_are_refused_by_name(
    connect: Connect, call: str, levels: int
) -> None:
    """From a scale review: past some 380 levels the validation's recursion ended in
    "stack depth limit exceeded", naming neither the spec nor the cause. 100 levels pass;
    more are refused, naming the limit and what to do instead, and nothing is written."""
    conn = await connect()
    await conn.execute("SELECT pgqueue.enqueue('parent')")
    parent = await conn.fetchval("SELECT id FROM pgqueue.claim_next('w')")
    args = (parent,) if "$2" in call else ()
    await conn.execute(call, _chain(levels), *args)
    if "complete" in call:  # completed now: another to complete
        await conn.execute("SELECT pgqueue.enqueue('parent')")
        args = (await conn.fetchval("SELECT id FROM pgqueue.claim_next('w')"),)
    before = await conn.fetchval("SELECT count(*) FROM pgqueue.jobs")
    with pytest.raises(
        asyncpg.InvalidParameterValueError, match="specs nested more than 100 levels deep"
    ):
        await conn.execute(call, _chain(levels + 1), *args)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == before
