"""The Python API's inputs: the same job whichever path enqueues it, and bad input refused
before anything is written (faults from the session-10 audit of app, job, pipeline, sqla and
migrate)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import anyio
import anyio.abc
import asyncpg
import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.orm import scoped_session
from worker_harness import wait_until

import pgqueue
from pgqueue.cli import main
from pgqueue.dsn import connect as pgqueue_connect
from pgqueue.migrate import SchemaError, check_schema
from pgqueue.pipeline import Pipeline, PipelineError
from pgqueue.sqla import enqueue, enqueue_async

NAIVE = datetime.datetime(2030, 1, 1, 12, 0)  # no time zone: read as UTC on every path
AS_UTC = NAIVE.replace(tzinfo=datetime.UTC)


def mail_app() -> pgqueue.App:
    app = pgqueue.App()

    @app.job("mail", queue="mailq", max_attempts=2)
    async def mail(job: pgqueue.Job) -> None: ...

    return app


async def test_a_naive_run_after_is_the_same_instant_on_every_path(
    conn: asyncpg.Connection, engine: AsyncEngine
) -> None:
    """App.enqueue (asyncpg reads a naive timestamptz parameter as UTC) and the JSON paths
    (PostgreSQL reads naive text in the session's TimeZone) stored different instants."""
    await conn.execute("SET TimeZone = 'Asia/Tokyo'")
    app = mail_app()
    ids = [
        await app.enqueue(conn, "mail", run_after=NAIVE),
        *await app.enqueue_many(conn, [{"job_type": "mail", "run_after": NAIVE}]),
        *await app.enqueue_many(conn, [{"job_type": "mail", "run_after": NAIVE, "key": "k"}]),
        *await app.enqueue_many(conn, [pgqueue.Spec("mail", run_after=NAIVE)]),
        # As ISO text in a spec: passed through, PostgreSQL read it in its TimeZone.
        *await app.enqueue_many(conn, [{"job_type": "mail", "run_after": NAIVE.isoformat()}]),
        *await app.enqueue_many(conn, [pgqueue.Spec("mail", run_after=NAIVE.isoformat())]),  # type: ignore[arg-type]
    ]
    pipeline = app.pipeline()
    pipeline.add("mail", run_after=NAIVE.isoformat())  # type: ignore[arg-type]
    ids += (await pipeline.enqueue(conn)).job_ids
    async with AsyncSession(engine) as session:
        await session.execute(text("SET TimeZone = 'Asia/Tokyo'"))
        ids.append(await enqueue_async(session, "mail", run_after=NAIVE))
        await session.commit()
    rows = await conn.fetch("SELECT run_after FROM pgqueue.jobs WHERE id = ANY($1)", ids)
    assert {r["run_after"] for r in rows} == {AS_UTC}


async def test_a_run_after_text_that_is_no_iso_timestamp_is_refused_by_name(
    conn: asyncpg.Connection,
) -> None:
    with pytest.raises(ValueError, match="run_after must be a datetime or an ISO 8601 timestamp"):
        await mail_app().enqueue_many(conn, [{"job_type": "mail", "run_after": "tomorrow"}])
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0


async def test_null_options_take_the_registered_defaults(conn: asyncpg.Connection) -> None:
    """An explicit None kept the SQL default in enqueue_many, where App.enqueue's None takes
    the registered queue and max_attempts; App.spec replaced explicit bad values."""
    app = mail_app()
    (job,) = await app.enqueue_many(
        conn, [{"job_type": "mail", "queue": None, "max_attempts": None}]
    )
    row = await conn.fetchrow("SELECT queue, max_attempts FROM pgqueue.jobs WHERE id = $1", job)
    assert tuple(row) == ("mailq", 2)
    with pytest.raises(ValueError, match="max_attempts"):
        app.spec("mail", max_attempts=0)
    assert app.spec("mail", queue="other").queue == "other"


async def test_spec_objects_are_taken_wherever_specs_are(conn: asyncpg.Connection) -> None:
    app = mail_app()
    parent = await app.enqueue(conn, "mail", next_jobs=[pgqueue.Spec("mail", {"n": 1})])
    stored = await conn.fetchval("SELECT next_jobs FROM pgqueue.jobs WHERE id = $1", parent)
    assert '"job_type": "mail"' in stored and '"queue": "mailq"' in stored
    (child,) = await app.enqueue_many(conn, [pgqueue.Spec("mail")])
    assert await conn.fetchval("SELECT queue FROM pgqueue.jobs WHERE id = $1", child) == "mailq"


async def test_a_date_run_after_is_its_midnight_utc_on_every_path(
    conn: asyncpg.Connection, engine: AsyncEngine
) -> None:
    """From the review: pgqueue.sqla sent a date for PostgreSQL to read in the session's
    TimeZone (05:00 UTC under America/New_York), app.enqueue read it as 00:00 UTC."""
    day = datetime.date(2030, 1, 1)
    midnight = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    first = await pgqueue.App().enqueue(conn, "x", run_after=day)
    async with AsyncSession(engine) as session:
        await session.execute(text("SET LOCAL TimeZone = 'America/New_York'"))
        second = await enqueue_async(session, "x", run_after=day)
        await session.commit()
    rows = await conn.fetch(
        "SELECT run_after FROM pgqueue.jobs WHERE id = ANY ($1) ORDER BY id", [first, second]
    )
    assert [r[0] for r in rows] == [midnight, midnight]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        # each raised something naming no argument: DataError "invalid input for query
        # argument $10", "a job spec must be ... got str", "'int' object is not iterable"
        ({"pipeline_id": "nope"}, ValueError, "pipeline_id must be a UUID, got 'nope'"),
        ({"pipeline_id": 5}, ValueError, "pipeline_id must be a UUID, got 5"),
        ({"next_jobs": {"job_type": "y"}}, TypeError, "next_jobs must be a list of job specs"),
        ({"depends_on": 5}, TypeError, "depends_on must be a list of job ids, got 5"),
        # stored as 1 here and as 2 by pgqueue.sqla
        ({"priority": 1.5}, TypeError, "priority must be an integer, got 1.5"),
        ({"priority": True}, TypeError, "priority must be an integer, got True"),
        ({"max_attempts": 2.5}, TypeError, "max_attempts must be an integer, got 2.5"),
        ({"run_after": "2030-01-01"}, TypeError, "run_after must be a datetime, got str"),
        ({"delay": "10"}, TypeError, "delay must be seconds or a timedelta, got '10'"),
        # "invalid input for query argument $8 ... (value out of int32 range)", "$3 ...
        # expected str", 'invalid byte sequence for encoding "UTF8": 0x00'
        ({"priority": 2**40}, ValueError, "priority must be from -2147483648 to 2147483647"),
        ({"max_attempts": 2**31}, ValueError, "max_attempts must be from -2147483648 to"),
        ({"queue": 5}, TypeError, "queue must be a string, got int"),
        ({"dedup_key": 5}, TypeError, "dedup_key must be a string, got int"),
        ({"queue": "a\x00b"}, ValueError, "queue must not contain NUL"),
        ({"dedup_key": "\udcff"}, ValueError, "dedup_key is not valid Unicode text"),
        # "unsupported Unicode escape sequence / DETAIL: \u0000 cannot be converted to text."
        ({"payload": {"a": ["x\x00"]}}, ValueError, "payload holds \\u0000 (NUL) in a string"),
        ({"scope": {"k\x00": 1}}, ValueError, "scope holds \\u0000 (NUL) in a string"),
        (
            {"next_jobs": [{"job_type": "y", "payload": {"a": "\x00"}}]},
            ValueError,
            "next_jobs holds \\u0000 (NUL)",
        ),
        # An escaped backslash before "u0000" is no NUL: the job is made (checked below).
    ],
)
async def test_app_enqueue_names_the_argument_it_refuses(
    conn: asyncpg.Connection, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        await pgqueue.App().enqueue(conn, "x", **options)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0


async def test_a_backslash_before_u0000_is_no_nul(conn: asyncpg.Connection) -> None:
    job = await pgqueue.App().enqueue(conn, "x", {"a": "\\u0000", "b": "\\\\u0000"})
    payload = await conn.fetchval("SELECT payload FROM pgqueue.jobs WHERE id = $1", job)
    assert json.loads(payload) == {"a": "\\u0000", "b": "\\\\u0000"}


@pytest.mark.parametrize(
    ("job_type", "error", "message"),
    [(5, TypeError, "job_type must be a string, got int"), ("a\x00", ValueError, "NUL")],
)
async def test_app_enqueue_names_a_job_type_it_refuses(
    conn: asyncpg.Connection, job_type: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        await pgqueue.App().enqueue(conn, job_type)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0


async def test_sqla_takes_scoped_sessions(conn: asyncpg.Connection, engine: AsyncEngine) -> None:
    """From the review of the target check: a scoped session (Flask-SQLAlchemy's db.session)
    is a proxy, not a Session, and was refused."""
    scoped = async_scoped_session(async_sessionmaker(engine), scopefunc=asyncio.current_task)
    first = await enqueue_async(scoped, "x")
    await scoped.commit()
    await scoped.remove()
    async with AsyncSession(engine) as session:
        second = await session.run_sync(lambda s: enqueue(scoped_session(lambda: s), "y"))
        await session.commit()
    rows = await conn.fetch("SELECT id FROM pgqueue.jobs ORDER BY id")
    assert [r[0] for r in rows] == [first, second]


async def test_sqla_enqueue_checks_its_input_as_app_enqueue_does(
    conn: asyncpg.Connection, engine: AsyncEngine
) -> None:
    async with AsyncSession(engine) as session:
        with pytest.raises(TypeError, match="depends_on must be a list of job ids"):
            await enqueue_async(session, "x", depends_on="13")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="a job id must be an integer"):
            await enqueue_async(session, "x", depends_on=[True])
        with pytest.raises(TypeError, match="payload must be a mapping"):
            await enqueue_async(session, "x", [("a", 1)])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="job_type must be a string"):
            await enqueue_async(session, 5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="next_jobs must be a list of job specs, got dict"):
            await enqueue_async(session, "x", next_jobs={"job_type": "y"})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="pipeline_id must be a UUID, got 'nope'"):
            await enqueue_async(session, "x", pipeline_id="nope")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"priority must be an integer, got 1\.5"):
            await enqueue_async(session, "x", priority=1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="priority must be from -2147483648"):
            await enqueue_async(session, "x", priority=2**40)
        with pytest.raises(TypeError, match="queue must be a string, got int"):  # stored '5'
            await enqueue_async(session, "x", queue=5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="run_after must be a datetime, got str"):
            await enqueue_async(session, "x", run_after="2030-01-01 00:00")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"got AsyncSession: use pgqueue\.sqla\.enqueue_async"):
            enqueue(session, "x")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="got AsyncEngine: pass a Session or a Connection"):
            await enqueue_async(engine, "x")  # type: ignore[arg-type]
        # pgqueue's JSON encoding (dates, UUIDs), as App.enqueue has it.
        day, ref = datetime.date(2024, 1, 2), uuid.UUID(int=7)
        job = await enqueue_async(session, "x", {"day": day, "ref": ref})
        await session.commit()
    payload = await conn.fetchval("SELECT payload::text FROM pgqueue.jobs WHERE id = $1", job)
    assert payload == f'{{"day": "2024-01-02", "ref": "{ref}"}}'
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1


