"""The fast paths of enqueue make exactly the rows the general paths make.

``pgqueue.enqueue`` takes a plain INSERT when the job has no dedup key, dependency,
follow-ups or pipeline; ``pgqueue.enqueue_many`` has a typed-array overload that
``App.enqueue_many`` uses for plain specs. Each pair runs in one transaction, so
``now()`` (run_after and created_at defaults) is the same for both sides and whole
rows can be compared.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import asyncpg
import pytest
from sqlharness import Connect, json_codecs

from pgqueue import App
from pgqueue.dsn import dumps

ROWS = "SELECT to_jsonb(j) - 'id' AS r FROM pgqueue.jobs j WHERE j.id = ANY($1) ORDER BY j.id"
WHEN = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


async def _rows(conn: asyncpg.Connection, ids: list[int]) -> list[dict[str, Any]]:
    return [r["r"] for r in await conn.fetch(ROWS, ids)]


def _app() -> App:
    app = App()

    @app.job("registered", queue="reg", max_attempts=7)
    async def registered(job: object) -> None:  # pragma: no cover - never run
        return None

    return app


PLAIN_SPECS: list[dict[str, Any]] = [
    {"job_type": "a"},
    {"job_type": "b", "payload": {"x": [1, 2], "y": None}, "queue": "q1"},
    {"job_type": "c", "payload": None, "queue": None, "priority": -3, "max_attempts": 2},
    {"job_type": "d", "scope": {"site": 1, "year": 2024}, "run_after": WHEN},
    {"job_type": "e", "scope": None, "priority": None, "max_attempts": None, "run_after": None},
    {"job_type": "f", "scope": "plain string scope"},
    {"job_type": "registered"},
    {"job_type": "registered", "queue": "mine", "max_attempts": 1},
]


async def test_app_typed_path_makes_the_rows_the_spec_path_makes(connect: Connect) -> None:
    conn = await json_codecs(await connect())
    app = _app()
    assert app._plain_columns(PLAIN_SPECS) is not None  # the fast path is taken
    async with conn.transaction():
        fast = await app.enqueue_many(conn, PLAIN_SPECS)
        spec_path = [
            r[0]
            for r in await conn.fetch(
                "SELECT pgqueue.enqueue_many($1::text::jsonb)",
                dumps([app.with_defaults(s) for s in PLAIN_SPECS]),  # the old App path
            )
        ]
    assert len(fast) == len(spec_path) == len(PLAIN_SPECS)
    assert fast == sorted(fast)  # ids in spec order
    fast_rows, spec_rows = await _rows(conn, fast), await _rows(conn, spec_path)
    # The second batch's scoped jobs wait behind the first's (same scopes): blocked.
    assert [r.pop("scope_blocked") for r in fast_rows] == [False] * len(PLAIN_SPECS)
    assert [r.pop("scope_blocked") for r in spec_rows] == [
        s.get("scope") is not None for s in PLAIN_SPECS
    ]
    assert fast_rows == spec_rows
    rows = await _rows(conn, fast)
    assert [(r["queue"], r["max_attempts"]) for r in rows[-2:]] == [("reg", 7), ("mine", 1)]
    assert rows[3]["scope"] == {"site": 1, "year": 2024} and rows[4]["scope"] is None


async def test_sql_typed_overload_matches_specs(connect: Connect) -> None:
    conn = await json_codecs(await connect())
    async with conn.transaction():
        typed = [
            r[0]
            for r in await conn.fetch(
                """SELECT pgqueue.enqueue_many(
                       ARRAY['a', 'b', 'c'],
                       ARRAY['{"k": 1}', NULL, '{}']::jsonb[],
                       queues => ARRAY[NULL, 'q', 'q'],
                       priorities => ARRAY[1, NULL, 2],
                       max_attempts => ARRAY[NULL, 9, 1],
                       run_afters => ARRAY[NULL, NULL, '2030-01-02 03:04:05+00']::timestamptz[],
                       scopes => ARRAY[NULL, 'null', '[1, "x"]']::jsonb[])"""
            )
        ]
        specs = [
            {"job_type": "a", "payload": {"k": 1}, "priority": 1},
            {"job_type": "b", "queue": "q", "max_attempts": 9, "scope": None},
            {
                "job_type": "c",
                "queue": "q",
                "priority": 2,
                "max_attempts": 1,
                "run_after": "2030-01-02T03:04:05+00:00",
                "scope": [1, "x"],
            },
        ]
        spec_path = [
            r[0] for r in await conn.fetch("SELECT pgqueue.enqueue_many($1::jsonb)", specs)
        ]
    assert typed == sorted(typed)
    typed_rows, spec_rows = await _rows(conn, typed), await _rows(conn, spec_path)
    # the spec path's scoped job waits behind the typed path's (same scope): blocked
    assert [r.pop("scope_blocked") for r in typed_rows] == [False, False, False]
    assert [r.pop("scope_blocked") for r in spec_rows] == [False, False, True]
    assert typed_rows == spec_rows


async def test_typed_overload_with_no_jobs_writes_nothing(connect: Connect) -> None:
    conn = await connect()
    assert await conn.fetch("SELECT pgqueue.enqueue_many('{}'::text[], NULL)") == []
    assert await conn.fetch("SELECT pgqueue.enqueue_many(NULL::text[], NULL)") == []
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0


@pytest.mark.parametrize(
    "spec",
    [
        {"job_type": "t", "dedup_key": "k"},
        {"job_type": "t", "key": "a"},
        {"job_type": "t", "depends_on": []},
        {"job_type": "t", "next_jobs": [{"job_type": "u"}]},
        {"job_type": "t", "pipeline_id": "8a6e0804-2bd0-4672-b79d-d97358845ecf"},
        {"job_type": "t", "paylod": {}},  # a typo: the spec path names it
        {"job_type": 3},
        {"job_type": "t", "queue": 5},
        {"job_type": "t", "priority": True},
        {"job_type": "t", "priority": 1.5},
        {"job_type": "t", "priority": 2**31},
        {"job_type": "t", "max_attempts": 2**31},
        {"job_type": "t", "max_attempts": -(2**40)},
        {"job_type": "t", "run_after": "2030-01-02T03:04:05+00:00"},
        # A naive datetime is read as UTC on every path (with_defaults makes it aware), so it
        # takes the typed path: tests/runtime/test_api_inputs.py.
    ],
)
def test_specs_the_typed_path_would_read_differently_take_the_spec_path(
    spec: dict[str, Any],
) -> None:
    assert _app()._plain_columns([{"job_type": "plain"}, spec]) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"job_type": ""}, "pgqueue.enqueue_many[1]: job_type must be a non-blank string"),
        ({"job_type": "t", "payload": [1]}, "pgqueue.enqueue_many[1]: payload must be a JSON"),
        ({"job_type": "t", "queue": ""}, "pgqueue.enqueue_many[1]: queue must be a non-blank"),
        ({"job_type": "t", "max_attempts": 0}, "pgqueue.enqueue_many[1]: max_attempts must be"),
        ({"job_type": "t", "scope": "x" * 1000}, "pgqueue.enqueue_many[1]: scope must be at most"),
    ],
)
async def test_app_bad_plain_spec_names_it_as_the_spec_path_does(
    connect: Connect, spec: dict[str, Any], message: str
) -> None:
    conn = await connect()
    app = _app()
    specs = [{"job_type": "ok"}, spec]
    assert app._plain_columns(specs) is not None
    with pytest.raises(asyncpg.PostgresError) as fast:
        await app.enqueue_many(conn, specs)
    with pytest.raises(asyncpg.PostgresError) as spec_path:
        await conn.fetch("SELECT pgqueue.enqueue_many($1::text::jsonb)", dumps(specs))
    assert message in str(fast.value)
    assert message in str(spec_path.value)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0


@pytest.mark.parametrize(
    ("payload", "got"),
    [([], "array"), ([("a", 1)], "array"), ("ab", "string"), (5, "number"), (True, "boolean")],
)
async def test_app_enqueue_refuses_a_payload_that_is_no_object(
    connect: Connect, payload: Any, got: str
) -> None:
    """The payload goes to SQL as it is, which names the problem; it was once made a dict on
    the way (an empty list became {}, a list of pairs an object, a string a ValueError)."""
    conn = await connect()
    with pytest.raises(asyncpg.PostgresError, match=f"payload must be a JSON object, got {got}"):
        await _app().enqueue(conn, "t", payload)
    assert await conn.fetchval("SELECT count(*) FROM pgqueue.jobs") == 0
    assert await _app().enqueue(conn, "t", None) > 0  # None: the default, {}


async def test_single_enqueue_fast_path_matches_the_general_path(connect: Connect) -> None:
    conn = await json_codecs(await connect())
    args = "'t', '{\"a\": 1}', 'q', '{\"s\": [1]}', %s, now() + interval '1 hour', 4, 3"
    async with conn.transaction():
        fast = await conn.fetchval(f"SELECT pgqueue.enqueue({args % 'NULL'})")
        general = await conn.fetchval(f"SELECT pgqueue.enqueue({args % repr('key')})")
        fast_defaults = await conn.fetchval("SELECT pgqueue.enqueue('d', scope => 'null')")
        general_defaults = await conn.fetchval(
            "SELECT pgqueue.enqueue('d', dedup_key => 'key2', scope => 'null')"
        )
    rows = await _rows(conn, [fast, general, fast_defaults, general_defaults])
    assert rows[1].pop("dedup_key") == "key" and rows[3].pop("dedup_key") == "key2"
    del rows[0]["dedup_key"], rows[2]["dedup_key"]
    assert rows[0] == rows[1] and rows[2] == rows[3]
    assert rows[2]["scope"] is None and rows[2]["max_attempts"] == 5
    assert json.dumps(rows[0]["payload"]) == '{"a": 1}'
