"""Alembic environment for pgqueue (asyncpg only, version table in schema pgqueue).

Run through ``pgqueue migrate`` / :func:`pgqueue.migrate.upgrade`, which build
the Alembic config in code and pass the DSN in ``config.attributes``. When run
with the ``alembic`` command instead, the DSN comes from ``-x dsn=...`` or
``sqlalchemy.url``; with none, asyncpg reads the libpq ``PG*`` variables.
"""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import context
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from pgqueue.dsn import check_dsn, server_settings, service_dsn
from pgqueue.migrate import MIGRATION_LOCK_KEY

config = context.config


def _dsn() -> str | None:
    dsn = config.attributes.get("pgqueue_dsn")
    if dsn is None:
        dsn = context.get_x_argument(as_dictionary=True).get("dsn")
    if dsn is None:
        dsn = config.get_main_option("sqlalchemy.url")
    if dsn is not None:
        # asyncpg wants a plain libpq URL, not SQLAlchemy's dialect+driver form.
        dsn = dsn.replace("postgresql+asyncpg://", "postgresql://", 1)
    return str(dsn) if dsn is not None else None


_VERSION_TABLE_UNCOMMENTED = """
SELECT coalesce(bool_and((obj_description(c.oid, 'pg_class') IS NULL
                          OR col_description(c.oid, 1) IS NULL)
                         AND pg_has_role(current_user, c.relowner, 'USAGE')), false)
FROM pg_class c WHERE c.oid = to_regclass('pgqueue.alembic_version')
"""
_VERSION_TABLE_COMMENTS = (
    "COMMENT ON TABLE pgqueue.alembic_version IS"
    " 'Alembic bookkeeping: the schema revision pgqueue migrate last applied.'",
    "COMMENT ON COLUMN pgqueue.alembic_version.version_num IS 'The applied revision, e.g. 0001.'",
)


def _migrate(connection: Connection) -> None:
    # One transaction for everything: concurrent `pgqueue migrate` runs queue on
    # this lock, and the later one finds the version table already at head.
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    if connection.execute(text("SELECT to_regnamespace('pgqueue') IS NULL")).scalar_one():
        connection.execute(text("CREATE SCHEMA IF NOT EXISTS pgqueue"))
    context.configure(
        connection=connection,
        version_table_schema="pgqueue",
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()
        # Alembic creates its version table in schema pgqueue; \dt+ there shows what it is.
        # Only its owner may comment on it, and once is enough (a role that only migrates
        # a schema at head needs no more than it did).
        if connection.execute(text(_VERSION_TABLE_UNCOMMENTED)).scalar_one():
            for statement in _VERSION_TABLE_COMMENTS:
                connection.execute(text(statement))


async def _run_online() -> None:
    dsn = _dsn()

    async def connect() -> asyncpg.Connection:
        check_dsn(dsn)
        # $PGSERVICE as a URL: asyncpg alone would migrate the database named after the OS user.
        target = dsn or service_dsn()
        return await asyncpg.connect(
            target, server_settings=server_settings(target, "pgqueue migrate")
        )

    engine = create_async_engine("postgresql+asyncpg://", poolclass=NullPool, async_creator=connect)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_migrate)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("pgqueue migrations run online only (they execute frozen SQL files)")
asyncio.run(_run_online())
