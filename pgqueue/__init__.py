"""pgqueue: a job queue that lives inside PostgreSQL."""

from pgqueue.app import App, JobType, LifespanError
from pgqueue.job import Job, JobLogFilter, Result, Snooze, Spec, current_job
from pgqueue.outcome import Outcome, job_outcome, wait_for_job
from pgqueue.pipeline import (
    EnqueuedPipeline,
    Node,
    Pipeline,
    PipelineError,
    PipelineStatus,
    cancel_pipeline,
    pipeline_status,
)
from pgqueue.queues import pause_queue, paused_queues, queue_limits, resume_queue, set_queue_limit
from pgqueue.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "App",
    "EnqueuedPipeline",
    "Job",
    "JobLogFilter",
    "JobType",
    "LifespanError",
    "Node",
    "Outcome",
    "Pipeline",
    "PipelineError",
    "PipelineStatus",
    "Result",
    "Snooze",
    "Spec",
    "Worker",
    "__version__",
    "cancel_pipeline",
    "current_job",
    "job_outcome",
    "pause_queue",
    "paused_queues",
    "pipeline_status",
    "queue_limits",
    "resume_queue",
    "set_queue_limit",
    "wait_for_job",
]
