"""A randomised concurrency fuzzer of the SQL API (driven by ``test_fuzz.py``).

Several asyncpg sessions each run a random sequence of the public functions of docs/sql.md
(enqueue, enqueue_many, pipelines with a join, claims as simulated workers and the outcomes a
worker records, stale recovery of workers that walked away, retry, cancel, pause/resume,
queue limits, prune and retention, some of it inside explicit transactions that may roll
back) for a bounded time. Every choice comes from a seeded RNG, so a seed replays the same
operations (the interleaving is the server's).

What is checked, and why each check is sound under concurrency:

* An audit trigger of the test's own (schema ``fuzz_audit``) logs every row change of
  ``pgqueue.jobs`` with the statement that made it. Per job, the log's order is the order of
  the row's versions (a second writer waits for the first's commit before its trigger runs),
  so the replay checks every transition against docs/sql.md's "Every transition, exactly",
  the function that made it, and the columns it must set (attempts, lease, started_at).
  At each claim the trigger also records, with a fresh snapshot, the job's unfinished
  dependencies, whether its queue was paused, and the running count of a limited queue
  (claims of a limited queue hold its limit lock until they commit, so that count is exact).
* The driver records each attempt it claimed, from the claim's return to the call that ended
  it (a subset of the real running interval): two attempts of one scope must not overlap.
* A refused outcome (fencing) must be explained by a ``recover_stale`` of that very attempt in
  the audit log; every job still ``running`` when the sessions stop must be an attempt the
  driver holds; each successful completion created exactly its stored and passed children.
* The invariants of ``sqlharness.INVARIANTS`` (one snapshot each) are sampled while it runs.
* At the end every queue is drained: nothing may stay waiting, queued or running (a stuck
  scope, a lost fan-in or a stranded paused flag shows up here).

Errors: documented refusals are counted; a deadlock (40P01) passes only when the cycle's
sessions were in a case docs/sql.md lists as a known exception (its DETAIL names the pids,
the driver knows what each one was doing); anything else fails the run with its seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlharness import INVARIANTS

Connect = Callable[[], Awaitable[asyncpg.Connection]]

QUEUES = ("q0", "q1", "lim")
PAUSABLE = "q1"
LIMITED = "lim"
SCOPES: tuple[Any, ...] = ({"t": 1}, {"t": 2}, {"y": None, "t": 3})
DEDUP_KEYS = ("k0", "k1", "k2", "k3")
STALE = "150 milliseconds"  # recover_stale's interval: a "walked away" worker's lease
FINAL = ("succeeded", "failed", "cancelled")

AUDIT_SQL = """
CREATE SCHEMA fuzz_audit;
CREATE TABLE fuzz_audit.log (
    seq bigserial PRIMARY KEY,
    op text NOT NULL,
    id bigint NOT NULL,
    fn text,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    stmt_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    old_state text, new_state text,
    old_locked_by text, new_locked_by text,
    old_attempts int, new_attempts int, max_attempts int,
    old_started_at timestamptz, new_started_at timestamptz,
    locked_at timestamptz, run_after timestamptz, finished_at timestamptz,
    queue text, scope jsonb, is_current boolean, parent_id bigint, result jsonb,
    deps_unfinished bigint, queue_paused boolean, running_in_queue bigint, queue_limit int
);
CREATE FUNCTION fuzz_audit.log_job() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r pgqueue.jobs;
    v_fn text := substring(current_query() FROM 'pgqueue\\.([a-z_]+)\\(');
    v_deps bigint;
    v_paused boolean;
    v_running bigint;
    v_limit int;
BEGIN
    r := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    IF TG_OP <> 'DELETE' AND NEW.state IN ('queued', 'running')
       AND (TG_OP = 'INSERT' OR OLD.state IS DISTINCT FROM NEW.state) THEN
        SELECT count(*) INTO v_deps FROM pgqueue.job_dependencies d
        JOIN pgqueue.jobs p ON p.id = d.depends_on
        WHERE d.job_id = NEW.id AND p.state <> 'succeeded';
        IF NEW.state = 'running' THEN
            v_paused := EXISTS (SELECT 1 FROM pgqueue.paused_queues q WHERE q.queue = NEW.queue);
            SELECT l.max_running INTO v_limit FROM pgqueue.queue_limits l WHERE l.queue = NEW.queue;
            IF v_limit IS NOT NULL THEN
                SELECT count(*) INTO v_running FROM pgqueue.jobs j
                WHERE j.state = 'running' AND j.queue = NEW.queue;
            END IF;
        END IF;
    END IF;
    INSERT INTO fuzz_audit.log (op, id, fn, old_state, new_state, old_locked_by, new_locked_by,
        old_attempts, new_attempts, max_attempts, old_started_at, new_started_at, locked_at,
        run_after, finished_at, queue, scope, is_current, parent_id, result, deps_unfinished,
        queue_paused, running_in_queue, queue_limit)
    VALUES (TG_OP, r.id, v_fn,
        CASE WHEN TG_OP <> 'INSERT' THEN OLD.state END, CASE WHEN TG_OP <> 'DELETE' THEN NEW.state END,
        CASE WHEN TG_OP <> 'INSERT' THEN OLD.locked_by END, CASE WHEN TG_OP <> 'DELETE' THEN NEW.locked_by END,
        CASE WHEN TG_OP <> 'INSERT' THEN OLD.attempts END, CASE WHEN TG_OP <> 'DELETE' THEN NEW.attempts END,
        r.max_attempts,
        CASE WHEN TG_OP <> 'INSERT' THEN OLD.started_at END, CASE WHEN TG_OP <> 'DELETE' THEN NEW.started_at END,
        r.locked_at, r.run_after, r.finished_at, r.queue, r.scope, r.is_current, r.parent_id, r.result,
        v_deps, v_paused, v_running, v_limit);
    RETURN NULL;
