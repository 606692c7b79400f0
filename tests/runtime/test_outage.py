"""An outage is logged once when it starts (saying what the component does next) and once
when it ends."""

from __future__ import annotations

import logging

import asyncpg
from runtime_helpers import Records

from pgqueue.worker.retry import Outage


def test_an_outage_is_logged_once_saying_what_happens_next(
    records: tuple[logging.Logger, Records],
) -> None:
    logger, log = records
    lost = asyncpg.ConnectionDoesNotExistError("connection was closed")
    default = Outage(logger, "producer")
    default.failed(lost, "claiming")
    default.failed(lost, "claiming")
    default.ok()
    # The abort reader does not back off: it waits for the next notification or heartbeat.
    aborts = Outage(logger, "aborts", "trying again at the next notification or heartbeat")
    aborts.failed(RuntimeError("boom"), "reading abort requests")
    lines = [r.getMessage() for r in log.records]
    assert lines[0] == (
        "producer: database unavailable while claiming"
        " (ConnectionDoesNotExistError: connection was closed); retrying with backoff"
    )
    assert lines[1].startswith("producer: working again after ")
    assert lines[2] == (
        "aborts: unexpected error while reading abort requests;"
        " trying again at the next notification or heartbeat"
    )
    assert len(lines) == 3