async def test_job_from_record_does_not_parse_a_json_string_twice(db_dsn: str) -> None:
    """On pgqueue's own connections JSON arrives decoded: a scope that is a JSON string
    ("tenant-1") raised JSONDecodeError, and "42" came back as the number 42."""
    conn = await pgqueue_connect(db_dsn)
    try:
        for scope in ("tenant-1", "42"):
            job_id = await pgqueue.App().enqueue(conn, "x", scope=scope)
            row = await conn.fetchrow("SELECT * FROM pgqueue.jobs WHERE id = $1", job_id)
            assert pgqueue.Job.from_record(row).scope == scope
        plain = await asyncpg.connect(db_dsn)  # no codecs: JSON as text, decoded once
        try:
            row = await plain.fetchrow("SELECT * FROM pgqueue.jobs WHERE id = $1", job_id)
            assert (pgqueue.Job.from_record(row).scope, pgqueue.Job.from_record(row).payload) == (
                "42",
                {},
            )
        finally:
            await plain.close()
    finally:
        await conn.close()


def test_specs_are_checked_when_they_are_built_not_when_the_result_is_recorded() -> None:
    with pytest.raises(ValueError, match="key 'k' is used by more than one spec"):
        pgqueue.Result().fan_out([pgqueue.Spec("a", key="k"), pgqueue.Spec("b", key="k")])
    with pytest.raises(TypeError, match="the join's after must be a list of keys"):
        pgqueue.Result().fan_out([pgqueue.Spec("a")], join={"job_type": "j", "after": "abc"})
    with pytest.raises(TypeError, match="a job spec must be a Spec or a mapping, got int"):
        pgqueue.Result(1, [1])  # type: ignore[list-item]
    pipeline = Pipeline()
    with pytest.raises(PipelineError, match="after must be a node, a key or a list"):
        pipeline.add("x", after=5)  # type: ignore[arg-type]


