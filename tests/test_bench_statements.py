"""The benchmarks' SQL still names what the schema has.

CI does not run ``python -m bench`` (it takes minutes and wants a quiet machine), so a
statement left behind by a schema change (an internal function renamed or dropped) broke
the benchmark command only when someone next ran it. Preparing a statement plans it
against the live catalog without running it.
"""

from __future__ import annotations

import re

import asyncpg
import pytest

from bench import lean_worker, pgq

STATEMENT = re.compile(r"\s*(EXPLAIN|SELECT|WITH|INSERT|UPDATE|DELETE)\b", re.IGNORECASE)
STATEMENTS = {
    f"{module.__name__}.{name}": value
    for module in (pgq, lean_worker)
    for name, value in vars(module).items()
    if name.isupper() and isinstance(value, str) and STATEMENT.match(value)
}


def test_the_statements_are_found() -> None:
    assert {"bench.pgq.EXPLAIN_PICK", "bench.pgq.CLAIM_ONE", "bench.lean_worker.CLAIM"} <= set(
        STATEMENTS
    )


@pytest.mark.parametrize("name", sorted(STATEMENTS))
async def test_a_benchmark_statement_plans_against_the_schema(
    conn: asyncpg.Connection, name: str
) -> None:
    sql = STATEMENTS[name].lstrip()
    if sql.upper().startswith("EXPLAIN"):
        sql = sql[sql.index("\n") :]  # the statement it explains
    await conn.prepare(sql)
