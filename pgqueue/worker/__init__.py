"""The worker runtime: one process claiming and running jobs. See ``docs/worker.md``."""

from pgqueue.worker.worker import Worker, make_worker_id

__all__ = ["Worker", "make_worker_id"]
