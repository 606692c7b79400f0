-- =============================================================================
-- pgqueue: notifications
-- Inserts: a statement-level trigger with a transition table, one NOTIFY per
-- queue per statement whatever the row count. Updates: see below. The payload
-- is the queue name, constant per queue, so PostgreSQL folds repeats within a
-- transaction. Zero-row statements and rows that do not enter 'queued' stay
-- silent. NOTIFY is only a wake-up hint; workers also poll.
--
-- settings.notify = 'when_waiting' sends a notification only when a worker
-- waits for one. A transaction that ran NOTIFY holds a database-wide lock from
-- PreCommit_Notify until its commit record is flushed, so notifying enqueues
-- cannot share a WAL flush (group commit): at 8 producers that halves
-- throughput. The handshake that keeps 'when_waiting' from losing a wake-up:
--   * a worker about to sleep calls claim_or_wait(), which takes the 'waiters'
--     advisory lock EXCLUSIVELY, records itself in notify_waiters and, in a
--     later statement of the same transaction, claims;
--   * a queueing transaction TRIES the same lock SHARED (producers never block
--     each other, nor wait for a worker), then in a later statement deletes the
--     waiters of its queues (skipping those another producer's open transaction
--     deleted) and notifies if it saw one; when the lock is not free (a worker
--     registers right now) it notifies without looking.
-- The exclusive lock waits for every producer that already decided "nobody
-- waits" to commit, so the worker's claim sees their jobs; a producer that
-- comes while a worker registers notifies, which reaches that worker however
-- its claim went (its LISTEN is up all along: at worst one wake-up more).
-- Waiting for the worker instead, a producer whose transaction held a scope's
-- order lock from an earlier call closed a cycle: the worker waited for a
-- completion's shared lock, the completion for that scope's order lock.
-- =============================================================================

