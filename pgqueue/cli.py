"""The ``pgqueue`` command line: migrate, run a worker, enqueue and inspect jobs.

Every command resolves its DSN the same way (``--dsn``, else ``$PGQUEUE_DSN``, else the libpq
``PG*`` variables) and turns the errors a user can fix (unreachable database, unmigrated
schema, bad ``MODULE:APP``, bad JSON) into one line on stderr instead of a traceback.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import anyio
import asyncpg
import click

from pgqueue.app import App, LifespanError
from pgqueue.dsn import INT4_MAX, INT4_MIN, INT8_MAX, DsnError, check_dsn, connect, resolve_dsn
from pgqueue.error_line import error_line
from pgqueue.queues import pause_queue, paused_queues, resume_queue, set_queue_limit
from pgqueue.worker.retry import POOLER_HINT, first_line, is_pooler_error
from pgqueue.worker.worker import MAX_CONCURRENCY

P = ParamSpec("P")
T = TypeVar("T")

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks", "y": "years"}
MAX_DELAY = 100 * 365.25 * 86400  # seconds; timestamps past year 9999 break Python readers


class DsnOption:
    """What the group passes down to its commands.

    The DSN is checked when a command reads it, not when the group resolves it: a bad
    ``$PGQUEUE_DSN`` must not stop a command given a good ``--dsn`` after its name.
    """

    def __init__(self, dsn: str | None) -> None:
        self._dsn = resolve_dsn(dsn)

    @property
    def dsn(self) -> str | None:
        if self._dsn is None:
            return None  # libpq's variables: read (and $PGPORT checked) when a command connects
        try:
            check_dsn(self._dsn)
        except DsnError as exc:
            raise click.BadParameter(str(exc), param_hint="--dsn / $PGQUEUE_DSN") from None
        return self._dsn

    @dsn.setter
    def dsn(self, value: str | None) -> None:
        self._dsn = resolve_dsn(value)


class InputError(click.ClickException):
    """Input the database refused (a bad queue name, an unknown dependency): like a bad
    argument, exit status 2, and the message is PostgreSQL's, which names the problem."""

    exit_code = 2


# What pgqueue's functions raise for bad input (sql/03_enqueue.sql and friends): class 22,
# data exceptions such as invalid_parameter_value, and depends_on naming an unknown job.
_INPUT_ERRORS = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.ForeignKeyViolationError,
    DsnError,  # $PGPORT, when no DSN is given
)


def _friendly_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn the errors a user can act on into ``click`` errors: one line, exit status 1
    (2 for input the database refused)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:
            message = _user_error(exc)
            if message is None:
                raise
            if isinstance(exc, _INPUT_ERRORS):
                raise InputError(str(exc)) from None
            raise click.ClickException(message) from None

    return wrapper


def _user_error(exc: BaseException) -> str | None:
    """A one-line message for errors the user can fix, looking through wrapped causes.

    Alembic and SQLAlchemy wrap the driver's error two levels deep; what the user needs is
    the innermost "connection refused" or "database does not exist".
    """
    from pgqueue.migrate import SchemaError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, LifespanError):
            return None  # the app's own error: its traceback says more than one line
        if isinstance(seen, SchemaError | DsnError):
            return str(seen)
        if isinstance(
            seen, asyncpg.exceptions.UndefinedTableError | asyncpg.exceptions.UndefinedFunctionError
        ):
            return f"{seen} (is the database migrated? run `pgqueue migrate`)"
        if is_pooler_error(seen):
            return f"database error: {first_line(seen)} ({POOLER_HINT})"
        if isinstance(seen, asyncpg.exceptions.InsufficientPrivilegeError):
            return f"database error: {seen} (docs/roles.md gives the grants each role needs)"
        if isinstance(seen, asyncpg.exceptions.PostgresError):
            return f"database error: {seen}"
        if isinstance(seen, OSError | asyncpg.exceptions.InterfaceError | TimeoutError):
            return f"cannot connect to PostgreSQL: {str(seen) or type(seen).__name__}"
        seen = seen.__cause__ or seen.__context__
    return None


