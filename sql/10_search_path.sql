-- =============================================================================
-- pgqueue: a pinned search path
-- Every function a caller reaches, the public ones, the triggers, the two internal
-- ones the Python package calls itself (_fail, _lock_pause) and the one a CHECK
-- constraint calls on every settings write (_setting_valid), runs with
-- search_path = pg_catalog, pg_temp; the helpers they call run under it too
-- (pinning those as well would cost a SET per nested call).
-- pgqueue names its own objects with their schema but calls built-ins by bare
-- name (cardinality, array_agg, unnest, ...). Under a caller's search path a
-- function in another schema that takes the exact argument type, say
-- public.cardinality(bigint[]) created by any role allowed to create there,
-- wins over the polymorphic built-in, and would run as whoever called pgqueue,
-- with their rights: a worker's, a migrating owner's, a superuser's in psql.
-- Set here, after every function exists, so that none is left out; a later
-- migration that replaces a function must set it again (a test checks).
-- =============================================================================

DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid FROM pg_proc p
        WHERE p.pronamespace = 'pgqueue'::regnamespace
          AND (p.proname !~ '^_' OR p.prorettype = 'trigger'::regtype
               OR p.proname IN ('_fail', '_lock_pause', '_setting_valid'))
    LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END
$$;
