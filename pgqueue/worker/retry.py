"""Backoff and outage bookkeeping shared by every background loop of the worker.

A database outage makes every loop fail at once and for as long as it lasts. Each loop owns
one :class:`Outage`: it logs the first failure with its context, stays quiet while the outage
lasts, and logs once more when the loop works again, so a restart of PostgreSQL produces a
handful of lines rather than a stack trace per retry. A flapping connection (ended every few
seconds by a pooler or a proxy, say) is many short outages: after one is logged, those that
start within :data:`RELAPSE_WINDOW` are logged only if they last :data:`RELAPSE_LOGGED_AFTER`,
and the next line logged counts the others.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time

import anyio
import asyncpg

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; includes ConnectionError
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,  # "connection is closed", pool closing, ...
    asyncpg.exceptions.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # class 57: admin shutdown, terminate_backend
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections
)


# The server stopped the statement for reasons of its own, not because of what it was asked
# to do: a statement_timeout or a cancel (57014), a lock_timeout (55P03), a deadlock or a
# serialization failure (class 40), a snapshot older than old_snapshot_threshold (72000).
# The same statement can succeed when tried again.
_INTERRUPTIONS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.SnapshotTooOldError,
)


# Errors that say the database, as it is set up right now, takes no such statement from this
# worker, whatever its values: a missing privilege or object (class 42: 42501, 42P01, 42883;
# 42725 when a function in a schema on the search path shadows a built-in), a read-only
# session (25006: a standby, default_transaction_read_only) or another isolation level (25),
# a feature turned off (0A), a database or schema gone (3D, 3F), an object in the wrong state
# (55), a system or internal error (58, XX), a broken routine (2F, 39), a role that may
# no longer log in (28: NOLOGIN, a password rotated, pg_hba.conf, met by a new pooled
# connection), a prepared statement missing or already there (26000, 42P05: a pooler in
# transaction mode that does not relay them, see POOLER_HINT). An operator's fix makes the
# same statement succeed. Taken for a refusal of an
# outcome, each one failed the attempt and ran the handler again, without end. (A trigger of
# yours raising one of these for one row holds that job's outcome alone: see the completer.
# Not class 38: PL/Python reports a trigger's uncaught exception, its refusal of a row, so.)
_SETUP_CLASSES = frozenset({"42", "25", "0A", "3D", "3F", "55", "58", "XX", "2F", "39", "28", "26"})
# What a prepared statement missing on the server connection, or already there, means for
# pgqueue's connections (asyncpg's own hint names its connect() argument, not the DSN).
POOLER_STATES = frozenset({"26000", "42P05"})
POOLER_HINT = (
    "prepared statements do not last on this connection: through a pooler in transaction mode,"
    " add statement_cache_size=0 to the DSN, or let the pooler keep them (PgBouncer 1.21+:"
    " max_prepared_statements above 0)"
)


def is_pooler_error(exc: BaseException) -> bool:
    """A prepared statement asyncpg made is missing on the server connection, or another
    with its name is there: a pooler in transaction mode handed the session's statements to
    another server connection (see :data:`POOLER_HINT`)."""
    return getattr(exc, "sqlstate", None) in POOLER_STATES


def is_setup_error(exc: BaseException) -> bool:
    """PostgreSQL refused the statement for how the database is set up, not for its values
    (see ``_SETUP_CLASSES``): waiting for an operator's fix, not a refusal of a job."""
    if not isinstance(exc, asyncpg.PostgresError):
        return False
    state = getattr(exc, "sqlstate", None) or ""
    return state[:2] in _SETUP_CLASSES


