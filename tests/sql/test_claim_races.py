"""Claims under contention: one winner per job, one running job per scope, no errors for losers."""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
import pytest
from sqlharness import (
    Connect,
    Session,
    finishes_unblocked,
    lock_wait_kind,
    sessions,
    wait_blocked,
)


async def _enqueue(conn: asyncpg.Connection, job_type: str = "t", **kw: object) -> int:
    args = ", ".join(f"{k} => ${i + 2}" for i, k in enumerate(kw))
    sql = f"SELECT pgqueue.enqueue($1{', ' + args if args else ''})"
    return int(await conn.fetchval(sql, job_type, *kw.values()))


async def test_n_sessions_claim_one_id_exactly_one_wins(connect: Connect) -> None:
    observer, a, *others = await sessions(connect, "obs", "a", "b", "c", "d", "e", "f")
    job = await _enqueue(observer.conn)

    await a.begin()
    assert len(await a.fetch("SELECT * FROM pgqueue.claim($1, 'a')", job)) == 1
    steps = [s.start(s.fetch("SELECT * FROM pgqueue.claim($1, $2)", job, s.name)) for s in others]
    await wait_blocked(observer.conn, *others)  # each waits on a's row lock
    await a.commit()
    results = await asyncio.gather(*steps)
    assert [len(r) for r in results] == [0] * len(others)
    row = await observer.conn.fetchrow(
        "SELECT state, locked_by, attempts FROM pgqueue.jobs WHERE id = $1", job
    )
    assert tuple(row) == ("running", "a", 1)


async def test_claim_winner_rolls_back_then_a_waiter_wins(connect: Connect) -> None:
    observer, a, b, c = await sessions(connect, "obs", "a", "b", "c")
    job = await _enqueue(observer.conn)
    await a.begin()
    assert len(await a.fetch("SELECT * FROM pgqueue.claim($1, 'a')", job)) == 1
    steps = [s.start(s.fetch("SELECT id FROM pgqueue.claim($1, $2)", job, s.name)) for s in (b, c)]
    await wait_blocked(observer.conn, b, c)
    await a.rollback()
    results = await asyncio.gather(*steps)
    assert sorted(len(r) for r in results) == [0, 1]
    assert await observer.fetchval("SELECT attempts FROM pgqueue.jobs WHERE id = $1", job) == 1


@pytest.mark.parametrize("queues", [None, ["default"]], ids=["every queue", "one queue"])
async def test_drain_with_claim_next_batches_every_job_exactly_once(
    connect: Connect, queues: list[str] | None
) -> None:
    observer, *workers = await sessions(connect, "obs", "w1", "w2", "w3", "w4", "w5", "w6")
    specs = []
    for i in range(300):
        spec: dict[str, object] = {"job_type": "t", "payload": {"i": i}}
        if i % 3 == 0:
            spec["scope"] = {"k": i % 7}
        specs.append(spec)
    await observer.fetch("SELECT pgqueue.enqueue_many($1::jsonb)", specs)

    claimed: Counter[int] = Counter()
    running_scopes: set[str] = set()
    violations: list[str] = []

    async def work(w: Session) -> None:
        idle = 0
        while idle < 3:
            batch = await w.fetch(
                "SELECT id, scope::text AS scope FROM pgqueue.claim_next($1, $2, 7)",
                w.name,
                queues,
            )
            if not batch:
                idle += 1
                remaining = await w.fetchval(
                    "SELECT count(*) FROM pgqueue.jobs WHERE state IN ('queued', 'running')"
                )
                if remaining == 0:
                    return
                await asyncio.sleep(0)  # yield to the other sessions
                continue
            idle = 0
            scopes = [r["scope"] for r in batch if r["scope"] is not None]
            if len(scopes) != len(set(scopes)):
                violations.append(f"batch with two jobs of one scope: {scopes}")
            for s in scopes:
                if s in running_scopes:
                    violations.append(f"scope {s} claimed while running")
                running_scopes.add(s)
            for r in batch:
                claimed[r["id"]] += 1
            for r in batch:
                if r["scope"] is not None:
                    running_scopes.discard(r["scope"])
                assert await w.fetchval("SELECT pgqueue.complete($1, $2)", r["id"], w.name)

    # Until all drained: a worker gives up after a few empty claims (its scopes may all be
    # busy), so rounds repeat; each round finishes at least the head job of every scope.
    for rounds in range(1, 301):  # noqa: B007 - reported below
        await asyncio.gather(*(work(w) for w in workers))
        if (
            await observer.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE state <> 'succeeded'")
            == 0
        ):
            break
    print(f"drained in {rounds} rounds")
    assert violations == []
    assert len(claimed) == 300
    assert set(claimed.values()) == {1}
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE attempts <> 1") == 0


