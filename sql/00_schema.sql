-- =============================================================================
-- pgqueue: schema
-- Everything pgqueue owns lives in one schema, so an application can see at a
-- glance what belongs to the queue and drop it as a unit.
-- =============================================================================

-- A schema a DBA created beforehand for the migrating role (GRANT USAGE, CREATE ON
-- SCHEMA pgqueue) is used as it is: CREATE SCHEMA IF NOT EXISTS would still need CREATE
-- on the database, checked before the schema's existence, and only its owner may
-- comment on it.
DO $$
BEGIN
    IF to_regnamespace('pgqueue') IS NULL THEN
        CREATE SCHEMA pgqueue;
    END IF;
    IF pg_has_role((SELECT nspowner FROM pg_namespace WHERE nspname = 'pgqueue'), 'USAGE') THEN
        COMMENT ON SCHEMA pgqueue IS
            'pgqueue: a job queue inside PostgreSQL. Call the functions, read the views; see docs/sql.md.';
    END IF;
END
$$;
