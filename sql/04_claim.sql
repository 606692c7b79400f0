-- =============================================================================
-- pgqueue: claiming
-- Scope serialisation: a SKIP LOCKED scan cannot skip a unique-index wait
-- (pitfalls E4), so scoped claims also take a per-scope transaction advisory
-- lock (try-lock in the scanner, so busy scopes are skipped, never waited on)
-- and re-check the scope in a later statement whose fresh snapshot sees every
-- claim that committed before the lock was granted (E8). The unique indexes on
-- is_current and on running-per-scope stay as backstops. Functions assume READ
-- COMMITTED (the default); under REPEATABLE READ a lost race raises 40001.
-- =============================================================================

-- (_scope_lock_key, the key of a scope's locks, is in 03_enqueue.sql: enqueue reads it.)

-- A job whose turn it is in its scope: unscoped, or no job of its scope running
-- and none older queued. A view, not a SQL function: one with sub-selects is
-- not inlined, and its call cost more than its two index probes; a view is
-- inlined into each query that reads it. Two probes, not one OR: each is a
-- single index lookup, where the OR planned as a bitmap of two indexes. A
-- running scoped job is always its scope's current job (the claim sets both in
-- one UPDATE, and only a claim of the next job clears the flag), so the first
-- probe reads the current job through the current-per-scope index and tests
-- its state outside the lookup: a lookup by state = 'running' was, with stale
-- statistics, planned over the lease index, i.e. every running job of every
-- worker for every candidate. claim() and claim_next's re-check under the
-- scope locks read it by id (through the primary key: no state test here,
-- which would let the planner read a whole ready index for the ids).
CREATE VIEW pgqueue._scope_turn AS
SELECT j.id, j.queue, j.scope, j.priority, j.run_after, j.state, j.scope_blocked, j.queue_paused
FROM pgqueue.jobs j
WHERE j.scope IS NULL
   OR (coalesce((SELECT o.state FROM pgqueue.jobs o
                 WHERE o.is_current AND pgqueue._same_scope(o.scope, j.scope)
                 LIMIT 1), '') <> 'running'
       AND NOT EXISTS (SELECT 1 FROM pgqueue.jobs o
                       WHERE pgqueue._same_scope(o.scope, j.scope)
                         AND o.state = 'queued' AND o.id < j.id));
COMMENT ON VIEW pgqueue._scope_turn IS
    'Internal: jobs whose turn it is in their scope (unscoped, or none of the scope running and none older queued).';

-- A queued job a claim may take now, but for run_after, locks and limits: its
-- scope's turn, not blocked, not in a paused queue. claim_next's picks read it,
-- through whichever ready index their queues call for; FOR UPDATE through it
-- locks the jobs row.
CREATE VIEW pgqueue._claimable AS
SELECT t.id, t.queue, t.scope, t.priority, t.run_after FROM pgqueue._scope_turn t
WHERE t.state = 'queued' AND NOT t.scope_blocked AND NOT t.queue_paused;
COMMENT ON VIEW pgqueue._claimable IS
    'Internal: queued jobs a claim may take (scope head, scope idle, queue not paused); claim_next picks from it.';

-- Scope heads. A queued scoped job that is not its scope's next job is kept
-- out of the claim index (jobs.scope_blocked), so claims never walk the
-- backlog of busy scopes. Safety never depends on the flag (claims re-check
-- the scope under its lock); liveness does: a blocked job must be unblocked
-- once it is its scope's oldest queued job and nothing of the scope runs.
-- Every transition that can make that happen (the scope's running job
-- finishes, fails or is requeued; a queued job is cancelled) unblocks the
-- scope's next queued job (_unblock_next). Enqueue decides "blocked" by
-- looking for an older active job of the scope (_behind_older), so it must
-- not miss such a transition that commits meanwhile: it
-- holds the scope's order lock shared, the transitions take it exclusively
-- before they lock any row, and both look in a statement after the lock.
-- Enqueues never wait for each other; a transition waits for enqueues of its
-- scope in flight, and they for it.
-- The scopes' order-lock keys, distinct and in the one order every transaction
-- takes them (two transitions never deadlock on each other).
CREATE FUNCTION pgqueue._scope_order_keys(p_scopes jsonb[]) RETURNS SETOF int
LANGUAGE sql IMMUTABLE AS $$
    SELECT DISTINCT pgqueue._scope_lock_key(s) FROM unnest(p_scopes) s
    WHERE s IS NOT NULL AND s <> 'null' ORDER BY 1
$$;

-- Returns the lock keys it did not take. A call does not wait for a busy
-- scope's lock while its transaction holds the lock of a scope after it in key
-- order (an earlier call of the same transaction: an application enqueueing
-- scopes B, then A): a transition taking its scopes in key order may hold A's
-- and want B's, now or a moment later (one just granted A's has not asked for
-- B's yet, so pg_locks cannot tell). Waiting then was a deadlock (40P01, one of
-- the two rolled back). The caller enters that scope's jobs unblocked instead,
-- as it does under REPEATABLE READ (always safe; claims step over such a job
-- until its turn). The call's own locks are taken in key order, each tried
-- first, so a single call never skips (one that took every free lock first, the
-- later ones too, then skipped the busy one, entered thousands of jobs
-- unblocked for nothing); pg_locks is read only for a busy lock.
CREATE FUNCTION pgqueue._share_scope_order(p_scopes jsonb[]) RETURNS int[]
LANGUAGE plpgsql AS $$
DECLARE
    v_class int := pgqueue._lock_class('scope_order');
    v_key int;
    v_keys int[];
    v_skipped int[] := '{}';
