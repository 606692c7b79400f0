"""The job a handler receives: an immutable snapshot of its ``pgqueue.jobs`` row at claim time."""

from __future__ import annotations

import json
import logging
import numbers
import operator
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import MISSING, dataclass, fields, make_dataclass
from datetime import date, datetime, timedelta
from typing import Any, cast

from pgqueue.dsn import INT4_MAX, INT4_MIN, as_aware

# Set by each of a worker's runners, so the handlers it runs (and their threads: anyio copies
# the context) can save progress: (job, progress) -> written. A context variable, not a
# field, keeps Job a plain snapshot of the row, built as cheaply as it is now.
_progress_saver: ContextVar[Callable[[Job, Any], Awaitable[bool]] | None] = ContextVar(
    "pgqueue_progress_saver", default=None
)


# Set by each runner as well: (job) -> whether pgqueue.abort() was called for this attempt and
# the worker has heard of it.
_abort_check: ContextVar[Callable[[Job], bool] | None] = ContextVar(
    "pgqueue_abort_check", default=None
)

# The job whose handler runs in this context (see current_job), set around each call.
_current_job: ContextVar[Job | None] = ContextVar("pgqueue_current_job", default=None)


def current_job() -> Job | None:
    """The job whose handler is running here (in its task, the tasks it starts, and a plain
    ``def``'s thread), or None outside a handler: for code the handler calls that was not
    handed the job, such as a logging filter (see :class:`JobLogFilter`)."""
    return _current_job.get()


