"""Single-session semantics of the contract functions (retries, chaining, operator actions)."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import asyncpg
import pytest
from sqlharness import Connect, json_codecs


async def _conn(connect: Connect) -> asyncpg.Connection:
    return await json_codecs(await connect())


async def _run(conn: asyncpg.Connection, job: int, worker: str = "w") -> None:
    assert len(await conn.fetch("SELECT id FROM pgqueue.claim($1, $2)", job, worker)) == 1


async def test_a_long_backoff_base_doubles_up_to_the_cap_at_any_attempt(connect: Connect) -> None:
    """'2 days' doubled 30 times is out of an interval's range; the doubling stops at the cap,
    so a late attempt's failure is recorded (it raised, and the job stayed running)."""
    conn = await _conn(connect)
    await conn.execute("UPDATE pgqueue.settings SET value = '2 days' WHERE name = 'backoff_base'")
    await conn.execute("UPDATE pgqueue.settings SET value = '7 days' WHERE name = 'backoff_cap'")
    job = await conn.fetchval("SELECT pgqueue.enqueue('t', max_attempts => 50)")
    await conn.execute("UPDATE pgqueue.jobs SET attempts = 30 WHERE id = $1", job)
    await _run(conn, job)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", job) == "queued"
    delay = await conn.fetchval("SELECT run_after - now() FROM pgqueue.jobs WHERE id = $1", job)
    assert timedelta(days=3.5) <= delay <= timedelta(days=7)
    for attempts in (1, 2, 3, 31, 1000):
        backoff = await conn.fetchval("SELECT pgqueue._backoff($1)", attempts)
        assert backoff <= timedelta(days=7), (attempts, backoff)
        assert backoff >= min(timedelta(days=2 * 2 ** min(attempts - 1, 10)), timedelta(days=7)) / 2


async def test_a_spec_with_an_integral_decimal_is_created_with_the_integer(
    connect: Connect,
) -> None:
    """The validator accepts 2.0 for an integer field; the insert read it with ::int, which
    refuses '2.0': a stored spec made every completion of its parent raise."""
    conn = await _conn(connect)
    parent = await conn.fetchval(
        "SELECT pgqueue.enqueue('parent', next_jobs => $1::jsonb)",
        [{"job_type": "child", "priority": 2.0, "max_attempts": 3.0}],
    )
    await _run(conn, parent)
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", parent) is True
    assert await conn.fetchrow(
        "SELECT priority, max_attempts FROM pgqueue.jobs WHERE parent_id = $1", parent
    ) == (2, 3)
    ids = await conn.fetchval(
        "SELECT array_agg(e) FROM pgqueue.enqueue_many($1::jsonb) e",
        [{"job_type": "x", "priority": -4.0, "max_attempts": 1e1}],
    )
    assert await conn.fetchrow(
        "SELECT priority, max_attempts FROM pgqueue.jobs WHERE id = $1", ids[0]
    ) == (-4, 10)


async def test_fail_backs_off_exponentially_within_cap_then_fails(connect: Connect) -> None:
    conn = await _conn(connect)
    await conn.execute(
        "UPDATE pgqueue.settings SET value = '10 seconds' WHERE name = 'backoff_base'"
    )
    await conn.execute(
        "UPDATE pgqueue.settings SET value = '30 seconds' WHERE name = 'backoff_cap'"
    )
    job = await conn.fetchval("SELECT pgqueue.enqueue('t', max_attempts => 4)")
    delays = []
    for expected_state in ("queued", "queued", "queued", "failed"):
        await conn.execute("UPDATE pgqueue.jobs SET run_after = now() WHERE id = $1", job)
        await _run(conn, job)
        assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", job) == expected_state
        delays.append(
            await conn.fetchval("SELECT run_after - now() FROM pgqueue.jobs WHERE id = $1", job)
        )
    # attempt n waits in [50 %, 100 %] of min(cap, base * 2^(n-1))
    for n, delay in enumerate(delays[:3], start=1):
        full = min(timedelta(seconds=30), timedelta(seconds=10 * 2 ** (n - 1)))
        assert full / 2 <= delay <= full, (n, delay)
    row = await conn.fetchrow(
        "SELECT attempts, last_error, finished_at, locked_by FROM pgqueue.jobs WHERE id = $1", job
    )
    assert row["attempts"] == 4 and row["last_error"] == "boom" and row["finished_at"] is not None
    assert row["locked_by"] == "w"


async def test_fail_returns_the_state_it_wrote_whatever_a_trigger_does_to_the_row(
    connect: Connect,
) -> None:
    """An operator's trigger archives failed jobs and deletes them: fail still says failed
    (reading the row back would have answered NULL, 'not held'); the worker's _fail says how
    long until a requeued job runs again, and nothing for a job that ended."""
    conn = await _conn(connect)
    await conn.execute(
        """CREATE TABLE archive AS SELECT * FROM pgqueue.jobs WITH NO DATA;
        CREATE FUNCTION archive_failed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.archive SELECT NEW.*;  -- named with its schema: see sql.md
            DELETE FROM pgqueue.jobs WHERE id = NEW.id;
            RETURN NULL;
        END $$;
        CREATE TRIGGER archive_failed AFTER UPDATE OF state ON pgqueue.jobs
            FOR EACH ROW WHEN (NEW.state = 'failed') EXECUTE FUNCTION archive_failed();"""
    )
    gone = await conn.fetchval("SELECT pgqueue.enqueue('t', max_attempts => 1)")
    await _run(conn, gone)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", gone) == "failed"
    assert await conn.fetchval("SELECT state FROM archive WHERE id = $1", gone) == "failed"

    again = await conn.fetchval("SELECT pgqueue.enqueue('t', max_attempts => 2)")
    await _run(conn, again)
    row = await conn.fetchrow(
        "SELECT * FROM pgqueue._fail($1, 'w', 'boom', interval '90 seconds')", again
    )
    assert (row["state"], row["runs_in"]) == ("queued", timedelta(seconds=90))
    await conn.execute("UPDATE pgqueue.jobs SET run_after = now() WHERE id = $1", again)
    await _run(conn, again)
    row = await conn.fetchrow("SELECT * FROM pgqueue._fail($1, 'w', 'boom', NULL)", again)
    assert (row["state"], row["runs_in"]) == ("failed", None)
    assert await conn.fetch("SELECT * FROM pgqueue._fail($1, 'w', 'late', NULL)", again) == []


