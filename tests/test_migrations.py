"""Migrations: sql/ and `upgrade head` build the same catalog; round trips; idempotence."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest
from alembic.script import ScriptDirectory
from worker_harness import dsn_as

from pgqueue import migrate
from pgqueue.resources import migrations_dir, sql_dir

# Each query returns rows describing one kind of object in schema pgqueue, in a
# form that does not depend on OIDs, creation order or the pg_dump version.
# The version table pgqueue.alembic_version exists only on the migrated side.
CATALOG_QUERIES: dict[str, str] = {
    "relations": """
        SELECT c.relname, c.relkind::text, c.relpersistence::text, c.relrowsecurity,
               pg_get_partkeydef(c.oid), c.relacl::text
        FROM pg_class c
        WHERE c.relnamespace = 'pgqueue'::regnamespace AND c.relname <> 'alembic_version'
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c', 'S')
    """,
    "columns": """
        SELECT c.relname,
               array_agg(ARRAY[a.attname, format_type(a.atttypid, a.atttypmod),
                               a.attnotnull::text, coalesce(pg_get_expr(d.adbin, d.adrelid), ''),
                               a.attidentity::text, a.attgenerated::text,
                               coalesce(col.collname, '')]
                         ORDER BY a.attnum)::text
        FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
        LEFT JOIN pg_collation col ON col.oid = a.attcollation AND col.collname <> 'default'
        WHERE c.relnamespace = 'pgqueue'::regnamespace AND c.relname <> 'alembic_version'
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
        GROUP BY c.relname
    """,
    "constraints": """
        SELECT coalesce(c.conrelid::regclass::text, c.contypid::regtype::text), c.conname,
               pg_get_constraintdef(c.oid), c.condeferrable, c.condeferred
        FROM pg_constraint c
        WHERE c.connamespace = 'pgqueue'::regnamespace
          AND c.conrelid IS DISTINCT FROM to_regclass('pgqueue.alembic_version')
    """,
    "indexes": """
        SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
        FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
        WHERE t.relnamespace = 'pgqueue'::regnamespace AND t.relname <> 'alembic_version'
    """,
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), p.prokind::text,
               CASE WHEN p.prokind = 'a' THEN NULL ELSE pg_get_functiondef(p.oid) END,
               p.proacl::text
        FROM pg_proc p
        WHERE p.pronamespace = 'pgqueue'::regnamespace
    """,
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        WHERE c.relnamespace = 'pgqueue'::regnamespace AND NOT t.tgisinternal
    """,
    "views": """
        SELECT c.relname, pg_get_viewdef(c.oid)
        FROM pg_class c
        WHERE c.relnamespace = 'pgqueue'::regnamespace AND c.relkind IN ('v', 'm')
    """,
    "types": """
        SELECT t.typname, t.typtype::text,
               CASE t.typtype
                 WHEN 'e' THEN (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder)::text
                                FROM pg_enum e WHERE e.enumtypid = t.oid)
                 WHEN 'd' THEN format_type(t.typbasetype, t.typtypmod) || ' notnull='
                               || t.typnotnull || ' default=' || coalesce(t.typdefault, '')
               END
        FROM pg_type t LEFT JOIN pg_class c ON c.oid = t.typrelid
        WHERE t.typnamespace = 'pgqueue'::regnamespace AND t.typtype IN ('e', 'd', 'r', 'c')
          AND (t.typrelid = 0 OR c.relkind = 'c')
    """,
    "sequences": """
        SELECT c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement,
               s.seqmin, s.seqmax, s.seqcache, s.seqcycle
        FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
        WHERE c.relnamespace = 'pgqueue'::regnamespace
    """,
    "policies": """
        SELECT pol.polrelid::regclass::text, pol.polname, pol.polcmd::text,
               pg_get_expr(pol.polqual, pol.polrelid), pg_get_expr(pol.polwithcheck, pol.polrelid)
        FROM pg_policy pol JOIN pg_class c ON c.oid = pol.polrelid
        WHERE c.relnamespace = 'pgqueue'::regnamespace
    """,
    # Every COMMENT ON in the schema (tables, columns, functions, views, types,
    # constraints, triggers, the schema itself): obj_description/col_description
    # generalised through pg_identify_object.
    "comments": """
        SELECT o.type, o.identity, d.description
        FROM pg_description d,
             LATERAL pg_identify_object(d.classoid, d.objoid, d.objsubid) o
        WHERE (o.schema = 'pgqueue' OR (o.type = 'schema' AND o.identity = 'pgqueue'))
          AND o.identity NOT LIKE 'pgqueue.alembic_version%'
    """,
}


async def catalog(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """A comparable description of every object in schema pgqueue."""
    conn = await asyncpg.connect(dsn)
    try:
        snapshot: dict[str, list[tuple[Any, ...]]] = {}
        for kind, query in CATALOG_QUERIES.items():
            rows = await conn.fetch(query)
            snapshot[kind] = sorted((tuple(row) for row in rows), key=repr)
        return snapshot
    finally:
        await conn.close()


def assert_same_catalog(
    expected: dict[str, list[tuple[Any, ...]]], actual: dict[str, list[tuple[Any, ...]]]
) -> None:
    problems = []
    for kind in CATALOG_QUERIES:
        if actual[kind] == expected[kind]:
            continue
        missing = [row for row in expected[kind] if row not in actual[kind]]
        extra = [row for row in actual[kind] if row not in expected[kind]]
        problems.append(f"{kind}: only in expected {missing!r}; only in actual {extra!r}")
        if not missing and not extra:
            problems.append(f"{kind}: same rows, different multiplicity")
    assert not problems, "catalogs differ:\n" + "\n".join(problems)


async def build_from_sql_dir(dsn: str) -> None:
    """Execute sql/*.sql in name order, each file through the simple-query protocol."""
    conn = await asyncpg.connect(dsn)
    try:
        for path in sorted(sql_dir().glob("*.sql")):
            await conn.execute(path.read_text(encoding="utf-8"))
    finally:
        await conn.close()


async def version(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass('pgqueue.alembic_version') IS NULL"):
            return []
        return [r[0] for r in await conn.fetch("SELECT version_num FROM pgqueue.alembic_version")]
    finally:
        await conn.close()


async def test_sql_dir_and_upgrade_head_build_the_same_catalog(
    db_dsn: str, empty_db_dsn: str
) -> None:
    await build_from_sql_dir(empty_db_dsn)
    from_sql, from_migrations = await catalog(empty_db_dsn), await catalog(db_dsn)
    assert from_sql["relations"] or not list(sql_dir().glob("*.sql")), "sql/ built nothing"
    # expected = sql/ (the truth), actual = upgrade head. While revision 0001 is
    # unreleased, a difference usually means: run scripts/freeze_initial.py.
    assert_same_catalog(from_sql, from_migrations)


async def test_upgrade_downgrade_upgrade_round_trips(db_dsn: str) -> None:
    before = await catalog(db_dsn)
    await anyio.to_thread.run_sync(migrate.downgrade, db_dsn, "base")
    emptied = await catalog(db_dsn)
    assert emptied == {kind: [] for kind in CATALOG_QUERIES}, "downgrade base left objects"
    assert await version(db_dsn) == []
    await anyio.to_thread.run_sync(migrate.upgrade, db_dsn)
    assert await version(db_dsn) == [migrate.HEAD_REVISION]
    assert_same_catalog(before, await catalog(db_dsn))


async def test_upgrade_is_idempotent(db_dsn: str) -> None:
    before = await catalog(db_dsn)
    migrate.upgrade(db_dsn)  # from inside a running event loop, too
    # the SQLAlchemy URL an application has at hand (was "is not a postgresql:// URL")
    migrate.upgrade(db_dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    # with the asyncpg dialect's options, which the server would refuse as settings
    options = (
        "prepared_statement_cache_size=0&ssl=disable&application_name=deploy&connect_timeout=10"
    )
    sep = "&" if "?" in db_dsn else "?"
    migrate.upgrade(db_dsn.replace("postgresql://", "postgresql+asyncpg://", 1) + sep + options)
    # libpq's connect_timeout in a plain URL ("unrecognized configuration parameter")
    migrate.upgrade(db_dsn + sep + "connect_timeout=10")
    with pytest.raises(migrate.SchemaError, match="ssl='yes' in the SQLAlchemy URL"):
        migrate.upgrade(
            db_dsn.replace("postgresql://", "postgresql+asyncpg://", 1) + sep + "ssl=yes"
        )
    await anyio.to_thread.run_sync(migrate.upgrade, db_dsn)
    assert await version(db_dsn) == [migrate.HEAD_REVISION]
    assert_same_catalog(before, await catalog(db_dsn))


def test_concurrent_upgrades_on_an_empty_database(empty_db_dsn: str) -> None:
    """Pods starting together each run `pgqueue migrate`: all succeed, one applies."""
    code = "import sys; from pgqueue.migrate import upgrade; upgrade(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, empty_db_dsn], stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr.decode()
    assert anyio.run(version, empty_db_dsn) == [migrate.HEAD_REVISION]


async def test_the_version_table_documents_itself(db_dsn: str) -> None:
    """Alembic's version table lives in schema pgqueue, where every table carries a comment."""
    conn = await asyncpg.connect(db_dsn)
    try:
        comments = await conn.fetchrow(
            "SELECT obj_description('pgqueue.alembic_version'::regclass, 'pg_class') AS tbl,"
            " col_description('pgqueue.alembic_version'::regclass, 1) AS col"
        )
    finally:
        await conn.close()
    assert comments["tbl"] and comments["col"]


async def test_a_role_that_does_not_own_the_version_table_can_migrate_at_head(
    db_dsn: str,
) -> None:
    """A deploy role with rights on the version table but not its owner: `migrate` at head
    reads it and changes nothing, and never comments on it (only the owner may)."""
    role = f"pgqueue_migrator_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("COMMENT ON TABLE pgqueue.alembic_version IS NULL")  # as before
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'migrate'")
        await conn.execute(f"GRANT USAGE ON SCHEMA pgqueue TO {role}")
        await conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON pgqueue.alembic_version TO {role}"
        )
        role_dsn = dsn_as(db_dsn, role, "migrate")
        await anyio.to_thread.run_sync(migrate.upgrade, role_dsn)
        assert await version(db_dsn) == [migrate.HEAD_REVISION]
        comment = "SELECT obj_description('pgqueue.alembic_version'::regclass, 'pg_class')"
        assert await conn.fetchval(comment) is None
        await anyio.to_thread.run_sync(migrate.upgrade, db_dsn)  # the owner comments it
        assert await conn.fetchval(comment)
    finally:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


def test_head_revision_constant_matches_the_scripts() -> None:
    script = ScriptDirectory(str(migrations_dir()))
    assert script.get_current_head() == migrate.HEAD_REVISION
    for revision in script.walk_revisions():
        assert revision.revision.isdigit() and len(revision.revision) == 4, revision.revision


async def test_check_schema(db_dsn: str, empty_db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await migrate.check_schema(conn)
        await conn.execute("UPDATE pgqueue.alembic_version SET version_num = '9999'")
        with pytest.raises(migrate.SchemaError, match="newer"):
            await migrate.check_schema(conn)
        await conn.execute("UPDATE pgqueue.alembic_version SET version_num = '0000'")
        with pytest.raises(migrate.SchemaError, match=r"older.*run `pgqueue migrate`"):
            await migrate.check_schema(conn)
        await conn.execute("DELETE FROM pgqueue.alembic_version")
        with pytest.raises(migrate.SchemaError, match="missing"):
            await migrate.check_schema(conn)
    finally:
        await conn.close()
    empty = await asyncpg.connect(empty_db_dsn)
    try:
        with pytest.raises(migrate.SchemaError, match="run `pgqueue migrate`"):
            await migrate.check_schema(empty)
    finally:
        await empty.close()


def test_a_schema_holding_objects_of_another_is_not_installed_into(empty_db_dsn: str) -> None:
    """From the review: accepted, and `downgrade base` then dropped the other's table with
    pgqueue's (the down script drops everything in the schema but the version table)."""

    async def run(*statements: str) -> list[Any]:
        conn = await asyncpg.connect(empty_db_dsn)
        try:
            return [await conn.fetchval(s) for s in statements]
        finally:
            await conn.close()

    anyio.run(run, "CREATE SCHEMA pgqueue", "CREATE TABLE pgqueue.mine (x int)")
    with pytest.raises(migrate.SchemaError, match=r"already holds objects .*\(table mine\)"):
        migrate.upgrade(empty_db_dsn)
    assert anyio.run(
        run, "SELECT to_regclass('pgqueue.jobs') IS NULL", "SELECT count(*) FROM pgqueue.mine"
    ) == [True, 0]
    assert anyio.run(version, empty_db_dsn) == []


# The migrations waiting for the lock (pg_locks), besides the one the test holds.
_WAITING = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    " AND pid <> pg_backend_pid()"
)


@contextlib.asynccontextmanager
async def _migration_behind_another(
    dsn: str, admin: asyncpg.Connection
) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.transaction.Transaction]]:
    """A migration of ``dsn`` started in a task, and waiting (observed) for the migration
    lock that a transaction of the test holds; yields that transaction's connection and the
    transaction (commit it to let the migration go). The block ends when the migration has."""
    ahead = await asyncpg.connect(dsn)
    try:
        tx = ahead.transaction()
        await tx.start()
        await ahead.execute("SELECT pg_advisory_xact_lock($1)", migrate.MIGRATION_LOCK_KEY)
        async with anyio.create_task_group() as tg:

            async def upgrade() -> None:
                await anyio.to_thread.run_sync(migrate.upgrade, dsn)

            tg.start_soon(upgrade)
            with anyio.fail_after(30):  # until it waits for the lock, observed
                while not await admin.fetchval(_WAITING):  # noqa: ASYNC110 (polling pg_locks)
                    await anyio.sleep(0.02)
            yield ahead, tx
    finally:
        await ahead.close()


async def test_a_migration_that_waited_for_another_sees_its_schema_under_repeatable_read(
    empty_db_dsn: str,
) -> None:
    """From the review: with the database's default at REPEATABLE READ, a migration's snapshot
    was taken before the lock it waits for was granted, so it did not see the schema the
    migration ahead of it committed: "relation alembic_version already exists"."""
    admin = await asyncpg.connect(empty_db_dsn)
    try:
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(
            f"ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'"
        )
        up = (migrations_dir() / "versions" / "0001_initial.up.sql").read_text(encoding="utf-8")
        async with _migration_behind_another(empty_db_dsn, admin) as (ahead, tx):
            # What the migration ahead does: the schema, and the version table at head.
            await ahead.execute(up)
            await ahead.execute(
                "CREATE TABLE pgqueue.alembic_version (version_num varchar(32) PRIMARY KEY);"
                f"INSERT INTO pgqueue.alembic_version VALUES ('{migrate.HEAD_REVISION}')"
            )
            await tx.commit()
        assert await version(empty_db_dsn) == [migrate.HEAD_REVISION]
    finally:
        await admin.close()


async def test_a_migration_waits_for_another_past_the_roles_lock_timeout(
    empty_db_dsn: str,
) -> None:
    """From a review: migration roles often carry a lock_timeout or a statement_timeout (for
    their DDL), and pods migrating together then failed: the one waiting for the other's
    lock gave up."""
    admin = await asyncpg.connect(empty_db_dsn)
    try:
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(
            f"ALTER DATABASE {name} SET lock_timeout = '100ms'; ALTER DATABASE {name}"
            " SET statement_timeout = '200ms'"
        )
        async with _migration_behind_another(empty_db_dsn, admin) as (_, tx):
            await anyio.sleep(0.5)  # five lock_timeouts
            assert await admin.fetchval(_WAITING) == 1  # still waiting
            await tx.commit()
        assert await version(empty_db_dsn) == [migrate.HEAD_REVISION]
    finally:
        await admin.close()


async def test_a_schema_created_beforehand_for_the_migrating_role(empty_db_dsn: str) -> None:
    """A DBA creates the schema and grants the migrating role USAGE and CREATE on it, no
    CREATE on the database: the first migrate failed ("permission denied for database",
    then "must be owner of schema pgqueue")."""
    role = f"pgqueue_owner_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'migrate'")
        await conn.execute(
            f"CREATE SCHEMA pgqueue; GRANT USAGE, CREATE ON SCHEMA pgqueue TO {role}"
        )
        role_dsn = dsn_as(empty_db_dsn, role, "migrate")
        await anyio.to_thread.run_sync(migrate.upgrade, role_dsn)
        assert await version(empty_db_dsn) == [migrate.HEAD_REVISION]
        owner = "SELECT relowner::regrole::text FROM pg_class WHERE oid = 'pgqueue.jobs'::regclass"
        assert await conn.fetchval(owner) == role
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


async def test_a_migration_runs_no_function_of_the_migrating_roles_search_path(
    empty_db_dsn: str,
) -> None:
    """From a review: the migration ran under the migrating role's path, where a function
    taking the exact argument type (here format(text, regprocedure) in public, which a role
    allowed to create there could add) beat the built-in: it ran as the migrating role, and
    could switch off the pinned search paths of sql/10_search_path.sql."""
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        for args in ("text, regprocedure", "text, text, text"):
            await conn.execute(
                f"""CREATE FUNCTION public.format({args}) RETURNS text LANGUAGE plpgsql
                    AS $$ BEGIN RAISE EXCEPTION 'a shadowing function ran'; END $$"""
            )
        await anyio.to_thread.run_sync(migrate.upgrade, empty_db_dsn)
        unpinned = await conn.fetchval(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgqueue'::regnamespace"
            " AND proname !~ '^_' AND proconfig IS NULL"
        )
        assert unpinned == 0
    finally:
        await conn.close()


def test_an_extension_in_the_schema_is_named_as_one(empty_db_dsn: str) -> None:
    """Its functions were listed one by one (function armor, function armor, ...)."""

    async def setup() -> None:
        conn = await asyncpg.connect(empty_db_dsn)
        try:
            await conn.execute("CREATE SCHEMA pgqueue")
            try:
                await conn.execute("CREATE EXTENSION pgcrypto SCHEMA pgqueue")
            except asyncpg.PostgresError as exc:  # not every server ships contrib
                pytest.skip(f"pgcrypto: {exc}")
        finally:
            await conn.close()

    anyio.run(setup)
    with pytest.raises(
        migrate.SchemaError, match=r"already holds objects .*\(extension pgcrypto\);"
    ):
        migrate.upgrade(empty_db_dsn)
