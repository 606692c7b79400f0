"""The grants docs/roles.md gives are enough, and a right lost while running costs no run.

The application's role and the reader's are made here, with the page's own grant blocks, and
a worker runs as the application's role. The schema belongs to the role that migrated it.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import asyncpg
import pytest
from click.testing import CliRunner
from runtime_helpers import Records, recover_as_stale
from worker_harness import dsn_as, wait_for_states, wait_until

import pgqueue
from pgqueue.cli import main
from pgqueue.worker.producer import Producer
from pgqueue.worker.retry import is_retryable, is_setup_error

ROLES_MD = Path(__file__).resolve().parents[2] / "docs" / "roles.md"
PASSWORD = "pgqueue-test"  # for servers that ask (a container's); trust ignores it


def grants(kind: str, role: str) -> str:
    """The page's grant block for ``kind`` ("application" or "reader"), given to ``role``."""
    placeholder = {"application": "pgqueue_app", "reader": "pgqueue_reader"}[kind]
    for block in re.findall(r"```sql\n(.*?)```", ROLES_MD.read_text(), re.S):
        if block.startswith(f"-- grants: {kind} "):
            return block.replace(placeholder, role)
    raise AssertionError(f"{ROLES_MD.name} has no '-- grants: {kind}' block")


@pytest.fixture
async def roles(conn: asyncpg.Connection, db_dsn: str) -> AsyncIterator[dict[str, str]]:
    """Login roles with the page's grants: ``app`` and ``reader`` (DSNs) and their names."""
    suffix = uuid.uuid4().hex[:10]
    names = {"app": f"pgqueue_test_app_{suffix}", "reader": f"pgqueue_test_reader_{suffix}"}
    for name in names.values():
        await conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}'")
    try:
        await conn.execute(grants("application", names["app"]))
        await conn.execute(grants("reader", names["reader"]))
        yield {
            "app": dsn_as(db_dsn, names["app"], PASSWORD),
            "reader": dsn_as(db_dsn, names["reader"], PASSWORD),
            "app_role": names["app"],
        }
    finally:
        for name in names.values():
            await conn.execute(f"DROP OWNED BY {name}")  # its grants and default privileges
            await conn.execute(f"DROP ROLE {name}")


