"""Claiming stays on its partial indexes as finished jobs and other queues' backlogs pile up."""

from __future__ import annotations

import json

import asyncpg
import pytest
from sqlharness import Connect

SEED = """
INSERT INTO pgqueue.jobs (job_type, state, finished_at, attempts, started_at, locked_by)
SELECT 'done', 'succeeded', now() - interval '1 day', 1, now() - interval '1 day', 'w'
FROM generate_series(1, 100000);
INSERT INTO pgqueue.jobs (job_type, scope) SELECT 'todo', CASE WHEN g % 2 = 0 THEN jsonb_build_object('k', g % 5) END
FROM generate_series(1, 50) g;
ANALYZE pgqueue.jobs;
"""

STATS = """
SELECT (SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'pgqueue.jobs'::regclass) AS seq,
       (SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelid = 'pgqueue.jobs_ready'::regclass) AS ready
"""


async def test_claim_next_uses_the_ready_index_not_a_table_scan(connect: Connect) -> None:
    worker, observer = await connect(), await connect()
    await worker.execute(SEED)
    await worker.execute("SELECT pg_stat_force_next_flush()")
    before = await observer.fetchrow(STATS)
    for _ in range(10):
        rows = await worker.fetch("SELECT id FROM pgqueue.claim_next('w', NULL, 3)")
        assert rows
        for r in rows:
            assert await worker.fetchval("SELECT pgqueue.complete($1, 'w')", r["id"])
    await worker.execute("SELECT pg_stat_force_next_flush()")
    await observer.execute("SELECT pg_stat_clear_snapshot()")
    after = await observer.fetchrow(STATS)
    assert after["seq"] == before["seq"], "claiming scanned the whole jobs table"
    assert after["ready"] >= before["ready"] + 10


async def test_plan_of_the_pick_uses_partial_index(connect: Connect) -> None:
    conn = await connect()
    await conn.execute(SEED)
    plan = json.loads(
        await conn.fetchval("""
        EXPLAIN (FORMAT JSON)
        SELECT j.id FROM pgqueue.jobs j
        WHERE j.state = 'queued' AND NOT j.scope_blocked AND NOT j.queue_paused AND j.run_after <= now()
        ORDER BY j.priority DESC, j.run_after, j.id LIMIT 10 FOR NO KEY UPDATE SKIP LOCKED""")
    )
    text = json.dumps(plan)
    assert '"Index Name": "jobs_ready"' in text
    assert "Seq Scan" not in text


PKEY_BLOCKS = """
SELECT idx_blks_hit + idx_blks_read FROM pg_statio_user_indexes
WHERE indexrelid = 'pgqueue.jobs_pkey'::regclass
"""


async def test_claim_next_updates_its_rows_by_primary_key_lookup(connect: Connect) -> None:
    """claim_next runs generic plans (planned once per session). A generic plan estimates a
    LIMIT $n at a tenth of the table, and a claim written as a join of the picked rows to
    the table was then planned as a merge join walking the whole primary key: each claim
    read it end to end. The claim must look its rows up by id."""
    worker, observer = await connect(), await connect()
    # Many queued jobs (unscoped: the one-statement path), after 100,000 finished ones in id
    # order: the shape of a busy queue that the bad plan read the primary key through.
    await worker.execute(
        SEED.replace("CASE WHEN g % 2 = 0 THEN jsonb_build_object('k', g % 5) END", "NULL").replace(
            "generate_series(1, 50)", "generate_series(1, 20000)"
        )
    )
    for _ in range(6):  # past the plan cache's first custom plans, whatever the mode
        assert len(await worker.fetch("SELECT id FROM pgqueue.claim_next('w', NULL, 1)")) == 1
    await worker.execute("SELECT pg_stat_force_next_flush()")
    before = await observer.fetchval(PKEY_BLOCKS)
    for _ in range(10):
        assert len(await worker.fetch("SELECT id FROM pgqueue.claim_next('w', NULL, 1)")) == 1
    await worker.execute("SELECT pg_stat_force_next_flush()")
    await observer.execute("SELECT pg_stat_clear_snapshot()")
    per_claim = (await observer.fetchval(PKEY_BLOCKS) - before) / 10
    assert per_claim < 10, f"each claim read {per_claim:.0f} blocks of jobs_pkey"


