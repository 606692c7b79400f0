"""Isolation-spec style helpers for SQL race tests.

Sessions are real asyncpg connections. A step that must block is started as
a task and proven blocked by ``pg_blocking_pids`` (or an advisory-lock wait in
``pg_locks``) from an observer connection; nothing synchronises by sleeping.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import asyncpg

T = TypeVar("T")
Connect = Callable[[], Awaitable[asyncpg.Connection]]

BLOCK_TIMEOUT = 15.0

# Lock-order tests hold an advisory lock a transition takes, see it wait, and check that it
# has not locked the job's row yet (the other order closes a cycle with an enqueue).
PIPELINE_LOCK = (
    "SELECT pg_advisory_xact_lock(pgqueue._lock_class('pipeline'), hashtext($1::uuid::text))"
)
# A session-level try and its unlock: an observer checks that nobody holds a pipeline's lock.
PIPELINE_TRY_LOCK = (
    "SELECT pg_try_advisory_lock(pgqueue._lock_class('pipeline'), hashtext($1::uuid::text))"
)
PIPELINE_UNLOCK = (
    "SELECT pg_advisory_unlock(pgqueue._lock_class('pipeline'), hashtext($1::uuid::text))"
)
ROW_IS_FREE = "SELECT id FROM pgqueue.jobs WHERE id = $1 FOR NO KEY UPDATE SKIP LOCKED"


async def json_codecs(conn: asyncpg.Connection) -> asyncpg.Connection:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    return conn


class Session:
    """A named session: one connection, its backend pid, explicit transactions."""

    def __init__(self, name: str, conn: asyncpg.Connection) -> None:
        self.name = name
        self.conn = conn
        self.pid: int = conn.get_server_pid()

    async def begin(self) -> None:
        await self.conn.execute("BEGIN")

    async def commit(self) -> None:
        await self.conn.execute("COMMIT")

    async def rollback(self) -> None:
        await self.conn.execute("ROLLBACK")

    async def execute(self, sql: str, *args: Any) -> str:
        return await self.conn.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self.conn.fetch(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.conn.fetchval(sql, *args)

    def start(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run a step in the background (it is expected to block)."""
        return asyncio.get_running_loop().create_task(coro, name=f"step-{self.name}")


async def sessions(connect: Connect, *names: str) -> list[Session]:
    out = []
    for name in names:
        out.append(Session(name, await json_codecs(await connect())))
    return out


async def wait_blocked(observer: asyncpg.Connection, *sessions_: Session) -> None:
    """Return once every session waits on a lock held by another backend.

    Polls ``pg_blocking_pids`` (heavyweight and advisory locks, including
    waits for another transaction's commit); fails the test at the deadline.
    """
    deadline = time.monotonic() + BLOCK_TIMEOUT
    pids = [s.pid for s in sessions_]
    while True:
        blocked = await observer.fetchval(
            "SELECT count(*) FROM unnest($1::int[]) p WHERE cardinality(pg_blocking_pids(p)) > 0",
            pids,
        )
        if blocked == len(pids):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"sessions {[s.name for s in sessions_]} never blocked")
        await asyncio.sleep(0.005)  # polling interval of the observer, not a synchronisation


async def finishes_unblocked(
    observer: asyncpg.Connection, session: Session, step: Awaitable[T]
) -> T:
    """Await a step that must never wait for a lock: fails the test as soon as the session is
    seen waiting on another backend (or at the deadline), instead of hanging until the
    holder lets go."""
    task = asyncio.ensure_future(step)
    deadline = time.monotonic() + BLOCK_TIMEOUT
    while not task.done():
        if await observer.fetchval("SELECT cardinality(pg_blocking_pids($1)) > 0", session.pid):
            task.cancel()
            raise AssertionError(f"session {session.name} waited for a lock")
        if time.monotonic() > deadline:
            task.cancel()
            raise AssertionError(f"session {session.name} never finished")
        await asyncio.wait({task}, timeout=0.005)  # the observer's polling interval
    return task.result()


