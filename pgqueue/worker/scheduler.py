"""Enqueues the ticks of an App's periodic jobs (``App.periodic``).

Every worker whose App has schedules runs these loops; ``pgqueue.enqueue_periodic`` makes
each tick one job however many workers try, so there is no leader to lose. Each schedule has
a loop of its own, so one whose enqueue waits (its row or its dedup key locked by an open
transaction) holds up no other. A loop sleeps until its next tick, enqueues it, and moves on
to the next tick after now: ticks that fell while the worker was not running (or was
suspended) are skipped, not made up; with ``catch_up``, the latest of them is enqueued late.
A tick whose enqueue fails for a transient reason (the database is restarting, a lock wait)
or for how the database is set up (a read-only standby, a privilege missing) is tried again
with backoff until the schedule's next tick is due; the other workers are trying it too.
Ticks fall on the database's clock (:class:`DatabaseClock`), not the host's.
"""

from __future__ import annotations

import datetime
import logging
import time

import anyio
import asyncpg

from pgqueue.app import App
from pgqueue.dsn import dumps
from pgqueue.schedule import Schedule
from pgqueue.worker import bounded
from pgqueue.worker.completer import BOUNDED_LOCK_WAIT
from pgqueue.worker.retry import Backoff, Outage, is_retryable

# Bound on one try of a tick's enqueue (it waits only for other enqueues of the same tick, or
# for locks an application holds on its dedup key); never past the schedule's next tick.
ENQUEUE_TIMEOUT = 30.0
MIN_TRY = 1.0
# The lock wait is bounded: a schedule's row or dedup key held by another transaction (an
# operator's SELECT ... FOR UPDATE on pgqueue.periodic, a migration) must not keep a pooled
# connection, which claims and outcome writes need, for the whole try. A lock timeout is a
# transient error: the loop backs off, connection returned, and tries again.
# A tick early by the database's clock (this worker's reading of it was not made yet, or
# is off) is not enqueued: it would move the schedule past ticks the others have not
# enqueued. The reply says so, with the database's time, and the tick is tried again then.
_ENQUEUE_PERIODIC = (
    "SELECT CASE WHEN $2 <= c.now"
    " THEN pgqueue.enqueue_periodic(name => $1, tick => $2, spec => $3::text::jsonb) END,"
    f" c.now, $2 > c.now FROM (SELECT clock_timestamp() AS now) c, {BOUNDED_LOCK_WAIT}"
)
# A schedule's latest tick, missed: enqueued only if the schedule has enqueued a tick before
# (its row says when) and not this one or a later one. A first start has nothing to make up.
_CATCH_UP = (
    "SELECT CASE WHEN $2 <= c.now"
    " THEN pgqueue.enqueue_periodic(name => $1, tick => $2, spec => $3::text::jsonb) END,"
    f" c.now, $2 > c.now FROM (SELECT clock_timestamp() AS now) c, {BOUNDED_LOCK_WAIT}"
    " WHERE EXISTS (SELECT 1 FROM pgqueue.periodic p WHERE p.name = $1 AND p.last_tick < $2)"
)
# _enqueue's answer for a tick that was early.
_EARLY = -1
# At most this many tries of tick enqueues run at once, whatever the number of schedules:
# the pool is min(concurrency, 10) + 2 connections. Held for one try, never across the
# backoff between tries, so schedules stuck on locks cannot keep the others waiting.
MAX_ENQUEUES = 2


def _host_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class DatabaseClock:
    """The database's time: read from it (when the schedules start, then with every tick's
    enqueue) and carried forward between readings on this process's monotonic clock.

    ``enqueue_periodic`` keeps each schedule's latest tick. On its host's clock, a worker
    whose clock ran ahead enqueued the coming ticks early, moving the schedule past ticks the
    others had not enqueued yet: each of those was then lost, and nothing said so. On the
    database's clock every worker waits for the same instants, whatever its host says.
    """

    def __init__(self) -> None:
        self.set(_host_now())  # until the first reading

    def set(self, now: datetime.datetime) -> None:
        self._base, self._at = now, time.monotonic()

    def now(self) -> datetime.datetime:
        return self._base + datetime.timedelta(seconds=time.monotonic() - self._at)


async def run_schedules(pool: asyncpg.Pool, app: App, logger: logging.Logger) -> None:
    """Enqueue every schedule's ticks from now on, until cancelled."""
    if not app.schedules:
        return
    enqueues = anyio.CapacityLimiter(MAX_ENQUEUES)
    clock = DatabaseClock()
    try:
        clock.set(await bounded.call(pool, ENQUEUE_TIMEOUT, _database_time))
    except Exception as exc:  # it is read again with every enqueue
        logger.warning("periodic jobs: could not read the database's clock yet (%s)", exc)
    async with anyio.create_task_group() as loops:
        for schedule in app.schedules.values():
            loops.start_soon(_schedule_loop, pool, app, schedule, enqueues, logger, clock)


async def _database_time(conn: asyncpg.Connection) -> datetime.datetime:
    now: datetime.datetime = await conn.fetchval("SELECT clock_timestamp()")
    return now


