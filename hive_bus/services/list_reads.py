"""How many task lists (``GET /v1/tasks``) one gateway reads at once.

A list reads up to thousands of events per provider (the tail of each events stream, 8 events a task
asked for, or the metadata index) and holds them while it works: eighty clients asking for 500 tasks at
once took a gateway from 77 MB to over 400 MB and each answer to seconds. So a gateway reads at most
``at_once`` lists at a time; a request beyond that waits its turn up to ``wait_s``, then is answered 503
with ``Retry-After``. The bound is per process: more gateways read more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from hive_bus import BusUnavailable

LIST_READS_AT_ONCE = 4
LIST_READ_WAIT_S = 10.0
BUSY_RETRY_AFTER_S = 2


class ListsBusy(BusUnavailable):
    """The gateway is reading as many lists as it reads at once, and this one waited its time."""


@dataclass(frozen=True)
class ListReadLimits:
    at_once: int = LIST_READS_AT_ONCE
    wait_s: float = LIST_READ_WAIT_S


class ListReads:
    """The gateway's turns at reading a list: ``async with reads.turn(): ...``."""

    def __init__(self, limits: ListReadLimits) -> None:
        if limits.at_once < 1 or limits.wait_s < 0:
            raise ValueError(f"list reads need at_once >= 1 and wait_s >= 0, not {limits}")
        self.limits = limits
        self._limiter = anyio.CapacityLimiter(limits.at_once)

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """A turn at reading a list, once one is free; raises :class:`ListsBusy` after ``wait_s``."""
        got = False
        with anyio.move_on_after(self.limits.wait_s):  # the wait alone: a read once begun is the bus's
            await self._limiter.acquire()
            got = True
        if not got:
            raise ListsBusy(
                f"the gateway is reading {self.limits.at_once} task lists at once and this one waited "
                f"{self.limits.wait_s:g} s for its turn: try again shortly"
            )
        try:
            yield
        finally:
            self._limiter.release()