async def test_retry_in_overrides_backoff_and_max_attempts_defaults_from_settings(
    connect: Connect,
) -> None:
    conn = await _conn(connect)
    await conn.execute("UPDATE pgqueue.settings SET value = '2' WHERE name = 'max_attempts'")
    job = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    assert await conn.fetchval("SELECT max_attempts FROM pgqueue.jobs WHERE id = $1", job) == 2
    await _run(conn, job)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'x', interval '0')", job) == "queued"
    await _run(conn, job)  # claimable at once
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'x', interval '0')", job) == "failed"


async def test_retry_resets_attempts_and_revives_cancelled_dependents(connect: Connect) -> None:
    conn = await _conn(connect)
    job = await conn.fetchval("SELECT pgqueue.enqueue('t', max_attempts => 1)")
    child = await conn.fetchval(
        "SELECT pgqueue.enqueue('c', depends_on => ARRAY[$1]::bigint[])", job
    )
    grandchild = await conn.fetchval(
        "SELECT pgqueue.enqueue('g', depends_on => ARRAY[$1]::bigint[])", child
    )
    await _run(conn, job)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'x')", job) == "failed"
    assert await conn.fetchval("SELECT pgqueue.retry($1)", job) is True
    row = await conn.fetchrow(
        "SELECT state, attempts, finished_at FROM pgqueue.jobs WHERE id = $1", job
    )
    assert tuple(row) == ("queued", 0, None)
    states = await conn.fetch(
        "SELECT state FROM pgqueue.jobs WHERE id IN ($1, $2) ORDER BY id", child, grandchild
    )
    assert [r[0] for r in states] == ["waiting", "waiting"]
    await _run(conn, job)
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job)
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", child) == "queued"
    assert (
        await conn.fetchval("SELECT pgqueue.retry($1)", job) is False
    )  # succeeded: nothing to retry


async def test_cancel_waiting_or_queued_only(connect: Connect) -> None:
    conn = await _conn(connect)
    queued = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    dependent = await conn.fetchval(
        "SELECT pgqueue.enqueue('d', depends_on => ARRAY[$1]::bigint[])", queued
    )
    running = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    await _run(conn, running)
    assert await conn.fetchval("SELECT pgqueue.cancel($1)", queued) is True
    assert (
        await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", dependent)
        == "cancelled"
    )
    assert await conn.fetchval("SELECT pgqueue.cancel($1)", running) is False
    assert await conn.fetchval("SELECT pgqueue.cancel($1)", queued) is False
    assert await conn.fetchval("SELECT pgqueue.retry($1)", queued) is True


async def test_prune_removes_old_final_jobs_but_keeps_scope_current(connect: Connect) -> None:
    conn = await _conn(connect)
    old = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    current = await conn.fetchval("SELECT pgqueue.enqueue('t', scope => '{\"k\": 1}')")
    fresh = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    pending = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    for job in (old, current, fresh):
        await _run(conn, job)
        assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job)
    await conn.execute(
        "UPDATE pgqueue.jobs SET finished_at = now() - interval '10 days' WHERE id IN ($1, $2)",
        old,
        current,
    )
    assert await conn.fetchval("SELECT pgqueue.prune(interval '7 days')") == 1
    left = [r[0] for r in await conn.fetch("SELECT id FROM pgqueue.jobs ORDER BY id")]
    assert left == [current, fresh, pending]


async def test_deleting_jobs_deletes_their_dependency_edges_at_both_ends(connect: Connect) -> None:
    """The edges have no foreign keys; the statement trigger jobs_drop_edges does the cascade."""
    conn = await _conn(connect)
    specs = [
        {"job_type": "a", "key": "a"},
        {"job_type": "b", "key": "b", "after": ["a"]},
        {"job_type": "c", "key": "c", "after": ["b"]},
    ]
    a, b, c = [r[0] for r in await conn.fetch("SELECT pgqueue.enqueue_many($1::jsonb)", specs)]
    later = await conn.fetchval("SELECT pgqueue.enqueue('d', depends_on => ARRAY[$1::bigint])", a)
    edges = "SELECT job_id, depends_on FROM pgqueue.job_dependencies ORDER BY 1, 2"
    assert [tuple(e) for e in await conn.fetch(edges)] == [(b, a), (c, b), (later, a)]
    for job in (a, b):
        await _run(conn, job)
        assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job)
    await conn.execute(
        "UPDATE pgqueue.jobs SET finished_at = now() - interval '10 days' WHERE id = $1", b
    )
    # b is pruned: its edge to a (as job_id) and c's edge to it (as depends_on) go.
    assert await conn.fetchval("SELECT pgqueue.prune(interval '7 days')") == 1
    assert [tuple(e) for e in await conn.fetch(edges)] == [(later, a)]
    # A hand delete cascades the same way.
    await conn.execute("DELETE FROM pgqueue.jobs WHERE id = $1", a)
    assert await conn.fetch(edges) == []
    # TRUNCATE empties the edges: ids restart, and a stale edge would bind the new jobs.
    await conn.fetch("SELECT pgqueue.enqueue_many($1::jsonb)", specs)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.job_dependencies") == 2
    await conn.execute("TRUNCATE pgqueue.jobs RESTART IDENTITY")
    assert await conn.fetch(edges) == []
    await conn.fetch("SELECT pgqueue.enqueue_many($1::jsonb)", specs)
    await conn.execute("TRUNCATE pgqueue.jobs, pgqueue.job_dependencies RESTART IDENTITY")
    assert await conn.fetch(edges) == []


