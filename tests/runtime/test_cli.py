"""The ``pgqueue`` command line, through click's runner against a real database."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import asyncpg
import pytest
from click.testing import CliRunner, Result

from pgqueue.cli import main, parse_duration


def run(dsn: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--dsn", dsn, *args], catch_exceptions=False)


def test_enqueue_list_cancel_retry_stats(db_dsn: str) -> None:
    out = run(
        db_dsn,
        "enqueue",
        "report",
        "--payload",
        '{"year": 2024}',
        "--queue",
        "q",
        "--scope",
        '{"site": 1}',
        "--priority",
        "3",
        "--max-attempts",
        "2",
        "--delay",
        "60",
    )
    assert out.exit_code == 0, out.output
    job_id = int(out.output.strip())

    out = run(db_dsn, "jobs", "--queue", "q", "--state", "queued")
    assert out.exit_code == 0, out.output
    assert re.search(rf"^{job_id}\s+q\s+report\s+queued", out.output, re.M), out.output
    assert str(job_id) in run(db_dsn, "jobs", "--job-type", "report").output
    assert run(db_dsn, "jobs", "--job-type", "other").output == "(no rows)\n"

    assert run(db_dsn, "cancel", str(job_id)).exit_code == 0
    again = run(db_dsn, "cancel", str(job_id))
    assert again.exit_code == 1  # already final, and it says so
    assert "(it is cancelled; cancel takes waiting or queued jobs)" in again.output
    assert "(no such job)" in run(db_dsn, "retry", "999999").output
    assert run(db_dsn, "retry", str(job_id)).exit_code == 0
    out = run(db_dsn, "stats")
    assert out.exit_code == 0 and "q" in out.output, out.output
    # Queues by name, states in a job's order (the rows came unordered).
    for queue in ("b", "a", "b"):
        run(db_dsn, "enqueue", "x", "--queue", queue)
    assert run(db_dsn, "cancel", str(job_id + 3)).exit_code == 0
    lines = [line.split()[:2] for line in run(db_dsn, "stats").output.splitlines()[1:5]]
    assert lines == [["a", "queued"], ["b", "queued"], ["b", "cancelled"], ["q", "queued"]]
    assert run(db_dsn, "recover").output.startswith("recovered 0 job(s)")
    assert run(db_dsn, "prune", "--older-than", "7d").output == "pruned 0 job(s)\n"
    assert run(db_dsn, "prune", "--older-than", "1 day 2 hours").exit_code == 0


def test_show_prints_one_job_whole_with_its_dependencies(db_dsn: str) -> None:
    error = "Traceback (most recent call last):\n  File x, line 1\nValueError: boom"

    async def setup() -> tuple[int, int]:
        conn = await asyncpg.connect(db_dsn)
        try:
            first = await conn.fetchval(
                "SELECT pgqueue.enqueue('a', '{\"k\": [1, 2]}', scope => '{\"s\": 1}')"
            )
            then = await conn.fetchval("SELECT pgqueue.enqueue('b', depends_on => $1)", [first])
            await conn.execute("SELECT pgqueue.claim_next('w')")
            await conn.execute("SELECT pgqueue.fail($1, 'w', $2, interval '1 hour')", first, error)
            return first, then
        finally:
            await conn.close()

    first, then = asyncio.run(setup())
    out = run(db_dsn, "show", str(first))
    assert out.exit_code == 0, out.output
    for line in (r"state\s+queued", r"attempts\s+1/5", r'scope\s+\{"s": 1\}', r"is_current\s+true"):
        assert re.search(f"^{line}$", out.output, re.M), (line, out.output)
    assert re.search(r"^last_error\s+Traceback \(most recent call last\):$", out.output, re.M)
    assert re.search(r"^\s+ValueError: boom$", out.output, re.M)  # the whole error, not a line
    assert re.search(r'^payload\s+\{\n\s+"k": \[', out.output, re.M)
    assert re.search(rf"^dependents\s+{then} \(waiting\)$", out.output, re.M)
    out = run(db_dsn, "show", str(then))
    # empty JSON on one line (jsonb_pretty opens "{" on one line and closes it on the next)
    assert re.search(r"^payload\s+\{\}$", out.output, re.M), out.output
    assert re.search(rf"^depends on\s+{first} \(queued\)$", out.output, re.M), out.output
    assert re.search(r"^waiting_for\s+1$", out.output, re.M), out.output
    assert not re.search(r"^(result|finished_at|locked_by)\s", out.output, re.M)  # NULLs left out
    # The list shows a traceback's last line, what happened (its first said only that it did).
    listed = run(db_dsn, "jobs", "--job-type", "a").output
    assert re.search(r"\s+ValueError: boom$", listed, re.M), listed
    missing = run(db_dsn, "show", "999999")
    assert missing.exit_code == 1 and "job 999999: no such job" in missing.output


def test_abort_cancels_a_queued_job_and_asks_for_a_running_one(db_dsn: str) -> None:
    queued = int(run(db_dsn, "enqueue", "report").output)
    assert run(db_dsn, "abort", str(queued)).output == f"job {queued}: cancelled\n"
    again = run(db_dsn, "abort", str(queued))
    assert again.exit_code == 1
    assert "nothing to abort (it is cancelled already)" in again.output
    assert "nothing to abort (no such job)" in run(db_dsn, "abort", "999999").output

    running = int(run(db_dsn, "enqueue", "report").output)

    async def claim() -> None:  # as a worker would
        conn = await asyncpg.connect(db_dsn)
        try:
            await conn.fetch("SELECT pgqueue.claim($1, 'w')", running)
        finally:
            await conn.close()

    asyncio.run(claim())
    out = run(db_dsn, "abort", str(running))
    assert (out.exit_code, out.output) == (
        0,
        f"job {running}: running; its worker was asked to stop it (it ends cancelled)\n",
    )


def test_pause_and_resume_queues(db_dsn: str) -> None:
    out = run(db_dsn, "pause", "reports", "emails", "reports")
    assert (out.exit_code, out.output) == (0, "queue reports: paused\nqueue emails: paused\n")
    assert run(db_dsn, "pause", "emails").output == "queue emails: paused already\n"
    assert run(db_dsn, "stats").output.endswith("paused queues: emails, reports\n")
    out = run(db_dsn, "resume", "emails", "nowhere")
    assert (out.exit_code, out.output) == (0, "queue emails: resumed\nqueue nowhere: not paused\n")
    # All or nothing: a name no queue can have pauses none of the others.
    bad = run(db_dsn, "pause", "emails", " ")
    assert (
        bad.exit_code == 2
        and "queue must be a non-blank string of at most 200 bytes, got ' '" in bad.output
    )
    assert "paused queues: reports\n" in run(db_dsn, "stats").output
    assert run(db_dsn, "resume", "reports").output == "queue reports: resumed\n"
    assert "paused" not in run(db_dsn, "stats").output


def test_limit_caps_a_queue_and_none_lifts_it(db_dsn: str) -> None:
    out = run(db_dsn, "limit", "api", "2")
    assert (out.exit_code, out.output) == (0, "queue api: at most 2 running (was no limit)\n")
    assert run(db_dsn, "limit", "api", "5").output == (
        "queue api: at most 5 running (was at most 2)\n"
    )
    run(db_dsn, "enqueue", "x", "--queue", "api")
    assert run(db_dsn, "stats").output.endswith("limited queues: api (0/5 running)\n")
    assert run(db_dsn, "limit", "api", "None").output == "queue api: no limit (was at most 5)\n"
    assert "limited queues" not in run(db_dsn, "stats").output


ERRORS = pytest.mark.parametrize(
    ("error", "shown"),
    [
        (
            "Traceback (most recent call last):\n  File x, line 1\nValueError: boom",
            "ValueError: boom",
        ),
        # a message of several lines, and a note: the exception's line, not the last
        (
            "Traceback (most recent call last):\n  File x, line 1\n"
            "ValueError: expected 4 columns,\ngot 2\nwhile reading factors.csv",
            "ValueError: expected 4 columns,",
        ),
        # a chained exception: the one raised last
        (
            "Traceback (most recent call last):\n  File x, line 1\nZeroDivisionError: division"
            " by zero\n\nDuring handling of the above exception, another exception occurred:\n\n"
            "Traceback (most recent call last):\n  File y, line 2\n    raise KeyError\nKeyError: 'k'\n",
            "KeyError: 'k'",
        ),
        ("mailbox full\nmore", "mailbox full"),
    ],
)


@ERRORS
def test_jobs_shows_the_line_of_an_error_that_says_what_happened(error: str, shown: str) -> None:
    from pgqueue.cli import _cell

    assert _cell(error) == shown


@ERRORS
def test_the_cookbooks_error_grouping_takes_that_line_too(
    db_dsn: str, error: str, shown: str
) -> None:
    cookbook = (Path(__file__).parents[2] / "docs" / "cookbook.md").read_text()
    grouping = re.search(r"CASE WHEN last_error LIKE 'stale: %'.*?END", cookbook, re.S)
    assert grouping is not None, "the cookbook's 'Failed jobs by error' query moved"

    async def group() -> str:
        conn = await asyncpg.connect(db_dsn)
        try:
            sql = f"SELECT {grouping.group(0)} FROM (SELECT $1::text AS last_error) j"
            return str(await conn.fetchval(sql, error))
        finally:
            await conn.close()

    assert asyncio.run(group()) == shown


def test_dsn_from_environment(db_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQUEUE_DSN", db_dsn)
    out = CliRunner().invoke(main, ["enqueue", "x"])
    assert out.exit_code == 0 and out.output.strip().isdigit(), out.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue", "x", "--payload", "{nope"], "not valid JSON"),
        (["enqueue", "x", "--payload", "[1]"], "must be a JSON object"),
        (["prune", "--older-than", "soon"], "not a duration"),
        (["worker", "no_such_module:app"], "cannot import module 'no_such_module'"),
        (["worker", "json:dumps"], "json:dumps is a function, not a pgqueue.App"),
        (["worker", "json:nope"], "module 'json' has no 'nope'"),  # was "json:nope is nothing"
        (["worker", "nocolon"], "expected MODULE:APP"),
        # Each of these was accepted (or crashed) before the CLI audit of session 10:
        (["prune", "--older-than", "30"], "'30' has no unit"),  # 30 seconds to PostgreSQL
        (["prune", "--older-than", "1M"], "'1M' has no unit"),  # a minute to PostgreSQL
        # Seconds to PostgreSQL as well; they were passed through (session 25's review).
        (["prune", "--older-than", "+30"], "'+30' has no unit"),
        (["prune", "--older-than", "30."], "'30.' has no unit"),
        (["prune", "--older-than", ".5"], "'.5' has no unit"),
        (["enqueue", "x", "--payload", "null"], "must be a JSON object"),
        (["enqueue", "x", "--payload", '{"a": NaN}'], "NaN is not a JSON number"),
        (["enqueue", "x", "--scope", "Infinity"], "Infinity is not a JSON number"),
        (["enqueue", "x", "--payload", '{"a": 1e400}'], "1e400 is out of range"),
        # PostgreSQL's refusal was two lines about "unsupported Unicode escape sequence"
        (["enqueue", "x", "--payload", '{"a": ["\\u0000"]}'], "holds \\u0000 (NUL)"),
        (["enqueue", "x", "--scope", '{"\\u0000": 1}'], "holds \\u0000 (NUL)"),
        (["enqueue", "x", "--delay", "nan"], "nan is not a number of seconds"),
        (["worker", "worker_app:app", "--grace", "nan"], "nan is not a number of seconds"),
        (["worker", "worker_app:app", "--poll-interval", "nan"], "nan is not a number of seconds"),
        (["enqueue", "x", "--delay", "5e12"], "is not in the range"),
        (["enqueue", "x", "--priority", "2147483648"], "is not in the range"),
        (["cancel", "9223372036854775808"], "is not in the range"),
        (["worker", "worker_app:app", "--queues", ","], "names no queue"),
        (["worker", "worker_app:app", "--queues", ""], "names no queue"),
        (["worker", "worker_app:app", "--concurrency", "99999999999"], "is not in the range"),
        (["jobs", "--dsn", ""], "--dsn: is empty"),
        # Session 11: input PostgreSQL refuses exits 2 like input click refuses (it was 1,
        # "database error: ..."); an id that looks like an option; a DSN asyncpg cannot parse.
        (["enqueue", "x", "--queue", ""], "Error: pgqueue.enqueue: queue must be a non-blank"),
        (["enqueue", "", "--payload", "{}"], "Error: pgqueue.enqueue: job_type must be"),
        (["cancel", "-5"], "-5 is not in the range"),
        (["abort", "-5"], "-5 is not in the range"),
        (["jobs", "--dsn", "postgresql://h:abc/x"], "port 'abc' is not a number from 1 to 65535"),
        (["jobs", "--dsn", "postgresql://h:99999/x"], "port '99999' is not a number"),
        (["jobs", "--dsn", "host=h dbname=x"], "$PGQUEUE_DSN: is a keyword/value connection"),
        (
            ["migrate", "--dsn", "postgresql+psycopg://h/x"],
            "is a SQLAlchemy URL (postgresql+psycopg://)",
        ),
        (["jobs", "--dsn", "postgresql:///x?service=nowhere"], "service 'nowhere' is not defined"),
        (["jobs", "--dsn", "postgresql:///x?host=h:99999"], "port '99999' is not a number"),
        (["jobs", "--dsn", "postgresql://u:pw#rd@h/x"], "percent-encode a '#', '?' or '/'"),
        (["limit", "api", "0"], "expected a number of jobs from 1 to 2147483647, or none; got '0'"),
        (["limit", "api", "two"], "expected a number of jobs from 1 to 2147483647, or none"),
        (["limit", "api", "-1"], "expected a number of jobs from 1 to 2147483647, or none"),
        (["limit", "--queue=api", "3"], "No such option: --queue=api"),
        (["limit", " ", "2"], "Error: pgqueue.set_queue_limit: queue must be a non-blank"),
    ],
)
def test_clear_errors_for_bad_input(db_dsn: str, args: list[str], message: str) -> None:
    before = run(db_dsn, "jobs").output
    out = run(db_dsn, *args)
    assert out.exit_code == 2, out.output
    assert message in out.output and "Traceback" not in out.output
    assert run(db_dsn, "jobs").output == before  # nothing written
    assert "limited queues" not in run(db_dsn, "stats").output


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PGQUEUE_CONCURRENCY", "0", "(env var: 'PGQUEUE_CONCURRENCY'): 0 is not in the range"),
        ("PGQUEUE_QUEUES", ",", "names no queue"),
        ("PGQUEUE_QUEUES", "", "PGQUEUE_QUEUES: is set but empty"),  # click reads it as unset
        ("PGQUEUE_GRACE", "nan", "nan is not a number of seconds"),
        ("PGQUEUE_POLL_INTERVAL", "0", "(env var: 'PGQUEUE_POLL_INTERVAL')"),
        ("PGQUEUE_LOG_FORMAT", "yaml", "(env var: 'PGQUEUE_LOG_FORMAT'): 'yaml' is not one of"),
        ("PGQUEUE_LOG_LEVEL", "loud", "(env var: 'PGQUEUE_LOG_LEVEL'): 'loud' is not one of"),
    ],
)
def test_worker_options_from_the_environment_are_checked_as_flags(
    db_dsn: str, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    """From a review of pgqueue in an application: only the DSNs came from the environment,
    so a deployment set every other option in its command line. Each worker option has its
    variable now, read (and refused) like the flag."""
    monkeypatch.setenv(variable, value)
    out = run(db_dsn, "worker", "worker_app:app")
    assert out.exit_code == 2 and message in out.output, out.output


def test_a_bad_dsn_in_the_environment_is_bad_input_and_a_given_dsn_replaces_it(
    db_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGQUEUE_DSN", "postgresql://h:5432:1/x")
    out = CliRunner().invoke(main, ["jobs"])
    assert out.exit_code == 2 and "port '5432:1' is not a number" in out.output, out.output
    assert CliRunner().invoke(main, ["jobs", "--dsn", db_dsn]).exit_code == 0
    # docs/cli.md: given before and after the command, the one after it wins
    bad = "postgresql://h:5432:1/x"
    assert CliRunner().invoke(main, ["--dsn", bad, "jobs", "--dsn", db_dsn]).exit_code == 0
    assert CliRunner().invoke(main, ["--dsn", db_dsn, "jobs", "--dsn", bad]).exit_code == 2
    monkeypatch.delenv("PGQUEUE_DSN")
    monkeypatch.setenv("PGPORT", "54e2")  # no DSN: asyncpg reads the libpq variables
    out = CliRunner().invoke(main, ["jobs"])
    assert (out.exit_code, out.output) == (
        2,
        "Error: $PGPORT '54e2' is not a number from 1 to 65535\n",
    )


@pytest.mark.parametrize("command", ["jobs", "migrate"])
def test_pgservice_names_the_database_or_is_refused(
    db_dsn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str
) -> None:
    """asyncpg reads a service named in a URL but not $PGSERVICE: given no DSN it connected
    to its default database (named after the OS user), and `pgqueue migrate` created the
    schema there. pgqueue passes $PGSERVICE on as a URL, and refuses a service that asyncpg
    would not find (it ignores one silently)."""
    url = urllib.parse.urlsplit(db_dsn)
    # The embedded server's DSN names its socket directory in the query (no host part).
    query = dict(urllib.parse.parse_qsl(url.query))
    host, port = url.hostname or query["host"], url.port or query.get("port", 5432)
    services = tmp_path / "pg_service.conf"
    services.write_text(
        f"[queue]\nhost={host}\nport={port}\nuser={url.username or query.get('user')}\n"
        f"dbname={url.path.lstrip('/')}\n"
    )
    for name in ("PGQUEUE_DSN", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    monkeypatch.setenv("PGSERVICE", "queue")
    assert CliRunner().invoke(main, ["enqueue", "via-service"]).exit_code == 0
    out = CliRunner().invoke(main, [command])
    assert out.exit_code == 0, out.output
    assert "via-service" in run(db_dsn, "jobs").output
    monkeypatch.setenv("PGSERVICE", "other")
    out = CliRunner().invoke(main, [command])
    assert out.exit_code != 0, out.output
    assert "connection service 'other' is not defined in" in out.output
    assert "Traceback" not in out.output and out.output.count("\n") == 1


def test_pgoptions_reach_the_server_unless_the_dsn_gives_options(
    db_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq sends $PGOPTIONS as the `options` startup parameter; asyncpg does not read it."""
    monkeypatch.setenv("PGOPTIONS", "-c default_transaction_read_only=on")
    out = CliRunner().invoke(main, ["enqueue", "x", "--dsn", db_dsn])
    assert out.exit_code == 1 and "read-only transaction" in out.output, out.output
    given = db_dsn + ("&" if "?" in db_dsn else "?") + "options=-c%20statement_timeout%3D5000"
    assert CliRunner().invoke(main, ["enqueue", "x", "--dsn", given]).exit_code == 0
    assert run(db_dsn, "jobs").output.count(" x ") == 1


