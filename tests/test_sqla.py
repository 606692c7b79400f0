"""pgqueue.sqla: metadata matches the migrated schema; enqueue joins the caller's transaction."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Table, func, inspect, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import pgqueue
from pgqueue.sqla import enqueue, enqueue_async, jobs, metadata, settings

DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


def _describe_reflected(sync_conn: Connection, table: str) -> list[tuple[Any, ...]]:
    return [
        (
            c["name"],
            c["type"].compile(dialect=DIALECT),
            c["nullable"],
            c.get("default") is not None or c.get("identity") is not None,
            c["comment"],
        )
        for c in inspect(sync_conn).get_columns(table, schema="pgqueue")
    ]


def _describe_metadata(table: Table) -> list[tuple[Any, ...]]:
    return [
        (
            c.name,
            c.type.compile(dialect=DIALECT),
            c.nullable,
            c.server_default is not None or c.identity is not None,
            c.comment,
        )
        for c in table.columns
    ]


@pytest.mark.parametrize("table", [jobs, settings], ids=lambda t: t.name)
async def test_metadata_matches_the_migrated_schema(engine: AsyncEngine, table: Table) -> None:
    assert table.metadata is metadata and table.schema == "pgqueue"
    async with engine.connect() as conn:
        reflected = await conn.run_sync(_describe_reflected, table.name)
        primary_key = await conn.run_sync(
            lambda c: inspect(c).get_pk_constraint(table.name, schema="pgqueue")
        )
        comment = await conn.run_sync(
            lambda c: inspect(c).get_table_comment(table.name, schema="pgqueue")
        )
    # Comments too: alembic's autogenerate would propose rewriting any that differ.
    assert (table.comment, _describe_metadata(table)) == (comment["text"], reflected)
    assert primary_key["constrained_columns"] == [c.name for c in table.primary_key]


async def _count(engine: AsyncEngine, job_type: str) -> int:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(func.count()).select_from(jobs).where(jobs.c.job_type == job_type)
        )
        return int(result.scalar_one())


async def test_async_session_enqueue_follows_the_transaction(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session:
        await enqueue_async(session, "rolled_back", {"n": 1})
        await session.rollback()
    assert await _count(engine, "rolled_back") == 0

    async with AsyncSession(engine) as session:
        job_id = await enqueue_async(
            session,
            "committed",
            {"n": 2},
            queue="q1",
            scope={"site": 1, "year": None},
            priority=5,
            max_attempts=2,
        )
        await session.commit()
    async with engine.connect() as conn:
        row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).one()
    assert (row.job_type, row.payload, row.queue, row.priority, row.max_attempts) == (
        "committed",
        {"n": 2},
        "q1",
        5,
        2,
    )
    assert row.scope == {"site": 1, "year": None}


async def test_sync_session_enqueue_follows_the_transaction(engine: AsyncEngine) -> None:
    # The sync API, driven through AsyncSession.run_sync: same code path as a sync Session.
    async with AsyncSession(engine) as session:
        await session.run_sync(lambda s: enqueue(s, "sync_rolled_back"))
        await session.rollback()
    assert await _count(engine, "sync_rolled_back") == 0

    async with AsyncSession(engine) as session:
        job_id = await session.run_sync(lambda s: enqueue(s, "sync_committed", {"a": [1]}))
        await session.commit()
    assert await _count(engine, "sync_committed") == 1

    async with engine.begin() as conn:
        second = await conn.run_sync(lambda c: enqueue(c, "sync_committed", depends_on=[job_id]))
    assert second > job_id
    async with engine.connect() as conn:
        state = (await conn.execute(select(jobs.c.state).where(jobs.c.id == second))).scalar_one()
    assert state == "waiting"


async def test_unknown_option_is_rejected(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session:
        with pytest.raises(TypeError, match="bogus"):
            await enqueue_async(session, "x", bogus=1)  # type: ignore[call-arg]


APP = pgqueue.App()


@APP.job("mail", queue="mail", max_attempts=4)
async def mail(job: pgqueue.Job) -> None: ...


async def _queue_and_attempts(engine: AsyncEngine, job_ids: list[int]) -> list[tuple[str, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(jobs.c.queue, jobs.c.max_attempts)
            .where(jobs.c.id.in_(job_ids))
            .order_by(jobs.c.id)
        )
        return [(r.queue, r.max_attempts) for r in rows]


async def test_app_enqueue_takes_a_sqlalchemy_session_with_the_apps_defaults(
    engine: AsyncEngine,
) -> None:
    """From a review of pgqueue in an application: an AsyncSession app's natural path,
    pgqueue.sqla.enqueue_async, put a job of a type registered to queue "mail" in "default",
    where a worker of --queues mail never ran it, and app.enqueue refused the session. The
    App's methods take it now (and a sync Session through enqueue_sync), in its transaction,
    with the type's queue and max_attempts, and those of the follow-ups in next_jobs."""
    async with AsyncSession(engine) as session:
        await APP.enqueue(session, "mail", {"to": "a"})
        await APP.enqueue_many(session, [{"job_type": "mail"}])
        await session.rollback()
    assert await _count(engine, "mail") == 0

    async with AsyncSession(engine) as session:
        one = await APP.enqueue(
            session, "mail", {"to": "a"}, delay=60, next_jobs=[{"job_type": "mail"}]
        )
        many = await APP.enqueue_many(
            session, [{"job_type": "mail"}, {"job_type": "mail", "queue": "x"}]
        )
        await session.commit()
    async with engine.begin() as conn:
        sync = await conn.run_sync(lambda c: APP.enqueue_sync(c, "mail", max_attempts=2))
        delayed = (
            await conn.execute(
                select(
                    jobs.c.run_after > func.now() + text("interval '50 seconds'"), jobs.c.next_jobs
                ).where(jobs.c.id == one)
            )
        ).one()
    assert await _queue_and_attempts(engine, [one, *many, sync]) == [
        ("mail", 4),
        ("mail", 4),
        ("x", 4),
        ("mail", 2),
    ]
    assert delayed[0] and [(s["queue"], s["max_attempts"]) for s in delayed[1]] == [("mail", 4)]


async def test_app_enqueue_says_which_flavour_of_session_it_takes(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session:
        with pytest.raises(TypeError, match=r"use await app\.enqueue"):
            APP.enqueue_sync(session, "mail")  # type: ignore[arg-type]
        sync_session = await session.run_sync(lambda s: s)
        with pytest.raises(TypeError, match=r"a synchronous one: use app\.enqueue_sync"):
            await APP.enqueue(sync_session, "mail")
        with pytest.raises(TypeError, match=r"a synchronous one: use app\.enqueue_sync"):
            await APP.enqueue_many(sync_session, [{"job_type": "mail"}])
    with pytest.raises(TypeError, match="of your transaction, got Engine"):
        APP.enqueue_sync(engine.sync_engine, "mail")  # type: ignore[arg-type]
    assert await _count(engine, "mail") == 0
