-- =============================================================================
-- pgqueue: notifications
-- Statement-level triggers with transition tables: one NOTIFY per queue per
-- statement, whatever the row count, with the queue name as a constant
-- payload so PostgreSQL folds repeats within a transaction. Zero-row
-- statements and rows that do not enter 'queued' stay silent. NOTIFY is only a
-- wake-up hint; workers also poll.
-- =============================================================================

CREATE FUNCTION pgqueue._notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgqueue', q.queue)
    FROM (SELECT DISTINCT n.queue FROM new_rows n WHERE n.state = 'queued') q;
    RETURN NULL;
END
$$;

CREATE FUNCTION pgqueue._notify_requeued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgqueue', q.queue)
    FROM (SELECT DISTINCT n.queue FROM new_rows n JOIN old_rows o ON o.id = n.id
          WHERE n.state = 'queued' AND o.state <> 'queued') q;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_inserted
    AFTER INSERT ON pgqueue.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgqueue._notify_inserted();
COMMENT ON TRIGGER jobs_notify_inserted ON pgqueue.jobs IS
    'NOTIFY pgqueue, <queue> once per queue that received queued jobs in the statement.';

CREATE TRIGGER jobs_notify_requeued
    AFTER UPDATE ON pgqueue.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgqueue._notify_requeued();
COMMENT ON TRIGGER jobs_notify_requeued ON pgqueue.jobs IS
    'NOTIFY pgqueue, <queue> once per queue whose jobs entered queued (retried, recovered, released, unblocked).';