BEGIN
    -- One scope, free (what enqueue() nearly always meets): no loop.
    IF cardinality(p_scopes) = 1 AND p_scopes[1] <> 'null'
       AND pg_try_advisory_xact_lock_shared(v_class, pgqueue._scope_lock_key(p_scopes[1])) THEN
        RETURN v_skipped;
    END IF;
    v_keys := ARRAY(SELECT k FROM pgqueue._scope_order_keys(p_scopes) k);
    -- A lock per scope: a batch of 15,000 scopes ran the server's lock table out ("out of
    -- shared memory", for other sessions too while it ran; a scale review). Past a
    -- thousand none is taken, and the jobs are entered unblocked (safe, as above).
    IF cardinality(v_keys) > 1000 THEN
        RETURN v_keys;
    END IF;
    FOREACH v_key IN ARRAY v_keys LOOP
        CONTINUE WHEN pg_try_advisory_xact_lock_shared(v_class, v_key);
        IF EXISTS (SELECT 1 FROM pg_locks l
                   WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted
                     AND l.objsubid = 2 AND l.classid = v_class::oid
                     -- objid is the int4 key as an oid: negative keys read from 2^31 up
                     AND l.objid::bigint - CASE WHEN l.objid::bigint > 2147483647 THEN 4294967296 ELSE 0 END
                         > v_key) THEN
            v_skipped := v_skipped || v_key;
        ELSE
            PERFORM pg_advisory_xact_lock_shared(v_class, v_key);
        END IF;
    END LOOP;
    RETURN v_skipped;
END
$$;