async def test_chaining_inherits_pipeline_and_sets_parent(connect: Connect) -> None:
    conn = await _conn(connect)
    pipeline = uuid.uuid4()
    root = await conn.fetchval(
        "SELECT pgqueue.enqueue('root', pipeline_id => $1, next_jobs => $2::jsonb)",
        pipeline,
        [{"job_type": "stored", "payload": {"a": 1}}],
    )
    await _run(conn, root)
    assert await conn.fetchval(
        "SELECT pgqueue.complete($1, 'w', '{\"n\": 1}', $2::jsonb)",
        root,
        [{"job_type": "dynamic", "queue": "q2", "priority": 3}],
    )
    kids = await conn.fetch(
        "SELECT job_type, queue, priority, parent_id, pipeline_id, payload FROM pgqueue.jobs "
        "WHERE parent_id = $1 ORDER BY id",
        root,
    )
    assert [(k["job_type"], k["queue"], k["priority"]) for k in kids] == [
        ("stored", "default", 0),
        ("dynamic", "q2", 3),
    ]
    assert {k["pipeline_id"] for k in kids} == {pipeline}
    assert kids[0]["payload"] == {"a": 1}
    assert await conn.fetchval("SELECT result FROM pgqueue.jobs WHERE id = $1", root) == {"n": 1}


@pytest.mark.parametrize(
    ("call", "where"),
    [
        (
            "SELECT pgqueue.enqueue('p', next_jobs => $1::jsonb)",
            "pgqueue.enqueue: next_jobs[1]: next_jobs[0]",
        ),
        (
            "SELECT pgqueue.enqueue_many(jsonb_build_array(jsonb_build_object("
            "'job_type', 'p', 'next_jobs', $1::jsonb)))",
            "pgqueue.enqueue_many[0]: next_jobs[1]: next_jobs[0]",
        ),
    ],
)
async def test_a_stored_spec_naming_an_unknown_job_is_refused_when_stored(
    connect: Connect, call: str, where: str
) -> None:
    """Stored specs are created when their parent succeeds, maybe days later: an unknown
    depends_on id among them (at any depth) was accepted, and every completion of the
    parent then raised, leaving it running."""
    conn = await _conn(connect)
    known = await conn.fetchval("SELECT pgqueue.enqueue('known')")
    specs = [
        {"job_type": "c", "depends_on": [known]},
        {"job_type": "c", "next_jobs": [{"job_type": "g", "depends_on": [known, 987654321]}]},
    ]
    with pytest.raises(asyncpg.ForeignKeyViolationError) as caught:
        await conn.fetchval(call, specs)
    assert str(caught.value) == f"{where}: depends_on names unknown job id 987654321"
    specs = [{"job_type": "c", "depends_on": [known, 987654321]}]
    with pytest.raises(asyncpg.ForeignKeyViolationError, match=r"next_jobs\[0\]: depends_on"):
        await conn.fetchval(call, specs)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1


@pytest.mark.parametrize("fate", ["cancelled", "failed", "pruned"])
async def test_a_stored_specs_dependency_that_ended_cancels_the_child_not_the_success(
    connect: Connect, fate: str
) -> None:
    """A dependency named by a stored spec may fail, be cancelled or pruned before the
    parent succeeds. The parent's success stands and the child is created cancelled (with
    what waits on it through "after"). Before, complete() raised every time: the parent
    could never succeed."""
    conn = await _conn(connect)
    dep = await conn.fetchval("SELECT pgqueue.enqueue('dep', max_attempts => 1)")
    live = await conn.fetchval("SELECT pgqueue.enqueue('live')")
    parent = await conn.fetchval(
        "SELECT pgqueue.enqueue('parent', next_jobs => $1::jsonb)",
        [
            {"job_type": "child", "key": "c", "depends_on": [dep, live]},
            {"job_type": "sibling", "after": ["c"]},
            {"job_type": "other", "depends_on": [live]},
        ],
    )
    if fate == "cancelled":
        assert await conn.fetchval("SELECT pgqueue.cancel($1)", dep) is True
    else:
        await _run(conn, dep)
        assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", dep) == "failed"
        if fate == "pruned":
            await conn.execute(
                "UPDATE pgqueue.jobs SET finished_at = now() - interval '2 days' WHERE id = $1", dep
            )
            assert await conn.fetchval("SELECT pgqueue.prune(interval '1 day')") == 1
    await _run(conn, parent)
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", parent) is True
    kids = await conn.fetch(
        "SELECT id, job_type, state, last_error FROM pgqueue.jobs WHERE parent_id = $1 ORDER BY id",
        parent,
    )
    why = {
        "cancelled": f"dependency failed: job {dep} was cancelled",
        "failed": f"dependency failed: job {dep} failed",
        "pruned": f"cancelled at creation: dependency job {dep} no longer exists",
    }[fate]
    assert [(k["job_type"], k["state"], k["last_error"]) for k in kids] == [
        ("child", "cancelled", why),
        ("sibling", "cancelled", f"dependency failed: job {kids[0]['id']} was cancelled"),
        ("other", "waiting", None),
    ]
    edges = await conn.fetch(
        "SELECT depends_on FROM pgqueue.job_dependencies WHERE job_id = $1 ORDER BY 1",
        kids[0]["id"],
    )
    # An edge to the dependency that ended, as for a job that depended on it when it ended
    # (none to a pruned one: it cannot be waited for). A retry of it revives the child and
    # its sibling, which wait for it again, as design.md's fan-in says.
    assert [e["depends_on"] for e in edges] == ([live] if fate == "pruned" else [dep, live])
    if fate != "pruned":
        assert await conn.fetchval("SELECT pgqueue.retry($1)", dep) is True
        revived = await conn.fetch(
            "SELECT state, pending_deps, last_error FROM pgqueue.jobs WHERE id = ANY ($1)"
            " ORDER BY id",
            [kids[0]["id"], kids[1]["id"]],
        )
        assert [tuple(r) for r in revived] == [("waiting", 2, None), ("waiting", 1, None)]


