-- =============================================================================
-- pgqueue: recovery and operator actions
-- =============================================================================

CREATE FUNCTION pgqueue.recover_stale(stale_after interval DEFAULT NULL) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_after interval := coalesce(recover_stale.stale_after, pgqueue._setting_interval('stale_after'));
    c record;
    v record;
    v_state text;
BEGIN
    -- Zero is allowed: "every lease taken before this transaction" (a test or an
    -- operator after a crash forcing recovery now). A negative interval is a
    -- mistake (a lease from the future), refused.
    IF v_after < interval '0' OR pgqueue._interval_mixes_signs(v_after) THEN
        RAISE EXCEPTION 'pgqueue.recover_stale: stale_after must not be negative (nor mix signs, as ''-1 month 31 days''), got %', v_after
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF v_after > interval '1000 years' THEN  -- now() - v_after would leave timestamptz's range
        RAISE EXCEPTION 'pgqueue.recover_stale: stale_after must be at most 1000 years, got %', v_after
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A job's pipeline lock, its scope's order lock and its dedup key come
    -- before its row lock (as in every transition out of running), so
    -- candidates are read unlocked and each is locked and re-checked. Holding
    -- one candidate's locks while taking the next's could close a cycle with
    -- another transaction, so these are try-locks: a candidate whose locks are
    -- taken right now (its scope in a transition or an enqueue, its pipeline
    -- being cancelled, its key being enqueued) waits for the next round. SKIP
    -- LOCKED: a row locked right now is being completed or failed by its
    -- worker, which proves the worker is alive; fencing settles the rest.
    FOR c IN
        SELECT j.id, j.scope, j.pipeline_id, j.dedup_key FROM pgqueue.jobs j
        WHERE j.state = 'running' AND j.locked_at < now() - v_after
        ORDER BY j.id
    LOOP
        CONTINUE WHEN c.pipeline_id IS NOT NULL AND NOT pg_try_advisory_xact_lock(
            pgqueue._lock_class('pipeline'), hashtext(c.pipeline_id::text));
        IF c.scope IS NOT NULL THEN
            PERFORM pgqueue._check_read_committed('recover_stale');  -- as in _lock_scope_order
        END IF;
        CONTINUE WHEN c.scope IS NOT NULL AND NOT pg_try_advisory_xact_lock(
            pgqueue._lock_class('scope_order'), pgqueue._scope_lock_key(c.scope));
        CONTINUE WHEN c.dedup_key IS NOT NULL AND NOT pg_try_advisory_xact_lock(
            pgqueue._lock_class('dedup'), hashtext(c.dedup_key));
        SELECT j.id, j.locked_by, j.locked_at, j.attempts INTO v FROM pgqueue.jobs j
        WHERE j.id = c.id AND j.state = 'running' AND j.locked_at < now() - v_after
        FOR NO KEY UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        v_state := pgqueue._fail_attempt(v.id,
            format('stale: attempt %s by worker %s sent no heartbeat since %s (stale_after %s); recovered',
                   v.attempts, v.locked_by, v.locked_at, v_after),
            interval '0');
        IF c.scope IS NOT NULL AND v_state <> 'queued' THEN
            PERFORM pgqueue._unblock_next(ARRAY[c.scope], ARRAY[c.id]);
        END IF;
        IF v_state <> 'queued' THEN
            PERFORM pgqueue._notify_limited(ARRAY[c.id]);
        END IF;
        RETURN NEXT v.id;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgqueue.recover_stale(interval) IS
    'Treat running jobs whose lease (locked_at) is older than stale_after (default: settings.stale_after) as '
    'failed attempts: requeued at once, or failed when attempts are spent. The old worker is fenced out. '
    'Returns the recovered ids. Workers run it from one elected leader; safe to call from psql.';

