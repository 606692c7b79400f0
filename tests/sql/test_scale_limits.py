"""Calls with many keys at once: what a lock per scope would exhaust, and the rows a batch
carries (from a review of pathological scale)."""

from __future__ import annotations

import json

import pytest
from sqlharness import Connect

ORDER_LOCKS = """
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND classid = pgqueue._lock_class('scope_order')
"""


@pytest.mark.parametrize("form", ["arrays", "specs"])
async def test_a_batch_of_many_scopes_takes_no_lock_per_scope_and_keeps_their_order(
    connect: Connect, form: str
) -> None:
    """A batch of 15,000 scopes ran the server's lock table out (a lock per scope, held to
    commit: "out of shared memory", for other sessions too while it ran). Past a thousand
    scopes a batch takes none and enters its jobs unblocked, which claims step over until
    their turn: two jobs in each of 1,500 scopes, the claim takes each scope's first."""
    conn = await connect()
    scopes = [json.dumps({"s": n % 1500}) for n in range(3000)]
    async with conn.transaction():
        if form == "arrays":
            await conn.execute(
                "SELECT count(*) FROM pgqueue.enqueue_many(array_fill('t'::text, ARRAY[3000]), NULL,"
                " scopes => $1::text[]::jsonb[])",
                scopes,
            )
        else:
            specs = [{"job_type": "t", "scope": json.loads(s)} for s in scopes]
            await conn.execute(
                "SELECT count(*) FROM pgqueue.enqueue_many($1::jsonb)", json.dumps(specs)
            )
        assert await conn.fetchval(ORDER_LOCKS) == 0
    claimed = await conn.fetch("SELECT id, scope FROM pgqueue.claim_next('w', batch_size => 3000)")
    first = await conn.fetch("SELECT DISTINCT ON (scope) id FROM pgqueue.jobs ORDER BY scope, id")
    assert sorted(r["id"] for r in claimed) == sorted(r["id"] for r in first)


async def test_a_scoped_batch_sorts_its_rows_not_its_id_array_in_each(connect: Connect) -> None:
    """The array form's scoped path carried the whole array of new ids in every row into
    the sort that orders a scope's jobs: 20,000 scoped jobs sorted 3 GB on disk (7 s). A
    temp_file_limit a twentieth of what that took for 5,000 jobs holds now."""
    conn = await connect()
    await conn.execute("SET work_mem = '64kB'")
    await conn.execute("SET temp_file_limit = '10MB'")
    await conn.execute(
        "SELECT count(*) FROM pgqueue.enqueue_many(array_fill('t'::text, ARRAY[5000]), NULL,"
        " scopes => (SELECT array_agg(jsonb_build_object('s', g % 50)) FROM generate_series(1, 5000) g))"
    )
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 5000