# Heap tuples this transaction fetched through an index of pgqueue.jobs, so far, and entries
# it read in the two ready indexes (where a plan reading a whole index for ids shows).
FETCHED = (
    "SELECT idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relid = 'pgqueue.jobs'::regclass"
)
READY_READ = """
SELECT pg_stat_get_xact_tuples_returned('pgqueue.jobs_ready'::regclass)
     + pg_stat_get_xact_tuples_returned('pgqueue.jobs_ready_in_queue'::regclass)
"""


@pytest.mark.parametrize("queues", [["email"], ["email", "sms"]], ids=["one queue", "two queues"])
@pytest.mark.parametrize("path", ["one statement", "general"])
async def test_a_claim_of_its_queues_reads_none_of_another_queues_backlog(
    connect: Connect, path: str, queues: list[str]
) -> None:
    """A worker of one queue claims through jobs_ready_in_queue, in claim order; a worker of
    several reads each queue's first jobs there and merges them in claim order. Through
    jobs_ready it read every due job of other queues ahead of its own, a heap fetch each to
    learn its queue: here 3,000 per claim, for a backlog it does not work. The statistics
    say the table holds one queue (the worst case for the claim's generic plan, which then
    estimates "queue = $1" to match every row): the index is chosen all the same."""
    conn = await connect()
    await conn.execute(
        "INSERT INTO pgqueue.jobs (job_type, queue, priority)"
        " SELECT 'bulk', 'bulk', 5 FROM generate_series(1, 3000)"
    )
    await conn.execute("ANALYZE pgqueue.jobs")
    # Behind all of them in claim order (lower priorities), in an order of their own; the
    # last two tie on priority and run_after, so id decides.
    at = "2026-01-01 00:00:00+00"
    for n, (priority, age) in enumerate([(0, 5), (1, 1), (0, 9), (2, 0), (1, 3), (0, 9)]):
        await conn.execute(
            "SELECT pgqueue.enqueue('mail', queue => $4, priority => $1,"
            " run_after => $2::text::timestamptz - make_interval(secs => $3))",
            priority,
            at,
            age,
            queues[n % len(queues)],
        )
    if path == "general":  # a scoped job queued anywhere sends claims down the general path
        await conn.execute("""SELECT pgqueue.enqueue('s', queue => 'other', scope => '{"k": 1}')""")
    expected = [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM pgqueue.jobs WHERE queue = ANY ($1) ORDER BY priority DESC, run_after, id",
            queues,
        )
    ]
    worker = await connect()  # plans its claims now, with those statistics
    claimed: list[int] = []
    async with worker.transaction():
        before, read_before = await worker.fetchval(FETCHED), await worker.fetchval(READY_READ)
        for _ in range(3):
            batch = await worker.fetch("SELECT id FROM pgqueue.claim_next('w', $1, 2)", queues)
            claimed += [r["id"] for r in batch]
        fetched = await worker.fetchval(FETCHED) - before
        read = await worker.fetchval(READY_READ) - read_before
    assert claimed == expected
    assert fetched < 100, f"3 claims of 2 jobs fetched {fetched} rows"
    assert read < 100, f"3 claims of 2 jobs read {read} entries of the ready indexes"


IN_QUEUE_SCANS = """
SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelid = 'pgqueue.jobs_ready_in_queue'::regclass
"""


async def test_a_scoped_claim_of_every_queue_never_reads_the_queue_index(connect: Connect) -> None:
    """The general path re-checks its picks by id: through the primary key. Read through a view
    that names the ready rows' state, it was planned as a scan of the whole of
    jobs_ready_in_queue for the ids (id is its last column): 1.4 ms of a 5 ms scoped claim,
    growing with the index's dead entries."""
    worker, observer = await connect(), await connect()
    await worker.execute(
        "SELECT pgqueue.enqueue_many(jsonb_agg(jsonb_build_object('job_type', 't',"
        " 'scope', jsonb_build_object('s', g % 20)))) FROM generate_series(1, 400) g"
    )
    await worker.execute("ANALYZE pgqueue.jobs")
    await worker.execute("SELECT pg_stat_force_next_flush()")
    before = await observer.fetchval(IN_QUEUE_SCANS)
    previous: list[int] = []
    for _ in range(5):
        batch = [
            r["id"] for r in await worker.fetch("SELECT id FROM pgqueue.claim_next('w', NULL, 10)")
        ]
        assert len(batch) == 10
        if previous:
            await worker.fetch("SELECT pgqueue.complete_many('w', $1::bigint[])", previous)
        previous = batch
    await worker.execute("SELECT pg_stat_force_next_flush()")
    await observer.execute("SELECT pg_stat_clear_snapshot()")
    assert await observer.fetchval(IN_QUEUE_SCANS) == before