class JobLogFilter(logging.Filter):
    """Adds ``job_id``, ``job_type`` and ``attempt`` to every record logged inside a
    handler (where the record has none of its own), for an application's formats:
    ``handler.addFilter(pgqueue.JobLogFilter())``, then ``%(job_id)s`` in a format, or the
    fields of a JSON formatter. Outside a handler they are None. It never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = _current_job.get()
        fields = record.__dict__
        if "job_id" not in fields:
            fields["job_id"] = None if job is None else job.id
        if "job_type" not in fields:
            fields["job_type"] = None if job is None else job.job_type
        if "attempt" not in fields:
            fields["attempt"] = None if job is None else job.attempts
        return True


@dataclass(frozen=True, slots=True)
class Job:
    """One claimed attempt of a job.

    Frozen because it is a snapshot: the row keeps changing in the database (heartbeats,
    retries) and a handler must not believe that mutating this object changes anything.
    ``attempts`` is this attempt's number, counted from 1.
    """

    id: int
    job_type: str
    queue: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    priority: int = 0
    scope: Any = None
    dedup_key: str | None = None
    pipeline_id: uuid.UUID | None = None
    parent_id: int | None = None
    run_after: datetime | None = None
    progress: Any = None
    created_at: datetime | None = None

    async def save_progress(self, progress: Any) -> bool:
        """Store a checkpoint for this job; the next attempt finds it in ``job.progress``.

        A long handler saves how far it got (any JSON value; ``None`` clears it), and an
        attempt that starts after a failure, a lost lease or a worker crash goes on from
        there. The write is fenced like the job's outcome (``pgqueue.save_progress``): it
        returns False, and writes nothing, once this worker no longer holds the job (its
        lease was recovered and the job may be running elsewhere; stop soon, what this
        attempt does next is discarded). It is one round trip on the worker's pool: save at
        natural boundaries (a page, a batch), not per item. A plain ``def`` handler calls
        ``anyio.from_thread.run(job.save_progress, value)``.

        Raises what the write raises: a value that is not JSON, ``asyncpg``'s
        ``LockNotAvailableError`` when another transaction keeps the job's row locked for
        2 s, ``TimeoutError`` when the database does not answer within 30 s.
        """
        save = _progress_saver.get()
        if save is None:
            raise RuntimeError(
                f"job {self.id}: save_progress works inside a handler that a pgqueue worker runs"
            )
        return await save(self, progress)

    @property
    def abort_requested(self) -> bool:
        """True once ``pgqueue.abort()`` was called for this job while this attempt runs, and
        the worker has heard of it (a notification, or at the latest its next heartbeat).

        An async handler does not need it: its task is cancelled. A plain ``def`` cannot be
        interrupted, so a long one looks at this between steps and returns early: once the
        worker has heard of the abort, the attempt ends the job cancelled whatever the handler
        returns. False outside a worker's handler.
        """
        check = _abort_check.get()
        return check is not None and check(self)

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> Job:
        """Build a Job from a ``pgqueue.jobs`` row (an asyncpg Record or any mapping).

        JSON columns arrive decoded on pgqueue's own connections, and as JSON text on a
        connection without its codecs; the payload (always an object) tells which, so a scope
        that is a JSON string (``"tenant-1"``) is not parsed a second time.
        """
        payload = row["payload"]
        raw = isinstance(payload, str)
        return cls(
            id=row["id"],
            job_type=row["job_type"],
            queue=row["queue"],
            payload=(json.loads(payload) if raw else payload) or {},
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            priority=row.get("priority", 0),
            scope=_json(row.get("scope"), raw),
            dedup_key=row.get("dedup_key"),
            pipeline_id=row.get("pipeline_id"),
            parent_id=row.get("parent_id"),
            run_after=row.get("run_after"),
            progress=_json(row.get("progress"), raw),
            created_at=row.get("created_at"),
        )


# A claimed row becomes a Job on the worker's hot path (a claim returns up to hundreds). The
# frozen ``__init__`` sets each field through ``object.__setattr__``, 3-4 µs per Job, the
# largest per-job cost left in the worker. ``_ClaimedRow`` has Job's fields and slot layout
# but a plain ``__init__``; an instance is built there and then becomes a Job by
# ``__class__`` assignment, which CPython allows between classes of identical layout. The
# result is an ordinary, frozen Job (0.5-0.9 µs); tests/runtime/test_job_from_row.py
# checks it equals ``Job.from_record(row)``.
_ClaimedRow = make_dataclass("_ClaimedRow", [(f.name, f.type) for f in fields(Job)], slots=True)
# The twin is only the same object if Job's __init__ just stores its arguments: a field that
# is not an init argument, a default factory, keyword-only fields, a __post_init__ or a weakref
# slot would each make job_from_row differ from Job(*row) (or fail at the first claim).
assert not hasattr(Job, "__post_init__") and "__weakref__" not in Job.__slots__
assert all(f.init and not f.kw_only and f.default_factory is MISSING for f in fields(Job))
assert _ClaimedRow.__slots__ == Job.__slots__  # type: ignore[attr-defined]


def job_from_row(row: Sequence[Any]) -> Job:
    """A Job from a row holding every field's value in field order (``pgqueue.worker``'s
    claim selects them so, with JSON already decoded): the same object as ``Job(*row)``,
    built faster. A shorter row raises TypeError, where ``Job(*row)`` would fill in defaults."""
    job: Any = _ClaimedRow(*row)
    job.__class__ = Job
    return cast(Job, job)


def _json(value: Any, raw: bool) -> Any:
    return json.loads(value) if raw and isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class Spec:
    """One job to create later: a follow-up returned by a handler, or a pipeline node.

    The fields are ``pgqueue.enqueue``'s parameters; ``None`` keeps the SQL default (queue
    ``'default'``, ``max_attempts`` from settings...). ``key`` names the spec within one
    ``next_jobs`` array and ``after`` lists sibling keys it waits for; :meth:`Result.fan_out`
    fills both in for you. :meth:`pgqueue.App.spec` builds one with a registered job type's
    queue and ``max_attempts``.
    """

    job_type: str
    payload: Mapping[str, Any] | None = None
    queue: str | None = None
    scope: Any = None
    dedup_key: str | None = None
    run_after: datetime | None = None
    priority: int | None = None
    max_attempts: int | None = None
    key: str | None = None
    after: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.job_type, str) or not self.job_type.strip():
            raise ValueError(f"job_type must be a non-blank string, got {self.job_type!r}")
        if self.payload is not None and not isinstance(self.payload, Mapping):
            raise TypeError(f"payload must be a mapping, got {type(self.payload).__name__}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if isinstance(self.after, str):
            raise TypeError("after must be a sequence of keys, not a single string")
        object.__setattr__(self, "after", tuple(self.after))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``pgqueue.enqueue_many`` and ``pgqueue.complete`` take."""
        spec: dict[str, Any] = {"job_type": self.job_type}
        if self.payload is not None:
            spec["payload"] = dict(self.payload)
        for name in ("queue", "scope", "dedup_key", "run_after", "priority", "max_attempts", "key"):
            value = getattr(self, name)
            if value is not None:
                spec[name] = value
        if self.run_after is not None:
            spec["run_after"] = as_aware(self.run_after)
        if self.after:
            spec["after"] = list(self.after)
        return spec


