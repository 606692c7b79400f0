"""A resettable wake-up signal built on anyio events."""

from __future__ import annotations

import math

import anyio


class Wake:
    """A flag that many parties can set and one waiter consumes.

    ``anyio.Event`` cannot be cleared, so each consumed wake-up replaces it. Setting it while
    nobody waits is remembered: a notification that arrives while the producer is busy
    claiming makes its next wait return at once, so nothing is missed.
    """

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self, seconds: float = math.inf) -> bool:
        """Wait up to ``seconds``; return whether we were woken, and reset the flag."""
        with anyio.move_on_after(seconds):
            await self._event.wait()
        woken = self._event.is_set()
        if woken:
            self._event = anyio.Event()
        return woken
