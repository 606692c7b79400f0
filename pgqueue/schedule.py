"""Periodic jobs: when a schedule's ticks fall, and what each tick enqueues.

A schedule names its ticks by time: a cron expression (minute resolution, evaluated in a
time zone, so "0 9 * * *" in Europe/Berlin follows daylight saving time) or a fixed
interval counted from the Unix epoch (``every=timedelta(minutes=10)`` ticks at :00, :10, ...
UTC). Every worker that knows a schedule computes the same ticks, and
``pgqueue.enqueue_periodic`` turns each tick into exactly one job, whichever workers try.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from pgqueue.dsn import dumps
from pgqueue.job import Spec, spec_dict

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
MIN_EVERY = datetime.timedelta(seconds=1)


@dataclass(frozen=True, slots=True)
class Schedule:
    """One periodic job: its name (the row in ``pgqueue.periodic``), when, and what."""

    name: str
    spec: Spec
    cron: str | None = None
    every: datetime.timedelta | None = None
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name.encode()) > 200:
            raise ValueError(f"a schedule's name must be 1 to 200 bytes, got {self.name!r}")
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"schedule {self.name!r}: give exactly one of cron= and every=")
        if self.every is not None and self.every < MIN_EVERY:
            raise ValueError(f"schedule {self.name!r}: every must be at least 1 second")
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"schedule {self.name!r}: unknown time zone {self.timezone!r}"
            ) from None
        if self.cron is not None:
            try:
                CronSim(self.cron, datetime.datetime.now(zone))
            except CronSimError as exc:
                raise ValueError(f"schedule {self.name!r}: bad cron {self.cron!r}: {exc}") from None
        if self.spec.run_after is not None or self.spec.key is not None or self.spec.after:
            raise ValueError(
                f"schedule {self.name!r}: a tick sets run_after itself, and key/after name"
                " siblings a periodic job does not have"
            )
        dumps(spec_dict(self.spec))  # refuse a payload or scope that is not JSON now, not per tick

    def next_tick(self, after: datetime.datetime) -> datetime.datetime:
        """The first tick strictly after ``after`` (an aware datetime), in UTC."""
        if self.every is not None:
            return _EPOCH + ((after - _EPOCH) // self.every + 1) * self.every
        assert self.cron is not None
        local = after.astimezone(ZoneInfo(self.timezone))
        return next(CronSim(self.cron, local)).astimezone(datetime.UTC)