def test_migrate_against_a_newer_schema_is_one_line(db_dsn: str) -> None:
    asyncpg_run(db_dsn, "UPDATE pgqueue.alembic_version SET version_num = '0002'")
    out = CliRunner().invoke(main, ["--dsn", db_dsn, "migrate"], catch_exceptions=False)
    assert out.exit_code == 1
    assert out.output.startswith("Error: cannot migrate: ") and out.output.count("\n") == 1


async def test_an_unknown_revision_is_not_called_older(conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE pgqueue.alembic_version SET version_num = 'abc123'")
    with pytest.raises(SchemaError, match="'abc123', which this pgqueue does not know"):
        await check_schema(conn)


def asyncpg_run(dsn: str, sql: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    anyio.run(go)


@pytest.mark.parametrize("how", ["stop", "SIGTERM"])
async def test_an_embedded_worker_puts_the_signal_handlers_back(db_dsn: str, how: str) -> None:
    """An application running a Worker (handle_signals=True) found SIGINT and SIGTERM
    changed once it returned: ignored for good after a stop by signal (and in every process
    it started later: ignored signals survive exec), or reset to the defaults."""
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in stop_signals}
    worker = pgqueue.Worker(pgqueue.App(), db_dsn, poll_interval=0.5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.started.wait()
        if how == "stop":
            worker.stop()
        else:  # once the worker's receiver has the signal (else it would end the tests)

            async def receiving() -> bool:
                return signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]

            await wait_until(receiving, what="the worker's signal receiver")
            os.kill(os.getpid(), signal.SIGTERM)
    assert {s: signal.getsignal(s) for s in stop_signals} == before


async def test_naive_run_after_in_every_spec_shape_is_utc(conn: asyncpg.Connection) -> None:
    """A Pipeline without an App, and follow-ups stored in a spec's own next_jobs, still sent
    a naive run_after as text for the session's TimeZone (review of the first fix)."""
    await conn.execute("SET TimeZone = 'Asia/Tokyo'")
    pipeline = Pipeline()
    added = pipeline.add("x", run_after=NAIVE)
    node = (await pipeline.enqueue(conn))[added]
    parent = await pgqueue.App().enqueue(
        conn, "p", next_jobs=[{"job_type": "c", "run_after": NAIVE}]
    )
    assert await conn.fetchval("SELECT run_after FROM pgqueue.jobs WHERE id = $1", node) == AS_UTC
    stored = await conn.fetchval(
        "SELECT next_jobs->0->>'run_after' FROM pgqueue.jobs WHERE id = $1", parent
    )
    assert stored.endswith("+00:00")
    spec = pgqueue.Result().then(
        {"job_type": "c", "next_jobs": [{"job_type": "g", "run_after": NAIVE}]}
    )
    assert spec.next_jobs is not None
    assert spec.next_jobs[0]["next_jobs"][0]["run_after"] == AS_UTC


async def test_specs_that_are_not_mappings_are_named_on_every_path(
    conn: asyncpg.Connection,
) -> None:
    app = pgqueue.App()
    with pytest.raises(TypeError, match="a job spec must be a Spec or a mapping, got int"):
        await app.enqueue_many(conn, [5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="a job spec must be a Spec or a mapping, got list"):
        await app.enqueue(conn, "x", next_jobs=[[("job_type", "y")]])  # type: ignore[list-item]
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0


def test_a_join_or_a_follow_up_reusing_a_key_is_refused_when_built() -> None:
    with pytest.raises(ValueError, match="key 'k' is used by more than one spec"):
        pgqueue.Result().fan_out([pgqueue.Spec("a", key="k")], join=pgqueue.Spec("j", key="k"))
    with pytest.raises(ValueError, match="key 'k' is used by more than one spec"):
        pgqueue.Result().fan_out([pgqueue.Spec("a", key="k")]).then(pgqueue.Spec("b", key="k"))


async def test_a_boolean_delay_is_refused(conn: asyncpg.Connection) -> None:
    """bool is an int to Python: ``delay=True`` was a one-second delay."""
    with pytest.raises(TypeError, match="delay must be seconds or a timedelta, got True"):
        await mail_app().enqueue(conn, "mail", delay=True)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0


@pytest.mark.parametrize(
    ("dsn", "problem"),
    [
        ("postgresql://localhost:abc/x", "port 'abc' is not a number from 1 to 65535"),
        ("postgresql://a:5432,b:70000/x", "port '70000' is not a number from 1 to 65535"),
        ("postgresql:///x?port=0", "port '0' is not a number from 1 to 65535"),
        ("dbname=x user=y", "is a keyword/value connection string"),
        ("mysql://h/x", "is not a postgresql:// URL"),
        ("postgresql://h/x?service=nowhere", "service 'nowhere' is not defined"),
        # From the review of the first version: host= in the query, asyncpg's first-colon
        # split, an unclosed bracket, a port of thousands of digits, a '#' in a password.
        ("postgresql:///x?host=127.0.0.1:99999", "port '99999' is not a number"),
        ("postgresql:///x?user=u&host=h:abc", "port 'abc' is not a number"),
        ("postgresql://h:5432:1/x", "port '5432:1' is not a number"),
        ("postgresql://::1/x", "port ':1' is not a number"),
        ("postgresql://[::1/x", "is not a valid URL"),
        ("postgresql://h:" + "9" * 5000 + "/x", "is not a number from 1 to 65535"),
        ("postgresql://h:070000/x", "port '070000' is not a number"),
        ("postgresql://u:hunter2#@h/x", "percent-encode a '#'"),
        # The server's "unrecognized configuration parameter", which blamed the database.
        ("postgresql://h/x?keepalives=1&hostaddr=1.2.3.4", "has hostaddr, keepalives: libpq"),
        ("postgresql://h/x?connect_timeout=1.5", "connect_timeout '1.5': not a whole number"),
        # "cannot connect: sslmode parameter must be one of ...", exit status 1, not 2
        ("postgresql://h/x?sslmode=bogus", "sslmode 'bogus': not one of disable, allow"),
    ],
)
async def test_a_dsn_asyncpg_cannot_use_is_named_not_echoed(dsn: str, problem: str) -> None:
    """asyncpg said ``invalid literal for int()`` or raised OverflowError from its socket code."""
    with pytest.raises(pgqueue.dsn.DsnError, match=problem) as caught:
        await pgqueue_connect(dsn)
    assert dsn not in str(caught.value) and "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:p@[::1]:5432/x",
        "postgres://h/x",
        "postgresql://u:pa:ss@h,g:6432/x",
        "postgresql:///x?host=/var/run/postgresql",
        "postgresql:///x?host=h1:5432,h2&port=6432",
        "postgresql://h:05432/x",
    ],
)
def test_dsns_asyncpg_takes_pass_the_check(dsn: str) -> None:
    pgqueue.dsn.check_dsn(dsn)


