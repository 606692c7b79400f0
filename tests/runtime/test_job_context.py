"""pgqueue.current_job and JobLogFilter: the job in hand, for code the handler calls."""

from __future__ import annotations

import logging

import asyncpg
from runtime_helpers import Records, running
from worker_harness import wait_for_states

import pgqueue


async def test_an_apps_log_records_inside_a_handler_name_the_job(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """From a review of pgqueue in an application: nothing put the job into the app's own
    log records (Celery and procrastinate do). With the filter on its handler, every record
    logged inside a handler (async, or a plain def in its thread) names the job, and one
    logged outside names none."""
    app = pgqueue.App()
    log = logging.getLogger("test_job_context.app")
    log.propagate = False
    records = Records()
    records.addFilter(pgqueue.JobLogFilter())
    log.addHandler(records)
    seen: list[pgqueue.Job | None] = []

    @app.job("in_loop")
    async def in_loop(job: pgqueue.Job) -> None:
        seen.append(pgqueue.current_job())
        log.warning("in loop")

    @app.job("in_thread")
    def in_thread(job: pgqueue.Job) -> None:
        seen.append(pgqueue.current_job())
        log.warning("in thread", extra={"job_id": "given"})

    try:
        job_ids = [await app.enqueue(conn, "in_loop"), await app.enqueue(conn, "in_thread")]
        async with running(app, db_dsn):
            await wait_for_states(conn, job_ids)
        log.warning("outside")
    finally:
        log.removeHandler(records)
    fields = {r.getMessage(): (r.job_id, r.job_type, r.attempt) for r in records.records}  # type: ignore[attr-defined]
    assert fields == {
        "in loop": (job_ids[0], "in_loop", 1),
        "in thread": ("given", "in_thread", 1),  # a field of the record's own stands
        "outside": (None, None, None),
    }
    assert sorted(job.id for job in seen if job is not None) == job_ids
    assert pgqueue.current_job() is None
