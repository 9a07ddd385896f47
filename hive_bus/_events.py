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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from ._assigned import Assignments, assignment
from ._bus import Bus, event_providers
from ._messages import Moved, TaskEvent, decode_event
from ._nats import BUS_ERRORS, follow, stream_missing, unsubscribe, why

log = logging.getLogger("hive_bus.events")

# How often a reader of every provider's events looks for a provider's stream made by another process.
LIST_EVERY_S = 2.0
# The messages of every provider's stream a merged reader holds at most that its reader has not taken.
MERGED_BUFFER = 256
# How long before a move a task's events are read in the stream of the provider it moved to: the move
# and the queueing that follows it are stored by two streams, whose leaders (in a cluster) have two clocks.
CLOCKS_APART_S = 1.0


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
        added = bus.event_streams.added
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
        # bounded: a reader that falls behind holds the consumers back (each one's subscription, then
        # the server's flow control), rather than this process's memory growing
        self._send, self._receive = anyio.create_memory_object_stream[Msg](max_buffer_size=MERGED_BUFFER)
        self._subs: dict[str, object] = {}
        self._listed_at = -math.inf
        self._made = 0  # how many streams this process had made at the last listing

    async def __aenter__(self) -> merged_events:
        try:
            await self._refresh(first=True)
        except BaseException:
            await self.__aexit__()
            raise
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
            # A message already buffered is taken without a cancel scope and the checkpoint ``receive``
            # makes first (two passes of the event loop a message); the buffer is bounded, so the
            # reader still yields once it has read what is there.
            try:
                return self._receive.receive_nowait()
            except anyio.WouldBlock:
                pass
            except anyio.EndOfStream:
                raise StopAsyncIteration from None
            with anyio.move_on_after(due_s):
                try:
                    return await self._receive.receive()
                except anyio.EndOfStream:
                    raise StopAsyncIteration from None

    def _made_here(self) -> bool:
        """Whether this process made a provider's stream since the last listing (one to follow)."""
        made = self._bus.event_streams.made
        return len(made) != self._made and any(self._only in (None, p) and p not in self._subs for p in made)

    async def _refresh(self, *, first: bool = False) -> None:
        self._listed_at = anyio.current_time()
        self._made = len(self._bus.event_streams.made)
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
            try:
                self._send.send_nowait(msg)  # room in the buffer: no checkpoint a message
            except anyio.WouldBlock:
                await self._send.send(msg)  # full: the reader is behind, wait for it


async def task_events(
    bus: Bus, task_id: str, assigned: Assignments, *, live: bool, quiet_s: float | None = None
) -> AsyncGenerator[tuple[Msg, TaskEvent] | None]:
    """The events of one task that count (``assigned``), in the order they happened, decoded (one that
    does not decode is logged and left out): those of the provider it was first queued on, then at each
    move to another provider those of that provider, in its stream, from the time of the move (what its
    workers wrote before is not the task's). With ``live``, each new one too, until the caller stops;
    else those stored now. With ``quiet_s``, None after each ``quiet_s`` without one (a feed's cue for a
    keep-alive). Nothing for a task the bus does not know. Use it in ``contextlib.aclosing``: its
    consumer goes when it is closed."""
    names = bus.names
    here = await assignment(bus, task_id)
    if here is None:
        return
    provider = [*here.task.tried, here.provider][0]
    read: dict[str, int] = {}  # by provider, the last sequence read in its stream (a task may come back)
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    while True:
        stream, subject = names.events_stream_of(provider), names.events_of(task_id, provider)
        if provider in read:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=read[provider] + 1
            )
        last = None if live else await _last_seq(bus, stream, subject)
        if not live and (last is None or last <= read.get(provider, 0)):
            return
        moved: tuple[str, ConsumerConfig] | None = None
        try:
            async with _received(bus, subject, stream, config) as received:
                while True:
                    msg = None
                    with anyio.move_on_after(math.inf if quiet_s is None else quiet_s):
                        msg = await received.receive()
                    if msg is None:
                        yield None
                        continue
                    seq = read[provider] = msg.metadata.sequence.stream
                    try:
                        event = decode_event(msg.subject, msg.data, msg.headers)
                    except (msgspec.DecodeError, RecursionError) as exc:
                        log.warning("task %s: event %s of %s does not decode (%s)", task_id, seq, stream, exc)
                        event = None
                    if event is not None and await assigned.counts(msg.subject, event):
                        yield msg, event
                        if isinstance(event, Moved) and event.task.provider != provider:
                            since = msg.metadata.timestamp - timedelta(seconds=CLOCKS_APART_S)
                            start = ConsumerConfig(
                                deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since
                            )
                            moved = event.task.provider, start
                            break
                    if last is not None and seq >= last:
                        break
        except nats.js.errors.NotFoundError as exc:
            if not (live and stream_missing(exc)):
                raise
            await anyio.sleep(1.0)  # a provider's stream not made yet: the router makes it to queue there
            continue
        if moved is None:
            return
        provider, config = moved


@asynccontextmanager
async def _received(
    bus: Bus, subject: str, stream: str, config: ConsumerConfig
) -> AsyncIterator[MemoryObjectReceiveStream[Msg]]:
    """An ordered consumer's messages, through a bounded buffer that a reader may wait on with a time
    limit (a wait cut short on a subscription's own iterator could drop a message it had taken)."""
    send, receive = anyio.create_memory_object_stream[Msg](max_buffer_size=MERGED_BUFFER)

    async def deliver(msg: Msg) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await send.send(msg)  # full: the reader is behind, and the consumer waits for it

    sub = await follow(bus.js, subject, stream=stream, config=config, cb=deliver)
    try:
        with receive:
            yield receive
    finally:
        send.close()
        await unsubscribe(sub)


async def evicted_before_ms(bus: Bus) -> int:
    """The time (ms) before which a task may have lost events to its provider's stream's limits: the
    newest of the first events the providers' streams keep (two requests a provider). A task submitted
    since has every event it had; 0 when no stream has lost any yet (or none is kept)."""
    newest_first = 0
    for provider in await event_providers(bus):
        stream = bus.names.events_stream_of(provider)
        try:
            info = await bus.js.stream_info(stream)
            if info.state.first_seq <= 1:
                continue  # none dropped since the stream began
            raw = await bus.js.get_msg(stream, seq=info.state.first_seq, direct=True)
        except nats.js.errors.NotFoundError:
            continue  # gone meanwhile, or its first message aged out as it was read
        if raw.time is not None:
            newest_first = max(newest_first, int(raw.time.timestamp() * 1000))
    return newest_first


async def _last_seq(bus: Bus, stream: str, subject: str) -> int | None:
    """The sequence of the last message on ``subject`` in ``stream``; None when there is none."""
    try:
        raw = await bus.js.get_last_msg(stream, subject, direct=True)
    except (nats.js.errors.NotFoundError, nats.errors.NoRespondersError):
        return None
    return raw.seq
