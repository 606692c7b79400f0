-- =============================================================================
-- pgqueue: views for psql
-- =============================================================================

CREATE VIEW pgqueue.queue_stats AS
SELECT j.queue, j.state, count(*) AS count,
       now() - min(j.run_after) FILTER (WHERE j.state = 'queued' AND j.run_after <= now()) AS oldest_ready_age
FROM pgqueue.jobs j
GROUP BY j.queue, j.state;
COMMENT ON VIEW pgqueue.queue_stats IS
    'Jobs per queue and state; oldest_ready_age = how long the oldest due queued job has been waiting (the backlog).';
COMMENT ON COLUMN pgqueue.queue_stats.queue IS 'The queue.';
COMMENT ON COLUMN pgqueue.queue_stats.state IS 'The job state counted in this row.';
COMMENT ON COLUMN pgqueue.queue_stats.count IS 'Jobs of the queue in that state.';
COMMENT ON COLUMN pgqueue.queue_stats.oldest_ready_age IS 'For queued: how long the oldest due job has waited since its run_after (the backlog); NULL for other states.';

CREATE VIEW pgqueue.running_jobs AS
SELECT j.id, j.queue, j.job_type, j.locked_by AS worker, j.attempts, j.max_attempts, j.scope, j.pipeline_id,
       now() - j.locked_at AS lease_age, now() - j.started_at AS runtime, j.locked_at, j.started_at, j.progress
FROM pgqueue.jobs j
WHERE j.state = 'running';
COMMENT ON VIEW pgqueue.running_jobs IS
    'Running jobs with their worker, lease age (time since the last claim or heartbeat) and runtime since the first claim.';
COMMENT ON COLUMN pgqueue.running_jobs.id IS 'The job''s id (pgqueue.jobs.id).';
COMMENT ON COLUMN pgqueue.running_jobs.queue IS 'The job''s queue.';
COMMENT ON COLUMN pgqueue.running_jobs.job_type IS 'The handler name.';
COMMENT ON COLUMN pgqueue.running_jobs.worker IS 'The worker holding the lease (jobs.locked_by).';
COMMENT ON COLUMN pgqueue.running_jobs.attempts IS 'This attempt''s number, from 1.';
COMMENT ON COLUMN pgqueue.running_jobs.max_attempts IS 'Attempts allowed before the job ends failed.';
COMMENT ON COLUMN pgqueue.running_jobs.scope IS 'The job''s scope, if any.';
COMMENT ON COLUMN pgqueue.running_jobs.pipeline_id IS 'The job''s pipeline, if any.';
COMMENT ON COLUMN pgqueue.running_jobs.lease_age IS 'Time since the claim or the worker''s last heartbeat; stale past settings.stale_after.';
COMMENT ON COLUMN pgqueue.running_jobs.runtime IS 'Time since the job''s first claim (started_at, which retries do not move).';
COMMENT ON COLUMN pgqueue.running_jobs.locked_at IS 'When the lease was taken or last refreshed.';
COMMENT ON COLUMN pgqueue.running_jobs.started_at IS 'The job''s first claim.';
COMMENT ON COLUMN pgqueue.running_jobs.progress IS 'The last checkpoint the handler saved (save_progress), if any.';

CREATE VIEW pgqueue.stale_jobs AS
SELECT r.*
FROM pgqueue.running_jobs r
WHERE r.locked_at < now() - pgqueue._setting_interval('stale_after');
COMMENT ON VIEW pgqueue.stale_jobs IS
    'Running jobs whose lease is older than settings.stale_after: recover_stale() will requeue or fail them.';
-- stale_jobs has running_jobs' columns, which mean the same here.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT a.attname, col_description(a.attrelid, a.attnum) AS comment FROM pg_attribute a
             WHERE a.attrelid = 'pgqueue.running_jobs'::regclass AND a.attnum > 0 AND NOT a.attisdropped
    LOOP
        EXECUTE format('COMMENT ON COLUMN pgqueue.stale_jobs.%I IS %L', c.attname, c.comment);
    END LOOP;
END
$$;

CREATE VIEW pgqueue.pipelines AS
SELECT j.pipeline_id,
       count(*) AS jobs,
       count(*) FILTER (WHERE j.state = 'waiting') AS waiting,
       count(*) FILTER (WHERE j.state = 'queued') AS queued,
       count(*) FILTER (WHERE j.state = 'running') AS running,
       count(*) FILTER (WHERE j.state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE j.state = 'failed') AS failed,
       count(*) FILTER (WHERE j.state = 'cancelled') AS cancelled,
       min(j.created_at) AS created_at,
       min(j.started_at) AS started_at,
       CASE WHEN bool_and(j.finished_at IS NOT NULL) THEN max(j.finished_at) END AS finished_at,
       bool_and(j.finished_at IS NOT NULL) AS done,
       CASE WHEN NOT bool_and(j.finished_at IS NOT NULL) THEN 'running'
            WHEN bool_or(j.state = 'failed') THEN 'failed'
            WHEN bool_or(j.state = 'cancelled') THEN 'cancelled'
            ELSE 'succeeded' END AS state
