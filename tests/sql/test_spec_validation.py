"""The spec validator agrees with a model of the rules, on both its fast and its full path."""

from __future__ import annotations

import json
from typing import Any

import anyio.from_thread
import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlharness import Connect

# Numbers at the edges of the integer rules too: the int4 bounds, and floats with and
# without a fraction (3.0 is an integer to PostgreSQL's numeric, 1.5 is not).
EDGE_NUMBERS = st.sampled_from([2147483647, 2147483648, -2147483648, 1.5, 3.0, 0.0])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | EDGE_NUMBERS | st.text(" ab", max_size=3),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text("ab", max_size=2), inner, max_size=2)
    ),
    max_leaves=4,
)
# max_attempts is on the fast path (App.with_defaults adds it), priority only on the full one.
KEYS = ["job_type", "payload", "queue", "bogus", "priority", "max_attempts"]


def integral(value: Any, low: int, high: int) -> bool:
    """A JSON number with no fraction within [low, high] (booleans are not numbers)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and float(value).is_integer()
        and low <= value <= high
    )


def model_valid(spec: dict[str, Any]) -> bool:
    """The rules for these keys, written independently of the SQL."""
    if set(spec) - {"job_type", "payload", "queue", "priority", "max_attempts"}:
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
    priority, max_attempts = spec.get("priority"), spec.get("max_attempts")
    if priority is not None and not integral(priority, -2147483647, 2147483647):
        return False
    return max_attempts is None or integral(max_attempts, 1, 2147483647)


def test_spec_problem_matches_the_model(db_dsn: str) -> None:
    with anyio.from_thread.start_blocking_portal() as portal:
        conn: asyncpg.Connection = portal.call(asyncpg.connect, db_dsn)
        checked = 0
        try:

            @settings(
                max_examples=600,
                deadline=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(st.dictionaries(st.sampled_from(KEYS), JSON_VALUES | st.just("job"), max_size=5))
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


async def test_fast_and_full_path_agree_on_max_attempts(connect: Connect) -> None:
    """Every value of max_attempts, on a spec the fast path may settle and on the same spec
    with a (valid) priority, which only the full path checks: one verdict, the model's."""
    values: list[Any] = [3, 1, 0, -1, 2147483647, 2147483648, 3.0, 1.5, 1e2, "3", True, None]
    values += [[], {}, -2147483648]
    db = await connect()
    for value in values:
        fast = {"job_type": "noop", "queue": "q", "key": "k", "max_attempts": value}
        full = {**fast, "priority": 0}
        verdicts = [
            await db.fetchval("SELECT pgqueue._spec_problem($1::jsonb)", json.dumps(spec))
            for spec in (fast, full)
        ]
        expected = value is None or integral(value, 1, 2147483647)
        assert [v is None for v in verdicts] == [expected, expected], (value, verdicts)
