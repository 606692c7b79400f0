"""The spec validator agrees with a model of the rules, on both its fast and its full path."""

from __future__ import annotations

import json
from typing import Any

import anyio.from_thread
import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(" ab", max_size=3),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text("ab", max_size=2), inner, max_size=2)
    ),
    max_leaves=4,
)
KEYS = ["job_type", "payload", "queue", "bogus", "priority"]


def model_valid(spec: dict[str, Any]) -> bool:
    """The rules for these keys, written independently of the SQL."""
    if set(spec) - {"job_type", "payload", "queue", "priority"}:
        return False
    job_type = spec.get("job_type")
    if not isinstance(job_type, str) or job_type.strip(" ") == "":
        return False
    if spec.get("payload") is not None and not isinstance(spec["payload"], dict):
        return False
    queue = spec.get("queue")
    if queue is not None and (
        not isinstance(queue, str) or queue.strip(" ") == "" or len(queue.encode()) > 200
    ):
        return False
    priority = spec.get("priority")
    return priority is None or (isinstance(priority, int) and not isinstance(priority, bool))


def test_spec_problem_matches_the_model(db_dsn: str) -> None:
    with anyio.from_thread.start_blocking_portal() as portal:
        conn: asyncpg.Connection = portal.call(asyncpg.connect, db_dsn)
        checked = 0
        try:

            @settings(
                max_examples=300,
                deadline=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(st.dictionaries(st.sampled_from(KEYS), JSON_VALUES | st.just("job"), max_size=4))
            def check(spec: dict[str, Any]) -> None:
                nonlocal checked
                problem = portal.call(
                    conn.fetchval, "SELECT pgqueue._spec_problem($1::jsonb)", json.dumps(spec)
                )
                assert (problem is None) == model_valid(spec), (spec, problem)
                checked += 1

            check()
        finally:
            portal.call(conn.close)
        assert checked >= 100
