"""Stateful property test of pipelines: fan-in, key/after, cancel/abort, limits, prune.

A second state machine beside ``test_properties.py``: three workers and an operator
enqueue through every path (``enqueue`` with ``depends_on``/``next_jobs``, both
``enqueue_many`` forms, ``enqueue_periodic``), across several queues, priorities,
pipelines and dedup keys, and drive the jobs with claims, ``complete`` (with passed
``next_jobs``), ``complete_many``, failures, releases, recoveries, retries, cancels,
aborts, ``cancel_pipeline``/``abort_pipeline``, queue limits, pauses and ``prune``.
After every step the contract's invariants are checked in the database, plus a
liveness probe: a rolled-back ``claim_next`` must reach every job a claim may take.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.from_thread
import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from test_properties import INVARIANTS as BASE_INVARIANTS
from test_properties import SCOPES, WORKERS

QUEUES = ("default", "q1", "q2")
PIPELINES = (None, "00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002")
DEDUP = [None, None, "d1", "d2"]
KEYS = ("a", "b", "c", "d", "e")

INVARIANTS = {
    **BASE_INVARIANTS,
    "child whose pipeline differs from its parent's (or parent without pipeline)": """
        SELECT c.id FROM pgqueue.jobs c JOIN pgqueue.jobs p ON p.id = c.parent_id
        WHERE p.pipeline_id IS NULL OR c.pipeline_id IS DISTINCT FROM p.pipeline_id""",
    "dependency edge to a job that does not exist": """
        SELECT d.job_id, d.depends_on FROM pgqueue.job_dependencies d
        WHERE NOT EXISTS (SELECT 1 FROM pgqueue.jobs j WHERE j.id = d.job_id)
           OR NOT EXISTS (SELECT 1 FROM pgqueue.jobs j WHERE j.id = d.depends_on)""",
    "pending job of a cancelled pipeline": """
        SELECT id FROM pgqueue.jobs WHERE state IN ('waiting', 'queued')
        AND pipeline_id IN (SELECT pipeline_id FROM pgqueue.cancelled_pipelines)""",
    "pending job with an abort request": """
        SELECT j.id FROM pgqueue.jobs j JOIN pgqueue.abort_requests r ON r.job_id = j.id
        WHERE j.state IN ('waiting', 'queued')""",
    "waiting job with no dependency edge": """
        SELECT j.id FROM pgqueue.jobs j WHERE j.state = 'waiting'
        AND NOT EXISTS (SELECT 1 FROM pgqueue.job_dependencies d WHERE d.job_id = j.id)""",
    "final job without finished_at, or non-final with it": """
        SELECT id FROM pgqueue.jobs
        WHERE (state IN ('succeeded', 'failed', 'cancelled')) <> (finished_at IS NOT NULL)""",
}

# A waiting job with a failed or cancelled dependency can never run. The contract says such a
# dependency cancels its dependents; docs/sql.md (pgqueue.retry) allows one exception: an
# operator retried the job itself while that dependency had not succeeded. The machine
# records those (job, dependency, dependency's finished_at) and allows exactly them.
BAD_DEPENDENCY = """
    SELECT j.id AS job, p.id AS dep, p.state, p.finished_at
    FROM pgqueue.jobs j JOIN pgqueue.job_dependencies d ON d.job_id = j.id
    JOIN pgqueue.jobs p ON p.id = d.depends_on
    WHERE j.state = 'waiting' AND p.state IN ('failed', 'cancelled')
    ORDER BY 1, 2"""

# Jobs any claim must be able to take right now: queued and due, in a queue that is not
# paused, and the head of their scope (nothing of it running, nothing older queued).
CLAIMABLE = """
    SELECT j.id, j.queue, j.priority, j.run_after FROM pgqueue.jobs j
    WHERE j.state = 'queued' AND j.run_after <= now()
      AND j.queue NOT IN (SELECT queue FROM pgqueue.paused_queues)
      AND (j.scope IS NULL OR (
           NOT EXISTS (SELECT 1 FROM pgqueue.jobs r WHERE r.scope = j.scope AND r.state = 'running')
           AND NOT EXISTS (SELECT 1 FROM pgqueue.jobs o WHERE o.scope = j.scope AND o.state = 'queued'
                           AND o.id < j.id)))
    ORDER BY j.id"""

# A running job whose attempt must end cancelled: aborted, or of a cancelled pipeline.
STOPPED = """
    SELECT j.locked_by,
           EXISTS (SELECT 1 FROM pgqueue.abort_requests r WHERE r.job_id = j.id)
           OR EXISTS (SELECT 1 FROM pgqueue.cancelled_pipelines c
                      WHERE c.pipeline_id = j.pipeline_id) AS stopped
    FROM pgqueue.jobs j WHERE j.id = $1"""

RUNNING_PER_QUEUE = "SELECT queue, count(*) FROM pgqueue.jobs WHERE state = 'running' GROUP BY 1"


@st.composite
def spec_lists(draw: st.DrawFn, max_size: int = 4) -> list[dict[str, Any]]:
    """An array of specs, some keyed, some `after` earlier keys (so never a cycle)."""
    n = draw(st.integers(1, max_size))
    specs: list[dict[str, Any]] = []
    keys: list[str] = []
    for i in range(n):
        spec: dict[str, Any] = {"job_type": f"s{i}"}
        if draw(st.booleans()):
            spec["queue"] = draw(st.sampled_from(QUEUES))
        scope = draw(st.sampled_from(SCOPES))
        if scope is not None:
            spec["scope"] = scope
        dedup = draw(st.sampled_from(DEDUP))
        if dedup is not None:
            spec["dedup_key"] = dedup
        if draw(st.booleans()):
            spec["priority"] = draw(st.integers(0, 2))
        spec["max_attempts"] = draw(st.integers(1, 2))
        if keys and draw(st.booleans()) is True:
            spec["after"] = draw(
                st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)
            )
        if draw(st.booleans()):
            spec["key"] = KEYS[i]
            keys.append(KEYS[i])
        if draw(st.integers(0, 3)) == 0:
            spec["depends_on"] = draw(st.integers(0, 50))  # an index, resolved to an id later
        specs.append(spec)
    return specs


class PipelineMachine(RuleBasedStateMachine):
    portal: anyio.from_thread.BlockingPortal
    dsn: str
    shared: dict[str, asyncpg.Connection]

    def __init__(self) -> None:
        super().__init__()
        # One connection, opened once per test (see below) and reused by every example: the
        # steps run one after another, so the workers and the operator differ only in the
        # worker names they pass, and a long random run stays light on a shared server.
        if not self.shared:
            conn = self.portal.call(self._connect)
            for name in (*WORKERS, "op"):
                self.shared[name] = conn
        self.conns = self.shared
        self.call(
            "op",
            "execute",
            "TRUNCATE pgqueue.jobs, pgqueue.paused_queues, pgqueue.cancelled_pipelines, "
            "pgqueue.abort_requests, pgqueue.periodic RESTART IDENTITY CASCADE",
        )
        self.call("op", "execute", "DELETE FROM pgqueue.queue_limits")
        self.limits: dict[str, int] = {}
        # parent -> children its success created; None when a dedup merge makes it unknown
        self.expected_children: dict[int, int | None] = {}
        # (job, dependency) -> the dependency's finished_at when an operator retried the job
        self.retried_over: dict[tuple[int, int], Any] = {}
        self.ticks: dict[str, int] = {}

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.dsn)
        for name in ("json", "jsonb"):
            await conn.set_type_codec(
                name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
        return conn

    def call(self, who: str, method: str, sql: str, *args: Any) -> Any:
        return self.portal.call(getattr(self.conns[who], method), sql, *args)

    def _ids(self, where: str = "true") -> list[int]:
        rows = self.call("op", "fetch", f"SELECT id FROM pgqueue.jobs WHERE {where} ORDER BY id")
        return [r[0] for r in rows]

    def _pick(self, where: str, pick: int) -> int | None:
        ids = self._ids(where)
        return ids[pick % len(ids)] if ids else None

    def _dependable(self) -> list[int]:
        # Not failed/cancelled (an enqueue refuses those), not in a cancelled pipeline's
        # way: any state an enqueue accepts.
        return self._ids("state IN ('waiting', 'queued', 'running', 'succeeded')")

    def _resolve(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Turn the depends_on indexes into ids of jobs an enqueue accepts (or drop them)."""
        live = self._dependable()
        out = []
        for spec in specs:
            spec = dict(spec)
            if "depends_on" in spec:
                if live:
                    spec["depends_on"] = [live[spec["depends_on"] % len(live)]]
                else:
                    del spec["depends_on"]
            out.append(spec)
        return out

    def _expect_refusal(self, exc: asyncpg.PostgresError) -> None:
        """Errors an enqueue may raise by the docs in this machine's moves."""
        message = str(exc)
        if "was cancelled" in message and "pipeline" in message:
            return  # enqueue into a cancelled pipeline (documented)
        if "could never run" in message:
            return  # a passed spec depending on a job that ended failed/cancelled
        raise exc

    # ------------------------------------------------------------------ enqueue paths

    @rule(
        queue=st.sampled_from(QUEUES),
        scope=st.sampled_from(SCOPES),
        dedup=st.sampled_from(DEDUP),
        priority=st.integers(0, 2),
        pipeline=st.sampled_from(PIPELINES),
        deps=st.lists(st.integers(0, 50), max_size=3),
        next_jobs=st.none() | spec_lists(),
        max_attempts=st.integers(1, 2),
    )
    def enqueue(
        self,
        queue: str,
        scope: Any,
        dedup: str | None,
        priority: int,
        pipeline: str | None,
        deps: list[int],
        next_jobs: list[dict[str, Any]] | None,
        max_attempts: int,
    ) -> None:
        live = self._dependable()
        depends_on = sorted({live[d % len(live)] for d in deps}) if live and deps else None
        try:
            self.call(
                "op",
                "fetchval",
                "SELECT pgqueue.enqueue('t', '{}', $1, $2::jsonb, $3, NULL, $4, $5, $6::uuid, "
                "$7::jsonb, $8::bigint[])",
                queue,
                scope,
                dedup,
                priority,
                max_attempts,
                pipeline,
                self._resolve(next_jobs) if next_jobs else None,
                depends_on,
            )
        except asyncpg.PostgresError as exc:
            self._expect_refusal(exc)

    @rule(specs=spec_lists(max_size=5), pipeline=st.sampled_from(PIPELINES))
    def enqueue_many(self, specs: list[dict[str, Any]], pipeline: str | None) -> None:
        resolved = self._resolve(specs) or []
        if pipeline is not None:
            for spec in resolved:
                spec["pipeline_id"] = pipeline
        try:
            ids = self.call(
                "op", "fetch", "SELECT * FROM pgqueue.enqueue_many($1::jsonb)", resolved
            )
        except asyncpg.PostgresError as exc:
            self._expect_refusal(exc)
            return
        assert len(ids) == len(resolved), "enqueue_many returned one id per spec"
        by_key: dict[str, set[int]] = {}
        for spec, row in zip(resolved, ids, strict=True):
            if "dedup_key" in spec:
                by_key.setdefault(spec["dedup_key"], set()).add(row[0])
        for key, got in by_key.items():
            assert len(got) == 1, f"two specs with dedup_key {key} in one array made two jobs"

    @rule(
        queues=st.lists(st.sampled_from(QUEUES), min_size=1, max_size=3),
        scopes=st.lists(st.sampled_from(SCOPES), min_size=3, max_size=3),
        priorities=st.lists(st.none() | st.integers(0, 2), min_size=3, max_size=3),
    )
    def enqueue_many_typed(
        self, queues: list[str], scopes: list[Any], priorities: list[int | None]
    ) -> None:
        n = len(queues)
        self.call(
            "op",
            "fetch",
            "SELECT * FROM pgqueue.enqueue_many($1::text[], $2::jsonb[], $3::text[], $4::int[], "
            "NULL, NULL, $5::jsonb[])",
            ["typed"] * n,
            [{}] * n,
            queues,
            priorities[:n],
            scopes[:n],
        )

    @rule(name=st.sampled_from(["p1", "p2"]), dedup=st.sampled_from(DEDUP))
    def enqueue_periodic(self, name: str, dedup: str | None) -> None:
        tick = self.ticks.get(name, 0) + 1
        self.ticks[name] = tick
        spec: dict[str, Any] = {"job_type": "tick", "run_after": "2000-01-01T00:00:00Z"}
        if dedup:
            spec["dedup_key"] = dedup
        first = self.call(
            "op",
            "fetchval",
            "SELECT pgqueue.enqueue_periodic($1, timestamptz '2000-01-01' + $2 * interval '1 minute', "
            "$3::jsonb)",
            name,
            tick,
            spec,
        )
        again = self.call(
            "op",
            "fetchval",
            "SELECT pgqueue.enqueue_periodic($1, timestamptz '2000-01-01' + $2 * interval '1 minute', "
            "$3::jsonb)",
            name,
            tick,
            spec,
        )
        assert first is not None and again is None, "a tick enqueued twice or not at all"

    # ------------------------------------------------------------------ claims

    def _check_limits(self, rows: list[asyncpg.Record]) -> None:
        running = dict(self.call("op", "fetch", RUNNING_PER_QUEUE))
        for queue in {r["queue"] for r in rows}:
            if queue in self.limits:
                assert running.get(queue, 0) <= self.limits[queue], (
                    f"a claim ran queue {queue} past its limit {self.limits[queue]}"
                )

    @rule(
        worker=st.sampled_from(WORKERS),
        queues=st.none() | st.lists(st.sampled_from(QUEUES), min_size=1, max_size=2, unique=True),
        batch=st.integers(1, 4),
    )
    def claim_next(self, worker: str, queues: list[str] | None, batch: int) -> None:
        rows = self.call(
            worker,
            "fetch",
            "SELECT id, queue, scope FROM pgqueue.claim_next($1, $2::text[], $3)",
            worker,
            queues,
            batch,
        )
        assert len(rows) <= batch
        if queues is not None:
            assert {r["queue"] for r in rows} <= set(queues), "claimed a queue not asked for"
        scopes = [json.dumps(r["scope"], sort_keys=True) for r in rows if r["scope"] is not None]
        assert len(scopes) == len(set(scopes)), "one batch holds two jobs of one scope"
        self._check_limits(rows)

    @rule(worker=st.sampled_from(WORKERS), pick=st.integers(0, 50))
    def claim(self, worker: str, pick: int) -> None:
        job = self._pick("state = 'queued'", pick)
        if job is not None:
            rows = self.call(
                worker, "fetch", "SELECT id, queue FROM pgqueue.claim($1, $2)", job, worker
            )
            self._check_limits(rows)

    # ------------------------------------------------------------------ outcomes

    def _running(self, worker: str, pick: int, own: bool) -> int | None:
        return self._pick(
            "state = 'running'" + (f" AND locked_by = '{worker}'" if own else ""), pick
        )

    def _record_success(self, job: int, stored: Any, passed: list[dict[str, Any]] | None) -> None:
        assert job not in self.expected_children, "a job succeeded twice"
        specs = list(stored or []) + list(passed or [])
        merges = any("dedup_key" in s for s in specs)
        self.expected_children[job] = None if merges else len(specs)

    @rule(
        worker=st.sampled_from(WORKERS),
        pick=st.integers(0, 50),
        own=st.booleans(),
        passed=st.none() | spec_lists(),
    )
    def complete(
        self, worker: str, pick: int, own: bool, passed: list[dict[str, Any]] | None
    ) -> None:
        job = self._running(worker, pick, own)
        if job is None:
            return
        stored = self.call(
            "op", "fetchval", "SELECT next_jobs FROM pgqueue.jobs WHERE id = $1", job
        )
        holder = self.call(
            "op", "fetchval", "SELECT locked_by FROM pgqueue.jobs WHERE id = $1", job
        )
        resolved = self._resolve(passed) if passed else None
        try:
            ok = self.call(
                worker,
                "fetchval",
                "SELECT pgqueue.complete($1, $2, '{\"ok\": true}', $3::jsonb)",
                job,
                worker,
                resolved,
            )
        except asyncpg.PostgresError as exc:
            self._expect_refusal(exc)
            return
        assert ok == (holder == worker), "fencing decided wrongly"
        if ok:
            self._record_success(job, stored, resolved)

    @rule(
        worker=st.sampled_from(WORKERS),
        picks=st.lists(st.integers(0, 50), max_size=4),
        passed=st.lists(st.none() | spec_lists(3), min_size=4, max_size=4),
    )
    def complete_many(
        self, worker: str, picks: list[int], passed: list[list[dict[str, Any]] | None]
    ) -> None:
        running = self._ids("state = 'running'")
        if not running:
            return
        ids = sorted({running[p % len(running)] for p in picks})
        rows = self.call(
            "op",
            "fetch",
            "SELECT id, locked_by, next_jobs FROM pgqueue.jobs WHERE id = ANY($1)",
            ids,
        )
        held = {r["id"]: r["next_jobs"] for r in rows if r["locked_by"] == worker}
        more = [self._resolve(p) if p else None for p in passed[: len(ids)]]
        try:
            done = self.call(
                worker,
                "fetch",
                "SELECT * FROM pgqueue.complete_many($1, $2::bigint[], NULL, $3::text[]::jsonb[])",
                worker,
                ids,
                [None if m is None else json.dumps(m) for m in more],
            )
        except asyncpg.PostgresError as exc:
            self._expect_refusal(exc)
            return
        assert {r[0] for r in done} == set(held), "complete_many fenced wrongly"
        for job, extra in zip(ids, more, strict=True):
            if job in held:
                self._record_success(job, held[job], extra)

    @rule(worker=st.sampled_from(WORKERS), pick=st.integers(0, 50), own=st.booleans())
    def fail(self, worker: str, pick: int, own: bool) -> None:
        job = self._running(worker, pick, own)
        if job is None:
            return
        row = self.call("op", "fetchrow", STOPPED, job)
        state = self.call(
            worker, "fetchval", "SELECT pgqueue.fail($1, $2, 'boom', interval '0')", job, worker
        )
        assert (state is not None) == (row["locked_by"] == worker), "fencing decided wrongly"
        if state is not None and row["stopped"]:
            assert state == "cancelled", f"a failed attempt after abort/cancel_pipeline: {state}"

    @rule(worker=st.sampled_from(WORKERS), pick=st.integers(0, 50), snooze=st.booleans())
    def release_or_snooze(self, worker: str, pick: int, snooze: bool) -> None:
        job = self._running(worker, pick, True)
        if job is None:
            return
        stopped = self.call("op", "fetchrow", STOPPED, job)["stopped"]
        if snooze:
            self.call(
                worker, "fetchval", "SELECT pgqueue.snooze($1, $2, interval '0')", job, worker
            )
        else:
            assert self.call(worker, "fetchval", "SELECT pgqueue.release($1, $2)", job, worker)
        state = self.call("op", "fetchval", "SELECT state FROM pgqueue.jobs WHERE id = $1", job)
        assert state == ("cancelled" if stopped else "queued"), f"given back as {state}"

    @rule(pick=st.integers(0, 50))
    def recover(self, pick: int) -> None:
        job = self._running("", pick, False)
        if job is not None:
            self.call(
                "op",
                "execute",
                "UPDATE pgqueue.jobs SET locked_at = now() - interval '1 day' WHERE id = $1",
                job,
            )
            assert self.call("op", "fetch", "SELECT pgqueue.recover_stale()") != []

    # ------------------------------------------------------------------ operator

    @rule(pick=st.integers(0, 50))
    def retry(self, pick: int) -> None:
        job = self._pick("state IN ('failed', 'cancelled')", pick)
        if job is None:
            return
        bad = self.call(
            "op",
            "fetch",
            "SELECT p.id, p.finished_at FROM pgqueue.job_dependencies d "
            "JOIN pgqueue.jobs p ON p.id = d.depends_on "
            "WHERE d.job_id = $1 AND p.state IN ('failed', 'cancelled')",
            job,
        )
        assert self.call("op", "fetchval", "SELECT pgqueue.retry($1)", job)
        for r in bad:
            self.retried_over[(job, r["id"])] = r["finished_at"]

    @rule(pick=st.integers(0, 50))
    def cancel(self, pick: int) -> None:
        job = self._pick("state IN ('waiting', 'queued')", pick)
        if job is not None:
            assert self.call("op", "fetchval", "SELECT pgqueue.cancel($1)", job)

    @rule(pick=st.integers(0, 50))
    def abort(self, pick: int) -> None:
        job = self._pick("state IN ('waiting', 'queued', 'running')", pick)
        if job is None:
            return
        before = self.call("op", "fetchval", "SELECT state FROM pgqueue.jobs WHERE id = $1", job)
        got = self.call("op", "fetchval", "SELECT pgqueue.abort($1)", job)
        assert got == ("running" if before == "running" else "cancelled")

    @rule(pick=st.integers(0, 50), also_running=st.booleans())
    def cancel_pipeline(self, pick: int, also_running: bool) -> None:
        pipelines = [
            r[0]
            for r in self.call(
                "op",
                "fetch",
                "SELECT DISTINCT pipeline_id::text FROM pgqueue.jobs WHERE pipeline_id IS NOT NULL "
                "ORDER BY 1",
            )
        ]
        if not pipelines:
            return
        pipeline = pipelines[pick % len(pipelines)]
        function = "abort_pipeline" if also_running else "cancel_pipeline"
        self.call("op", "fetchval", f"SELECT pgqueue.{function}($1::uuid)", pipeline)
        left = self.call(
            "op",
            "fetch",
            "SELECT id, state FROM pgqueue.jobs WHERE pipeline_id = $1::uuid "
            "AND state IN ('waiting', 'queued')",
            pipeline,
        )
        assert left == [], f"{function} left pending jobs: {left}"

    @rule(queue=st.sampled_from(QUEUES), limit=st.none() | st.integers(1, 2))
    def set_queue_limit(self, queue: str, limit: int | None) -> None:
        self.call("op", "fetchval", "SELECT pgqueue.set_queue_limit($1, $2)", queue, limit)
        if limit is None:
            self.limits.pop(queue, None)
        else:
            self.limits[queue] = limit

    @rule(queue=st.sampled_from(QUEUES), pause=st.booleans())
    def pause_or_resume(self, queue: str, pause: bool) -> None:
        function = "pause_queue" if pause else "resume_queue"
        self.call("op", "fetchval", f"SELECT pgqueue.{function}($1)", queue)

    @rule()
    def prune(self) -> None:
        self.call("op", "fetchval", "SELECT pgqueue.prune(interval '0')")
        # Pruned parents and children make the counts unknown; who succeeded stays known.
        self.expected_children = dict.fromkeys(self.expected_children)

    # ------------------------------------------------------------- invariants

    @invariant()
    def database_invariants(self) -> None:
        for name, sql in INVARIANTS.items():
            assert self.call("op", "fetch", sql) == [], name

    @invariant()
    def no_waiting_job_behind_a_failed_dependency(self) -> None:
        stuck = [
            (r["job"], r["dep"], r["state"])
            for r in self.call("op", "fetch", BAD_DEPENDENCY)
            if self.retried_over.get((r["job"], r["dep"])) != r["finished_at"]
        ]
        assert stuck == [], (
            "waiting job (job, dependency, state) with a failed/cancelled dependency that no "
            f"retry of the job itself explains: {stuck}"
        )

    @invariant()
    def children_created_exactly_once(self) -> None:
        rows = self.call(
            "op",
            "fetch",
            "SELECT parent_id, count(*) FROM pgqueue.jobs WHERE parent_id IS NOT NULL GROUP BY 1",
        )
        created = {r[0]: r[1] for r in rows}
        for parent, n in self.expected_children.items():
            if n is not None:
                assert created.get(parent, 0) == n, (
                    f"job {parent} made {created.get(parent)} != {n}"
                )
        assert set(created) <= set(self.expected_children), "children of a job that never succeeded"

    @invariant()
    def every_claimable_job_is_reached(self) -> None:
        """A claim of every queue, rolled back, takes each job a claim may take."""
        conn = self.conns["op"]

        async def probe() -> None:
            async with conn.transaction():
                claimable = await conn.fetch(CLAIMABLE)
                running = await conn.fetch(RUNNING_PER_QUEUE)
                try:
                    async with conn.transaction():  # a savepoint: the first pick, undone
                        one = await conn.fetch(
                            "SELECT id FROM pgqueue.claim_next('probe', NULL, 1)"
                        )
                        raise _Rollback(one)
                except _Rollback as undone:
                    first = undone.value
                got = await conn.fetch(
                    "SELECT id, queue FROM pgqueue.claim_next('probe', NULL, 1000)"
                )
                raise _Rollback((claimable, running, got, first))

        try:
            self.portal.call(probe)
        except _Rollback as done:
            claimable, running, got, first = done.value
        else:  # pragma: no cover
            raise AssertionError("the probe did not roll back")
        got_ids = {r["id"] for r in got}
        per_queue: dict[str, list[int]] = {}
        for r in claimable:
            per_queue.setdefault(r["queue"], []).append(r["id"])
        busy = dict(running)
        # Claim order: priority desc, then run_after, then id, among jobs a claim may take.
        takeable = [
            r
            for r in claimable
            if r["queue"] not in self.limits or self.limits[r["queue"]] > busy.get(r["queue"], 0)
        ]
        takeable.sort(key=lambda r: (-r["priority"], r["run_after"], r["id"]))
        assert [r["id"] for r in first] == [r["id"] for r in takeable[:1]], (
            f"claim_next(batch 1) took {[r['id'] for r in first]}, claim order says "
            f"{[r['id'] for r in takeable[:1]]}"
        )
        for queue, ids in per_queue.items():
            if queue in self.limits:
                room = max(self.limits[queue] - busy.get(queue, 0), 0)
                taken = len(got_ids & set(ids))
                assert taken == min(room, len(ids)), (
                    f"limited queue {queue}: claim took {taken} of {ids} with room {room}"
                )
            else:
                missed = set(ids) - got_ids
                assert not missed, f"claimable jobs no claim reaches: {sorted(missed)}"


class _Rollback(Exception):
    def __init__(self, value: Any) -> None:
        super().__init__("rollback")
        self.value = value


@pytest.fixture
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal() as p:
        yield p


def test_random_pipelines_keep_the_invariants(
    db_dsn: str, portal: anyio.from_thread.BlockingPortal
) -> None:
    PipelineMachine.portal = portal
    PipelineMachine.dsn = db_dsn
    PipelineMachine.shared = {}
    try:
        _run()
    finally:
        for conn in set(PipelineMachine.shared.values()):
            portal.call(conn.close)


def _run() -> None:
    run_state_machine_as_test(  # type: ignore[no-untyped-call]
        PipelineMachine,
        settings=settings(
            max_examples=int(os.environ.get("PGQUEUE_PROPERTY_EXAMPLES", "40")),
            stateful_step_count=int(os.environ.get("PGQUEUE_PROPERTY_STEPS", "40")),
            deadline=None,
            derandomize=os.environ.get("PGQUEUE_PROPERTY_SEED") != "random",
            phases=[Phase.generate] if os.environ.get("PGQUEUE_SQL_MUTANT") else list(Phase),
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
