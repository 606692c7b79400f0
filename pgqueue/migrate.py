"""Schema migrations: Alembic, driven from code, with its own version table.

``upgrade(dsn)`` runs ``alembic upgrade head`` against the scripts shipped in
the package (see :mod:`pgqueue.resources`). The version table is
``pgqueue.alembic_version``, so pgqueue's history never collides with an
application's own Alembic history in ``public``. No ``alembic.ini`` is needed.

Revisions are frozen: each applies its own committed ``.up.sql`` / ``.down.sql``
through :func:`apply_sql_file`. Revision ids are zero-padded sequence numbers
(``0001``, ``0002``, ...), which lets :func:`check_schema` tell "older" from
"newer" without loading the scripts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pgqueue.dsn import asyncpg_target
from pgqueue.resources import migrations_dir

if TYPE_CHECKING:
    import asyncpg
    from alembic.config import Config

__all__ = [
    "HEAD_REVISION",
    "SchemaError",
    "alembic_config",
    "apply_sql_file",
    "check_read_committed",
    "check_schema",
    "check_writable",
    "downgrade",
    "missing_rights",
    "upgrade",
]

#: The newest revision shipped with this version of pgqueue (a test keeps it in step).
HEAD_REVISION = "0001"

# Alembic keeps its running context in module globals: one migration per process at a time.
_ALEMBIC_LOCK = threading.Lock()

#: Key of the transaction-level advisory lock that serialises concurrent migrations.
MIGRATION_LOCK_KEY = 0x7067_7175_6575_65  # "pgqueue"


class SchemaError(RuntimeError):
    """The database is not ready for this pgqueue: its schema is missing or not at the
    revision this code expects, or its sessions do not run READ COMMITTED."""


def alembic_config(dsn: str | None) -> Config:
    """An Alembic config for pgqueue's scripts; ``dsn`` None means libpq ``PG*`` variables."""
    from alembic.config import Config  # imported here: workers check the schema without alembic

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["pgqueue_dsn"] = dsn
    return config