READY_BLOCKS = """
SELECT sum(idx_blks_hit + idx_blks_read) FROM pg_statio_user_indexes
WHERE indexrelid IN ('pgqueue.jobs_ready'::regclass, 'pgqueue.jobs_ready_in_queue'::regclass)
"""


async def test_a_scoped_claim_of_several_queues_reads_only_their_first_jobs(
    connect: Connect,
) -> None:
    """The general path's claims of several queues read each queue's first jobs, twice (the
    shares, then the locking scans), whatever their plans (made once per session, here while
    20 jobs were ready) and however large another queue's part of the index has grown since:
    an earlier version that locked its candidates by id, written with the ready rows' flags,
    was planned as a read of all of jobs_ready_in_queue for the ids."""
    worker, producer, observer = await connect(), await connect(), await connect()
    await producer.execute(
        "SELECT pgqueue.enqueue_many(jsonb_agg(jsonb_build_object('job_type', 't',"
        " 'scope', jsonb_build_object('s', g % 20)))) FROM generate_series(1, 400) g"
    )
    await producer.execute("ANALYZE pgqueue.jobs")
    assert len(await worker.fetch("SELECT id FROM pgqueue.claim_next('w', '{default,x}', 5)")) == 5
    await producer.execute(
        "INSERT INTO pgqueue.jobs (job_type, queue) SELECT 'bulk', 'bulk' FROM generate_series(1, 20000)"
    )

    async def blocks_read() -> int:
        # Each backend reports its counts when it goes idle after the request; the
        # producer's insert must be counted before the window, not in it.
        for backend in (worker, producer):
            await backend.execute("SELECT pg_stat_force_next_flush()")
            await backend.execute("SELECT 1")
        await observer.execute("SELECT pg_stat_clear_snapshot()")
        count: int = await observer.fetchval(READY_BLOCKS)
        return count

    before = await blocks_read()
    for _ in range(3):
        batch = await worker.fetch("SELECT id FROM pgqueue.claim_next('w', '{default,x}', 5)")
        assert len(batch) == 5
    read = await blocks_read() - before
    assert read < 60, f"3 claims of 5 jobs read {read} blocks of the ready indexes"


async def test_functions_that_disable_plan_types_also_disable_jit(connect: Connect) -> None:
    """A statement left with only a disabled path costs 1e10 and would be JIT-compiled.

    `enable_seqscan = off` (or bitmapscan, nestloop) on a function holds for every
    statement it runs, nested calls included; with JIT on, one such statement compiles
    for hundreds of ms per call.
    """
    conn = await connect()
    rows = await conn.fetch("""
        SELECT p.oid::regprocedure::text AS fn, p.proconfig
        FROM pg_proc p
        WHERE p.pronamespace = 'pgqueue'::regnamespace
          AND EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c ~ '^enable_[a-z]+=off$')""")
    assert len(rows) >= 3, "the planner pins moved: update this test"
    missing = [r["fn"] for r in rows if "jit=off" not in r["proconfig"]]
    assert not missing, f"functions that disable plan types but leave JIT on: {missing}"


FUTURE = """
INSERT INTO pgqueue.jobs (job_type, queue, priority, run_after)
SELECT 'later', CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, g % 3,
       now() + interval '7 days' + g * interval '1 second'
FROM generate_series(1, 60000) g;
INSERT INTO pgqueue.jobs (job_type, queue, run_after) VALUES ('soon', 'b', now() + interval '1 hour');
ANALYZE pgqueue.jobs;
"""


def _scans(node: dict[str, object]) -> list[tuple[object, object]]:
    """(node type, relation) of every node of a plan that reads a relation."""
    found = [(node["Node Type"], node["Relation Name"])] if "Relation Name" in node else []
    for child in node.get("Plans", []):  # type: ignore[attr-defined]
        found += _scans(child)
    return found