def _run(main: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(main)


async def _with_connection(dsn: str | None, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Open one connection, refuse an unmigrated schema, run ``fn``, close."""
    from pgqueue.migrate import check_schema

    conn = await connect(dsn, application_name="pgqueue-cli")
    try:
        await check_schema(conn)
        return await fn(conn)
    finally:
        await conn.close()


def _json_arg(name: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=name) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from None
    if _holds_nul(value):  # PostgreSQL's own refusal is two lines about escape sequences
        raise click.BadParameter(
            "a string in it holds \\u0000 (NUL), which PostgreSQL's jsonb cannot store",
            param_hint=name,
        )
    return value


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def _finite(name: str, value: float | None) -> float | None:
    """click's FloatRange lets NaN through (it compares false with both bounds)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds", param_hint=name)
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: a float, but none PostgreSQL's jsonb can hold
        raise ValueError(f"not valid JSON: {text} is out of range for a JSON number")
    return value


def _no_constant(name: str) -> Any:
    """Python's json reads NaN and Infinity; JSON (and jsonb) has no such numbers."""
    raise ValueError(f"not valid JSON: {name} is not a JSON number")


def parse_duration(text: str) -> str:
    """``7d``/``12h``/``30m``/``45s``/``2w`` to a PostgreSQL interval; anything else as is.

    A number without a unit is refused: PostgreSQL reads ``30`` as thirty seconds, so
    ``prune --older-than 30`` meant as days would delete nearly every finished job. So is a
    one-letter unit other than these (PostgreSQL reads ``1M`` as a minute, not a month).
    """
    # Every way PostgreSQL reads a bare number: "+30", "30.", ".5" are seconds too.
    match = re.fullmatch(r"\s*\+?(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]?)\s*", text)
    if match is None:
        return text
    number, unit = match.groups()
    number = number.rstrip(".")
    if unit != "M" and unit.lower() in _UNITS:
        return f"{number} {_UNITS[unit.lower()]}"
    raise click.BadParameter(
        f"{text.strip()!r} has no unit I know: write e.g. {number}d, {number}h, {number}m,"
        f" {number}s, {number}w or a PostgreSQL interval such as '2 days' or '1 month'",
        param_hint="--older-than",
    )


def load_app(target: str) -> App:
    """Import ``MODULE:APP`` (from the current directory too, like other app runners)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(f"expected MODULE:APP, got {target!r}", param_hint="MODULE:APP")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(
            f"cannot import module {module_name!r}: {exc}", param_hint="MODULE:APP"
        ) from None
    if not hasattr(module, attr):
        raise click.BadParameter(f"module {module_name!r} has no {attr!r}", param_hint="MODULE:APP")
    app = getattr(module, attr)
    if not isinstance(app, App):
        raise click.BadParameter(
            f"{module_name}:{attr} is a {type(app).__name__}, not a pgqueue.App",
            param_hint="MODULE:APP",
        )
    return app


def _print_table(rows: Sequence[asyncpg.Record]) -> None:
    if not rows:
        click.echo("(no rows)")
        return
    headers = list(rows[0].keys())
    cells = [[_cell(value) for value in row.values()] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return error_line(text, 60)  # a traceback's exception line, else the first line


@click.group()
@click.option(
    "--dsn",
    metavar="DSN",
    help="PostgreSQL DSN. Default: $PGQUEUE_DSN, else the libpq PG* variables.",
)
@click.version_option(package_name="pgqueue")
@click.pass_context
def main(ctx: click.Context, dsn: str | None) -> None:
    """pgqueue: a job queue that lives inside PostgreSQL."""
    ctx.obj = DsnOption(_given_dsn(dsn))


def _given_dsn(value: str | None, param_hint: str = "--dsn") -> str | None:
    """An empty --dsn is a mistake (an unset shell variable), not "use the defaults"."""
    if value is not None and not value.strip():
        raise click.BadParameter("is empty", param_hint=param_hint)
    return value


_pass_options = click.make_pass_decorator(DsnOption)


def _listen_dsn(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """--listen-dsn checked up front like --dsn: the notifier would only log its error and
    retry, and the worker would run on its poll alone."""
    hint = "--listen-dsn / $PGQUEUE_LISTEN_DSN"
    if _given_dsn(value, hint) is None:
        return None
    try:
        check_dsn(value)
    except DsnError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None
    return value


def _override_dsn(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(DsnOption).dsn = _given_dsn(value)


def pass_dsn(fn: Callable[..., T]) -> Callable[..., T]:
    """Pass the DSN options; ``--dsn`` is accepted after the command name too."""
    return click.option(
        "--dsn",
        "dsn_override",
        metavar="DSN",
        expose_value=False,
        callback=_override_dsn,
        help="PostgreSQL DSN (same as the global --dsn).",
    )(_pass_options(fn))


@main.command()
@pass_dsn
@_friendly_errors
def migrate(opts: DsnOption) -> None:
    """Create or upgrade the pgqueue schema (alembic upgrade head)."""
    from pgqueue import migrate as migrations

    migrations.upgrade(opts.dsn)
    click.echo(f"pgqueue schema at revision {migrations.HEAD_REVISION}")


@main.command()
@click.argument("target", metavar="MODULE:APP")
@click.option(
    "--queues",
    envvar="PGQUEUE_QUEUES",
    show_envvar=True,
    help="Comma-separated queues to work (default: every queue).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=MAX_CONCURRENCY),
    default=10,
    show_default=True,
    envvar="PGQUEUE_CONCURRENCY",
    show_envvar=True,
)
@click.option(
    "--grace",
    envvar="PGQUEUE_GRACE",
    show_envvar=True,
    type=click.FloatRange(min=0),
    callback=lambda _ctx, _param, value: _finite("--grace", value),
    default=30.0,
    show_default=True,
    help="Seconds running jobs get to finish after SIGTERM before they are released.",
)
@click.option(
    "--poll-interval",
    envvar="PGQUEUE_POLL_INTERVAL",
    show_envvar=True,
    type=click.FloatRange(min=0.01),
    callback=lambda _ctx, _param, value: _finite("--poll-interval", value),
    default=5.0,
    show_default=True,
    help="Safety poll, in seconds, for notifications that never arrive.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    envvar="PGQUEUE_LOG_FORMAT",
    show_envvar=True,
    help="Log lines to stderr in this format. Default: text, unless the app module configured"
    " logging (a handler on the root or the pgqueue logger): its handlers then get them.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    envvar="PGQUEUE_LOG_LEVEL",
    show_envvar=True,
    help="info (the default, unless the app set the pgqueue logger's level) logs a line per"
    " job outcome; warning keeps only failures, lost leases and faults (a busy worker"
    " spends about a third of its CPU on the per-job lines).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (same as --log-level debug).")
@click.option(
    "--listen-dsn",
    envvar="PGQUEUE_LISTEN_DSN",
    metavar="DSN",
    callback=_listen_dsn,
    help="DSN of the LISTEN connection, when the main DSN goes through a transaction-mode"
    " pooler such as PgBouncer. Default: $PGQUEUE_LISTEN_DSN, else the main DSN.",
)
@click.option(
    "--until-empty",
    is_flag=True,
    help="Exit once no job is due in its queues (and nothing it ran made one due): the"
    " backlog, then stop, e.g. from cron or CI.",
)
@pass_dsn
@_friendly_errors
def worker(
    opts: DsnOption,
    target: str,
    queues: str | None,
    concurrency: int,
    grace: float,
    poll_interval: float,
    log_format: str | None,
    log_level: str | None,
    verbose: bool,
    listen_dsn: str | None,
    until_empty: bool,
) -> None:
    """Run a worker for the handlers of MODULE:APP until SIGTERM or SIGINT (or, with
    --until-empty, until no job is due)."""
    from pgqueue.worker import Worker
    from pgqueue.worker.logs import configure_logging

    app = load_app(target)
    level = logging.DEBUG if verbose else None
    if log_level is not None and not verbose:
        level = logging.getLevelNamesMapping()[log_level.upper()]
    configure_logging(log_format, level)
    queue_list = None
    if queues is None and os.environ.get("PGQUEUE_QUEUES") == "":
        # click reads an empty variable as unset: every queue, where --queues '' is refused
        # (a deployment's PGQUEUE_QUEUES=${UNSET} would claim the jobs of every queue).
        raise click.BadParameter(
            "is set but empty: it names no queue (unset it to work every queue)",
            param_hint="PGQUEUE_QUEUES",
        )
    if queues is not None:
        queue_list = [q.strip() for q in queues.split(",") if q.strip()]
        if not queue_list:
            raise click.BadParameter(
                "names no queue (leave --queues out to work every queue)", param_hint="--queues"
            )
    runner = Worker(
        app,
        opts.dsn,
        queues=queue_list,
        concurrency=concurrency,
        grace=grace,
        poll_interval=poll_interval,
        restore_signals=False,  # the process exits next: a late signal must not abort that
        listen_dsn=listen_dsn,
        until_empty=until_empty,
    )
    _run(runner.run)


@main.command()
@click.argument("job_type")
@click.option("--payload", help="JSON object passed to the handler.")
@click.option("--queue", help="Queue (default: 'default').")
@click.option("--scope", help="JSON serialization key: jobs with equal scope run one at a time.")
@click.option("--dedup-key", help="Coalesce with a waiting/queued job that has this key.")
@click.option(
    "--delay",
    type=click.FloatRange(min=0, max=MAX_DELAY),
    callback=lambda _ctx, _param, value: _finite("--delay", value),
    help="Seconds before it may run (at most 100 years).",
)
@click.option(
    "--priority", type=click.IntRange(min=INT4_MIN, max=INT4_MAX), default=0, show_default=True
)
@click.option("--max-attempts", type=click.IntRange(min=1, max=INT4_MAX))
@pass_dsn
@_friendly_errors
def enqueue(
    opts: DsnOption,
    job_type: str,
    payload: str | None,
    queue: str | None,
    scope: str | None,
    dedup_key: str | None,
    delay: float | None,
    priority: int,
    max_attempts: int | None,
) -> None:
    """Enqueue one job and print its id."""
    payload_obj = _json_arg("--payload", payload)
    if payload is not None and not isinstance(payload_obj, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--payload")
    scope_obj = _json_arg("--scope", scope)

    async def go(conn: asyncpg.Connection) -> int:
        return await App().enqueue(
            conn,
            job_type,
            payload_obj,
            queue=queue,
            scope=scope_obj,
            dedup_key=dedup_key,
            delay=delay,
            priority=priority,
            max_attempts=max_attempts,
        )

    click.echo(_run(lambda: _with_connection(opts.dsn, go)))


@main.command()
@click.option(
    "--state",
    type=click.Choice(["waiting", "queued", "running", "succeeded", "failed", "cancelled"]),
)
@click.option("--queue")
@click.option("--job-type")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@pass_dsn
@_friendly_errors
def jobs(
    opts: DsnOption, state: str | None, queue: str | None, job_type: str | None, limit: int
) -> None:
    """List jobs, newest first."""
    sql = """
        SELECT id, queue, job_type, state, attempts, max_attempts,
               run_after::text AS run_after,  -- as text: a year past 9999 is no Python datetime
               locked_by, last_error
        FROM pgqueue.jobs
        WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR queue = $2)
          AND ($4::text IS NULL OR job_type = $4)
        ORDER BY id DESC LIMIT $3
    """
    rows = _run(
        lambda: _with_connection(opts.dsn, lambda c: c.fetch(sql, state, queue, limit, job_type))
    )
    _print_table(rows)


# One job, every column a person reads (timestamps as text: a year past 9999 is no Python
# datetime; JSON indented), and the jobs it waits for and that wait for it.
_SHOW = """
    SELECT id, queue, job_type, state, priority, attempts || '/' || max_attempts AS attempts,
           CASE WHEN state = 'waiting' THEN pending_deps END AS waiting_for,
           scope::text AS scope, is_current::text AS is_current, dedup_key, pipeline_id, parent_id,
           run_after::text AS run_after, created_at::text AS created_at,
           started_at::text AS started_at, finished_at::text AS finished_at, locked_by,
           locked_at::text AS locked_at, jsonb_pretty(payload) AS payload,
           jsonb_pretty(result) AS result, jsonb_pretty(progress) AS progress,
           jsonb_pretty(next_jobs) AS next_jobs, last_error
    FROM pgqueue.jobs WHERE id = $1
"""
_EMPTY_PRETTY = re.compile(r"([{\[])\n *([}\]])")
_PRETTY = frozenset({"payload", "result", "progress", "next_jobs"})
_SHOW_EDGES = """
    SELECT 'depends on' AS side, d.depends_on AS id, coalesce(o.state, 'pruned') AS state
    FROM pgqueue.job_dependencies d LEFT JOIN pgqueue.jobs o ON o.id = d.depends_on
    WHERE d.job_id = $1
    UNION ALL
    SELECT 'dependents', d.job_id, coalesce(o.state, 'pruned')
    FROM pgqueue.job_dependencies d LEFT JOIN pgqueue.jobs o ON o.id = d.job_id
    WHERE d.depends_on = $1
    ORDER BY 1 DESC, 2
"""


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("job_id", type=click.IntRange(min=1, max=INT8_MAX))
@pass_dsn
@_friendly_errors
def show(opts: DsnOption, job_id: int) -> None:
    """Show one job: its columns (the whole last_error, the JSON indented), the jobs it
    depends on and its dependents, with their states."""

    async def go(conn: asyncpg.Connection) -> tuple[asyncpg.Record | None, list[asyncpg.Record]]:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            return await conn.fetchrow(_SHOW, job_id), await conn.fetch(_SHOW_EDGES, job_id)

    row, edges = _run(lambda: _with_connection(opts.dsn, go))
    if row is None:
        raise click.ClickException(f"job {job_id}: no such job")
    width = max(len(name) for name in row.keys())
    for name, value in row.items():
        if value is None:
            continue
        # jsonb_pretty opens an empty object or array on one line and closes it on the next.
        # A line break in its output is never inside a string (those are escaped as \n).
        text = _EMPTY_PRETTY.sub(r"\1\2", str(value)) if name in _PRETTY else str(value)
        lines = text.splitlines() or [""]
        click.echo(f"{name.ljust(width)}  {lines[0]}")
        for line in lines[1:]:
            click.echo(f"{'':{width}}  {line}")
    for side in ("depends on", "dependents"):
        named = [f"{e['id']} ({e['state']})" for e in edges if e["side"] == side]
        if named:
            click.echo(f"{side.ljust(width)}  {', '.join(named)}")


# Queues by name, each one's states in the order a job goes through them (the view has none).
_STATS = """
    SELECT * FROM pgqueue.queue_stats
    ORDER BY queue, array_position('{waiting,queued,running,succeeded,failed,cancelled}', state)
"""


@main.command()
@pass_dsn
@_friendly_errors
def stats(opts: DsnOption) -> None:
    """Per queue and state: how many jobs, and how old the oldest ready one is; the dead job
    rows vacuum has yet to remove and the oldest snapshot that keeps it from doing so; then
    the paused queues and the limited ones, if any."""

    async def go(
        conn: asyncpg.Connection,
    ) -> tuple[list[asyncpg.Record], asyncpg.Record, list[str], list[asyncpg.Record]]:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            return (
                await conn.fetch(_STATS),
                await conn.fetchrow(_HORIZON),
                await paused_queues(conn),
                await conn.fetch(_LIMITS),
            )

    rows, horizon, paused, limits = _run(lambda: _with_connection(opts.dsn, go))
    _print_table(rows)
    click.echo(f"dead job rows: {horizon['dead']:,}")
    if horizon["kind"] is not None:
        click.echo(f"oldest snapshot: {_holder(horizon)}")
    if paused:
        click.echo(f"paused queues: {', '.join(paused)}")
    if limits:
        named = (f"{r['queue']} ({r['running']}/{r['max_running']} running)" for r in limits)
        click.echo(f"limited queues: {', '.join(named)}")


# Dead row versions of pgqueue.jobs (the statistics' count, a second or so behind) and the
# first row of pgqueue.vacuum_blockers, if any.
_HORIZON = """
SELECT coalesce((SELECT n_dead_tup FROM pg_stat_user_tables
                 WHERE relid = 'pgqueue.jobs'::regclass), 0) AS dead,
       b.kind, b.pid, b.name, b.state, b.xmin_age, b.open_for
FROM (SELECT 1) one LEFT JOIN (SELECT * FROM pgqueue.vacuum_blockers LIMIT 1) b ON true
"""


def _holder(row: asyncpg.Record) -> str:
    """``session 4242 (report, idle in transaction), open 0:05:12, 48,211 transactions old``."""
    who = row["kind"] if row["pid"] is None else f"{row['kind']} {row['pid']}"
    detail = ", ".join(part for part in (row["name"], row["state"]) if part)
    parts = [f"{who} ({detail})" if detail else who]
    if row["open_for"] is not None:
        parts.append(f"open {datetime.timedelta(seconds=int(row['open_for'].total_seconds()))}")
    parts.append(f"{row['xmin_age']:,} transactions old")
    return ", ".join(parts)


_LIMITS = """
SELECT l.queue, l.max_running,
       (SELECT count(*) FROM pgqueue.jobs j
        WHERE j.state = 'running' AND j.queue = l.queue) AS running
FROM pgqueue.queue_limits l ORDER BY l.queue
"""


def _max_running(text: str) -> int | None:
    """A number of jobs from 1 to 2**31-1, or ``none``."""
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= INT4_MAX:
        raise click.BadParameter(
            f"expected a number of jobs from 1 to {INT4_MAX}, or none; got {text!r}",
            param_hint="'MAX_RUNNING'",
        )
    return value


# Unknown options pass through as arguments, so `limit api -1` is refused as a number.
@main.command(name="limit", context_settings={"ignore_unknown_options": True})
@click.argument("queue")
@click.argument("max_running", metavar="MAX_RUNNING|none")
@pass_dsn
@_friendly_errors
def limit_(opts: DsnOption, queue: str, max_running: str) -> None:
    """Let at most MAX_RUNNING jobs of QUEUE run at once across all workers (`none`: no limit).

    Jobs running past a lowered limit finish; workers take more once fewer run.
    """
    if queue.startswith("-"):  # unknown options pass through: a mistyped one is not a queue
        raise click.UsageError(f"No such option: {queue}")
    wanted = _max_running(max_running)
    was = _run(
        lambda: _with_connection(opts.dsn, lambda conn: set_queue_limit(conn, queue, wanted))
    )
    now = "no limit" if wanted is None else f"at most {wanted} running"
    before = "no limit" if was is None else f"at most {was}"
    click.echo(f"queue {queue}: {now} (was {before})")


def _queue_action(
    name: str,
    doc: str,
    action: Callable[[asyncpg.Connection, str], Awaitable[bool]],
    done: str,
    not_done: str,
) -> None:
    """Register a command running ``action`` (pause_queue, resume_queue) for each QUEUE."""

    @main.command(name=name, help=doc)
    @click.argument("queues", nargs=-1, required=True, metavar="QUEUE...")
    @pass_dsn
    @_friendly_errors
    def command(opts: DsnOption, queues: tuple[str, ...]) -> None:
        async def go(conn: asyncpg.Connection) -> dict[str, bool]:
            # All or none: a bad name changes nothing. Every queue's pause lock first, before
            # any row (see pgqueue._lock_pause): no deadlock with another such command, nor
            # with an application transaction holding one queue's lock and a row of another.
            names = sorted(set(queues))
            async with conn.transaction():
                await conn.execute("SELECT pgqueue._lock_pause($1::text[])", names)
                return {q: await action(conn, q) for q in names}

        changed = _run(lambda: _with_connection(opts.dsn, go))
        for queue in dict.fromkeys(queues):
            click.echo(f"queue {queue}: {done if changed[queue] else not_done}")


_queue_action(
    "pause",
    "Stop workers from claiming jobs of these queues (enqueues and running jobs go on).",
    pause_queue,
    "paused",
    "paused already",
)
_queue_action(
    "resume",
    "Let workers claim jobs of these paused queues again (idle ones are woken).",
    resume_queue,
    "resumed",
    "not paused",
)


def _job_action(name: str, doc: str, takes: str) -> None:
    """Register a command calling ``pgqueue.<name>(job_id)``, which returns a boolean
    (false for a job in none of the states it ``takes``)."""

    # Unknown options pass through as arguments, so `cancel -5` is refused as an id, not as
    # "No such option".
    @main.command(name=name, help=doc, context_settings={"ignore_unknown_options": True})
    @click.argument("job_id", type=click.IntRange(min=1, max=INT8_MAX))
    @pass_dsn
    @_friendly_errors
    def command(opts: DsnOption, job_id: int) -> None:
        async def go(conn: asyncpg.Connection) -> tuple[bool, str | None]:
            done = await conn.fetchval(f"SELECT pgqueue.{name}($1)", job_id)
            # A statement of its own: the state now, after any lock the call waited for.
            state = await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job_id)
            return bool(done), state

        done, state = _run(lambda: _with_connection(opts.dsn, go))
        if not done:
            why = "no such job" if state is None else f"it is {state}; {name} takes {takes}"
            raise click.ClickException(f"job {job_id}: nothing to {name} ({why})")
        click.echo(f"job {job_id}: {name} done")


_job_action(
    "retry",
    "Put a failed or cancelled job back in the queue, attempts reset.",
    "failed or cancelled jobs",
)
_job_action(
    "cancel",
    "Cancel a waiting or queued job (its dependents are cancelled too); a running one is not "
    "interrupted (see abort).",
    "waiting or queued jobs",
)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("job_id", type=click.IntRange(min=1, max=INT8_MAX))
@pass_dsn
@_friendly_errors
def abort(opts: DsnOption, job_id: int) -> None:
    """Stop a job wherever it is: cancel it if it has not started; if it runs, its worker
    cancels the handler and the job ends cancelled, not retried (unless it succeeds first)."""

    async def go(conn: asyncpg.Connection) -> tuple[str | None, str | None]:
        done = await conn.fetchval("SELECT pgqueue.abort($1)", job_id)
        state = await conn.fetchval("SELECT state FROM pgqueue.jobs WHERE id = $1", job_id)
        return done, state

    done, state = _run(lambda: _with_connection(opts.dsn, go))
    if done is None:
        why = "no such job" if state is None else f"it is {state} already"
        raise click.ClickException(f"job {job_id}: nothing to abort ({why})")
    if done == "cancelled":
        click.echo(f"job {job_id}: cancelled")
    else:
        click.echo(f"job {job_id}: running; its worker was asked to stop it (it ends cancelled)")


@main.command()
@pass_dsn
@_friendly_errors
def recover(opts: DsnOption) -> None:
    """Requeue running jobs whose lease is older than stale_after (workers do this too)."""
    rows = _run(
        lambda: _with_connection(
            opts.dsn, lambda c: c.fetch("SELECT id FROM pgqueue.recover_stale() AS id")
        )
    )
    ids = [row["id"] for row in rows]
    click.echo(f"recovered {len(ids)} job(s)" + (f": {', '.join(map(str, ids))}" if ids else ""))


@main.command()
@click.option(
    "--older-than",
    required=True,
    metavar="DURATION",
    help="7d, 12h, 30m, 45s, 2w, or any PostgreSQL interval such as '1 day 2 hours'.",
)
@pass_dsn
@_friendly_errors
def prune(opts: DsnOption, older_than: str) -> None:
    """Delete finished jobs whose finished_at is older than DURATION."""
    interval = parse_duration(older_than)

    async def go(conn: asyncpg.Connection) -> int:
        try:
            count: int = await conn.fetchval("SELECT pgqueue.prune($1::text::interval)", interval)
        except asyncpg.exceptions.InvalidDatetimeFormatError:
            raise click.BadParameter(
                f"not a duration: {older_than!r}", param_hint="--older-than"
            ) from None
        return count

    click.echo(f"pruned {_run(lambda: _with_connection(opts.dsn, go))} job(s)")


@main.command()
@pass_dsn
@_friendly_errors
def demo(opts: DsnOption) -> None:
    """Run the emissions pipeline demo (on an embedded PostgreSQL when no DSN is set)."""
    try:
        from pgqueue.demo import run_demo  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise click.ClickException("the demo is not available in this installation") from None
    run_demo(opts.dsn)


if __name__ == "__main__":
    main()