async def test_specs_cancelled_at_creation_take_part_in_no_coalescing(connect: Connect) -> None:
    """Specs cancelled at creation (an ended dependency, or "after" one that has) give their
    dedup keys up: they merge into no pending job (which they would not run for) and take in
    no other spec. From the reviews: a doomed spec merged first, then kept its key and took
    in a later spec of its array (lost); then a spec cancelled through "after" did the same,
    and the holder could be claimed between the check and the INSERT."""
    conn = await _conn(connect)
    dep = await conn.fetchval("SELECT pgqueue.enqueue('dep')")
    pending = await conn.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'p')")
    parent = await conn.fetchval(
        "SELECT pgqueue.enqueue('parent', next_jobs => $1::jsonb)",
        [
            {"job_type": "agg", "dedup_key": "p", "key": "a", "depends_on": [dep]},
            {"job_type": "after_agg", "after": ["a"], "dedup_key": "k"},
        ],
    )
    assert await conn.fetchval("SELECT pgqueue.cancel($1)", dep) is True
    await _run(conn, parent)
    passed = [{"job_type": "passed", "dedup_key": "k"}, {"job_type": "again", "dedup_key": "p"}]
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w', NULL, $2::jsonb)", parent, passed)
    rows = await conn.fetch(
        "SELECT id, job_type, state, dedup_key FROM pgqueue.jobs"
        " WHERE parent_id = $1 OR id = $2 ORDER BY id",
        parent,
        pending,
    )
    assert [tuple(r)[1:] for r in rows] == [
        ("agg", "queued", "p"),  # the pending holder, untouched; "again" merged into it
        ("agg", "cancelled", None),
        ("after_agg", "cancelled", None),
        ("passed", "queued", "k"),
    ]


async def test_a_stored_spec_with_an_ended_dependency_gives_up_a_key_nobody_holds(
    connect: Connect,
) -> None:
    """From the second review: the doomed spec held the key first in its array, took in a
    later spec with that key (never created, its work lost) and was cancelled."""
    conn = await _conn(connect)
    dep = await conn.fetchval("SELECT pgqueue.enqueue('dep')")
    live = await conn.fetchval("SELECT pgqueue.enqueue('live')")
    parent = await conn.fetchval(
        "SELECT pgqueue.enqueue('parent', next_jobs => $1::jsonb)",
        [
            {"job_type": "doomed", "dedup_key": "k", "depends_on": [dep]},
            {"job_type": "kept", "key": "a", "dedup_key": "k", "depends_on": [live]},
            {"job_type": "after_kept", "after": ["a"]},
        ],
    )
    assert await conn.fetchval("SELECT pgqueue.cancel($1)", dep) is True
    await _run(conn, parent)
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", parent) is True
    rows = await conn.fetch(
        "SELECT job_type, state, dedup_key FROM pgqueue.jobs WHERE parent_id = $1 ORDER BY id",
        parent,
    )
    assert [tuple(r) for r in rows] == [
        ("doomed", "cancelled", None),
        ("kept", "waiting", "k"),
        ("after_kept", "waiting", None),
    ]


async def test_a_child_whose_stored_dependency_failed_waits_for_it_when_retried(
    connect: Connect,
) -> None:
    """From the reviews: with no edge to the dependency that had failed, the child was
    revived by a retry of its other dependency and ran without it (session 20); then, named
    apart so that it was not, a retry of the child queued it at once while that dependency
    was queued again (session 22: design.md says it waits until every dependency has
    succeeded). It now has its edge, like any job a dependency's failure cancels."""
    conn = await _conn(connect)
    dep = await conn.fetchval("SELECT pgqueue.enqueue('dep', max_attempts => 1)")
    other = await conn.fetchval("SELECT pgqueue.enqueue('other', max_attempts => 1)")
    parent = await conn.fetchval(
        "SELECT pgqueue.enqueue('parent', next_jobs => $1::jsonb)",
        [{"job_type": "child", "depends_on": [dep, other]}],
    )
    for job in (dep, parent):
        await _run(conn, job)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", dep) == "failed"
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", parent) is True
    child = await conn.fetchval("SELECT id FROM pgqueue.jobs WHERE parent_id = $1", parent)
    await _run(conn, other)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", other) == "failed"
    assert await conn.fetchval("SELECT pgqueue.retry($1)", other) is True
    state = "SELECT state, pending_deps FROM pgqueue.jobs WHERE id = $1"
    assert (await conn.fetchrow(state, child))[0] == "cancelled"  # dep still failed
    # A retry of the child itself waits for both: neither has succeeded.
    assert await conn.fetchval("SELECT pgqueue.retry($1)", child) is True
    assert tuple(await conn.fetchrow(state, child)) == ("waiting", 2)
    assert await conn.fetchval("SELECT pgqueue.retry($1)", dep) is True
    for job in (dep, other):
        await _run(conn, job)
        assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job) is True
    assert tuple(await conn.fetchrow(state, child)) == ("queued", 0)


async def test_a_retry_of_the_stored_dependency_revives_the_child(connect: Connect) -> None:
    """The review's case: the child's dependency failed before its parent succeeded; a retry
    of that dependency brings the child back waiting for it, not queued beside it."""
    conn = await _conn(connect)
    dep = await conn.fetchval("SELECT pgqueue.enqueue('dep', max_attempts => 1)")
    parent = await conn.fetchval(
        "SELECT pgqueue.enqueue('parent', next_jobs => $1::jsonb)",
        [{"job_type": "child", "key": "c", "depends_on": [dep]}, {"job_type": "d", "after": ["c"]}],
    )
    for job in (dep, parent):
        await _run(conn, job)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", dep) == "failed"
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", parent) is True
    assert await conn.fetchval("SELECT pgqueue.retry($1)", dep) is True
    kids = await conn.fetch(
        "SELECT state, pending_deps FROM pgqueue.jobs WHERE parent_id = $1 ORDER BY id", parent
    )
    assert [tuple(k) for k in kids] == [("waiting", 1), ("waiting", 1)]


