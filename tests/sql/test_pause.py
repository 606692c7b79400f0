"""pause_queue() / resume_queue(): no claim takes a job of a paused queue, everything else
goes on, and resuming wakes the queue's workers."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlharness import Connect

PAUSE = "SELECT pgqueue.pause_queue($1)"
RESUME = "SELECT pgqueue.resume_queue($1)"
CLAIM_NEXT = "SELECT id FROM pgqueue.claim_next('w', $1::text[], 10) ORDER BY id"
CLAIM_OR_WAIT = "SELECT id FROM pgqueue.claim_or_wait('w', $1::text[], 10) ORDER BY id"


async def _enqueue(conn: asyncpg.Connection, queue: str, scope: str | None = None) -> int:
    job: int = await conn.fetchval(
        "SELECT pgqueue.enqueue('t', queue => $1, scope => $2::jsonb)", queue, scope
    )
    return job


async def _claim_next(conn: asyncpg.Connection, queues: list[str] | None = None) -> list[int]:
    return [r["id"] for r in await conn.fetch(CLAIM_NEXT, queues)]


async def test_no_claim_takes_a_job_of_a_paused_queue(conn: asyncpg.Connection) -> None:
    # Only unscoped jobs: claim_next's one-statement path.
    paused = await _enqueue(conn, "p")
    other = await _enqueue(conn, "q")
    assert await conn.fetchval(PAUSE, "p") is True
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", paused) == 0
    assert [r["id"] for r in await conn.fetch(CLAIM_OR_WAIT, ["p"])] == []
    assert await _claim_next(conn, ["p"]) == []
    assert await _claim_next(conn) == [other]
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", paused) == "queued"

    assert await conn.fetchval(RESUME, "p") is True
    assert await _claim_next(conn) == [paused]


async def test_the_scoped_claim_path_skips_paused_queues_too(conn: asyncpg.Connection) -> None:
    # A scoped job queued sends claim_next down its general path.
    paused = await _enqueue(conn, "p")
    paused_scoped = await _enqueue(conn, "p", '{"s": 1}')
    other_scoped = await _enqueue(conn, "q", '{"s": 2}')
    await conn.fetchval(PAUSE, "p")
    assert await _claim_next(conn) == [other_scoped]
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", paused_scoped) == 0
    await conn.fetchval(RESUME, "p")
    assert await _claim_next(conn) == [paused, paused_scoped]


async def test_a_scope_waits_behind_its_head_in_a_paused_queue(conn: asyncpg.Connection) -> None:
    """Scopes run in id order across queues: pausing the queue of a scope's next job holds
    up the scope's later jobs in other queues."""
    head = await _enqueue(conn, "p", '{"s": 1}')
    behind = await _enqueue(conn, "q", '{"s": 1}')
    await conn.fetchval(PAUSE, "p")
    assert await _claim_next(conn) == []
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.claim($1, 'w')", behind) == 0
    await conn.fetchval(RESUME, "p")
    assert await _claim_next(conn) == [head]


async def test_enqueues_running_jobs_and_outcomes_go_on(conn: asyncpg.Connection) -> None:
    running = await _enqueue(conn, "p")
    failing = await _enqueue(conn, "p")
    assert await _claim_next(conn) == [running, failing]
    await conn.fetchval(PAUSE, "p")
    assert await conn.fetchval("SELECT pgqueue.complete($1, 'w')", running) is True
    # A failed attempt is requeued as usual, and waits for the resume like any queued job.
    assert await conn.fetchval("SELECT pgqueue.fail($1, 'w', 'boom', '0 s')", failing) == "queued"
    assert await _claim_next(conn) == []
    late = await _enqueue(conn, "p")
    assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", late) == "queued"
    await conn.fetchval(RESUME, "p")
    assert await _claim_next(conn) == [failing, late]


async def test_pause_and_resume_say_whether_they_changed_anything(
    conn: asyncpg.Connection,
) -> None:
    assert await conn.fetchval(PAUSE, "p") is True
    assert await conn.fetchval(PAUSE, "p") is False
    assert await conn.fetchval(PAUSE, "q") is True
    assert [
        r[0] for r in await conn.fetch("SELECT queue FROM pgqueue.paused_queues ORDER BY 1")
    ] == [
        "p",
        "q",
    ]
    assert await conn.fetchval(RESUME, "p") is True
    assert await conn.fetchval(RESUME, "p") is False
    assert await conn.fetchval(RESUME, "never") is False
    assert [r[0] for r in await conn.fetch("SELECT queue FROM pgqueue.paused_queues")] == ["q"]


async def test_resuming_wakes_the_queues_workers(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    listener = await connect()
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("pgqueue", lambda *args: heard.put_nowait(args[-1]))
    await conn.fetchval(PAUSE, "p")
    await conn.fetchval(RESUME, "p")
    assert await asyncio.wait_for(heard.get(), 5) == "p"
    # Nothing to resume, nothing sent: the next notification is the marker.
    await conn.fetchval(RESUME, "p")
    await conn.execute("NOTIFY pgqueue, 'marker'")
    assert await asyncio.wait_for(heard.get(), 5) == "marker"


async def test_in_when_waiting_mode_resuming_wakes_a_waiting_worker(
    conn: asyncpg.Connection, connect: Connect
) -> None:
    await conn.execute("UPDATE pgqueue.settings SET value = 'when_waiting' WHERE name = 'notify'")
    listener = await connect()
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("pgqueue", lambda *args: heard.put_nowait(args[-1]))
    await _enqueue(conn, "p")
    await conn.fetchval(PAUSE, "p")
    assert [r["id"] for r in await conn.fetch(CLAIM_OR_WAIT, ["p"])] == []  # registers
    await conn.fetchval(RESUME, "p")
    assert await asyncio.wait_for(heard.get(), 5) == "p"
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.notify_waiters") == 0


@pytest.mark.parametrize(
    ("function", "queue", "message"),
    [
        ("pause_queue", None, "pgqueue.pause_queue: queue must be a non-empty name, got NULL"),
        ("pause_queue", "", "pgqueue.pause_queue: queue must be a non-empty name, got ''"),
        ("pause_queue", "  ", "pgqueue.pause_queue: queue must be a non-empty name, got '  '"),
        ("resume_queue", None, "pgqueue.resume_queue: queue must be a non-empty name, got NULL"),
        ("resume_queue", " ", "pgqueue.resume_queue: queue must be a non-empty name, got ' '"),
    ],
)
async def test_a_missing_queue_name_is_refused(
    conn: asyncpg.Connection, function: str, queue: str | None, message: str
) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError) as raised:
        await conn.fetchval(f"SELECT pgqueue.{function}($1)", queue)
    assert str(raised.value) == message
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.paused_queues") == 0


async def test_a_queue_name_no_job_could_have_is_refused(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="paused_queues_queue_valid"):
        await conn.fetchval(PAUSE, "q" * 201)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.paused_queues") == 0