END $$;
CREATE TRIGGER fuzz_audit AFTER INSERT OR UPDATE OR DELETE ON pgqueue.jobs
FOR EACH ROW EXECUTE FUNCTION fuzz_audit.log_job();
"""


# docs/sql.md, "Every transition, exactly" (without abort and cancel_pipeline, which the
# fuzzer does not call: a running job never ends cancelled here), with the functions that
# make each one.
TRANSITIONS: dict[tuple[str | None, str | None], frozenset[str]] = {
    (None, "queued"): frozenset({"enqueue", "enqueue_many", "complete", "complete_many"}),
    (None, "waiting"): frozenset({"enqueue", "enqueue_many", "complete", "complete_many"}),
    (None, "cancelled"): frozenset({"complete", "complete_many"}),
    ("waiting", "queued"): frozenset({"complete", "complete_many"}),
    ("waiting", "cancelled"): frozenset({"cancel", "fail", "recover_stale", "enqueue"}),
    ("queued", "running"): frozenset({"claim", "claim_next", "claim_or_wait"}),
    ("queued", "cancelled"): frozenset({"cancel"}),
    ("running", "succeeded"): frozenset({"complete", "complete_many"}),
    ("running", "queued"): frozenset({"fail", "release", "snooze", "recover_stale"}),
    ("running", "failed"): frozenset({"fail", "recover_stale"}),
    ("failed", "queued"): frozenset({"retry"}),
    ("failed", "waiting"): frozenset({"retry"}),
    ("cancelled", "queued"): frozenset({"retry"}),
    ("cancelled", "waiting"): frozenset({"retry"}),
    ("succeeded", None): frozenset({"prune", "prune_expired"}),
    ("failed", None): frozenset({"prune", "prune_expired"}),
    ("cancelled", None): frozenset({"prune", "prune_expired"}),
}

# SQLSTATEs and messages of the documented refusals the random choices can run into.
EXPECTED_ERRORS = (
    # depends_on naming a job pruned meanwhile, or one that failed or was cancelled meanwhile
    ("23503", "depends_on names unknown job id"),
    ("22023", "so the job could never run"),
    # retry meeting a busy pipeline of a dependent created meanwhile (docs/sql.md, retry)
    ("55P03", "is busy"),
)


class FuzzFailure(AssertionError):
    """A violated invariant or an unexpected error."""


@dataclass
class Attempt:
    """One claim of a job by one worker, as the driver saw it."""

    job: int
    worker: str
    attempts: int
    queue: str
    scope: Any
    stored_children: int
    start: float  # when the claim was known committed (driver clock)
    end: float | None = None  # when the worker's successful outcome call started
    refused: str | None = None  # the outcome call that fencing refused


@dataclass
class Recovery:
    start: float
    end: float
    ids: frozenset[int]


@dataclass
class OpInfo:
    """What a session is doing: read by another session whose statement met it in a deadlock."""

    kind: str
    tags: set[str] = field(default_factory=set)


@dataclass
class Stats:
    ops: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    deadlocks: Counter[str] = field(default_factory=Counter)
    deadlock_examples: list[str] = field(default_factory=list)
    samples: int = 0

    def summary(self) -> str:
        return (
            f"ops {dict(sorted(self.ops.items()))}; expected refusals/errors "
            f"{dict(sorted(self.expected.items()))}; documented deadlocks "
            f"{dict(sorted(self.deadlocks.items()))}; invariant samples {self.samples}"
        )


def scope_key(scope: Any) -> str:
    return json.dumps(scope, sort_keys=True)


def _documented_deadlock(ops: list[OpInfo]) -> str | None:
    """The docs/sql.md known exception (Concurrency, lock order) a deadlock cycle matches."""
    kinds = {o.kind for o in ops}
    tags = set().union(*(o.tags for o in ops))
    if "app_txn" in tags:
        return "application transaction making several calls"
    if "depends_on" in tags:
        return "enqueue depending on jobs a transition locks"
    if "dedup" in tags and kinds & {"claim", "cancel", "complete", "worker", "drain"}:
        return "enqueue whose merge target is claimed or cancelled"
    if "retry" in kinds and kinds & {"complete", "worker", "prune", "retention"}:
        return "retry meeting a completion or prune"
    return None


class Fuzzer:
    def __init__(self, connect: Connect, seed: int, seconds: float, n_sessions: int = 6) -> None:
        self.connect = connect
        self.seed = seed
        self.seconds = seconds
        self.n_sessions = n_sessions
        self.stats = Stats()
        self.recent: deque[int] = deque(maxlen=64)  # job ids enqueued lately
        self.attempts: list[Attempt] = []
        self.recoveries: list[Recovery] = []
        self.children: dict[int, int] = {}  # parent -> children its success must have created
        self.pids: dict[int, OpInfo | None] = {}
        self.workers: set[str] = set()
        self.pause_windows: list[tuple[Any, Any]] = []  # DB clock: [paused after, resume before)
        self.limit_changes: list[tuple[Any, Any]] = []  # DB clock: (call before, committed after)
        self.admin_lock = asyncio.Lock()
        self.paused = False
        self.limit: int | None = None
        self.allowed: float = math.inf  # sampled bound on running jobs of LIMITED
        self.pending_limit: tuple[int, float] | None = None  # a lowered limit not yet binding
        self.inflight_claims: dict[int, float] = {}
        self.open_attempts: dict[tuple[int, str], Attempt] = {}
        self.claim_no = itertools.count()
        self.unknown_running: dict[tuple[int, str, int], int] = {}
        self.deadline = 0.0
        self.failure: FuzzFailure | None = None
        self.notify_mode = "when_waiting" if seed % 2 else "always"

    # ------------------------------------------------------------------ helpers

    def fail(self, message: str) -> FuzzFailure:
        failure = FuzzFailure(f"seed {self.seed}: {message}")
        if self.failure is None:
            self.failure = failure
        return failure

    async def _conn(self) -> asyncpg.Connection:
        conn = await self.connect()
        for name in ("json", "jsonb"):
            await conn.set_type_codec(
                name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
        # A guard, not a tuning: no wait in a healthy run comes near it.
        await conn.execute("SET statement_timeout = '30s'")
        return conn

    async def _error(
        self, conn: asyncpg.Connection, exc: asyncpg.PostgresError, op: OpInfo
    ) -> None:
        """Count a documented error, or fail the run."""
        state = exc.sqlstate
        message = str(exc)
        if state == "40P01":
            pids = {int(p) for p in re.findall(r"Process (\d+)", exc.detail or "")}
            ops = [op] + [o for p in pids if (o := self.pids.get(p)) is not None and o is not op]
            why = _documented_deadlock(ops)
            if why is None:
                raise self.fail(
                    f"deadlock between pgqueue's own functions: {[(o.kind, sorted(o.tags)) for o in ops]}"
                    f": {message}\n{exc.detail}"
                )
            self.stats.deadlocks[why] += 1
            if len(self.stats.deadlock_examples) < 5:
                who = {
                    p: (o.kind, sorted(o.tags)) if (o := self.pids.get(p)) else None for p in pids
                }
                self.stats.deadlock_examples.append(
                    f"victim {conn.get_server_pid()} {(op.kind, sorted(op.tags))}, others {who}:"
                    f" {exc.detail}"
                )
            return
        for code, text in EXPECTED_ERRORS:
            if state == code and text in message:
                self.stats.expected[f"{op.kind}: {code}"] += 1
                return
        raise self.fail(f"unexpected error in {op.kind} {sorted(op.tags)}: {state} {message}")

    async def _guarded(
        self, conn: asyncpg.Connection, op: OpInfo, body: Callable[[], Awaitable[None]]
    ) -> None:
        pid = conn.get_server_pid()
        self.pids[pid] = op
        self.stats.ops[op.kind] += 1
        try:
            await body()
        except asyncpg.PostgresError as exc:
            if not conn.is_in_transaction():
                await self._error(conn, exc, op)
            else:
                await conn.execute("ROLLBACK")
                await self._error(conn, exc, op)
        finally:
            self.pids[pid] = None

    # ------------------------------------------------------------- generators

    def _spec(self, rng: random.Random, *, dedup: bool = True) -> dict[str, Any]:
        spec: dict[str, Any] = {"job_type": "t", "queue": rng.choice(QUEUES)}
        if rng.random() < 0.5:
            spec["scope"] = rng.choice(SCOPES)
        if dedup and rng.random() < 0.25:
            spec["dedup_key"] = rng.choice(DEDUP_KEYS)
        if rng.random() < 0.2:
            spec["priority"] = rng.randint(-1, 2)
        spec["max_attempts"] = rng.randint(1, 3)
        return spec

    def _fan_out(self, rng: random.Random) -> list[dict[str, Any]]:
        """N children and a join after all of them (key/after), none coalescing."""
        n = rng.randint(1, 4)
        specs = []
        for i in range(n):
            spec = self._spec(rng, dedup=False)
            spec["key"] = f"c{i}"
            specs.append(spec)
        join = self._spec(rng, dedup=False)
        join["job_type"] = "join"
        join["after"] = [f"c{i}" for i in range(n)]
        specs.append(join)
        return specs

    # ------------------------------------------------------------- producers

    async def _enqueue(self, conn: asyncpg.Connection, rng: random.Random, op: OpInfo) -> None:
        spec = self._spec(rng)
        delay = rng.choice([None, None, None, 30.0, 200.0])
        next_jobs = self._fan_out(rng) if rng.random() < 0.25 else None
        depends = None
        if self.recent and rng.random() < 0.15:
            depends = rng.sample(list(self.recent), k=min(len(self.recent), rng.randint(1, 2)))
            op.tags.add("depends_on")
        if "dedup_key" in spec:
            op.tags.add("dedup")
        job = await conn.fetchval(
            "SELECT pgqueue.enqueue('t', $1::jsonb, queue => $2, scope => $3::jsonb, dedup_key => $4,"
            " run_after => now() + $5::float8 * interval '1 millisecond', priority => $6,"
            " max_attempts => $7, next_jobs => $8::jsonb, depends_on => $9::bigint[])",
            {"r": rng.random()},
            spec["queue"],
            spec.get("scope"),
            spec.get("dedup_key"),
            delay,
            spec.get("priority", 0),
            spec["max_attempts"],
            next_jobs,
            depends,
        )
        self.recent.append(int(job))

    async def _enqueue_many(self, conn: asyncpg.Connection, rng: random.Random, op: OpInfo) -> None:
        specs = (
            self._fan_out(rng)
            if rng.random() < 0.4
            else [self._spec(rng) for _ in range(rng.randint(2, 5))]
        )
        if any("dedup_key" in s for s in specs):
            op.tags.add("dedup")
        ids = await conn.fetch("SELECT * FROM pgqueue.enqueue_many($1::jsonb)", specs)
        self.recent.extend(int(r[0]) for r in ids)

    async def _producer_txn(self, conn: asyncpg.Connection, rng: random.Random) -> None:
        """Several calls in one transaction, committed or rolled back; claims it made count
        only once committed."""
        op = OpInfo("txn", {"app_txn"})
        claimed: list[asyncpg.Record] = []

        async def body() -> None:
            await conn.execute("BEGIN")
            for _ in range(rng.randint(2, 3)):
                choice = rng.random()
                if choice < 0.45:
                    await self._enqueue(conn, rng, op)
                elif choice < 0.8:
                    await self._enqueue_many(conn, rng, op)
                else:
                    claimed.extend(await self._claim_rows(conn, rng, self._worker(conn)))
            if rng.random() < 0.3:
                await conn.execute("ROLLBACK")
                self.stats.ops["txn rolled back"] += 1
                return
            await conn.execute("COMMIT")
            self._held(conn).extend(self._record_claims(claimed))

        await self._guarded(conn, op, body)

    # --------------------------------------------------------------- workers

    def _worker(self, conn: asyncpg.Connection) -> str:
        return self.worker_names[conn.get_server_pid()]

    def _held(self, conn: asyncpg.Connection) -> list[Attempt]:
        return self.held[conn.get_server_pid()]

    async def _claim_rows(
        self, conn: asyncpg.Connection, rng: random.Random, worker: str
    ) -> list[asyncpg.Record]:
        key = next(self.claim_no)
        self.inflight_claims[key] = time.monotonic()
        try:
            choice = rng.random()
            rows: list[asyncpg.Record]
            if choice < 0.2 and self.recent:
                rows = await conn.fetch(
                    "SELECT * FROM pgqueue.claim($1, $2)", rng.choice(list(self.recent)), worker
                )
            else:
                queues = rng.choice(
                    [None, None, ["q0"], ["q1"], ["q1", "lim"], ["lim"], list(QUEUES)]
                )
                function = "claim_or_wait" if choice > 0.75 else "claim_next"
                rows = await conn.fetch(
                    f"SELECT * FROM pgqueue.{function}($1, $2::text[], $3)",
                    worker,
                    queues,
                    rng.randint(1, 3),
                )
        finally:
            del self.inflight_claims[key]
        scopes = [scope_key(r["scope"]) for r in rows if r["scope"] is not None]
        if len(scopes) != len(set(scopes)):
            raise self.fail(f"one claim returned two jobs of one scope: {scopes}")
        for r in rows:
            if r["state"] != "running" or r["locked_by"] != worker:
                raise self.fail(f"claim returned a row not running under {worker}: {dict(r)}")
        return rows

    def _record_claims(self, rows: list[asyncpg.Record]) -> list[Attempt]:
        now = time.monotonic()
        out = []
        for r in rows:
            attempt = Attempt(
                job=r["id"],
                worker=r["locked_by"],
                attempts=r["attempts"],
                queue=r["queue"],
                scope=r["scope"],
                stored_children=len(r["next_jobs"] or []),
                start=now,
            )
            # The same worker claimed the job again after its lease was recovered: outcomes go
            # by worker name, so the earlier attempt's handler must record nothing any more.
            earlier = self.open_attempts.get((attempt.job, attempt.worker))
            if earlier is not None and earlier.end is None and earlier.refused is None:
                earlier.refused = "superseded"
                self.stats.expected["attempt superseded by the same worker's new claim"] += 1
            self.open_attempts[(attempt.job, attempt.worker)] = attempt
            self.attempts.append(attempt)
            out.append(attempt)
        return out

    async def _finish(self, conn: asyncpg.Connection, rng: random.Random, a: Attempt) -> None:
        """Record one outcome of a held attempt: complete, fail, snooze or release."""
        choice = rng.random()
        start = time.monotonic()
        kind: str
        ok: bool
        if choice < 0.55:
            passed = self._fan_out(rng) if rng.random() < 0.15 else None
            kind = "complete"
            ok = bool(
                await conn.fetchval(
                    "SELECT pgqueue.complete($1, $2, $3::jsonb, $4::jsonb)",
                    a.job,
                    a.worker,
                    {"ok": True},
                    passed,
                )
            )
            if ok:
                self.children[a.job] = a.stored_children + len(passed or [])
        elif choice < 0.75:
            kind = "fail"
            retry_in = rng.choice([None, "0", "20 milliseconds"])
            ok = (
                await conn.fetchval(
                    "SELECT pgqueue.fail($1, $2, 'boom', $3::text::interval)",
                    a.job,
                    a.worker,
                    retry_in,
                )
                is not None
            )
        elif choice < 0.88:
            kind = "snooze"
            delay = rng.choice(["0", "10 milliseconds", "50 milliseconds"])
            ok = (
                await conn.fetchval(
                    "SELECT pgqueue.snooze($1, $2, $3::text::interval)", a.job, a.worker, delay
                )
                is not None
            )
        else:
            kind = "release"
            ok = bool(await conn.fetchval("SELECT pgqueue.release($1, $2)", a.job, a.worker))
        if ok:
            a.end = start
        else:
            a.refused = kind
            self.stats.expected[f"{kind} refused (lease lost)"] += 1

    async def _complete_many(self, conn: asyncpg.Connection, batch: list[Attempt]) -> None:
        start = time.monotonic()
        worker = batch[0].worker
        done = {
            r[0]
            for r in await conn.fetch(
                "SELECT * FROM pgqueue.complete_many($1, $2::bigint[])",
                worker,
                [a.job for a in batch],
            )
        }
        for a in batch:
            if a.job in done:
                a.end = start
                self.children[a.job] = a.stored_children
            else:
                a.refused = "complete_many"
                self.stats.expected["complete_many refused (lease lost)"] += 1

    async def _work(self, conn: asyncpg.Connection, rng: random.Random) -> None:
        """Claim, then settle what this worker holds (an interrupted earlier round's jobs too)."""
        worker = self._worker(conn)
        held = self._held(conn)
        op = OpInfo("worker")

        async def claim() -> None:
            held.extend(self._record_claims(await self._claim_rows(conn, rng, worker)))

        await self._guarded(conn, OpInfo("claim"), claim)
        if not held:
            return
        await asyncio.sleep(rng.random() * 0.005)  # the "handler"
        if rng.random() < 0.05:
            # The worker walks away: its leases go stale, recover_stale requeues them, and
            # a zombie of it may come back later with an outcome.
            self.zombies.extend(held)
            held.clear()
            self._new_worker(conn)
            self.stats.ops["walk away"] += 1
            return
        batch = [a for a in held if a.refused is None]
        held.clear()
        if (
            len(batch) > 1
            and len({a.worker for a in batch}) == 1
            and len({a.job for a in batch}) == len(batch)
            and rng.random() < 0.3
        ):

            async def many() -> None:
                await self._complete_many(conn, batch)

            try:
                await self._guarded(conn, OpInfo("complete"), many)
            finally:
                held.extend(a for a in batch if a.end is None and a.refused is None)
            return
        for a in batch:

            async def one(a: Attempt = a) -> None:
                await self._finish(conn, rng, a)

            try:
                await self._guarded(conn, op, one)
            finally:
                if a.end is None and a.refused is None:
                    held.append(a)

    async def _claim_race(self, conn: asyncpg.Connection, rng: random.Random) -> None:
        """Two backends claim at once (the same id, or the same queues): one winner per job."""
        other = self.spares[conn.get_server_pid()]
        workers = (self._worker(conn), self._worker(conn) + "b")
        self.workers.add(workers[1])
        op = OpInfo("claim")
        pids = (conn.get_server_pid(), other.get_server_pid())
        recent = list(self.recent)
        calls: list[tuple[str, list[Any]]]
        if recent and rng.random() < 0.6:
            # The newest job, or the two newest (often one scope: a claim of each at once).
            first = recent[-1]
            second = recent[-2] if len(recent) > 1 and rng.random() < 0.5 else first
            sql = "SELECT * FROM pgqueue.claim($1, $2)"
            calls = [(sql, [first, workers[0]]), (sql, [second, workers[1]])]
        else:
            queues = rng.choice([None, ["q0"], ["q1"], ["lim"], list(QUEUES)])
            sql = "SELECT * FROM pgqueue.claim_next($1, $2::text[], 2)"
            calls = [(sql, [workers[0], queues]), (sql, [workers[1], queues])]
        for pid in pids:
            self.pids[pid] = op
        self.stats.ops["claim race"] += 1
        key = next(self.claim_no)
        self.inflight_claims[key] = time.monotonic()
        try:
            results = await asyncio.gather(
                conn.fetch(calls[0][0], *calls[0][1]),
                other.fetch(calls[1][0], *calls[1][1]),
                return_exceptions=True,
            )
        finally:
            del self.inflight_claims[key]
            for pid in pids:
                self.pids[pid] = None
        won: list[asyncpg.Record] = []
        for result in results:
            if isinstance(result, asyncpg.PostgresError):
                await self._error(conn, result, op)
            elif isinstance(result, BaseException):
                raise result
            else:
                won.extend(result)
        ids = [r["id"] for r in won]
        if len(ids) != len(set(ids)):
            raise self.fail(f"two concurrent claims both got job(s) {ids}")
        self._held(conn).extend(self._record_claims(won))

    async def _zombie(self, conn: asyncpg.Connection, rng: random.Random) -> None:
        """A worker that walked away records an outcome late: fenced if it was recovered."""
        if not self.zombies:
            return
        a = self.zombies.pop(rng.randrange(len(self.zombies)))
        if a.refused is not None:
            return

        async def body() -> None:
            await self._finish(conn, rng, a)

        await self._guarded(conn, OpInfo("zombie"), body)

    # ------------------------------------------------------------- operators

    async def _recover(self, conn: asyncpg.Connection, rng: random.Random) -> None:
        interval = "0" if rng.random() < 0.1 else STALE

        async def body() -> None:
            start = time.monotonic()
            ids = await conn.fetchval(
                "SELECT ARRAY(SELECT pgqueue.recover_stale($1::text::interval))", interval
            )
            self.recoveries.append(Recovery(start, time.monotonic(), frozenset(ids)))

        await self._guarded(conn, OpInfo("recover"), body)

    async def _pick(self, conn: asyncpg.Connection, rng: random.Random, states: str) -> int | None:
        ids = [
            r[0]
            for r in await conn.fetch(
                f"SELECT id FROM pgqueue.jobs WHERE state IN ({states}) ORDER BY id DESC LIMIT 20"
            )
        ]
        return rng.choice(ids) if ids else None

    async def _retry(self, conn: asyncpg.Connection, rng: random.Random) -> None:
        job = await self._pick(conn, rng, "'failed', 'cancelled'")
        if job is not None:

            async def body() -> None:
                await conn.fetchval("SELECT pgqueue.retry($1)", job)

            await self._guarded(conn, OpInfo("retry"), body)

    async def _cancel(self, conn: asyncpg.Connection, rng: random.Random) -> None:
        job = await self._pick(conn, rng, "'waiting', 'queued'")
        if job is not None:

            async def body() -> None:
                await conn.fetchval("SELECT pgqueue.cancel($1)", job)

            await self._guarded(conn, OpInfo("cancel"), body)

    async def _pause_or_resume(self, conn: asyncpg.Connection) -> None:
        async with self.admin_lock:

            async def body() -> None:
                if not self.paused:
                    assert await conn.fetchval("SELECT pgqueue.pause_queue($1)", PAUSABLE)
                    after = await conn.fetchval("SELECT clock_timestamp()")
                    self.pause_windows.append((after, None))
                    self.paused = True
                else:
                    before = await conn.fetchval("SELECT clock_timestamp()")
                    assert await conn.fetchval("SELECT pgqueue.resume_queue($1)", PAUSABLE)
                    self.pause_windows[-1] = (self.pause_windows[-1][0], before)
                    self.paused = False

            await self._guarded(conn, OpInfo("pause"), body)

    async def _set_limit(self, conn: asyncpg.Connection, rng: random.Random) -> None:
        new = rng.choice([1, 2, 3, None])
        async with self.admin_lock:

            async def body() -> None:
                before = await conn.fetchval("SELECT clock_timestamp()")
                old = await conn.fetchval("SELECT pgqueue.set_queue_limit($1, $2)", LIMITED, new)
                after = await conn.fetchval("SELECT clock_timestamp()")
                if old != self.limit:
                    raise self.fail(f"set_queue_limit returned {old}, the driver set {self.limit}")
                self.limit_changes.append((before, after))
                self.limit = new
                if new is None:
                    self.allowed, self.pending_limit = math.inf, None
                elif new >= self.allowed:
                    self.allowed, self.pending_limit = new, None
                else:
                    self.pending_limit = (new, time.monotonic())

            await self._guarded(conn, OpInfo("limit"), body)

    async def _prune(self, conn: asyncpg.Connection, rng: random.Random) -> None:
        if rng.random() < 0.5:

            async def body() -> None:
                await conn.fetchval("SELECT pgqueue.prune($1::text::interval)", "200 milliseconds")

            await self._guarded(conn, OpInfo("prune"), body)
        else:

            async def expired() -> None:
                await conn.fetchval("SELECT pgqueue.prune_expired($1)", rng.randint(5, 50))

            await self._guarded(conn, OpInfo("retention"), expired)

    async def _heartbeat(self, conn: asyncpg.Connection) -> None:
        async def body() -> None:
            await conn.fetchval("SELECT pgqueue.heartbeat($1)", self._worker(conn))

        await self._guarded(conn, OpInfo("heartbeat"), body)

    # --------------------------------------------------------------- sessions

    def _new_worker(self, conn: asyncpg.Connection) -> None:
        pid = conn.get_server_pid()
        self.generation[pid] = self.generation.get(pid, -1) + 1
        name = f"s{self.session_no[pid]}.{self.generation[pid]}"
        self.worker_names[pid] = name
        self.workers.add(name)

    async def _actor(self, conn: asyncpg.Connection, rng: random.Random) -> None:
        ops: list[tuple[float, Callable[[], Awaitable[None]]]] = [
            (14, lambda: self._produce(conn, rng, self._enqueue, "enqueue")),
            (6, lambda: self._produce(conn, rng, self._enqueue_many, "enqueue_many")),
            (4, lambda: self._producer_txn(conn, rng)),
            (30, lambda: self._work(conn, rng)),
            (4, lambda: self._claim_race(conn, rng)),
            (2, lambda: self._zombie(conn, rng)),
            (3, lambda: self._recover(conn, rng)),
            (3, lambda: self._retry(conn, rng)),
            (2, lambda: self._cancel(conn, rng)),
            (1, lambda: self._pause_or_resume(conn)),
            (1, lambda: self._set_limit(conn, rng)),
            (2, lambda: self._prune(conn, rng)),
            (1, lambda: self._heartbeat(conn)),
        ]
        weights = [w for w, _ in ops]
        while time.monotonic() < self.deadline and self.failure is None:
            ((_, op),) = rng.choices(ops, weights=weights)
            await op()

    async def _produce(
        self,
        conn: asyncpg.Connection,
        rng: random.Random,
        fn: Callable[[asyncpg.Connection, random.Random, OpInfo], Awaitable[None]],
        kind: str,
    ) -> None:
        op = OpInfo(kind)  # fn adds its tags (dedup, depends_on) before its statement runs

        async def body() -> None:
            await fn(conn, rng, op)

        await self._guarded(conn, op, body)

    async def _sample(self, conn: asyncpg.Connection) -> None:
        """The invariants, each in one snapshot, plus what the driver knows of running jobs."""
        self.stats.samples += 1
        for name, sql in INVARIANTS.items():
            rows = await conn.fetch(sql)
            if rows:
                raise self.fail(
                    f"invariant violated while running: {name}: {[tuple(r) for r in rows]}"
                )
        claimed = {(a.job, a.worker, a.attempts) for a in self.attempts}
        for r in await conn.fetch(
            "SELECT id, locked_by, attempts FROM pgqueue.jobs WHERE state = 'running'"
        ):
            attempt = (r[0], r[1], r[2])
            if r[1] not in self.workers:
                raise self.fail(f"job {r[0]} runs under {r[1]!r}, a worker the driver never had")
            if attempt in claimed:
                self.unknown_running.pop(attempt, None)
            else:
                # A claim's commit can be seen here before its session records it; not for long.
                seen = self.unknown_running[attempt] = self.unknown_running.get(attempt, 0) + 1
                if seen > 5:
                    raise self.fail(f"running attempt {attempt} was never returned by a claim")
        # The limit: a lowered one binds once no claim that began before it is under way.
        pending = self.pending_limit
        settled = pending is not None and all(t > pending[1] for t in self.inflight_claims.values())
        running = await conn.fetchval(
            "SELECT count(*) FROM pgqueue.jobs WHERE state = 'running' AND queue = $1", LIMITED
        )
        if running > self.allowed:
            raise self.fail(f"{running} jobs of {LIMITED} run, limit {self.allowed}")
        if (
            settled
            and pending is not None
            and pending is self.pending_limit
            and running <= pending[0]
        ):
            self.allowed, self.pending_limit = pending[0], None

    async def _watchdog(self, conn: asyncpg.Connection) -> None:
        """A statement waiting for seconds on a lock is a hang (nothing here holds a lock
        for long): report who waits for whom while it still waits."""
        stuck = await conn.fetch(
            "SELECT pid, pg_blocking_pids(pid) AS blockers, wait_event_type, wait_event, query,"
            " now() - query_start AS waited FROM pg_stat_activity"
            " WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid()"
            " AND wait_event_type = 'Lock' AND now() - query_start > interval '5 seconds'"
        )
        if not stuck:
            return
        pids = {p for r in stuck for p in r["blockers"]} | {r["pid"] for r in stuck}
        activity = await conn.fetch(
            "SELECT pid, state, wait_event_type, wait_event, backend_xid, query,"
            " now() - xact_start AS in_xact FROM pg_stat_activity WHERE pid = ANY ($1::int[])",
            list(pids),
        )
        locks = await conn.fetch(
            "SELECT pid, locktype, mode, granted, classid, objid, objsubid, relation::regclass::text,"
            " transactionid::text FROM pg_locks WHERE pid = ANY ($1::int[]) AND locktype <> 'virtualxid'"
            " AND (NOT granted OR locktype IN ('advisory', 'transactionid', 'tuple'))",
            list(pids),
        )
        ops = {p: (o.kind, sorted(o.tags)) if (o := self.pids.get(p)) else None for p in pids}
        raise self.fail(
            "a statement waits for a lock for more than 5 s:\n"
            + "\n".join(str(dict(r)) for r in stuck)
            + "\nsessions:\n"
            + "\n".join(f"{dict(r)} op={ops.get(r['pid'])}" for r in activity)
            + "\nlocks:\n"
            + "\n".join(str(dict(r)) for r in locks)
        )

    async def _sampler(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.failure is None:
            await self._sample(conn)
            await self._watchdog(conn)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    # ------------------------------------------------------------------ run

    async def run(self) -> str:
        admin = await self._conn()
        await admin.execute(AUDIT_SQL)
        for name, value in (
            ("backoff_base", "10 milliseconds"),
            ("backoff_cap", "100 milliseconds"),
            ("prune_after", "1 second"),
            ("notify", self.notify_mode),
        ):
            await admin.execute(
                "UPDATE pgqueue.settings SET value = $2 WHERE name = $1", name, value
            )
        self.held: dict[int, list[Attempt]] = {}
        self.zombies: list[Attempt] = []
        self.session_no: dict[int, int] = {}
        self.generation: dict[int, int] = {}
        self.worker_names: dict[int, str] = {}
        conns = [await self._conn() for _ in range(self.n_sessions)]
        self.spares: dict[int, asyncpg.Connection] = {}
        for i, conn in enumerate(conns):
            self.spares[conn.get_server_pid()] = await self._conn()
            self.session_no[conn.get_server_pid()] = i
            self.held[conn.get_server_pid()] = []
            self._new_worker(conn)
        sampler_conn = await self._conn()
        stop = asyncio.Event()
        self.deadline = time.monotonic() + self.seconds
        sampler = asyncio.ensure_future(self._sampler(sampler_conn, stop))
        results = await asyncio.gather(
            *(self._actor(c, random.Random(f"{self.seed}:{i}")) for i, c in enumerate(conns)),
            return_exceptions=True,
        )
        stop.set()
        sampler_error = (await asyncio.gather(sampler, return_exceptions=True))[0]
        for outcome in (*results, sampler_error):
            if isinstance(outcome, BaseException):
                if self.failure is not None:
                    raise self.failure
                raise outcome
        await self._check_running_accounted(admin)
        await self._drain(admin)
        for name, sql in INVARIANTS.items():
            rows = await admin.fetch(sql)
            if rows:
                raise self.fail(
                    f"invariant violated at the end: {name}: {[tuple(r) for r in rows]}"
                )
        log = await admin.fetch("SELECT * FROM fuzz_audit.log ORDER BY seq")
        self._replay(log)
        await self._check_fencing(admin, log)
        self._check_children(log)
        self._check_scopes()
        jobs = len({r["id"] for r in log})
        return (
            f"seed {self.seed} ({self.notify_mode}): {jobs} jobs, {len(log)} row changes, "
            f"{len(self.attempts)} attempts claimed; {self.stats.summary()}"
        )

    # --------------------------------------------------------------- checks

    async def _check_running_accounted(self, conn: asyncpg.Connection) -> None:
        """Every job still running is an attempt the driver holds (a walked-away one too)."""
        held = {
            (a.job, a.worker, a.attempts)
            for a in self.attempts
            if a.end is None and a.refused is None
        }
        for r in await conn.fetch(
            "SELECT id, locked_by, attempts FROM pgqueue.jobs WHERE state = 'running'"
        ):
            if (r[0], r[1], r[2]) not in held:
                raise self.fail(
                    f"job {r[0]} runs (attempt {r[2]} by {r[1]}) but no session holds it"
                )

    async def _drain(self, conn: asyncpg.Connection) -> None:
        """Liveness: with queues resumed and limits lifted, every job reaches a final state."""
        if self.paused:
            before = await conn.fetchval("SELECT clock_timestamp()")
            await conn.fetchval("SELECT pgqueue.resume_queue($1)", PAUSABLE)
            self.pause_windows[-1] = (self.pause_windows[-1][0], before)
            self.paused = False
        await conn.fetchval("SELECT pgqueue.set_queue_limit($1, NULL)", LIMITED)
        self.workers.add("drain")
        deadline = time.monotonic() + 15
        while True:
            await conn.fetch("SELECT pgqueue.recover_stale('0')")
            rows = await conn.fetch("SELECT * FROM pgqueue.claim_next('drain', NULL, 100)")
            if rows:
                attempts = self._record_claims(rows)
                await self._complete_many(conn, attempts)
                continue
            left = await conn.fetch(
                "SELECT id, state, queue, scope, scope_blocked, queue_paused, pending_deps,"
                " run_after - now() AS due_in FROM pgqueue.jobs"
                " WHERE state IN ('waiting', 'queued', 'running') ORDER BY id"
            )
            if not left:
                return
            # A job retried while a dependency of it had failed or was cancelled waits for
            # that dependency again, for good (docs/sql.md, retry): retry the dependency.
            revived = await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pgqueue.retry(id)) FROM (SELECT DISTINCT p.id"
                " FROM pgqueue.jobs j JOIN pgqueue.job_dependencies d ON d.job_id = j.id"
                " JOIN pgqueue.jobs p ON p.id = d.depends_on"
                " WHERE j.state = 'waiting' AND p.state IN ('failed', 'cancelled') ORDER BY p.id) x"
            )
            if revived:
                continue
            if time.monotonic() > deadline:
                raise self.fail(
                    f"jobs never finished once drained: {[dict(r) for r in left[:10]]}\n"
                    + await self._history(conn, [r["id"] for r in left[:3]])
                )
            await asyncio.sleep(0.05)

    async def _history(self, conn: asyncpg.Connection, ids: list[int]) -> str:
        """The audit log of some jobs and of their dependencies, for a failure message."""
        edges = await conn.fetch(
            "SELECT job_id, depends_on FROM pgqueue.job_dependencies WHERE job_id = ANY ($1::bigint[])",
            ids,
        )
        every = sorted(set(ids) | {e["depends_on"] for e in edges})
        rows = await conn.fetch(
            "SELECT seq, id, op, fn, old_state, new_state, old_locked_by, new_locked_by,"
            " old_attempts, new_attempts, parent_id, deps_unfinished, at"
            " FROM fuzz_audit.log WHERE id = ANY ($1::bigint[]) ORDER BY seq",
            every,
        )
        return f"edges: {[tuple(e) for e in edges]}\nhistory:\n" + "\n".join(
            str(tuple(r)) for r in rows
        )

    def _replay(self, log: list[asyncpg.Record]) -> None:
        """Each job's row versions in order: legal transitions, made by the right function,
        with the columns the contract sets."""
        last: dict[int, str | None] = {}
        deleted: set[int] = set()
        for r in log:
            job, fn = r["id"], r["fn"]
            where = f"job {job}, change {r['seq']} ({r['op']} by {fn}: {r['old_state']} -> {r['new_state']})"
            if job in deleted:
                raise self.fail(f"{where}: a change after the job was deleted")
            if r["op"] == "INSERT":
                if job in last:
                    raise self.fail(f"{where}: inserted twice")
            elif last.get(job, "?") != r["old_state"]:
                raise self.fail(f"{where}: the previous version was {last.get(job)}")
            old, new = r["old_state"], r["new_state"]
            if r["op"] == "DELETE":
                deleted.add(job)
            last[job] = new
            if old != new:
                allowed = TRANSITIONS.get((old, new))
                if allowed is None:
                    raise self.fail(f"{where}: not a transition of docs/sql.md")
                if fn not in allowed:
                    raise self.fail(f"{where}: made by {fn}, expected one of {sorted(allowed)}")
            self._check_columns(r, where)

    def _check_columns(self, r: asyncpg.Record, where: str) -> None:
        old, new, fn = r["old_state"], r["new_state"], r["fn"]
        a0, a1 = r["old_attempts"], r["new_attempts"]
        problems = []
        if r["op"] == "INSERT" and (a1 != 0 or r["new_locked_by"] is not None):
            problems.append("a new job with attempts or a lease")
        if r["op"] == "UPDATE" and r["old_started_at"] is not None:
            if r["new_started_at"] != r["old_started_at"]:
                problems.append("started_at moved")
        if new in ("waiting", "queued") and a1 >= r["max_attempts"]:
            problems.append(f"pending with attempts {a1} of {r['max_attempts']}")
        if new in ("queued", "running") and old != new and r["deps_unfinished"]:
            problems.append(f"{new} with {r['deps_unfinished']} unfinished dependencies")
        if (old, new) == ("queued", "running"):
            if a1 != a0 + 1 or r["new_locked_by"] is None:
                problems.append(f"claim: attempts {a0} -> {a1}, locked_by {r['new_locked_by']}")
            if r["new_started_at"] != (r["old_started_at"] or r["locked_at"]):
                problems.append("claim: started_at is not the first claim's")
            if r["run_after"] > r["locked_at"]:
                problems.append(
                    f"claimed before due: run_after {r['run_after']} > {r['locked_at']}"
                )
            if r["scope"] is not None and not r["is_current"]:
                problems.append("claimed scoped job not current")
            for paused_after, resume_before in self.pause_windows:
                if (
                    r["queue"] == PAUSABLE
                    and r["stmt_at"] > paused_after
                    and (resume_before is None or r["at"] < resume_before)
                ):
                    problems.append(f"claimed from paused {PAUSABLE} (paused {paused_after})")
            limit, running = r["queue_limit"], r["running_in_queue"]
            if limit is not None and running > limit:
                racing = any(
                    r["stmt_at"] <= after and r["at"] >= before
                    for before, after in self.limit_changes
                )
                if not racing:
                    problems.append(f"claim made {running} jobs of {r['queue']} run, limit {limit}")
        elif old == "running" and new == "running":
            if a1 != a0 or r["new_locked_by"] != r["old_locked_by"]:
                problems.append("running job changed hands")
        elif old == "running":
            if new == "succeeded" and (a1 != a0 or r["new_locked_by"] != r["old_locked_by"]):
                problems.append("completion changed attempts or locked_by")
            if new == "queued":
                if r["new_locked_by"] is not None:
                    problems.append("requeued with a lease")
                want = a0 - 1 if fn in ("release", "snooze") else a0
                if a1 != want:
                    problems.append(f"{fn}: attempts {a0} -> {a1}, expected {want}")
            if new == "failed" and (a1 != a0 or a1 < r["max_attempts"]):
                problems.append(f"failed with attempts {a0} -> {a1} of {r['max_attempts']}")
        elif fn == "retry" and old in ("failed", "cancelled") and new in ("queued", "waiting"):
            if a1 != 0 or r["finished_at"] is not None or r["result"] is not None:
                problems.append("retry kept attempts, finished_at or result")
        elif r["op"] == "UPDATE" and old == new and a1 != a0:
            problems.append(f"attempts {a0} -> {a1} without a transition")
        if problems:
            raise self.fail(f"{where}: {'; '.join(problems)}")

    async def _check_fencing(self, conn: asyncpg.Connection, log: list[asyncpg.Record]) -> None:
        """A refused outcome is explained by a recovery of that very attempt."""
        recovered = {
            (r["id"], r["old_locked_by"], r["old_attempts"])
            for r in log
            if r["fn"] == "recover_stale"
            and r["old_state"] == "running"
            and r["new_state"] != "running"
        }
        for a in self.attempts:
            if a.refused and (a.job, a.worker, a.attempts) not in recovered:
                raise self.fail(
                    f"{a.refused} of job {a.job} by {a.worker} (attempt {a.attempts}) was refused,"
                    " but its lease was never recovered; the driver's attempts of the job: "
                    f"{[x for x in self.attempts if x.job == a.job]}\n"
                    + await self._history(conn, [a.job])
                )

    def _check_children(self, log: list[asyncpg.Record]) -> None:
        """Each success created its stored and passed next_jobs once; nothing else did."""
        created = Counter(r["parent_id"] for r in log if r["op"] == "INSERT" and r["parent_id"])
        expected = {k: v for k, v in self.children.items() if v}
        if dict(created) != expected:
            diff = {
                k: (created.get(k, 0), expected.get(k, 0))
                for k in set(created) | set(expected)
                if created.get(k, 0) != expected.get(k, 0)
            }
            raise self.fail(f"children created (created, expected) per parent differ: {diff}")

    def _check_scopes(self) -> None:
        """Two attempts of one scope never overlap (intervals the driver saw, each inside the
        real one: from the claim's return to the call ending it, or the start of the
        recovery that took the lease)."""
        by_scope: dict[str, list[tuple[float, float, Attempt]]] = {}
        for a in self.attempts:
            if a.scope is None or a.worker == "drain":
                continue
            end = a.end
            if end is None:
                ends = [r.start for r in self.recoveries if a.job in r.ids and r.end > a.start]
                end = min(ends) if ends else (a.start if a.refused else math.inf)
            if end > a.start:
                by_scope.setdefault(scope_key(a.scope), []).append((a.start, end, a))
        for scope, spans in by_scope.items():
            spans.sort(key=lambda s: s[0])
            latest: tuple[float, float, Attempt] | None = None
            for span in spans:
                if latest is not None and span[0] < latest[1]:
                    raise self.fail(
                        f"scope {scope}: job {span[2].job} ({span[2].worker}) ran while job "
                        f"{latest[2].job} ({latest[2].worker}) still ran"
                    )
                if latest is None or span[1] > latest[1]:
                    latest = span
