"""SQLAlchemy 2 metadata for pgqueue's tables, and enqueue inside your own session.

Read jobs with ordinary SQLAlchemy Core::

    from pgqueue.sqla import jobs
    session.execute(select(jobs.c.id, jobs.c.state).where(jobs.c.queue == "recalc"))

Enqueue in the caller's transaction, so the job exists exactly when your
other writes commit::

    with Session(engine) as session, session.begin():
        session.add(order)
        job_id = enqueue(session, "send_receipt", {"order": 42}, queue="mail")

Change job rows only through the SQL functions (see docs/sql.md); the tables
are here for reading and reporting. The schema itself is created by
``pgqueue migrate``, never by ``metadata.create_all``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    FetchedValue,
    Identity,
    Integer,
    Interval,
    MetaData,
    Table,
    Text,
    bindparam,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_scoped_session
from sqlalchemy.orm import Session, scoped_session
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.types import TypeEngine

from pgqueue.dsn import as_job_id, dumps
from pgqueue.job import (
    as_delay,
    int_option,
    job_id_list,
    pipeline_id_text,
    run_after_option,
    spec_dict,
    spec_list,
    text_option,
)
from pgqueue.resources import sql_dir

__all__ = ["ENQUEUE_OPTIONS", "enqueue", "enqueue_async", "jobs", "metadata", "settings"]

metadata = MetaData(schema="pgqueue")

_TZ = DateTime(timezone=True)

jobs = Table(
    "jobs",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("queue", Text, nullable=False, server_default=text("'default'")),
    Column("job_type", Text, nullable=False),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("state", Text, nullable=False, server_default=text("'queued'")),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("scope", JSONB, nullable=True),
    Column("is_current", Boolean, nullable=False, server_default=text("false")),
    Column("dedup_key", Text, nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    # The default comes from pgqueue.settings (max_attempts), computed by the server.
    Column("max_attempts", Integer, nullable=False, server_default=FetchedValue()),
    Column("run_after", _TZ, nullable=False, server_default=text("now()")),
    Column("locked_by", Text, nullable=True),
    Column("locked_at", _TZ, nullable=True),
    Column("started_at", _TZ, nullable=True),
    Column("finished_at", _TZ, nullable=True),
    Column("pipeline_id", PG_UUID(as_uuid=True), nullable=True),
    Column("parent_id", BigInteger, nullable=True),
    Column("next_jobs", JSONB, nullable=True),
    Column("result", JSONB, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("progress", JSONB, nullable=True),
    Column("created_at", _TZ, nullable=False, server_default=text("now()")),
    # Internal fan-in counter (unfinished dependencies of a waiting job); read-only here.
    Column("pending_deps", Integer, nullable=False, server_default=text("0")),
    # Internal: queued behind an older job of its scope, out of the claim index; read-only here.
    Column("scope_blocked", Boolean, nullable=False, server_default=text("false")),
    # Internal: queued in a paused queue, out of the claim index; read-only here.
    Column("queue_paused", Boolean, nullable=False, server_default=text("false")),
)

settings = Table(
    "settings",
    metadata,
    Column("name", Text, primary_key=True),
    Column("value", Text, nullable=False),
)

_COMMENT_ON = re.compile(
    r"COMMENT ON (?:TABLE|COLUMN) pgqueue\.([\w.]+) IS\s+((?:'(?:[^']|'')*'\s*)+);"
)
_LITERAL = re.compile(r"'((?:[^']|'')*)'")


def _copy_comments(*tables: Table) -> None:
    """Give the tables and columns the ``COMMENT ON`` text of sql/, the one place it is
    written: alembic's autogenerate compares comments, and would otherwise propose
    rewriting every one the database holds."""
    sql = "".join(path.read_text() for path in sorted(sql_dir().glob("*.sql")))
    comments = {
        name: "".join(part.replace("''", "'") for part in _LITERAL.findall(literals))
        for name, literals in _COMMENT_ON.findall(sql)
    }
    for table in tables:
        table.comment = comments.get(table.name)
        for column in table.columns:
            column.comment = comments.get(f"{table.name}.{column.name}")


_copy_comments(jobs, settings)

#: Keyword options of ``pgqueue.enqueue`` besides job_type and payload, with their SQL types.
ENQUEUE_OPTIONS: Mapping[str, TypeEngine[Any]] = {
    "queue": Text(),
    "scope": JSONB(),
    "dedup_key": Text(),
    "run_after": DateTime(timezone=True),
    "priority": Integer(),
    "max_attempts": Integer(),
    "pipeline_id": PG_UUID(as_uuid=True),
    "next_jobs": JSONB(),
    "depends_on": ARRAY(BigInteger()),
}


# Passed as JSON text and cast in the statement, encoded by pgqueue.dsn.dumps (the same
# encoding App.enqueue uses: dates, UUIDs, no NaN), not by the engine's json serializer.
_JSON_OPTIONS = frozenset({"scope", "next_jobs"})


def _check_target(api: str, target: object, wrong_kind: tuple[type, ...], other: str) -> None:
    """A wrong target failed deep inside ("'Engine' object has no attribute 'execute'", an
    un-awaited coroutine, MissingGreenlet): say what to pass. Anything else is taken as a
    session or connection (scoped sessions are proxies, not subclasses)."""
    kind = type(target).__name__
    if isinstance(target, wrong_kind):
        raise TypeError(f"pgqueue.sqla.{api} got {kind}: use pgqueue.sqla.{other}")
    if isinstance(target, Engine | AsyncEngine):
        raise TypeError(
            f"pgqueue.sqla.{api} got {kind}: pass a Session or a Connection of your"
            " transaction (engine.begin()), not an engine"
        )


def enqueue_statement(
    job_type: str,
    payload: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    delay: timedelta | float | None = None,
) -> tuple[TextClause, dict[str, Any]]:
    """The ``pgqueue.enqueue`` call and its values, for a session or connection to execute.
    ``delay`` (seconds or a timedelta, from 0 to 100 years) counts on the database's clock
    from the statement; ``run_after`` wins when both are given (as in ``App.enqueue``)."""
    unknown = sorted(set(options) - set(ENQUEUE_OPTIONS))
    if unknown:
        raise TypeError(f"enqueue() got unknown option(s): {', '.join(unknown)}")
    text_option("job_type", job_type)
    types: dict[str, TypeEngine[Any]] = {"job_type": Text()}
    values: dict[str, Any] = {"job_type": job_type}
    arguments = ["job_type => :job_type"]
    if payload is not None:
        if not isinstance(payload, Mapping):
            raise TypeError(
                f"payload must be a mapping (a JSON object), got {type(payload).__name__}"
            )
        types["payload"], values["payload"] = Text(), dumps(dict(payload), "payload")
        arguments.append("payload => CAST(:payload AS jsonb)")
    for name, value in options.items():
        if value is None:  # keep the SQL default (queue 'default', settings' max_attempts...)
            continue
        if name == "depends_on":
            value = [as_job_id(item) for item in job_id_list("depends_on", value)]
        elif name == "next_jobs":
            value = [spec_dict(spec) for spec in spec_list("next_jobs", value)]
        elif name == "pipeline_id":
            value = UUID(pipeline_id_text(value))
        elif name == "run_after":
            value = run_after_option(value)
        elif name in ("priority", "max_attempts"):
            value = int_option(name, value)
        elif name in ("queue", "dedup_key"):
            value = text_option(name, value)
        if name in _JSON_OPTIONS:
            types[name], values[name] = Text(), dumps(value, name)
            arguments.append(f"{name} => CAST(:{name} AS jsonb)")
        else:
            types[name], values[name] = ENQUEUE_OPTIONS[name], value
            arguments.append(f"{name} => :{name}")
    if delay is not None:
        delay = as_delay("delay", delay)
        if options.get("run_after") is None:
            types["delay"], values["delay"] = Interval(), delay
            arguments.append("run_after => statement_timestamp() + :delay")
    statement = text(f"SELECT pgqueue.enqueue({', '.join(arguments)})").bindparams(
        *(bindparam(name, type_=type_) for name, type_ in types.items())
    )
    return statement, values


def enqueue(
    session_or_connection: Session | Connection,
    job_type: str,
    payload: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
    scope: Any = None,
    dedup_key: str | None = None,
    run_after: datetime | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
    pipeline_id: UUID | None = None,
    next_jobs: list[Mapping[str, Any]] | None = None,
    depends_on: list[int] | None = None,
    delay: timedelta | float | None = None,
) -> int:
    """Call ``pgqueue.enqueue`` in the caller's (sync) transaction; return the job id.

    Nothing is committed here: the job exists once the caller's transaction
    commits, and vanishes with it on rollback. ``None`` options keep the SQL defaults, not
    an App's registered queue and ``max_attempts`` for the type: ``App.enqueue_sync``
    applies those. ``delay`` as in ``App.enqueue``.
    """
    _check_target(
        "enqueue",
        session_or_connection,
        (AsyncSession, AsyncConnection, async_scoped_session),
        "enqueue_async",
    )
    statement, values = enqueue_statement(
        job_type,
        payload,
        {
            "queue": queue,
            "scope": scope,
            "dedup_key": dedup_key,
            "run_after": run_after,
            "priority": priority,
            "max_attempts": max_attempts,
            "pipeline_id": pipeline_id,
            "next_jobs": next_jobs,
            "depends_on": depends_on,
        },
        delay,
    )
    return int(session_or_connection.execute(statement, values).scalar_one())


async def enqueue_async(
    session_or_connection: AsyncSession | AsyncConnection,
    job_type: str,
    payload: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
    scope: Any = None,
    dedup_key: str | None = None,
    run_after: datetime | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
    pipeline_id: UUID | None = None,
    next_jobs: list[Mapping[str, Any]] | None = None,
    depends_on: list[int] | None = None,
    delay: timedelta | float | None = None,
) -> int:
    """:func:`enqueue` for ``AsyncSession`` / ``AsyncConnection`` (``App.enqueue`` takes
    them too, and applies the App's registered defaults)."""
    _check_target(
        "enqueue_async", session_or_connection, (Session, Connection, scoped_session), "enqueue"
    )
    statement, values = enqueue_statement(
        job_type,
        payload,
        {
            "queue": queue,
            "scope": scope,
            "dedup_key": dedup_key,
            "run_after": run_after,
            "priority": priority,
            "max_attempts": max_attempts,
            "pipeline_id": pipeline_id,
            "next_jobs": next_jobs,
            "depends_on": depends_on,
        },
        delay,
    )
    result = await session_or_connection.execute(statement, values)
    return int(result.scalar_one())
