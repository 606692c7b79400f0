"""The handler registry and the enqueue API applications call.

An :class:`App` is only a registry: it holds no connection. Workers read it to find
handlers, and applications use it to enqueue, so that a job type's queue and
``max_attempts`` are declared once, next to its handler.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pgqueue.dsn import INT4_MAX, ConnOrPool, as_aware, asyncpg_target, dumps, id_array
from pgqueue.job import (
    Job,
    Spec,
    SpecLike,
    as_delay,
    int_option,
    job_id_list,
    normal_spec,
    pipeline_id_text,
    run_after_option,
    spec_dict,
    spec_list,
    text_option,
)
from pgqueue.pipeline import (
    _ENQUEUE_MANY_SQLA,
    Pipeline,
    PipelineStatus,
    _is_sqlalchemy,
    cancel_pipeline,
    pipeline_status,
)
from pgqueue.schedule import MAX_EVERY, Schedule

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.orm import Session
    from sqlalchemy.sql.elements import TextClause

Handler = Callable[[Job], Awaitable[Any]] | Callable[[Job], Any]
# A retry delay: fixed (seconds or a timedelta), or a function of the failed attempt's number.
Backoff = float | datetime.timedelta | Callable[[int], float | datetime.timedelta]
H = TypeVar("H", bound=Handler)
# What app.lifespan registers, and what it keeps of it.
LifespanFunction = (
    Callable[[], AsyncIterator[None]] | Callable[[], AbstractAsyncContextManager[Any]]
)
Lifespan = Callable[[], AbstractAsyncContextManager[Any]]
L = TypeVar("L", bound=LifespanFunction)


# Every parameter is always passed, by name: one prepared statement for every call.
# JSON goes as text and is cast in SQL so that any connection works, with or without codecs.
_ENQUEUE_SQL = """
SELECT pgqueue.enqueue(
    job_type => $1, payload => $2::text::jsonb, queue => $3, scope => $4::text::jsonb,
    dedup_key => $5, run_after => coalesce($6::timestamptz, statement_timestamp() + $7::interval),
    priority => $8, max_attempts => $9, pipeline_id => $10::uuid,
    next_jobs => $11::text::jsonb, depends_on => $12::text::bigint[])
"""
_ENQUEUE_MANY_SQL = "SELECT id FROM pgqueue.enqueue_many($1::text::jsonb) AS id"
# The typed fast path. Payloads and scopes travel as one JSON array each (one json.dumps
# for the whole batch is several times cheaper than one per job) and are split in SQL;
# a JSON null payload means the default, as in a spec. The ids come back as one array (in
# the function's order: a single function scan feeds array_agg), several times cheaper to
# read than one record per job. Only text and text[] cross the wire: asyncpg looks every
# other array type up in the catalog (~10 ms) on each new connection (see dsn.id_array).
_ENQUEUE_ROWS_SQL = """
SELECT array_agg(id)::text FROM pgqueue.enqueue_many(
    $1::text[],
    (SELECT array_agg(nullif(e, 'null') ORDER BY i)
     FROM jsonb_array_elements($2::text::jsonb) WITH ORDINALITY AS a(e, i)),
    $3::text[], $4::text::int[], $5::text::int[], $6::text[]::timestamptz[],
    (SELECT array_agg(e ORDER BY i)
     FROM jsonb_array_elements($7::text::jsonb) WITH ORDINALITY AS a(e, i))
) AS id
"""


def _is_int4(value: object) -> bool:
    """An int (not a bool) that fits PostgreSQL's int4 (the spec path refuses the rest)."""
    return type(value) is int and abs(value) <= INT4_MAX