async def test_a_grandchilds_dependency_pruned_meanwhile_refuses_nothing(
    connect: Connect,
) -> None:
    """Stored specs are checked when stored, at every depth; a child's own stored specs are
    not checked again when the child is created (from the review: checking them made the
    parent's completion raise "unknown job id" once the dependency was pruned)."""
    conn = await _conn(connect)
    dep = await conn.fetchval("SELECT pgqueue.enqueue('dep', max_attempts => 1)")
    parent = await conn.fetchval(
        "SELECT pgqueue.enqueue('parent', next_jobs => $1::jsonb)",
        [{"job_type": "child", "next_jobs": [{"job_type": "g", "depends_on": [dep]}]}],
    )
    await _run(conn, dep)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", dep) == "failed"
    await conn.execute(
        "UPDATE pgqueue.jobs SET finished_at = now() - interval '2 days' WHERE id = $1", dep
    )
    assert await conn.fetchval("SELECT pgqueue.prune(interval '1 day')") == 1
    await _run(conn, parent)
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", parent) is True
    child = await conn.fetchval("SELECT id FROM pgqueue.jobs WHERE parent_id = $1", parent)
    await _run(conn, child)
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", child) is True
    assert await conn.fetchrow(
        "SELECT state, last_error FROM pgqueue.jobs WHERE parent_id = $1", child
    ) == ("cancelled", f"cancelled at creation: dependency job {dep} no longer exists")


async def test_a_passed_spec_naming_a_cancelled_job_is_still_refused(connect: Connect) -> None:
    """Specs passed to complete() are the caller's input now: refused, nothing written."""
    conn = await _conn(connect)
    dep = await conn.fetchval("SELECT pgqueue.enqueue('dep')")
    assert await conn.fetchval("SELECT pgqueue.cancel($1)", dep) is True
    parent = await conn.fetchval(
        "SELECT pgqueue.enqueue('parent', next_jobs => '[{\"job_type\": \"stored\"}]')"
    )
    await _run(conn, parent)
    for passed, message in (
        ([{"job_type": "x", "depends_on": [dep]}], f"dependency {dep} is already cancelled"),
        (
            [{"job_type": "x", "next_jobs": [{"job_type": "y", "depends_on": [987654321]}]}],
            "complete: next_jobs[0]: next_jobs[0]: depends_on names unknown job id 987654321",
        ),
    ):
        with pytest.raises(asyncpg.PostgresError, match=re.escape(message)):
            await conn.fetchval("SELECT pgqueue.complete($1, 'w', NULL, $2::jsonb)", parent, passed)
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", parent) == "running"
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 2