@pytest.mark.parametrize("entered", ["blocked", "unblocked"])
async def test_concurrent_claims_across_one_scope_oldest_first_one_winner(
    connect: Connect, entered: str
) -> None:
    observer, a, b = await sessions(connect, "obs", "a", "b")
    # Key order and JSON nulls differ: JSONB equality makes them one scope.
    j1 = await _enqueue(observer.conn, scope={"module": "m", "det": None, "year": 2024})
    j2 = await _enqueue(observer.conn, scope={"year": 2024, "det": None, "module": "m"})
    other = await _enqueue(observer.conn, scope={"module": "m", "det": "x", "year": 2024})
    assert await observer.fetchval("SELECT scope_blocked FROM pgqueue.jobs WHERE id = $1", j2)
    if entered == "unblocked":
        # As a job enters that was retried, queued by fan-in or created as a child
        # (or enqueued concurrently with j1): in the claim index, so only the
        # claim's own scope check keeps it from running beside or before j1.
        await observer.conn.execute(
            "UPDATE pgqueue.jobs SET scope_blocked = false WHERE id = $1", j2
        )

    await a.begin()
    got_a = await a.fetch("SELECT id, is_current FROM pgqueue.claim_next('a', NULL, 10)")
    assert {r["id"] for r in got_a} == {j1, other}  # the oldest of the scope, never j2 with it
    # b does not block on a's scope: it skips it and finds nothing else.
    got_b = await asyncio.wait_for(b.fetch("SELECT id FROM pgqueue.claim_next('b', NULL, 10)"), 10)
    assert got_b == []
    await a.commit()
    assert (
        await b.fetch("SELECT id FROM pgqueue.claim_next('b', NULL, 10)") == []
    )  # j1 still running
    assert await observer.fetchval("SELECT pgqueue.complete($1, 'a')", j1)

    await b.begin()
    got = await b.fetch("SELECT id, is_current FROM pgqueue.claim_next('b', NULL, 10)")
    assert [(r["id"], r["is_current"]) for r in got] == [(j2, True)]
    # is_current moved inside b's transaction; others still see j1 as current until b commits.
    inside = await b.fetch(
        "SELECT id FROM pgqueue.jobs WHERE is_current AND scope = $1::jsonb ORDER BY id",
        {"det": None, "module": "m", "year": 2024},
    )
    assert [r["id"] for r in inside] == [j2]
    outside = await observer.fetch(
        "SELECT id FROM pgqueue.current_jobs WHERE id IN ($1, $2)", j1, j2
    )
    assert [r["id"] for r in outside] == [j1]
    await b.commit()
    outside = await observer.fetch(
        "SELECT id FROM pgqueue.current_jobs WHERE id IN ($1, $2)", j1, j2
    )
    assert [r["id"] for r in outside] == [j2]

    with pytest.raises(asyncpg.UniqueViolationError, match="jobs_one_current_per_scope"):
        await observer.conn.execute("UPDATE pgqueue.jobs SET is_current = true WHERE id = $1", j1)


@pytest.mark.parametrize(
    ("first", "second"),
    [({"k": 1}, {"k": 1}), ({"n": 1}, {"n": 1.0})],
    ids=["same-scope", "numerically-equal-scope"],
)
async def test_claim_by_id_of_newer_scope_job_waits_then_gets_nothing(
    connect: Connect, first: dict[str, float], second: dict[str, float]
) -> None:
    """The E4/E8 trap: a second claimer in the same scope must get no row, never 23505.

    {"n": 1} and {"n": 1.0} are one scope for JSONB equality, so they share one claim lock.
    """
    observer, a, b = await sessions(connect, "obs", "a", "b")
    j1 = await _enqueue(observer.conn, scope=first)
    j2 = await _enqueue(observer.conn, scope=second)
    await a.begin()
    assert [r["id"] for r in await a.fetch("SELECT id FROM pgqueue.claim($1, 'a')", j1)] == [j1]
    step = b.start(b.fetch("SELECT id FROM pgqueue.claim($1, 'b')", j2))
    await wait_blocked(observer.conn, b)
    assert await lock_wait_kind(observer.conn, b) == "advisory"
    await a.commit()
    assert await step == []
    assert await observer.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", j2) == "queued"