FROM pgqueue.jobs j
WHERE j.pipeline_id IS NOT NULL
GROUP BY j.pipeline_id;
COMMENT ON VIEW pgqueue.pipelines IS
    'One row per pipeline_id: jobs per state, first start, last finish, done (no job left to run) and one '
    'overall state: running until done, then failed if any job failed, cancelled if any was cancelled, else succeeded.';
COMMENT ON COLUMN pgqueue.pipelines.pipeline_id IS 'The pipeline (jobs.pipeline_id).';
COMMENT ON COLUMN pgqueue.pipelines.jobs IS 'Jobs in the pipeline, in any state.';
COMMENT ON COLUMN pgqueue.pipelines.waiting IS 'Jobs waiting for dependencies.';
COMMENT ON COLUMN pgqueue.pipelines.queued IS 'Jobs queued (due or scheduled).';
COMMENT ON COLUMN pgqueue.pipelines.running IS 'Jobs running.';
COMMENT ON COLUMN pgqueue.pipelines.succeeded IS 'Jobs that succeeded.';
COMMENT ON COLUMN pgqueue.pipelines.failed IS 'Jobs that failed.';
COMMENT ON COLUMN pgqueue.pipelines.cancelled IS 'Jobs cancelled.';
COMMENT ON COLUMN pgqueue.pipelines.created_at IS 'When its first job was created.';
COMMENT ON COLUMN pgqueue.pipelines.started_at IS 'Its first claim of any job; NULL before one ran.';
COMMENT ON COLUMN pgqueue.pipelines.finished_at IS 'Its last job''s finish, once done; NULL while any job is unfinished.';
COMMENT ON COLUMN pgqueue.pipelines.done IS 'true when no job of the pipeline is left to run (every one succeeded, failed or was cancelled).';
COMMENT ON COLUMN pgqueue.pipelines.state IS 'running until done; then failed if any job failed, cancelled if any was cancelled, else succeeded.';

CREATE VIEW pgqueue.current_jobs AS
SELECT j.scope, j.id, j.job_type, j.queue, j.state, j.attempts, j.locked_by, j.started_at, j.finished_at,
       j.result, j.last_error
FROM pgqueue.jobs j
WHERE j.is_current;
COMMENT ON VIEW pgqueue.current_jobs IS
    'The current job of each scope: the latest one claimed; its state and result are the scope''s latest outcome.';
COMMENT ON COLUMN pgqueue.current_jobs.scope IS 'The scope.';
COMMENT ON COLUMN pgqueue.current_jobs.id IS 'Its current job: the one claimed last.';
COMMENT ON COLUMN pgqueue.current_jobs.job_type IS 'The current job''s handler name.';
COMMENT ON COLUMN pgqueue.current_jobs.queue IS 'The current job''s queue.';
COMMENT ON COLUMN pgqueue.current_jobs.state IS 'The current job''s state: its outcome once finished, which stays the scope''s latest until the next claim.';
COMMENT ON COLUMN pgqueue.current_jobs.attempts IS 'Attempts the current job has made.';
COMMENT ON COLUMN pgqueue.current_jobs.locked_by IS 'The worker running it, or the one that finished it.';
COMMENT ON COLUMN pgqueue.current_jobs.started_at IS 'The current job''s first claim.';
COMMENT ON COLUMN pgqueue.current_jobs.finished_at IS 'When it finished; NULL while it runs or waits to run again.';
COMMENT ON COLUMN pgqueue.current_jobs.result IS 'What its handler returned (succeeded jobs).';
COMMENT ON COLUMN pgqueue.current_jobs.last_error IS 'Its last failure, if any.';

-- Every claim and completion leaves a dead row version and dead index entries
-- behind, which vacuum can remove only once no transaction can still see them.
-- An open transaction (idle in transaction, a long report, a forgotten psql
-- session), a standby with hot_standby_feedback, a replication slot holding an
-- old xmin or a prepared transaction keeps them all, and each claim steps over
-- the dead entries of every job claimed since, at the front of the ready index:
-- claims get slower the longer it lasts (docs/sql.md). This lists what holds
-- the horizon, oldest first. A session counts by the older of its snapshot's
-- xmin and its own transaction id (one that wrote and sits idle in a READ
-- COMMITTED transaction has no snapshot). Sessions of other databases hold this
-- database's tables only through a transaction id (every snapshot taken here
-- meanwhile sees it running), so only those are listed. No filter on the
-- columns pg_stat_activity hides from roles without pg_read_all_stats
-- (backend_type, state, query): such a reader still sees every holder.
CREATE VIEW pgqueue.vacuum_blockers AS
SELECT b.kind, b.pid, b.database, b.role, b.name, b.state, b.xmin_age, now() - b.since AS open_for, b.since,
       b.query