async def test_failed_job_creates_no_children(connect: Connect) -> None:
    conn = await _conn(connect)
    job = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', max_attempts => 1, next_jobs => '[{\"job_type\": \"x\"}]')"
    )
    await _run(conn, job)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", job) == "failed"
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1


async def test_enqueue_many_with_keys_builds_a_dag_atomically(connect: Connect) -> None:
    conn = await _conn(connect)
    pipeline = str(uuid.uuid4())
    specs = [
        {"job_type": "a", "key": "a", "pipeline_id": pipeline},
        {"job_type": "b", "key": "b", "after": ["a"], "pipeline_id": pipeline},
        {"job_type": "c", "after": ["a", "b"], "pipeline_id": pipeline},
    ]
    ids = [r[0] for r in await conn.fetch("SELECT pgqueue.enqueue_many($1::jsonb)", specs)]
    rows = await conn.fetch("SELECT id, state FROM pgqueue.jobs ORDER BY id")
    assert [r["id"] for r in rows] == ids
    assert [r["state"] for r in rows] == ["queued", "waiting", "waiting"]
    edges = await conn.fetch(
        "SELECT job_id, depends_on FROM pgqueue.job_dependencies ORDER BY 1, 2"
    )
    assert [tuple(e) for e in edges] == [(ids[1], ids[0]), (ids[2], ids[0]), (ids[2], ids[1])]
    status = await conn.fetchrow("SELECT jobs, queued, waiting, state, done FROM pgqueue.pipelines")
    assert tuple(status) == (3, 1, 2, "running", False)


async def test_children_dedup_into_one_pending_aggregation(connect: Connect) -> None:
    """The plan review's N-recalcs-each-chain-an-aggregation, coalesced by dedup_key."""
    conn = await _conn(connect)
    agg = {"job_type": "aggregate", "dedup_key": "agg:m1:2024"}
    recalcs = [
        await conn.fetchval("SELECT pgqueue.enqueue('recalc', next_jobs => $1::jsonb)", [agg])
        for _ in range(4)
    ]
    for r in recalcs:
        await _run(conn, r)
        assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", r)
    assert (
        await conn.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE job_type = 'aggregate'") == 1
    )


async def test_json_null_scope_is_no_scope_and_views_answer(connect: Connect) -> None:
    conn = await _conn(connect)
    job = await conn.fetchval("SELECT pgqueue.enqueue('t', scope => 'null'::jsonb)")
    assert await conn.fetchval("SELECT scope FROM pgqueue.jobs WHERE id = $1", job) is None
    await _run(conn, job)
    assert await conn.fetchval("SELECT worker FROM pgqueue.running_jobs WHERE id = $1", job) == "w"
    stats = {
        (r["queue"], r["state"]): r["count"]
        for r in await conn.fetch("SELECT * FROM pgqueue.queue_stats")
    }
    assert stats == {("default", "running"): 1}


async def test_save_progress_is_fenced_and_read_back_by_the_next_attempt(
    connect: Connect,
) -> None:
    """The checkpoint of a long handler: written only by the attempt holding the job, so a
    worker whose lease was recovered cannot overwrite what the next attempt saved."""
    conn = await _conn(connect)
    job = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    save = "SELECT pgqueue.save_progress($1, $2, $3)"
    assert await conn.fetchval(save, job, "w", {"page": 1}) is False  # queued: nobody holds it
    await _run(conn, job, "w")
    assert await conn.fetchval(save, job, "w", {"page": 3}) is True
    assert await conn.fetchval(save, job, "other", {"page": 99}) is False
    # The lease goes stale and another worker takes the job: it starts from page 3.
    await conn.execute("UPDATE pgqueue.jobs SET locked_at = now() - interval '1 day'")
    assert [r[0] for r in await conn.fetch("SELECT pgqueue.recover_stale()")] == [job]
    (row,) = await conn.fetch("SELECT progress, attempts FROM pgqueue.claim($1, 'w2')", job)
    assert (row["progress"], row["attempts"]) == ({"page": 3}, 2)
    assert await conn.fetchval(save, job, "w", {"page": 4}) is False  # the old attempt, late
    assert await conn.fetchval(save, job, "w2", {"page": 5}) is True
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w2')", job) is True
    assert await conn.fetchval(save, job, "w2", None) is False  # finished: kept as it ended
    assert await conn.fetchval("SELECT progress FROM pgqueue.jobs WHERE id = $1", job) == {
        "page": 5
    }


async def test_save_progress_names_a_missing_worker_and_writes_nothing(connect: Connect) -> None:
    conn = await _conn(connect)
    job = await conn.fetchval("SELECT pgqueue.enqueue('t')")
    await _run(conn, job, "w")
    for worker in (None, ""):
        try:
            await conn.fetchval("SELECT pgqueue.save_progress($1, $2, '1')", job, worker)
        except asyncpg.exceptions.InvalidParameterValueError as exc:
            assert "worker must be a non-empty string" in str(exc)
        else:
            raise AssertionError("accepted a missing worker")
    assert await conn.fetchval("SELECT progress FROM pgqueue.jobs WHERE id = $1", job) is None


async def test_vacuum_blockers_names_open_snapshots_oldest_first(connect: Connect) -> None:
    """A transaction holding a snapshot, or a transaction id, keeps every dead job row it could
    still see: the view lists it, oldest first, never the session asking, and nothing once
    the transactions end."""
    report, writer, newer, me = await connect(), await connect(), await connect(), await connect()
    await report.execute("SET application_name = 'nightly-report'")
    old = report.transaction(isolation="repeatable_read")
    await old.start()
    await report.fetchval("SELECT 1")
    # Wrote and sits idle in a READ COMMITTED transaction: a transaction id, no snapshot.
    wrote = writer.transaction()
    await wrote.start()
    await writer.execute("SELECT pgqueue.enqueue('t')")
    young = newer.transaction(isolation="repeatable_read")
    await young.start()
    await newer.fetchval("SELECT 1")
    here = "SELECT * FROM pgqueue.vacuum_blockers WHERE database = current_database()"
    rows = await me.fetch(here)
    # The report first: its snapshot is the oldest, or as old (a transaction of another
    # database holding every snapshot's xmin back alike) and opened first. The newer snapshot
    # sees the writer's transaction running (same age), or something older elsewhere.
    assert (rows[0]["kind"], rows[0]["pid"], rows[0]["state"]) == (
        "session",
        report.get_server_pid(),
        "idle in transaction",
    )
    assert {(r["kind"], r["pid"], r["state"]) for r in rows[1:]} == {
        ("session", writer.get_server_pid(), "idle in transaction"),
        ("session", newer.get_server_pid(), "idle in transaction"),
    }
    assert rows[0]["name"] == "nightly-report" and rows[0]["query"] == "SELECT 1"
    assert rows[0]["xmin_age"] >= rows[1]["xmin_age"] >= rows[2]["xmin_age"] >= 0
    assert min(r["open_for"] for r in rows) >= timedelta(0)
    # A role without pg_read_all_stats sees other roles' sessions with their state and query
    # hidden: they are listed all the same.
    role = f"pgqueue_reader_{uuid.uuid4().hex[:8]}"
    await me.execute(f"CREATE ROLE {role}")
    try:
        await me.execute(f"GRANT USAGE ON SCHEMA pgqueue TO {role}")
        await me.execute(f"GRANT SELECT ON pgqueue.vacuum_blockers TO {role}")
        async with me.transaction():
            await me.execute(f"SET LOCAL ROLE {role}")
            seen = await me.fetch(here)
        assert [r["pid"] for r in seen] == [r["pid"] for r in rows]
        assert {r["state"] for r in seen} == {None}
    finally:
        await me.execute(f"DROP OWNED BY {role}")
        await me.execute(f"DROP ROLE {role}")
    for transaction in (old, wrote, young):
        await transaction.rollback()
    assert await me.fetch(here) == []


# --------------------------------------------------------------------------- session 22 review


@pytest.mark.parametrize(
    "specs",
    [
        # the first of two with a key waits for the second, merged into it: for itself
        [
            {"job_type": "t", "key": "a", "dedup_key": "K", "after": ["b"]},
            {"job_type": "t", "key": "b", "dedup_key": "K"},
        ],
        # ... through another spec: a real cycle of two jobs
        [
            {"job_type": "t", "key": "a", "dedup_key": "K", "after": ["x"]},
            {"job_type": "t", "key": "x", "after": ["b"]},
            {"job_type": "t", "key": "b", "dedup_key": "K"},
        ],
        # the first one without a key
        [
            {"job_type": "t", "dedup_key": "K", "after": ["b"]},
            {"job_type": "t", "key": "b", "dedup_key": "K"},
        ],
    ],
)
async def test_specs_merged_by_dedup_key_waiting_on_each_other_are_a_cycle(
    connect: Connect, specs: list[dict[str, object]]
) -> None:
    """From the review: accepted, the first was left waiting with no edge for good (or two
    jobs waited for each other), and later enqueues of the key merged into it."""
    conn = await _conn(connect)
    message = 'the after lists form a cycle through the specs with dedup_key "K"'
    with pytest.raises(asyncpg.InvalidParameterValueError, match=re.escape(message)):
        await conn.fetch("SELECT pgqueue.enqueue_many($1::jsonb)", specs)
    parent = await conn.fetchval("SELECT pgqueue.enqueue('parent')")
    await _run(conn, parent)
    with pytest.raises(asyncpg.InvalidParameterValueError, match=re.escape(message)):
        await conn.fetchval("SELECT pgqueue.complete($1, 'w', NULL, $2::jsonb)", parent, specs)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.job_dependencies") == 0
    # The other order merges the waiter into the one it waits for: no cycle, one job.
    ids = [
        r[0]
        for r in await conn.fetch(
            "SELECT pgqueue.enqueue_many($1::jsonb)",
            [
                {"job_type": "t", "key": "b", "dedup_key": "K"},
                {"job_type": "t", "key": "a", "dedup_key": "K", "after": ["b"]},
            ],
        )
    ]
    assert ids[0] == ids[1]
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", ids[0]) == "queued"


@pytest.mark.parametrize("back", ["revived", "retried itself"])
async def test_a_job_cancelled_by_hand_is_not_revived_by_a_retry_of_its_dependency(
    connect: Connect, back: str
) -> None:
    """From the review: back to waiting (revived by a retry of A, or retried itself), the
    dependent kept "dependency failed: job A failed", which cancel() kept too; a later retry
    of A revived the job the operator had cancelled."""
    conn = await _conn(connect)
    a = await conn.fetchval("SELECT pgqueue.enqueue('a', max_attempts => 1)")
    d = await conn.fetchval("SELECT pgqueue.enqueue('d', depends_on => ARRAY[$1::bigint])", a)
    await _run(conn, a)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", a) == "failed"
    row = "SELECT state, last_error FROM pgqueue.jobs WHERE id = $1"
    if back == "revived":
        assert await conn.fetchval("SELECT pgqueue.retry($1)", a) is True
        assert tuple(await conn.fetchrow(row, d)) == ("waiting", None)
    else:  # it waits for A, failed, until A is retried and succeeds
        assert await conn.fetchval("SELECT pgqueue.retry($1)", d) is True
        assert (await conn.fetchrow(row, d))[0] == "waiting"
        assert await conn.fetchval("SELECT pgqueue.retry($1)", a) is True
    assert await conn.fetchval("SELECT pgqueue.cancel($1)", d) is True
    assert tuple(await conn.fetchrow(row, d)) == ("cancelled", "cancelled")
    await _run(conn, a)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'again')", a) == "failed"
    assert await conn.fetchval("SELECT pgqueue.retry($1)", a) is True
    assert tuple(await conn.fetchrow(row, d)) == ("cancelled", "cancelled")


