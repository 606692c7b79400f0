"""App.periodic: when ticks fall, what a schedule refuses, and workers that race for ticks."""

from __future__ import annotations

import datetime
import itertools
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest
from runtime_helpers import Records
from worker_harness import wait_for_states, wait_until

import pgqueue
from pgqueue.schedule import Schedule
from pgqueue.worker import scheduler
from pgqueue.worker.retry import Outage

UTC = datetime.UTC
BERLIN_0230 = {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}


def at(*args: int) -> datetime.datetime:
    return datetime.datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("options", "after", "tick"),
    [
        # Intervals count from the Unix epoch, so every worker names the same ticks.
        ({"every": 600}, at(2030, 1, 1, 12, 3, 7), at(2030, 1, 1, 12, 10)),
        ({"every": 600}, at(2030, 1, 1, 12, 10), at(2030, 1, 1, 12, 20)),  # strictly after
        ({"every": datetime.timedelta(days=1)}, at(2030, 1, 1, 0, 0, 1), at(2030, 1, 2)),
        ({"cron": "*/15 * * * *"}, at(2030, 1, 1, 12, 3, 7), at(2030, 1, 1, 12, 15)),
        ({"cron": "0 9 * * *"}, at(2030, 1, 1, 9), at(2030, 1, 2, 9)),
        # 09:00 in Berlin is 08:00 UTC in winter, 07:00 UTC in summer.
        ({"cron": "0 9 * * *", "timezone": "Europe/Berlin"}, at(2030, 1, 1), at(2030, 1, 1, 8)),
        ({"cron": "0 9 * * *", "timezone": "Europe/Berlin"}, at(2030, 7, 1), at(2030, 7, 1, 7)),
        # The fall-back hour: 02:30 Berlin is 00:30 UTC (first pass) and 01:30 UTC (second);
        # the tick is the first pass, and from the second pass on the next tick is tomorrow's
        # (cronsim answered 00:30, a tick in the past: a worker started then spun on it).
        (BERLIN_0230, at(2030, 10, 27, 0, 10), at(2030, 10, 27, 0, 30)),
        (BERLIN_0230, at(2030, 10, 27, 1, 10), at(2030, 10, 28, 1, 30)),
        (BERLIN_0230, at(2030, 10, 27, 0, 59), at(2030, 10, 28, 1, 30)),
    ],
)
def test_next_tick(options: dict[str, Any], after: datetime.datetime, tick: Any) -> None:
    schedule = pgqueue.App().periodic("report", **options)
    assert schedule.next_tick(after) == tick


@pytest.mark.parametrize(
    ("options", "at_", "tick"),
    [
        ({"every": 600}, at(2030, 1, 1, 12, 3, 7), at(2030, 1, 1, 12)),
        ({"every": 600}, at(2030, 1, 1, 12, 10), at(2030, 1, 1, 12, 10)),  # at or before
        ({"cron": "0 9 * * 1-5"}, at(2030, 1, 6, 12), at(2030, 1, 4, 9)),  # a Sunday: Friday's
        # The fall-back hour: from the second pass of 02:30 Berlin (01:30 UTC) the latest tick
        # is the first pass, 00:30 UTC, the one next_tick names (a reverse walk meets 01:30).
        (BERLIN_0230, at(2030, 10, 27, 1, 45), at(2030, 10, 27, 0, 30)),
        (BERLIN_0230, at(2030, 10, 27, 0, 20), at(2030, 10, 26, 0, 30)),
        ({"cron": "0 0 29 2 *"}, at(2030, 3, 1), at(2028, 2, 29)),
    ],
)
def test_previous_tick(options: dict[str, Any], at_: datetime.datetime, tick: Any) -> None:
    assert pgqueue.App().periodic("report", **options).previous_tick(at_) == tick