async def test_the_documented_grants_run_the_application_and_the_reader(
    conn: asyncpg.Connection, roles: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = pgqueue.App()
    ran: list[str] = []

    @app.job("step")
    async def step(job: pgqueue.Job) -> dict[str, int]:
        ran.append("step")
        return {"n": 1}

    @app.job("fan")
    async def fan(job: pgqueue.Job) -> pgqueue.Result:
        ran.append("fan")
        return pgqueue.Result().fan_out(
            (pgqueue.Spec("step") for _ in range(2)), join=pgqueue.Spec("step")
        )

    @app.job("boom", max_attempts=1)
    async def boom(job: pgqueue.Job) -> None:
        ran.append("boom")
        raise ValueError("boom")

    as_app = await asyncpg.connect(roles["app"])
    try:
        ids = [
            await app.enqueue(as_app, "step", scope={"s": 1}),
            await app.enqueue(as_app, "step", scope={"s": 1}, dedup_key="d"),
            await app.enqueue(as_app, "fan"),
            await app.enqueue(as_app, "boom"),
            *await app.enqueue_many(as_app, [{"job_type": "step"}] * 2),
        ]
        await as_app.execute("SELECT pgqueue.pause_queue('other'), pgqueue.resume_queue('other')")
        await as_app.execute("SELECT pgqueue.set_queue_limit('other', 2)")
        await as_app.execute("SELECT pgqueue.set_queue_limit('other', NULL)")
    finally:
        await as_app.close()
    worker = pgqueue.Worker(
        app, roles["app"], concurrency=4, until_empty=True, handle_signals=False
    )
    with anyio.fail_after(30):
        await worker.run()
    states = dict(await conn.fetch("SELECT id, state FROM pgqueue.jobs"))
    assert [states[i] for i in ids] == ["succeeded"] * 3 + ["failed"] + ["succeeded"] * 2
    assert sorted(ran) == ["boom", "fan"] + ["step"] * 7  # two fanned out, one join
    assert list(states.values()).count("succeeded") == 8

    as_reader = await asyncpg.connect(roles["reader"])
    try:
        await as_reader.execute("SET default_transaction_read_only = on")
        for view in ("queue_stats", "running_jobs", "stale_jobs", "pipelines", "current_jobs"):
            await as_reader.fetch(f"SELECT * FROM pgqueue.{view}")
        await as_reader.fetch("SELECT * FROM pgqueue.vacuum_blockers")
    finally:
        await as_reader.close()
    monkeypatch.setenv("PGOPTIONS", "-c default_transaction_read_only=on")
    for command in (["jobs"], ["stats"], ["show", str(ids[3])]):
        args = [*command, "--dsn", roles["reader"]]
        out = await anyio.to_thread.run_sync(functools.partial(CliRunner().invoke, main, args))
        assert out.exit_code == 0, out.output
    # What the reader may not do says so, and where the grants are.
    monkeypatch.delenv("PGOPTIONS")
    args = ["pause", "other", "--dsn", roles["reader"]]
    out = await anyio.to_thread.run_sync(functools.partial(CliRunner().invoke, main, args))
    assert out.exit_code == 1 and out.output.count("\n") == 1, out.output
    assert "permission denied for table paused_queues" in out.output, out.output
    assert "(docs/roles.md gives the grants each role needs)" in out.output, out.output


async def test_a_worker_names_the_rights_its_role_lacks_at_start_up(
    conn: asyncpg.Connection, roles: dict[str, str], records: tuple[object, Records]
) -> None:
    """A right left out of the grants showed up only when a statement first needed it (a
    missing DELETE at the first retention run, minutes after start-up). The worker names
    them when it starts, and starts; with the page's grants it names none."""
    logger, seen = records
    lacks = "lacks rights that docs/roles.md grants"

    async def start_and_stop() -> list[str]:
        worker = pgqueue.Worker(
            pgqueue.App(), roles["app"], until_empty=True, handle_signals=False, logger=logger
        )
        with anyio.fail_after(30):
            await worker.run()
        return [r.getMessage() for r in seen.records if lacks in r.getMessage()]

    assert await start_and_stop() == []
    role = roles["app_role"]
    await conn.execute(f"REVOKE DELETE ON pgqueue.jobs FROM {role}")
    await conn.execute(f"REVOKE INSERT, UPDATE ON pgqueue.periodic FROM {role}")
    await conn.execute(f"REVOKE SELECT ON pgqueue.queue_stats FROM {role}")
    [line] = await start_and_stop()
    assert (
        ": table pgqueue.jobs (DELETE); table pgqueue.periodic (INSERT, UPDATE);"
        " table pgqueue.queue_stats (SELECT); each statement" in line
    ), line


async def test_a_success_the_worker_may_no_longer_write_waits_for_the_right(
    conn: asyncpg.Connection,
    roles: dict[str, str],
    records: tuple[object, Records],
) -> None:
    """A right revoked under a running worker (here one that its completion needs and its
    claim does not) made the success a failed attempt and ran the handler again, up to
    max_attempts, and then again every so often: the failure could not be written either."""
    logger, seen = records
    app = pgqueue.App()
    calls = 0
    revoked = anyio.Event()

    @app.job("once")
    async def once(job: pgqueue.Job) -> None:
        nonlocal calls
        calls += 1
        await revoked.wait()

    job_id = await app.enqueue(conn, "once")
    worker = pgqueue.Worker(
        app, roles["app"], concurrency=2, poll_interval=0.5, handle_signals=False, logger=logger
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            await wait_for_states(conn, [job_id], "running")
            await conn.execute(
                f"REVOKE SELECT ON pgqueue.job_dependencies FROM {roles['app_role']}"
            )
            revoked.set()
            with anyio.fail_after(15):
                while not any(  # noqa: ASYNC110 (polling the worker's log records)
                    "as it is set up" in r.getMessage() for r in seen.records
                ):
                    await anyio.sleep(0.05)
            await conn.execute(f"GRANT SELECT ON pgqueue.job_dependencies TO {roles['app_role']}")
            await wait_for_states(conn, [job_id], "succeeded")
        finally:
            worker.stop()
    assert calls == 1
    assert await conn.fetchval("SELECT attempts FROM pgqueue.jobs WHERE id = $1", job_id) == 1
    line = next(r.getMessage() for r in seen.records if "as it is set up" in r.getMessage())
    assert "42501" in line and "permission denied for table job_dependencies" in line, line


async def test_a_failure_refused_for_a_right_then_fenced_is_a_lost_lease(
    conn: asyncpg.Connection, roles: dict[str, str], records: tuple[object, Records]
) -> None:
    """A try PostgreSQL refused for a set-up reason wrote nothing, so the fenced refusal of
    the retry after it is a lost lease. From a review: it was logged "failed (unknown)", as
    after a try cut off by a timeout, which may have landed."""
    logger, seen = records
    app = pgqueue.App()
    go = anyio.Event()

    @app.job("boom", max_attempts=3)
    async def boom(job: pgqueue.Job) -> None:
        await go.wait()
        raise ValueError("boom")

    job_id = await app.enqueue(conn, "boom")
    worker = pgqueue.Worker(
        app, roles["app"], concurrency=1, poll_interval=0.5, handle_signals=False, logger=logger
    )
    refused = "completer: the database refuses this worker's statements as it is set up"
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            await wait_for_states(conn, [job_id], "running")
            await conn.execute(f"REVOKE UPDATE ON pgqueue.jobs FROM {roles['app_role']}")
            go.set()
            await wait_until(lambda: seen.logged(refused), what="the refused failure")
            await recover_as_stale(conn, job_id)
            await conn.execute(f"GRANT UPDATE ON pgqueue.jobs TO {roles['app_role']}")
            await wait_until(lambda: _true(bool(seen.outcomes(job_id))), what="its outcome")
        finally:
            worker.stop()
    assert seen.outcomes(job_id)[0] == "lease lost", seen.text()


async def test_a_worker_whose_waiting_claims_are_refused_backs_off(
    conn: asyncpg.Connection,
    roles: dict[str, str],
    records: tuple[object, Records],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With notify = 'when_waiting', a role that may claim but not register as waiting: each
    plain claim's success ended the outage that the next claim_or_wait began again, so the
    idle worker claimed, failed and logged a traceback in a loop (4 a second, no backoff).
    Switched back to 'always', a later outage of the plain claims is logged again."""
    logger, seen = records
    waits = 0
    claim = Producer._claim

    async def counted(self: Producer, batch_size: int, *, wait: bool) -> list[pgqueue.Job] | None:
        nonlocal waits
        waits += wait
        return await claim(self, batch_size, wait=wait)

    monkeypatch.setattr(Producer, "_claim", counted)
    app_role = roles["app_role"]
    await conn.execute("UPDATE pgqueue.settings SET value = 'when_waiting' WHERE name = 'notify'")
    await conn.execute(f"REVOKE INSERT, UPDATE ON pgqueue.notify_waiters FROM {app_role}")
    worker = pgqueue.Worker(
        pgqueue.App(), roles["app"], poll_interval=0.2, handle_signals=False, logger=logger
    )

    def logged(text: str) -> int:
        return sum(text in r.getMessage() for r in seen.records)

    async def until_logged(text: str, times: int) -> None:
        with anyio.fail_after(15):
            while logged(text) < times:  # noqa: ASYNC110 (polling the worker's log records)
                await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            await until_logged("claiming jobs", 1)
            await anyio.sleep(3)  # a window for the loop to show itself in
            assert logged("claiming jobs") == 1
            assert waits <= 10, waits  # backing off: 0.1 s, 0.2, 0.4, ... (some 30 without)
            await conn.execute("UPDATE pgqueue.settings SET value = 'always' WHERE name = 'notify'")
            await conn.execute(f"GRANT INSERT, UPDATE ON pgqueue.notify_waiters TO {app_role}")
            await until_logged("producer: working again", 1)
            await conn.execute(f"REVOKE UPDATE ON pgqueue.jobs FROM {app_role}")
            await until_logged("claiming jobs", 2)
        finally:
            worker.stop()
    lines = [r.getMessage() for r in seen.records if "claiming jobs" in r.getMessage()]
    assert "as it is set up" in lines[0] and "notify_waiters" in lines[0], lines
    assert "permission denied for table jobs" in lines[1], lines


@pytest.mark.parametrize(
    ("error", "set_up"),
    [
        (asyncpg.exceptions.InsufficientPrivilegeError, True),  # 42501: a GRANT missing
        (asyncpg.exceptions.UndefinedTableError, True),  # 42P01: a trigger's table gone
        (asyncpg.exceptions.AmbiguousFunctionError, True),  # 42725: a shadowing function
        (asyncpg.exceptions.ReadOnlySQLTransactionError, True),  # 25006: a standby
        (asyncpg.exceptions.InvalidAuthorizationSpecificationError, True),  # 28000: NOLOGIN
        (asyncpg.exceptions.InvalidPasswordError, True),  # 28P01: a rotated password
        (asyncpg.exceptions.CheckViolationError, False),  # 23514: the values
        (asyncpg.exceptions.UntranslatableCharacterError, False),  # 22P05
        (asyncpg.exceptions.RaiseError, False),  # P0001: a trigger of yours refusing a row
        (asyncpg.exceptions.NoDataFoundError, False),  # P0002: SELECT INTO STRICT in one
        (asyncpg.exceptions.ProgramLimitExceededError, False),  # 54000: a row too big
        (asyncpg.exceptions.SnapshotTooOldError, None),  # 72000: retried, as an interruption
    ],
)
def test_which_errors_wait_for_an_operator(error: type[Exception], set_up: bool | None) -> None:
    """``set_up``: True, an operator's fix; False, a refusal of the values; None, neither
    (the statement is retried as it is)."""
    exc = error("message")
    assert is_setup_error(exc) is (set_up is True)
    assert is_retryable(exc) is (set_up is not False)


async def test_successes_the_database_refuses_alike_wait_as_one_write(
    conn: asyncpg.Connection,
    roles: dict[str, str],
    records: tuple[object, Records],
) -> None:
    """A set-up error that every write meets (here EXECUTE on complete_many revoked): split
    and each job retried on its own, 200 pending successes made some 300 failing statements a
    second (found by a review). A write of no job meets it too, so the batch waits whole."""
    logger, _ = records
    app = pgqueue.App()
    runs: list[int] = []

    @app.job("noop")
    async def noop(job: pgqueue.Job) -> None:
        runs.append(job.id)

    ids = await app.enqueue_many(conn, [{"job_type": "noop"}] * 200)
    await conn.execute("REVOKE EXECUTE ON FUNCTION pgqueue.complete_many FROM PUBLIC")
    rollbacks = "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    worker = pgqueue.Worker(app, roles["app"], concurrency=20, handle_signals=False, logger=logger)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:

            async def all_ran() -> bool:
                return len(runs) == 200

            await wait_until(all_ran, what="every handler run")
            before = await conn.fetchval(rollbacks)
            await anyio.sleep(3)
            await conn.execute("SELECT pg_stat_force_next_flush()")
            failed = await conn.fetchval(rollbacks) - before
            await conn.execute("GRANT EXECUTE ON FUNCTION pgqueue.complete_many TO PUBLIC")
            await wait_for_states(conn, ids, "succeeded")
        finally:
            worker.stop()
    assert failed < 40, failed  # a probe and the batch's tries, backing off to 5 s
    assert sorted(runs) == sorted(ids)


async def _true(value: bool) -> bool:
    return value