def _timedelta(
    name: str, value: datetime.timedelta | float | None, limit: float, expected: str
) -> datetime.timedelta | None:
    """Seconds (an int or a float, within ``limit``) or a timedelta, as a timedelta. A bool
    is an int to Python: True would be one second."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be seconds or a timedelta, got {value!r}")
    if isinstance(value, int | float):
        if not (math.isfinite(value) and abs(value) <= limit):
            raise ValueError(f"{name} must be {expected}, got {value!r}")
        return datetime.timedelta(seconds=value)
    if value is not None and not isinstance(value, datetime.timedelta):
        raise TypeError(f"{name} must be seconds or a timedelta, got {value!r}")
    return value


# Spec keys the typed path carries; a spec with any other key takes the spec (jsonb) path.
_PLAIN_KEYS = frozenset(
    {"job_type", "payload", "queue", "priority", "max_attempts", "run_after", "scope"}
)


@dataclass(frozen=True, slots=True)
class JobType:
    """A registered handler and the defaults it was declared with."""

    name: str
    handler: Handler
    queue: str
    max_attempts: int | None
    timeout: float | None
    # The delay before the retry of a failed attempt, from its number (1 for the first);
    # None: the settings' exponential backoff.
    backoff: Callable[[int], datetime.timedelta | float] | None = None
    # Async handlers run on the event loop; plain ``def`` ones in a worker thread. Decided
    # once at registration: the inspection costs more than a no-op job.
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        call = getattr(self.handler, "__call__", None)  # noqa: B004 - async callable objects
        is_async = inspect.iscoroutinefunction(self.handler) or inspect.iscoroutinefunction(call)
        object.__setattr__(self, "is_async", is_async)


class LifespanError(Exception):
    """A lifespan of the app (:meth:`App.lifespan`) raised while a worker set it up; its
    error is the cause. The worker claimed nothing."""


class App:
    """A set of job handlers, declared with :meth:`job`."""

    def __init__(self) -> None:
        self.job_types: dict[str, JobType] = {}
        self.schedules: dict[str, Schedule] = {}
        self.lifespans: list[Lifespan] = []

    def lifespan(self, fn: L) -> L:
        """Register what a worker sets up before its first job and tears down after its
        last: an async generator function (code before its ``yield`` runs at start, the
        rest at the stop, as in ``contextlib.asynccontextmanager``), or a function that
        returns an async context manager. Neither takes arguments.

        Each worker run enters them in registration order, in its own event loop, once
        the database checks passed and before it claims anything, and leaves them in
        reverse after every outcome is written: resources made there (a database engine,
        an HTTP client) belong to the loop that runs the handlers, and one that fails to
        set up stops the worker before it claims a job.
        """
        if inspect.isasyncgenfunction(fn):
            self.lifespans.append(contextlib.asynccontextmanager(fn))
        elif callable(fn) and not inspect.iscoroutinefunction(fn):
            self.lifespans.append(cast("Lifespan", fn))
        else:
            raise TypeError(
                "app.lifespan takes an async generator function (set up, yield, tear down) or"
                f" a function returning an async context manager, got {fn!r}"
            )
        return fn

    def job(
        self,
        name: str,
        *,
        queue: str = "default",
        max_attempts: int | None = None,
        timeout: float | None = None,
        backoff: Backoff | None = None,
    ) -> Callable[[H], H]:
        """Register the decorated function as the handler of ``name``.

        ``queue`` and ``max_attempts`` become the defaults of :meth:`enqueue` for this type;
        ``timeout`` (seconds) fails an attempt that runs longer. ``backoff`` is how long a
        failed attempt waits before its retry: seconds or a timedelta, or a (quick, plain)
        function of the attempt's number (1 for the first) that returns one, e.g.
        ``lambda n: 30 * n``; default: the exponential backoff of ``pgqueue.settings``, with
        jitter.
        """
        if not name:
            raise ValueError("job name must not be empty")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if timeout is not None and not timeout > 0:  # NaN compares false with everything
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        if inspect.iscoroutinefunction(backoff):
            raise TypeError("backoff must be a plain function of the attempt number, not async")
        if backoff is None or callable(backoff):
            delay = backoff
        else:
            fixed = as_delay("backoff", backoff)
            delay = lambda attempt: fixed  # noqa: E731

        def register(handler: H) -> H:
            if name in self.job_types:
                raise ValueError(f"job type {name!r} is already registered")
            self.job_types[name] = JobType(name, handler, queue, max_attempts, timeout, delay)
            return handler

        return register

    def periodic(
        self,
        job_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        cron: str | None = None,
        every: datetime.timedelta | float | None = None,
        timezone: str = "UTC",
        catch_up: bool = False,
        name: str | None = None,
        queue: str | None = None,
        scope: Any = None,
        dedup_key: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
    ) -> Schedule:
        """Enqueue ``job_type`` on a schedule: ``cron`` (five fields, minute resolution, in
        ``timezone``) or ``every`` (seconds or a timedelta, counted from the Unix epoch).

        Every worker running this App enqueues the ticks, and the database makes each tick
        one job, ``run_after`` its tick. A tick that no worker was running for is skipped,
        not made up later, unless ``catch_up``: then a worker that starts (or falls behind)
        enqueues the latest tick it missed, once, late; older missed ticks stay skipped, and
        a schedule that never enqueued a tick has none to make up. ``name`` (default: the
        job type) names the schedule in
        ``pgqueue.periodic``; two schedules of one type need two names. A ``dedup_key``
        makes a tick coalesce into its predecessor while that one is still pending.
        """
        every = _timedelta("every", every, MAX_EVERY.total_seconds(), "from 1 second to 100 years")
        schedule = Schedule(
            name=job_type if name is None else name,
            spec=Spec(
                job_type,
                payload,
                queue=queue,
                scope=scope,
                dedup_key=dedup_key,
                priority=priority,
                max_attempts=max_attempts,
            ),
            cron=cron,
            every=every,
            timezone=timezone,
            catch_up=catch_up,
        )
        if schedule.name in self.schedules:
            raise ValueError(
                f"a schedule named {schedule.name!r} is already registered (pass name=...)"
            )
        self.schedules[schedule.name] = schedule
        return schedule

    def queues(self) -> list[str]:
        """The queues named by registered handlers and schedules, sorted."""
        scheduled = {s.spec.queue for s in self.schedules.values() if s.spec.queue is not None}
        return sorted({jt.queue for jt in self.job_types.values()} | scheduled)

    async def enqueue(
        self,
        conn_or_pool: ConnOrPool | AsyncSession | AsyncConnection,
        job_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        scope: Any = None,
        dedup_key: str | None = None,
        run_after: datetime.datetime | None = None,
        delay: datetime.timedelta | float | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        pipeline_id: uuid.UUID | str | None = None,
        next_jobs: Sequence[Mapping[str, Any]] | None = None,
        depends_on: Sequence[int] | None = None,
    ) -> int:
        """Enqueue one job through ``pgqueue.enqueue`` and return its id.

        ``conn_or_pool`` is an asyncpg connection or pool, or a SQLAlchemy ``AsyncSession``
        or ``AsyncConnection`` (:meth:`enqueue_sync` takes the synchronous ones). Runs on the
        caller's connection, so inside the caller's transaction the job appears exactly when
        that transaction commits. ``delay`` (seconds or a timedelta, from 0 to 100 years) is
        measured on the database clock from this call (not from the start of the caller's
        transaction); ``run_after`` wins when both are given.
        """
        if _is_sqlalchemy(conn_or_pool):
            statement, values = self._enqueue_statement(job_type, payload, locals())
            result = await conn_or_pool.execute(statement, values)
            return int(result.scalar_one())
        conn_or_pool = _asyncpg_only("app.enqueue", conn_or_pool)
        job_type = text_option("job_type", job_type)  # type: ignore[assignment]
        queue, dedup_key = text_option("queue", queue), text_option("dedup_key", dedup_key)
        registered = self.job_types.get(job_type)
        run_after = run_after_option(run_after)
        priority, max_attempts = (
            int_option("priority", priority),
            int_option("max_attempts", max_attempts),
        )
        if queue is None:
            queue = registered.queue if registered else "default"
        if max_attempts is None and registered is not None:
            max_attempts = registered.max_attempts
        # As Snooze and the CLI: a negative delay jumped the job ahead of older ones, and a
        # run_after past year 9999 cannot be read back into a Python datetime.
        delay = None if delay is None else as_delay("delay", delay)
        job_id: int = await conn_or_pool.fetchval(
            _ENQUEUE_SQL,
            job_type,
            dumps(
                {}
                if payload is None
                else dict(payload)
                if isinstance(payload, Mapping)
                else payload,
                "payload",
            ),
            queue,
            None if scope is None else dumps(scope, "scope"),
            dedup_key,
            run_after,
            delay,
            priority,
            max_attempts,
            pipeline_id_text(pipeline_id),
            None
            if next_jobs is None
            else dumps(
                [self.with_defaults(s) for s in spec_list("next_jobs", next_jobs)], "next_jobs"
            ),
            None if depends_on is None else id_array(job_id_list("depends_on", depends_on)),
        )
        return job_id

    def enqueue_sync(
        self,
        session_or_connection: Session | Connection,
        job_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        scope: Any = None,
        dedup_key: str | None = None,
        run_after: datetime.datetime | None = None,
        delay: datetime.timedelta | float | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        pipeline_id: uuid.UUID | str | None = None,
        next_jobs: Sequence[Mapping[str, Any]] | None = None,
        depends_on: Sequence[int] | None = None,
    ) -> int:
        """:meth:`enqueue` in a synchronous SQLAlchemy ``Session`` or ``Connection`` of the
        caller's transaction (psycopg, psycopg2; or the one ``AsyncSession.run_sync`` hands
        its function)."""
        from sqlalchemy import Engine

        if _is_sqlalchemy(session_or_connection) or isinstance(session_or_connection, Engine):
            raise TypeError(
                "app.enqueue_sync takes a SQLAlchemy Session or Connection of your"
                f" transaction, got {type(session_or_connection).__name__}"
                + ("" if isinstance(session_or_connection, Engine) else " (use await app.enqueue)")
            )
        if not hasattr(session_or_connection, "execute") or hasattr(
            session_or_connection, "fetchval"
        ):
            raise TypeError(
                "app.enqueue_sync takes a SQLAlchemy Session or Connection, got"
                f" {type(session_or_connection).__name__}"
                + (" (use await app.enqueue)" if hasattr(session_or_connection, "fetchval") else "")
            )
        statement, values = self._enqueue_statement(job_type, payload, locals())
        return int(session_or_connection.execute(statement, values).scalar_one())

    def _enqueue_statement(
        self, job_type: str, payload: Mapping[str, Any] | None, given: Mapping[str, Any]
    ) -> tuple[TextClause, dict[str, Any]]:
        """The SQLAlchemy statement of an enqueue with this App's defaults for the type."""
        from pgqueue.sqla import ENQUEUE_OPTIONS, enqueue_statement

        options = {name: given[name] for name in ENQUEUE_OPTIONS}
        registered = self.job_types.get(job_type) if isinstance(job_type, str) else None
        if options["queue"] is None:
            options["queue"] = registered.queue if registered else None
        if options["max_attempts"] is None and registered is not None:
            options["max_attempts"] = registered.max_attempts
        if options["next_jobs"] is not None:
            options["next_jobs"] = [
                self.with_defaults(s) for s in spec_list("next_jobs", options["next_jobs"])
            ]
        return enqueue_statement(job_type, payload, options, given["delay"])

    async def enqueue_many(
        self, conn_or_pool: ConnOrPool | AsyncSession | AsyncConnection, specs: Sequence[SpecLike]
    ) -> list[int]:
        """Enqueue many jobs in one round trip through ``pgqueue.enqueue_many``.

        Each spec has the keys of ``pgqueue.enqueue``'s parameters (``job_type`` required);
        registered types get their declared queue and max_attempts unless the spec says
        otherwise. Returns the ids in spec order. One notification per queue is sent.
        Plain specs go as typed arrays to ``pgqueue.enqueue_many``'s array form, which is
        cheaper per job than taking JSON specs apart; the rows are the same either way.
        ``conn_or_pool`` as in :meth:`enqueue` (a SQLAlchemy session's specs go as JSON).
        """
        if _is_sqlalchemy(conn_or_pool):
            from sqlalchemy import text

            full = [self.with_defaults(spec) for spec in spec_list("specs", specs)]
            if not full:
                return []
            result = await conn_or_pool.execute(
                text(_ENQUEUE_MANY_SQLA), {"specs": dumps(full, "specs")}
            )
            return [int(i) for i in result.scalars().all()]
        conn_or_pool = _asyncpg_only("app.enqueue_many", conn_or_pool)
        # One spec (a dict: its keys were taken for specs) or a generator (no len) is named.
        specs = spec_list("specs", specs)
        if not specs:
            return []
        columns = self._plain_columns(specs)
        if columns is not None:
            ids: str | None = await conn_or_pool.fetchval(_ENQUEUE_ROWS_SQL, *columns)
            return [int(i) for i in ids[1:-1].split(",")] if ids else []
        rows = await conn_or_pool.fetch(
            _ENQUEUE_MANY_SQL, dumps([self.with_defaults(spec) for spec in specs], "specs")
        )
        return [row["id"] for row in rows]

    def _plain_columns(self, specs: Sequence[SpecLike]) -> tuple[Any, ...] | None:
        """The specs as the typed ``enqueue_many`` overload's arguments, or None.

        None when any spec needs the spec path: another key (dedup_key, depends_on, key/after,
        next_jobs, pipeline_id, or a typo the spec path reports), or a value the typed
        columns would read differently (a non-string job_type or queue, a non-int priority or
        max_attempts, a run_after that is not a timezone-aware datetime). The values the
        typed path does take are checked by the SQL function itself, with the spec path's
        messages. A column that is default for every job is sent as NULL.
        """
        n = len(specs)
        types: list[str] = []
        payloads: list[Any] = []
        queues: list[str | None] = []
        priorities: list[int | None] = []
        attempts: list[int | None] = []
        run_afters: list[datetime.datetime | None] = []
        scopes: list[Any] = []
        registry = self.job_types
        # What with_defaults and normal_spec do, written out: this loop runs once per spec of
        # a 10,000-job call, and a copy of each spec was most of its cost.
        for given in specs:
            if type(given) is not dict:
                if not isinstance(given, Mapping):
                    return None  # a Spec object takes the spec path (with_defaults names others)
                given = dict(given)
            if not given.keys() <= _PLAIN_KEYS:
                return None
            get = given.get
            job_type = get("job_type")
            if type(job_type) is not str:
                return None
            queue = get("queue")
            max_attempts = get("max_attempts")
            if queue is None or max_attempts is None:
                registered = registry.get(job_type)
                if registered is not None:
                    if queue is None:
                        queue = registered.queue
                    if max_attempts is None:
                        max_attempts = registered.max_attempts
            priority = get("priority")
            run_after = get("run_after")
            if run_after is not None:
                if not isinstance(run_after, datetime.datetime):
                    return None
                run_after = as_aware(run_after)
            if not (
                (queue is None or type(queue) is str)
                and (priority is None or _is_int4(priority))
                and (max_attempts is None or _is_int4(max_attempts))
            ):
                return None
            types.append(job_type)
            payloads.append(get("payload"))
            queues.append(queue)
            priorities.append(priority)
            attempts.append(max_attempts)
            run_afters.append(run_after)
            scopes.append(get("scope"))

        def column(values: list[Any]) -> list[Any] | None:
            return None if values.count(None) == n else values

        def ints(values: list[int | None]) -> str | None:
            if values.count(None) == n:
                return None
            return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"

        return (
            types,
            None if payloads.count(None) == n else dumps(payloads, "a spec's payload"),
            column(queues),
            ints(priorities),
            ints(attempts),
            None if run_afters.count(None) == n else [v and v.isoformat() for v in run_afters],
            None if scopes.count(None) == n else dumps(scopes, "a spec's scope"),
        )

    def spec(
        self,
        job_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        scope: Any = None,
        dedup_key: str | None = None,
        run_after: datetime.datetime | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        key: str | None = None,
        after: Sequence[str] = (),
    ) -> Spec:
        """A :class:`~pgqueue.Spec` with ``job_type``'s registered queue and ``max_attempts``.

        The worker fills the same defaults into the follow-ups a handler returns (as the app's
        enqueue methods do into their specs), but not into their nested ``next_jobs``, which
        go to PostgreSQL as they are: build those with this.
        """
        registered = self.job_types.get(job_type)
        if registered is not None:
            queue = registered.queue if queue is None else queue
            max_attempts = registered.max_attempts if max_attempts is None else max_attempts
        return Spec(
            job_type,
            payload,
            queue=queue,
            scope=scope,
            dedup_key=dedup_key,
            run_after=run_after,
            priority=priority,
            max_attempts=max_attempts,
            key=key,
            after=tuple(after),
        )

    def pipeline(self) -> Pipeline:
        """A new :class:`~pgqueue.Pipeline` whose nodes get this app's registered defaults."""
        return Pipeline(self)

    async def pipeline_status(
        self, conn_or_pool: ConnOrPool, pipeline_id: uuid.UUID | str
    ) -> PipelineStatus | None:
        """The pipeline's row of ``pgqueue.pipelines`` (None if no job carries that id)."""
        return await pipeline_status(conn_or_pool, pipeline_id)

    async def cancel_pipeline(
        self, conn_or_pool: ConnOrPool, pipeline_id: uuid.UUID | str, *, abort_running: bool = False
    ) -> int:
        """``pgqueue.cancel_pipeline``: cancel every job of it that has not started.

        Returns how many jobs were cancelled. Running members finish, but the jobs they would
        create are created cancelled; with ``abort_running`` their workers stop them as
        ``pgqueue.abort`` does (and the count includes them). ``pgqueue.retry`` of a member
        resumes the pipeline downstream of it.
        """
        return await cancel_pipeline(conn_or_pool, pipeline_id, abort_running=abort_running)

    def with_defaults(self, spec: SpecLike) -> dict[str, Any]:
        """``spec`` with the registered queue and max_attempts of its job type filled in
        where it has none (a key missing or null, as ``App.enqueue``'s ``None``)."""
        # A plain dict first: this runs for every spec of a 10,000-job enqueue_many.
        full = normal_spec(dict(spec)) if type(spec) is dict else spec_dict(spec)
        registered = self.job_types.get(str(full.get("job_type", "")))
        if registered is not None:
            if full.get("queue") is None:
                full["queue"] = registered.queue
            if registered.max_attempts is not None and full.get("max_attempts") is None:
                full["max_attempts"] = registered.max_attempts
        return full


def _asyncpg_only(api: str, conn_or_pool: object) -> ConnOrPool:
    """An asyncpg target of the App's enqueue methods (a SQLAlchemy session went another way)."""
    return asyncpg_target(
        api,
        conn_or_pool,
        "an asyncpg connection or pool, or a SQLAlchemy AsyncSession or AsyncConnection",
        " (a synchronous one: use app.enqueue_sync)",
    )