@pytest.mark.parametrize(
    "options",
    [
        BERLIN_0230,
        {"cron": "0 2 * * *", "timezone": "Europe/Berlin"},  # in the hour spring skips
        {"cron": "59 1 * * *", "timezone": "America/New_York"},
        {"cron": "*/7 9-17 * * 1-5"},
        {"every": 3 * 3600 + 17},
    ],
)
def test_previous_tick_is_the_tick_next_tick_names(options: dict[str, Any]) -> None:
    """Around both daylight saving changes of a year: the latest tick at or before a time is
    a tick, and the next one is after that time."""
    schedule = pgqueue.App().periodic("report", **options)
    for start in (at(2030, 3, 30), at(2030, 3, 9), at(2030, 10, 26), at(2030, 11, 2)):
        for minutes in range(0, 3 * 24 * 60, 13):
            when = start + datetime.timedelta(minutes=minutes, seconds=minutes % 60)
            tick = schedule.previous_tick(when)
            assert tick is not None and tick <= when < schedule.next_tick(tick), when
            assert schedule.next_tick(tick - datetime.timedelta(microseconds=1)) == tick, when


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({}, "give exactly one of cron= and every="),
        ({"cron": "* * * * *", "every": 60}, "give exactly one of cron= and every="),
        ({"cron": "61 * * * *"}, "bad cron '61 \\* \\* \\* \\*'"),
        ({"every": 0.5}, "every must be from 1 second to 100 years"),
        ({"every": float("nan")}, "every must be from 1 second to 100 years"),
        ({"every": datetime.timedelta.max.total_seconds()}, "from 1 second to 100 years"),
        ({"every": datetime.timedelta(days=3_000_000)}, "from 1 second to 100 years"),
        ({"cron": "0 0 * * * *"}, "must have five fields"),  # cronsim reads six as seconds
        # The last weekday of February that is also a Sunday (a day-of-week field starting
        # with '*' is ANDed with the day of month): never.
        ({"cron": "0 0 LW 2 */7"}, "has no tick after"),
        ({"every": 60, "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        # From a review of time handling: accepted, and ignored (every= ticks in UTC)...
        ({"every": 86400, "timezone": "Europe/Berlin"}, "timezone= goes with cron="),
        # ...or each host's own zone, so workers on hosts set differently made two jobs a tick.
        ({"cron": "0 9 * * *", "timezone": "localtime"}, "is the host's own"),
        ({"every": 60, "payload": {"at": {1, 2}}}, "not JSON serializable"),
        ({"every": 60, "name": ""}, "name must be 1 to 200 bytes"),
        ({"every": 60, "catch_up": "yes"}, "catch_up must be True or False"),
        # a TypeError comparing a timedelta with a str; an AttributeError on .split
        ({"every": "10"}, "every must be seconds or a timedelta, got '10'"),
        ({"cron": 123}, "cron must be a string, got 123"),
    ],
)
def test_bad_schedules_are_refused_when_registered(options: dict[str, Any], problem: str) -> None:
    app = pgqueue.App()
    with pytest.raises((ValueError, TypeError), match=problem):
        app.periodic("report", **options)
    assert app.schedules == {}


def test_two_schedules_of_one_type_need_two_names() -> None:
    app = pgqueue.App()
    app.periodic("report", cron="0 * * * *")
    with pytest.raises(ValueError, match="a schedule named 'report' is already registered"):
        app.periodic("report", cron="30 * * * *")
    assert app.periodic("report", cron="30 * * * *", name="report-half-past").name == (
        "report-half-past"
    )
    with pytest.raises(TypeError, match="every must be seconds or a timedelta, got True"):
        app.periodic("report", every=True, name="other")  # type: ignore[arg-type]
    assert isinstance(app.schedules["report"], Schedule)


@asynccontextmanager
async def workers(app: pgqueue.App, dsn: str, n: int, logger: logging.Logger) -> Any:
    async with anyio.create_task_group() as tg:
        started = []
        for _ in range(n):
            worker = pgqueue.Worker(app, dsn, handle_signals=False, logger=logger)
            tg.start_soon(worker.run)
            await worker.started.wait()
            started.append(worker)
        try:
            yield started
        finally:
            for worker in started:
                worker.stop()


