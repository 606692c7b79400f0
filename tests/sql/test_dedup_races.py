"""Dedup: one pending job per key under concurrent enqueues; retries never trip on the key."""

from __future__ import annotations

import asyncio

from sqlharness import Connect, Session, sessions, wait_blocked


async def test_concurrent_enqueues_of_one_key_create_one_job(connect: Connect) -> None:
    observer, a, *others = await sessions(connect, "obs", "a", "b", "c", "d", "e")
    await a.begin()
    first = await a.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'agg:2024')")
    steps = [
        s.start(s.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'agg:2024')"))
        for s in others
    ]
    await wait_blocked(observer.conn, *others)
    await a.commit()
    assert set(await asyncio.gather(*steps)) == {first}
    assert (
        await observer.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE dedup_key = 'agg:2024'")
        == 1
    )


async def test_concurrent_enqueues_first_rolls_back_one_still_created(connect: Connect) -> None:
    observer, a, b, c = await sessions(connect, "obs", "a", "b", "c")
    await a.begin()
    await a.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    steps = [s.start(s.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")) for s in (b, c)]
    await wait_blocked(observer.conn, b, c)
    await a.rollback()
    ids = await asyncio.gather(*steps)
    assert len(set(ids)) == 1
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE dedup_key = 'k'") == 1


async def test_free_for_all_enqueues_one_key(connect: Connect) -> None:
    observer, *workers = await sessions(connect, "obs", *(f"w{i}" for i in range(8)))

    async def burst(w: Session) -> list[int]:
        return [
            await w.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')") for _ in range(5)
        ]

    ids = [i for batch in await asyncio.gather(*(burst(w) for w in workers)) for i in batch]
    assert len(set(ids)) == 1
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1


async def test_running_job_does_not_absorb_new_requests(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    first = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", first)
    second = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    assert second != first  # the running one may have read stale data: a new run is owed


async def test_fail_meets_newer_pending_job_with_same_key(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    old = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", old)
    new = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    assert await observer.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", old) == "queued"
    rows = await observer.fetch("SELECT id, state, dedup_key FROM pgqueue.jobs ORDER BY id")
    assert [tuple(r) for r in rows] == [(old, "queued", None), (new, "queued", "k")]
    # The newer job keeps coalescing requests.
    assert await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')") == new


async def test_release_recover_and_retry_meet_newer_job_with_same_key(connect: Connect) -> None:
    (observer,) = await sessions(connect, "obs")
    conn = observer.conn
    for action in ("release", "recover", "retry"):
        key = f"k-{action}"
        old = await conn.fetchval(
            "SELECT pgqueue.enqueue('agg', dedup_key => $1, max_attempts => 1)", key
        )
        await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", old)
        if action == "retry":
            assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'x')", old) == "failed"
        new = await conn.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => $1)", key)
        if action == "release":
            assert await conn.fetchval("SELECT pgqueue.release($1, 'w')", old)
        elif action == "recover":
            await conn.execute("UPDATE pgqueue.jobs SET max_attempts = 3 WHERE id = $1", old)
            await conn.execute(
                "UPDATE pgqueue.jobs SET locked_at = now() - interval '1 hour' WHERE id = $1", old
            )
            assert [r[0] for r in await conn.fetch("SELECT pgqueue.recover_stale()")] == [old]
        else:
            assert await conn.fetchval("SELECT pgqueue.retry($1)", old)
        rows = await conn.fetch(
            "SELECT id, state, dedup_key FROM pgqueue.jobs WHERE id IN ($1, $2) ORDER BY id",
            old,
            new,
        )
        assert [tuple(r) for r in rows] == [(old, "queued", None), (new, "queued", key)], action


async def test_requeue_racing_enqueue_of_same_key(connect: Connect) -> None:
    """fail() waits for an in-flight enqueue of the key, then drops its own key: no 23505."""
    observer, a, b = await sessions(connect, "obs", "a", "b")
    old = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", old)
    await a.begin()
    new = await a.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    step = b.start(b.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", old))
    await wait_blocked(observer.conn, b)
    await a.commit()
    assert await step == "queued"
    rows = await observer.fetch("SELECT id, dedup_key FROM pgqueue.jobs ORDER BY id")
    assert [tuple(r) for r in rows] == [(old, None), (new, "k")]


async def test_enqueue_racing_requeue_of_same_key_merges_into_it(connect: Connect) -> None:
    observer, a, b = await sessions(connect, "obs", "a", "b")
    old = await observer.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')")
    await observer.fetch("SELECT id FROM pgqueue.claim($1, 'w')", old)
    await a.begin()
    assert await a.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", old) == "queued"
    step = b.start(b.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'k')"))
    await wait_blocked(observer.conn, b)
    await a.commit()
    assert await step == old
    assert await observer.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1


async def test_retry_revives_dependents_whose_keys_were_taken_meanwhile(connect: Connect) -> None:
    """retry() puts the dependents it cancelled back to waiting: one whose key a newer pending
    job took meanwhile drops it (no 23505), and of two revived with one key, the older keeps it."""
    (observer,) = await sessions(connect, "obs")
    conn = observer.conn
    root = await conn.fetchval("SELECT pgqueue.enqueue('load', max_attempts => 1)")
    taken, shared_a, shared_b, kept = [
        await conn.fetchval(
            "SELECT pgqueue.enqueue('agg', depends_on => ARRAY[$1::bigint], dedup_key => $2)",
            root,
            key,
        )
        for key in ("taken", "shared", "shared-later", "kept")
    ]
    await conn.fetch("SELECT id FROM pgqueue.claim($1, 'w')", root)
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom')", root) == "failed"
    states = await conn.fetch("SELECT state FROM pgqueue.jobs WHERE id <> $1", root)
    assert {r["state"] for r in states} == {"cancelled"}
    newer = await conn.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'taken')")
    # Two cancelled dependents come to share one key (a hand-written repair, say).
    await conn.execute("UPDATE pgqueue.jobs SET dedup_key = 'shared' WHERE id = $1", shared_b)

    assert await conn.fetchval("SELECT pgqueue.retry($1)", root)

    rows = await conn.fetch("SELECT id, state, dedup_key FROM pgqueue.jobs ORDER BY id")
    assert [tuple(r) for r in rows] == [
        (root, "queued", None),
        (taken, "waiting", None),  # the newer job keeps coalescing requests for the key
        (shared_a, "waiting", "shared"),
        (shared_b, "waiting", None),
        (kept, "waiting", "kept"),
        (newer, "queued", "taken"),
    ]
    assert await conn.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'taken')") == newer
    assert await conn.fetchval("SELECT pgqueue.enqueue('agg', dedup_key => 'kept')") == kept
