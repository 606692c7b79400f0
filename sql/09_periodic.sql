-- =============================================================================
-- pgqueue: periodic jobs
-- Every worker that knows a schedule enqueues its ticks; the database makes
-- each tick one job, whichever workers (or psql sessions) try. No leader to
-- elect or hand over: a tick is claimed by moving the schedule's row forward,
-- and the row lock orders the racers. Ticks are named by the schedule's time
-- (12:00:00 for "0 12 * * *"), not by when a worker woke, so clock skew
-- between hosts cannot make two ticks out of one.
-- =============================================================================

CREATE TABLE pgqueue.periodic (
    name        text        PRIMARY KEY,
    last_tick   timestamptz NOT NULL,
    last_job_id bigint,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT periodic_name_valid CHECK (name <> '' AND octet_length(name) <= 200),
    CONSTRAINT periodic_tick_finite CHECK (isfinite(last_tick))
);
COMMENT ON TABLE pgqueue.periodic IS
    'One row per schedule: the latest tick enqueued. Written by enqueue_periodic; delete a row to forget a '
    'schedule (its next tick is enqueued as usual).';
COMMENT ON COLUMN pgqueue.periodic.name IS 'The schedule''s name (App.periodic(name=...), by default its job type).';
COMMENT ON COLUMN pgqueue.periodic.last_tick IS 'The latest tick enqueued; only a later tick enqueues again.';
COMMENT ON COLUMN pgqueue.periodic.last_job_id IS
    'The job that tick enqueued (or the pending job its dedup_key coalesced into).';
COMMENT ON COLUMN pgqueue.periodic.updated_at IS 'When last_tick last moved.';

CREATE FUNCTION pgqueue.enqueue_periodic(name text, tick timestamptz, spec jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
BEGIN
    IF name IS NULL OR name = '' OR octet_length(name) > 200 THEN
        RAISE EXCEPTION 'pgqueue.enqueue_periodic: name must be a non-empty string of at most 200 bytes'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF tick IS NULL OR NOT isfinite(tick) THEN
        RAISE EXCEPTION 'pgqueue.enqueue_periodic: tick must be a finite timestamp, got %', coalesce(tick::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF spec IS NULL OR jsonb_typeof(spec) <> 'object' THEN
        RAISE EXCEPTION 'pgqueue.enqueue_periodic: spec must be a JSON object, got %', coalesce(jsonb_typeof(spec), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Move the schedule to this tick, or find it there (or later) already. A
    -- racer for the same tick waits here on the row lock, then re-checks the
    -- condition against the committed row and updates nothing.
    INSERT INTO pgqueue.periodic AS p (name, last_tick) VALUES (enqueue_periodic.name, enqueue_periodic.tick)
    ON CONFLICT ON CONSTRAINT periodic_pkey
    DO UPDATE SET last_tick = EXCLUDED.last_tick, updated_at = now()
    WHERE p.last_tick < EXCLUDED.last_tick;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- The job runs at its tick, unless the spec says otherwise: a tick enqueued
    -- early (a worker whose clock is ahead) still runs on the database's time.
    v_id := (pgqueue._insert_specs(
                 jsonb_build_array(CASE WHEN spec->>'run_after' IS NOT NULL THEN spec
                                        ELSE spec || jsonb_build_object('run_after', tick) END),
                 NULL, NULL, 'pgqueue.enqueue_periodic: spec', true))[1];
    UPDATE pgqueue.periodic p SET last_job_id = v_id WHERE p.name = enqueue_periodic.name;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION pgqueue.enqueue_periodic(text, timestamptz, jsonb) IS
    'Enqueue spec (enqueue''s parameters as a JSON object; run_after defaults to tick) for the tick of schedule '
    'name, once: returns the new job''s id, or NULL when this tick or a later one of the schedule was enqueued '
    'already (by any session). Concurrent calls for one tick wait for each other; exactly one enqueues.';