def is_broken_protocol(exc: BaseException) -> bool:
    """asyncpg refused to use a connection its server has ended.

    Right after ``pg_terminate_backend`` or a restart, asyncpg has read the server's FATAL
    message but not yet the end of the socket: the connection is neither usable nor closed,
    and its next statement raises ``InternalClientError: cannot switch to state 12; another
    operation (2) is in progress`` (in a soak, 69 of 300 statements sent in that window),
    or ``not connected``. The statement was never sent, so it is no refusal of it: a
    retry on a fresh connection goes through. asyncpg's other ``InternalClientError`` s (a
    codec's, say) stay errors of the statement or its values.
    """
    if not isinstance(exc, asyncpg.exceptions.InternalClientError):
        return False
    message = str(exc)
    return message.startswith("cannot switch to state") or message == "not connected"


def is_connection_error(exc: BaseException) -> bool:
    """True for errors that a retry on a fresh connection can cure."""
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return False  # class 57014 is a statement timeout, not an outage
    return isinstance(exc, _CONNECTION_ERRORS) or is_broken_protocol(exc)


def is_transient_error(exc: BaseException) -> bool:
    """True for errors that say nothing against the statement itself: connection errors, and
    a statement the server interrupted (timed out, cancelled, lock wait given up,
    deadlock).

    The completer retries these and takes every other error as a refusal of what it
    wrote. An operator holding a row lock in psql, or a ``statement_timeout`` or
    ``lock_timeout`` hit while waiting behind one, must delay an outcome, not turn a success
    into a failed attempt (whose own write would wait behind the same lock).
    """
    return is_connection_error(exc) or isinstance(exc, _INTERRUPTIONS)


def is_retryable(exc: BaseException) -> bool:
    """True for errors a write of the worker waits out instead of taking them for a refusal
    of what it wrote: transient ones, and the database's set-up (:func:`is_setup_error`)."""
    return is_transient_error(exc) or is_setup_error(exc)


def _cause(exc: BaseException) -> str:
    """What a transient error says happened. A call that got no answer within its bound is
    as likely a statement waiting for a row lock an operator holds in psql as a database
    that is down: the line names both."""
    if isinstance(exc, TimeoutError):
        return "no answer in time (the database is unreachable, or a lock is held)"
    return "database unavailable" if is_connection_error(exc) else "statement interrupted"


def _hint(exc: BaseException) -> str:
    hint = POOLER_HINT if is_pooler_error(exc) else getattr(exc, "hint", None)
    return f"; HINT: {hint}" if hint else ""


def _kind(exc: BaseException) -> str:
    """How a try failed, for telling a relapse from a new cause: the type and the message
    (not the SQLSTATE alone: a permission denied on another table is another fix), its
    words with digits in them left out (a prepared statement's name, an address, a pid)."""
    return f"{type(exc).__name__}: {_VARYING.sub('#', first_line(exc))}"


_VARYING = re.compile(r"\w*\d\w*")


def first_line(exc: BaseException) -> str:
    """An error's message without what follows its first line (asyncpg writes its own hint
    into some)."""
    return str(exc).split("\n", 1)[0]


class Backoff:
    """Exponential backoff with full jitter, so many workers do not reconnect in lockstep."""

    def __init__(self, base: float = 0.1, cap: float = 10.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        """Count one failure and return how long to wait before the next try."""
        self.failures += 1
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 30))
        return random.uniform(ceiling / 2, ceiling)

    async def sleep(self) -> None:
        await anyio.sleep(self.next_delay())

    def reset(self) -> None:
        self.failures = 0


# After an outage is logged, the next ones of the same loop within this many seconds, failing
# the same way, are logged only if they last RELAPSE_LOGGED_AFTER seconds (a chaos soak's
# notifier, its connection killed 362 times in 12 s, logged 100 warnings and as many
# recoveries); the next line logged says how many were not. A long outage, or one failing
# another way (a new cause is news), is always logged.
RELAPSE_WINDOW = 60.0
RELAPSE_LOGGED_AFTER = 10.0
# An outage that lasts is logged again this long after it was, then twice as long after
# each reminder, up to REMIND_MAX apart: one line for an outage of hours (a pooler refusing
# every statement, a privilege never granted) read as a blip long over.
REMIND_AFTER = 300.0
REMIND_MAX = 3600.0


