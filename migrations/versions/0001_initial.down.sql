-- pgqueue revision 0001 (initial schema), down: remove every object in schema
-- pgqueue except the version table pgqueue.alembic_version, which Alembic
-- keeps (and the schema that holds it). Frozen: never edited once released.
--
-- Revision 0001 creates the whole schema, so "everything but the version
-- table" is exactly what it created. Each list of DROP statements is built
-- before any of them runs, and IF EXISTS covers objects that an earlier
-- CASCADE already removed.
DO $pgqueue_down$
DECLARE
    stmt text;
BEGIN
    -- Extensions installed into the schema own their objects.
    FOR stmt IN
        SELECT format('DROP EXTENSION IF EXISTS %I CASCADE', e.extname)
        FROM pg_extension e
        WHERE e.extnamespace = 'pgqueue'::regnamespace
    LOOP
        EXECUTE stmt;
    END LOOP;

    -- Views and materialized views.
    FOR stmt IN
        SELECT array_to_string(array_agg(
                   format('DROP %s IF EXISTS pgqueue.%I CASCADE',
                          CASE c.relkind WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'VIEW' END,
                          c.relname)), ';')
        FROM pg_class c
        WHERE c.relnamespace = 'pgqueue'::regnamespace AND c.relkind IN ('v', 'm')
        HAVING count(*) > 0
    LOOP
        EXECUTE stmt;
    END LOOP;

    -- Functions, procedures and aggregates (their triggers go with them).
    FOR stmt IN
        SELECT array_to_string(array_agg(
                   format('DROP %s IF EXISTS %s CASCADE',
                          CASE p.prokind WHEN 'p' THEN 'PROCEDURE'
                                         WHEN 'a' THEN 'AGGREGATE'
                                         ELSE 'FUNCTION' END,
                          p.oid::regprocedure)), ';')
        FROM pg_proc p
        WHERE p.pronamespace = 'pgqueue'::regnamespace
          -- not owned by an extension or built in to a type (range constructors)
          AND NOT EXISTS (SELECT FROM pg_depend d
                          WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                            AND d.deptype IN ('e', 'i'))
        HAVING count(*) > 0
    LOOP
        EXECUTE stmt;
    END LOOP;

    -- Tables (partitions go with their parent), then any sequences left over.
    FOR stmt IN
        SELECT array_to_string(array_agg(
                   format('DROP %s IF EXISTS pgqueue.%I CASCADE',
                          CASE c.relkind WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
                          c.relname)), ';')
        FROM pg_class c
        WHERE c.relnamespace = 'pgqueue'::regnamespace
          AND c.relkind IN ('r', 'p', 'f')
          AND NOT c.relispartition
          AND c.relname <> 'alembic_version'
        HAVING count(*) > 0
    LOOP
        EXECUTE stmt;
    END LOOP;

    FOR stmt IN
        SELECT array_to_string(array_agg(
                   format('DROP SEQUENCE IF EXISTS pgqueue.%I CASCADE', c.relname)), ';')
        FROM pg_class c
        WHERE c.relnamespace = 'pgqueue'::regnamespace AND c.relkind = 'S'
        HAVING count(*) > 0
    LOOP
        EXECUTE stmt;
    END LOOP;

    -- Types: enums, domains, ranges, standalone composites (not table row types
    -- or array types, which go with their owners).
    FOR stmt IN
        SELECT array_to_string(array_agg(
                   format('DROP %s IF EXISTS pgqueue.%I CASCADE',
                          CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END,
                          t.typname)), ';')
        FROM pg_type t
        LEFT JOIN pg_class c ON c.oid = t.typrelid
        WHERE t.typnamespace = 'pgqueue'::regnamespace
          AND t.typtype IN ('e', 'd', 'r', 'c')
          AND (t.typrelid = 0 OR c.relkind = 'c')
        HAVING count(*) > 0
    LOOP
        EXECUTE stmt;
    END LOOP;

    COMMENT ON SCHEMA pgqueue IS NULL;
END
$pgqueue_down$;
