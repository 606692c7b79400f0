"""Enqueues the ticks of an App's periodic jobs (``App.periodic``).

Every worker whose App has schedules runs this loop; ``pgqueue.enqueue_periodic`` makes
each tick one job however many workers try, so there is no leader to lose. The loop sleeps
until the earliest tick of any schedule, enqueues it, and moves that schedule on to its next
tick after now: ticks that fell while the worker was not running (or was suspended) are
skipped, not made up. A tick whose enqueue fails for a transient reason (the database is
restarting) is tried again with backoff until the schedule's next tick is due; the other
workers are trying it too.
"""

from __future__ import annotations

import datetime
import logging

import anyio
import asyncpg

from pgqueue.app import App
from pgqueue.dsn import dumps
from pgqueue.schedule import Schedule
from pgqueue.worker import bounded
from pgqueue.worker.retry import Backoff, Outage, is_transient_error

# Bound on one enqueue of a tick (it waits only for other enqueues of the same tick).
ENQUEUE_TIMEOUT = 30.0
_ENQUEUE_PERIODIC = (
    "SELECT pgqueue.enqueue_periodic(name => $1, tick => $2, spec => $3::text::jsonb)"
)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def schedule_loop(pool: asyncpg.Pool, app: App, logger: logging.Logger) -> None:
    """Enqueue every schedule's ticks from now on, until cancelled."""
    if not app.schedules:
        return
    outage = Outage(logger, "scheduler")
    now = _now()
    due = {name: schedule.next_tick(now) for name, schedule in app.schedules.items()}
    while True:
        name, tick = min(due.items(), key=lambda item: item[1])
        await anyio.sleep(max(0.0, (tick - _now()).total_seconds()))
        schedule = app.schedules[name]
        following = schedule.next_tick(tick)
        await _enqueue_tick(pool, app, schedule, tick, following, outage, logger)
        due[name] = schedule.next_tick(max(tick, _now()))


async def _enqueue(
    conn: asyncpg.Connection, name: str, tick: datetime.datetime, spec: str
) -> int | None:
    job_id: int | None = await conn.fetchval(_ENQUEUE_PERIODIC, name, tick, spec)
    return job_id


async def _enqueue_tick(
    pool: asyncpg.Pool,
    app: App,
    schedule: Schedule,
    tick: datetime.datetime,
    give_up_at: datetime.datetime,
    outage: Outage,
    logger: logging.Logger,
) -> None:
    spec = dumps(app.with_defaults(schedule.spec))  # a handler registered after periodic()
    backoff = Backoff(base=0.5, cap=30.0)
    while True:
        try:
            job_id = await bounded.call(pool, ENQUEUE_TIMEOUT, _enqueue, schedule.name, tick, spec)
        except Exception as exc:
            if not is_transient_error(exc):
                # PostgreSQL refused the spec (a queue name too long, say): every tick
                # would be refused alike, and each one says so.
                logger.error(
                    "periodic %s: tick %s refused: %s", schedule.name, tick.isoformat(), exc
                )
                return
            outage.failed(exc, f"enqueueing periodic {schedule.name}")
            delay = backoff.next_delay()
            if _now() + datetime.timedelta(seconds=delay) >= give_up_at:
                logger.warning(
                    "periodic %s: tick %s skipped (the database did not answer before the"
                    " next tick)",
                    schedule.name,
                    tick.isoformat(),
                )
                return
            await anyio.sleep(delay)
            continue
        outage.ok()
        if job_id is not None:
            logger.info(
                "periodic %s: tick %s enqueued as job %d",
                schedule.name,
                tick.isoformat(),
                job_id,
                extra={"job_id": job_id},
            )
        return