def test_a_worker_whose_sessions_would_not_run_read_committed_does_not_start(
    db_dsn: str,
) -> None:
    """A database (or role) whose default is REPEATABLE READ would run the worker's claims and
    transitions at it: lost claim races raising 40001, every scoped transition refused. (Not
    set on pgqueue's connections instead: PgBouncer refuses that startup parameter.)"""

    async def repeatable_read_by_default() -> None:
        admin = await asyncpg.connect(db_dsn)
        try:
            name = await admin.fetchval("SELECT current_database()")
            await admin.execute(
                f"ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'"
            )
        finally:
            await admin.close()

    asyncio.run(repeatable_read_by_default())
    out = run(db_dsn, "worker", "worker_app:app")
    assert out.exit_code == 1, out.output
    assert "run REPEATABLE READ" in out.output and "pgqueue needs READ COMMITTED" in out.output
    assert out.output.count("\n") == 1, out.output


def test_a_worker_whose_sessions_are_read_only_does_not_start(
    db_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A role or database with default_transaction_read_only (or a standby): the worker
    started, and every claim was refused and logged, for ever."""
    monkeypatch.setenv("PGOPTIONS", "-c default_transaction_read_only=on")
    out = run(db_dsn, "worker", "worker_app:app")
    assert out.exit_code == 1, out.output
    assert "read-only (default_transaction_read_only" in out.output, out.output
    assert out.output.count("\n") == 1, out.output


def test_unreachable_database_is_one_line() -> None:
    out = run("postgresql://postgres@127.0.0.1:1/nothing", "jobs")
    assert out.exit_code == 1
    assert (
        out.output.startswith("Error: cannot connect to PostgreSQL") and out.output.count("\n") == 1
    )


def test_unmigrated_database_says_to_migrate(empty_db_dsn: str) -> None:
    for args in (["jobs"], ["enqueue", "x"], ["worker", "worker_app:app"]):
        out = run(empty_db_dsn, *args)
        assert out.exit_code == 1
        assert "pgqueue migrate" in out.output and out.output.count("\n") == 1


def test_migrate_then_use(empty_db_dsn: str) -> None:
    out = run(empty_db_dsn, "migrate")
    assert out.exit_code == 0, out.output
    assert run(empty_db_dsn, "enqueue", "x").exit_code == 0


@pytest.mark.parametrize(
    ("text", "interval"),
    [
        ("7d", "7 days"),
        ("12h", "12 hours"),
        ("30m", "30 minutes"),
        ("45s", "45 seconds"),
        ("1.5h", "1.5 hours"),
        ("7D", "7 days"),
        ("1y", "1 years"),
        ("2 days", "2 days"),
        ("+2d", "2 days"),
        ("30.m", "30 minutes"),
        (".5h", ".5 hours"),
    ],
)
def test_parse_duration(text: str, interval: str) -> None:
    assert parse_duration(text) == interval


@pytest.mark.parametrize("command", ["pause", "resume"])
async def test_several_queues_take_every_pause_lock_before_any_row(
    db_dsn: str, command: str
) -> None:
    """`pgqueue pause a b` flagged (locked) a's rows, then waited for b's pause lock; an
    application transaction holding b's lock shared (it had enqueued into paused b) that then
    wanted one of a's rows deadlocked with it (the same for resume, which clears flags). The
    command takes every queue's pause lock first now: the transaction's row lock is free."""
    conn = await asyncpg.connect(db_dsn)
    app = await asyncpg.connect(db_dsn)
    try:
        job = await conn.fetchval("SELECT pgqueue.enqueue('t', queue => 'a')")
        if command == "resume":
            await conn.execute("SELECT pgqueue.pause_queue('a'), pgqueue.pause_queue('b')")
        await app.execute("BEGIN")
        await app.execute(
            "SELECT pg_advisory_xact_lock_shared(pgqueue._lock_class('pause'), hashtext('b'))"
        )
        # run_in_executor, not to_thread: a copied context would tell anyio that asyncio
        # runs in the command's thread.
        loop = asyncio.get_running_loop()
        cli = loop.run_in_executor(None, run, db_dsn, command, "a", "b")
        waits = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        for _ in range(2000):
            if await conn.fetchval(waits) == 1:
                break
            await asyncio.sleep(0.005)  # polling the observer, not a synchronisation
        else:
            raise AssertionError("the command never waited for b's pause lock")
        await app.execute("SET LOCAL lock_timeout = '500ms'")  # below deadlock_timeout
        assert await app.fetchval("SELECT id FROM pgqueue.jobs WHERE id = $1 FOR UPDATE", job)
        await app.execute("COMMIT")
        out = await cli
        done = "paused" if command == "pause" else "resumed"
        assert (out.exit_code, out.output) == (0, f"queue a: {done}\nqueue b: {done}\n")
        flagged = await conn.fetchval("SELECT queue_paused FROM pgqueue.jobs WHERE id = $1", job)
        assert flagged is (command == "pause")
    finally:
        await app.close()
        await conn.close()


@pytest.mark.parametrize(
    ("value", "problem"), [("", "is empty"), ("  ", "is empty"), ("mysql://x", "postgresql://")]
)
def test_a_bad_listen_dsn_is_refused_before_the_worker_starts(
    db_dsn: str, value: str, problem: str
) -> None:
    out = CliRunner().invoke(
        main, ["--dsn", db_dsn, "worker", "x:app", "--listen-dsn", value], catch_exceptions=False
    )
    assert out.exit_code == 2
    assert "--listen-dsn / $PGQUEUE_LISTEN_DSN" in out.output and problem in out.output


def test_stats_counts_dead_rows_and_names_the_oldest_snapshot(db_dsn: str) -> None:
    held, release, pids = threading.Event(), threading.Event(), []

    async def hold() -> None:  # a report left open in another session
        conn = await asyncpg.connect(db_dsn, server_settings={"application_name": "report"})
        try:
            async with conn.transaction(isolation="repeatable_read"):
                await conn.fetchval("SELECT 1")
                pids.append(conn.get_server_pid())
                held.set()
                await asyncio.to_thread(release.wait, 30)
        finally:
            await conn.close()

    holder = threading.Thread(target=asyncio.run, args=(hold(),))
    holder.start()
    try:
        assert held.wait(30)
        out = run(db_dsn, "stats").output
    finally:
        release.set()
        holder.join()
    assert re.search(r"^dead job rows: [\d,]+$", out, re.M), out
    assert f"oldest snapshot: session {pids[0]} (report, idle in transaction), open 0:00:" in out
    assert f"session {pids[0]} " not in run(db_dsn, "stats").output


def test_python_dash_m_pgqueue_is_the_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pgqueue", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "Usage: python -m pgqueue" in out.stdout, out.stderr
