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
MAX_EVERY = datetime.timedelta(days=100 * 365)  # past this, ticks leave datetime's range


# zoneinfo keys that name whichever zone a host is set to, not a zone.
_HOST_ZONES = frozenset({"localtime", "posixrules", "Factory"})


@dataclass(frozen=True, slots=True)
class Schedule:
    """One periodic job: its name (the row in ``pgqueue.periodic``), when, and what."""

    name: str
    spec: Spec
    cron: str | None = None
    every: datetime.timedelta | None = None
    timezone: str = "UTC"
    catch_up: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name.encode()) > 200:
            raise ValueError(f"a schedule's name must be 1 to 200 bytes, got {self.name!r}")
        if not isinstance(self.catch_up, bool):
            raise TypeError(f"schedule {self.name!r}: catch_up must be True or False")
        if self.cron is not None and not isinstance(self.cron, str):
            raise TypeError(f"schedule {self.name!r}: cron must be a string, got {self.cron!r}")
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"schedule {self.name!r}: give exactly one of cron= and every=")
        if self.every is not None and not MIN_EVERY <= self.every <= MAX_EVERY:
            raise ValueError(f"schedule {self.name!r}: every must be from 1 second to 100 years")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"schedule {self.name!r}: unknown time zone {self.timezone!r}"
            ) from None
        if self.timezone in _HOST_ZONES:
            # Each host's own zone: workers on hosts set differently name different instants
            # for one tick, and that tick makes two jobs.
            raise ValueError(
                f"schedule {self.name!r}: time zone {self.timezone!r} is the host's own; name"
                " the zone (Europe/Berlin, say)"
            )
        if self.every is not None and self.timezone != "UTC":
            raise ValueError(
                f"schedule {self.name!r}: every= counts from the Unix epoch, in no time zone;"
                " timezone= goes with cron="
            )
        if self.cron is not None:
            # cronsim would read a sixth field as seconds; minute resolution is the contract.
            if len(self.cron.split()) != 5:
                raise ValueError(
                    f"schedule {self.name!r}: cron {self.cron!r} must have five fields"
                    " (minute hour day-of-month month day-of-week)"
                )
            try:
                CronSim(self.cron, datetime.datetime.now(datetime.UTC))
            except CronSimError as exc:
                raise ValueError(f"schedule {self.name!r}: bad cron {self.cron!r}: {exc}") from None
        if self.spec.run_after is not None or self.spec.key is not None or self.spec.after:
            raise ValueError(
                f"schedule {self.name!r}: a tick sets run_after itself, and key/after name"
                " siblings a periodic job does not have"
            )
        dumps(spec_dict(self.spec))  # refuse a payload or scope that is not JSON now, not per tick
        self.next_tick(datetime.datetime.now(datetime.UTC))  # one that never ticks is refused

    def previous_tick(self, at: datetime.datetime) -> datetime.datetime | None:
        """The latest tick at or before ``at`` (an aware datetime), in UTC; None if there is
        none in the 50 years before it.

        Found by :meth:`next_tick` from a point two of cronsim's reverse steps back, so it is
        always a tick :meth:`next_tick` names (in the hour daylight saving time repeats, the
        reverse walk meets the second pass of a time, which is not a tick).
        """
        if self.every is not None:
            return _EPOCH + ((at - _EPOCH) // self.every) * self.every
        assert self.cron is not None
        back = None
        for n, earlier in enumerate(
            CronSim(self.cron, at.astimezone(ZoneInfo(self.timezone)), reverse=True)
        ):
            back = earlier.astimezone(datetime.UTC)
            if n == 1:
                break
        if back is None:
            return None
        tick = self.next_tick(back - datetime.timedelta(minutes=1))
        if tick > at:
            return None
        while (following := self.next_tick(tick)) <= at:
            tick = following
        return tick

    def next_tick(self, after: datetime.datetime) -> datetime.datetime:
        """The first tick strictly after ``after`` (an aware datetime), in UTC.

        Raises ``ValueError`` for a cron with no tick in the next 50 years ("0 0 30 2 *").
        """
        if self.every is not None:
            return _EPOCH + ((after - _EPOCH) // self.every + 1) * self.every
        assert self.cron is not None
        # In the hour a fall-back repeats, cronsim answers with the first pass of a time
        # when ``after`` is already in the second: take ticks until one is later.
        for tick in CronSim(self.cron, after.astimezone(ZoneInfo(self.timezone))):
            utc = tick.astimezone(datetime.UTC)
            if utc > after:
                return utc
        raise ValueError(f"schedule {self.name!r}: cron {self.cron!r} has no tick after {after}")