SpecLike = Spec | Mapping[str, Any]


def spec_dict(spec: SpecLike) -> dict[str, Any]:
    """A :class:`Spec` or a spec mapping as a plain dict (a copy), its ``run_after`` (and
    its follow-ups') timezone-aware (see :func:`pgqueue.dsn.as_aware`)."""
    if isinstance(spec, Spec):
        return spec.to_dict()
    if not isinstance(spec, Mapping):
        raise TypeError(f"a job spec must be a Spec or a mapping, got {type(spec).__name__}")
    return normal_spec(dict(spec))


def normal_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` (a dict of its own, changed in place) with a naive ``run_after`` read as UTC,
    in its ``next_jobs`` too: sent as JSON text, PostgreSQL would read it in the TimeZone of
    whichever session creates the job."""
    if "run_after" in spec:
        spec["run_after"] = as_aware(spec["run_after"])
    nested = spec.get("next_jobs")
    if type(nested) is list:
        spec["next_jobs"] = [spec_dict(c) if isinstance(c, Spec | Mapping) else c for c in nested]
    return spec


def pipeline_id_text(value: object) -> str | None:
    """A ``pipeline_id`` argument as the uuid's text, or None; ValueError naming it otherwise
    (PostgreSQL's refusal named only the query's argument number)."""
    if value is None:
        return None
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise ValueError(f"pipeline_id must be a UUID, got {value!r}")


def int_option(name: str, value: Any) -> Any:
    """``priority`` / ``max_attempts``: an integer (anything integral: numpy's too) or None.
    A float was rounded one way by one path and the other way by another (1.5 became 2, or
    1); a bool is no number here. Outside the int column's range PostgreSQL's refusal named
    a query argument's number, not the option."""
    if value is None:
        return None
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            pass
        else:
            if not INT4_MIN <= number <= INT4_MAX:
                raise ValueError(f"{name} must be from {INT4_MIN} to {INT4_MAX}, got {number}")
            return number
    raise TypeError(f"{name} must be an integer, got {value!r}")


def text_option(name: str, value: Any) -> str | None:
    """``job_type`` / ``queue`` / ``dedup_key``: a string or None. A number was refused by
    asyncpg naming only the query argument's number (SQLAlchemy stored it as text), and a
    NUL or a lone surrogate by the driver or the server without naming the option."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{name} must not contain NUL (\\x00), got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode text, got {value!r}") from None
    return value


def run_after_option(value: Any) -> Any:
    """``run_after``: a datetime (naive: UTC), a date (its midnight, UTC) or None. A string
    would be read by PostgreSQL in the session's TimeZone."""
    if value is None or isinstance(value, datetime | date):
        return as_aware(value)
    raise TypeError(f"run_after must be a datetime, got {type(value).__name__}")


def spec_list(name: str, value: object) -> list[Any]:
    """A list of specs given as ``name``: one spec (a mapping or a Spec) or a string is not one,
    and iterated it would be taken apart into its keys or characters."""
    if isinstance(value, Mapping | Spec | str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of job specs, got {type(value).__name__}")
    return list(value)


def job_id_list(name: str, value: object) -> list[Any]:
    """A list of job ids given as ``name`` (not one id, not a string)."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of job ids, got {value!r}")
    return list(value)


# The longest delay a worker writes (a snooze, a retry): pgqueue.snooze measures 100 years on
# the calendar, a few days more.
MAX_DELAY = timedelta(days=100 * 365)


def as_delay(what: str, value: object) -> timedelta:
    """``value`` (seconds, any real number, or a timedelta) as a timedelta from 0 to 100 years;
    ValueError or TypeError naming ``what`` otherwise."""
    if isinstance(value, timedelta):
        delay = value
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        # Compared before it is converted: NaN fails both comparisons, and an int too large
        # for a float compares exactly.
        seconds = cast(float, value)  # any Real: Fraction, numpy scalars
        if not 0 <= seconds <= MAX_DELAY.total_seconds():
            raise ValueError(f"{what} must be from 0 seconds to 100 years, got {value!r}")
        delay = timedelta(seconds=float(seconds))
    else:
        raise TypeError(f"{what} must be seconds or a timedelta, got {value!r}")
    if not timedelta(0) <= delay <= MAX_DELAY:
        raise ValueError(f"{what} must be from 0 seconds to 100 years, got {value!r}")
    return delay


class Snooze(Exception):
    """Raise in a handler to put its job back for later, the attempt not counted.

    The job runs again (on any worker) not before ``delay`` from now: seconds (any real
    number), or a timedelta, from 0 to 100 years (``pgqueue.snooze``). For a handler that
    finds it cannot proceed yet (a rate limit, a resource not ready); a failure with a delay
    would count the attempt, and end the job failed once ``max_attempts`` waits are spent. A
    scoped job keeps its place: the later jobs of its scope wait for it. A ``delay`` out of
    range, or not a number of seconds or a timedelta, is refused here, when the Snooze is
    built: the attempt then fails with that error. Raised by tasks of a task group, Snoozes
    arrive as an ExceptionGroup: Snoozes only snooze for the longest delay; anything beside
    them fails the attempt.
    """

    delay: timedelta

    def __init__(self, delay: float | timedelta) -> None:
        value = as_delay("Snooze delay", delay)
        super().__init__(value)
        self.delay = value

    def __str__(self) -> str:
        return f"snooze for {self.delay}"


@dataclass(frozen=True, slots=True, init=False)
class Result:
    """Return this from a handler to store ``value`` and also create follow-up jobs.

    ``next_jobs`` are job specs (the keys of ``pgqueue.enqueue``'s parameters) created by
    ``pgqueue.complete`` in the same transaction that records the success, so children exist
    exactly when their parent has succeeded. A plain return value means ``Result(value)``.

    Build the follow-ups with :meth:`then` and :meth:`fan_out`; each returns a new Result::

        return Result(summary).then(Spec("notify", {"user": 7}))          # one follow-up
        return Result(summary).fan_out(Spec("recalc", p) for p in parts)  # N in parallel
        return Result(summary).fan_out(                                   # N, then one join
            (Spec("recalc", p) for p in parts), join=Spec("aggregate", {"year": 2024})
        )
    """

    value: Any
    next_jobs: list[dict[str, Any]] | None

    def __init__(self, value: Any = None, next_jobs: Sequence[SpecLike] | None = None) -> None:
        # Stored as plain dicts (copies): the worker sends them to pgqueue.complete as JSON.
        object.__setattr__(self, "value", value)
        specs = (
            None if next_jobs is None else [spec_dict(s) for s in spec_list("next_jobs", next_jobs)]
        )
        object.__setattr__(self, "next_jobs", specs)

    def _specs(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self.next_jobs or ()]

    def then(self, *specs: SpecLike) -> Result:
        """Also create ``specs`` when this job succeeds (no ordering between them)."""
        combined = [*self._specs(), *(spec_dict(s) for s in specs)]
        _check_keys(combined)
        return Result(self.value, combined)

    def fan_out(self, specs: Iterable[SpecLike], *, join: SpecLike | None = None) -> Result:
        """Create ``specs`` in parallel; then, if given, ``join`` once after all of them succeed.

        The join waits on every spec of the fan-out (through ``key``/``after``), runs exactly
        once, and is cancelled if one of them fails for good (``pgqueue.retry`` of that one
        revives it). With no specs at all the join is queued at once.
        """
        existing = self._specs()
        used = {s["key"] for s in existing if isinstance(s.get("key"), str)}
        added: list[dict[str, Any]] = []
        for spec in specs:
            item = spec_dict(spec)
            if item.get("key") is None:
                item["key"] = _fresh_key(used, len(existing) + len(added))
            used.add(item["key"])
            added.append(item)
        if join is not None:
            joined = spec_dict(join)
            after = joined.get("after") or []
            if isinstance(after, str) or not isinstance(after, Iterable):
                raise TypeError(f"the join's after must be a list of keys, got {after!r}")
            joined["after"] = [*after, *(s["key"] for s in added)]
            added.append(joined)
        _check_keys(existing + added)
        return Result(self.value, existing + added)


def _check_keys(specs: list[dict[str, Any]]) -> None:
    """Refused when the Result is built, not when the worker records it (after the run)."""
    seen: set[Any] = set()
    for spec in specs:
        key = spec.get("key")
        if key is None:
            continue
        if key in seen:
            raise ValueError(f"key {key!r} is used by more than one spec")
        seen.add(key)


def _fresh_key(used: set[str], position: int) -> str:
    key = f"pgqueue.fan_out.{position}"
    while key in used:
        key += "_"
    return key