class Outage:
    """Logs an outage of one component once when it starts and once when it ends; brief
    outages soon after a logged one are counted instead (see :data:`RELAPSE_WINDOW`)."""

    def __init__(
        self, logger: logging.Logger, component: str, retry: str = "retrying with backoff"
    ) -> None:
        self.logger = logger
        self.component = component
        self.retry = retry  # what the component does next, for the log line
        self.started: float | None = None
        self._logged_at: float | None = None  # when the last outage was logged
        self._logged_kind = ""  # and how it failed (see _kind)
        self._quiet = False  # the outage in progress is a relapse, not logged (yet)
        self._unlogged = 0  # relapses since the last outage logged
        self._remind_at = math.inf  # when the outage logged is logged again
        self._remind_gap = REMIND_AFTER

    def failed(self, exc: BaseException, doing: str) -> None:
        """Record a failed attempt at ``doing``; only the first one of an outage is logged,
        and of a relapse the first one past :data:`RELAPSE_LOGGED_AFTER` or failing another
        way."""
        now = time.monotonic()
        if self.started is None:
            self.started = now
            if (
                self._logged_at is not None
                and now - self._logged_at < RELAPSE_WINDOW
                and _kind(exc) == self._logged_kind
            ):
                self._quiet = True
                self._unlogged += 1
                self.logger.debug("%s: failed again while %s: %r", self.component, doing, exc)
                return
        elif not self._quiet:
            if now >= self._remind_at:
                self._remind(exc, doing, now)
            return
        elif now - self.started < RELAPSE_LOGGED_AFTER and _kind(exc) == self._logged_kind:
            return
        else:  # a quiet relapse, logged now
            self._unlogged -= 1
        self._quiet = False
        self._logged_at, self._logged_kind = now, _kind(exc)
        self._remind_at, self._remind_gap = now + REMIND_AFTER, REMIND_AFTER
        self._log(exc, doing)

    def _remind(self, exc: BaseException, doing: str, now: float) -> None:
        assert self.started is not None
        self._remind_gap = min(2 * self._remind_gap, REMIND_MAX)
        self._remind_at = now + self._remind_gap
        level = logging.WARNING if is_transient_error(exc) else logging.ERROR
        self.logger.log(
            level,
            "%s: still failing after %.0fs, while %s (%s: %s); %s",
            self.component,
            now - self.started,
            doing,
            type(exc).__name__,
            first_line(exc),
            self.retry,
        )

    def _log(self, exc: BaseException, doing: str) -> None:
        retry = self.retry
        if self._unlogged:
            retry += (
                f" ({self._unlogged} brief outage(s) since the last one logged were not logged)"
            )
            self._unlogged = 0
        if is_transient_error(exc):
            self.logger.warning(
                "%s: %s while %s (%s: %s); %s",
                self.component,
                _cause(exc),
                doing,
                type(exc).__name__,
                exc,
                retry,
            )
        elif is_setup_error(exc):
            self.logger.error(
                "%s: the database refuses this worker's statements as it is set up, while %s"
                " (%s %s: %s%s); fix that (%s); %s",
                self.component,
                doing,
                type(exc).__name__,
                getattr(exc, "sqlstate", ""),
                first_line(exc),  # asyncpg writes its own hint into a pooler error's text
                _hint(exc),
                "the DSN, or the pooler"
                if is_pooler_error(exc)
                else "a privilege, a read-only session, a missing or shadowed object",
                retry,
            )
        else:
            self.logger.error(
                "%s: unexpected error while %s; %s",
                self.component,
                doing,
                retry,
                exc_info=exc,
            )

    def ok(self) -> None:
        """Record a success; ends (and logs the length of) an outage in progress."""
        if self.started is None:
            return
        level = logging.DEBUG if self._quiet else logging.INFO
        self.logger.log(
            level, "%s: working again after %.1fs", self.component, time.monotonic() - self.started
        )
        self.started = None
        self._quiet = False
        self._remind_at = math.inf