def _blocks(plan: object) -> int:
    """Shared buffers a plan touched (hit or read), its subplans and init plans included."""
    top = plan[0]["Plan"]  # type: ignore[index]
    return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])


@pytest.mark.parametrize("queues", [None, ["b"], ["a", "b"]])
async def test_the_look_for_the_next_scheduled_job_reads_a_few_index_entries(
    connect: Connect, queues: list[str] | None
) -> None:
    """From a review of time handling: an idle worker's look for its next scheduled job, after
    every claim that came back short, was a min() over every scheduled job: a seq scan of
    300,000 jobs due in a week took 56 ms, times each worker, times each wake-up. It now
    reads the claim index's first entry past now() per priority (and queue): the same
    answer, from a few pages whatever the number of jobs scheduled later."""
    from pgqueue.worker.producer import _BEFORE_SLEEP_ANY, _BEFORE_SLEEP_OF

    conn = await connect()
    await conn.execute(FUTURE)
    sql = _BEFORE_SLEEP_ANY if queues is None else _BEFORE_SLEEP_OF
    seconds = await conn.fetchval(sql, queues, 0.0)
    assert 3500 < seconds <= 3600  # the job due in an hour, of queue b
    plan = json.loads(
        await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", queues, 0.0)
    )
    scans = _scans(plan[0]["Plan"])
    assert ("Seq Scan", "jobs") not in scans and ("Bitmap Heap Scan", "jobs") not in scans, scans
    assert _blocks(plan) < 100, _blocks(plan)  # the jobs fill some 1,000 pages


MIXED = """
INSERT INTO pgqueue.jobs (job_type, queue, priority, run_after)
SELECT 'j', (ARRAY['a', 'b', 'c'])[1 + g % 3], (ARRAY[-5, 0, 3, 10])[1 + g % 4],
       now() + (g % 7 - 2) * interval '1 hour' + g * interval '1 second'
FROM generate_series(1, 400) g;
-- Out of the claim index, so not "next" however soon: paused, running, succeeded.
UPDATE pgqueue.jobs SET queue_paused = true WHERE id % 11 = 0 AND state = 'queued';
UPDATE pgqueue.jobs SET state = 'running', locked_by = 'w', locked_at = now(), started_at = now(),
       attempts = 1 WHERE id % 13 = 0 AND NOT queue_paused;
UPDATE pgqueue.jobs SET state = 'succeeded', finished_at = now(), attempts = 1
WHERE id % 17 = 0 AND state = 'queued' AND NOT queue_paused;
"""

# The look it replaced: a min() over every scheduled job, by definition right.
REFERENCE = """
SELECT min(run_after) FROM pgqueue.jobs
WHERE state = 'queued' AND NOT scope_blocked AND NOT queue_paused AND run_after > now()
  AND ($1::text[] IS NULL OR queue = ANY ($1::text[]))
"""


@pytest.mark.parametrize("queues", [None, ["a"], ["b", "c"], ["c", "c"], [], ["zz"]])
async def test_the_next_scheduled_job_is_the_one_a_min_over_all_of_them_finds(
    connect: Connect, queues: list[str] | None
) -> None:
    """Due jobs, jobs out of the claim index (paused, running, finished) and four priorities
    (a negative one too) in three queues: the skipping look names the same job as a min()
    over every scheduled one."""
    from pgqueue.worker.producer import _NEXT_DUE_ANY, _NEXT_DUE_OF

    conn = await connect()
    await conn.execute(MIXED)
    sql = _NEXT_DUE_ANY if queues is None else _NEXT_DUE_OF
    async with conn.transaction():  # one now() for both
        expected = await conn.fetchval(REFERENCE, queues)
        # (SELECT $1) gives $1 a type where the look of any queue does not read it
        look = f"SELECT min(d.run_after) FROM ({sql}) AS d (run_after), (SELECT $1::text[]) q"
        found = await conn.fetchval(look, queues, 0.0)
    assert found == expected
    assert (expected is None) == (queues in ([], ["zz"]))


