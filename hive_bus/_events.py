"""Reading every provider's events: each provider has an events stream of its own
(``<PREFIX>_EVENTS_<provider>``, hive_bus._names), so a reader of more than one provider follows one
consumer per stream, and takes up the stream of a provider that appears while it reads.

A new provider's stream is made by the first process that queues or serves its work
(:func:`hive_bus._bus.ensure_events`); the others learn of it by listing the streams every
:data:`LIST_EVERY_S`, and a process learns at once of the streams it makes itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable

import anyio
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from ._bus import Bus, event_providers
from ._nats import BUS_ERRORS, follow, unsubscribe, why

log = logging.getLogger("hive_bus.events")

# How often a reader of every provider's events looks for a provider's stream made by another process.
LIST_EVERY_S = 2.0


async def watch_providers(
    bus: Bus,
    on_new: Callable[[str], Awaitable[None]],
    *,
    only: str | None = None,
    every_s: float = LIST_EVERY_S,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_new(provider)`` once for each provider that has an events stream (``only`` that one),
    first for those there are, then for each that appears; runs until cancelled. Started once the
    first listing is done (it raises if the bus does not answer then)."""
    seen: set[str] = set()
    first = True
    while True:
        added = bus.events_added[0]
        try:
            providers = await event_providers(bus)
        except BUS_ERRORS as exc:
            if first:
                raise
            log.debug("could not list the events streams: %s", why(exc))
            providers = []
        for provider in providers:
            if provider not in seen and (only is None or provider == only):
                seen.add(provider)
                await on_new(provider)
        if first:
            first = False
            task_status.started()
        with anyio.move_on_after(every_s):
            await added.wait()


class merged_events:
    """The messages of an ordered consumer of each provider's events stream (``only`` that provider's),
    on ``subjects(provider)`` with ``config(provider)``, merged in the order they arrive: each stream's in
    its own order, none across streams. A stream that appears meanwhile is followed too (``config`` of
    that provider: give a start by time, or from the stream's start, to miss none of it), found while
    the messages are read: no task of its own, so it may be used in an async generator. The consumers go
    when the block ends."""

    def __init__(
        self,
        bus: Bus,
        subjects: Callable[[str], str],
        config: Callable[[str], ConsumerConfig],
        *,
        only: str | None = None,
        every_s: float = LIST_EVERY_S,
    ) -> None:
        self._bus = bus
        self._subjects = subjects
        self._config = config
        self._only = only
        self._every_s = every_s
        self._send, self._receive = anyio.create_memory_object_stream[Msg](max_buffer_size=math.inf)
        self._subs: dict[str, object] = {}
        self._listed_at = -math.inf
        self._made = 0  # how many streams this process had made at the last listing

    async def __aenter__(self) -> merged_events:
        await self._refresh(first=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._send.close()
        self._receive.close()
        subs, self._subs = self._subs, {}
        for sub in subs.values():
            await unsubscribe(sub)

    def __aiter__(self) -> merged_events:
        return self

    async def __anext__(self) -> Msg:
        while True:
            due_s = self._listed_at + self._every_s - anyio.current_time()
            if due_s <= 0 or self._made_here():
                await self._refresh()
                continue
            with anyio.move_on_after(due_s):
                try:
                    return await self._receive.receive()
                except anyio.EndOfStream:
                    raise StopAsyncIteration from None

    def _made_here(self) -> bool:
        """Whether this process made a provider's stream since the last listing (one to follow)."""
        made = self._bus.events_made
        return len(made) != self._made and any(self._only in (None, p) and p not in self._subs for p in made)

    async def _refresh(self, *, first: bool = False) -> None:
        self._listed_at = anyio.current_time()
        self._made = len(self._bus.events_made)
        try:
            providers = await event_providers(self._bus)
        except BUS_ERRORS as exc:
            if first:
                raise
            log.debug("could not list the events streams: %s", why(exc))
            return
        for provider in providers:
            if provider in self._subs or (self._only is not None and provider != self._only):
                continue
            stream = self._bus.names.events_stream_of(provider)
            try:
                self._subs[provider] = await follow(
                    self._bus.js, self._subjects(provider), stream=stream, config=self._config(provider),
                    cb=self._deliver,
                )  # fmt: skip
            except BUS_ERRORS as exc:
                if first:
                    raise
                log.warning("could not follow the events of %s: %s", provider, why(exc))

    async def _deliver(self, msg: Msg) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait(msg)
