"""Shared fixtures: a PostgreSQL server, a migrated template database, a clone per test.

Server choice, first that works (``PGQUEUE_TEST_SERVER=dsn|docker|embedded|local``
forces one):

1. ``PGQUEUE_TEST_DSN``: any server; the tests create and drop their own databases.
2. testcontainers ``postgres:15`` when a Docker daemon answers.
3. an embedded PostgreSQL 16 from the ``pgserver`` wheel, data in a temp dir.
4. local PostgreSQL binaries: initdb into a temp dir, start on a free port.

Fixtures: ``pg_base_dsn`` (session: a maintenance DSN on the server),
``db_dsn`` (a fresh database cloned from a template migrated once per session),
``conn`` (asyncpg connection to ``db_dsn``), ``connect`` (``await connect()``
opens more), ``empty_db_dsn`` (a fresh database with nothing in it), ``engine`` (a
SQLAlchemy ``AsyncEngine`` on ``db_dsn``, asyncpg, no pool).
Coroutine tests run on anyio's asyncio backend without a decorator.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import glob
import inspect
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from pgqueue import migrate

T = TypeVar("T")

Connect = Callable[[], Awaitable[asyncpg.Connection]]


# --------------------------------------------------------------------------- anyio


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.add_marker(pytest.mark.anyio)
            # Request the backend fixture too, or anyio's plugin would run the
            # test once per installed backend (trio included).
            if "anyio_backend" not in item.fixturenames:
                item.fixturenames.append("anyio_backend")


# --------------------------------------------------------------------------- helpers


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private loop in a helper thread.

    Sync fixtures use this so they never touch the event loop that anyio runs
    the tests on.
    """
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(factory()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="pgqueue-test-admin")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def dsn_with_database(dsn: str, database: str) -> str:
    """``dsn`` with its database name replaced (keeps host, port, query such as ``host=``)."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def _admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def create_database(base_dsn: str, prefix: str, template: str | None = None) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    run_async(lambda: _admin(base_dsn, f'CREATE DATABASE "{name}"{clause}'))
    return name


def drop_database(base_dsn: str, name: str) -> None:
    run_async(lambda: _admin(base_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --------------------------------------------------------------------------- servers


def _docker_answers() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import docker

            client = docker.from_env(timeout=2)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            # A failed ping can leave the client's unix socket to collect; its
            # ResourceWarning would otherwise surface (as an error) in whatever test
            # the garbage collector happens to run in.
            gc.collect()


@contextlib.contextmanager
def _docker_server() -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:15", driver=None)
        container.start()
    try:
        yield container.get_connection_url()
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            container.stop()


@contextlib.contextmanager
def _embedded_server() -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

    with tempfile.TemporaryDirectory(prefix="pgqueue-pgserver-") as tmp:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless here.
            warnings.simplefilter("ignore")
            server = get_server(Path(tmp) / "pgdata", cleanup_mode="stop")
            uri = server.get_uri("postgres")
        try:
            yield uri
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                server.cleanup()


def _local_bindir() -> Path | None:
    candidates: list[str] = []
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _local_server(bindir: Path) -> Iterator[str]:
    # PostgreSQL refuses to run as root: run it as the postgres user then.
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
    tmp = tempfile.mkdtemp(prefix="pgqueue-localpg-")
    if as_user:
        shutil.chown(tmp, "postgres")
    data, port = Path(tmp) / "data", _free_port()
    user = "postgres"
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", user, "-A", "trust", "-N"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-w",
            "-l",
            str(Path(tmp) / "log"),
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://{user}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _pick_server() -> Iterator[str]:
    forced = os.environ.get("PGQUEUE_TEST_SERVER", "")
    dsn = os.environ.get("PGQUEUE_TEST_DSN")
    if forced in ("", "dsn") and dsn:
        yield dsn
        return
    if forced == "dsn":
        raise pytest.UsageError("PGQUEUE_TEST_SERVER=dsn needs PGQUEUE_TEST_DSN")
    if forced == "docker" or (not forced and _docker_answers()):
        with _docker_server() as url:
            yield url
        return
    if forced in ("", "embedded"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pgserver  # noqa: F401
        except ImportError:
            if forced:
                raise
        else:
            with _embedded_server() as url:
                yield url
            return
    bindir = _local_bindir()
    if bindir is None:
        raise pytest.UsageError(
            "no PostgreSQL for the tests: set PGQUEUE_TEST_DSN, start Docker, "
            "install pgserver, or install PostgreSQL binaries"
        )
    with _local_server(bindir) as url:
        yield url


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def pg_base_dsn() -> Iterator[str]:
    """DSN of a maintenance database on the test server (databases are created from it)."""
    with _pick_server() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def template_database(pg_base_dsn: str) -> Iterator[str]:
    """Name of a database migrated to head once per session; tests get clones of it."""
    name = create_database(pg_base_dsn, f"pgqueue_tpl_{os.getpid()}")
    try:
        migrate.upgrade(dsn_with_database(pg_base_dsn, name))
        yield name
    finally:
        drop_database(pg_base_dsn, name)


@pytest.fixture
def db_dsn(pg_base_dsn: str, template_database: str) -> Iterator[str]:
    """DSN of a fresh database cloned from the migrated template, dropped after the test."""
    name = create_database(pg_base_dsn, "pgqueue_test", template=template_database)
    try:
        yield dsn_with_database(pg_base_dsn, name)
    finally:
        drop_database(pg_base_dsn, name)


@pytest.fixture
def empty_db_dsn(pg_base_dsn: str) -> Iterator[str]:
    """DSN of a fresh, empty database (no pgqueue schema), dropped after the test."""
    name = create_database(pg_base_dsn, "pgqueue_empty")
    try:
        yield dsn_with_database(pg_base_dsn, name)
    finally:
        drop_database(pg_base_dsn, name)


@pytest.fixture
async def connect(db_dsn: str, anyio_backend: str) -> AsyncIterator[Connect]:
    """``await connect()`` opens another asyncpg connection to ``db_dsn``; all closed after."""
    opened: list[asyncpg.Connection] = []

    async def _connect() -> asyncpg.Connection:
        connection = await asyncpg.connect(db_dsn)
        opened.append(connection)
        return connection

    try:
        yield _connect
    finally:
        for connection in opened:
            if not connection.is_closed():
                await connection.close(timeout=5)


@pytest.fixture
async def conn(connect: Connect) -> asyncpg.Connection:
    """An asyncpg connection to ``db_dsn``."""
    return await connect()


@pytest.fixture
async def engine(db_dsn: str, anyio_backend: str) -> AsyncIterator[AsyncEngine]:
    """A SQLAlchemy ``AsyncEngine`` on ``db_dsn`` (asyncpg, a new connection each time)."""

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(db_dsn)

    engine = create_async_engine("postgresql+asyncpg://", poolclass=NullPool, async_creator=connect)
    try:
        yield engine
    finally:
        await engine.dispose()