def upgrade(dsn: str | None, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (default: head). Idempotent and safe to race."""
    from alembic import command
    from alembic.util import CommandError

    try:
        _run_outside_event_loop(lambda: command.upgrade(alembic_config(dsn), revision))
    except CommandError as exc:  # e.g. the database is at a revision this package lacks
        raise SchemaError(
            f"cannot migrate: {exc} (a schema made by a newer pgqueue needs that package)"
        ) from None


def downgrade(dsn: str | None, revision: str) -> None:
    """Downgrade the database to ``revision`` (``"base"`` removes every pgqueue object)."""
    from alembic import command

    _run_outside_event_loop(lambda: command.downgrade(alembic_config(dsn), revision))


def _run_outside_event_loop(fn: Callable[[], None]) -> None:
    """Run ``fn`` here, or in a helper thread when this thread already runs an event loop.

    The Alembic environment drives asyncpg with ``asyncio.run``, which refuses to
    start inside a running loop (an async CLI command, a test, an application).
    """
    import asyncio

    def locked() -> None:
        with _ALEMBIC_LOCK:
            fn()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        locked()
        return
    errors: list[BaseException] = []

    def target() -> None:
        try:
            locked()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="pgqueue-migrate")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def apply_sql_file(path: Path) -> None:
    """Execute a whole SQL file inside the running migration's transaction.

    Called from revision scripts. The file may hold many statements and
    dollar-quoted PL/pgSQL, so it goes through asyncpg's simple-query protocol
    (``Connection.execute`` without arguments) on the raw driver connection;
    SQLAlchemy's asyncpg adapter would prepare it, which allows one statement only.
    """
    from alembic import op
    from sqlalchemy.engine.interfaces import AdaptedConnection

    sql = path.read_text(encoding="utf-8")
    if not sql.strip():
        return
    bind = op.get_bind()
    # Make sure the adapter has opened its transaction, so the file runs inside it
    # together with Alembic's version-table update.
    bind.exec_driver_sql("SELECT 1")
    driver = bind.connection.dbapi_connection
    if not isinstance(driver, AdaptedConnection):
        raise TypeError(f"pgqueue migrations need the asyncpg driver, got {type(driver)!r}")

    async def run(raw: asyncpg.Connection) -> None:
        await raw.execute(sql)

    driver.run_async(run)


def _revision_number(revision: str) -> int | None:
    return int(revision) if revision.isdigit() else None


async def check_read_committed(conn: asyncpg.Connection) -> None:
    """Raise :class:`SchemaError` unless ``conn``'s transactions run READ COMMITTED.

    A role or database whose ``default_transaction_isolation`` is higher makes a worker's
    lost claim races raise 40001 and every transition of a scoped job refuse to run: such a
    worker would fail jobs, so it does not start. (Not set on pgqueue's connections instead:
    PgBouncer refuses startup parameters it does not track.)
    """
    level = await conn.fetchval("SELECT current_setting('transaction_isolation')")
    if level not in ("read committed", "read uncommitted"):
        raise SchemaError(
            f"transactions on this connection run {level.upper()} (default_transaction_isolation"
            " of the role or database): pgqueue needs READ COMMITTED; run ALTER ROLE ... (or"
            " ALTER DATABASE ...) SET default_transaction_isolation = 'read committed'"
        )


async def check_writable(conn: asyncpg.Connection) -> None:
    """Raise :class:`SchemaError` if ``conn``'s transactions are read-only: a standby, or a
    role or database with ``default_transaction_read_only`` on. A worker started there
    claimed nothing and logged the refusal of every claim, for ever."""
    read_only, standby = await conn.fetchrow(
        "SELECT current_setting('transaction_read_only') = 'on', pg_is_in_recovery()"
    )
    if standby:
        raise SchemaError(
            "this server is a standby (read-only): a worker writes every claim and outcome;"
            " connect to the primary"
        )
    if read_only:
        raise SchemaError(
            "transactions on this connection are read-only (default_transaction_read_only of"
            " the role or database): a worker writes every claim and outcome; run ALTER ROLE"
            " ... (or ALTER DATABASE ...) SET default_transaction_read_only = off"
        )


# The rights docs/roles.md grants a worker's role that this role lacks, grouped by object.
# Not the version table: only migrations write it, and check_schema has read it already.
_MISSING_RIGHTS = """
SELECT object, string_agg(privilege, ', ' ORDER BY privilege)
FROM (
    SELECT 'table ' || c.oid::regclass AS object, r.privilege,
           has_table_privilege(c.oid, r.privilege) AS held
    FROM pg_catalog.pg_class c
    CROSS JOIN unnest(CASE WHEN c.relkind = 'v' THEN ARRAY['SELECT']
                           ELSE ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'] END)
        AS r (privilege)
    WHERE c.relnamespace = 'pgqueue'::regnamespace AND c.relkind IN ('r', 'p', 'v')
      AND c.relname <> 'alembic_version'
    UNION ALL
    SELECT 'sequence ' || c.oid::regclass, 'USAGE', has_sequence_privilege(c.oid, 'USAGE')
    FROM pg_catalog.pg_class c
    WHERE c.relnamespace = 'pgqueue'::regnamespace AND c.relkind = 'S'
    UNION ALL
    SELECT 'function ' || p.oid::regprocedure, 'EXECUTE', has_function_privilege(p.oid, 'EXECUTE')
    FROM pg_catalog.pg_proc p
    WHERE p.pronamespace = 'pgqueue'::regnamespace
    OFFSET 0  -- no pushing "NOT held" below the relkind tests: has_*_privilege raise on others
) AS rights
WHERE NOT held
GROUP BY object
ORDER BY object
"""


async def missing_rights(conn: asyncpg.Connection) -> list[str]:
    """The rights that docs/roles.md grants a worker's role and ``conn``'s role lacks, as
    ``"table pgqueue.jobs (DELETE)"``. A worker without them starts, and each statement that
    needs one is refused (and retried until it is granted) only when it first runs: a
    missing DELETE shows up at the first retention run, minutes after start-up. Named at
    start-up, the fix is made before then. (A warning, not a refusal: a DBA may leave out a
    right on purpose where the feature that needs it is not used.)"""
    rows = await conn.fetch(_MISSING_RIGHTS)
    return [f"{row[0]} ({row[1]})" for row in rows]


async def check_schema(conn: asyncpg.Connection) -> None:
    """Raise :class:`SchemaError` unless the database is migrated to :data:`HEAD_REVISION`."""
    asyncpg_target("check_schema", conn)
    has_table = await conn.fetchval("SELECT to_regclass('pgqueue.alembic_version') IS NOT NULL")
    version = None
    if has_table:
        version = await conn.fetchval("SELECT version_num FROM pgqueue.alembic_version LIMIT 1")
    if version is None:
        raise SchemaError("the pgqueue schema is missing from this database: run `pgqueue migrate`")
    if version == HEAD_REVISION:
        return
    current, head = _revision_number(version), _revision_number(HEAD_REVISION)
    if current is None or head is None:
        raise SchemaError(
            f"the pgqueue schema is at revision {version!r}, which this pgqueue does not know"
            f" (expects {HEAD_REVISION}): it was made by another pgqueue, or by hand"
        )
    if current > head:
        raise SchemaError(
            f"the pgqueue schema is at revision {version}, newer than this pgqueue "
            f"(expects {HEAD_REVISION}): upgrade the pgqueue package"
        )
    raise SchemaError(
        f"the pgqueue schema is at revision {version}, older than this pgqueue "
        f"(expects {HEAD_REVISION}): run `pgqueue migrate`"
    )
