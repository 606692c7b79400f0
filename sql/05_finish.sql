-- =============================================================================
-- pgqueue: finishing attempts
-- Every transition out of running is a compare-and-set on state = 'running'
-- AND locked_by = worker (fencing): a worker whose lease was recovered, or a
-- late duplicate call, changes nothing and gets false/NULL back.
-- =============================================================================

-- Exponential backoff with jitter in [50 %, 100 %] of min(cap, base * 2^(attempt-1)).
CREATE FUNCTION pgqueue._backoff(p_attempts int) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT least(pgqueue._setting_interval('backoff_cap'),
                 pgqueue._setting_interval('backoff_base') * power(2, least(greatest(p_attempts, 1) - 1, 30)))
           * (0.5 + random() * 0.5)
$$;

-- May a job keep its dedup_key when it becomes pending again? Not if another
-- pending job took the key meanwhile; then the requeued job drops its key and
-- runs its course, and the newer job stays the one that coalesces requests.
CREATE FUNCTION pgqueue._keeps_dedup_key(p_key text, p_job_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_key IS NULL THEN
        RETURN true;
    END IF;
    PERFORM pgqueue._lock_dedup_key(p_key);
    -- Separate statement: sees every enqueue of the key that committed before the lock.
    RETURN NOT EXISTS (SELECT 1 FROM pgqueue.jobs o
                       WHERE o.dedup_key = p_key AND o.state IN ('waiting', 'queued') AND o.id <> p_job_id);
END
$$;

-- Cancel every waiting job downstream of p_job_id (transitively), naming it.
CREATE FUNCTION pgqueue._cancel_dependents(p_job_id bigint, p_reason text) RETURNS void
LANGUAGE sql AS $$
    WITH RECURSIVE downstream(id) AS (
        SELECT d.job_id FROM pgqueue.job_dependencies d
        JOIN pgqueue.jobs w ON w.id = d.job_id AND w.state = 'waiting'
        WHERE d.depends_on = p_job_id
        UNION
        SELECT d.job_id FROM downstream x
        JOIN pgqueue.job_dependencies d ON d.depends_on = x.id
        JOIN pgqueue.jobs w ON w.id = d.job_id AND w.state = 'waiting'
    )
    UPDATE pgqueue.jobs j
       SET state = 'cancelled', finished_at = now(),
           last_error = format('dependency failed: job %s %s', p_job_id, p_reason)
      FROM downstream x
     WHERE j.id = x.id AND j.state = 'waiting'
$$;

-- Queue the waiting dependents of p_job_id whose dependencies have all succeeded.
CREATE FUNCTION pgqueue._unblock_dependents(p_job_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- Lock first, check after, in two statements: when two dependencies finish
    -- concurrently, the second one to get this lock checks with a snapshot that
    -- already sees the first one's commit, so exactly one of them queues the job.
    PERFORM 1 FROM pgqueue.jobs w
    WHERE w.id IN (SELECT d.job_id FROM pgqueue.job_dependencies d WHERE d.depends_on = p_job_id)
      AND w.state = 'waiting'
    ORDER BY w.id
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE pgqueue.jobs w SET state = 'queued'
    WHERE w.id IN (SELECT d.job_id FROM pgqueue.job_dependencies d WHERE d.depends_on = p_job_id)
      AND w.state = 'waiting'
      AND NOT EXISTS (SELECT 1 FROM pgqueue.job_dependencies d JOIN pgqueue.jobs p ON p.id = d.depends_on
                      WHERE d.job_id = w.id AND p.state <> 'succeeded');
END
$$;

-- Count a failed attempt on a job whose row the caller has locked: requeue
-- with backoff while attempts remain, else fail it and cancel its dependents.
CREATE FUNCTION pgqueue._fail_attempt(p_job_id bigint, p_error text, p_retry_in interval) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v pgqueue.jobs%ROWTYPE;
BEGIN
    SELECT * INTO v FROM pgqueue.jobs WHERE id = p_job_id;
    IF pgqueue._pipeline_cancelled(v.pipeline_id) THEN
        UPDATE pgqueue.jobs
           SET state = 'cancelled', finished_at = now(), last_error = p_error || E'\n(pipeline cancelled: not retried)'
         WHERE id = p_job_id;
        PERFORM pgqueue._cancel_dependents(p_job_id, 'was cancelled with its pipeline');
        RETURN 'cancelled';
    END IF;
    IF v.attempts < v.max_attempts THEN
        UPDATE pgqueue.jobs
           SET state = 'queued', run_after = now() + coalesce(p_retry_in, pgqueue._backoff(v.attempts)),
               last_error = p_error, locked_by = NULL, locked_at = NULL,
               dedup_key = CASE WHEN pgqueue._keeps_dedup_key(v.dedup_key, p_job_id) THEN v.dedup_key END
         WHERE id = p_job_id;
        RETURN 'queued';
    END IF;
    UPDATE pgqueue.jobs SET state = 'failed', finished_at = now(), last_error = p_error WHERE id = p_job_id;
    PERFORM pgqueue._cancel_dependents(p_job_id, 'failed');
    RETURN 'failed';
END
$$;

CREATE FUNCTION pgqueue.complete(job_id bigint, worker text, result jsonb DEFAULT NULL, next_jobs jsonb DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_pipeline_id uuid;
    v_specs jsonb;
BEGIN
    IF complete.next_jobs IS NOT NULL AND jsonb_typeof(complete.next_jobs) <> 'array' THEN
        RAISE EXCEPTION 'pgqueue.complete: next_jobs must be an array of job specs, got %',
            jsonb_typeof(complete.next_jobs) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE pgqueue.jobs j
       SET state = 'succeeded', result = complete.result, finished_at = now(),
           -- a parent that creates children without a pipeline starts one, shared with them
           pipeline_id = CASE WHEN j.pipeline_id IS NULL
                               AND (jsonb_array_length(coalesce(j.next_jobs, '[]')) > 0
                                    OR jsonb_array_length(coalesce(complete.next_jobs, '[]')) > 0)
                              THEN gen_random_uuid() ELSE j.pipeline_id END
     WHERE j.id = complete.job_id AND j.state = 'running' AND j.locked_by = complete.worker
    RETURNING j.pipeline_id, coalesce(j.next_jobs, '[]') || coalesce(complete.next_jobs, '[]')
         INTO v_pipeline_id, v_specs;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF jsonb_array_length(v_specs) > 0 THEN
        PERFORM pgqueue._insert_specs(v_specs, v_pipeline_id, complete.job_id, 'pgqueue.complete: next_jobs');
    END IF;
    PERFORM pgqueue._unblock_dependents(complete.job_id);
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgqueue.complete(bigint, text, jsonb, jsonb) IS
    'Record success of a job held by worker, store result, and in the same transaction create its next_jobs '
    '(stored and passed here) with its pipeline_id and parent_id, and queue dependents whose dependencies have '
    'all succeeded. Returns false, changing nothing, if the job is not running under this worker.';

CREATE FUNCTION pgqueue.fail(job_id bigint, worker text, error text, retry_in interval DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF retry_in < interval '0' THEN
        RAISE EXCEPTION 'pgqueue.fail: retry_in must not be negative, got %', retry_in
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM 1 FROM pgqueue.jobs j
    WHERE j.id = fail.job_id AND j.state = 'running' AND j.locked_by = fail.worker
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN pgqueue._fail_attempt(fail.job_id, coalesce(fail.error, '(no error message)'), fail.retry_in);
END
$$;
COMMENT ON FUNCTION pgqueue.fail(bigint, text, text, interval) IS
    'Record a failed attempt of a job held by worker: requeued after retry_in (default: exponential backoff '
    'with jitter from settings) while attempts < max_attempts, else failed, cancelling its dependents. '
    'Returns the new state, or NULL (nothing changed) if the job is not running under this worker.';

CREATE FUNCTION pgqueue.release(job_id bigint, worker text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_key text;
    v_pipeline uuid;
BEGIN
    SELECT j.dedup_key, j.pipeline_id INTO v_key, v_pipeline FROM pgqueue.jobs j
    WHERE j.id = release.job_id AND j.state = 'running' AND j.locked_by = release.worker
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF pgqueue._pipeline_cancelled(v_pipeline) THEN
        UPDATE pgqueue.jobs j
           SET state = 'cancelled', finished_at = now(), last_error = 'released after its pipeline was cancelled'
         WHERE j.id = release.job_id;
        PERFORM pgqueue._cancel_dependents(release.job_id, 'was cancelled with its pipeline');
        RETURN true;
    END IF;
    UPDATE pgqueue.jobs j
       SET state = 'queued', attempts = greatest(j.attempts - 1, 0), locked_by = NULL, locked_at = NULL,
           dedup_key = CASE WHEN pgqueue._keeps_dedup_key(v_key, j.id) THEN v_key END
     WHERE j.id = release.job_id;
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgqueue.release(bigint, text) IS
    'Give a running job back unfinished (shutdown): queued again at once, the attempt not counted. '
    'Returns false, changing nothing, if the job is not running under this worker.';

CREATE FUNCTION pgqueue.heartbeat(worker text) RETURNS int
LANGUAGE sql AS $$
    WITH refreshed AS (
        UPDATE pgqueue.jobs j SET locked_at = now()
        WHERE j.state = 'running' AND j.locked_by = heartbeat.worker
        RETURNING 1
    )
    SELECT count(*)::int FROM refreshed
$$;
COMMENT ON FUNCTION pgqueue.heartbeat(text) IS
    'Refresh the lease (locked_at) of every job running under worker; returns how many. Workers call it well '
    'within settings.stale_after so healthy long jobs are never recovered.';