CREATE FUNCTION pgqueue.cancel(job_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_scope jsonb;
BEGIN
    -- A cancelled queued job may have been its scope's next: the order lock
    -- first (before the row), then the next one is unblocked. Taken for a
    -- scoped job in any state (its scope never changes): one seen running here
    -- may be requeued (released, failed, recovered) before the UPDATE below
    -- finds it queued, and cancelling it then must unblock the job behind it.
    SELECT j.scope INTO v_scope FROM pgqueue.jobs j WHERE j.id = cancel.job_id;
    IF v_scope IS NOT NULL THEN
        PERFORM pgqueue._lock_scope_order(ARRAY[v_scope]);
    END IF;
    -- An earlier attempt's error stays (a queued job between retries). One a dependency's
    -- failure or a pipeline's cancel wrote (a job retried itself since) does not:
    -- retry() revives jobs by it, and this one was cancelled by hand.
    UPDATE pgqueue.jobs j
       SET state = 'cancelled', scope_blocked = false, finished_at = now(),
           last_error = CASE WHEN j.last_error IS NULL OR j.last_error LIKE 'dependency failed: %'
                                  OR j.last_error = 'pipeline cancelled'
                             THEN 'cancelled' ELSE j.last_error END
     WHERE j.id = cancel.job_id AND j.state IN ('waiting', 'queued');
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pgqueue._cancel_dependents(ARRAY[cancel.job_id], 'was cancelled');
    IF v_scope IS NOT NULL THEN
        PERFORM pgqueue._unblock_next(ARRAY[v_scope], ARRAY[cancel.job_id]);
    END IF;
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgqueue.cancel(bigint) IS
    'Cancel a waiting or queued job and, transitively, the jobs waiting on it. Returns false for a running or '
    'finished job (a running handler is not interrupted; its worker''s outcome decides).';

CREATE FUNCTION pgqueue.abort(job_id bigint) RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_scope jsonb;
    v_state text;
BEGIN
    -- The scope's order lock before any row lock, as every transition takes
    -- them (cancel below takes it too; held already, it is not waited for).
    SELECT j.scope INTO v_scope FROM pgqueue.jobs j WHERE j.id = abort.job_id;
    IF v_scope IS NOT NULL THEN
        PERFORM pgqueue._lock_scope_order(ARRAY[v_scope]);
    END IF;
    -- Aborts of one job take turns: two holding the row FOR SHARE below, both
    -- finding the job requeued, would deadlock upgrading it in cancel().
    PERFORM pg_advisory_xact_lock(pgqueue._lock_class('abort'), hashtext(abort.job_id::text));
    LOOP
        IF pgqueue.cancel(abort.job_id) THEN
            RETURN 'cancelled';
        END IF;
        -- FOR SHARE waits for a transition out of running that is under way and
        -- holds off the next until this commits: whichever transition ends the
        -- attempt reads the request (fail, release and recovery lock the row
        -- first, then look). Not a stronger lock: that would also wait for an
        -- application's transaction that enqueued a dependent of the job (it
        -- holds the row FOR SHARE until it commits) while holding the scope's
        -- order lock, which that transaction's next scoped enqueue needs.
        SELECT j.state INTO v_state FROM pgqueue.jobs j WHERE j.id = abort.job_id FOR SHARE;
        IF v_state = 'running' THEN
            INSERT INTO pgqueue.abort_requests (job_id) VALUES (abort.job_id) ON CONFLICT (job_id) DO NOTHING;
            -- On the queues' channel with an empty payload, which no queue name is:
            -- a second channel LISTENed by every worker cost each pickup ~0.2 ms.
            PERFORM pg_notify('pgqueue', '');
            RETURN 'running';
        END IF;
        IF v_state IS NULL OR v_state IN ('succeeded', 'failed', 'cancelled') THEN
            RETURN NULL;
        END IF;
        -- Queued or waiting again (requeued after cancel looked): cancel it now.
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgqueue.abort(bigint) IS
    'Stop a job wherever it is: a waiting or queued job is cancelled as cancel() does (returns ''cancelled''); '
    'for a running job a request is recorded and workers told (NOTIFY pgqueue with an empty payload; returns '
    '''running''): the worker cancels an async handler, and the attempt then ends cancelled, never retried, '
    'its dependents cancelled. A handler that succeeds first wins. NULL for a finished or unknown job.';

-- The fan-in counter's definition: how many dependencies of the job have not
-- succeeded. Used where a counter is rebuilt (retry) rather than decremented.
CREATE FUNCTION pgqueue._unfinished_deps(p_job_id bigint) RETURNS int
LANGUAGE sql STABLE AS $$
    SELECT count(*)::int FROM pgqueue.job_dependencies d JOIN pgqueue.jobs p ON p.id = d.depends_on
    WHERE d.job_id = p_job_id AND p.state <> 'succeeded'
$$;

-- A job a retry revives, reached from the retried job (see _revivable_downstream).
CREATE FUNCTION pgqueue._revivable(w pgqueue.jobs, p_pipeline_id uuid) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT w.state = 'cancelled'
       AND (w.last_error LIKE 'dependency failed: %' OR w.last_error = 'pipeline cancelled')
       AND (w.pipeline_id IS NULL OR w.pipeline_id IS NOT DISTINCT FROM p_pipeline_id
            OR NOT EXISTS (SELECT 1 FROM pgqueue.cancelled_pipelines c
                           WHERE c.pipeline_id = w.pipeline_id))
$$;

-- The jobs a retry of p_job_id revives, transitively: cancelled because it failed
-- ("dependency failed: ...") or cancelled with its pipeline, p_pipeline_id, whose mark
-- the retry lifts ("pipeline cancelled"). Not one of another pipeline that is still
-- cancelled: that pipeline grows nothing until a member of it is retried.
CREATE FUNCTION pgqueue._revivable_downstream(p_job_id bigint, p_pipeline_id uuid) RETURNS bigint[]
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE downstream(id) AS (
        SELECT d.job_id FROM pgqueue.job_dependencies d
        JOIN pgqueue.jobs w ON w.id = d.job_id
        WHERE d.depends_on = p_job_id AND pgqueue._revivable(w, p_pipeline_id)
        UNION
        SELECT d.job_id FROM downstream x
        JOIN pgqueue.job_dependencies d ON d.depends_on = x.id
        JOIN pgqueue.jobs w ON w.id = d.job_id
        WHERE pgqueue._revivable(w, p_pipeline_id)
    )
    SELECT array_agg(x.id) FROM downstream x
$$;

CREATE FUNCTION pgqueue.retry(job_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v pgqueue.jobs%ROWTYPE;
    v_downstream bigint[];
    v_more bigint[];
    v_revived bigint[];
    v_cancelled boolean;
    v_id bigint;
    v_write boolean;
    v_shared bigint[] := '{}';
    v_busy uuid;
BEGIN
    -- Its reads after waits (the rows, the pipelines' marks) need fresh snapshots.
    PERFORM pgqueue._check_read_committed('retry');
    -- The job and the dependents it may revive are read unlocked, and their
    -- advisory locks are taken before any row lock, in the order every pgqueue
    -- transaction takes them: the pipelines' (the job's own and its dependents',
    -- in key order: an enqueue into a pipeline that depends on a member holds it,
    -- then share-locks the row; a cancel_pipeline holds it, then locks the
    -- members; a completion creating children in it, a fail or a release of a
    -- member hold it, then lock their rows), its scope lock (so a claim of a
    -- newer job of this scope cannot slip in between; a claim holding it updates
    -- the scope's previous current job, which may be this one), then the dedup keys.
    SELECT * INTO v FROM pgqueue.jobs j WHERE j.id = retry.job_id AND j.state IN ('failed', 'cancelled');
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    v_downstream := pgqueue._revivable_downstream(retry.job_id, v.pipeline_id);
    -- The dependents' pipelines are waited for only by a transaction that holds
    -- no row yet (no transaction id: it has written and row-locked nothing; it
    -- may hold advisory locks of earlier calls, as any multi-call transaction):
    -- one that has (an earlier retry of the same statement, as in retrying every
    -- failed job at once) would wait holding rows, and a transaction holding such
    -- a pipeline and waiting for one of them (an enqueue into it depending on a
    -- job retried first) closes a cycle. Such a call only tries them, below. (Its
    -- own job's pipeline, scope and dedup locks it still waits for, as before.)
    PERFORM pgqueue._lock_pipelines(v.pipeline_id || ARRAY(SELECT w.pipeline_id FROM pgqueue.jobs w
                                                           WHERE w.id = ANY (v_downstream)
                                                             AND pg_current_xact_id_if_assigned() IS NULL));
    v_cancelled := pgqueue._pipeline_cancelled(v.pipeline_id);
    IF v.scope IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(pgqueue._lock_class('scope'), pgqueue._scope_lock_key(v.scope));
    END IF;
    -- Every key that may become pending again, locked in key order (as a batch
    -- enqueue locks them) for _keeps_dedup_key: a key a newer pending job took
    -- meanwhile is dropped, never a 23505.
    PERFORM pgqueue._lock_dedup_keys(ARRAY(SELECT w.dedup_key FROM pgqueue.jobs w
                                           WHERE w.id = retry.job_id OR w.id = ANY (v_downstream)));
    -- The rows, in id order, each in its mode: this job and the dependents it may
    -- revive (written below) for update; their dependencies shared, as enqueue
    -- shares them, since every job that may wait again gets its fan-in counter
    -- recounted: a dependency finishing right now commits before the count and is
    -- seen succeeded, or finishes after this transaction and finds its dependents
    -- waiting; one failing right now is seen failed by the loop below. In one id
    -- order, retries of a job and of its dependency meet at the older row; locking
    -- its own row first, each held the row the other wanted next (40P01).
    FOR v_id, v_write IN
        SELECT x.id, bool_or(x.write)
        FROM (SELECT retry.job_id AS id, true AS write
              UNION ALL
              SELECT u.id, true FROM unnest(v_downstream) u(id)
              UNION ALL
              SELECT d.depends_on, false FROM pgqueue.job_dependencies d
              WHERE d.job_id = retry.job_id OR d.job_id = ANY (v_downstream)) x
        GROUP BY x.id
        ORDER BY x.id
    LOOP
        IF v_write THEN
            PERFORM 1 FROM pgqueue.jobs j WHERE j.id = v_id FOR NO KEY UPDATE;
        ELSE
            PERFORM 1 FROM pgqueue.jobs j WHERE j.id = v_id FOR SHARE;
            v_shared := v_shared || v_id;
        END IF;
    END LOOP;
    -- A completion that created a dependent of this job while the row lock above waited
    -- for it (a stored spec's child of this failed job, created cancelled: it has no
    -- dedup_key) committed an edge the first read could not see. Read again, once every
    -- lock is held, and lock what is new (after the others, out of id order: only that
    -- race adds them, and a deadlock it may then meet is broken by PostgreSQL, 40P01).
    -- (Set operations here and below, not "<> ALL (array)" per element: quadratic, a
    -- retry reviving 20,000 dependents took minutes.)
    v_more := ARRAY(SELECT unnest(pgqueue._revivable_downstream(retry.job_id, v.pipeline_id))
                    EXCEPT SELECT unnest(v_downstream));
    IF cardinality(v_more) > 0 THEN
        PERFORM 1 FROM pgqueue.jobs j WHERE j.id = ANY (v_more) ORDER BY j.id FOR NO KEY UPDATE;
        v_shared := v_shared || ARRAY(
            SELECT j.id FROM pgqueue.jobs j
            WHERE j.id IN (SELECT d.depends_on FROM pgqueue.job_dependencies d WHERE d.job_id = ANY (v_more))
            ORDER BY j.id FOR SHARE);
        v_downstream := coalesce(v_downstream, '{}') || v_more;
    END IF;
    SELECT * INTO v FROM pgqueue.jobs j WHERE j.id = retry.job_id AND j.state IN ('failed', 'cancelled');
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- A request left by an abort that did not end the attempt (none should be):
    -- the new attempts are not aborted.
    DELETE FROM pgqueue.abort_requests r WHERE r.job_id = retry.job_id;
    -- An operator retrying a member of a cancelled pipeline resumes the pipeline.
    IF v_cancelled THEN
        DELETE FROM pgqueue.cancelled_pipelines c WHERE c.pipeline_id = v.pipeline_id;
    END IF;
    -- The pipelines of the dependents it may revive, held to commit: a
    -- cancel_pipeline of one of them that comes later waits for this transaction,
    -- then cancels what it revived; the read below sees the mark of one that
    -- committed before. Those locked above are held (their tries succeed). Any
    -- other (a dependent found only now, v_more: created by a completion, or
    -- revivable since a retry lifted its pipeline's mark, while this waited; or
    -- every one, in a transaction that held rows before this call) is tried,
    -- never waited for, since this holds rows now and a cancel_pipeline (its
    -- pipeline lock, then its members' rows) would close a cycle with it. Held,
    -- it refuses the whole retry (nothing is written): retried a moment later, it
    -- goes through, and never half-done (a dependent left cancelled unsaid). The
    -- completion that created such a dependent can be the holder: its commit
    -- frees its row locks, which woke this, a moment before its advisory locks.
    SELECT p.pipeline_id INTO v_busy
    FROM (SELECT DISTINCT w.pipeline_id FROM pgqueue.jobs w
          WHERE w.id = ANY (v_downstream) AND w.pipeline_id IS NOT NULL
            AND w.pipeline_id IS DISTINCT FROM v.pipeline_id
          ORDER BY 1) p
    WHERE NOT pg_try_advisory_xact_lock(pgqueue._lock_class('pipeline'), hashtext(p.pipeline_id::text))
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgqueue.retry: pipeline % of a job it would revive is busy (being cancelled, or a job of it '
                        'ending right now); nothing was retried: try again', v_busy
            USING ERRCODE = 'lock_not_available';
    END IF;
    -- Read again with every lock held.
    v_downstream := ARRAY(SELECT w.id FROM pgqueue.jobs w
                          WHERE w.id = ANY (v_downstream) AND pgqueue._revivable(w, v.pipeline_id));
    -- One with another dependency that failed or was cancelled stays cancelled
    -- (that dependency cancels it: revived, it would wait for good), and so does
    -- whatever waits on it: drop them until none is left to drop.
    LOOP
        v_revived := ARRAY(
            SELECT unnest(v_downstream)
            EXCEPT
            SELECT d.job_id FROM pgqueue.job_dependencies d
            JOIN pgqueue.jobs p ON p.id = d.depends_on
            WHERE d.job_id = ANY (v_downstream) AND p.state IN ('failed', 'cancelled')
              AND p.id <> retry.job_id
              AND p.id NOT IN (SELECT unnest(v_downstream)));
        EXIT WHEN cardinality(v_revived) = coalesce(cardinality(v_downstream), 0);
        v_downstream := v_revived;
    END LOOP;
    UPDATE pgqueue.jobs j
       SET pending_deps = x.n,
           state = CASE WHEN x.n > 0 THEN 'waiting' ELSE 'queued' END,
           attempts = 0, run_after = now(), finished_at = NULL, locked_by = NULL, locked_at = NULL,
           result = NULL,
           dedup_key = CASE WHEN pgqueue._keeps_dedup_key(v.dedup_key, j.id) THEN v.dedup_key END
      FROM (SELECT pgqueue._unfinished_deps(retry.job_id) AS n) x
     WHERE j.id = retry.job_id;
    -- Each of them depends (transitively) on this job, which has not succeeded: they wait.
    -- A key stays with the oldest of them that holds it, if no other pending job
    -- (this one included, a statement ago) has it by now.
    -- Their "dependency failed" no longer holds (and they never ran: nothing else to keep).
    UPDATE pgqueue.jobs j
       SET state = 'waiting', finished_at = NULL, last_error = NULL,
           pending_deps = pgqueue._unfinished_deps(j.id),
           dedup_key = CASE WHEN j.id = f.first_id AND pgqueue._keeps_dedup_key(j.dedup_key, j.id)
                            THEN j.dedup_key END
      FROM (SELECT o.id, min(o.id) OVER (PARTITION BY o.dedup_key) AS first_id
            FROM pgqueue.jobs o WHERE o.id = ANY (v_downstream)) f
     WHERE j.id = f.id;
    -- The jobs share-locked above (the dependencies of every job it meant to
    -- revive, revived or not) that are queued: see _announce_held. And the
    -- scope's next job, in whatever queue: claims skip a scope whose lock this
    -- transaction holds (they try it), and no row of that job changes here.
    PERFORM pgqueue._announce_held(ARRAY(SELECT s FROM unnest(v_shared) s
                                         UNION ALL
                                         SELECT h.id FROM (SELECT q.id FROM pgqueue.jobs q
                                                           WHERE v.scope IS NOT NULL
                                                             AND pgqueue._same_scope(q.scope, v.scope)
                                                             AND q.state = 'queued' AND q.id <> retry.job_id
                                                           ORDER BY jsonb_hash(q.scope), q.id LIMIT 1) h));
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgqueue.retry(bigint) IS
    'Put a failed or cancelled job back to queued (waiting if its dependencies have not all succeeded) with '
    'attempts reset to 0; dependents that were cancelled because of it, or with its pipeline, wait for it '
    'again (unless another of their dependencies failed or was cancelled too); a cancelled pipeline''s mark '
    'is lifted. A dedup_key that '
    'another pending job took meanwhile is given up (by the job or a dependent), never raised on. Returns '
    'false if the job is not failed or cancelled.';

-- Abort requests whose attempt ended without reading them (it succeeded first):
-- prune and retention take them with the jobs. A request another transaction
-- holds (a retry consuming it) is left for the next round: retention never waits.
CREATE FUNCTION pgqueue._drop_ended_abort_requests() RETURNS void
LANGUAGE sql AS $$
    DELETE FROM pgqueue.abort_requests r
    WHERE r.job_id = ANY (ARRAY(SELECT x.job_id FROM pgqueue.abort_requests x
                                WHERE NOT EXISTS (SELECT 1 FROM pgqueue.jobs j
                                                  WHERE j.id = x.job_id AND j.state = 'running')
                                FOR UPDATE SKIP LOCKED))
      AND NOT EXISTS (SELECT 1 FROM pgqueue.jobs j WHERE j.id = r.job_id AND j.state = 'running')
$$;

-- Does any job depend on this one? A job that failed or was cancelled is kept
-- while one does: retry() of that dependent makes it wait for the job again
-- (until the job is retried and succeeds), and pruned, it would wait for good.
-- Any edge, not only a waiting dependent's: edges to a job that failed or was
-- cancelled are never created (enqueue refuses it), so their absence in a
-- statement's snapshot cannot be undone by a retry committing during the
-- statement, where "is a dependent waiting" can (retry(J) only shares the row
-- prune deletes, so prune's row lock re-tests nothing). The dependents are
-- pruned first; the job goes a round later. A function: written inline, the
-- planner hashed the whole edge table for one probe per failed job.
CREATE FUNCTION pgqueue._depended_on(p_job_id bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pgqueue.job_dependencies d WHERE d.depends_on = p_job_id)
$$;

-- The jobs that failed or were cancelled and that the given (deleted) jobs
-- depended on: the ones prune() kept for them, tried again after them. Read in
-- the deleting statement's snapshot, where the deleted jobs' edges still exist
-- (and the jobs it deleted too: the next statement finds those gone). One probe
-- of the edges' primary key per id; a test against the whole id array per edge
-- ("not one of those deleted") made a prune of 100,000 jobs take 11 s.
CREATE FUNCTION pgqueue._failed_dependencies(p_job_ids bigint[]) RETURNS bigint[]
LANGUAGE sql STABLE AS $$
    SELECT ARRAY(SELECT DISTINCT d.depends_on
                 FROM unnest(p_job_ids) g(id)
                 JOIN pgqueue.job_dependencies d ON d.job_id = g.id
                 JOIN pgqueue.jobs p ON p.id = d.depends_on
                 WHERE p.state IN ('failed', 'cancelled'))
$$;

-- The marks of cancelled pipelines none of whose jobs is left, cancelled before
-- p_before: kept for good, the table would grow with every cancel, and an id
-- reused later (a deterministic one) would be refused forever. A recent mark of
-- an id with no jobs stays: the pipeline may have been cancelled while its
-- first jobs were being enqueued.
CREATE FUNCTION pgqueue._drop_ended_pipeline_marks(p_before timestamptz) RETURNS void
LANGUAGE sql AS $$
    -- A mark another transaction holds (a prune deleting it, a retry lifting it) is left
    -- for a later round: retention never waits.
    DELETE FROM pgqueue.cancelled_pipelines c
    WHERE c.pipeline_id = ANY (ARRAY(SELECT m.pipeline_id FROM pgqueue.cancelled_pipelines m
                                     WHERE m.cancelled_at < p_before
                                       AND NOT EXISTS (SELECT 1 FROM pgqueue.jobs j
                                                       WHERE j.pipeline_id = m.pipeline_id)
                                     FOR UPDATE SKIP LOCKED))
      AND NOT EXISTS (SELECT 1 FROM pgqueue.jobs j WHERE j.pipeline_id = c.pipeline_id)
$$;

CREATE FUNCTION pgqueue.prune(older_than interval) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_count bigint;
    v_deleted bigint;
    v_next bigint[];
BEGIN
    IF older_than IS NULL OR older_than < interval '0' OR pgqueue._interval_mixes_signs(older_than) THEN
        RAISE EXCEPTION 'pgqueue.prune: older_than must be a non-negative interval (its fields of one sign), got %', older_than
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF older_than > interval '1000 years' THEN  -- now() - older_than would leave timestamptz's range
        RAISE EXCEPTION 'pgqueue.prune: older_than must be at most 1000 years, got %', older_than
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The current job of a scope is kept: it holds the scope's latest outcome. A
    -- job that failed or was cancelled is kept while a job depends on it
    -- (_depended_on); the statement that deletes its last dependent cannot know
    -- whether that one goes (a retry of it may commit meanwhile), so the jobs
    -- that failed and that the deleted jobs depended on are tried again, in a
    -- later statement (which sees such a retry): one call prunes a whole chain.
    -- The rows are locked first, in id order, as an enqueue share-locks its
    -- dependencies: a DELETE locks in the order its plan reads them, and one that
    -- held a newer job while waiting for an older one an enqueue depending on both
    -- had share-locked closed a cycle with it (40P01).
    WITH gone AS (
        DELETE FROM pgqueue.jobs j
        WHERE j.id = ANY (ARRAY(SELECT o.id FROM pgqueue.jobs o
                                WHERE o.state IN ('succeeded', 'failed', 'cancelled')
                                  AND o.finished_at < now() - prune.older_than
                                  AND NOT o.is_current
                                  AND (o.state = 'succeeded' OR NOT pgqueue._depended_on(o.id))
                                ORDER BY o.id FOR UPDATE))
          AND j.state IN ('succeeded', 'failed', 'cancelled')
          AND j.finished_at < now() - prune.older_than
          AND NOT j.is_current
          AND (j.state = 'succeeded' OR NOT pgqueue._depended_on(j.id))
        RETURNING j.id
    )
    SELECT (SELECT count(*) FROM gone), pgqueue._failed_dependencies(ARRAY(SELECT g.id FROM gone g))
      INTO v_count, v_next;
    -- These never wait: the first statement holds the rows it deleted, and a
    -- retry holding one of these (in id order, before the dependent it waits
    -- for) would wait for those: such a job is left for the next call.
    WHILE cardinality(v_next) > 0 LOOP
        WITH gone AS (
            DELETE FROM pgqueue.jobs j
            WHERE j.id = ANY (ARRAY(SELECT f.id FROM pgqueue.jobs f
                                    WHERE f.id = ANY (v_next)
                                      AND f.state IN ('failed', 'cancelled')
                                      AND f.finished_at < now() - prune.older_than
                                      AND NOT f.is_current
                                      AND NOT pgqueue._depended_on(f.id)
                                    FOR UPDATE SKIP LOCKED))
            RETURNING j.id
        )
        SELECT (SELECT count(*) FROM gone), pgqueue._failed_dependencies(ARRAY(SELECT g.id FROM gone g))
          INTO v_deleted, v_next;
        v_count := v_count + v_deleted;
    END LOOP;
    PERFORM pgqueue._drop_ended_abort_requests();
    PERFORM pgqueue._drop_ended_pipeline_marks(now() - prune.older_than);
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION pgqueue.prune(interval) IS
    'Delete final jobs whose finished_at is older than older_than (except the current job of each scope, and '
    'a failed or cancelled job while a job that depends on it remains), '
    'abort requests whose job no longer runs (one another transaction holds: at a later call), and the marks '
    'of cancelled pipelines cancelled before then with no job left; returns how many jobs were deleted.';

-- Retention: what every worker runs (one at a time, under a leader lock), and
-- what pg_cron can run where no worker does. A batch of the oldest final jobs
-- past settings.prune_after per call, so that each call is a short
-- transaction however large the backlog (the first run after a year without
-- one): the caller calls again while a call returns batch_size. It never
-- waits: rows another transaction holds (a retry, an enqueue depending on the
-- job) are skipped this time, so it neither deadlocks with them nor makes them
-- queue behind a batch. FOR UPDATE re-tests a row changed since the snapshot
-- (retried: queued again) before locking it; the DELETE repeats the test all
-- the same. Scopes' current jobs are kept for good, so they are not in the
-- index (jobs_finished) the batch is read from.
CREATE FUNCTION pgqueue.prune_expired(batch_size int DEFAULT 10000) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_after text := pgqueue._setting('prune_after');
    v_count bigint;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'pgqueue.prune_expired: batch_size must be >= 1, got %', coalesce(batch_size::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_after = 'never' THEN
        PERFORM pgqueue._drop_ended_abort_requests();  -- they would pile up (a pipeline's mark stays)
        RETURN 0;
    END IF;
    DELETE FROM pgqueue.jobs j
    WHERE j.id = ANY (ARRAY(SELECT o.id FROM pgqueue.jobs o
                            WHERE o.state IN ('succeeded', 'failed', 'cancelled')
                              AND o.finished_at < now() - v_after::interval AND NOT o.is_current
                              AND (o.state = 'succeeded' OR NOT pgqueue._depended_on(o.id))
                            ORDER BY o.finished_at LIMIT prune_expired.batch_size
                            FOR UPDATE SKIP LOCKED))
      AND j.state IN ('succeeded', 'failed', 'cancelled')
      AND j.finished_at < now() - v_after::interval AND NOT j.is_current;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    PERFORM pgqueue._drop_ended_abort_requests();
    PERFORM pgqueue._drop_ended_pipeline_marks(now() - v_after::interval);
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION pgqueue.prune_expired(int) IS
    'prune() by settings.prune_after (nothing if never), at most batch_size jobs, oldest first, skipping rows '
    'other transactions hold (it never waits), with the marks of cancelled pipelines that have no job left; '
    'returns how many were deleted (call again while that is '
    'batch_size). Workers run it every heartbeat period, one at a time.';

CREATE FUNCTION pgqueue.cancel_pipeline(pipeline_id uuid) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_ids bigint[];
    v_locked bigint;
    v_scopes jsonb[];
    v_cancelled_scopes jsonb[];
    v_cancelled_scoped bigint[];
BEGIN
    IF cancel_pipeline.pipeline_id IS NULL THEN
        RAISE EXCEPTION 'pgqueue.cancel_pipeline: pipeline_id is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The pipeline lock orders this against completions that create children
    -- and retries that requeue members (both check the mark under the same lock).
    PERFORM pgqueue._pipeline_cancelled(cancel_pipeline.pipeline_id);
    INSERT INTO pgqueue.cancelled_pipelines (pipeline_id) VALUES (cancel_pipeline.pipeline_id)
    ON CONFLICT DO NOTHING;
    -- Cancelled queued members may be their scopes' next jobs: order locks
    -- first (after the pipeline's, as everywhere), the next ones unblocked
    -- after. Every member that can be cancelled below is unfinished now (no
    -- member can be created while we hold the pipeline lock), whatever state
    -- it moves to meanwhile, so its scope is among these.
    v_scopes := ARRAY(SELECT DISTINCT j.scope FROM pgqueue.jobs j
                      WHERE j.pipeline_id = cancel_pipeline.pipeline_id AND j.scope IS NOT NULL
                        AND j.state IN ('waiting', 'queued', 'running'));
    PERFORM pgqueue._lock_scope_order(v_scopes);
    -- Then the rows this will cancel, the members and the jobs downstream of
    -- them together, by key in one id order as _unblock_dependents locks them: a
    -- completion outside the pipeline queueing some of them would otherwise hold
    -- one and wait for another. (An UPDATE locks its rows in whatever order its
    -- plan reads them: heap order, here.)
    WITH RECURSIVE members AS (
        SELECT j.id FROM pgqueue.jobs j
        WHERE j.pipeline_id = cancel_pipeline.pipeline_id AND j.state IN ('waiting', 'queued')
    ), downstream(id) AS (
        SELECT m.id FROM members m
        UNION
        SELECT d.job_id FROM downstream x
        JOIN pgqueue.job_dependencies d ON d.depends_on = x.id
        JOIN pgqueue.jobs w ON w.id = d.job_id AND w.state = 'waiting'
    )
    SELECT count(*) INTO v_locked
    FROM (SELECT x.id FROM downstream x ORDER BY x.id) x
    CROSS JOIN LATERAL (SELECT w.id FROM pgqueue.jobs w WHERE w.id = x.id FOR NO KEY UPDATE) w;
    WITH cancelled AS (
        UPDATE pgqueue.jobs j
           SET state = 'cancelled', scope_blocked = false, finished_at = now(), last_error = 'pipeline cancelled'
         WHERE j.pipeline_id = cancel_pipeline.pipeline_id AND j.state IN ('waiting', 'queued')
        RETURNING j.id, j.scope
    )
    SELECT array_agg(c.id), array_agg(c.scope) FILTER (WHERE c.scope IS NOT NULL),
           array_agg(c.id) FILTER (WHERE c.scope IS NOT NULL)
      INTO v_ids, v_cancelled_scopes, v_cancelled_scoped
      FROM cancelled c;
    IF v_cancelled_scopes IS NOT NULL THEN
        PERFORM pgqueue._unblock_next(v_cancelled_scopes, v_cancelled_scoped);
    END IF;
    -- Jobs outside the pipeline that waited on its members go too.
    IF v_ids IS NOT NULL THEN
        PERFORM pgqueue._cancel_dependents(v_ids, 'was cancelled with its pipeline');
    END IF;
    RETURN coalesce(cardinality(v_ids), 0);
END
$$;
COMMENT ON FUNCTION pgqueue.cancel_pipeline(uuid) IS
    'Cancel every waiting or queued job of a pipeline and mark it cancelled: members still running finish, '
    'but their children are created cancelled and their retries end cancelled. Returns how many jobs were '
    'cancelled. pgqueue.retry() of a member lifts the mark and revives what waits on it, cancelled with the pipeline.';

CREATE FUNCTION pgqueue.abort_pipeline(pipeline_id uuid) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_cancelled bigint;
    v_asked bigint;
BEGIN
    v_cancelled := pgqueue.cancel_pipeline(abort_pipeline.pipeline_id);
    -- The running members. The pipeline's mark, written under its lock, already
    -- ends their attempts cancelled however they end but a success (fail,
    -- release and recovery read it under the same lock); a request per member
    -- tells its worker to stop the handler now. No row lock is needed for that.
    WITH asked AS (
        INSERT INTO pgqueue.abort_requests (job_id)
        SELECT j.id FROM pgqueue.jobs j
        WHERE j.pipeline_id = abort_pipeline.pipeline_id AND j.state = 'running'
        ON CONFLICT (job_id) DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO v_asked FROM asked;
    IF v_asked > 0 THEN
        PERFORM pg_notify('pgqueue', '');  -- as abort() does
    END IF;
    RETURN v_cancelled + v_asked;
END
$$;
COMMENT ON FUNCTION pgqueue.abort_pipeline(uuid) IS
    'cancel_pipeline(), and abort() of every running member: their workers stop the handlers and the attempts '
    'end cancelled (unless they succeed first; their children are then created cancelled). Returns how many '
    'jobs were cancelled plus how many running members were asked to stop (not counting those asked already).';

-- Of p_queues, the paused ones whose pause lock this transaction now holds
-- shared (until commit): the queues whose jobs it may flag out of the claim
-- index. resume_queue() takes the lock exclusively before it clears the
-- queue's flags, so it waits for every flagging transaction under way and then
-- sees their rows. This side never waits: a queue whose lock a pause or resume
-- holds right now is left out (its jobs stay unflagged and are notified; claims
-- skip them by name all the same). Waiting here, under the row locks the
-- caller may hold, deadlocked with a resume waiting for those rows. The second
-- look, a new statement after the locks, drops a queue whose resume committed
-- after the first look's snapshot. Under REPEATABLE READ or SERIALIZABLE every
-- statement reads the transaction's first snapshot, so nothing is flagged
-- (READ UNCOMMITTED is READ COMMITTED in PostgreSQL).
CREATE FUNCTION pgqueue._hold_paused(p_queues text[]) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    v_locked text[];
BEGIN
    IF current_setting('transaction_isolation') NOT IN ('read committed', 'read uncommitted') THEN
        RETURN '{}';
    END IF;
    v_locked := ARRAY(SELECT x.queue
                      FROM (SELECT p.queue FROM pgqueue.paused_queues p
                            WHERE p.queue = ANY (p_queues) ORDER BY 1 OFFSET 0) x
                      WHERE pg_try_advisory_xact_lock_shared(pgqueue._lock_class('pause'), hashtext(x.queue)));
    RETURN ARRAY(SELECT p.queue FROM pgqueue.paused_queues p WHERE p.queue = ANY (v_locked) ORDER BY 1);
END
$$;

-- pause_queue and resume_queue read and write with fresh snapshots after
-- taking the queue's lock; under REPEATABLE READ a resume would clear only the
-- flags its first snapshot saw, and leave later ones for good. READ
-- UNCOMMITTED is run as READ COMMITTED by PostgreSQL, so it is accepted.
CREATE FUNCTION pgqueue._check_read_committed(p_function text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('transaction_isolation') NOT IN ('read committed', 'read uncommitted') THEN
        RAISE EXCEPTION 'pgqueue.%: needs READ COMMITTED, the transaction is %', p_function,
            upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
END
$$;

CREATE FUNCTION pgqueue._check_queue_name(p_function text, p_queue text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_queue IS NULL OR btrim(p_queue, E' \t\n\r\f\x0B') = '' OR octet_length(p_queue) > 200 THEN
        RAISE EXCEPTION 'pgqueue.%: queue must be a non-blank string of at most 200 bytes, got %', p_function,
            CASE WHEN p_queue IS NULL THEN 'NULL'
                 WHEN octet_length(p_queue) > 200 THEN octet_length(p_queue) || ' bytes'
                 ELSE quote_literal(p_queue) END
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Several queues paused (or resumed) in one transaction, as `pgqueue pause a b`
-- does: their pause locks first, all of them, in key order, before any row.
-- One by one, the first queue's rows were locked (flagged) while the command
-- waited for the next queue's lock, and an application transaction holding
-- that lock shared (it had enqueued into the paused queue) that then wanted
-- one of those rows deadlocked with it.
CREATE FUNCTION pgqueue._lock_pause(p_queues text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_key int;
BEGIN
    -- In key order, not name order: two names can share a key (hashtext).
    FOR v_key IN SELECT DISTINCT hashtext(q) FROM unnest(p_queues) q WHERE q IS NOT NULL ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(pgqueue._lock_class('pause'), v_key);
    END LOOP;
END
$$;

-- Pausing stops claims, nothing else: jobs are still enqueued into the queue,
-- and its running jobs finish and record their outcomes. The queue's queued
-- jobs are flagged out of the claim index (one write each, once), and so is
-- every job that enters queued while it stays paused (the triggers). A claim
-- reads the paused set with its statement's snapshot, so a claim already under
-- way when pause_queue() commits may still take jobs of the queue; claims that
-- start after it do not. Idempotent: false when the queue was paused already.
CREATE FUNCTION pgqueue.pause_queue(queue text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM pgqueue._check_queue_name('pause_queue', pause_queue.queue);
    PERFORM pgqueue._check_read_committed('pause_queue');
    PERFORM pg_advisory_xact_lock(pgqueue._lock_class('pause'), hashtext(pause_queue.queue));
    INSERT INTO pgqueue.paused_queues (queue) VALUES (pause_queue.queue) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- The flag only keeps the jobs out of the claim index (claims skip a paused
    -- queue by name too), so rows another transaction holds are skipped, not
    -- waited for: waiting, a pause holding the rows it had flagged deadlocked with
    -- a completion holding one and locking another (found by the fuzzer), and with
    -- cancel_pipeline. A job skipped so stays unflagged, and is stepped over by name.
    -- The queue's queued jobs are found through two indexes, not a scan of the whole
    -- table, finished jobs included (13-23 ms at 100,000 rows, seconds with millions; a
    -- scale review): the claim index by queue, and the active scoped jobs for the ones
    -- entered behind another of their scope (flagged too: a resume holds their rows).
    UPDATE pgqueue.jobs j SET queue_paused = true
    WHERE j.id = ANY (ARRAY(SELECT o.id FROM pgqueue.jobs o
                            WHERE o.id IN (SELECT r.id FROM pgqueue.jobs r
                                           WHERE r.queue = pause_queue.queue AND r.state = 'queued'
                                             AND NOT r.scope_blocked AND NOT r.queue_paused
                                           UNION ALL
                                           SELECT b.id FROM pgqueue.jobs b
                                           WHERE b.scope IS NOT NULL AND b.state = 'queued'
                                             AND b.scope_blocked AND NOT b.queue_paused
                                             AND b.queue = pause_queue.queue)
                            ORDER BY o.id FOR NO KEY UPDATE SKIP LOCKED))
      AND j.state = 'queued' AND NOT j.queue_paused;
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgqueue.pause_queue(text) IS
    'Stop handing out jobs of the queue (claim, claim_next, claim_or_wait skip it) until resume_queue(). '
    'Enqueues and running jobs are unaffected. Returns false if it was paused already.';

-- The lock first: every transaction that flagged jobs of the queue (holding
-- the lock shared, see _hold_paused) has committed, so the UPDATE, a later
-- statement, sees and clears all its flags (finished jobs that kept theirs
-- included). Its due jobs became claimable without entering 'queued', so no
-- trigger fires: the queue's workers are notified here, as an enqueue would.
CREATE FUNCTION pgqueue.resume_queue(queue text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM pgqueue._check_queue_name('resume_queue', resume_queue.queue);
    PERFORM pgqueue._check_read_committed('resume_queue');
    PERFORM pg_advisory_xact_lock(pgqueue._lock_class('pause'), hashtext(resume_queue.queue));
    DELETE FROM pgqueue.paused_queues p WHERE p.queue = resume_queue.queue;  -- the trigger clears the flags
    IF NOT FOUND THEN
        -- Not paused; flags left without a pause (none should be) are cleared all the same.
        IF EXISTS (SELECT 1 FROM pgqueue.jobs j WHERE j.queue = resume_queue.queue AND j.queue_paused) THEN
            PERFORM pgqueue._unflag_paused(ARRAY[resume_queue.queue]);
        END IF;
        RETURN false;
    END IF;
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgqueue.resume_queue(text) IS
    'Hand out jobs of a paused queue again, and NOTIFY pgqueue, <queue> so idle workers claim them at once. '
    'Returns false if it was not paused.';

-- Clear the pause flags of the queues' jobs, which are paused no more, and wake
-- their workers: those jobs became claimable without entering 'queued', so no
-- trigger fires. The caller holds the queues' pause locks: every transaction
-- that flagged jobs of them (holding the lock shared, see _hold_paused) has
-- committed, so the UPDATE, a later statement, sees all its flags (finished
-- jobs that kept theirs included).
CREATE FUNCTION pgqueue._unflag_paused(p_queues text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pgqueue.jobs j SET queue_paused = false
    WHERE j.id = ANY (ARRAY(SELECT o.id FROM pgqueue.jobs o
                            WHERE o.queue = ANY (p_queues) AND o.queue_paused
                            ORDER BY o.id FOR NO KEY UPDATE));
    PERFORM pgqueue._notify(p_queues, pgqueue._setting('notify'));
END
$$;

-- A queue leaves pgqueue.paused_queues by resume_queue() or by hand (DELETE,
-- TRUNCATE): either way its jobs' flags go, or they would never be claimed.
-- A hand DELETE takes the queues' pause locks after their rows, which
-- resume_queue takes the other way round: the two at once on one queue may
-- deadlock (40P01, PostgreSQL rolls one back).
CREATE FUNCTION pgqueue._paused_queues_removed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_queues text[];
BEGIN
    -- Its reads after the lock need fresh snapshots (as resume_queue's).
    PERFORM pgqueue._check_read_committed('paused_queues: a queue resumed by hand');
    IF TG_OP = 'TRUNCATE' THEN
        v_queues := ARRAY(SELECT DISTINCT j.queue FROM pgqueue.jobs j WHERE j.queue_paused);
    ELSE
        v_queues := ARRAY(SELECT DISTINCT o.queue FROM removed o);
    END IF;
    PERFORM pgqueue._lock_pause(v_queues);
    v_queues := ARRAY(SELECT q FROM unnest(v_queues) q
                      WHERE NOT EXISTS (SELECT 1 FROM pgqueue.paused_queues p WHERE p.queue = q));
    IF cardinality(v_queues) > 0 THEN
        PERFORM pgqueue._unflag_paused(v_queues);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER paused_queues_deleted AFTER DELETE ON pgqueue.paused_queues
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION pgqueue._paused_queues_removed();
CREATE TRIGGER paused_queues_renamed AFTER UPDATE ON pgqueue.paused_queues
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION pgqueue._paused_queues_removed();
CREATE TRIGGER paused_queues_truncated AFTER TRUNCATE ON pgqueue.paused_queues
    FOR EACH STATEMENT EXECUTE FUNCTION pgqueue._paused_queues_removed();
COMMENT ON TRIGGER paused_queues_deleted ON pgqueue.paused_queues IS
    'A queue no longer paused (resume_queue, or a hand DELETE) has its jobs'' pause flags cleared and its '
    'workers woken; left flagged, they would never be claimed.';
COMMENT ON TRIGGER paused_queues_renamed ON pgqueue.paused_queues IS
    'As paused_queues_deleted, for an UPDATE: a queue no longer named in the table is resumed.';
COMMENT ON TRIGGER paused_queues_truncated ON pgqueue.paused_queues IS
    'As paused_queues_deleted, for TRUNCATE: every flagged job''s queue is resumed.';

-- A job moved to another queue by hand (UPDATE ... SET queue) takes that
-- queue's pause state: a flag kept from a paused queue would hide it from
-- claims in one that is not, for good. pgqueue's functions never set queue:
-- the column list and the WHEN clause (tested in C) keep this off every hot
-- path. AFTER, with a second write of the moved row: any BEFORE UPDATE row
-- trigger makes every UPDATE of the table fetch and lock each row for it
-- first, whatever its column list (~9 % of a drain, measured).
CREATE FUNCTION pgqueue._queue_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pgqueue.jobs j
       SET queue_paused = x.paused
      FROM (SELECT NEW.state = 'queued'
                   AND EXISTS (SELECT 1 FROM pgqueue.paused_queues p WHERE p.queue = NEW.queue)
                   AND cardinality(pgqueue._hold_paused(ARRAY[NEW.queue])) > 0 AS paused) x
     WHERE j.id = NEW.id AND j.queue_paused IS DISTINCT FROM x.paused;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_queue_changed AFTER UPDATE OF queue ON pgqueue.jobs
    FOR EACH ROW
    WHEN (OLD.queue IS DISTINCT FROM NEW.queue)
    EXECUTE FUNCTION pgqueue._queue_changed();
COMMENT ON TRIGGER jobs_queue_changed ON pgqueue.jobs IS
    'A job moved to another queue is flagged paused if and only if that queue is paused.';

-- A limit written by hand (INSERT, UPDATE, DELETE, TRUNCATE of
-- pgqueue.queue_limits) counts as one set by set_queue_limit: claims take the
-- limited path only while _any_queue_limit says some queue has a limit.
CREATE FUNCTION pgqueue._queue_limits_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgqueue._set_any_queue_limit();
    RETURN NULL;
END
$$;
CREATE TRIGGER queue_limits_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgqueue.queue_limits
    FOR EACH STATEMENT EXECUTE FUNCTION pgqueue._queue_limits_changed();
COMMENT ON TRIGGER queue_limits_changed ON pgqueue.queue_limits IS
    'Claims read limits only while some queue has one: any write to the table (set_queue_limit or by hand) '
    'updates that answer.';

-- Replaces _any_queue_limit when its answer changes. That is DDL, which only the
-- owner of the pgqueue functions may run: SECURITY DEFINER, so that any role allowed
-- to write pgqueue.queue_limits sets limits (as the owner, it only makes the constant
-- say what the table holds; a caller cannot make it say anything else). The search
-- path is pinned, as every SECURITY DEFINER function's must be.
CREATE FUNCTION pgqueue._set_any_queue_limit() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_any boolean;
BEGIN
    -- Under a lock of its own (changes of two queues take turns here), read after it:
    -- with a fresh snapshot (under REPEATABLE READ a limit set meanwhile went unseen).
    PERFORM pgqueue._check_read_committed('queue_limits: a limit written by hand');
    PERFORM pg_advisory_xact_lock(pgqueue._lock_class('limits'), 0);
    v_any := EXISTS (SELECT 1 FROM pgqueue.queue_limits);
    IF v_any IS DISTINCT FROM pgqueue._any_queue_limit() THEN
        EXECUTE format('CREATE OR REPLACE FUNCTION pgqueue._any_queue_limit() RETURNS boolean '
                       'LANGUAGE sql IMMUTABLE AS %L', CASE WHEN v_any THEN 'SELECT true' ELSE 'SELECT false' END);
    END IF;
END
$$;

-- A cap on a queue's running jobs across all workers, or none (NULL). Lowering
-- it stops nothing that runs: claims wait until fewer than the new cap run.
-- Raising or removing it wakes the queue's workers, which may have found it full.
CREATE FUNCTION pgqueue.set_queue_limit(queue text, max_running int) RETURNS int
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_was int;
BEGIN
    PERFORM pgqueue._check_queue_name('set_queue_limit', set_queue_limit.queue);
    IF set_queue_limit.max_running < 1 THEN
        RAISE EXCEPTION 'pgqueue.set_queue_limit: max_running must be at least 1 (NULL removes the limit), got %',
            set_queue_limit.max_running USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pgqueue._check_read_committed('set_queue_limit');
    -- The queue's limit lock: two calls take turns (each returns the limit the
    -- other left), and claims of the queue under way finish first.
    PERFORM pg_advisory_xact_lock(pgqueue._lock_class('limit'), hashtext(set_queue_limit.queue));
    SELECT l.max_running INTO v_was FROM pgqueue.queue_limits l WHERE l.queue = set_queue_limit.queue FOR UPDATE;
    IF set_queue_limit.max_running IS NULL THEN
        DELETE FROM pgqueue.queue_limits l WHERE l.queue = set_queue_limit.queue;
    ELSE
        INSERT INTO pgqueue.queue_limits AS l (queue, max_running)
        VALUES (set_queue_limit.queue, set_queue_limit.max_running)
        ON CONFLICT (queue) DO UPDATE SET max_running = EXCLUDED.max_running;
    END IF;
    IF v_was < coalesce(set_queue_limit.max_running, 2147483647) THEN
        PERFORM pgqueue._notify(ARRAY[set_queue_limit.queue], pgqueue._setting('notify'));
    END IF;
    -- (The table's trigger updates _any_queue_limit.)
    RETURN v_was;
END
$$;
COMMENT ON FUNCTION pgqueue.set_queue_limit(text, int) IS
    'Let at most max_running jobs of the queue run at once, across all workers (NULL: no limit). Jobs running '
    'past a lowered limit finish; claims take more once fewer run. Returns the previous limit, NULL if none.';