async def lock_wait_kind(observer: asyncpg.Connection, session: Session) -> str | None:
    """The lock type a session waits for (``advisory``, ``transactionid``, ``tuple``...), if any."""
    return await observer.fetchval(
        "SELECT locktype FROM pg_locks WHERE pid = $1 AND NOT granted LIMIT 1", session.pid
    )


async def listen(connect: Connect) -> asyncio.Queue[str]:
    """The payloads of the notifications on channel pgqueue, as a listener receives them."""
    listener = await connect()
    payloads: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("pgqueue", lambda *args: payloads.put_nowait(args[-1]))
    return payloads


# Invariants of the job table, each one query that finds the rows breaking it (none: it
# holds). One snapshot each, so they hold at every commit; test_properties.py checks them
# after every step of its state machine, the fuzzer (fuzz_driver.py) while sessions race.
INVARIANTS = {
    "two current jobs in one scope": """
        SELECT scope FROM pgqueue.jobs WHERE is_current GROUP BY scope HAVING count(*) > 1""",
    "two running jobs in one scope": """
        SELECT scope FROM pgqueue.jobs WHERE state = 'running' AND scope IS NOT NULL
        GROUP BY scope HAVING count(*) > 1""",
    "running job without a lease holder": """
        SELECT id FROM pgqueue.jobs WHERE state = 'running' AND (locked_by IS NULL OR locked_at IS NULL)""",
    "non-final job with attempts > max_attempts": """
        SELECT id FROM pgqueue.jobs
        WHERE state NOT IN ('succeeded', 'failed', 'cancelled') AND attempts > max_attempts""",
    "pending job with its attempts spent": """
        SELECT id FROM pgqueue.jobs WHERE state IN ('waiting', 'queued') AND attempts >= max_attempts""",
    "queued or running job with an unfinished dependency": """
        SELECT j.id FROM pgqueue.jobs j JOIN pgqueue.job_dependencies d ON d.job_id = j.id
        JOIN pgqueue.jobs p ON p.id = d.depends_on
        WHERE j.state IN ('queued', 'running') AND p.state <> 'succeeded'""",
    "waiting job with every dependency succeeded (stuck)": """
        SELECT j.id FROM pgqueue.jobs j WHERE j.state = 'waiting' AND NOT EXISTS (
            SELECT 1 FROM pgqueue.job_dependencies d JOIN pgqueue.jobs p ON p.id = d.depends_on
            WHERE d.job_id = j.id AND p.state <> 'succeeded')""",
    "waiting job whose fan-in counter disagrees with its unfinished dependencies": """
        SELECT j.id FROM pgqueue.jobs j WHERE j.state = 'waiting' AND j.pending_deps <> (
            SELECT count(*) FROM pgqueue.job_dependencies d JOIN pgqueue.jobs p ON p.id = d.depends_on
            WHERE d.job_id = j.id AND p.state <> 'succeeded')""",
    "scope stuck: its oldest queued job is blocked and nothing of the scope runs": """
        SELECT h.id FROM (SELECT DISTINCT ON (scope) id, scope, scope_blocked FROM pgqueue.jobs
                          WHERE state = 'queued' AND scope IS NOT NULL ORDER BY scope, id) h
        WHERE h.scope_blocked AND NOT EXISTS (
            SELECT 1 FROM pgqueue.jobs r WHERE r.scope = h.scope AND r.state = 'running')""",
    "blocked job with no older active job in its scope": """
        SELECT b.id FROM pgqueue.jobs b WHERE b.scope_blocked AND NOT EXISTS (
            SELECT 1 FROM pgqueue.jobs a WHERE a.scope = b.scope AND a.state IN ('queued', 'running')
            AND a.id < b.id)""",
    "job flagged out of the claim index in a queue that is not paused (stranded)": """
        SELECT id FROM pgqueue.jobs
        WHERE queue_paused AND queue NOT IN (SELECT queue FROM pgqueue.paused_queues)""",
    "two pending jobs with one dedup key": """
        SELECT dedup_key FROM pgqueue.jobs WHERE state IN ('waiting', 'queued') AND dedup_key IS NOT NULL
        GROUP BY dedup_key HAVING count(*) > 1""",
}