-- Workers that found nothing to claim and sleep until notified. UNLOGGED: a
-- crash empties it, and reconnecting workers sweep and register again. A row
-- left by a worker that died costs one spurious notification, then is gone.
CREATE UNLOGGED TABLE pgqueue.notify_waiters (
    worker text PRIMARY KEY,
    queues text[],
    since  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgqueue.notify_waiters IS
    'Workers sleeping until a NOTIFY (settings.notify = when_waiting): the first transaction that queues a job '
    'in one of their queues deletes the row and notifies. Written by claim_or_wait; empty in always mode.';
COMMENT ON COLUMN pgqueue.notify_waiters.worker IS 'The waiting worker''s id.';
COMMENT ON COLUMN pgqueue.notify_waiters.queues IS 'Queues it serves; NULL for every queue.';
COMMENT ON COLUMN pgqueue.notify_waiters.since IS 'When it last went to sleep.';

-- Tries the 'waiters' lock shared (held to commit: a worker registering waits
-- for this transaction), then says whether a worker waits for one of p_queues
-- (NULL: for any queue); true without a look when the lock is not free (a
-- worker holds it, or waits for it, to register: it will hear a notification),
-- and in a transaction above READ COMMITTED, whose snapshot, older than the
-- lock, may not show a registration committed since (its worker slept through
-- the job).
CREATE FUNCTION pgqueue._someone_waits(p_queues text[]) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed'
       OR NOT pg_try_advisory_xact_lock_shared(pgqueue._lock_class('waiters'), 0) THEN
        RETURN true;
    END IF;
    -- A later statement, so a snapshot taken after the lock was granted.
    RETURN EXISTS (SELECT 1 FROM pgqueue.notify_waiters w
                   WHERE p_queues IS NULL OR w.queues IS NULL OR w.queues && p_queues);
END
$$;

-- NOTIFY the given queues (p_mode: settings.notify, read by the caller), or in
-- when_waiting mode only if a worker waits for one of them, consuming its
-- registration.
CREATE FUNCTION pgqueue._notify(p_queues text[], p_mode text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(p_queues) IS NOT DISTINCT FROM 0 OR p_queues IS NULL THEN
        RETURN;
    END IF;
    IF p_mode = 'when_waiting' THEN
        -- The read first: while every worker is busy the table is empty, and a
        -- read is cheaper than a DELETE that finds nothing.
        IF NOT pgqueue._someone_waits(p_queues) THEN
            RETURN;
        END IF;
        -- Consume the registrations; one that another producer's open transaction
        -- consumed is skipped, not waited for, and its worker notified all the same
        -- (one wake-up more at most, and none lost if that producer rolls back).
        -- Waiting, producers waited for each other, and two queueing in two queues
        -- in opposite orders deadlocked. (A waiter committed away since the read
        -- above also costs one wake-up more.)
        DELETE FROM pgqueue.notify_waiters w
        WHERE w.worker IN (SELECT v.worker FROM pgqueue.notify_waiters v
                           WHERE v.queues IS NULL OR v.queues && p_queues
                           FOR UPDATE SKIP LOCKED);
    END IF;
    PERFORM pg_notify('pgqueue', q) FROM unnest(p_queues) q;
END
$$;

-- A job of a limited queue ended (succeeded, failed, cancelled): a place is
-- free, so the queue's idle workers are woken. A worker that found the queue
-- full claimed none of its jobs and waits for a notification; nothing else
-- would send one (a job requeued instead announces itself, by the
-- jobs_notify_requeued trigger). While no queue is limited it reads nothing
-- (_any_queue_limit is a constant); _complete also tests that constant in a
-- statement it runs anyway, to skip the call on its hot path.
CREATE FUNCTION pgqueue._notify_limited(p_job_ids bigint[]) RETURNS void
LANGUAGE sql AS $$
    SELECT pgqueue._notify(ARRAY(SELECT DISTINCT j.queue FROM pgqueue.jobs j
                                 JOIN pgqueue.queue_limits l ON l.queue = j.queue
                                 WHERE j.id = ANY (p_job_ids)),
                           pgqueue._setting('notify'))
    WHERE pgqueue._any_queue_limit()
$$;

-- Every single enqueue runs this, so the default mode takes two statements and
-- no nested function calls (a statement's executor start and a PL/pgSQL call
-- each cost more than the query they run: this trigger was 14 % of a single
-- enqueue's backend CPU with four statements and two calls). Whether any queue
-- is paused is read in the first statement, beside the notify setting.
-- A job entered behind another of its scope (scope_blocked) wakes nobody: the
-- end of the job ahead of it does. Nor does a job of a paused queue, which is
-- flagged out of the claim index instead (see pause_queue).
CREATE FUNCTION pgqueue._notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_mode text;
    v_any_paused boolean;
    v_paused text[];  -- of the inserted rows' queues, the paused ones (NULL: none is paused)
BEGIN
    -- "Is any queue paused": the first entry of the paused set's primary key, an
    -- index-only probe (~5 us of a ~190 us enqueue; EXISTS planned a seq scan, ~7 us).
    SELECT s.value, (SELECT true FROM pgqueue.paused_queues p ORDER BY p.queue LIMIT 1)
    INTO v_mode, v_any_paused
    FROM pgqueue.settings s WHERE s.name = 'notify';
    IF v_any_paused THEN
        v_paused := pgqueue._hold_paused(ARRAY(SELECT DISTINCT n.queue FROM new_rows n WHERE n.state = 'queued'));
        IF cardinality(v_paused) > 0 THEN
            UPDATE pgqueue.jobs j SET queue_paused = true
            WHERE j.id = ANY (ARRAY(SELECT n.id FROM new_rows n
                                    WHERE n.state = 'queued' AND n.queue = ANY (v_paused)));
        END IF;
    END IF;
    IF v_mode IS NULL THEN
        PERFORM pgqueue._setting('notify');  -- raises: a deleted setting fails loudly
    ELSIF v_mode <> 'when_waiting' THEN
        PERFORM pg_notify('pgqueue', q.queue)
        FROM (SELECT DISTINCT n.queue FROM new_rows n
              WHERE n.state = 'queued' AND NOT n.scope_blocked
                AND (v_paused IS NULL OR n.queue <> ALL (v_paused))) q;
    ELSIF pgqueue._someone_waits(NULL) THEN  -- else every worker is busy: nothing to do
        PERFORM pgqueue._notify(ARRAY(SELECT DISTINCT n.queue FROM new_rows n
                                      WHERE n.state = 'queued' AND NOT n.scope_blocked
                                        AND (v_paused IS NULL OR n.queue <> ALL (v_paused))), v_mode);
    END IF;
    RETURN NULL;
END
$$;

-- Row level, but the WHEN clause is evaluated in C before any function call,
-- so claims and completions (the hot path) pay nothing; a statement-level
-- UPDATE trigger needs transition tables on every claim and completion, which
-- measured ~0.9 ms per call. Identical payloads fold within a transaction, so
-- a bulk requeue still delivers one notification per queue.
-- A job of a paused queue is flagged out of the claim index instead (a second
-- write of the row, only while its queue is paused), and wakes nobody.
CREATE FUNCTION pgqueue._notify_requeued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pgqueue.paused_queues p WHERE p.queue = NEW.queue)
       AND cardinality(pgqueue._hold_paused(ARRAY[NEW.queue])) > 0 THEN
        UPDATE pgqueue.jobs j SET queue_paused = true WHERE j.id = NEW.id;
        RETURN NULL;
    END IF;
    PERFORM pgqueue._notify(ARRAY[NEW.queue], pgqueue._setting('notify'));
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_inserted
    AFTER INSERT ON pgqueue.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgqueue._notify_inserted();
COMMENT ON TRIGGER jobs_notify_inserted ON pgqueue.jobs IS
    'NOTIFY pgqueue, <queue> once per queue that received queued jobs in the statement; jobs of a paused queue '
    'are flagged out of the claim index instead.';

CREATE TRIGGER jobs_notify_requeued
    AFTER UPDATE OF state ON pgqueue.jobs
    FOR EACH ROW
    WHEN (NEW.state = 'queued' AND OLD.state <> 'queued')
    EXECUTE FUNCTION pgqueue._notify_requeued();
COMMENT ON TRIGGER jobs_notify_requeued ON pgqueue.jobs IS
    'NOTIFY pgqueue, <queue> once per queue whose jobs entered queued (retried, recovered, released, snoozed, unblocked); '
    'a job of a paused queue is flagged out of the claim index instead.';

CREATE FUNCTION pgqueue.claim_or_wait(worker text, queues text[] DEFAULT NULL, batch_size int DEFAULT 1)
RETURNS SETOF pgqueue.jobs
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF pgqueue._setting('notify') = 'when_waiting' THEN
        IF claim_or_wait.worker IS NULL OR claim_or_wait.worker = '' OR octet_length(claim_or_wait.worker) > 200 THEN
            RAISE EXCEPTION 'pgqueue.claim_or_wait: worker must be a non-empty string of at most 200 bytes'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- Waits for every producer that decided nobody waits to commit.
        PERFORM pg_advisory_xact_lock(pgqueue._lock_class('waiters'), 0);
        INSERT INTO pgqueue.notify_waiters AS w (worker, queues)
        VALUES (claim_or_wait.worker, claim_or_wait.queues)
        ON CONFLICT (worker) DO UPDATE SET queues = EXCLUDED.queues, since = now();
        -- Rows of workers that died while waiting (a live one re-registers at
        -- every poll, well within stale_after).
        DELETE FROM pgqueue.notify_waiters w
        WHERE w.since < now() - pgqueue._setting_interval('stale_after');
        -- While this transaction holds the 'waiters' lock, its claims only try limit
        -- locks: waiting for one would keep the lock (every producer notifying
        -- without looking meanwhile, other workers going to sleep waiting), and
        -- producers waited for it before they only tried it. Set for the rest of the
        -- transaction, as long as the lock is held.
        PERFORM set_config('pgqueue.claim_waits', 'never', true);
    END IF;
    -- claim_next's statements take snapshots after the lock was granted.
    RETURN QUERY SELECT * FROM pgqueue.claim_next(claim_or_wait.worker, claim_or_wait.queues, claim_or_wait.batch_size);
END
$$;
COMMENT ON FUNCTION pgqueue.claim_or_wait(text, text[], int) IS
    'claim_next for a worker about to sleep: with settings.notify = when_waiting it first registers the worker '
    'in notify_waiters (after every producer that saw no waiter has committed), so the next job queued in its '
    'queues sends a NOTIFY; a worker calls it after a claim came back short and sleeps if this one does too. '
    'Holding that lock, the transaction''s claims only try limit locks (a busy limited queue is announced). '
    'In always mode it is claim_next.';
