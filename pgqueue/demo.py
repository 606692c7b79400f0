"""``pgqueue demo``: the emissions pipeline end to end, printed the way psql would show it.

With no DSN (no ``--dsn``, no ``$PGQUEUE_DSN``) it starts a throwaway embedded PostgreSQL
from the ``pgserver`` package (``pip install 'pgqueue[embedded]'``). It migrates the
database, creates the example's tables, runs an in-process :class:`~pgqueue.Worker` with
the handlers of ``examples/emissions/app.py``, enqueues a factor ingest as a new pipeline and
prints ``pgqueue.pipelines`` and the pipeline's jobs as they change. Exit status 0 when the
pipeline succeeded. Its worker claims only the example's queues. Given a DSN, it uses that
database and leaves the example's tables (schema ``emissions``) and jobs in it, to look at
in psql afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import asyncpg
import click

_PACKAGE_DIR = Path(__file__).resolve().parent
EXAMPLE_MODULE = "pgqueue_emissions_example"
DEADLINE = 45.0  # seconds; the demo takes about two

_STATUS_COLUMNS = "jobs, waiting, queued, running, succeeded, failed, cancelled, done, state"
_STATUS_SQL = f"SELECT {_STATUS_COLUMNS} FROM pgqueue.pipelines WHERE pipeline_id = $1"
_STALE_SQL = "SELECT result->'stale' FROM pgqueue.jobs WHERE id = $1"
_AGGREGATIONS_SQL = "SELECT sum(aggregations) FROM emissions.module_stats"
_JOBS_SQL = (
    "SELECT id, job_type, state, parent_id, scope, result FROM pgqueue.jobs"
    " WHERE pipeline_id = $1 ORDER BY id"
)


def run_demo(dsn: str | None) -> None:
    """Run the demo on ``dsn``, or on an embedded PostgreSQL when it is None."""
    example = load_example()
    with _database(dsn) as target:
        from pgqueue import migrate

        _say(f"-- pgqueue migrate ({_redact(target)})")
        migrate.upgrade(target)
        ok = anyio.run(_demo, target, example)
    if not ok:
        raise click.ClickException("the demo pipeline did not succeed")


def example_path() -> Path:
    """examples/emissions/app.py: shipped in the package, or in the checkout."""
    for candidate in (
        _PACKAGE_DIR / "_examples" / "emissions" / "app.py",
        _PACKAGE_DIR.parent / "examples" / "emissions" / "app.py",
    ):
        if candidate.is_file():
            return candidate
    raise click.ClickException(
        "the emissions example (examples/emissions/app.py) is not in this installation"
    )


def load_example() -> ModuleType:
    """Import the example app from its file (it is not a package module)."""
    if EXAMPLE_MODULE in sys.modules:
        return sys.modules[EXAMPLE_MODULE]
    path = example_path()
    spec = importlib.util.spec_from_file_location(EXAMPLE_MODULE, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[EXAMPLE_MODULE] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _database(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver.postgres_server import get_server
    except ImportError:
        raise click.ClickException(
            "no DSN given and no embedded PostgreSQL: pip install 'pgqueue[embedded]'"
            " (or pass --dsn / set PGQUEUE_DSN)"
        ) from None
    _say("-- no DSN given: starting an embedded PostgreSQL (pgserver)")
    with tempfile.TemporaryDirectory(prefix="pgqueue-demo-") as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                server = get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
        except Exception as exc:  # an OSError here is not "cannot connect" (the CLI's reading)
            raise click.ClickException(
                f"could not start the embedded PostgreSQL (pgserver): {type(exc).__name__}: {exc}"
            ) from exc
        try:
            yield server.get_uri("postgres")
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                server.cleanup()


async def _demo(dsn: str, example: ModuleType) -> bool:
    from pgqueue.worker import Worker

    example.configure(dsn)
    conn = await asyncpg.connect(dsn)
    ok = False
    try:
        _say("-- creating the example's tables (schema emissions) and sample activity data")
        await example.setup(conn)
        # Only the example's queues: on a database of the user's, other jobs are not ours.
        queues = sorted({t.queue for t in example.app.job_types.values()})
        worker = Worker(
            example.app,
            dsn,
            queues=queues,
            concurrency=4,
            poll_interval=0.5,
            handle_signals=False,
        )
        # Counted before: on a database the demo ran on before, the example's tables hold
        # what those runs did, and each step is told from what its own run found.
        before = await conn.fetchval(_AGGREGATIONS_SQL) or 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(15):
                await worker.started.wait()
            try:
                csv_text = example.SAMPLE_CSV.read_text(encoding="utf-8")
                ok = await _run_pipeline(conn, example, "1. upload factors.csv", csv_text)
                ok = ok and await _run_pipeline(
                    conn, example, "2. upload the same file again", csv_text
                )
                changed = csv_text.replace(",natural_gas,,0.202", ",natural_gas,,0.19")
                ok = ok and await _run_pipeline(
                    conn, example, "3. one factor changed (natural gas, used for heating)", changed
                )
            finally:
                worker.stop()
        await _show(
            conn,
            "SELECT module, year, kg_co2e, aggregations, job_id FROM emissions.module_stats",
        )
        after = await conn.fetchval(_AGGREGATIONS_SQL) or 0
        counted = f"= {after}" if before == 0 else f"{before} -> {after}"
        if not ok:
            _say("the demo pipeline did not succeed")
        elif after - before == 3:
            _say(
                f"aggregations {counted}: one per upload, however many recalculations each"
                " one fanned out"
            )
        else:
            _say(f"aggregations {counted}: expected one per upload (3 more)")
            ok = False
    finally:
        await example.close()
        await conn.close()
    return ok


async def _run_pipeline(
    conn: asyncpg.Connection, example: ModuleType, title: str, csv: str
) -> bool:
    _say(f"\n=== {title}")
    run = await example.start_ingest(conn, csv, simulate_seconds=0.2)
    pid: uuid.UUID = run.pipeline_id
    _say(f"-- enqueued ingest_factors as job {run.job_ids[0]} of pipeline {pid}")
    seen: tuple[Any, ...] | None = None
    deadline = time.monotonic() + DEADLINE
    while True:
        row = await conn.fetchrow(_STATUS_SQL, pid)
        counts = None if row is None else tuple(row.values())
        if counts != seen and row is not None:
            seen = counts
            _table(
                f"SELECT {_STATUS_COLUMNS} FROM pgqueue.pipelines WHERE pipeline_id = '{pid}';",
                [row],
            )
        if row is not None and row["done"]:
            break
        if time.monotonic() > deadline:
            _say(f"-- gave up waiting after {DEADLINE:g}s")
            return False
        await anyio.sleep(0.05)
    await _show(
        conn,
        f"SELECT id, job_type, state, parent_id, scope, result FROM pgqueue.jobs"
        f" WHERE pipeline_id = '{pid}' ORDER BY id;",
        _JOBS_SQL,
        pid,
    )
    found = await conn.fetchval(_STALE_SQL, run.job_ids[0])  # jsonb, as text
    stale = None if found is None else json.loads(found)
    if stale:
        named = ", ".join("(no type)" if t is None else t for t in stale)
        _say(f"-- stale: {named}: one recalculation each, then one aggregation joins them")
    elif stale is not None:
        _say("-- nothing stale: no recalculation, the aggregation ran at once")
    return bool(row["state"] == "succeeded")


async def _show(conn: asyncpg.Connection, shown: str, sql: str | None = None, *args: Any) -> None:
    _table(shown if shown.endswith(";") else shown + ";", await conn.fetch(sql or shown, *args))


def _table(query: str, rows: Sequence[asyncpg.Record]) -> None:
    """Print ``query`` and its rows the way psql's aligned format does."""
    _say(f"\npgqueue=# {query}")
    if not rows:
        _say("(0 rows)")
        return
    headers = list(rows[0].keys())
    cells = [[_cell(v) for v in row.values()] for row in rows]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(headers))]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    _say(" " + " | ".join(h.center(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    _say("-" + "-+-".join("-" * w for w in widths) + "-")
    for row in cells:
        line = " | ".join(
            c.rjust(w) if right else c.ljust(w)
            for c, w, right in zip(row, widths, numeric, strict=True)
        )
        _say(" " + line.rstrip())
    _say(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, str) and value[:1] in "{[":
        with contextlib.suppress(ValueError):
            value = json.loads(value)  # jsonb arrives as text: print it compactly
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def _redact(dsn: str) -> str:
    return dsn.split("@")[-1] if "@" in dsn else dsn


def _say(text: str) -> None:
    click.echo(text)