async def _schedule_loop(
    pool: asyncpg.Pool,
    app: App,
    schedule: Schedule,
    enqueues: anyio.CapacityLimiter,
    logger: logging.Logger,
    clock: DatabaseClock,
) -> None:
    outage = Outage(logger, f"periodic {schedule.name}")
    try:
        while True:
            now = clock.now()  # one reading: a tick falling between two would count as missed
            tick = schedule.next_tick(now)
            missed = schedule.previous_tick(now) if schedule.catch_up else None
            if missed is None or not await _enqueue_tick(
                pool,
                app,
                schedule,
                missed,
                tick,
                enqueues,
                outage,
                logger,
                sql=_CATCH_UP,
                clock=clock,
            ):
                break
            # Early by the database's clock (the first reading failed and the host's runs
            # ahead): both ticks again, from the database's time now known.
        while True:
            await anyio.sleep(max(0.0, (tick - clock.now()).total_seconds()))
            following = schedule.next_tick(tick)
            now = clock.now()
            if following <= now:
                # Woke past the next tick too (the process was suspended, the event loop
                # held up): the ticks past are not made up by this worker; with catch_up,
                # the latest of them is enqueued, once. (The first of them was enqueued,
                # hours late for a nightly job, and with catch_up the latest as well.)
                latest = schedule.previous_tick(now) if schedule.catch_up else None
                _log_behind(logger, schedule, tick, latest or schedule.next_tick(now))
                if latest is None:
                    tick = schedule.next_tick(now)
                    continue
                tick, following = latest, schedule.next_tick(latest)
            if await _enqueue_tick(
                pool, app, schedule, tick, following, enqueues, outage, logger, clock=clock
            ):  # early: the clock was the host's, and is the database's now
                tick = schedule.next_tick(clock.now())
                continue
            # A try that ran past the next tick (a lock wait, an outage) leaves that tick
            # due: it is enqueued at once, late. Further behind than that (the process was
            # suspended), the ticks already past are skipped, and said so; with catch_up,
            # all but the latest, which is enqueued at once.
            tick = following
            if schedule.next_tick(tick) <= clock.now():
                latest = schedule.previous_tick(clock.now()) if schedule.catch_up else None
                tick = latest if latest is not None else schedule.next_tick(clock.now())
                _log_behind(logger, schedule, following, tick)
    except (ValueError, TypeError) as exc:
        # next_tick found none (registration checked there is one now), or a payload
        # changed after registration is no longer JSON: this schedule stops, the worker not.
        logger.error("periodic %s: stopped: %s", schedule.name, exc)


def _log_behind(
    logger: logging.Logger, schedule: Schedule, first: datetime.datetime, until: datetime.datetime
) -> None:
    logger.warning(
        "periodic %s: ticks from %s until %s not enqueued by this worker (it fell behind: a"
        " suspended process, a blocked event loop, or tries that waited for locks or"
        " connections; another worker may have enqueued them)",
        schedule.name,
        first.isoformat(),
        until.isoformat(),
    )


async def _enqueue(
    conn: asyncpg.Connection,
    sql: str,
    name: str,
    tick: datetime.datetime,
    spec: str,
    clock: DatabaseClock,
) -> int | None:
    row = await conn.fetchrow(sql, name, tick, spec)
    if row is None:  # _CATCH_UP's guard held it back
        return None
    clock.set(row[1])
    if row[2]:
        return _EARLY
    job_id: int | None = row[0]
    return job_id


async def _enqueue_tick(
    pool: asyncpg.Pool,
    app: App,
    schedule: Schedule,
    tick: datetime.datetime,
    give_up_at: datetime.datetime,
    enqueues: anyio.CapacityLimiter,
    outage: Outage,
    logger: logging.Logger,
    *,
    sql: str = _ENQUEUE_PERIODIC,
    clock: DatabaseClock | None = None,
) -> bool:
    """Enqueue one tick (through ``sql``: the plain enqueue, or :data:`_CATCH_UP` for a
    missed one), retrying transient and set-up failures until ``give_up_at`` (on ``clock``). True if
    the tick was early by the database's clock, and so not enqueued."""
    clock = clock or DatabaseClock()
    late = sql is _CATCH_UP
    spec = dumps(app.with_defaults(schedule.spec))  # a handler registered after periodic()
    backoff = Backoff(base=0.5, cap=30.0)
    while True:
        left = (give_up_at - clock.now()).total_seconds()
        try:
            async with enqueues:
                job_id = await bounded.call(
                    pool,
                    max(MIN_TRY, min(ENQUEUE_TIMEOUT, left)),
                    _enqueue,
                    sql,
                    schedule.name,
                    tick,
                    spec,
                    clock,
                )
        except Exception as exc:
            if not is_retryable(exc):
                # PostgreSQL refused the spec (a queue name too long, say): every tick
                # would be refused alike, and each one says so. (Not a read-only session, a
                # database refusing connections, a privilege missing: those are waited out
                # like an outage, within the tick's time.)
                logger.error(
                    "periodic %s: tick %s refused: %s", schedule.name, tick.isoformat(), exc
                )
                return False
            outage.failed(exc, f"enqueueing tick {tick.isoformat()}")
            delay = backoff.next_delay()
            if clock.now() + datetime.timedelta(seconds=delay) >= give_up_at:
                logger.warning(
                    "periodic %s: tick %s skipped (it could not be enqueued before the next"
                    " tick was due)",
                    schedule.name,
                    tick.isoformat(),
                )
                return False
            await anyio.sleep(delay)
            continue
        outage.ok()
        if job_id == _EARLY:
            logger.warning(
                "periodic %s: tick %s is still %.1fs away by the database's clock; this"
                " worker's clock was off, and goes on from the database's",
                schedule.name,
                tick.isoformat(),
                (tick - clock.now()).total_seconds(),
            )
            return True
        if job_id is not None:
            logger.info(
                "periodic %s: %stick %s %s job %d",
                schedule.name,
                "missed " if late else "",
                tick.isoformat(),
                "enqueued as" if schedule.spec.dedup_key is None else "enqueued or coalesced into",
                job_id,
                extra={"job_id": job_id},
            )
        return False
