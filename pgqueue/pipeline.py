"""Pipelines: a DAG of jobs enqueued atomically under one ``pipeline_id``, and its status.

Declare the jobs and the edges between them, then enqueue the whole graph with one call to
``pgqueue.enqueue_many`` (one statement, one transaction, one notification per queue)::

    pipe = pgqueue.Pipeline(app)
    ingest = pipe.add("ingest_factors", {"module": "travel", "year": 2024})
    report = pipe.add("publish_report", {"year": 2024}, after=ingest)
    run = await pipe.enqueue(pool)          # run.pipeline_id, run[ingest] -> job id

Every job gets the same ``pipeline_id`` (a uuid4 made here, by the enqueuer), and every job a
member creates later (``Result.then``/``fan_out``) inherits it. Mistakes the graph itself
shows (a cycle, an edge to an unknown or foreign node, a duplicate key) raise
:class:`PipelineError` before anything is sent; the SQL checks the same again.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, cast

from pgqueue.dsn import ConnOrPool, asyncpg_target, dumps
from pgqueue.job import Spec, pipeline_id_text

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.orm import Session

    from pgqueue.app import App

__all__ = [
    "EnqueuedPipeline",
    "Node",
    "Pipeline",
    "PipelineError",
    "PipelineState",
    "PipelineStatus",
    "cancel_pipeline",
    "pipeline_status",
]


_ENQUEUE_MANY_ASYNCPG = (
    "SELECT id FROM pgqueue.enqueue_many($1::text::jsonb) WITH ORDINALITY AS t(id, ord)"
    " ORDER BY ord"
)
# SQLAlchemy is imported only when a session is used: plain asyncpg users and the CLI do
# not pay its import time.
_ENQUEUE_MANY_SQLA = (
    "SELECT id FROM pgqueue.enqueue_many(CAST(:specs AS jsonb)) WITH ORDINALITY AS t(id, ord)"
    " ORDER BY ord"
)


def _is_sqlalchemy(target: object) -> TypeGuard[AsyncSession | AsyncConnection]:
    """A SQLAlchemy async session or connection (a scoped session too: a proxy, not an
    AsyncSession)? Never imports SQLAlchemy to find out."""
    if "sqlalchemy.ext.asyncio" not in sys.modules:
        return False
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

    return isinstance(target, AsyncSession | AsyncConnection | async_scoped_session)


_STATUS_SQL = """
SELECT pipeline_id, jobs, waiting, queued, running, succeeded, failed, cancelled,
       created_at, started_at, finished_at, done, state