async def test_a_job_due_since_the_last_claim_is_due_at_once_for_the_look(connect: Connect) -> None:
    """From the time review: a job that fell due between a claim's now() and the look before
    sleeping was neither claimed nor looked at (the look read past its own now()): the
    worker slept until the poll. The look reads past the last claim, sent $2 seconds ago;
    a job due before that claim (one a queue limit holds back) it leaves out, or the
    worker would wake at once for ever."""
    from pgqueue.worker.producer import _BEFORE_SLEEP_ANY, _BEFORE_SLEEP_OF

    conn = await connect()
    await conn.execute(
        "INSERT INTO pgqueue.jobs (job_type, queue, run_after)"
        " VALUES ('j', 'a', now() - interval '0.5 seconds')"
    )
    for sql, queues in ((_BEFORE_SLEEP_ANY, None), (_BEFORE_SLEEP_OF, ["a"])):
        assert await conn.fetchval(sql, queues, 1.0) <= 0  # claimed a second ago: due since
        assert await conn.fetchval(sql, queues, 0.0) is None  # the claim saw it due


WIDE_FAILED_ROOT = """
SELECT min(id) FROM pgqueue.enqueue_many(
    jsonb_build_array(jsonb_build_object('job_type', 'root', 'key', 'r', 'max_attempts', 1))
    || (SELECT jsonb_agg(jsonb_build_object('job_type', 'child', 'after', jsonb_build_array('r')))
        FROM generate_series(1, $1::int) g)) AS id
"""


async def _buffers_of_a_wide_retry(db: asyncpg.Connection, n: int) -> int:
    """Buffers read by retry() of a failed root whose failure cancelled n dependents."""
    root = await db.fetchval(WIDE_FAILED_ROOT, n)
    await db.execute("SELECT count(*) FROM pgqueue.claim($1, 'w')", root)
    await db.execute("SELECT pgqueue.fail($1, 'w', 'boom')", root)
    await db.execute("ANALYZE pgqueue.jobs, pgqueue.job_dependencies")  # plans as in production
    plan = json.loads(
        await db.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT pgqueue.retry($1)", root)
    )
    assert await db.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE state = 'waiting'") == n
    await db.execute(
        "UPDATE pgqueue.jobs SET state = 'cancelled', finished_at = now()"
        " WHERE state IN ('waiting', 'queued')"
    )
    return _blocks(plan)


async def test_a_retry_reviving_many_dependents_reads_in_proportion_to_them(
    connect: Connect,
) -> None:
    """From a scale review: retry() of a failed root with 20,000 cancelled dependents took
    320 s (100,000: hours), holding their rows all along: for each revived row a lookup of
    the first job of its dedup key read every revived id again, and the filters of the
    revived set were "<> ALL (array)" per element. Twice the dependents now read about
    twice the buffers (they read four times as many before). One session, warmed up by a
    first retry, so the catalog reads of planning count once."""
    db = await connect()
    await _buffers_of_a_wide_retry(db, 50)
    small = await _buffers_of_a_wide_retry(db, 1000)
    large = await _buffers_of_a_wide_retry(db, 2000)
    assert large < 2.6 * small, (small, large)


async def test_a_pause_reads_the_queues_jobs_not_the_table(connect: Connect) -> None:
    """From a scale review: pause_queue found the queue's queued jobs by reading the whole
    table, finished jobs included (13-23 ms at 100,000 rows, seconds with millions). It
    reads the claim index by queue and the active scoped jobs: a few pages here, where the
    table holds 30,000 finished jobs; the scope-blocked job is flagged too."""
    conn = await connect()
    await conn.execute(
        "INSERT INTO pgqueue.jobs (job_type, queue, state, attempts, started_at, finished_at,"
        " locked_by, locked_at) SELECT 'old', 'q', 'succeeded', 1, now(), now(), 'w', now()"
        " FROM generate_series(1, 30000)"
    )
    await conn.execute("SELECT pgqueue.enqueue('t', queue => 'q', scope => '{\"s\": 1}')")
    await conn.execute("SELECT pgqueue.enqueue('t', queue => 'q', scope => '{\"s\": 1}')")
    await conn.execute("SELECT pgqueue.enqueue('t', queue => 'q')")
    await conn.execute("ANALYZE pgqueue.jobs")
    await conn.execute("SELECT pgqueue.pause_queue('another')")  # its plans made: catalog reads
    plan = json.loads(
        await conn.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT pgqueue.pause_queue('q')"
        )
    )
    assert _blocks(plan) < 100, _blocks(plan)  # the finished jobs fill some 400 pages
    flagged = await conn.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE queue_paused")
    assert flagged == 3