async def test_claim_next_racing_claim_by_id_in_one_scope(connect: Connect) -> None:
    """Many rounds of claim_next vs claim on one scope: one winner per round, no exception."""
    observer, a, b = await sessions(connect, "obs", "a", "b")
    ids = [await _enqueue(observer.conn, scope={"k": "race"}) for _ in range(30)]
    for job in ids:
        ra, rb = await asyncio.gather(
            a.fetch("SELECT id FROM pgqueue.claim_next('a', NULL, 5)"),
            b.fetch("SELECT id FROM pgqueue.claim($1, 'b')", job),
        )
        winners = [("a", r["id"]) for r in ra] + [("b", r["id"]) for r in rb]
        assert winners and len(winners) == 1, winners
        assert winners[0][1] == job  # the oldest of the scope, whoever won
        assert await observer.fetchval("SELECT pgqueue.complete($1, $2)", job, winners[0][0])


async def test_claim_next_skips_busy_scope_and_takes_other_work(connect: Connect) -> None:
    observer, a, b = await sessions(connect, "obs", "a", "b")
    s1 = await _enqueue(observer.conn, scope={"k": 1})
    plain = await _enqueue(observer.conn)
    await a.begin()
    assert [r["id"] for r in await a.fetch("SELECT id FROM pgqueue.claim_next('a', NULL, 1)")] == [
        s1
    ]
    got = await asyncio.wait_for(b.fetch("SELECT id FROM pgqueue.claim_next('b', NULL, 5)"), 10)
    assert [r["id"] for r in got] == [plain]
    await a.commit()


@pytest.mark.parametrize("path", ["one statement", "general"])
async def test_a_one_queue_claim_skips_what_another_claim_holds(
    connect: Connect, path: str
) -> None:
    """Two workers of one queue (claims through jobs_ready_in_queue): the second takes the
    next job without waiting for the first's transaction, and no job goes to both."""
    observer, a, b = await sessions(connect, "obs", "a", "b")
    if path == "general":  # a scoped job queued anywhere sends claims down the general path
        await _enqueue(observer.conn, queue="other", scope={"k": 1})
    first = await _enqueue(observer.conn, queue="q")
    second = await _enqueue(observer.conn, queue="q")
    await a.begin()
    got_a = await a.fetch("SELECT id FROM pgqueue.claim_next('a', ARRAY['q'], 1)")
    assert [r["id"] for r in got_a] == [first]
    got_b = await finishes_unblocked(
        observer.conn, b, b.fetch("SELECT id FROM pgqueue.claim_next('b', ARRAY['q'], 2)")
    )
    assert [r["id"] for r in got_b] == [second]
    await a.commit()
    rows = await observer.fetch(
        "SELECT id, attempts, locked_by FROM pgqueue.jobs WHERE queue = 'q' ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [(first, 1, "a"), (second, 1, "b")]


@pytest.mark.parametrize("path", ["one statement", "general"])
async def test_a_claim_of_several_queues_skips_what_other_claims_hold(
    connect: Connect, path: str
) -> None:
    """Claims of several queues share a batch among the queues by their first due jobs (read
    unlocked: jobs other open claims took still look queued), then take each queue's first
    free jobs, skipping what other claims hold, without waiting; a queue with fewer free jobs
    than its share leaves the rest of the batch to the others. No job goes to two claims.
    c's share of q finds nothing free and r fills it up; d's whole batch falls to q at first."""
    observer, a, b, c, d = await sessions(connect, "obs", "a", "b", "c", "d")
    if path == "general":  # a scoped job queued anywhere sends claims down the general path
        await _enqueue(observer.conn, queue="other", scope={"k": 1})
    q1, r1, q2, r2, q3, r3, r4, r5, r6 = [
        await _enqueue(observer.conn, queue=q) for q in "qrqrqrrrr"
    ]
    await _enqueue(observer.conn, queue="elsewhere")
    claims = {}
    for s, n in ((a, 2), (b, 3), (c, 3), (d, 1)):
        await s.begin()
        claims[s.name] = await finishes_unblocked(
            observer.conn,
            s,
            s.fetch("SELECT id FROM pgqueue.claim_next($1, '{r,q}', $2)", s.name, n),
        )
    assert {k: sorted(r["id"] for r in v) for k, v in claims.items()} == {
        "a": [q1, r1],
        "b": [q2, r2, q3],
        "c": [r3, r4, r5],
        "d": [r6],
    }
    for s in (a, b, c, d):
        await s.commit()
    rows = await observer.fetch(
        "SELECT locked_by, count(*) AS n, max(attempts) AS attempts FROM pgqueue.jobs"
        " WHERE queue IN ('q', 'r') GROUP BY locked_by ORDER BY locked_by"
    )
    assert [tuple(r) for r in rows] == [("a", 2, 1), ("b", 3, 1), ("c", 3, 1), ("d", 1, 1)]


async def test_a_round_after_one_that_claimed_never_waits_for_a_current_row(
    connect: Connect,
) -> None:
    """A claim of several queues whose first round claimed X (clearing and holding scope 1's
    current row C1) and came up short in q3 fills up from q2 in a second round, whose pick
    Y needs scope 2's current row C2, held now (here by u). Had that round waited for C2,
    it would hold C1 and wait for C2 (out of id order: C2 is older) while retry(R) of a job
    depending on both holds C2 and waits for C1: a deadlock. It skips Y's scope instead
    (claim_or_wait does the same), and the retry goes through."""
    observer, b, u, t, a = await sessions(connect, "obs", "b", "u", "t", "a")
    conn = observer.conn
    current = []
    for scope in ({"s": 2}, {"s": 1}):
        job = await _enqueue(conn, queue="done", scope=scope)
        assert await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", job)
        assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", job)
        current.append(job)
    c2, c1 = current
    r = await _enqueue(conn, depends_on=[c2, c1], max_attempts=1)
    assert await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", r)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", r) == "failed"
    x = await _enqueue(conn, queue="q1", scope={"s": 1}, priority=10)
    z = await _enqueue(conn, queue="q3", priority=10)
    await _enqueue(conn, queue="q2", scope={"s": 2})
    await b.begin()
    assert [
        row["id"] for row in await b.fetch("SELECT id FROM pgqueue.claim_next('b', '{q3}', 1)")
    ] == [z]
    await u.begin()
    await u.fetch("SELECT 1 FROM pgqueue.jobs WHERE id = $1 FOR NO KEY UPDATE", c2)
    retry = t.start(t.fetchval("SELECT pgqueue.retry($1)", r))
    await wait_blocked(conn, t)  # waits for C2, to share-lock it and then C1
    await a.begin()
    got = await finishes_unblocked(
        conn, a, a.fetch("SELECT id FROM pgqueue.claim_next('a', '{q1,q3,q2}', 2)")
    )
    assert [row["id"] for row in got] == [x]
    await u.commit()
    await a.commit()
    assert await retry is True
    await b.rollback()