-- The transitions' side needs READ COMMITTED: the statement after the lock must
-- see a job an enqueue entered blocked and committed while the lock was waited
-- for, and under REPEATABLE READ or SERIALIZABLE the snapshot can predate it:
-- the job would stay blocked for good, silently. Refused instead.
CREATE FUNCTION pgqueue._lock_scope_order(p_scopes jsonb[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(p_scopes) > 0
       AND current_setting('transaction_isolation') NOT IN ('read committed', 'read uncommitted') THEN
        RAISE EXCEPTION 'pgqueue: a transition of a scoped job needs READ COMMITTED, the transaction is %',
            upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'invalid_transaction_state',
                  HINT = 'Under a later snapshot, a job of the scope enqueued meanwhile would stay blocked.';
    END IF;
    PERFORM pg_advisory_xact_lock(pgqueue._lock_class('scope_order'), k) FROM pgqueue._scope_order_keys(p_scopes) k;
END
$$;

-- A job (p_after[i]) of each scope (p_scopes[i]) stopped being active: unblock
-- the scope's first queued job after it, and NOTIFY the queues of those jobs,
-- blocked or not (the scope is free for its next job now, which is claimable
-- although nothing entered 'queued'). Why "after it"
-- suffices: a job is entered blocked only behind an older active job of its
-- scope, so a blocked job always has an active job with a smaller id; when the
-- scope's oldest queued job is blocked, that older active job can only be the
-- running one, i.e. the job that stops now. Looking after it, not from the
-- scope's first id, also skips the index entries every finished job of the
-- scope left behind. The caller holds the scopes' order locks from before this
-- statement (_lock_scope_order), so it sees every job entered blocked before.
CREATE FUNCTION pgqueue._unblock_next(p_scopes jsonb[], p_after bigint[]) RETURNS void
LANGUAGE plpgsql
-- The unblocking UPDATE reads jobs_pkey for its array of ids, which a btree
-- walks in key order: the rows are locked in id order, as an enqueue share-locks
-- its dependencies. Joined to the heads instead, it locked them in the order of
-- their scopes' hashes, and an enqueue depending on two of them deadlocked with
-- it. Its only condition is the ids: no partial index (a user's on
-- scope_blocked, say) can serve it in another order.
-- No JIT: see _complete (a disabled path's cost would pass jit_above_cost).
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
AS $$
DECLARE
    v_queues text[];
BEGIN
    WITH ended AS (
        SELECT u.scope, min(u.after) AS after FROM unnest(p_scopes, p_after) u(scope, after)
        WHERE u.scope IS NOT NULL GROUP BY u.scope
    ), heads AS (
        SELECT h.id, h.queue, h.scope_blocked
        FROM ended s
        CROSS JOIN LATERAL (SELECT q.id, q.queue, q.scope_blocked FROM pgqueue.jobs q
                            WHERE pgqueue._same_scope(q.scope, s.scope)
                              AND q.state = 'queued' AND q.id > s.after
                            ORDER BY jsonb_hash(q.scope), q.id LIMIT 1) h
    ), unblocked AS (
        UPDATE pgqueue.jobs j SET scope_blocked = false
        WHERE j.id = ANY (ARRAY(SELECT h.id FROM heads h WHERE h.scope_blocked))
    ), older AS (
        -- A queued job older than the one that ended (retried, queued by fan-in,
        -- or enqueued out of id order while a newer one ran) is never blocked,
        -- but it became claimable now too: its queue is woken as well.
        SELECT o.queue
        FROM ended s
        CROSS JOIN LATERAL (SELECT q.queue FROM pgqueue.jobs q
                            WHERE pgqueue._same_scope(q.scope, s.scope)
                              AND q.state = 'queued' AND q.id < s.after
                            ORDER BY jsonb_hash(q.scope), q.id LIMIT 1) o
    )
    SELECT array_agg(DISTINCT x.queue) INTO v_queues
    FROM (SELECT h.queue FROM heads h UNION ALL SELECT o.queue FROM older o) x;
    -- A paused queue's job wakes nobody (no claim could take it), but only a pause
    -- this transaction holds the lock of (_hold_paused, a later statement) stays
    -- paused until it commits: a resume under way, or one that committed after
    -- this transaction's last snapshot, has notified before this job was free.
    IF v_queues IS NOT NULL AND EXISTS (SELECT 1 FROM pgqueue.paused_queues) THEN
        v_queues := ARRAY(SELECT q FROM unnest(v_queues) q WHERE q <> ALL (pgqueue._hold_paused(v_queues)));
    END IF;
    PERFORM pgqueue._notify(v_queues, pgqueue._setting('notify'));
END
$$;

-- Whether any queue has a limit, as a constant: claim_next's one-statement
-- path asks it on every call, and reading pgqueue.queue_limits there cost an
-- idle worker's pickup 65-85 us (a relation opened on a cold backend), where
-- this is folded into the cached plan. set_queue_limit replaces it when the
-- answer changes, which invalidates every session's plans that used it. A later
-- revision that redefines it keeps its answer (SELECT EXISTS over queue_limits).
CREATE FUNCTION pgqueue._any_queue_limit() RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT false $$;

-- Whether a job of p_queue may start now: true for a queue without a limit;
-- for a limited one, its limit lock is taken (to commit: a claim waits for the
-- one before it) and its running jobs are counted in a snapshot taken after
-- the lock, which sees every claim that held it before. The caller holds the
-- rows it writes already (rows before limit locks, in every claim). False
-- under REPEATABLE READ (its snapshot may predate such a claim), and when the
-- lock is taken in a transaction that may only try it (see claim_or_wait).
CREATE FUNCTION pgqueue._limit_room(p_queue text) RETURNS boolean
LANGUAGE plpgsql
-- No JIT, as in _complete: claim() calls this with the session's own setting.
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
AS $$
BEGIN
    PERFORM 1 FROM pgqueue.queue_limits l WHERE l.queue = p_queue;
    IF NOT FOUND THEN
        RETURN true;
    END IF;
    IF current_setting('transaction_isolation') IN ('repeatable read', 'serializable') THEN
        RETURN false;
    END IF;
    IF coalesce(current_setting('pgqueue.claim_waits', true), '') = 'never' THEN
        IF NOT pg_try_advisory_xact_lock(pgqueue._lock_class('limit'), hashtext(p_queue)) THEN
            RETURN false;
        END IF;
    ELSE
        PERFORM pg_advisory_xact_lock(pgqueue._lock_class('limit'), hashtext(p_queue));
    END IF;
    RETURN (SELECT count(*) FROM pgqueue.jobs r WHERE r.state = 'running' AND r.queue = p_queue)
         < (SELECT l.max_running FROM pgqueue.queue_limits l WHERE l.queue = p_queue);
END
$$;

CREATE FUNCTION pgqueue.claim(job_id bigint, worker text) RETURNS SETOF pgqueue.jobs
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_scope jsonb;
    v_queue text;
    v_limited boolean;
BEGIN
    IF worker IS NULL OR worker = '' OR octet_length(worker) > 200 THEN
        RAISE EXCEPTION 'pgqueue.claim: worker must be a non-empty string of at most 200 bytes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT j.scope, j.queue INTO v_scope, v_queue FROM pgqueue.jobs j
    WHERE j.id = claim.job_id AND j.state = 'queued' AND j.run_after <= now()
      AND NOT EXISTS (SELECT 1 FROM pgqueue.paused_queues p WHERE p.queue = j.queue);
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_scope IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(pgqueue._lock_class('scope'), pgqueue._scope_lock_key(v_scope));
    END IF;
    v_limited := pgqueue._any_queue_limit() AND EXISTS (SELECT 1 FROM pgqueue.queue_limits l WHERE l.queue = v_queue);
    IF v_scope IS NOT NULL OR v_limited THEN
        -- New statements, new snapshot: every claim of this scope that committed
        -- before we got the lock is visible from here on.
        PERFORM 1 FROM pgqueue.jobs j
        WHERE j.id = claim.job_id AND j.state = 'queued' AND j.run_after <= now()
        FOR NO KEY UPDATE;
        IF NOT FOUND
           OR (v_scope IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pgqueue._scope_turn t WHERE t.id = claim.job_id)) THEN
            RETURN;
        END IF;
    END IF;
    IF v_limited THEN
        -- The rows it writes before the limit lock, as claim_next takes them: a
        -- claim holding a limit lock waits for nothing.
        IF v_scope IS NOT NULL THEN
            PERFORM 1 FROM pgqueue.jobs o WHERE o.is_current AND pgqueue._same_scope(o.scope, v_scope)
            FOR NO KEY UPDATE;
        END IF;
        IF NOT pgqueue._limit_room(v_queue) THEN
            RETURN;
        END IF;
    END IF;
    IF v_scope IS NOT NULL THEN
        -- Clear the previous current job first: a single UPDATE that swaps the
        -- flag trips the unique index or not depending on row order (E14).
        UPDATE pgqueue.jobs o SET is_current = false
        WHERE o.is_current AND pgqueue._same_scope(o.scope, v_scope);
    END IF;
    RETURN QUERY
    UPDATE pgqueue.jobs j
       SET state = 'running', is_current = (j.scope IS NOT NULL), scope_blocked = false, locked_by = claim.worker,
           locked_at = now(), started_at = coalesce(j.started_at, now()), attempts = j.attempts + 1
     WHERE j.id = claim.job_id AND j.state = 'queued' AND j.run_after <= now()
    RETURNING j.*;
END
$$;
COMMENT ON FUNCTION pgqueue.claim(bigint, text) IS
    'Claim a known job by id for worker: a conditional UPDATE that returns the running row, or no row if the '
    'job is not queued, not due, in a paused queue or a full limited one, or its scope is busy. Never raises for a lost race. Sets state, is_current, '
    'locked_by, locked_at, started_at (first claim only) and attempts together.';

CREATE FUNCTION pgqueue.claim_next(worker text, queues text[] DEFAULT NULL, batch_size int DEFAULT 1)
RETURNS SETOF pgqueue.jobs
LANGUAGE plpgsql
-- Queue tables change faster than ANALYZE runs: with stale statistics the
-- planner would bitmap-scan and sort every queued job instead of reading the
-- ready index in claim order and stopping at batch_size.
-- Generic plans, planned once per session: left to choose, the plan cache
-- re-planned the claim on every call (a generic LIMIT $n is estimated at a
-- tenth of the table, so the custom plan always looked cheaper), and planning
-- was a third of a one-job claim. Every statement below is written so that its
-- generic plan is the custom one: the updates find their rows by id array on
-- the primary key, never by a join the planner could turn into a scan. No JIT:
-- the generic estimates pass jit_above_cost on a large queue, and compiling
-- (per execution, never cached) took 20 ms of a 1 ms claim.
SET enable_seqscan = off SET enable_bitmapscan = off SET plan_cache_mode = force_generic_plan SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_ids bigint[];
    v_scoped boolean;
    v_picked bigint[];
    -- No defaults: the one-statement path below uses none of these, and every
    -- default is an expression evaluated on every call.
    v_seen bigint[];
    v_limited text[];
    v_full text[];
    v_filled text[];
    v_busy text[];
    v_try_only boolean;
    v_kept bigint[];
    v_left int;
    v_holds_limit boolean;
    v_quota_queues text[];
    v_quotas int[];
    v_picked_queues text[];
    v_short text[];
BEGIN
    IF worker IS NULL OR worker = '' OR octet_length(worker) > 200 THEN
        RAISE EXCEPTION 'pgqueue.claim_next: worker must be a non-empty string of at most 200 bytes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'pgqueue.claim_next: batch_size must be >= 1, got %', batch_size
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- No scoped job is queued or running (one probe of an index that holds only
    -- those) and none of these queues is limited: pick and claim in one
    -- statement, a third cheaper than the general path below. A scoped job
    -- committed after this check is not picked; the next claim takes it (its
    -- own NOTIFY wakes the workers).
    IF NOT EXISTS (SELECT 1 FROM pgqueue.jobs j
                   WHERE j.scope IS NOT NULL AND j.state IN ('queued', 'running'))
       AND (NOT pgqueue._any_queue_limit()
            OR NOT EXISTS (SELECT 1 FROM pgqueue.queue_limits l
                           WHERE claim_next.queues IS NULL OR l.queue = ANY (claim_next.queues))) THEN
        -- One queue: its part of jobs_ready_in_queue, whatever other queues hold.
        -- Several: their parts of it, below. Every queue: jobs_ready, in claim
        -- order. Separate statements, not one with an arm for each case: starting
        -- the arm a call does not run cost a one-job claim ~2 %.
        IF cardinality(claim_next.queues) = 1 THEN
            RETURN QUERY
            WITH picked AS (
                SELECT j.id FROM pgqueue.jobs j
                WHERE j.queue = (SELECT q FROM unnest(claim_next.queues) q)
                  AND j.state = 'queued' AND NOT j.scope_blocked AND NOT j.queue_paused AND j.run_after <= now()
                  AND j.scope IS NULL
                  AND j.queue <> ALL (ARRAY(SELECT p.queue FROM pgqueue.paused_queues p))
                ORDER BY j.priority DESC, j.run_after, j.id
                LIMIT claim_next.batch_size
                FOR NO KEY UPDATE OF j SKIP LOCKED
            ), claimed AS (
                UPDATE pgqueue.jobs j
                   SET state = 'running', is_current = false, locked_by = claim_next.worker,
                       locked_at = now(), started_at = coalesce(j.started_at, now()), attempts = j.attempts + 1
                 WHERE j.id = ANY (ARRAY(SELECT p.id FROM picked p))
                RETURNING j.*
            )
            SELECT * FROM claimed c ORDER BY c.priority DESC, c.run_after, c.id;
            RETURN;
        END IF;
        -- Several queues: how many jobs to take from each (a quota) from their first
        -- due jobs merged in claim order, read unlocked through jobs_ready_in_queue;
        -- then each queue's first free jobs, as many as its quota, FOR NO KEY UPDATE
        -- SKIP LOCKED. Through jobs_ready (claim order, no queue) the claim stepped
        -- over every due job of other queues ahead of its own, a heap fetch each.
        -- Why quotas: locking in the merge itself would lock up to batch_size jobs
        -- of every queue only to leave most (a claimer that skipped those could
        -- sleep while they are free again: no NOTIFY comes for them); locking the
        -- merged candidates by id made every concurrent claimer contend for the
        -- same few rows, round after round. A queue's scan skips what other claims
        -- hold and takes the next free jobs, as a scan of jobs_ready did. A queue
        -- with fewer free jobs than its quota is left out of a further round that
        -- fills the batch up from the others (at most one round per queue). The
        -- quotas are a hint, so their read leaves out the scope test (a heap
        -- fetch per job, where the index alone can serve it); the scans test it.
        IF cardinality(claim_next.queues) > 1 THEN
            v_full := '{}';
            v_left := batch_size;
            LOOP
                WITH quota AS (
                    SELECT c.queue AS name, count(*)::int AS n
                    FROM (SELECT c.queue
                          FROM (SELECT DISTINCT q.name FROM unnest(claim_next.queues) q(name)
                                WHERE q.name <> ALL (ARRAY(SELECT p.queue FROM pgqueue.paused_queues p))
                                  AND q.name <> ALL (v_full)) q
                          CROSS JOIN LATERAL (
                              SELECT j.queue, j.priority, j.run_after, j.id FROM pgqueue.jobs j
                              WHERE j.queue = q.name
                                AND j.state = 'queued' AND NOT j.scope_blocked AND NOT j.queue_paused
                                AND j.run_after <= now()
                              ORDER BY j.priority DESC, j.run_after, j.id
                              LIMIT v_left) c
                          ORDER BY c.priority DESC, c.run_after, c.id
                          LIMIT v_left) c
                    GROUP BY c.queue
                ), picked AS (
                    SELECT q.name, l.id
                    FROM quota q
                    CROSS JOIN LATERAL (
                        SELECT j.id FROM pgqueue.jobs j
                        WHERE j.queue = q.name
                          AND j.state = 'queued' AND NOT j.scope_blocked AND NOT j.queue_paused
                          AND j.run_after <= now() AND j.scope IS NULL
                        ORDER BY j.priority DESC, j.run_after, j.id
                        LIMIT q.n
                        FOR NO KEY UPDATE OF j SKIP LOCKED) l
                )
                SELECT ARRAY(SELECT p.id FROM picked p),
                       ARRAY(SELECT q.name FROM quota q
                             WHERE q.n > (SELECT count(*) FROM picked p WHERE p.name = q.name))
                  INTO v_ids, v_short;
                IF v_ids <> '{}' THEN
                    RETURN QUERY
                    WITH claimed AS (
                        UPDATE pgqueue.jobs j
                           SET state = 'running', is_current = false, locked_by = claim_next.worker,
                               locked_at = now(), started_at = coalesce(j.started_at, now()), attempts = j.attempts + 1
                         WHERE j.id = ANY (v_ids)
                        RETURNING j.*
                    )
                    SELECT * FROM claimed c ORDER BY c.priority DESC, c.run_after, c.id;
                    v_left := v_left - cardinality(v_ids);
                END IF;
                EXIT WHEN v_left = 0 OR v_short = '{}';
                v_full := v_full || v_short;
            END LOOP;
            RETURN;
        END IF;
        RETURN QUERY
        WITH picked AS (
            SELECT j.id FROM pgqueue.jobs j
            WHERE j.state = 'queued' AND NOT j.scope_blocked AND NOT j.queue_paused AND j.run_after <= now() AND j.scope IS NULL
              AND claim_next.queues IS NULL
              AND j.queue <> ALL (ARRAY(SELECT p.queue FROM pgqueue.paused_queues p))
            ORDER BY j.priority DESC, j.run_after, j.id
            LIMIT claim_next.batch_size
            FOR NO KEY UPDATE OF j SKIP LOCKED
        ), claimed AS (
            UPDATE pgqueue.jobs j
               SET state = 'running', is_current = false, locked_by = claim_next.worker,
                   locked_at = now(), started_at = coalesce(j.started_at, now()), attempts = j.attempts + 1
             WHERE j.id = ANY (ARRAY(SELECT p.id FROM picked p))
            RETURNING j.*
        )
        SELECT * FROM claimed c ORDER BY c.priority DESC, c.run_after, c.id;
        RETURN;
    END IF;

    v_seen := '{}';
    v_full := '{}';
    v_left := batch_size;
    v_holds_limit := false;
    -- Limited queues: the ones full in this snapshot are left out of the pick
    -- (a hint: the count that decides is taken under the limit lock below), in
    -- one pass over the running jobs. Under REPEATABLE READ no later snapshot
    -- exists, so none of their jobs is taken: a count from the transaction's
    -- first snapshot could hand out a place another worker took since.
    -- _any_queue_limit() folds to a constant: while no queue has a limit (the
    -- one-statement path relies on it too) the table is not read at all.
    IF pgqueue._any_queue_limit() THEN
        v_limited := ARRAY(SELECT l.queue FROM pgqueue.queue_limits l
                           WHERE claim_next.queues IS NULL OR l.queue = ANY (claim_next.queues));
    ELSE
        v_limited := '{}';
    END IF;
    IF v_limited <> '{}' THEN
        IF current_setting('transaction_isolation') IN ('repeatable read', 'serializable') THEN
            v_full := v_limited;
        ELSE
            v_full := ARRAY(
                SELECT l.queue FROM pgqueue.queue_limits l
                LEFT JOIN (SELECT r.queue, count(*) AS running FROM pgqueue.jobs r
                           WHERE r.state = 'running' AND r.queue = ANY (v_limited)
                           GROUP BY r.queue) r ON r.queue = l.queue
                WHERE l.queue = ANY (v_limited) AND l.max_running <= coalesce(r.running, 0));
        END IF;
        -- Every queue of this claim full: nothing to pick (and no backlog of theirs to step over).
        IF claim_next.queues <@ v_full THEN
            RETURN;
        END IF;
    END IF;

    -- A transaction that holds the 'waiters' lock (claim_or_wait) waits for no
    -- lock of its claims, not a limit lock, not a row: while it holds it every
    -- producer notifies without looking, and other workers going to sleep wait.
    v_try_only := coalesce(current_setting('pgqueue.claim_waits', true), '') = 'never';

    -- Rounds: one, unless a limited queue's places ran out under the jobs picked
    -- for it; then the batch is filled up from the other queues, without it.
    LOOP
        IF cardinality(claim_next.queues) > 1 THEN
            -- Several queues: each one's quota, as in the one-statement path (here
            -- through _claimable, without the rows earlier rounds locked).
            SELECT array_agg(c.queue), array_agg(c.n) INTO v_quota_queues, v_quotas
            FROM (SELECT c.queue, count(*)::int AS n
                  FROM (SELECT c.queue
                        FROM (SELECT DISTINCT q.name FROM unnest(claim_next.queues) q(name)
                              WHERE q.name <> ALL (ARRAY(SELECT p.queue FROM pgqueue.paused_queues p))
                                AND q.name <> ALL (v_full)) q
                        CROSS JOIN LATERAL (
                            SELECT j.queue, j.priority, j.run_after, j.id FROM pgqueue._claimable j
                            WHERE j.queue = q.name AND j.run_after <= now() AND j.id <> ALL (v_seen)
                            ORDER BY j.priority DESC, j.run_after, j.id
                            LIMIT v_left) c
                        ORDER BY c.priority DESC, c.run_after, c.id
                        LIMIT v_left) c
                  GROUP BY c.queue) c;
            EXIT WHEN v_quota_queues IS NULL;
        END IF;
        -- Pick: due jobs in claim order, only the head of each scope, row-locked,
        -- skipping rows other claimers hold; a scoped pick also needs its scope's
        -- try-lock, so a scope another transaction is claiming is skipped.
        SELECT array_agg(c.id) FILTER (WHERE c.free), bool_or(c.scope IS NOT NULL AND c.free), array_agg(c.id),
               array_agg(c.queue)
          INTO v_ids, v_scoped, v_picked, v_picked_queues
        FROM (
            SELECT p.id, p.scope, p.queue,
                   p.scope IS NULL
                   OR pg_try_advisory_xact_lock(pgqueue._lock_class('scope'), pgqueue._scope_lock_key(p.scope)) AS free
            FROM (
                -- As in the fast path: every queue through jobs_ready, one through
                -- jobs_ready_in_queue, several by their quotas.
                SELECT a.id, a.scope, a.queue FROM (
                    SELECT j.id, j.scope, j.queue FROM pgqueue._claimable j
                    WHERE claim_next.queues IS NULL
                      AND j.run_after <= now()
                      -- Paused queues' jobs are flagged out of jobs_ready; the few an enqueue under
                      -- way at the pause left unflagged are skipped by name (an InitPlan, once per call).
                      AND j.queue <> ALL (ARRAY(SELECT p.queue FROM pgqueue.paused_queues p))
                      AND j.queue <> ALL (v_full)
                      -- rows an earlier round locked and did not claim (FOR UPDATE does not skip our own)
                      AND j.id <> ALL (v_seen)
                    ORDER BY j.priority DESC, j.run_after, j.id
                    LIMIT v_left
                    FOR NO KEY UPDATE OF j SKIP LOCKED) a
                UNION ALL
                SELECT b.id, b.scope, b.queue FROM (
                    SELECT j.id, j.scope, j.queue FROM pgqueue._claimable j
                    WHERE cardinality(claim_next.queues) = 1
                      AND j.queue = (SELECT q FROM unnest(claim_next.queues) q)
                      AND j.run_after <= now()
                      AND j.queue <> ALL (ARRAY(SELECT p.queue FROM pgqueue.paused_queues p))
                      AND j.queue <> ALL (v_full)
                      AND j.id <> ALL (v_seen)
                    ORDER BY j.priority DESC, j.run_after, j.id
                    LIMIT v_left
                    FOR NO KEY UPDATE OF j SKIP LOCKED) b
                UNION ALL
                SELECT m.id, m.scope, m.queue
                FROM unnest(v_quota_queues, v_quotas) q(name, n)
                CROSS JOIN LATERAL (
                    SELECT j.id, j.scope, j.queue FROM pgqueue._claimable j
                    WHERE cardinality(claim_next.queues) > 1
                      AND j.queue = q.name AND j.run_after <= now() AND j.id <> ALL (v_seen)
                    ORDER BY j.priority DESC, j.run_after, j.id
                    LIMIT q.n
                    FOR NO KEY UPDATE OF j SKIP LOCKED) m
            ) p
        ) c;
        v_seen := v_seen || v_picked;
        -- Several queues: those with fewer free jobs than their quota; the batch is
        -- filled up from the others in a further round.
        IF cardinality(claim_next.queues) > 1 THEN
            v_short := ARRAY(SELECT x.name FROM unnest(v_quota_queues, v_quotas) x(name, n)
                             WHERE x.n > (SELECT count(*) FROM unnest(v_picked_queues) y(name) WHERE y.name = x.name));
            IF v_ids IS NULL AND v_short <> '{}' THEN
                v_full := v_full || v_short;
                CONTINUE;
            END IF;
        END IF;
        EXIT WHEN v_ids IS NULL;

        IF v_scoped THEN
            -- Re-check with a snapshot taken after the scope locks were granted (the
            -- rows are ours: only their scopes' other jobs can have changed).
            SELECT array_agg(t.id) INTO v_ids FROM pgqueue._scope_turn t WHERE t.id = ANY (v_ids);
            EXIT WHEN v_ids IS NULL;
        END IF;

        -- Every row this claim will write is locked before any limit lock: the
        -- picks are, and so are the previous current jobs of their scopes (the
        -- update below clears their flag). A claim that holds a limit lock then
        -- waits for nothing, so no cycle runs through the limit locks. A round
        -- after one that took a limit lock or claimed rows, and claim_or_wait (the
        -- 'waiters' lock), skip a current row another transaction holds, leave its
        -- scope's pick, and announce its queue (a plain claim will wait for that
        -- row). Waiting there while holding the rows an earlier round claimed
        -- takes two scopes' current rows out of id order, which deadlocked with
        -- share-lockers of both (retry, enqueue with depends_on); a round after
        -- one that claimed nothing waits, as a first round does.
        IF v_scoped AND (v_holds_limit OR v_try_only OR v_left < batch_size) THEN
            SELECT array_agg(j.id) FILTER (WHERE x.free), array_agg(DISTINCT j.queue) FILTER (WHERE NOT x.free)
              INTO v_kept, v_busy
            FROM pgqueue.jobs j
            CROSS JOIN LATERAL (
                SELECT j.scope IS NULL
                       OR NOT EXISTS (SELECT 1 FROM pgqueue.jobs o
                                      WHERE o.is_current AND pgqueue._same_scope(o.scope, j.scope))
                       OR EXISTS (SELECT 1 FROM (SELECT o.id FROM pgqueue.jobs o
                                                 WHERE o.is_current AND pgqueue._same_scope(o.scope, j.scope)
                                                 FOR NO KEY UPDATE SKIP LOCKED) l) AS free) x
            WHERE j.id = ANY (v_ids);
            IF v_busy IS NOT NULL THEN
                PERFORM pg_notify('pgqueue', q) FROM unnest(v_busy) q;
            END IF;
            v_ids := v_kept;
            EXIT WHEN v_ids IS NULL;
        ELSIF v_scoped AND v_limited <> '{}' THEN
            PERFORM 1 FROM pgqueue.jobs o
            WHERE o.is_current
              AND jsonb_hash(o.scope) = ANY (ARRAY(SELECT jsonb_hash(j.scope) FROM pgqueue.jobs j
                                                   WHERE j.id = ANY (v_ids) AND j.scope IS NOT NULL))
              AND o.scope = ANY (ARRAY(SELECT j.scope FROM pgqueue.jobs j
                                       WHERE j.id = ANY (v_ids) AND j.scope IS NOT NULL))
            ORDER BY o.id
            FOR NO KEY UPDATE;
        END IF;

        v_filled := '{}';
        IF v_limited <> '{}' THEN
            -- The picked rows' limited queues: their limit locks, in key order, until
            -- this claim holds one (not "in the first round": a round of several
            -- queues may take none). After that, and under claim_or_wait's 'waiters'
            -- lock, it only tries, and a queue whose lock another claim holds
            -- counts as full for this one; it is notified when this claim commits, so
            -- its workers claim again then (waiting for the lock: nothing is lost).
            SELECT coalesce(array_agg(x.queue) FILTER (WHERE NOT x.got), '{}'), v_holds_limit OR coalesce(bool_or(x.got), false)
              INTO v_busy, v_holds_limit
            FROM (SELECT y.queue,
                         CASE WHEN NOT v_holds_limit AND NOT v_try_only
                              THEN pg_advisory_xact_lock(pgqueue._lock_class('limit'), hashtext(y.queue)) IS NOT NULL
                              ELSE pg_try_advisory_xact_lock(pgqueue._lock_class('limit'), hashtext(y.queue)) END AS got
                  FROM (SELECT DISTINCT hashtext(j.queue) AS key, j.queue FROM pgqueue.jobs j
                        WHERE j.id = ANY (v_ids) AND j.queue = ANY (v_limited)
                        ORDER BY 1, 2) y) x;
            IF v_busy <> '{}' THEN
                PERFORM pg_notify('pgqueue', q) FROM unnest(v_busy) q;
            END IF;
            -- A later statement, a snapshot taken after the locks were granted: the
            -- places left, counted with every claim that held them before; a queue's
            -- jobs past its places stay queued (and locked until this claim commits).
            WITH picked AS (
                SELECT j.id, j.queue,
                       row_number() OVER (PARTITION BY j.queue ORDER BY j.priority DESC, j.run_after, j.id) AS n
                FROM pgqueue.jobs j WHERE j.id = ANY (v_ids)
            ), room AS (
                SELECT l.queue,
                       CASE WHEN l.queue = ANY (v_busy) THEN 0
                            ELSE l.max_running - (SELECT count(*) FROM pgqueue.jobs r
                                                  WHERE r.state = 'running' AND r.queue = l.queue) END AS places
                FROM pgqueue.queue_limits l
                WHERE l.queue = ANY (ARRAY(SELECT DISTINCT p.queue FROM picked p)) AND l.queue = ANY (v_limited)
            )
            SELECT array_agg(p.id) FILTER (WHERE r.places IS NULL OR p.n <= r.places),
                   coalesce(array_agg(DISTINCT p.queue) FILTER (WHERE p.n >= r.places), '{}')
              INTO v_kept, v_filled
              FROM picked p LEFT JOIN room r ON r.queue = p.queue;
            v_full := v_full || v_filled;
            v_ids := v_kept;
        END IF;

        IF v_ids IS NOT NULL THEN
            IF v_scoped THEN
                -- One probe of the current-per-scope index per claimed scope: a scope
                -- array, not a semi-join, which with stale statistics was planned as a
                -- walk of every scope's current job, each re-reading the batch.
                UPDATE pgqueue.jobs o SET is_current = false
                WHERE o.is_current
                  AND jsonb_hash(o.scope) = ANY (ARRAY(SELECT jsonb_hash(j.scope) FROM pgqueue.jobs j
                                                       WHERE j.id = ANY (v_ids) AND j.scope IS NOT NULL))
                  AND o.scope = ANY (ARRAY(SELECT j.scope FROM pgqueue.jobs j
                                           WHERE j.id = ANY (v_ids) AND j.scope IS NOT NULL));
            END IF;
            RETURN QUERY
            WITH claimed AS (
                UPDATE pgqueue.jobs j
                   SET state = 'running', is_current = (j.scope IS NOT NULL), scope_blocked = false,
                       locked_by = claim_next.worker,
                       locked_at = now(), started_at = coalesce(j.started_at, now()), attempts = j.attempts + 1
                 WHERE j.id = ANY (v_ids)
                RETURNING j.*
            )
            SELECT * FROM claimed c ORDER BY c.priority DESC, c.run_after, c.id;
            v_left := v_left - cardinality(v_ids);
        END IF;
        -- Another round only if places remain, and a queue filled up with jobs left
        -- over or one of several queues had fewer free jobs than its quota.
        EXIT WHEN v_left = 0
               OR (coalesce(v_short, '{}') = '{}'
                   AND (v_filled = '{}' OR cardinality(v_picked) < v_left + coalesce(cardinality(v_ids), 0)));
        v_full := v_full || coalesce(v_short, '{}');
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgqueue.claim_next(text, text[], int) IS
    'Claim up to batch_size due jobs (in queues, or any queue when NULL) for worker, by priority desc, '
    'run_after, id, with FOR NO KEY UPDATE SKIP LOCKED, skipping paused queues (of several queues: each one''s '
    'share of the batch by that order, then its first free jobs). A batch never holds two jobs '
    'of one scope, and a scoped job is claimed only when no job of its scope runs and none older is queued. '
    'A limited queue (queue_limits) gives at most its free places, counted under its limit lock. '
    'Returns the claimed rows.';
