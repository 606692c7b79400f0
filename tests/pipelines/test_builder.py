"""The Python API: Spec/Result follow-ups, the Pipeline builder, status and cancel."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import pgqueue
from pgqueue.dsn import dumps

app = pgqueue.App()


@app.job("recalculate", queue="recalc", max_attempts=3)
async def recalculate(job: pgqueue.Job) -> None:
    """Registered only for its defaults."""


async def _count(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval("SELECT count(*) FROM pgqueue.jobs")
    return n


# --------------------------------------------------------------------------- Result


def test_result_reads_naturally_for_one_follow_up_a_fan_out_and_a_join() -> None:
    one = pgqueue.Result({"ok": 1}).then(pgqueue.Spec("notify", {"user": 7}))
    assert one.value == {"ok": 1}
    assert one.next_jobs == [{"job_type": "notify", "payload": {"user": 7}}]

    fan = pgqueue.Result().fan_out(pgqueue.Spec("recalc", {"t": t}) for t in "ab")
    assert fan.next_jobs is not None
    assert [s["payload"] for s in fan.next_jobs] == [{"t": "a"}, {"t": "b"}]
    assert all("after" not in s for s in fan.next_jobs)

    joined = pgqueue.Result().fan_out(
        [pgqueue.Spec("recalc", {"t": t}) for t in "ab"], join=pgqueue.Spec("aggregate")
    )
    assert joined.next_jobs is not None
    *parts, join = joined.next_jobs
    assert join["job_type"] == "aggregate"
    assert join["after"] == [p["key"] for p in parts] and len(set(join["after"])) == 2

    empty = pgqueue.Result().fan_out([], join={"job_type": "aggregate"})
    assert empty.next_jobs == [{"job_type": "aggregate", "after": []}]

    twice = joined.fan_out([pgqueue.Spec("more")], join=pgqueue.Spec("again"))
    assert twice.next_jobs is not None
    keys = [s["key"] for s in twice.next_jobs if "key" in s]
    assert len(keys) == len(set(keys)) == 3
    assert twice.next_jobs[-1]["after"] == [twice.next_jobs[-2]["key"]]


def test_result_keeps_plain_dict_specs_and_refuses_a_single_spec() -> None:
    legacy = pgqueue.Result(1, next_jobs=[{"job_type": "a"}, pgqueue.Spec("b", queue="q")])
    assert legacy.next_jobs == [{"job_type": "a"}, {"job_type": "b", "queue": "q"}]
    with pytest.raises(TypeError, match="next_jobs must be a list of job specs, got Spec"):
        pgqueue.Result(1, next_jobs=pgqueue.Spec("b"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="next_jobs must be a list of job specs, got bytes"):
        pgqueue.Result(1, next_jobs=b"ab")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="job_type"):
        pgqueue.Spec("")
    with pytest.raises(ValueError, match="max_attempts"):
        pgqueue.Spec("a", max_attempts=0)


def test_app_spec_carries_the_registered_queue_and_max_attempts() -> None:
    assert app.spec("recalculate", {"y": 1}).to_dict() == {
        "job_type": "recalculate",
        "payload": {"y": 1},
        "queue": "recalc",
        "max_attempts": 3,
    }
    assert app.spec("recalculate", queue="other").queue == "other"
    assert app.spec("unknown").to_dict() == {"job_type": "unknown"}


async def test_fan_out_specs_go_through_complete_in_one_transaction(
    conn: asyncpg.Connection,
) -> None:
    parent = await conn.fetchval("SELECT pgqueue.enqueue('ingest')")
    await conn.fetch("SELECT * FROM pgqueue.claim($1, 'w')", parent)
    result = pgqueue.Result({"rows": 3}).fan_out(
        [app.spec("recalculate", {"t": t}, scope={"t": t}) for t in ("a", None)],
        join=pgqueue.Spec("aggregate"),
    )
    assert await conn.fetchval(
        "SELECT pgqueue.complete($1, 'w', $2::text::jsonb, $3::text::jsonb)",
        parent,
        dumps(result.value),
        dumps(result.next_jobs),
    )
    rows = await conn.fetch(
        "SELECT job_type, state, queue, parent_id, pipeline_id, scope::text FROM pgqueue.jobs"
        " WHERE parent_id IS NOT NULL ORDER BY id"
    )
    assert [(r["job_type"], r["state"], r["queue"]) for r in rows] == [
        ("recalculate", "queued", "recalc"),
        ("recalculate", "queued", "recalc"),
        ("aggregate", "waiting", "default"),
    ]
    assert rows[1]["scope"] == '{"t": null}'
    assert {r["parent_id"] for r in rows} == {parent}
    assert len({r["pipeline_id"] for r in rows}) == 1 and rows[0]["pipeline_id"] is not None


# --------------------------------------------------------------------------- builder


async def test_pipeline_enqueues_a_dag_atomically_with_one_pipeline_id(
    conn: asyncpg.Connection,
) -> None:
    pipe = app.pipeline()
    ingest = pipe.add("ingest", {"file": "f.csv"})
    recalcs = [pipe.add("recalculate", {"t": t}, after=ingest) for t in ("a", "b")]
    report = pipe.add("aggregate", after=recalcs, key="aggregate")
    run = await pipe.enqueue(conn)

    assert len(run.job_ids) == 4 and isinstance(run.pipeline_id, uuid.UUID)
    assert run.pipeline_id.version == 4
    rows = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT id, state, queue, max_attempts, pipeline_id FROM pgqueue.jobs"
        )
    }
    assert {r["pipeline_id"] for r in rows.values()} == {run.pipeline_id}
    assert rows[run[ingest]]["state"] == "queued"
    assert [rows[run[n]]["state"] for n in recalcs] == ["waiting", "waiting"]
    assert rows[run[recalcs[0]]]["queue"] == "recalc"  # the app's registered defaults
    assert rows[run[recalcs[0]]]["max_attempts"] == 3
    assert run["aggregate"] == run[report]
    deps = await conn.fetch("SELECT job_id, depends_on FROM pgqueue.job_dependencies")
    assert sorted((d["job_id"], d["depends_on"]) for d in deps) == sorted(
        [(run[n], run[ingest]) for n in recalcs] + [(run[report], run[n]) for n in recalcs]
    )

    again = await pipe.enqueue(conn)  # a Pipeline is a template: a new pipeline each time
    assert again.pipeline_id != run.pipeline_id


async def test_builder_refuses_bad_graphs_before_sending(conn: asyncpg.Connection) -> None:
    pipe = pgqueue.Pipeline()
    a = pipe.add("a", key="a")
    b = pipe.add("b", after=a)
    pipe.add_edge(b, a)
    with pytest.raises(pgqueue.PipelineError, match=r"cycle: 'a' -> '#1' -> 'a'"):
        await pipe.enqueue(conn)

    pipe = pgqueue.Pipeline()
    pipe.add("a", after="nope")
    with pytest.raises(pgqueue.PipelineError, match="unknown key 'nope'"):
        await pipe.enqueue(conn)

    pipe = pgqueue.Pipeline()
    pipe.add("a", key="x")
    with pytest.raises(pgqueue.PipelineError, match="key 'x' is used by more than one node"):
        pipe.add("b", key="x")

    other = pgqueue.Pipeline().add("elsewhere")
    with pytest.raises(pgqueue.PipelineError, match="belongs to another pipeline"):
        pipe.add("b", after=other)
    with pytest.raises(pgqueue.PipelineError, match="no jobs"):
        await pgqueue.Pipeline().enqueue(conn)
    with pytest.raises(pgqueue.PipelineError, match="either a Spec"):
        pipe.add(pgqueue.Spec("c"), queue="q")
    with pytest.raises(pgqueue.PipelineError, match="pipeline_id must be a UUID"):
        await pipe.enqueue(conn, pipeline_id="not-a-uuid")
    with pytest.raises(pgqueue.PipelineError, match="depends_on"):
        pipe.add("c", depends_on=[0])

    forward = pgqueue.Pipeline()  # keys may name nodes added later
    forward.add("b", after="a")
    forward.add("a", key="a")
    assert (await forward.enqueue(conn)).job_ids
    assert await _count(conn) == 2


async def test_builder_findings_of_the_session_22_review(conn: asyncpg.Connection) -> None:
    """Each was let through to the SQL (or raised a confusing error)."""
    merged = pgqueue.Pipeline()  # one job by dedup_key, waiting for itself through "x"
    merged.add("dd", key="a", dedup_key="K", after="x")
    merged.add("dd", key="x", after="b")
    merged.add("dd", key="b", dedup_key="K")
    with pytest.raises(pgqueue.PipelineError, match=r"cycle: .* same dedup_key are one job"):
        await merged.enqueue(conn)
    harmless = pgqueue.Pipeline()  # the waiter merges into the one it waits for: one job
    harmless.add("dd", key="b", dedup_key="K")
    harmless.add("dd", key="a", dedup_key="K", after="b")
    ids = (await harmless.enqueue(conn)).job_ids
    assert ids[0] == ids[1]

    default_key = pgqueue.Pipeline()
    default_key.add("a")
    with pytest.raises(pgqueue.PipelineError, match="'#0' is the default key of node 0 \\(a\\)"):
        default_key.add("b", key="#0")

    later = pgqueue.Pipeline()  # add_edge's downstream may be a key added later, as after's
    first = later.add("a")
    later.add_edge(first, "z")
    later.add("z", key="z")
    run = await later.enqueue(conn)
    assert (
        await conn.fetchval(
            "SELECT depends_on FROM pgqueue.job_dependencies WHERE job_id = $1", run.job_ids[1]
        )
        == run.job_ids[0]
    )
    unknown = pgqueue.Pipeline()
    unknown.add_edge(unknown.add("a"), "nowhere")
    with pytest.raises(pgqueue.PipelineError, match="add_edge: downstream names unknown key"):
        unknown.specs()

    own = pgqueue.Pipeline()  # a cycle of own edges: written when the merge does not happen
    own.add("s1", key="a", dedup_key="k")
    own.add("s2", key="b", dedup_key="k", after="c")
    own.add("s3", key="c", after="b")
    with pytest.raises(pgqueue.PipelineError, match=r"cycle: 'b' -> 'c' -> 'b'$"):
        own.specs()
    upstream = pgqueue.Pipeline()
    upstream.add_edge("nowhere", upstream.add("a"))
    with pytest.raises(pgqueue.PipelineError, match="add_edge: upstream names unknown key"):
        upstream.specs()

    before = await _count(conn)
    marks = "SELECT count(*) FROM pgqueue.cancelled_pipelines"
    for call in (app.cancel_pipeline, app.pipeline_status):  # a new uuid4 was made and used
        with pytest.raises(pgqueue.PipelineError, match="pipeline_id is required, got None"):
            await call(conn, None)  # type: ignore[arg-type]
    with pytest.raises(pgqueue.PipelineError, match="pipeline_id must be a UUID, got 5"):
        await app.cancel_pipeline(conn, 5)  # type: ignore[arg-type]
    assert await conn.fetchval(marks) == 0
    assert await _count(conn) == before


async def test_sql_refuses_a_dependency_that_already_failed_and_writes_nothing(
    conn: asyncpg.Connection,
) -> None:
    dead = await conn.fetchval("SELECT pgqueue.enqueue('x')")
    await conn.execute("SELECT pgqueue.cancel($1)", dead)
    pipe = pgqueue.Pipeline()
    first = pipe.add("a")
    pipe.add("b", after=first, depends_on=[dead])
    with pytest.raises(asyncpg.exceptions.InvalidParameterValueError, match="already cancelled"):
        await pipe.enqueue(conn)
    assert await _count(conn) == 1


# --------------------------------------------------------------------------- status / cancel


async def test_pipeline_status_and_cancel_pipeline(conn: asyncpg.Connection) -> None:
    assert await app.pipeline_status(conn, uuid.uuid4()) is None
    pipe = pgqueue.Pipeline()
    a = pipe.add("a")
    b = pipe.add("b", after=a)
    pipe.add("c", after=b)
    pipe.add("x")
    run = await pipe.enqueue(conn)

    status = await app.pipeline_status(conn, run.pipeline_id)
    assert status is not None
    assert (status.state, status.done, status.jobs, status.started_at) == (
        "running",
        False,
        4,
        None,
    )
    assert status.counts == {
        "waiting": 2,
        "queued": 2,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }

    assert len(await conn.fetch("SELECT * FROM pgqueue.claim($1, 'w')", run[a])) == 1
    assert await app.cancel_pipeline(conn, run.pipeline_id) == 3  # b, c, x; a is running
    status = await app.pipeline_status(conn, str(run.pipeline_id))
    assert status is not None
    assert (status.state, status.running, status.cancelled) == ("running", 1, 3)
    assert status.started_at is not None

    # the running member finishes; its pipeline grows no new work
    assert await conn.fetchval(
        "SELECT pgqueue.complete($1, 'w', NULL, $2::text::jsonb)",
        run[a],
        dumps(pgqueue.Result().then(pgqueue.Spec("late")).next_jobs),
    )
    status = await pgqueue.pipeline_status(conn, run.pipeline_id)
    assert status is not None
    assert (status.state, status.done, status.succeeded, status.cancelled) == (
        "cancelled",
        True,
        1,
        4,
    )
    assert status.finished_at is not None
    extra = pgqueue.Pipeline()
    extra.add("more")
    with pytest.raises(asyncpg.exceptions.InvalidParameterValueError, match="was cancelled"):
        await extra.enqueue(conn, pipeline_id=run.pipeline_id)


# --------------------------------------------------------------------------- SQLAlchemy


async def test_pipeline_on_an_async_session_joins_the_callers_transaction(
    engine: AsyncEngine, conn: asyncpg.Connection
) -> None:
    pipe = pgqueue.Pipeline()
    pipe.add("b", after=pipe.add("a"))
    async with AsyncSession(engine) as session:
        async with session.begin():
            await pipe.enqueue(session)
            await session.rollback()
    assert await _count(conn) == 0
    async with AsyncSession(engine) as session, session.begin():
        run = await pipe.enqueue(session)
        assert await _count(conn) == 0  # not visible before the caller commits
    rows = await conn.fetch("SELECT id, pipeline_id FROM pgqueue.jobs ORDER BY id")
    assert [r["id"] for r in rows] == list(run.job_ids)
    assert {r["pipeline_id"] for r in rows} == {run.pipeline_id}
    # A scoped session (a proxy, not an AsyncSession) was taken for asyncpg: no 'fetch'.
    scoped = async_scoped_session(async_sessionmaker(engine), scopefunc=asyncio.current_task)
    again = await pipe.enqueue(scoped)
    await scoped.commit()
    await scoped.remove()
    assert await _count(conn) == len(run.job_ids) + len(again.job_ids)


async def test_pipeline_on_a_sync_session(db_dsn: str, conn: asyncpg.Connection) -> None:
    pytest.importorskip("psycopg")
    engine = create_engine(
        db_dsn.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=NullPool
    )
    pipe = pgqueue.Pipeline()
    pipe.add("b", after=pipe.add("a"))
    try:
        with Session(engine) as session, session.begin():
            run = pipe.enqueue_sync(session)
    finally:
        engine.dispose()
    rows = await conn.fetch("SELECT pipeline_id FROM pgqueue.jobs")
    assert [r["pipeline_id"] for r in rows] == [run.pipeline_id] * 2


async def test_a_pipeline_given_the_wrong_kind_of_target_says_which_to_use(
    db_dsn: str, conn: asyncpg.Connection, engine: AsyncEngine
) -> None:
    """Each failed deep inside: "'Session' object has no attribute 'fetch'", "'coroutine'
    object has no attribute 'scalars'" (and a coroutine never awaited), "'Engine' object has
    no attribute 'execute'"."""
    pytest.importorskip("psycopg")
    sync_engine = create_engine(
        db_dsn.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=NullPool
    )
    pipe = pgqueue.Pipeline()
    pipe.add("a")
    try:
        with Session(sync_engine) as session:
            with pytest.raises(TypeError, match=r"got Session .*use Pipeline\.enqueue_sync"):
                await pipe.enqueue(session)
        with pytest.raises(TypeError, match="got Engine"):
            pipe.enqueue_sync(sync_engine)  # type: ignore[arg-type]
    finally:
        sync_engine.dispose()
    async with AsyncSession(engine) as async_session:
        with pytest.raises(TypeError, match=r"got AsyncSession .*use await Pipeline\.enqueue"):
            pipe.enqueue_sync(async_session)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got Connection .*use await Pipeline\.enqueue"):
        pipe.enqueue_sync(conn)  # type: ignore[arg-type]
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0