async def test_one_running_per_scope_is_an_index(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    j1 = await _enqueue(observer.conn, scope={"k": 1})
    j2 = await _enqueue(observer.conn, scope={"k": 1})
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", j1)
    with pytest.raises(asyncpg.UniqueViolationError, match="jobs_one_running_per_scope"):
        await observer.conn.execute(
            "UPDATE pgqueue.jobs SET state = 'running', scope_blocked = false, locked_by = 'x',"
            " locked_at = now() WHERE id = $1",
            j2,
        )


async def test_claim_order_priority_then_run_after_then_id(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    low = await _enqueue(observer.conn, priority=0)
    high = await _enqueue(observer.conn, priority=5)
    early = await observer.fetchval(
        "SELECT pgqueue.enqueue('t', run_after => now() - interval '1 hour')"
    )
    future = await observer.fetchval(
        "SELECT pgqueue.enqueue('t', run_after => now() + interval '1 hour')"
    )
    got = [
        r["id"] for r in await observer.fetch("SELECT id FROM pgqueue.claim_next('w', NULL, 10)")
    ]
    assert got == [high, early, low]
    assert future not in got
    assert await observer.fetch("SELECT * FROM pgqueue.claim($1, 'w')", future) == []


async def test_claim_sets_lease_fields_and_started_at_only_once(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    job = await _enqueue(observer.conn)
    first = await observer.conn.fetchrow("SELECT * FROM pgqueue.claim($1, 'w1')", job)
    assert first["state"] == "running" and first["locked_by"] == "w1" and first["attempts"] == 1
    assert first["locked_at"] is not None and first["started_at"] is not None
    assert (
        await observer.fetchval("SELECT pgqueue.fail($1, 'w1', 'boom', interval '0')", job)
        == "queued"
    )
    row = await observer.conn.fetchrow(
        "SELECT locked_by, locked_at FROM pgqueue.jobs WHERE id = $1", job
    )
    assert tuple(row) == (None, None)
    second = await observer.conn.fetchrow("SELECT * FROM pgqueue.claim($1, 'w2')", job)
    assert second["started_at"] == first["started_at"]
    assert second["locked_at"] >= first["locked_at"]
    assert second["attempts"] == 2
