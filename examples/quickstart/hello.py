"""The quickstart app: ``PYTHONPATH=examples/quickstart pgqueue worker hello:app``."""

from __future__ import annotations

import pgqueue

app = pgqueue.App()


@app.job("hello")
async def hello(job: pgqueue.Job) -> dict[str, str]:
    """Greet whoever the payload names; the return value is stored as the job's result."""
    return {"greeting": f"hello, {job.payload.get('who', 'world')}"}