FROM pgqueue.pipelines WHERE pipeline_id = $1::text::uuid
"""
_CANCEL_SQL = "SELECT pgqueue.cancel_pipeline(pipeline_id => $1::text::uuid)"
_ABORT_SQL = "SELECT pgqueue.abort_pipeline(pipeline_id => $1::text::uuid)"


class PipelineError(ValueError):
    """The pipeline cannot be enqueued as declared (nothing was sent)."""


@dataclass(frozen=True, eq=False)
class Node:
    """A handle on one job of a :class:`Pipeline`, returned by :meth:`Pipeline.add`.

    Use it in ``after=`` of later nodes and to look up the job id once enqueued.
    """

    pipeline: Pipeline = field(repr=False)
    index: int
    key: str
    job_type: str


Upstream = Node | str


@dataclass(frozen=True, slots=True)
class EnqueuedPipeline:
    """What :meth:`Pipeline.enqueue` created: the pipeline id and the job ids in node order."""

    pipeline_id: uuid.UUID
    job_ids: tuple[int, ...]
    keys: tuple[str, ...]

    def __getitem__(self, node: Node | str) -> int:
        """The job id of ``node`` (a handle or its key)."""
        key = node.key if isinstance(node, Node) else node
        try:
            return self.job_ids[self.keys.index(key)]
        except ValueError:
            raise KeyError(key) from None


class Pipeline:
    """A DAG of jobs, declared node by node and enqueued atomically.

    With ``app``, nodes of registered job types get the queue and ``max_attempts`` they were
    declared with (unless a node says otherwise). The same Pipeline can be enqueued many
    times; each enqueue is a new pipeline with a new id.
    """

    def __init__(self, app: App | None = None) -> None:
        self.app = app
        self._nodes: list[Node] = []
        self._specs: list[dict[str, Any]] = []
        self._after: list[list[Upstream]] = []
        self._edges: list[tuple[Upstream, Upstream]] = []  # add_edge's, resolved by specs()
        self._user_keys: set[str] = set()

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self._nodes)

    def add(
        self,
        job: str | Spec,
        payload: Mapping[str, Any] | None = None,
        *,
        after: Upstream | Iterable[Upstream] = (),
        key: str | None = None,
        queue: str | None = None,
        scope: Any = None,
        dedup_key: str | None = None,
        run_after: datetime | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        depends_on: Sequence[int] | None = None,
    ) -> Node:
        """Add a job; it runs once every node in ``after`` (and job in ``depends_on``) succeeded.

        ``job`` is a job type (with ``payload`` and the options) or a ready :class:`Spec`.
        ``after`` takes node handles, or keys of nodes (also ones added later). ``key`` names
        the node (default: ``#<index>``); ``depends_on`` names existing jobs outside the
        pipeline.
        """
        if isinstance(job, Spec):
            given = {
                "payload": payload,
                "queue": queue,
                "scope": scope,
                "dedup_key": dedup_key,
                "run_after": run_after,
                "priority": priority,
                "max_attempts": max_attempts,
            }
            if any(value is not None for value in given.values()):
                raise PipelineError("pass either a Spec or a job type with options, not both")
            spec = job.to_dict()
            if key is None:
                key = spec.pop("key", None)
            spec.pop("key", None)
            upstream: list[Upstream] = list(spec.pop("after", []))
        else:
            spec = Spec(
                job,
                payload,
                queue=queue,
                scope=scope,
                dedup_key=dedup_key,
                run_after=run_after,
                priority=priority,
                max_attempts=max_attempts,
            ).to_dict()
            upstream = []
        if key is not None:
            if not isinstance(key, str) or not key:
                raise PipelineError(f"key must be a non-empty string, got {key!r}")
            if key in self._user_keys:
                raise PipelineError(f"key {key!r} is used by more than one node")
        if depends_on is not None:
            ids = list(depends_on)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
                raise PipelineError(f"depends_on must be job ids, got {ids!r}")
            spec["depends_on"] = ids
        upstream += _as_list(after)
        for item in upstream:
            self._check_upstream(item)
        if self.app is not None:
            spec = self.app.with_defaults(spec)
        index = len(self._nodes)
        if key is None:
            key = f"#{index}"
            while key in self._user_keys:
                key += "_"
        else:
            for other in self._nodes:
                if other.key == key:  # a default key (user keys were refused above)
                    raise PipelineError(
                        f"key {key!r} is the default key of node {other.index}"
                        f" ({other.job_type}); give that node a key, or choose another"
                    )
            self._user_keys.add(key)
        node = Node(self, index, key, spec["job_type"])
        self._nodes.append(node)
        self._specs.append(spec)
        self._after.append(upstream)
        return node

    def add_edge(self, upstream: Upstream, downstream: Upstream) -> None:
        """Make ``downstream`` wait for ``upstream`` (both nodes of this pipeline, or keys,
        also of nodes added later)."""
        self._check_upstream(upstream)
        self._check_upstream(downstream)
        self._edges.append((upstream, downstream))

    def specs(self, pipeline_id: uuid.UUID | str | None = None) -> list[dict[str, Any]]:
        """The JSON specs :meth:`enqueue` sends, checked: every node with its key and ``after``."""
        if not self._nodes:
            raise PipelineError("the pipeline has no jobs")
        waits_for = [list(items) for items in self._after]
        for source, target in self._edges:
            self._resolve(source, "add_edge", "upstream")
            waits_for[self._resolve(target, "add_edge", "downstream").index].append(source)
        edges: list[list[int]] = []
        for node, items in zip(self._nodes, waits_for, strict=True):
            deps: list[int] = []
            for item in items:
                dep = self._resolve(item, f"node {node.key!r} ({node.job_type})")
                if dep.index not in deps:
                    deps.append(dep.index)
            edges.append(deps)
        note = ""
        cycle = _find_cycle(edges)
        if not cycle:  # one only merging by dedup_key makes
            cycle = _find_cycle(_merged_edges(edges, [s.get("dedup_key") for s in self._specs]))
            note = " (nodes with the same dedup_key are one job, the first of them)"
        if cycle:
            path = " -> ".join(repr(self._nodes[i].key) for i in cycle)
            raise PipelineError(f"the pipeline has a cycle: {path}{note}")
        out: list[dict[str, Any]] = []
        for node, spec, deps in zip(self._nodes, self._specs, edges, strict=True):
            full = {**spec, "key": node.key}
            if deps:
                full["after"] = [self._nodes[i].key for i in deps]
            if pipeline_id is not None:
                full["pipeline_id"] = str(pipeline_id)
            out.append(full)
        return out

    async def enqueue(
        self,
        target: ConnOrPool | AsyncSession | AsyncConnection,
        *,
        pipeline_id: uuid.UUID | str | None = None,
    ) -> EnqueuedPipeline:
        """Create every job in one ``pgqueue.enqueue_many`` call; return the ids and pipeline id.

        ``target`` is an asyncpg connection or pool, or a SQLAlchemy ``AsyncSession`` /
        ``AsyncConnection`` (the jobs then exist when the caller's transaction commits).
        ``pipeline_id`` defaults to a new uuid4.
        """
        pid = _pipeline_uuid(pipeline_id)
        payload = dumps(self.specs(pid), "the pipeline's specs")
        if _is_sqlalchemy(target):
            from sqlalchemy import text

            result = await target.execute(text(_ENQUEUE_MANY_SQLA), {"specs": payload})
            ids = [int(i) for i in result.scalars().all()]
        else:  # asyncpg: a connection, a pool, or a connection acquired from a pool
            if not hasattr(target, "fetch"):  # failed deep inside: "no attribute 'fetch'"
                raise TypeError(
                    "Pipeline.enqueue takes an asyncpg connection or pool, or a SQLAlchemy"
                    f" AsyncSession or AsyncConnection, got {type(target).__name__}"
                    " (a synchronous Session or Connection: use Pipeline.enqueue_sync)"
                )
            rows = await cast("ConnOrPool", target).fetch(_ENQUEUE_MANY_ASYNCPG, payload)
            ids = [int(row["id"]) for row in rows]
        return self._enqueued(pid, ids)

    def enqueue_sync(
        self, target: Session | Connection, *, pipeline_id: uuid.UUID | str | None = None
    ) -> EnqueuedPipeline:
        """:meth:`enqueue` on a synchronous SQLAlchemy ``Session`` or ``Connection``."""
        from sqlalchemy import Engine, text

        if _is_sqlalchemy(target) or hasattr(target, "fetch") or isinstance(target, Engine):
            # An async session failed with "'coroutine' object has no attribute 'scalars'".
            raise TypeError(
                "Pipeline.enqueue_sync takes a SQLAlchemy Session or Connection of your"
                f" transaction, got {type(target).__name__}"
                + ("" if isinstance(target, Engine) else " (use await Pipeline.enqueue)")
            )

        pid = _pipeline_uuid(pipeline_id)
        result = target.execute(
            text(_ENQUEUE_MANY_SQLA), {"specs": dumps(self.specs(pid), "the pipeline's specs")}
        )
        return self._enqueued(pid, [int(i) for i in result.scalars().all()])

    def _enqueued(self, pipeline_id: uuid.UUID, ids: list[int]) -> EnqueuedPipeline:
        return EnqueuedPipeline(pipeline_id, tuple(ids), tuple(n.key for n in self._nodes))

    def _check_upstream(self, item: object) -> None:
        if isinstance(item, Node):
            if item.pipeline is not self:
                raise PipelineError(
                    f"node {item.key!r} ({item.job_type}) belongs to another pipeline"
                )
        elif not isinstance(item, str) or not item:
            raise PipelineError(f"after takes nodes or keys, got {item!r}")

    def _resolve(self, item: Upstream, where: str, role: str = "after") -> Node:
        if isinstance(item, Node):
            return item
        for node in self._nodes:
            if node.key == item:
                return node
        raise PipelineError(f"{where}: {role} names unknown key {item!r}")


def _as_list(after: Upstream | Iterable[Upstream]) -> list[Upstream]:
    if isinstance(after, Node | str):
        return [after]
    if not isinstance(after, Iterable):
        raise PipelineError(
            f"after must be a node, a key or a list of them, got {type(after).__name__}"
        )
    return list(after)


def _pipeline_uuid(value: uuid.UUID | str | None, *, new: bool = True) -> uuid.UUID:
    """``value`` as a UUID; None makes a new one where a pipeline is being created (``new``),
    and is refused where one is named (status, cancel): a new id there names nothing, and
    cancelling it would mark an id nobody asked for."""
    if value is None:
        if new:
            return uuid.uuid4()
        raise PipelineError("pipeline_id is required, got None")
    try:
        return uuid.UUID(pipeline_id_text(value))
    except ValueError as exc:
        raise PipelineError(str(exc)) from None


def _merged_edges(edges: list[list[int]], dedup_keys: Sequence[Any]) -> list[list[int]]:
    """The edges as the SQL checks them: each node's own, and those of the graph it writes
    when nodes with the same dedup_key are one job, the first of them (the others merge into
    it and add no edges; an edge to one of them waits for the first). A cycle in either is
    refused: merging does not always happen (a node whose dependency ended gives its key up)."""
    first: dict[Any, int] = {}
    job = [i if key is None else first.setdefault(key, i) for i, key in enumerate(dedup_keys)]
    merged: list[list[int]] = []
    for i, deps in enumerate(edges):
        written = [job[d] for d in deps] if job[i] == i else []
        merged.append(list(dict.fromkeys([*deps, *written])))
    return merged


def _find_cycle(edges: list[list[int]]) -> list[int]:
    """A cycle as a list of node indexes (first repeated at the end), or [] if there is none."""
    state = [0] * len(edges)  # 0 new, 1 on the current path, 2 done
    for start in range(len(edges)):
        if state[start]:
            continue
        path: list[int] = []
        stack: list[tuple[int, Iterator[int]]] = [(start, iter(edges[start]))]
        state[start] = 1
        path.append(start)
        while stack:
            node, deps = stack[-1]
            for dep in deps:
                if state[dep] == 1:
                    # edges point upstream; report the cycle in run order
                    cycle = [*path[path.index(dep) :], dep]
                    return cycle[::-1]
                if state[dep] == 0:
                    state[dep] = 1
                    path.append(dep)
                    stack.append((dep, iter(edges[dep])))
                    break
            else:
                state[node] = 2
                path.pop()
                stack.pop()
    return []


# --------------------------------------------------------------------------- status


PipelineState = Literal["running", "succeeded", "failed", "cancelled"]


@dataclass(frozen=True, slots=True)
class PipelineStatus:
    """One row of the ``pgqueue.pipelines`` view.

    ``state`` is ``running`` until ``done`` (no job left to run), then ``failed`` if any job
    failed, ``cancelled`` if any was cancelled, else ``succeeded``.
    """

    pipeline_id: uuid.UUID
    jobs: int
    waiting: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    done: bool
    state: PipelineState

    @property
    def counts(self) -> dict[str, int]:
        """Jobs per state, every state listed."""
        return {
            "waiting": self.waiting,
            "queued": self.queued,
            "running": self.running,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
        }

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> PipelineStatus:
        return cls(
            pipeline_id=uuid.UUID(str(row["pipeline_id"])),
            jobs=int(row["jobs"]),
            waiting=int(row["waiting"]),
            queued=int(row["queued"]),
            running=int(row["running"]),
            succeeded=int(row["succeeded"]),
            failed=int(row["failed"]),
            cancelled=int(row["cancelled"]),
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            done=bool(row["done"]),
            state=row["state"],
        )


async def pipeline_status(
    conn_or_pool: ConnOrPool, pipeline_id: uuid.UUID | str
) -> PipelineStatus | None:
    """The pipeline's row of ``pgqueue.pipelines``, or None if no job carries that id."""
    asyncpg_target("pipeline_status", conn_or_pool)
    row = await conn_or_pool.fetchrow(_STATUS_SQL, str(_pipeline_uuid(pipeline_id, new=False)))
    return None if row is None else PipelineStatus.from_record(row)


async def cancel_pipeline(
    conn_or_pool: ConnOrPool, pipeline_id: uuid.UUID | str, *, abort_running: bool = False
) -> int:
    """``pgqueue.cancel_pipeline``: cancel what has not started; return how many were cancelled.

    Running members finish, but what they would create is created cancelled. With
    ``abort_running`` (``pgqueue.abort_pipeline``) their workers are asked to stop them too,
    and the count includes them. ``pgqueue.retry`` of a member resumes the pipeline downstream
    of it.
    """
    asyncpg_target("cancel_pipeline", conn_or_pool)
    sql = _ABORT_SQL if abort_running else _CANCEL_SQL
    count: int = await conn_or_pool.fetchval(sql, str(_pipeline_uuid(pipeline_id, new=False)))
    return count
