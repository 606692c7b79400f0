"""An app that configures logging itself, the way an application's module does, for the
tests of ``pgqueue worker``'s logging (test_worker_processes.py)."""

from __future__ import annotations

import logging

import pgqueue

logging.basicConfig(format="app pid=%(process)d %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("logging_app")
log.setLevel(logging.INFO)
app = pgqueue.App()


@app.job("hello")
async def hello(job: pgqueue.Job) -> None:
    log.info("hello from job %d", job.id)
