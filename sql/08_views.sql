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
