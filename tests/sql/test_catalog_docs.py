"""Every public object documents itself (COMMENT ON) and is covered by docs/sql.md.

Public = in schema pgqueue: tables and their columns, views (and their columns) and
functions whose names do not start with ``_``, and the user triggers on its tables.
``\\d+`` and ``\\df+`` in psql show these comments, so a missing one is a
hole in the documentation an operator sees.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

SQL_MD = Path(__file__).resolve().parents[2] / "docs" / "sql.md"

# Bookkeeping that alembic creates in schema pgqueue; not part of the contract.
NOT_PUBLIC_TABLES = {"alembic_version"}

# The contract (design.md); the catalog must hold at least these, so the
# checks below can never pass on an empty schema.
CONTRACT_FUNCTIONS = {
    "enqueue",
    "enqueue_many",
    "claim",
    "claim_next",
    "complete",
    "fail",
    "release",
    "heartbeat",
    "recover_stale",
    "cancel",
    "retry",
    "prune",
}
CONTRACT_VIEWS = {"queue_stats", "running_jobs", "stale_jobs", "pipelines", "current_jobs"}
CONTRACT_TABLES = {"jobs", "settings", "job_dependencies"}

PUBLIC_OBJECTS = """
SELECT 'table' AS kind, c.relname AS name, obj_description(c.oid, 'pg_class') AS comment
FROM pg_class c
WHERE c.relnamespace = 'pgqueue'::regnamespace AND c.relkind IN ('r', 'p')
  AND c.relname <> ALL ($1::text[])
UNION ALL
SELECT 'column', c.relname || '.' || a.attname, col_description(c.oid, a.attnum)
FROM pg_class c
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relnamespace = 'pgqueue'::regnamespace AND c.relkind IN ('r', 'p')
  AND c.relname <> ALL ($1::text[])
UNION ALL
SELECT 'view', c.relname, obj_description(c.oid, 'pg_class')
FROM pg_class c
WHERE c.relnamespace = 'pgqueue'::regnamespace AND c.relkind IN ('v', 'm') AND c.relname NOT LIKE '\\_%'
UNION ALL
SELECT 'column', c.relname || '.' || a.attname, col_description(c.oid, a.attnum)
FROM pg_class c
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relnamespace = 'pgqueue'::regnamespace AND c.relkind IN ('v', 'm') AND c.relname NOT LIKE '\\_%'
UNION ALL
SELECT 'function', p.oid::regprocedure::text, obj_description(p.oid, 'pg_proc')
FROM pg_proc p
WHERE p.pronamespace = 'pgqueue'::regnamespace AND p.proname NOT LIKE '\\_%'
UNION ALL
SELECT 'trigger', t.tgname, obj_description(t.oid, 'pg_trigger')
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.relnamespace = 'pgqueue'::regnamespace AND NOT t.tgisinternal
ORDER BY 1, 2
"""


async def _public_objects(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(PUBLIC_OBJECTS, sorted(NOT_PUBLIC_TABLES))


def _names(rows: list[asyncpg.Record], kind: str) -> set[str]:
    # functions come as regprocedure text: pgqueue.claim(bigint,text)
    return {re.sub(r"^pgqueue\.|\(.*$", "", r["name"]) for r in rows if r["kind"] == kind}


async def test_contract_objects_exist(conn: asyncpg.Connection) -> None:
    rows = await _public_objects(conn)
    assert CONTRACT_FUNCTIONS <= _names(rows, "function")
    assert CONTRACT_VIEWS <= _names(rows, "view")
    assert CONTRACT_TABLES <= _names(rows, "table")
    assert {"jobs_notify_inserted", "jobs_notify_requeued"} <= _names(rows, "trigger")


async def test_every_public_object_has_a_comment(conn: asyncpg.Connection) -> None:
    rows = await _public_objects(conn)
    missing = [
        f"{r['kind']} {r['name']}" for r in rows if r["comment"] is None or not r["comment"].strip()
    ]
    assert not missing, "public objects without a COMMENT ON:\n  " + "\n  ".join(missing)


async def test_sql_reference_mentions_every_public_object(conn: asyncpg.Connection) -> None:
    text = SQL_MD.read_text()
    rows = await _public_objects(conn)
    qualified = (
        _names(rows, "function") | _names(rows, "view") | _names(rows, "table")
    )  # referenced as pgqueue.<name>
    missing = sorted(
        f"pgqueue.{name}"
        for name in qualified
        if not re.search(rf"\bpgqueue\.{re.escape(name)}\b", text)
    )
    missing += sorted(
        name for name in _names(rows, "trigger") if not re.search(rf"\b{name}\b", text)
    )
    settings = await conn.fetch("SELECT name FROM pgqueue.settings ORDER BY name")
    missing += [f"setting {s['name']}" for s in settings if f"`{s['name']}`" not in text]
    assert not missing, f"{SQL_MD.name} never mentions: {', '.join(missing)}"


async def test_sql_reference_mentions_every_jobs_column(conn: asyncpg.Connection) -> None:
    text = SQL_MD.read_text()
    columns = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'pgqueue.jobs'::regclass"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    )
    missing = [c["attname"] for c in columns if f"`{c['attname']}`" not in text]
    assert not missing, f"{SQL_MD.name} does not document pgqueue.jobs columns: {missing}"


@pytest.mark.parametrize("page", ["sql.md", "cookbook.md"])
def test_psql_examples_print_what_the_page_shows(db_dsn: str, page: str) -> None:
    """A page's psql examples, pasted in order into a fresh database, print what the page
    shows (ids included). ``python scripts/sql_docs.py DSN --page ... --write`` updates it."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    script = SQL_MD.parents[1] / "scripts" / "sql_docs.py"
    proc = subprocess.run(
        [sys.executable, str(script), db_dsn, "--page", str(SQL_MD.parent / page), "--psql", psql],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
