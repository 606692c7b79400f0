"""The statements pgqueue sends per job (or batch) need no asyncpg type lookup on a new
connection.

asyncpg encodes and decodes only a few array types (text[], oid[]) without asking the server;
for any other it first runs a catalog query (``WITH RECURSIVE typeinfo_tree ...``, 8-12 ms on
the development machine), once per connection and type. Every new application connection
would pay it on its first ``enqueue``, and a worker on its first completion per pooled
connection. Job ids, and the typed enqueue_many's integer and timestamp columns, therefore
travel as text.
"""

from __future__ import annotations

from enum import IntEnum

import anyio.lowlevel
import asyncpg
import pytest

import pgqueue
from pgqueue import dsn as pgqueue_dsn
from pgqueue.app import _ENQUEUE_MANY_SQL, _ENQUEUE_ROWS_SQL, _ENQUEUE_SQL
from pgqueue.worker.completer import (
    _COMPLETE_MANY,
    _FAIL,
    _RELEASE,
    _SNOOZE,
    _SUCCEEDED_BY,
    LOCK_WAIT,
)
from pgqueue.worker.producer import _CLAIM, _CLAIM_OR_WAIT, _UNKNOWN_HELD

PER_JOB_STATEMENTS = {
    "enqueue": _ENQUEUE_SQL,
    "enqueue_many": _ENQUEUE_MANY_SQL,
    "enqueue_many_typed": _ENQUEUE_ROWS_SQL,
    "claim": _CLAIM,
    "claim_or_wait": _CLAIM_OR_WAIT,
    "complete_many": _COMPLETE_MANY,
    "succeeded_by": _SUCCEEDED_BY,
    "fail": _FAIL,
    "release": _RELEASE,
    "snooze": _SNOOZE,
    "unknown_held": _UNKNOWN_HELD,
}


def _type_lookups(conn: asyncpg.Connection) -> list[str]:
    seen: list[str] = []
    conn.add_query_logger(lambda record: seen.append(record.query))
    return seen


@pytest.mark.parametrize("name", sorted(PER_JOB_STATEMENTS))
async def test_statement_needs_no_type_lookup(db_dsn: str, name: str) -> None:
    conn = await pgqueue_dsn.connect(db_dsn)  # codecs set, as on the worker's pool
    try:
        queries = _type_lookups(conn)
        await conn.prepare(PER_JOB_STATEMENTS[name])
        # asyncpg hands query loggers to the event loop (call_soon): let them run.
        await anyio.lowlevel.checkpoint()
        assert not [q for q in queries if "typeinfo_tree" in q]
        # The control: a bigint[] parameter does make asyncpg look its type up, and the
        # logger sees it (else the assertion above could not fail).
        await conn.prepare("SELECT $1::bigint[]")
        await anyio.lowlevel.checkpoint()
        assert [q for q in queries if "typeinfo_tree" in q]
    finally:
        await conn.close()


async def test_enqueue_and_complete_with_ids_on_fresh_connections(db_dsn: str) -> None:
    """The id parameters still arrive as ids: a dependency, a completion, a refused id."""
    app = pgqueue.App()
    conn = await asyncpg.connect(db_dsn)  # an application's plain connection, no codecs
    try:
        queries = _type_lookups(conn)
        first = await app.enqueue(conn, "a")
        second = await app.enqueue(conn, "b", depends_on=[first])
        assert not [q for q in queries if "typeinfo_tree" in q]
        assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", second) == (
            "waiting"
        )
        with pytest.raises(TypeError, match="job id must be an integer"):
            await app.enqueue(conn, "c", depends_on=[True])
        with pytest.raises(TypeError, match="job id must be an integer"):
            await app.enqueue(conn, "c", depends_on=[3.0])  # type: ignore[list-item]
        await conn.fetch(_CLAIM, "w1", None, 1)
        done = await conn.fetch(
            _COMPLETE_MANY, "w1", pgqueue_dsn.id_array([first]), [None], [None], LOCK_WAIT
        )
        assert [r[0] for r in done] == [first]
        assert await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", second) == (
            "queued"
        )
        assert pgqueue_dsn.id_array([]) == "{}"
        assert pgqueue_dsn.id_array([IntEnum("Ids", {"A": 7}).A, 8]) == "{7,8}"
    finally:
        await conn.close()
