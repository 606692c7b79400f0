"""Alembic environment for pgqueue (asyncpg only, version table in schema pgqueue).

Run through ``pgqueue migrate`` / :func:`pgqueue.migrate.upgrade`, which build
the Alembic config in code and pass the DSN in ``config.attributes``. When run
with the ``alembic`` command instead, the DSN comes from ``-x dsn=...`` or
``sqlalchemy.url``; with none, asyncpg reads the libpq ``PG*`` variables.
"""

from __future__ import annotations

import asyncio
import re
from urllib.parse import parse_qsl, urlencode

import asyncpg
from alembic import context
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from pgqueue.dsn import SSLMODES, connect_arguments
from pgqueue.migrate import MIGRATION_LOCK_KEY, SchemaError

config = context.config


def _dsn() -> str | None:
    dsn = config.attributes.get("pgqueue_dsn")
    if dsn is None:
        dsn = context.get_x_argument(as_dictionary=True).get("dsn")
    if dsn is None:
        dsn = config.get_main_option("sqlalchemy.url")
    if dsn is not None and re.match(r"postgresql\+\w+://", dsn):
        dsn = _libpq_url(dsn)
    return str(dsn) if dsn is not None else None


# The query parameters asyncpg reads as connection parameters, and the two it passes to the
# server that the server takes at startup, and libpq's connect_timeout, which pgqueue.dsn
# turns into asyncpg's timeout. Any other (a SQLAlchemy dialect's option such as
# prepared_statement_cache_size, or a libpq keyword asyncpg does not know, keepalives)
# asyncpg would send as a setting: "unrecognized configuration parameter".
_KEPT_KEYWORDS = frozenset(
    "host port dbname database user password passfile sslmode sslcert sslkey sslpassword"
    " sslrootcert sslcrl ssl_min_protocol_version ssl_max_protocol_version target_session_attrs"
    " application_name options connect_timeout".split()
)


def _libpq_url(url: str) -> str:
    """A SQLAlchemy URL (the one an application has at hand: postgresql+asyncpg://,
    +psycopg://, +psycopg2://) as the plain libpq URL asyncpg takes: the driver and every
    query parameter asyncpg would not read dropped, and the asyncpg dialect's ``ssl=MODE``
    read as ``sslmode``."""
    base, _, query = re.sub(r"^postgresql\+\w+://", "postgresql://", url).partition("?")
    params = parse_qsl(query, keep_blank_values=True)
    kept = [(key, value) for key, value in params if key in _KEPT_KEYWORDS]
    for key, value in params:
        if key == "ssl" and not any(k == "sslmode" for k, _ in kept):
            if value not in SSLMODES:
                raise SchemaError(
                    f"cannot migrate: ssl={value!r} in the SQLAlchemy URL; give an sslmode"
                    f" ({', '.join(SSLMODES)})"
                )
            kept.append(("sslmode", value))
    return base + ("?" + urlencode(kept) if kept else "")


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
    # Waited for without the role's lock_timeout or statement_timeout (a migration role often
    # has them, for its DDL): the wait is for another migrate, which it must outlast. Both are
    # set again after it, for the migration's own statements.
    timeouts = connection.execute(
        text("SELECT current_setting('lock_timeout'), current_setting('statement_timeout')")
    ).one()
    connection.execute(
        text(
            "SELECT set_config('lock_timeout', '0', true),"
            " set_config('statement_timeout', '0', true)"
        )
    )
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    # pgqueue's SQL names its own objects with their schema and calls built-ins by name: under
    # the migrating role's own path, a function in another schema taking the exact argument
    # type (public.format(text, regprocedure)) would run as that role, and could undo the
    # pinned search paths of sql/10_search_path.sql.
    connection.execute(text("SELECT set_config('search_path', 'pg_catalog, pg_temp', true)"))
    connection.execute(
        text(
            "SELECT set_config('lock_timeout', :l, true), set_config('statement_timeout', :s, true)"
        ),
        {"l": timeouts[0], "s": timeouts[1]},
    )
    if connection.execute(text("SELECT to_regnamespace('pgqueue') IS NULL")).scalar_one():
        connection.execute(text("CREATE SCHEMA IF NOT EXISTS pgqueue"))
    elif not _revision_recorded(connection):
        _refuse_foreign_objects(connection)
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


def _revision_recorded(connection: Connection) -> bool:
    if connection.execute(text("SELECT to_regclass('pgqueue.alembic_version') IS NULL")).scalar():
        return False
    return bool(connection.execute(text("SELECT count(*) FROM pgqueue.alembic_version")).scalar())


# What a schema pgqueue holds before any revision is recorded, but for Alembic's version table.
_FOREIGN_OBJECTS = """
SELECT string_agg(x.what, ', ' ORDER BY x.what) FROM (
    SELECT format('%s %I', CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view'
                                          WHEN 'S' THEN 'sequence' ELSE 'relation' END,
                  c.relname) AS what
    FROM pg_class c
    WHERE c.relnamespace = 'pgqueue'::regnamespace
      AND c.relname NOT IN ('alembic_version', 'alembic_version_pkc')
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
    UNION ALL
    SELECT format('function %I', p.proname) FROM pg_proc p
    WHERE p.pronamespace = 'pgqueue'::regnamespace
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
    UNION ALL
    SELECT format('type %I', t.typname) FROM pg_type t
    WHERE t.typnamespace = 'pgqueue'::regnamespace AND t.typrelid = 0 AND t.typelem = 0
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = t.oid AND d.deptype = 'e')
    UNION ALL  -- an extension's objects are named by it (ALTER EXTENSION ... SET SCHEMA)
    SELECT format('extension %I', e.extname) FROM pg_extension e
    WHERE e.extnamespace = 'pgqueue'::regnamespace
) x
"""


def _refuse_foreign_objects(connection: Connection) -> None:
    """Revision 0001 installs into an empty schema: its downgrade drops everything in the
    schema but the version table, which would take another's objects with it (or it fails
    half-way on one of its own names, "function ... already exists")."""
    found = connection.execute(text(_FOREIGN_OBJECTS)).scalar()
    if found:
        shown = found if len(found) <= 200 else found[:197] + "..."
        raise SchemaError(
            f"cannot install pgqueue: schema pgqueue already holds objects pgqueue did not"
            f" record making ({shown}); move them out of it, or drop the schema if it is a"
            " pgqueue whose alembic_version was lost"
        )


async def _run_online() -> None:
    dsn = _dsn()

    async def connect() -> asyncpg.Connection:
        # $PGSERVICE as a URL: asyncpg alone would migrate the database named after the OS user.
        return await asyncpg.connect(**connect_arguments(dsn, "pgqueue migrate"))

    # READ COMMITTED whatever the database's default: under REPEATABLE READ the snapshot
    # is taken before the lock below is granted, and a migration that waited for another
    # did not see the schema that one committed ("relation alembic_version already exists").
    engine = create_async_engine(
        "postgresql+asyncpg://",
        poolclass=NullPool,
        async_creator=connect,
        isolation_level="READ COMMITTED",
    )
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_migrate)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("pgqueue migrations run online only (they execute frozen SQL files)")
asyncio.run(_run_online())
