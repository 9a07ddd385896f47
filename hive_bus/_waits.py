"""Every wait of one client on the followers of the providers' events streams: ``Hive.wait`` costs no
consumer of its own, and no request beyond reading the task's state once.

Each provider's events are a stream of their own. A follower is one ordered consumer of a provider's
events that can end a wait or change whose outcome counts (``completed``, ``failed``, ``cancelled``,
``moved``), made the first time a wait needs that provider and kept until the client closes. A wait
registers its task first, makes sure its provider is followed, and reads the task's state after: a
consumer delivers only what the stream has stored, so an event it delivered before the registration
was stored before it, and the read sees it; every event delivered after reaches the wait. (A task that
moves to a provider not followed yet is read again once that provider is.) Waiting on a subscription to
the task's subjects instead left a gap (a message reaches subscribers before the stream stores it:
issue 12, point 11).

Each message costs its follower a split of its subject and two dict writes; only a waited-on task's
events are handed on (to a queue of that wait's own). The followers also remember which tasks they saw
an event of lately (:meth:`Waits.quiet_since`): a wait on a task its client has just queued, with
nowhere to move to, then needs no read at all when nothing has ended it yet, which is nearly always.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from ._bus import Bus, ensure_events
from ._errors import BusUnavailable
from ._nats import BUS_ERRORS, follow, stream_seq, unsubscribe


@dataclass(frozen=True, slots=True)
class Seen:
    """One event of a waited-on task, as a follower delivered it."""

    subject: str
    seq: int  # its sequence in its provider's events stream
    data: bytes


# How many tasks each follower remembers having seen an event of: a few hundred kB.
RECENT_TASKS = 8192


@dataclass(slots=True)
class _Follower:
    """One provider's follower: its consumer, and what it has delivered."""

    start_seq: int  # its first sequence
    last_seq: int  # the last sequence it delivered (its first, less one, before any)
    sub: JetStreamContext.PushSubscription | None = None
    recent: OrderedDict[str, int] = field(default_factory=OrderedDict)  # task id -> its last event's seq
    horizon: int = 0  # every event seen at or after this sequence is in ``recent``


class Waits:
    """The followers and the waits on them (see the module's docstring)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._waiting: dict[str, list[MemoryObjectSendStream[Seen]]] = {}
        self._followers: dict[str, _Follower] = {}
        self._starting = anyio.Lock()

    @asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[MemoryObjectReceiveStream[Seen]]:
        """The events of ``task_id`` the followers deliver from now on, until the block ends: of each
        provider :meth:`follow` was called for (before the task's state is read)."""
        send, receive = anyio.create_memory_object_stream[Seen](math.inf)
        self._waiting.setdefault(task_id, []).append(send)
        try:
            yield receive
        finally:
            queues = self._waiting.get(task_id, [])
            if send in queues:
                queues.remove(send)
            if not queues:
                self._waiting.pop(task_id, None)
            send.close()
            receive.close()

    def follows(self, provider: str) -> bool:
        return provider in self._followers

    async def follow(self, provider: str) -> None:
        """Follow ``provider``'s events from now on (at once if it is followed already). Raises
        :class:`BusUnavailable` when its follower cannot be started."""
        if provider in self._followers:
            return
        try:
            await self._start(provider)
        except BUS_ERRORS as exc:
            raise BusUnavailable(
                f"could not follow the events of {provider} to watch a task: {exc}"
            ) from None

    def __len__(self) -> int:
        """How many tasks are being waited on now."""
        return len(self._waiting)

    def mark(self, provider: str) -> int | None:
        """Where ``provider``'s follower is now, for :meth:`quiet_since` of a task of it queued after
        this call (every event of it is stored after this); None when that provider is not followed."""
        follower = self._followers.get(provider)
        return follower.last_seq if follower is not None else None

    def quiet_since(self, task_id: str, provider: str, seq: int) -> bool:
        """Whether ``provider``'s follower has delivered every ``completed``, ``failed``, ``cancelled``
        and ``moved`` event stored after ``seq`` (a :meth:`mark`), and none of them was ``task_id``'s:
        call it once the task's watch stands, and each event stored later reaches the watch."""
        follower = self._followers.get(provider)
        return (
            follower is not None
            and follower.start_seq <= seq + 1
            and follower.horizon <= seq + 1
            and follower.recent.get(task_id, 0) <= seq
        )

    async def close(self) -> None:
        """Stop following, and delete the followers' consumers at once (the server would after some
        seconds without a listener)."""
        followers, self._followers = self._followers, {}
        for provider, follower in followers.items():
            sub = follower.sub
            if sub is None:
                continue
            stream = self._bus.names.events_stream_of(provider)
            with anyio.CancelScope(shield=True), anyio.move_on_after(2), contextlib.suppress(*BUS_ERRORS):
                name = (await sub.consumer_info()).name
                await unsubscribe(sub)
                await self._bus.js.delete_consumer(stream, name)
            await unsubscribe(sub, timeout_s=2)  # when the consumer could not be named

    async def _start(self, provider: str) -> None:
        async with self._starting:
            if provider in self._followers:
                return
            names = self._bus.names
            stream = names.events_stream_of(provider)
            await ensure_events(self._bus, provider)  # a provider none of whose work was queued here
            start = (await self._bus.js.stream_info(stream)).state.last_seq + 1
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                filter_subjects=[*names.final_events(provider), names.event_subject(provider, "*", "moved")],
            )
            follower = _Follower(start_seq=start, last_seq=start - 1, horizon=start)

            async def on_msg(msg: Msg) -> None:
                self._on_msg(follower, msg)

            follower.sub = await follow(
                self._bus.js, names.events_under(provider), stream=stream, config=config, cb=on_msg
            )
            self._followers[provider] = follower

    def _on_msg(self, follower: _Follower, msg: Msg) -> None:
        tokens = msg.subject.split(".")
        if len(tokens) != 5:
            return
        task_id, seq = tokens[3], stream_seq(msg.reply)
        recent = follower.recent
        recent[task_id] = seq if seq is not None else sys.maxsize  # unknown: never "quiet"
        follower.last_seq = max(follower.last_seq, seq or 0)
        recent.move_to_end(task_id)
        if len(recent) > RECENT_TASKS:
            _, forgotten = recent.popitem(last=False)
            follower.horizon = max(follower.horizon, forgotten + 1)
        if queues := self._waiting.get(task_id):
            seen = Seen(msg.subject, seq or 0, msg.data)
            for queue in queues:
                queue.send_nowait(seen)