async def test_stored_and_passed_specs_have_keys_of_their_own(connect: Connect) -> None:
    """From the review: a fan-out stored at enqueue and another returned by the handler both
    use the keys Result.fan_out makes; complete() refused the success ("key used by more
    than one spec") on every attempt. Keys are local to their array."""
    conn = await _conn(connect)
    fan_out = [
        {"job_type": "part", "key": "p0"},
        {"job_type": "join", "after": ["p0"]},
    ]
    parent = await conn.fetchval(
        "SELECT pgqueue.enqueue('parent', next_jobs => $1::jsonb)", fan_out
    )
    await _run(conn, parent)
    unknown = [{"job_type": "x", "after": ["stored_only"]}]
    stored_key = [{"job_type": "x", "after": ["p9"]}]
    await conn.execute(
        "UPDATE pgqueue.jobs SET next_jobs = next_jobs || $2::jsonb WHERE id = $1",
        parent,
        [{"job_type": "s", "key": "p9"}],
    )
    for passed in (unknown, stored_key):  # a passed "after" finds no stored key
        with pytest.raises(asyncpg.InvalidParameterValueError, match="after names unknown key"):
            await conn.fetchval("SELECT pgqueue.complete($1, 'w', NULL, $2::jsonb)", parent, passed)
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w', NULL, $2::jsonb)", parent, fan_out)
    rows = await conn.fetch(
        "SELECT job_type, state, pending_deps FROM pgqueue.jobs WHERE parent_id = $1 ORDER BY id",
        parent,
    )
    assert [tuple(r) for r in rows] == [
        ("part", "queued", 0),
        ("join", "waiting", 1),
        ("s", "queued", 0),
        ("part", "queued", 0),
        ("join", "waiting", 1),
    ]
    joins = await conn.fetch(
        "SELECT j.id, d.depends_on FROM pgqueue.jobs j"
        " JOIN pgqueue.job_dependencies d ON d.job_id = j.id"
        " WHERE j.parent_id = $1 ORDER BY j.id",
        parent,
    )
    parts = [
        r[0]
        for r in await conn.fetch(
            "SELECT id FROM pgqueue.jobs WHERE parent_id = $1 AND job_type = 'part' ORDER BY id",
            parent,
        )
    ]
    assert [j["depends_on"] for j in joins] == parts  # each join waits for its own part


async def test_a_retry_of_a_member_resumes_a_cancelled_pipeline_downstream_of_it(
    connect: Connect,
) -> None:
    """From the review: the docs said a retry of a member "resumes the pipeline"; it lifted
    the mark only, and the members after it stayed cancelled. What waits on the member,
    cancelled with the pipeline, waits again; another branch stays cancelled."""
    conn = await _conn(connect)
    pid = str(uuid.uuid4())
    a = await conn.fetchval("SELECT pgqueue.enqueue('a', pipeline_id => $1::uuid)", pid)
    b = await conn.fetchval(
        "SELECT pgqueue.enqueue('b', pipeline_id => $1::uuid, depends_on => ARRAY[$2::bigint])",
        pid,
        a,
    )
    c = await conn.fetchval(
        "SELECT pgqueue.enqueue('c', pipeline_id => $1::uuid, depends_on => ARRAY[$2::bigint])",
        pid,
        b,
    )
    other = await conn.fetchval("SELECT pgqueue.enqueue('other', pipeline_id => $1::uuid)", pid)
    outside = await conn.fetchval(
        "SELECT pgqueue.enqueue('outside', depends_on => ARRAY[$1::bigint])", c
    )
    assert await conn.fetchval("SELECT pgqueue.cancel_pipeline($1::uuid)", pid) == 4
    assert await conn.fetchval("SELECT pgqueue.retry($1)", a) is True
    rows = await conn.fetch(
        "SELECT state, last_error FROM pgqueue.jobs WHERE id = ANY ($1) ORDER BY id",
        [a, b, c, other, outside],
    )
    assert [tuple(r) for r in rows] == [
        ("queued", "pipeline cancelled"),  # the retried job keeps its last_error
        ("waiting", None),
        ("waiting", None),
        ("cancelled", "pipeline cancelled"),  # another branch: retried by itself
        ("waiting", None),
    ]
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.cancelled_pipelines") == 0