FROM (
    SELECT 'session' AS kind, a.pid, a.datname::text AS database, a.usename::text AS role,
           a.application_name AS name, a.state,
           greatest(age(a.backend_xid), age(a.backend_xmin)) AS xmin_age, a.xact_start AS since, a.query
    FROM pg_stat_activity a
    WHERE a.pid <> pg_backend_pid()
      AND (a.backend_xid IS NOT NULL
           OR (a.backend_xmin IS NOT NULL AND a.datname = current_database()))
    UNION ALL
    SELECT 'standby', r.pid, NULL, r.usename::text, r.application_name, r.state, age(r.backend_xmin), NULL, NULL
    FROM pg_stat_replication r
    WHERE r.backend_xmin IS NOT NULL
    UNION ALL
    SELECT 'replication slot', s.active_pid, s.database::text, NULL, s.slot_name,
           CASE WHEN s.active THEN 'active' ELSE 'inactive' END, age(s.xmin), NULL, NULL
    FROM pg_replication_slots s
    WHERE s.xmin IS NOT NULL
    UNION ALL
    SELECT 'prepared transaction', NULL, p.database::text, p.owner::text, p.gid, 'prepared', age(p.transaction),
           p.prepared, NULL
    FROM pg_prepared_xacts p
) b
ORDER BY b.xmin_age DESC, b.since;
COMMENT ON VIEW pgqueue.vacuum_blockers IS
    'What keeps vacuum from removing dead job rows, oldest first: this database''s open transactions (and other '
    'databases'' that have written), standbys with hot_standby_feedback, replication slots and prepared '
    'transactions, with xmin_age (transactions since) and open_for. Claims slow down while an old one stays open.';
COMMENT ON COLUMN pgqueue.vacuum_blockers.kind IS 'session, standby, replication slot or prepared transaction.';
COMMENT ON COLUMN pgqueue.vacuum_blockers.pid IS 'The backend (or WAL sender) process id; for an active replication slot, its user''s.';
COMMENT ON COLUMN pgqueue.vacuum_blockers.database IS 'The database it belongs to (NULL for a standby).';
COMMENT ON COLUMN pgqueue.vacuum_blockers.role IS 'The role that holds it.';
COMMENT ON COLUMN pgqueue.vacuum_blockers.name IS 'application_name of a session or standby, the slot''s name, or the prepared transaction''s gid.';
COMMENT ON COLUMN pgqueue.vacuum_blockers.state IS 'A session''s state (idle in transaction ...), a standby''s, active/inactive for a slot, prepared.';
COMMENT ON COLUMN pgqueue.vacuum_blockers.xmin_age IS 'Transactions since the oldest one it keeps visible: the dead row versions vacuum must keep.';
COMMENT ON COLUMN pgqueue.vacuum_blockers.open_for IS 'How long its transaction has been open (NULL where unknown: standbys, slots).';
COMMENT ON COLUMN pgqueue.vacuum_blockers.since IS 'When its transaction began, or the prepared transaction was prepared.';
COMMENT ON COLUMN pgqueue.vacuum_blockers.query IS 'A session''s current or last statement.';

-- The line of a stored error that says what went wrong, for grouping failures in psql.
-- Not the last line: a message of several lines (pydantic's, SQLAlchemy's "[SQL: ...]"),
-- notes and a chained exception follow a traceback's exception line. The pattern is
-- pgqueue/error_line.py's, which the worker's log and `pgqueue jobs` use, so every place
-- names a failure alike (tests/sql/test_error_line.py holds them to one corpus).
CREATE FUNCTION pgqueue.error_line(error text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(substring(error FROM '^.*(?:Traceback \(most recent call last[^\n]*|\+-*\+?-+ [0-9]+ -+)\n(?:[ ]*\|[ ][ ][^\n]*\n|[ ]+[^ |\n][^\n]*\n|\[\.\.\. [0-9]+ bytes cut \.\.\.\]\n)*(?:[ ]*\|[ ])?([^ \n|+][^\n\r]*)'),
                    rtrim(split_part(ltrim(error, E'\n'), E'\n', 1), E'\r'))
$$;
COMMENT ON FUNCTION pgqueue.error_line(text) IS
    'The line of an error (last_error) that names it: of a traceback, the exception''s line (its type and the first '
    'line of its message; of an exception group, its last leaf''s), found after the frames of the last traceback; '
    'else the first line. The worker''s log and `pgqueue jobs` show the same line.';
