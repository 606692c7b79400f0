"""pgqueue: a job queue that lives inside PostgreSQL."""

from pgqueue.app import App, JobType
from pgqueue.job import Job, Result
from pgqueue.worker import Worker

__version__ = "0.1.0"

__all__ = ["App", "Job", "JobType", "Result", "Worker", "__version__"]
