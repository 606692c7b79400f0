-- =============================================================================
-- pgqueue: schema
-- Everything pgqueue owns lives in one schema, so an application can see at a
-- glance what belongs to the queue and drop it as a unit.
-- =============================================================================

CREATE SCHEMA IF NOT EXISTS pgqueue;
COMMENT ON SCHEMA pgqueue IS
    'pgqueue: a job queue inside PostgreSQL. Call the functions, read the views; see docs/sql.md.';