async def test_libpqs_connect_timeout_bounds_the_connection_attempt(db_dsn: str) -> None:
    """asyncpg sent it to the server as a setting, which refused it: every command with a
    production DSN carrying one failed with "database error: unrecognized configuration
    parameter"."""
    sep = "&" if "?" in db_dsn else "?"
    # An empty one is libpq's unset (it raised a bare ValueError: a DSN from a template).
    for seconds, timeout in (("7", 7.0), ("0", None), ("-1", None), ("", None)):
        dsn = f"{db_dsn}{sep}connect_timeout={seconds}&options=-c%20work_mem%3D5MB"
        arguments = pgqueue.dsn.connect_arguments(dsn, "t")
        assert arguments.get("timeout") == timeout
        assert "connect_timeout" not in arguments["dsn"]
        assert "options=-c%20work_mem%3D5MB" in arguments["dsn"]  # the rest as it was
        conn = await pgqueue_connect(dsn)
        try:
            assert await conn.fetchval("SELECT current_setting('work_mem')") == "5MB"
        finally:
            await conn.close()
    # A server that never answers the startup: the attempt ends after connect_timeout.
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pgqueue_connect(f"postgresql://u@127.0.0.1:{port}/x?connect_timeout=2")
        assert 1.5 < time.monotonic() - started < 10


