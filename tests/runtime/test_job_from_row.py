"""The worker builds each claimed Job with ``job_from_row`` (a faster path than the frozen
``__init__``): what it builds must be the Job ``Job.from_record`` makes of the same row."""

from __future__ import annotations

import dataclasses

import pytest

import pgqueue
from pgqueue import dsn as pgqueue_dsn
from pgqueue.job import job_from_row
from pgqueue.worker.producer import _CLAIM


async def test_claimed_rows_become_the_jobs_from_record_makes(db_dsn: str) -> None:
    conn = await pgqueue_dsn.connect(db_dsn)  # pgqueue's own codecs, as the worker's pool
    try:
        await conn.execute(
            """SELECT pgqueue.enqueue('a', '{"n": 1, "nested": {"x": [1, 2]}}');
               SELECT pgqueue.enqueue('b', '{}', queue => 'q2', priority => 5,
                                      scope => '{"tenant": 7}', dedup_key => 'k1',
                                      run_after => now() - interval '1 minute');"""
        )
        rows = await conn.fetch(_CLAIM, "w1", None, 10)
        assert len(rows) == 2
        for row in rows:
            job = job_from_row(row)
            expected = pgqueue.Job.from_record(row)
            assert type(job) is pgqueue.Job
            assert job == expected
            assert repr(job) == repr(expected)
            assert dataclasses.astuple(job) == dataclasses.astuple(expected)
            with pytest.raises(dataclasses.FrozenInstanceError):
                job.attempts = 99  # type: ignore[misc]
            # Unknown attributes are refused as on any Job (slots; Python 3.11's frozen
            # __setattr__ on a slotted class raises TypeError, later ones AttributeError).
            with pytest.raises((AttributeError, TypeError)):
                job.extra = 1  # type: ignore[attr-defined]
        by_type = {job_from_row(r).job_type: job_from_row(r) for r in rows}
        assert by_type["b"].scope == {"tenant": 7}
        assert by_type["a"].payload == {"n": 1, "nested": {"x": [1, 2]}}
        # A row that does not have Job's fields is refused, not half-built.
        with pytest.raises(TypeError):
            job_from_row(tuple(rows[0])[:-1])
    finally:
        await conn.close()
