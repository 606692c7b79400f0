-- =============================================================================
-- pgqueue: settings
-- Every tunable number lives in a table an operator can read and change from
-- psql; function bodies never hard-code a timeout or a retry count.
-- =============================================================================

-- Does the interval mix signs across its fields (months, days, time)? Intervals
-- compare with 30-day months and 24-hour days, but now() - interval is calendar
-- arithmetic: '-1 month 31 days' compares as 1 day and subtracts to now() in a
-- 31-day month ("every lease is stale"), '1 day -23 hours' to nothing across a
-- DST change. Refused wherever an interval bounds a time.
CREATE FUNCTION pgqueue._interval_mixes_signs(v interval) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT least(date_trunc('month', v), date_trunc('day', v) - date_trunc('month', v), v - date_trunc('day', v))
           < interval '0'
       AND greatest(date_trunc('month', v), date_trunc('day', v) - date_trunc('month', v), v - date_trunc('day', v))
           > interval '0'
$$;

-- An interval's text as an interval, NULL if it is not one (a setting's check
-- names the setting; PostgreSQL's cast error would not).
CREATE FUNCTION pgqueue._as_interval(value text) RETURNS interval
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN value::interval;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;

-- Validate one setting value; raising here turns a bad UPDATE into a clear error.
-- The hint about mixed signs only where they mix: given for every refusal, it
-- misled ("soon" has no signs to mix).
CREATE FUNCTION pgqueue._setting_valid(name text, value text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v interval;
    v_wanted text;
BEGIN
    IF name = 'max_attempts' THEN
        IF value !~ '^\s*[0-9]+\s*$' OR value::numeric < 1 OR value::numeric > 2147483647 THEN
            RAISE EXCEPTION 'pgqueue.settings: max_attempts must be a positive integer, got "%"', value
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    ELSIF name = 'notify' THEN
        IF value NOT IN ('always', 'when_waiting') THEN
            RAISE EXCEPTION 'pgqueue.settings: notify must be ''always'' or ''when_waiting'', got "%"', value
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    ELSIF name IN ('backoff_base', 'backoff_cap', 'stale_after', 'prune_after')
          AND NOT (name = 'prune_after' AND value = 'never') THEN
        -- Bounded: now() plus or minus a larger interval can leave timestamptz's
        -- range, and every retry, recovery or retention round would fail (keeping
        -- jobs for good is prune_after 'never').
        IF name = 'prune_after' THEN
            v_wanted := format('prune_after must be ''never'' or an interval from 0 to 100 years such as ''7 days'', got "%s"', value);
        ELSE
            v_wanted := format('%s must be a positive interval of at most 100 years such as ''30 seconds'', got "%s"', name, value);
        END IF;
        v := pgqueue._as_interval(value);
        IF v IS NOT NULL AND pgqueue._interval_mixes_signs(v) THEN
            RAISE EXCEPTION 'pgqueue.settings: %', v_wanted USING ERRCODE = 'invalid_parameter_value',
                HINT = 'An interval''s months, days and time must not mix signs (a month is not always 30 days).';
        END IF;
        IF v IS NULL OR v > interval '100 years' OR v < interval '0'
           OR (v = interval '0' AND name <> 'prune_after') THEN
            RAISE EXCEPTION 'pgqueue.settings: %', v_wanted USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    RETURN true;
END
$$;

CREATE TABLE pgqueue.settings (
    name  text PRIMARY KEY,
    value text NOT NULL,
    CONSTRAINT settings_name_known
        CHECK (name IN ('max_attempts', 'backoff_base', 'backoff_cap', 'stale_after', 'notify', 'prune_after')),
    CONSTRAINT settings_value_valid CHECK (pgqueue._setting_valid(name, value))
);
COMMENT ON TABLE pgqueue.settings IS
    'Tunables read by the functions on every call: max_attempts (default for new jobs), backoff_base and '
    'backoff_cap (retry delay = min(cap, base * 2^(attempts-1)) with jitter), stale_after (lease length; '
    'workers heartbeat well within it), notify (always: every transaction that queues jobs sends NOTIFY; '
    'when_waiting: only when a worker waits for them, see pgqueue.notify_waiters), prune_after (workers delete '
    'final jobs this long after they finished, see pgqueue.prune_expired; never: keep them). Change with '
    'UPDATE; takes effect at once. Rows cannot be deleted (settings_keep_rows).';
COMMENT ON COLUMN pgqueue.settings.name IS
    'One of max_attempts, backoff_base, backoff_cap, stale_after, notify, prune_after.';
COMMENT ON COLUMN pgqueue.settings.value IS
    'Text form: an integer for max_attempts, always or when_waiting for notify, an interval or never for '
    'prune_after, an interval for the others.';

-- Every function that reads a setting needs its row: one deleted by hand made
-- every failure, say, unrecordable (the worker could only hold the job back and
-- run it again). Refused; UPDATE changes a value. (A superuser can still disable
-- the trigger; _setting then names the missing row.)
CREATE FUNCTION pgqueue._keep_settings() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION 'pgqueue.settings cannot be truncated: every pgqueue function reads it; UPDATE a value to change it'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RAISE EXCEPTION 'pgqueue.settings: % cannot be deleted (the functions that read it would fail); UPDATE it to change it', OLD.name
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'The defaults: max_attempts 5, backoff_base 2 seconds, backoff_cap 10 minutes, stale_after 5 minutes, notify always, prune_after 7 days.';
END
$$;

INSERT INTO pgqueue.settings (name, value) VALUES
    ('max_attempts', '5'),
    ('backoff_base', '2 seconds'),
    ('backoff_cap', '10 minutes'),
    ('stale_after', '5 minutes'),
    ('notify', 'always'),
    ('prune_after', '7 days');

-- A deleted setting must fail loudly, not turn into NULL arithmetic.
CREATE FUNCTION pgqueue._setting(p_name text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v text;
BEGIN
    SELECT s.value INTO v FROM pgqueue.settings s WHERE s.name = p_name;
    IF v IS NULL THEN
        RAISE EXCEPTION 'pgqueue.settings has no row for "%"; restore it with INSERT INTO pgqueue.settings', p_name
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v;
END
$$;

CREATE FUNCTION pgqueue._setting_int(p_name text) RETURNS int
LANGUAGE sql STABLE AS $$ SELECT pgqueue._setting(p_name)::int $$;

CREATE FUNCTION pgqueue._setting_interval(p_name text) RETURNS interval
LANGUAGE sql STABLE AS $$ SELECT pgqueue._setting(p_name)::interval $$;

CREATE TRIGGER settings_keep_rows BEFORE DELETE ON pgqueue.settings
    FOR EACH ROW EXECUTE FUNCTION pgqueue._keep_settings();
COMMENT ON TRIGGER settings_keep_rows ON pgqueue.settings IS
    'Refuses deleting a setting: every function that reads it would fail. UPDATE changes a value.';
CREATE TRIGGER settings_keep_table BEFORE TRUNCATE ON pgqueue.settings
    FOR EACH STATEMENT EXECUTE FUNCTION pgqueue._keep_settings();
COMMENT ON TRIGGER settings_keep_table ON pgqueue.settings IS
    'Refuses TRUNCATE of the settings, as settings_keep_rows refuses a DELETE.';
