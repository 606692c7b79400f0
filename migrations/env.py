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


async def _run_online() -> None:
    dsn = _dsn()

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(dsn)

    engine = create_async_engine("postgresql+asyncpg://", poolclass=NullPool, async_creator=connect)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_migrate)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("pgqueue migrations run online only (they execute frozen SQL files)")
asyncio.run(_run_online())
