"""The Worker: wires the notifier, producer, executor, completer, heartbeat and recovery.

Life of a worker: open a pool and check the schema (refuse to start on an old one), read
``stale_after``, start the background services, run the producer until stopped, let running
handlers finish within ``grace``, cancel and release the rest (plain def handlers, which
cannot be cancelled, are waited for), then stop the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import secrets
import signal
import socket
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import anyio
import asyncpg

from pgqueue.app import App, LifespanError
from pgqueue.dsn import check_dsn, create_pool
from pgqueue.worker import bounded
from pgqueue.worker.aborts import abort_loop
from pgqueue.worker.completer import Completer
from pgqueue.worker.executor import IGNORED_TIMEOUT_WARNING, Executor
from pgqueue.worker.heartbeat import Period, heartbeat_loop, read_stale_after
from pgqueue.worker.leader import every_period, leader_outage, recovery_round, retention_round
from pgqueue.worker.notifier import Notifier
from pgqueue.worker.producer import Producer
from pgqueue.worker.scheduler import run_schedules
from pgqueue.worker.wake import Wake

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A worker starts this many runner tasks at once; more is a typo, not a plan.
MAX_CONCURRENCY = 10_000
# After the grace period, outcome writes get this long to land before the process exits.
FINAL_WRITE_WINDOW = 10.0
# Bound on the app's lifespans' teardown at the stop (see Worker._leave_lifespans).
LIFESPAN_TEARDOWN = 10.0
# Bound on the schema check and settings read at start: a connection that goes half-open
# then would otherwise hold the worker, before it claims anything, until the kernel gives
# up on the socket. Past it the worker stops with "no answer from the database".
STARTUP_TIMEOUT = 30.0


def make_worker_id() -> str:
    """Unique and readable: which host and process, plus a suffix for pid reuse."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    """Runs an :class:`~pgqueue.App`'s handlers for jobs claimed from PostgreSQL.

    ``listen_dsn`` (default: ``dsn``) is where the one LISTEN connection goes. Give it when
    ``dsn`` goes through a pooler in transaction mode (PgBouncer), where LISTEN does not
    work: the notifications then come straight from PostgreSQL while claims and outcomes
    take the pooled connections.

    ``until_empty``: stop (as :meth:`stop` does) once a claim made while the worker held no
    job finds none due in its queues, i.e. after the work that is due now, and what that
    work makes due, is done. Jobs scheduled later, or held up by another worker's jobs (a
    scope, a fan-in), are left for the next run. Such a worker runs one round of stale
    recovery and of retention before its first claim, and no schedules of periodic jobs.
    """

    def __init__(
        self,
        app: App,
        dsn: str | None = None,
        *,
        queues: Iterable[str] | None = None,
        concurrency: int = 10,
        grace: float = 30.0,
        poll_interval: float = 5.0,
        handle_signals: bool = True,
        restore_signals: bool = True,
        logger: logging.Logger | None = None,
        listen_dsn: str | None = None,
        until_empty: bool = False,
    ) -> None:
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be from 1 to {MAX_CONCURRENCY}, got {concurrency}")
        if not (math.isfinite(grace) and grace >= 0):
            raise ValueError(f"grace must be a number of seconds >= 0, got {grace}")
        if not (math.isfinite(poll_interval) and poll_interval > 0):
            raise ValueError(
                f"poll_interval must be a positive number of seconds, got {poll_interval}"
            )
        self.queues = None if queues is None else sorted(set(queues))
        if self.queues == []:
            raise ValueError("queues must name at least one queue (None means every queue)")
        if listen_dsn is not None:
            if not listen_dsn.strip():
                raise ValueError("listen_dsn is empty (None means: the same as dsn)")
            check_dsn(listen_dsn)  # else the notifier would retry it for good, logging errors
        self.app = app
        self.dsn = dsn
        self.listen_dsn = dsn if listen_dsn is None else listen_dsn
        self.until_empty = until_empty
        self.concurrency = concurrency
        self.grace = grace
        self.poll_interval = poll_interval
        self.handle_signals = handle_signals
        self.restore_signals = restore_signals
        self.logger = logger or logging.getLogger("pgqueue.worker")
        self.id = make_worker_id()
        self.notifier: Notifier | None = None  # exposed for tests: notifier.listening
        self.started = anyio.Event()
        self._wake = Wake()
        self._producer: Producer | None = None
        self._stop_requested = False
        self._force = False  # stop(force=True) before the grace period began: skip it
        self._grace_scope: anyio.CancelScope | None = None
        # A start-up wait that stop() ends: see _hold_recovery_at_start, _enter_lifespans.
        self._startup_wait: anyio.CancelScope | None = None
        self._executor: Executor | None = None
        self._aborts_heard = Wake()  # pgqueue.abort() was called: read the requests

    def stop(self, *, force: bool = False) -> None:
        """Stop claiming and shut down; ``force`` skips what is left of the grace period.

        Must be called from the worker's event loop (signal handlers already are).
        """
        self._stop_requested = True
        self._force = self._force or force
        if self._producer is not None:
            self._producer.stop()
        if force and self._grace_scope is not None:
            self._grace_scope.cancel()
        if self._startup_wait is not None:
            self._startup_wait.cancel()

    async def run(self) -> None:
        """Work until :meth:`stop` or SIGTERM/SIGINT; return once every job is settled.

        With ``handle_signals``, SIGTERM and SIGINT are ignored from the moment the worker
        stops listening for them until it returns; then the handlers it found are put back,
        or, with ``restore_signals=False`` (``pgqueue worker``, which exits next), they stay
        ignored: a signal in the process's last steps would abort them, or kill the
        interpreter while it finalises.
        """
        if self.handle_signals and self.restore_signals:
            found = {s: signal.getsignal(s) for s in _STOP_SIGNALS}
            try:
                await self._run()
            finally:
                for signum, handler in found.items():
                    signal.signal(signum, _usable_handler(signum, handler))
        else:
            await self._run()

    async def _run(self) -> None:
        pool = await create_pool(
            self.dsn,
            warm=2,  # claim, outcome: ready before the first job
            max_size=min(self.concurrency, 10) + 2,
            application_name=f"pgqueue-worker {self.id}",
        )
        try:
            # The heartbeat's own connection: outcome writes waiting on locked rows (up to
            # the write timeout each) can take every pooled one, and a heartbeat waiting
            # behind them would let this worker's healthy jobs go stale.
            beat_pool = await create_pool(
                self.dsn, warm=1, max_size=1, application_name=f"pgqueue-heartbeat {self.id}"
            )
            try:
                await self._work(pool, beat_pool)
            except* LifespanError as failed:  # raised in the services' task group: unwrapped
                error = failed.exceptions[0]
                raise error from error.__cause__  # the lifespan's own error
            finally:
                await _close(beat_pool)
        finally:
            await _close(pool)

    async def _work(self, pool: asyncpg.Pool, beat_pool: asyncpg.Pool) -> None:
        from pgqueue.migrate import (  # refuse to start
            SchemaError,
            check_read_committed,
            check_schema,
            check_writable,
            missing_rights,
        )

        async def startup_reads(conn: asyncpg.Connection) -> tuple[timedelta, list[str]]:
            # In a transaction block, as recovery and retention run: a pooler in statement
            # mode refuses one (and ends the connection), so a worker behind it recovered
            # nothing and pruned nothing, ever, after one line logged as an outage.
            try:
                async with conn.transaction():
                    await check_schema(conn)
                    await check_read_committed(conn)
                    await check_writable(conn)
                    return await read_stale_after(conn), await missing_rights(conn)
            except asyncpg.ConnectionDoesNotExistError as exc:
                if "statement pooling" not in str(exc):  # PgBouncer's words
                    raise
                raise SchemaError(
                    "this connection goes through a pooler in statement mode, which refuses"
                    " transaction blocks: pgqueue needs them (stale recovery, retention, an"
                    " enqueue in your transaction); use pool_mode = transaction or session"
                ) from None

        stale_after, missing = await bounded.call(pool, STARTUP_TIMEOUT, startup_reads)
        if missing:
            self.logger.warning(
                "worker %s: this database role lacks rights that docs/roles.md grants a"
                " worker's role: %s; each statement that needs one will be refused, and"
                " retried until it is granted",
                self.id,
                "; ".join(missing),
                extra={"worker": self.id},
            )
        period = Period.of(stale_after)
        completer = Completer(pool, self.id, self.logger)
        executor = Executor(
            self.app, completer, self.concurrency, self.logger, self._wake, self._aborts_heard
        )
        self._executor = executor
        self.notifier = Notifier(
            self.listen_dsn,
            self._wake,
            queues=self.queues,
            application_name=f"pgqueue-notifier {self.id}",
            logger=self.logger,
            aborts=self._aborts_heard,
            pool=pool,
        )
        self._producer = producer = Producer(
            pool,
            executor,
            self._wake,
            worker_id=self.id,
            queues=self.queues,
            poll_interval=self.poll_interval,
            logger=self.logger,
            until_empty=self.until_empty,
            period=period,
        )
        if self._stop_requested:
            producer.stop()
        unknown = sorted(set(self.queues or ()) - set(self.app.queues()))
        if unknown:
            # A typo in --queues would otherwise idle silently: nothing ever arrives there.
            self.logger.warning(
                "queue(s) %s: no handler or schedule of this app is registered to them; only"
                " jobs enqueued there with an explicit queue will be claimed",
                ", ".join(unknown),
                extra={"worker": self.id},
            )
        self.logger.info(
            "worker %s starting: queues=%s concurrency=%d heartbeat every %.2fs",
            self.id,
            ",".join(self.queues) if self.queues else "*",
            self.concurrency,
            period.seconds,
            extra={"worker": self.id},
        )
        async with anyio.create_task_group() as services:
            services.start_soon(self.notifier.run)
            services.start_soon(
                functools.partial(
                    heartbeat_loop,
                    beat_pool,
                    self.id,
                    period,
                    self.logger,
                    self._aborts_heard,
                    held=executor.held,
                    unheld=executor.ask_for_sweep,
                )
            )
            recovery = leader_outage(self.logger, "recovery")
            retention = leader_outage(self.logger, "retention")
            services.start_soon(
                functools.partial(
                    every_period,
                    functools.partial(recovery_round, period=period),
                    pool,
                    period,
                    self.logger,
                    recovery,
                    held_off=period.recovery_held_off,
                )
            )
            services.start_soon(every_period, retention_round, pool, period, self.logger, retention)
            services.start_soon(completer.run)
            services.start_soon(
                abort_loop, pool, self.id, self._aborts_heard, executor, self.logger
            )
            if self.handle_signals:
                services.start_soon(self._watch_signals)
            # The app's lifespans (app.lifespan) hold what its handlers use: entered in this
            # event loop before the first claim (a stop meanwhile ends their set-up), left
            # after the last outcome is written, whatever ends the run.
            resources = await self._enter_lifespans()
            try:
                # After the lifespans: a worker whose set-up failed enqueued ticks for nothing.
                schedules = anyio.CancelScope()  # a stopping worker enqueues no more ticks
                if not self.until_empty:  # its schedule is the caller's (cron): no ticks
                    services.start_soon(self._run_schedules, pool, schedules)
                self.started.set()
                if self.until_empty and not self._stop_requested:
                    # Before the first claim: the run may end before the periodic rounds' first,
                    # and jobs whose lease went stale (an earlier run killed mid-job) are due
                    # again. A stop asked for meanwhile (the signal watcher runs) takes effect
                    # when they end: each is a few short transactions.
                    await self._hold_recovery_at_start(pool, period)
                    await recovery_round(pool, self.logger, recovery)
                    await retention_round(pool, self.logger, retention)
                stuck: asyncio.TimerHandle | None = None
                async with anyio.create_task_group() as jobs:
                    executor.start_runners(jobs)
                    await producer.run()
                    schedules.cancel()
                    await self._drain(executor, completer)
                    jobs.cancel_scope.cancel()  # idle runners stop; busy ones release their job
                    stuck = asyncio.get_running_loop().call_later(
                        IGNORED_TIMEOUT_WARNING, self._warn_stuck, executor
                    )
                if stuck is not None:
                    stuck.cancel()
                if completer.give_up_at == math.inf:
                    # Not started by _drain (nothing was left then): the writes still to come
                    # (releases, the last sweep) are bounded all the same.
                    completer.start_final_window(FINAL_WRITE_WINDOW)
                await executor.release_unstarted()
                await executor.settled()  # every success handed to the completer is written
                await producer.release_lost_claims_at_stop()
            finally:
                await self._leave_lifespans(resources)
            services.cancel_scope.cancel()
        self.logger.info("worker %s stopped", self.id, extra={"worker": self.id})

    async def _enter_lifespans(self) -> contextlib.AsyncExitStack:
        """Enter the app's lifespans in order; a stop requested meanwhile ends the set-up
        there (the worker then claims nothing and leaves what it entered). One that raises
        is left with the others entered before it, and named (:class:`LifespanError`)."""
        resources = contextlib.AsyncExitStack()
        try:
            with anyio.CancelScope() as self._startup_wait:  # stop() ends the set-up
                for lifespan in self.app.lifespans:
                    if self._stop_requested:
                        break
                    try:
                        await resources.enter_async_context(lifespan())
                    except Exception as exc:
                        name = getattr(lifespan, "__qualname__", repr(lifespan))
                        raise LifespanError(
                            f"app lifespan {name} failed to set up: {type(exc).__name__}: {exc}"
                        ) from exc
        except BaseException:
            await self._leave_lifespans(resources)
            raise
        finally:
            self._startup_wait = None
        return resources

    async def _leave_lifespans(self, resources: contextlib.AsyncExitStack) -> None:
        """Tear the lifespans down, shielded from a cancellation of the run (an embedding
        app's, a failure) and bounded by :data:`LIFESPAN_TEARDOWN`: each runs the code after
        its ``yield`` as on a normal stop. A teardown that raises is raised, after the rest."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(LIFESPAN_TEARDOWN) as bound:
            await resources.aclose()
        if bound.cancelled_caught:
            self.logger.warning(
                "the app's lifespans did not finish tearing down within %gs: left unfinished",
                LIFESPAN_TEARDOWN,
                extra={"worker": self.id},
            )

    async def _hold_recovery_at_start(self, pool: asyncpg.Pool, period: Period) -> None:
        """Where jobs are stale and the database server started less than a hold ago (see
        :meth:`Period.recovery_held_off`), wait for the rest of it before the until-empty
        run's first recovery: a run started by cron as the database came back from a crash
        recovered the jobs of live workers whose heartbeats had not landed yet (a review).
        Otherwise at once: a run does not wait a minute for a dead run's stale job."""
        hold = period.recovery_hold_left()
        try:
            stale, since_start = await bounded.call(pool, STARTUP_TIMEOUT, _stale_since_start)
        except Exception:
            return  # the round itself reports what fails
        wait = hold - since_start  # the hold counted from the server's start, not ours
        if not stale or wait <= 0:
            return
        self.logger.info(
            "stale jobs, and the database started %.1fs ago: recovery waits %.1fs for live"
            " workers' heartbeats first",
            since_start,
            wait,
        )
        with anyio.CancelScope() as self._startup_wait:  # stop() ends the wait
            if not self._stop_requested:
                await anyio.sleep(wait)
        self._startup_wait = None

    def _warn_stuck(self, executor: Executor) -> None:
        """Handlers still running well after their cancellation (plain defs aside, which
        are waited for knowingly) catch it and carry on: the worker cannot exit before
        they return, and nothing else would say why it does not. (Not the jobs whose
        outcome is still being written: the final window bounds those, each logged when it
        is given up. Counted as stuck handlers, a failure held by a trigger was said to be.)"""
        stuck = executor.in_handlers
        if stuck:
            self.logger.warning(
                "%d handler(s) still running %gs after this worker cancelled them: they catch"
                " the cancellation (CancelledError) and carry on, and the worker exits only"
                " when they return (SIGKILL ends it now; stale recovery then requeues their"
                " jobs). Job(s): %s",
                len(stuck),
                IGNORED_TIMEOUT_WARNING,
                ", ".join(map(str, stuck)),
            )

    async def _run_schedules(self, pool: asyncpg.Pool, scope: anyio.CancelScope) -> None:
        with scope:
            await run_schedules(pool, self.app, self.logger)

    async def _drain(self, executor: Executor, completer: Completer) -> None:
        """Let running jobs finish, and their successes be written, within the grace period;
        the caller then cancels the rest. Whatever is still running or unwritten then gets
        FINAL_WRITE_WINDOW for its writes, so a database that stays down cannot hold the
        process forever.
        """
        if executor.running:
            self.logger.info(
                "stopping: waiting up to %gs for %d running job(s)",
                self.grace,
                len(executor.running),
            )
        with anyio.move_on_after(0 if self._force else self.grace) as self._grace_scope:
            while executor.running:
                await executor.idle.wait()
            await completer.flushed()
        if len(executor.running) > executor.in_threads:
            self.logger.warning(
                # Released unless the handler returns meanwhile (its outcome is then recorded).
                "grace period over: cancelling %d running job(s) and releasing those that do"
                " not return first",
                len(executor.running) - executor.in_threads,
            )
        if executor.in_threads:
            self.logger.warning(
                "waiting for %d plain def handler(s): a thread cannot be interrupted, so"
                " their jobs stay running here (leases kept) and their outcomes are recorded",
                executor.in_threads,
            )
        if executor.running or completer.unwritten:
            # A plain def still running gets a whole window from when it returns
            # (Executor._invoke extends it), the writes under way now this one.
            completer.start_final_window(FINAL_WRITE_WINDOW)

    async def _watch_signals(self) -> None:
        """First SIGTERM/SIGINT: graceful stop. A second one: skip the rest of the grace.

        Once the watcher is gone (the services are being stopped) later signals are ignored
        until :meth:`run` returns: the default SIGINT handler would raise KeyboardInterrupt
        in the middle of closing connections (a double Ctrl-C on an idle worker, which stops
        in milliseconds)."""
        try:
            await self._receive_signals()
        except KeyboardInterrupt:
            # The receiver's exit puts Python's default SIGINT handler back (asyncio's
            # remove_signal_handler), and a SIGINT of a burst can land before the line
            # below: it raised KeyboardInterrupt out of the exit. The worker is stopping.
            pass
        finally:
            _ignore_stop_signals(asyncio.get_running_loop())

    async def _receive_signals(self) -> None:
        with anyio.open_signal_receiver(*_STOP_SIGNALS) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                force = self._stop_requested
                self.logger.info("received %s: %s", name, "forcing stop" if force else "stopping")
                self.stop(force=force)
                threads = self._executor.in_threads if self._executor else 0
                if force and threads:
                    self.logger.warning(
                        "%d plain def handler(s) cannot be interrupted: the worker exits when"
                        " they return (SIGKILL ends it now; stale recovery then requeues their"
                        " jobs)",
                        threads,
                    )


def _ignore_stop_signals(loop: asyncio.AbstractEventLoop) -> None:
    """SIG_IGN for SIGTERM and SIGINT; a SIGINT that lands before it takes effect raises
    KeyboardInterrupt here (see _watch_signals), and the setting is simply made again.

    A KeyboardInterrupt out of the receiver's exit may have left a signal registered with
    the event loop, which would put SIG_DFL back when the loop closes (a SIGTERM then kills
    the exiting process): each is removed from the loop first (a no-op if it is not there).
    """
    for _ in range(100):
        try:
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
                if loop.remove_signal_handler(signum):  # which put the default back
                    signal.signal(signum, signal.SIG_IGN)
            return
        except KeyboardInterrupt:
            continue


async def _close(pool: asyncpg.Pool) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        await pool.close()
    pool.terminate()


def _usable_handler(signum: int, handler: Any) -> Any:
    """What to put back for ``signum``. asyncio's placeholder (the loop had its own handler,
    which anyio's receiver replaced and removed) would leave the signal doing nothing; the
    default is what asyncio leaves in that case too."""
    if handler is None or getattr(handler, "__name__", "") == "_sighandler_noop":
        return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    return handler


async def _stale_since_start(conn: asyncpg.Connection) -> tuple[bool, float]:
    """Whether any job is stale, and how many seconds ago the database server started."""
    row = await conn.fetchrow(
        "SELECT EXISTS (SELECT FROM pgqueue.stale_jobs),"
        " extract(epoch FROM now() - pg_postmaster_start_time())::float8"
    )
    return bool(row[0]), float(row[1])
