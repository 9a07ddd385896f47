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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
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
        added = bus.events_added
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


@asynccontextmanager
async def merged_events(
    bus: Bus,
    subjects: Callable[[str], str],
    config: Callable[[str], ConsumerConfig],
    *,
    only: str | None = None,
) -> AsyncIterator[MemoryObjectReceiveStream[Msg]]:
    """The messages of an ordered consumer of each provider's events stream (``only`` that provider's),
    on ``subjects(provider)`` with ``config(provider)``, merged in the order they arrive: each stream's
    in its own order, none across streams. A stream that appears meanwhile is followed from its start
    (``config`` of that provider). The consumers go when the block ends."""
    send, receive = anyio.create_memory_object_stream[Msg](max_buffer_size=math.inf)
    subs: list[object] = []

    async def deliver(msg: Msg) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            send.send_nowait(msg)

    async def on_new(provider: str) -> None:
        stream = bus.names.events_stream_of(provider)
        try:
            subs.append(
                await follow(bus.js, subjects(provider), stream=stream, config=config(provider), cb=deliver)
            )
        except BUS_ERRORS as exc:
            log.warning("could not follow the events of %s: %s", provider, why(exc))

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: watch_providers(bus, on_new, only=only, task_status=task_status)
            )
            try:
                with receive:
                    yield receive
            finally:
                tg.cancel_scope.cancel()
    finally:
        send.close()
        for sub in subs:
            await unsubscribe(sub)