async def test_workers_racing_for_ticks_make_one_job_each(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """Three workers know a schedule ticking every second; each tick becomes one job, run at
    its tick, with the queue of a handler registered after the schedule."""
    logger, log = records
    app = pgqueue.App()
    app.periodic("beat", {"n": 1}, every=1)
    ran: list[datetime.datetime | None] = []

    @app.job("beat", queue="beats")
    async def beat(job: pgqueue.Job) -> None:
        ran.append(job.run_after)

    started = datetime.datetime.now(UTC)
    async with workers(app, db_dsn, 3, logger):

        async def three_run() -> bool:
            return len(ran) >= 3

        await wait_until(three_run, what="three ticks run")
    rows = await conn.fetch("SELECT run_after, queue, payload::text FROM pgqueue.jobs")
    ticks = sorted(r["run_after"] for r in rows)
    assert len(ticks) == len(set(ticks)) >= 3  # one job per tick, never two
    assert all(b - a == datetime.timedelta(seconds=1) for a, b in itertools.pairwise(ticks))
    assert all(t.microsecond == 0 and t > started for t in ticks)  # whole seconds, none missed
    assert {(r["queue"], r["payload"]) for r in rows} == {("beats", '{"n": 1}')}
    assert sorted(t for t in ran if t is not None) == ticks[: len(ran)]
    last = await conn.fetchrow("SELECT last_tick, last_job_id FROM pgqueue.periodic")
    assert last["last_tick"] == ticks[-1]
    assert log.count("enqueued as job") == len(ticks)  # the losers of a race log nothing


async def test_a_missed_tick_is_caught_up_once_when_workers_start(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """The schedule enqueued a tick before, then missed two (no worker ran): two workers
    that start make up the latest of them, once; the older one stays skipped."""
    logger, log = records
    app = pgqueue.App()
    schedule = app.periodic("daily", every=86400, catch_up=True)  # no tick falls between
    # this test's look and the workers'

    @app.job("daily")
    async def daily(job: pgqueue.Job) -> None:
        return None

    missed = schedule.previous_tick(datetime.datetime.now(UTC))
    assert missed is not None
    await conn.execute(
        "INSERT INTO pgqueue.periodic (name, last_tick) VALUES ('daily', $1)",
        missed - datetime.timedelta(days=2),
    )
    async with workers(app, db_dsn, 2, logger):
        await wait_until(lambda: log.logged("periodic daily: missed tick"))
        job = await conn.fetchrow("SELECT id, run_after FROM pgqueue.jobs")
        assert job["run_after"] == missed  # due: it runs at once
        await wait_for_states(conn, [job["id"]])
        assert await conn.fetchval("SELECT last_tick FROM pgqueue.periodic") == missed
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 1
    assert log.count("periodic daily: missed tick") == 1  # the other worker found it done


async def test_catch_up_makes_up_nothing_for_a_schedule_that_never_ticked(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """Without a row the schedule never enqueued a tick, so it missed none (a first deploy
    does not run a nightly job at once); with a row at or past the latest tick, nothing is
    missed either."""
    logger, log = records
    schedule = pgqueue.App().periodic("hourly", every=3600, catch_up=True)
    missed = schedule.previous_tick(datetime.datetime.now(UTC))
    assert missed is not None
    outage = Outage(logger, "test")
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=1)
    try:

        async def catch_up() -> None:
            await scheduler._enqueue_tick(
                pool,
                pgqueue.App(),
                schedule,
                missed,
                missed + datetime.timedelta(hours=1),
                anyio.CapacityLimiter(1),
                outage,
                logger,
                sql=scheduler._CATCH_UP,
            )

        await catch_up()
        assert await conn.fetchval("SELECT count(*) FROM pgqueue.periodic") == 0
        await conn.execute(
            "INSERT INTO pgqueue.periodic (name, last_tick) VALUES ('hourly', $1)", missed
        )
        await catch_up()
        assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0
        await conn.execute("UPDATE pgqueue.periodic SET last_tick = last_tick - interval '1 s'")
        await catch_up()  # the guard is what held it back: one second earlier, it is made up
        assert await conn.fetchval("SELECT run_after FROM pgqueue.jobs") == missed
    finally:
        await pool.close()
    assert log.count("missed tick") == 1


async def test_a_refused_spec_is_logged_each_tick_and_the_worker_goes_on(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    logger, log = records
    app = pgqueue.App()
    app.periodic("beat", every=1, queue="q" * 300)  # PostgreSQL refuses the queue's length

    async with workers(app, db_dsn, 1, logger):
        await wait_until(lambda: log.logged("refused: pgqueue.enqueue_periodic: spec: queue"))
        ok = await pgqueue.App().enqueue(conn, "other", max_attempts=1)
        await wait_until(
            lambda: conn.fetchval("SELECT state = 'failed' FROM pgqueue.jobs WHERE id = $1", ok),
            what="the worker still claims (and fails the unknown type)",
        )
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.periodic") == 0


async def test_a_schedule_whose_enqueue_waits_holds_up_no_other(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """An open transaction holds one schedule's row (a psql session mid-enqueue_periodic):
    the other schedule's ticks go on. One loop for all schedules stalled them all."""
    logger, _ = records
    app = pgqueue.App()
    app.periodic("held", every=1)
    app.periodic("free", every=1)
    await conn.execute(
        "SELECT pgqueue.enqueue_periodic('held', now() - interval '1 hour', '{\"job_type\": \"x\"}')"
    )
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM pgqueue.periodic WHERE name = 'held' FOR UPDATE")
        async with workers(app, db_dsn, 1, logger):

            async def free_ticked_twice() -> bool:
                n = await conn.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE job_type = 'free'")
                return bool(n >= 2)

            await wait_until(free_ticked_twice, within=10, what="two ticks of the free schedule")


async def test_at_most_max_enqueues_ticks_wait_at_once(
    conn: asyncpg.Connection, db_dsn: str, records: tuple[logging.Logger, Records]
) -> None:
    """Four schedules whose rows an open transaction holds: their enqueues wait on the row
    locks, but never more than MAX_ENQUEUES of them at once (each keeps a pooled connection,
    which claims and outcomes need), as pg_stat_activity shows while they wait. Once the rows
    are free, every schedule ticks."""
    logger, _ = records
    app = pgqueue.App()
    names = [f"held{i}" for i in range(4)]
    for name in names:
        app.periodic("x", every=1, name=name)
        await conn.execute(
            "SELECT pgqueue.enqueue_periodic($1, now() - interval '1 hour', '{\"job_type\": \"x\"}')",
            name,
        )
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'pgqueue-worker %'"
        " AND wait_event_type = 'Lock' AND query LIKE '%enqueue_periodic%'"
    )
    observer = await asyncpg.connect(db_dsn)
    seen: list[int] = []
    try:
        async with workers(app, db_dsn, 1, logger):
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM pgqueue.periodic FOR UPDATE")

                async def two_waiting() -> bool:
                    seen.append(await observer.fetchval(waiting))
                    return seen[-1] >= scheduler.MAX_ENQUEUES

                await wait_until(two_waiting, what="the enqueues waiting on the held rows")
                for _ in range(100):  # 2 s of the enqueues' retries (each waits up to 2 s)
                    seen.append(await observer.fetchval(waiting))
                    await anyio.sleep(0.02)
            assert max(seen) == scheduler.MAX_ENQUEUES, seen

            async def every_schedule_ticked() -> bool:
                n = await conn.fetchval(
                    "SELECT count(*) FROM pgqueue.periodic WHERE last_tick > now() - interval '1 minute'"
                )
                return bool(n == len(names))

            await wait_until(every_schedule_ticked, within=10, what="every schedule's tick")
    finally:
        await observer.close()


async def test_ticks_stuck_on_locks_keep_no_slot_between_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two schedules whose enqueues keep hitting lock timeouts back off for as long as their
    next tick is away; holding a slot of the limiter across that backoff starved every other
    schedule of the worker. A slot is held for one try."""
    app = pgqueue.App()
    for name in "abc":
        app.periodic("x", every=60, name=name)
    tries: list[str] = []

    async def call(pool: Any, bound: float, op: Any, sql: str, name: str, *args: Any) -> int:
        tries.append(name)
        if name != "c":
            raise asyncpg.exceptions.LockNotAvailableError("row held elsewhere")
        return 1

    monkeypatch.setattr(scheduler.bounded, "call", call)
    slots = anyio.CapacityLimiter(scheduler.MAX_ENQUEUES)
    logger = logging.getLogger("pgqueue.test.stuck")
    now = datetime.datetime.now(UTC)
    later = now + datetime.timedelta(seconds=30)

    def tick(name: str) -> Any:
        schedule = app.schedules[name]
        return scheduler._enqueue_tick(
            None, app, schedule, now, later, slots, Outage(logger, name), logger
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick, "a")
        tg.start_soon(tick, "b")

        async def both_stuck() -> bool:
            return {"a", "b"} <= set(tries)

        await wait_until(both_stuck, what="both stuck schedules trying")
        with anyio.fail_after(5):  # they back off for up to 30 s
            await tick("c")
        tg.cancel_scope.cancel()
    assert tries.count("c") == 1


async def test_ticks_fall_on_the_databases_clock_not_the_hosts(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From the review: a worker whose host clock ran ahead enqueued coming ticks early and
    moved the schedule past ticks the others had not enqueued yet; each of those was lost,
    unlogged. Here the host clock is an hour ahead: the ticks enqueued are the database's
    next ones, and the schedule never runs ahead of the database."""
    logger, log = records

    _host_clock_ahead(monkeypatch)
    async with workers(_beat_every_second(), db_dsn, 1, logger):
        await wait_until(lambda: log.logged("enqueued as job"), what="a tick enqueued")
    await _assert_schedule_not_ahead(conn)
    runs = await conn.fetchval(
        "SELECT max(run_after) - clock_timestamp() FROM pgqueue.jobs WHERE job_type = 'beat'"
    )
    assert runs < datetime.timedelta(seconds=2), runs


async def test_a_tick_early_by_the_databases_clock_is_not_enqueued(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From the review of the database clock: when its first reading failed (a database
    failing over as workers start), the loops ran on the host's clock, an hour ahead here,
    and the first tick moved the schedule an hour past the ticks of every other worker. The
    database now refuses a tick that is early by its own clock; the worker takes its clock
    from that answer and goes on with the database's next tick."""
    logger, log = records
    _host_clock_ahead(monkeypatch)

    async def unreadable(conn: asyncpg.Connection) -> datetime.datetime:
        raise OSError("connection refused")

    monkeypatch.setattr(scheduler, "_database_time", unreadable)
    async with workers(_beat_every_second(), db_dsn, 1, logger):
        await wait_until(lambda: log.logged("enqueued as job"), what="a tick enqueued")
    assert log.count("could not read the database's clock yet") == 1
    assert log.count("away by the database's clock") == 1
    await _assert_schedule_not_ahead(conn)


def _host_clock_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    host_now = scheduler._host_now
    monkeypatch.setattr(scheduler, "_host_now", lambda: host_now() + datetime.timedelta(hours=1))


def _beat_every_second() -> pgqueue.App:
    app = pgqueue.App()
    app.periodic("beat", every=1)

    @app.job("beat")
    async def beat(job: pgqueue.Job) -> None:
        return None

    return app


async def _assert_schedule_not_ahead(conn: asyncpg.Connection) -> None:
    ahead = await conn.fetchval(
        "SELECT max(last_tick) - clock_timestamp() FROM pgqueue.periodic WHERE name = 'beat'"
    )
    assert ahead < datetime.timedelta(seconds=2), ahead


@pytest.mark.parametrize("catch_up", [False, True])
async def test_a_blocked_event_loop_does_not_enqueue_the_ticks_it_slept_through(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    catch_up: bool,
) -> None:
    """From a review of time handling: a worker whose loop woke seconds late (a suspended
    process; here a blocked event loop) enqueued the first tick it slept through, late, and
    with catch_up the latest one as well: a nightly job ran hours late, or twice. Now the
    ticks past are not made up, but for the latest with catch_up."""
    logger, log = records
    app = pgqueue.App()
    app.periodic("beat", every=1, catch_up=catch_up)

    @app.job("beat")
    async def beat(job: pgqueue.Job) -> None:
        return None

    async with workers(app, db_dsn, 1, logger):
        await wait_until(lambda: log.logged("enqueued as job"), what="a tick enqueued")
        before = await conn.fetchval("SELECT clock_timestamp()")
        time.sleep(3.6)  # noqa: ASYNC251 (the point: the event loop held up, 3 ticks long)
        after = await conn.fetchval("SELECT clock_timestamp() - interval '50 ms'")
        await wait_until(lambda: log.logged("not enqueued by this worker"), what="the skip")
        await anyio.sleep(1.2)  # the next tick, on time
    slept_through = await conn.fetchval(
        "SELECT count(*) FROM pgqueue.jobs WHERE run_after > $1 AND run_after <= $2", before, after
    )
    assert slept_through == (1 if catch_up else 0), log.text()
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs WHERE run_after > $1", after)


async def test_a_tick_meeting_a_read_only_database_is_enqueued_once_it_is_writable(
    conn: asyncpg.Connection,
    db_dsn: str,
    pg_base_dsn: str,
    records: tuple[logging.Logger, Records],
) -> None:
    """From a review of time handling: a tick whose enqueue met a set-up error (a standby
    after a failover, default_transaction_read_only, a database refusing connections) was
    logged as refused and lost, though the database was writable again seconds later. It is
    retried within the tick's time, as during an outage."""
    logger, log = records
    app = pgqueue.App()
    app.periodic("beat", every=2)

    @app.job("beat")
    async def beat(job: pgqueue.Job) -> None:
        return None

    database = urlsplit(db_dsn).path.lstrip("/")
    terminate = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = $1 AND pid <> pg_backend_pid()"
    )
    admin = await asyncpg.connect(pg_base_dsn)
    try:
        async with workers(app, db_dsn, 1, logger):
            await wait_until(lambda: log.logged("enqueued as job"), what="a tick enqueued")
            await admin.execute(f"ALTER DATABASE {database} SET default_transaction_read_only = on")
            await admin.fetchval(terminate, database)  # new sessions: read-only
            refused = "while enqueueing tick"
            await wait_until(lambda: log.logged(refused), what="a tick refused")
            await admin.execute(f"ALTER DATABASE {database} RESET default_transaction_read_only")
            await admin.fetchval(terminate, database)
            line = next(r.getMessage() for r in log.records if refused in r.getMessage())
            assert "read-only" in line, line
            found = re.findall(r"enqueueing tick (\S+) ", line)
            assert found, line
            tick = datetime.datetime.fromisoformat(found[0])
            fresh = await asyncpg.connect(db_dsn)
            try:
                ticked = "SELECT count(*) FROM pgqueue.jobs WHERE run_after = $1"
                await wait_until(
                    lambda: _positive(fresh.fetchval(ticked, tick)), what="that tick enqueued"
                )
            finally:
                await fresh.close()
    finally:
        await admin.execute(f"ALTER DATABASE {database} RESET default_transaction_read_only")
        await admin.close()
    assert log.count("refused") == 0, log.text()


async def _positive(value: Any) -> bool:
    return bool(await value)


async def test_a_missed_tick_early_by_the_databases_clock_is_caught_up_from_its_time(
    conn: asyncpg.Connection,
    db_dsn: str,
    records: tuple[logging.Logger, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From a review of time handling: with the first clock reading failed and the host an
    hour ahead, the missed tick the worker tried was an hour early by the database's clock,
    refused, and never tried again from the database's time: the tick the schedule missed
    was not made up."""
    logger, log = records
    _host_clock_ahead(monkeypatch)

    async def unreadable(conn: asyncpg.Connection) -> datetime.datetime:
        raise OSError("connection refused")

    monkeypatch.setattr(scheduler, "_database_time", unreadable)
    app = pgqueue.App()
    schedule = app.periodic("hourly", every=3600, catch_up=True)

    @app.job("hourly")
    async def hourly(job: pgqueue.Job) -> None:
        return None

    now = await conn.fetchval("SELECT clock_timestamp()")
    missed = schedule.previous_tick(now)
    assert missed is not None
    await conn.execute(
        "INSERT INTO pgqueue.periodic (name, last_tick) VALUES ('hourly', $1)",
        missed - datetime.timedelta(days=1),
    )
    async with workers(app, db_dsn, 1, logger):
        await wait_until(lambda: log.logged("periodic hourly: missed tick"), what="caught up")
    assert await conn.fetchval("SELECT run_after FROM pgqueue.jobs") == missed