async def test_a_retry_revives_no_job_of_another_pipeline_still_cancelled(
    connect: Connect,
) -> None:
    """From the second review: the revival by "pipeline cancelled" took jobs of any
    pipeline, and lifted only the retried job's mark: a job of a pipeline still cancelled
    waited, was queued and ran. Nor is one of its jobs a dependency's failure cancelled."""
    conn = await _conn(connect)
    pid = str(uuid.uuid4())
    a = await conn.fetchval("SELECT pgqueue.enqueue('a', max_attempts => 1)")
    b = await conn.fetchval("SELECT pgqueue.enqueue('b', max_attempts => 1)")
    by_cancel = await conn.fetchval(
        "SELECT pgqueue.enqueue('d', pipeline_id => $1::uuid, depends_on => ARRAY[$2::bigint])",
        pid,
        a,
    )
    by_failure = await conn.fetchval(
        "SELECT pgqueue.enqueue('e', pipeline_id => $1::uuid, depends_on => ARRAY[$2::bigint])",
        pid,
        b,
    )
    await _run(conn, b)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", b) == "failed"
    assert await conn.fetchval("SELECT pgqueue.cancel_pipeline($1::uuid)", pid) == 1
    await _run(conn, a)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", a) == "failed"
    for job in (a, b):
        assert await conn.fetchval("SELECT pgqueue.retry($1)", job) is True
    rows = await conn.fetch(
        "SELECT state, last_error FROM pgqueue.jobs WHERE id = ANY ($1) ORDER BY id",
        [by_cancel, by_failure],
    )
    assert [tuple(r) for r in rows] == [
        ("cancelled", "pipeline cancelled"),
        ("cancelled", f"dependency failed: job {b} failed"),
    ]
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.cancelled_pipelines") == 1


async def test_a_job_of_a_cancelled_pipeline_whose_dependency_was_deleted_stays_cancelled(
    connect: Connect,
) -> None:
    """From the second review: cancelled with its pipeline, the job kept that name when a
    dependency was deleted by hand, and a retry of its other dependency revived it: it ran
    without the deleted one."""
    conn = await _conn(connect)
    pid = str(uuid.uuid4())
    n = await conn.fetchval("SELECT pgqueue.enqueue('n', pipeline_id => $1::uuid)", pid)
    m = await conn.fetchval("SELECT pgqueue.enqueue('m', pipeline_id => $1::uuid)", pid)
    d = await conn.fetchval(
        "SELECT pgqueue.enqueue('d', pipeline_id => $1::uuid, depends_on => ARRAY[$2, $3]::bigint[])",
        pid,
        n,
        m,
    )
    assert await conn.fetchval("SELECT pgqueue.cancel_pipeline($1::uuid)", pid) == 3
    await conn.execute("DELETE FROM pgqueue.jobs WHERE id = $1", n)
    assert await conn.fetchval("SELECT pgqueue.retry($1)", m) is True
    assert tuple(
        await conn.fetchrow("SELECT state, last_error FROM pgqueue.jobs WHERE id = $1", d)
    ) == ("cancelled", f"cancelled: dependency job {n} was deleted")


async def test_a_job_retried_after_its_pipeline_was_cancelled_then_cancelled_by_hand_stays_so(
    connect: Connect,
) -> None:
    """From the second review: retried, it kept "pipeline cancelled", which cancel() kept
    too; a retry of its dependency then revived the job the operator had cancelled."""
    conn = await _conn(connect)
    pid = str(uuid.uuid4())
    a = await conn.fetchval("SELECT pgqueue.enqueue('a', pipeline_id => $1::uuid)", pid)
    x = await conn.fetchval(
        "SELECT pgqueue.enqueue('x', pipeline_id => $1::uuid, depends_on => ARRAY[$2::bigint])",
        pid,
        a,
    )
    assert await conn.fetchval("SELECT pgqueue.cancel_pipeline($1::uuid)", pid) == 2
    assert await conn.fetchval("SELECT pgqueue.retry($1)", x) is True
    assert await conn.fetchval("SELECT pgqueue.cancel($1)", x) is True
    assert await conn.fetchval("SELECT pgqueue.retry($1)", a) is True
    assert tuple(
        await conn.fetchrow("SELECT state, last_error FROM pgqueue.jobs WHERE id = $1", x)
    ) == ("cancelled", "cancelled")


async def test_a_cycle_of_specs_that_only_merging_would_hide_is_refused(connect: Connect) -> None:
    """From the second review: the merged graph drops a merged spec's own "after"; but a
    stored spec whose dependency ended gives its dedup_key up at completion, the later spec
    then does not merge, and its own edges (a cycle) were written: two jobs waiting for
    each other for good, one holding the key."""
    conn = await _conn(connect)
    f = await conn.fetchval("SELECT pgqueue.enqueue('f', max_attempts => 1)")
    specs = [
        {"job_type": "s1", "key": "a", "dedup_key": "k", "depends_on": [f]},
        {"job_type": "s2", "key": "b", "dedup_key": "k", "after": ["c"]},
        {"job_type": "s3", "key": "c", "after": ["b"]},
    ]
    with pytest.raises(asyncpg.InvalidParameterValueError, match='cycle through key "b"'):
        await conn.fetchval("SELECT pgqueue.enqueue('p', next_jobs => $1::jsonb)", specs)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1
