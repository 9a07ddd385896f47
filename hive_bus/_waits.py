"""Every wait of one client on one follower of the events stream: ``Hive.wait`` costs no consumer of its
own, and no request beyond reading the task's state once.

The follower is one ordered consumer of the events that can end a wait or change whose outcome counts
(``completed``, ``failed``, ``moved``), made on the first wait and kept until the client closes. A wait
registers its task first and reads the task's state after: a consumer delivers only what the stream has
stored, so an event it delivered before the registration was stored before it, and the read sees it;
every event delivered after reaches the wait. Waiting on a subscription to the task's subjects instead
left a gap (a message reaches subscribers before the stream stores it: issue 12, point 11).

Each message costs the follower a split of its subject and two dict writes; only a waited-on task's
events are handed on (to a queue of that wait's own). The follower also remembers which tasks it saw an
event of lately (:meth:`Waits.quiet_since`): a wait on a task its client has just queued, with nowhere
to move to, then needs no read at all when nothing has ended it yet, which is nearly always.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from ._bus import Bus
from ._errors import BusUnavailable
from ._nats import BUS_ERRORS, follow, stream_seq, unsubscribe


@dataclass(frozen=True, slots=True)
class Seen:
    """One event of a waited-on task, as the follower delivered it."""

    subject: str
    seq: int  # its sequence in the events stream
    data: bytes


# How many tasks the follower remembers having seen an event of: a few hundred kB.
RECENT_TASKS = 8192


class Waits:
    """The follower and the waits on it (see the module's docstring)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._waiting: dict[str, list[MemoryObjectSendStream[Seen]]] = {}
        self._start_seq: int | None = None  # the follower's first sequence, while it runs
        self._last_seq = 0  # the last sequence it delivered (its first, less one, before any)
        self._recent: OrderedDict[str, int] = OrderedDict()  # task id -> sequence of its last event seen
        self._horizon = 0  # every event seen at or after this sequence is in _recent
        self._sub: JetStreamContext.PushSubscription | None = None
        self._starting = anyio.Lock()

    @asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[MemoryObjectReceiveStream[Seen]]:
        """The events of ``task_id`` the follower delivers from now on, until the block ends. Raises
        :class:`BusUnavailable` when the follower cannot be started."""
        try:
            await self._start()
        except BUS_ERRORS as exc:
            raise BusUnavailable(
                f"could not follow the events stream to watch task {task_id}: {exc}"
            ) from None
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

    def __len__(self) -> int:
        """How many tasks are being waited on now."""
        return len(self._waiting)

    def mark(self) -> int | None:
        """Where the follower is now, for :meth:`quiet_since` of a task queued after this call (every
        event of it is stored after this); None when the follower is not running."""
        return self._last_seq if self._start_seq is not None else None

    def quiet_since(self, task_id: str, seq: int) -> bool:
        """Whether the follower has delivered every ``completed``, ``failed`` and ``moved`` event stored
        after ``seq`` (a :meth:`mark`), and none of them was ``task_id``'s: call it once the task's
        watch stands, and each event stored later reaches the watch."""
        start = self._start_seq
        return (
            start is not None
            and start <= seq + 1
            and self._horizon <= seq + 1
            and self._recent.get(task_id, 0) <= seq
        )

    async def close(self) -> None:
        """Stop following, and delete the follower's consumer at once (the server would after some
        seconds without a listener)."""
        sub, self._sub, self._start_seq = self._sub, None, None
        if sub is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(2), contextlib.suppress(*BUS_ERRORS):
            name = (await sub.consumer_info()).name
            await unsubscribe(sub)
            await self._bus.js.delete_consumer(self._bus.names.events_stream, name)
        await unsubscribe(sub, timeout_s=2)  # when the consumer could not be named

    async def _start(self) -> None:
        if self._sub is not None:
            return
        async with self._starting:
            if self._sub is not None:
                return
            names = self._bus.names
            start = (await self._bus.js.stream_info(names.events_stream)).state.last_seq + 1
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                filter_subjects=[*names.final_events(), names.moved_events],
            )
            self._recent.clear()
            self._horizon = start
            self._last_seq = start - 1
            self._sub = await follow(
                self._bus.js, names.all_events, stream=names.events_stream, config=config, cb=self._on_msg
            )
            self._start_seq = start

    async def _on_msg(self, msg: Msg) -> None:
        tokens = msg.subject.split(".")
        if len(tokens) != 5:
            return
        task_id, seq = tokens[3], stream_seq(msg.reply)
        self._recent[task_id] = seq if seq is not None else sys.maxsize  # unknown: never "quiet"
        self._last_seq = max(self._last_seq, seq or 0)
        self._recent.move_to_end(task_id)
        if len(self._recent) > RECENT_TASKS:
            _, forgotten = self._recent.popitem(last=False)
            self._horizon = max(self._horizon, forgotten + 1)
        if queues := self._waiting.get(task_id):
            seen = Seen(msg.subject, seq or 0, msg.data)
            for queue in queues:
                queue.send_nowait(seen)