async def test_statement_cache_size_in_the_dsn_goes_to_asyncpg(db_dsn: str) -> None:
    """For a pooler in transaction mode that does not relay prepared statements: read by
    pgqueue (asyncpg would send it to the server, which refuses it) and handed to asyncpg."""
    sep = "&" if "?" in db_dsn else "?"
    dsn = f"{db_dsn}{sep}statement_cache_size=0&connect_timeout=7"
    arguments = pgqueue.dsn.connect_arguments(dsn, "t")
    assert arguments["statement_cache_size"] == 0 and arguments["timeout"] == 7.0
    assert "statement_cache_size" not in arguments["dsn"]
    conn = await pgqueue_connect(dsn)
    try:
        await conn.fetchval("SELECT 1")
        await conn.fetchval("SELECT 1")
        assert await conn.fetchval("SELECT count(*) FROM pg_prepared_statements") == 0
    finally:
        await conn.close()
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(pgqueue.dsn.DsnError, match="statement_cache_size"):
            pgqueue.dsn.check_dsn(f"{db_dsn}{sep}statement_cache_size={bad}")


async def test_a_sigint_between_the_receivers_exit_and_sig_ign_does_not_escape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncio's remove_signal_handler puts Python's default SIGINT handler back as the
    worker's signal receiver exits; a SIGINT of a burst landing right then raised
    KeyboardInterrupt out of the shutdown (2 of 80 burst runs under load), and once that
    was caught, SIGTERM was left registered with the loop, whose close would put SIG_DFL
    back. The SIGINT is injected exactly there."""
    loop_class = type(asyncio.get_running_loop())
    remove = loop_class.remove_signal_handler

    def remove_then_sigint(self: asyncio.AbstractEventLoop, signum: int) -> bool:
        removed = remove(self, signum)  # type: ignore[arg-type]
        if signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGINT)
        return removed

    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(loop_class, "remove_signal_handler", remove_then_sigint)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pgqueue.Worker(pgqueue.App(), "postgresql://unused/x")._watch_signals)
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        loop = asyncio.get_running_loop()
        assert not any(s in loop._signal_handlers for s in found)  # type: ignore[attr-defined]
        assert [signal.getsignal(s) for s in found] == [signal.SIG_IGN, signal.SIG_IGN]
    finally:
        for signum, handler in found.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: pgqueue.App().job("t", timeout=float("nan")), "timeout must be a positive number"),
        (lambda: pgqueue.App().job("t", timeout=0), "timeout must be a positive number"),
        (lambda: pgqueue.Worker(pgqueue.App(), grace=float("nan")), "grace must be a number"),
        (lambda: pgqueue.Worker(pgqueue.App(), grace=-1), "grace must be a number"),
        (
            lambda: pgqueue.Worker(pgqueue.App(), poll_interval=float("nan")),
            "poll_interval must be a positive number",
        ),
    ],
)
def test_nan_and_out_of_range_seconds_are_refused(make: Any, message: str) -> None:
    """NaN compares false with every bound: a NaN timeout had every claim of its job released
    at once, in a tight loop; a NaN grace or poll interval crashed the worker later."""
    with pytest.raises(ValueError, match=message):
        make()


async def test_app_enqueue_names_what_it_takes_instead_of_an_engine(engine: AsyncEngine) -> None:
    """An engine (no transaction of the caller's to join) failed deep inside with "no
    attribute 'fetchval'"."""
    app = pgqueue.App()
    with pytest.raises(TypeError, match="AsyncSession or AsyncConnection, got AsyncEngine"):
        await app.enqueue(engine, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got AsyncEngine"):
        await app.enqueue_many(engine, [{"job_type": "x"}])  # type: ignore[arg-type]


def test_integral_options_of_any_integral_type_are_taken() -> None:
    """From the review: numpy's integers (pandas hands them out) were refused by the check
    that refuses floats; asyncpg took them before."""
    from enum import IntEnum

    from pgqueue.job import int_option

    class Level(IntEnum):
        HIGH = 7

    class Integral:
        def __index__(self) -> int:
            return 3

    assert int_option("priority", Level.HIGH) == 7
    assert int_option("priority", Integral()) == 3
    numpy = pytest.importorskip("numpy")
    assert int_option("max_attempts", numpy.int64(2)) == 2


async def test_decimals_are_json_numbers_of_the_same_value(
    conn: asyncpg.Connection, engine: AsyncEngine
) -> None:
    """asyncpg and SQLAlchemy read numeric columns as Decimal; every path refused them
    ("Object of type Decimal is not JSON serializable"), a handler's result too."""
    app = pgqueue.App()
    payload = {"kg": Decimal("95810.60"), "n": Decimal("3"), "k": Decimal("1E+3")}
    first = await app.enqueue(conn, "x", payload)
    (second,) = await app.enqueue_many(conn, [{"job_type": "x", "payload": payload}])
    async with AsyncSession(engine) as session:
        third = await enqueue_async(session, "x", payload)
        await session.commit()
    rows = await conn.fetch(
        "SELECT payload::text FROM pgqueue.jobs WHERE id = ANY($1)", [first, second, third]
    )
    assert {r[0] for r in rows} == {'{"k": 1000, "n": 3, "kg": 95810.6}'}
    for bad, message in [
        (Decimal("NaN"), "Decimal NaN is not a JSON number"),
        (Decimal("0.12345678901234567890123"), "has more digits than a JSON number"),
    ]:
        with pytest.raises(ValueError, match=message):
            await app.enqueue(conn, "x", {"v": bad})
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 3


@pytest.mark.parametrize(
    "call",
    [
        lambda t: pgqueue.job_outcome(t, 1),
        lambda t: pgqueue.wait_for_job(t, 1),
        lambda t: pgqueue.pipeline_status(t, uuid.uuid4()),
        lambda t: pgqueue.cancel_pipeline(t, uuid.uuid4()),
        lambda t: pgqueue.pause_queue(t, "q"),
        lambda t: pgqueue.resume_queue(t, "q"),
        lambda t: pgqueue.paused_queues(t),
        lambda t: pgqueue.set_queue_limit(t, "q", 1),
        lambda t: pgqueue.queue_limits(t),
        lambda t: check_schema(t),
    ],
    ids=lambda c: c.__code__.co_names[-1],
)
async def test_the_helpers_say_what_to_do_with_a_sqlalchemy_session(
    engine: AsyncEngine, call: Callable[[Any], Awaitable[Any]]
) -> None:
    """From a review of pgqueue in an application: each failed deep inside with
    "'AsyncSession' object has no attribute 'fetchrow'"."""
    async with AsyncSession(engine) as session:
        with pytest.raises(TypeError, match="got AsyncSession; from SQLAlchemy, call its SQL"):
            await call(session)
