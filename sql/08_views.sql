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

CREATE VIEW pgqueue.running_jobs AS
SELECT j.id, j.queue, j.job_type, j.locked_by AS worker, j.attempts, j.max_attempts, j.scope, j.pipeline_id,
       now() - j.locked_at AS lease_age, now() - j.started_at AS runtime, j.locked_at, j.started_at, j.progress
FROM pgqueue.jobs j
WHERE j.state = 'running';
COMMENT ON VIEW pgqueue.running_jobs IS
    'Running jobs with their worker, lease age (time since the last claim or heartbeat) and runtime since the first claim.';

CREATE VIEW pgqueue.stale_jobs AS
SELECT r.*
FROM pgqueue.running_jobs r
WHERE r.locked_at < now() - pgqueue._setting_interval('stale_after');
COMMENT ON VIEW pgqueue.stale_jobs IS
    'Running jobs whose lease is older than settings.stale_after: recover_stale() will requeue or fail them.';

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

CREATE VIEW pgqueue.current_jobs AS
SELECT j.scope, j.id, j.job_type, j.queue, j.state, j.attempts, j.locked_by, j.started_at, j.finished_at,
       j.result, j.last_error
FROM pgqueue.jobs j
WHERE j.is_current;
COMMENT ON VIEW pgqueue.current_jobs IS
    'The current job of each scope: the latest one claimed; its state and result are the scope''s latest outcome.';

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
