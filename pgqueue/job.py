"""The job a handler receives: an immutable snapshot of its ``pgqueue.jobs`` row at claim time."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


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

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> Job:
        """Build a Job from a ``pgqueue.jobs`` row (an asyncpg Record or any mapping).

        JSON columns arrive decoded on pgqueue's own connections; text is decoded here too so a
        row fetched on a connection without our codecs gives the same Job.
        """
        return cls(
            id=row["id"],
            job_type=row["job_type"],
            queue=row["queue"],
            payload=_json(row["payload"]) or {},
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            priority=row.get("priority", 0),
            scope=_json(row.get("scope")),
            dedup_key=row.get("dedup_key"),
            pipeline_id=row.get("pipeline_id"),
            parent_id=row.get("parent_id"),
            run_after=row.get("run_after"),
            progress=_json(row.get("progress")),
            created_at=row.get("created_at"),
        )


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class Result:
    """Return this from a handler to store ``value`` and also create follow-up jobs.

    ``next_jobs`` are job specs (the keys of ``pgqueue.enqueue``'s parameters) created by
    ``pgqueue.complete`` in the same transaction that records the success, so children exist
    exactly when their parent has succeeded. A plain return value means ``Result(value)``.
    """

    value: Any = None
    next_jobs: list[dict[str, Any]] | None = None
