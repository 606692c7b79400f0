-- =============================================================================
-- pgqueue: finishing attempts
-- Every transition out of running is a compare-and-set on state = 'running'
-- AND locked_by = worker (fencing): a worker whose lease was recovered, or a
-- late duplicate call, changes nothing and gets false/NULL back.
-- =============================================================================

-- Exponential backoff with jitter in [50 %, 100 %] of min(cap, base * 2^(attempt-1)).
-- The doubling stops once it passes the cap: an interval's day and month
-- fields are 32-bit, so '2 days' * 2^30 is out of range (fail() raised, and the
-- job stayed running), though least() would have taken the cap anyway.
CREATE FUNCTION pgqueue._backoff(p_attempts int) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT least(s.cap, s.base * power(2, least(greatest(p_attempts, 1) - 1, 30,
                                                ceil(log(2, greatest(extract(epoch FROM s.cap)
                                                                     / nullif(extract(epoch FROM s.base), 0), 1)))::int)))
           * (0.5 + random() * 0.5)
    FROM (SELECT pgqueue._setting_interval('backoff_cap') AS cap,
                 pgqueue._setting_interval('backoff_base') AS base) s
$$;

-- May a job keep its dedup_key when it becomes pending again? Not if another
-- pending job took the key meanwhile; then the requeued job drops its key and
-- runs its course, and the newer job stays the one that coalesces requests.
-- The caller holds the key's lock, taken before the job's row (see
-- _lock_before_row): an enqueue of the key holds it and then share-locks the
-- job it depends on, so taking it here, after the row, could deadlock.
CREATE FUNCTION pgqueue._keeps_dedup_key(p_key text, p_job_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_key IS NULL THEN
        RETURN true;
    END IF;
    -- A statement of its own: sees every enqueue of the key that committed
    -- before the caller took the lock.
    RETURN NOT EXISTS (SELECT 1 FROM pgqueue.jobs o
                       WHERE o.dedup_key = p_key AND o.state IN ('waiting', 'queued') AND o.id <> p_job_id);
END
$$;

-- Every waiting job downstream of the given jobs (transitively), with the one
-- it depends on (the lowest id, if several).
CREATE FUNCTION pgqueue._waiting_downstream(p_job_ids bigint[]) RETURNS TABLE (id bigint, cause bigint)
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE downstream(id, cause) AS (
        -- One cause per direct dependent (its lowest), so that a join of many of
        -- these jobs does not carry one row per job down its whole chain.
        SELECT d.job_id, min(d.depends_on) FROM pgqueue.job_dependencies d
        JOIN pgqueue.jobs w ON w.id = d.job_id AND w.state = 'waiting'
        WHERE d.depends_on = ANY (p_job_ids)
        GROUP BY d.job_id
        UNION
        SELECT d.job_id, x.cause FROM downstream x
        JOIN pgqueue.job_dependencies d ON d.depends_on = x.id
        JOIN pgqueue.jobs w ON w.id = d.job_id AND w.state = 'waiting'
    )
    SELECT x.id, min(x.cause) FROM downstream x GROUP BY x.id
$$;

-- Cancel every waiting job downstream of the given jobs, naming the one it
-- depends on. They are locked one by one by primary key in id order, as
-- _unblock_dependents locks them: a completion queueing the same dependents (a
-- join waiting on one of these jobs and on the completed one) then waits
-- behind this transaction instead of deadlocking with it. (An UPDATE locks its
-- rows in whatever order its plan reads them.) One call for all of
-- cancel_pipeline's members, so that the order holds across them.
-- The downstream is read again once they are locked, until it holds no job
-- left unlocked: an enqueue depending on one of them that committed after the
-- first read (it share-locked the job, so this waited for it) added a
-- dependent that read did not see, and it would have waited for a cancelled job
-- for good. Once every one is locked, no enqueue can depend on them until this
-- commits (and then it is refused: the job is cancelled). Only a race adds a
-- round, and its locks come after the first round's, out of id order: a
-- completion queueing the same jobs may then deadlock with it (40P01, one of
-- them retried) where the dependent was stranded before. Under REPEATABLE READ
-- a re-read sees nothing new; pgqueue's callers run in READ COMMITTED.
CREATE FUNCTION pgqueue._cancel_dependents(p_job_ids bigint[], p_reason text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_locked bigint[] := '{}';
    v_causes bigint[] := '{}';
    v_new bigint[];
    v_new_causes bigint[];
BEGIN
    LOOP
        SELECT coalesce(array_agg(x.id ORDER BY x.id), '{}'), coalesce(array_agg(x.cause ORDER BY x.id), '{}')
          INTO v_new, v_new_causes
          FROM pgqueue._waiting_downstream(p_job_ids) x
         WHERE NOT EXISTS (SELECT 1 FROM unnest(v_locked) l(id) WHERE l.id = x.id);  -- hashed
        EXIT WHEN cardinality(v_new) = 0;
        PERFORM 1
        FROM unnest(v_new) u(id)  -- in the array's (id) order: a nested loop
        CROSS JOIN LATERAL (SELECT w.id FROM pgqueue.jobs w WHERE w.id = u.id AND w.state = 'waiting'
                            FOR NO KEY UPDATE) w;
        v_locked := v_locked || v_new;
        v_causes := v_causes || v_new_causes;
    END LOOP;
    IF cardinality(v_locked) = 0 THEN
        RETURN;
    END IF;
    UPDATE pgqueue.jobs j
       SET state = 'cancelled', finished_at = now(),
           last_error = format('dependency failed: job %s %s', x.cause, p_reason)
      FROM unnest(v_locked, v_causes) x(id, cause)
     WHERE j.id = x.id AND j.state = 'waiting';
END
$$;

-- Queue the waiting dependents of the given jobs (which have just succeeded)
-- once their last dependency has. A waiting job counts its unfinished
-- dependencies in pending_deps; each completion subtracts the edges it settles,
-- so a fan-in costs one row update per completion batch, not a re-count of
-- every dependency of the join.
CREATE FUNCTION pgqueue._unblock_dependents(p_job_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
    v_settled int[];
BEGIN
    -- Most jobs have no dependents: one index probe and done.
    IF NOT EXISTS (SELECT 1 FROM pgqueue.job_dependencies d WHERE d.depends_on = ANY (p_job_ids)) THEN
        RETURN;
    END IF;
    -- Lock the waiting dependents one by one by primary key, in id order (two
    -- batches settling dependencies of the same jobs queue up instead of
    -- deadlocking), with how many of their edges this batch settles. By key,
    -- not by a scan: with stale statistics a scan of "waiting" rows is planned
    -- over the pending-dedup index, i.e. every queued job.
    SELECT array_agg(i.job_id ORDER BY i.job_id), array_agg(i.n ORDER BY i.job_id) INTO v_ids, v_settled
    FROM (SELECT d.job_id, count(*)::int AS n FROM pgqueue.job_dependencies d
          WHERE d.depends_on = ANY (p_job_ids) GROUP BY d.job_id ORDER BY d.job_id) i
    CROSS JOIN LATERAL (SELECT 1 FROM pgqueue.jobs w WHERE w.id = i.job_id AND w.state = 'waiting'
                        FOR NO KEY UPDATE) w;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    -- Subtract from the locked rows: a concurrent completion of another
    -- dependency waits for our commit and then subtracts from our result, so
    -- exactly one completion takes a counter to 0 and queues its job.
    UPDATE pgqueue.jobs w
       SET pending_deps = w.pending_deps - u.n,
           state = CASE WHEN w.pending_deps = u.n THEN 'queued' ELSE 'waiting' END
      FROM unnest(v_ids, v_settled) AS u(id, n)
     WHERE w.id = u.id;
END
$$;

-- Is the job running under p_worker? If so, its advisory locks are taken
-- before the caller locks its row: its pipeline lock, its scope's order lock
-- and its dedup key; scope is the job's scope. Locks are taken in one order by
-- every pgqueue transaction: pipeline, scope order, dedup key, rows. An enqueue
-- into the pipeline that depends on this job holds the pipeline lock and then
-- share-locks the row; an enqueue of the job's dedup key that depends on it
-- holds the key and then share-locks the row. Requeued (fail with attempts
-- left, release), the job needs its key to decide whether it keeps it
-- (_keeps_dedup_key), so the key comes before the row too. Not held (by this
-- read), the caller changes nothing: its row lock, a statement later, could
-- find the job claimed back by the same worker meanwhile, and then go on
-- without any of these locks.
CREATE FUNCTION pgqueue._lock_before_row(p_job_id bigint, p_worker text, OUT held boolean, OUT scope jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_pipeline uuid;
    v_key text;
BEGIN
    SELECT j.scope, j.pipeline_id, j.dedup_key INTO scope, v_pipeline, v_key FROM pgqueue.jobs j
    WHERE j.id = p_job_id AND j.state = 'running' AND j.locked_by = p_worker;
    held := FOUND;
    IF NOT held THEN
        RETURN;
    END IF;
    PERFORM pgqueue._pipeline_cancelled(v_pipeline);
    IF scope IS NOT NULL THEN
        PERFORM pgqueue._lock_scope_order(ARRAY[scope]);
    END IF;
    IF v_key IS NOT NULL THEN
        PERFORM pgqueue._lock_dedup_key(v_key);
    END IF;
END
$$;

-- An attempt that ends unfinished (failed, released, recovered), of a job
-- whose row the caller has locked: if an abort was requested for it (the
-- request is consumed here) or its pipeline was cancelled, the job ends
-- cancelled with the matching last_error, whatever attempts it has left, its
-- dependents with it, and this returns true; else nothing changes.
CREATE FUNCTION pgqueue._cancel_if_stopped(p_job_id bigint, p_pipeline_id uuid,
                                           p_if_aborted text, p_if_pipeline text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_aborted boolean;
BEGIN
    DELETE FROM pgqueue.abort_requests r WHERE r.job_id = p_job_id;
    v_aborted := FOUND;
    IF NOT v_aborted AND NOT pgqueue._pipeline_cancelled(p_pipeline_id) THEN
        RETURN false;
    END IF;
    UPDATE pgqueue.jobs
       SET state = 'cancelled', finished_at = now(),
           last_error = CASE WHEN v_aborted THEN p_if_aborted ELSE p_if_pipeline END
     WHERE id = p_job_id;
    PERFORM pgqueue._cancel_dependents(ARRAY[p_job_id],
                                       CASE WHEN v_aborted THEN 'was aborted' ELSE 'was cancelled with its pipeline' END);
    RETURN true;
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
    IF pgqueue._cancel_if_stopped(p_job_id, v.pipeline_id, p_error || E'\n(aborted: not retried)',
                                  p_error || E'\n(pipeline cancelled: not retried)') THEN
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
    PERFORM pgqueue._cancel_dependents(ARRAY[p_job_id], 'failed');
    RETURN 'failed';
END
$$;

-- Record the success of jobs held by p_worker, create their children and
-- queue their unblocked dependents: one UPDATE for the whole batch, so a
-- worker finishing many jobs pays one round trip and one statement.
CREATE FUNCTION pgqueue._complete(p_worker text, p_job_ids bigint[], p_results jsonb[], p_next_jobs jsonb[],
                                  p_label text)
RETURNS bigint[]
LANGUAGE plpgsql
-- Queue tables change faster than ANALYZE runs; stale statistics make the
-- planner sort or bitmap-scan every pending job. These lookups are by key.
-- No JIT: the settings hold for every statement this call runs (children's
-- inserts, fan-in, scope heads included), and a statement left with only a
-- disabled path carries its 1e10 cost past jit_above_cost: compiling it would
-- cost hundreds of ms (a SET per call costs ~0.1 us).
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
AS $$
DECLARE
    v_done bigint[];
    v_given bigint[];  -- the jobs of the batch given next_jobs here
    v_keys text[];  -- their children's dedup keys
    v_dup bigint;
    v_parents bigint[];
    v_pipelines uuid[];
    v_specs jsonb[];
    v_stored int[];  -- per parent: how many of its specs were stored (the rest passed here)
    v_scopes jsonb[];
    v_scoped bigint[];
    v_limited boolean;
BEGIN
    IF cardinality(p_results) <> cardinality(p_job_ids) OR cardinality(p_next_jobs) <> cardinality(p_job_ids) THEN
        RAISE EXCEPTION '%: job_ids, results and next_jobs must have the same length, got % job id(s), % result(s), % next_jobs',
            p_label, cardinality(p_job_ids), cardinality(p_results), cardinality(p_next_jobs)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_next_jobs) n WHERE jsonb_typeof(n) <> 'array') THEN
        RAISE EXCEPTION '%: next_jobs must be an array of job specs, got %', p_label,
            (SELECT jsonb_typeof(n) FROM unnest(p_next_jobs) n WHERE jsonb_typeof(n) <> 'array' LIMIT 1)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The pipelines this batch creates children in and its children's dedup keys,
    -- locked before any row, as every pgqueue transaction takes them before rows:
    -- an enqueue into the pipeline, or of the key, that depends on a member holds
    -- the lock and then share-locks the member. Locked after the batch's rows,
    -- each deadlocked with such an enqueue (40P01). The parents with stored specs
    -- are read from jobs_running_parents, which holds only such jobs: a batch of
    -- plain jobs costs one probe of a near-empty index. (A parent without a
    -- pipeline, NULL below, gets a new one that nobody else can hold.)
    SELECT coalesce(array_agg(DISTINCT j.pipeline_id) FILTER (WHERE j.pipeline_id IS NOT NULL), '{}'),
           coalesce(array_agg(DISTINCT e.s->>'dedup_key') FILTER (WHERE e.s->>'dedup_key' IS NOT NULL), '{}')
      INTO v_pipelines, v_keys
      FROM pgqueue.jobs j
      LEFT JOIN LATERAL jsonb_array_elements(j.next_jobs) e(s) ON true
     WHERE j.locked_by = p_worker AND j.state = 'running' AND j.next_jobs IS NOT NULL
       AND j.id = ANY (p_job_ids);
    v_given := ARRAY(SELECT u.id FROM unnest(p_job_ids, p_next_jobs) AS u(id, specs) WHERE u.specs <> '[]');
    IF cardinality(v_given) > 0 THEN
        -- No "pipeline_id IS NOT NULL" here: the plan would read jobs_pipeline whole.
        v_pipelines := v_pipelines || ARRAY(SELECT j.pipeline_id FROM pgqueue.jobs j
                                            WHERE j.id = ANY (v_given) AND j.state = 'running'
                                              AND j.locked_by = p_worker);
        v_keys := v_keys || ARRAY(SELECT e.s->>'dedup_key' FROM unnest(p_next_jobs) n, jsonb_array_elements(n) e(s)
                                  WHERE jsonb_typeof(e.s) = 'object' AND e.s->>'dedup_key' IS NOT NULL);
    END IF;
    IF cardinality(v_pipelines) > 0 THEN
        PERFORM pgqueue._lock_pipelines(v_pipelines);
    END IF;
    -- Scoped jobs in the batch: their scopes' order locks before any row lock
    -- (see _unblock_next), after the pipelines'. One probe decides that a batch has none.
    IF EXISTS (SELECT 1 FROM pgqueue.jobs j WHERE j.scope IS NOT NULL AND j.state IN ('queued', 'running')) THEN
        SELECT array_agg(DISTINCT j.scope) FILTER (WHERE j.scope IS NOT NULL) INTO v_scopes
          FROM pgqueue.jobs j
         WHERE j.id = ANY (p_job_ids) AND j.state = 'running' AND j.locked_by = p_worker;
        IF v_scopes IS NOT NULL THEN
            PERFORM pgqueue._lock_scope_order(v_scopes);
        END IF;
    END IF;
    IF cardinality(v_keys) > 0 THEN  -- after the scopes' order locks, as everywhere
        PERFORM pgqueue._lock_dedup_keys(v_keys);
    END IF;
    WITH input AS (
        SELECT u.id, u.result, u.next_jobs
        FROM unnest(p_job_ids, p_results, p_next_jobs) AS u(id, result, next_jobs)
    ), done AS (
        UPDATE pgqueue.jobs j
           SET state = 'succeeded', result = i.result, finished_at = now(),
               -- a parent that creates children without a pipeline starts one, shared with them
               pipeline_id = CASE WHEN j.pipeline_id IS NULL
                                   AND (jsonb_array_length(coalesce(j.next_jobs, '[]')) > 0
                                        OR jsonb_array_length(coalesce(i.next_jobs, '[]')) > 0)
                                  THEN gen_random_uuid() ELSE j.pipeline_id END
          FROM input i
         WHERE j.id = i.id AND j.state = 'running' AND j.locked_by = p_worker
        RETURNING j.id, j.scope, j.pipeline_id, coalesce(j.next_jobs, '[]') || coalesce(i.next_jobs, '[]') AS specs,
                  jsonb_array_length(coalesce(j.next_jobs, '[]')) AS stored
    )
    SELECT array_agg(d.id),
           array_agg(d.scope) FILTER (WHERE d.scope IS NOT NULL),
           array_agg(d.id) FILTER (WHERE d.scope IS NOT NULL),
           array_agg(d.id) FILTER (WHERE d.specs <> '[]'),
           array_agg(d.pipeline_id) FILTER (WHERE d.specs <> '[]'),
           array_agg(d.specs) FILTER (WHERE d.specs <> '[]'),
           array_agg(d.stored) FILTER (WHERE d.specs <> '[]'),
           pgqueue._any_queue_limit()
      INTO v_done, v_scopes, v_scoped, v_parents, v_pipelines, v_specs, v_stored, v_limited
      FROM done d;
    -- A repeated id was completed once, with one of its results and next_jobs (the
    -- other's children never created): refused, the error undoing the UPDATE. Looked
    -- for only when fewer jobs were completed than named, as a repeat makes it.
    IF coalesce(cardinality(v_done), 0) < cardinality(p_job_ids) AND cardinality(p_job_ids) > 1 THEN
        SELECT x INTO v_dup FROM unnest(p_job_ids) x WHERE x IS NOT NULL GROUP BY x HAVING count(*) > 1 LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION '%: job_ids names job % more than once', p_label, v_dup
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    IF v_done IS NULL THEN
        RETURN '{}';
    END IF;
    -- (The children's pipelines and dedup keys were locked before any row, above;
    -- a parent's new pipeline, which nobody else can hold, is locked creating them.)
    IF v_scopes IS NOT NULL THEN
        PERFORM pgqueue._unblock_next(v_scopes, v_scoped);
    END IF;
    IF v_limited THEN
        PERFORM pgqueue._notify_limited(v_done);
    END IF;
    -- Dependents first, children after: a child that depends on a job of this
    -- batch sees it succeeded and never counts it, so it must not be decremented.
    PERFORM pgqueue._unblock_dependents(v_done);
    -- The children's dependencies, share-locked in id order across the batch
    -- (each parent's _insert_specs sorts only its own children's): two parents'
    -- children depending on 20 and on 10 locked 20 first, and deadlocked with a
    -- transition locking both in id order. Malformed ids are left to the
    -- validation _insert_specs does, which names them.
    IF cardinality(v_parents) > 1 AND EXISTS (SELECT 1 FROM unnest(v_specs) sp WHERE sp @? '$[*].depends_on[*]') THEN
        PERFORM 1 FROM pgqueue.jobs j
        WHERE j.id = ANY (ARRAY(
                  SELECT DISTINCT (d #>> '{}')::numeric::bigint
                  FROM unnest(v_specs) sp,
                       jsonb_path_query(sp, 'lax $[*].depends_on[*] ? (@.type() == "number" && @ >= 1
                                             && @ <= 9223372036854775807 && @ == @.floor())') d))
        ORDER BY j.id
        FOR SHARE;
    END IF;
    FOR i IN 1 .. coalesce(cardinality(v_parents), 0) LOOP
        -- A refusal names the job when the batch has several.
        PERFORM pgqueue._insert_specs(v_specs[i], v_pipelines[i], v_parents[i],
                                      p_label || CASE WHEN cardinality(p_job_ids) > 1
                                                      THEN format(': job %s', v_parents[i]) ELSE '' END
                                              || ': next_jobs',
                                      false, v_stored[i]);
    END LOOP;
    RETURN v_done;
END
$$;

CREATE FUNCTION pgqueue.complete(job_id bigint, worker text, result jsonb DEFAULT NULL, next_jobs jsonb DEFAULT NULL)
RETURNS boolean
LANGUAGE sql AS $$
    SELECT cardinality(pgqueue._complete(worker, ARRAY[job_id], ARRAY[result], ARRAY[next_jobs],
                                         'pgqueue.complete')) = 1
$$;
COMMENT ON FUNCTION pgqueue.complete(bigint, text, jsonb, jsonb) IS
    'Record success of a job held by worker, store result, and in the same transaction create its next_jobs '
    '(stored and passed here) with its pipeline_id and parent_id, and queue dependents whose dependencies have '
    'all succeeded. Returns false, changing nothing, if the job is not running under this worker.';

-- PL/pgSQL, not SQL, though its body is one statement: a set-returning SQL
-- function called from a SELECT list is not inlined, and its body was parsed
-- and planned again on every call (~190 us of a one-job completion's ~670 us,
-- server side); PL/pgSQL keeps the plan for the session.
CREATE FUNCTION pgqueue.complete_many(worker text, job_ids bigint[], results jsonb[] DEFAULT NULL,
                                      next_jobs jsonb[] DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
BEGIN
    -- No ids (NULL as well as '{}'): nothing held, nothing completed, as complete(NULL).
    RETURN QUERY SELECT unnest(pgqueue._complete(
        worker, coalesce(job_ids, '{}'),
        coalesce(results, array_fill(NULL::jsonb, ARRAY[coalesce(cardinality(job_ids), 0)])),
        coalesce(next_jobs, array_fill(NULL::jsonb, ARRAY[coalesce(cardinality(job_ids), 0)])),
        'pgqueue.complete_many'));
END
$$;
COMMENT ON FUNCTION pgqueue.complete_many(text, bigint[], jsonb[], jsonb[]) IS
    'complete() for a batch of jobs held by worker (results and next_jobs aligned with job_ids, or NULL): '
    'one statement for all of them. Returns the ids it completed; jobs not held by worker are left unchanged.';

-- fail() with, for the worker's log line, how long until a requeued job runs
-- again (NULL unless requeued). No row when the worker does not hold the job.
-- p_retry_in is checked by its callers (fail() below; the worker's delays are
-- 0 to 100 years). Running workers call it (they check the schema only when
-- they start): a later revision keeps this signature and result.
CREATE FUNCTION pgqueue._fail(p_job_id bigint, p_worker text, p_error text, p_retry_in interval)
RETURNS TABLE (state text, runs_in interval)
LANGUAGE plpgsql AS $$
DECLARE
    v_held boolean;
    v_scope jsonb;
    v_state text;
BEGIN
    SELECT l.held, l.scope INTO v_held, v_scope FROM pgqueue._lock_before_row(p_job_id, p_worker) l;
    IF NOT v_held THEN
        RETURN;
    END IF;
    PERFORM 1 FROM pgqueue.jobs j
    WHERE j.id = p_job_id AND j.state = 'running' AND j.locked_by = p_worker
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_state := pgqueue._fail_attempt(p_job_id, coalesce(p_error, '(no error message)'), p_retry_in);
    -- Requeued, it announces itself (jobs_notify_requeued); ended, its place is free.
    IF v_state <> 'queued' THEN
        PERFORM pgqueue._notify_limited(ARRAY[p_job_id]);
    END IF;
    -- Requeued, the job is still active and still ahead of the jobs behind it.
    IF v_scope IS NOT NULL AND v_state <> 'queued' THEN
        PERFORM pgqueue._unblock_next(ARRAY[v_scope], ARRAY[p_job_id]);
    END IF;
    -- The state as _fail_attempt left it, whatever a trigger of yours did to the row since.
    RETURN QUERY SELECT v_state, (SELECT j.run_after - now() FROM pgqueue.jobs j
                                  WHERE j.id = p_job_id AND v_state = 'queued');
END
$$;

CREATE FUNCTION pgqueue.fail(job_id bigint, worker text, error text, retry_in interval DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_until timestamptz;
BEGIN
    -- A mixed interval can be positive yet land in the past ('-2 months 60 days');
    -- far enough out, now() + retry_in leaves timestamptz's range (as in snooze).
    IF retry_in BETWEEN interval '-1000 years' AND interval '1000 years' THEN
        v_until := now() + retry_in;
    END IF;
    IF retry_in < interval '0' OR v_until < now() THEN
        RAISE EXCEPTION 'pgqueue.fail: retry_in must not be negative, got %', retry_in
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF (retry_in IS NOT NULL AND v_until IS NULL) OR v_until > now() + interval '100 years' THEN
        RAISE EXCEPTION 'pgqueue.fail: retry_in must be at most 100 years, got %', retry_in
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN (SELECT f.state FROM pgqueue._fail(job_id, worker, error, retry_in) f);
END
$$;
COMMENT ON FUNCTION pgqueue.fail(bigint, text, text, interval) IS
    'Record a failed attempt of a job held by worker: requeued after retry_in (default: exponential backoff '
    'with jitter from settings) while attempts < max_attempts, else failed, cancelling its dependents '
    '(cancelled instead, never retried, if abort() was called for it or its pipeline was cancelled). '
    'Returns the new state, or NULL (nothing changed) if the job is not running under this worker.';

-- Give a running job held by p_worker back to the queue, the attempt not
-- counted: at once (p_run_after NULL: release, the job keeps its place) or
-- not before p_run_after (snooze). Requeued, the job is still active and still
-- ahead of the jobs behind it in its scope, so they wait for it (nothing to
-- unblock); it stays its scope's current job. An aborted job, or one of a
-- cancelled pipeline, ends cancelled instead, p_verb naming what it was given
-- back by. Returns the new state, or NULL if the worker does not hold the job.
CREATE FUNCTION pgqueue._give_back(p_job_id bigint, p_worker text, p_run_after timestamptz, p_verb text)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_key text;
    v_pipeline uuid;
    v_held boolean;
    v_scope jsonb;
BEGIN
    SELECT l.held, l.scope INTO v_held, v_scope FROM pgqueue._lock_before_row(p_job_id, p_worker) l;
    IF NOT v_held THEN
        RETURN NULL;
    END IF;
    SELECT j.dedup_key, j.pipeline_id INTO v_key, v_pipeline FROM pgqueue.jobs j
    WHERE j.id = p_job_id AND j.state = 'running' AND j.locked_by = p_worker
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- An aborted job is not given back to run again: it ends cancelled here.
    IF pgqueue._cancel_if_stopped(p_job_id, v_pipeline,
                                  format('aborted: %s unfinished after abort() was called', p_verb),
                                  format('%s after its pipeline was cancelled', p_verb)) THEN
        IF v_scope IS NOT NULL THEN
            PERFORM pgqueue._unblock_next(ARRAY[v_scope], ARRAY[p_job_id]);
        END IF;
        PERFORM pgqueue._notify_limited(ARRAY[p_job_id]);
        RETURN 'cancelled';
    END IF;
    UPDATE pgqueue.jobs j
       SET state = 'queued', attempts = greatest(j.attempts - 1, 0), locked_by = NULL, locked_at = NULL,
           run_after = coalesce(p_run_after, j.run_after),
           dedup_key = CASE WHEN pgqueue._keeps_dedup_key(v_key, j.id) THEN v_key END
     WHERE j.id = p_job_id;
    RETURN 'queued';
END
$$;

CREATE FUNCTION pgqueue.release(job_id bigint, worker text) RETURNS boolean
LANGUAGE sql AS $$ SELECT pgqueue._give_back(job_id, worker, NULL, 'released') IS NOT NULL $$;
COMMENT ON FUNCTION pgqueue.release(bigint, text) IS
    'Give a running job back unfinished (shutdown): queued again at once, the attempt not counted (cancelled '
    'instead if abort() was called for it or its pipeline was cancelled). '
    'Returns false, changing nothing, if the job is not running under this worker.';

-- Oban's and River's snooze: a handler that finds its job cannot run yet (a
-- rate limit, a resource not ready) puts it back for later without spending
-- an attempt, so max_attempts keeps counting only real failures. fail() with
-- retry_in would count one, and the job would end failed after max_attempts
-- waits. The time is checked, not the interval: '1 month -30 days' compares
-- equal to zero but lands in the past from January 31st, and a job due in the
-- past would jump ahead of the jobs due now. A century bounds it well inside
-- timestamptz (an overflow would name neither snooze nor the delay).
CREATE FUNCTION pgqueue.snooze(job_id bigint, worker text, delay interval) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_until timestamptz;
BEGIN
    IF delay BETWEEN interval '-1000 years' AND interval '1000 years' THEN  -- else now() + delay could overflow
        v_until := now() + delay;
    END IF;
    IF v_until IS NULL OR v_until < now() OR v_until > now() + interval '100 years' THEN
        RAISE EXCEPTION 'pgqueue.snooze: delay must be from 0 to 100 years, got %', coalesce(delay::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN pgqueue._give_back(job_id, worker, v_until, 'snoozed');
END
$$;
COMMENT ON FUNCTION pgqueue.snooze(bigint, text, interval) IS
    'Put a running job held by worker back to run again not before now() + delay, the attempt not counted '
    '(a handler that cannot proceed yet; fail() would count it). Returns the new state: queued, or cancelled '
    'if abort() was called for it or its pipeline was cancelled; NULL, changing nothing, if the job is not '
    'running under this worker.';

-- SKIP LOCKED: a lease is refreshed for the worker, not by it, so a row
-- another transaction holds must not hold up the others. A plain UPDATE waited
-- behind any row lock on any of the worker's jobs (an operator's SELECT ... FOR
-- UPDATE, an application transaction that enqueued a dependent of a running job
-- and holds it FOR SHARE until commit): every beat timed out and all of the
-- worker's leases went stale together. recover_stale skips locked rows too, so
-- the skipped job is refreshed by a later beat. PL/pgSQL so that the plan is
-- kept for the session.
CREATE FUNCTION pgqueue.heartbeat(worker text) RETURNS int
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_count int;
BEGIN
    UPDATE pgqueue.jobs j SET locked_at = now()
    WHERE j.id = ANY (ARRAY(SELECT h.id FROM pgqueue.jobs h
                            WHERE h.state = 'running' AND h.locked_by = heartbeat.worker
                            FOR NO KEY UPDATE SKIP LOCKED))
      AND j.state = 'running' AND j.locked_by = heartbeat.worker;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION pgqueue.heartbeat(text) IS
    'Refresh the lease (locked_at) of every job running under worker; returns how many. Workers call it well '
    'within settings.stale_after so healthy long jobs are never recovered. Never waits: a job whose row another '
    'transaction holds locked is skipped this time (recover_stale skips it too).';

-- Fenced like complete: only the attempt holding the job writes its checkpoint,
-- so a worker whose lease was recovered cannot overwrite what the next attempt
-- saved. Only progress changes, no indexed column: the update can be HOT, and
-- it takes no scope, pipeline or key lock because it changes none of them.
CREATE FUNCTION pgqueue.save_progress(job_id bigint, worker text, progress jsonb) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF worker IS NULL OR worker = '' OR octet_length(worker) > 200 THEN
        RAISE EXCEPTION 'pgqueue.save_progress: worker must be a non-empty string of at most 200 bytes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE pgqueue.jobs j SET progress = save_progress.progress
    WHERE j.id = save_progress.job_id AND j.state = 'running' AND j.locked_by = save_progress.worker;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION pgqueue.save_progress(bigint, text, jsonb) IS
    'Store a checkpoint in the progress column of a job running under worker (NULL clears it); false, and '
    'nothing written, if worker does not hold the job. The next attempt (a retry, a recovery) reads it back. '
    'Not a heartbeat: the lease is left alone.';
