"""Reading a streamed task: its output piece by piece as the worker produces it, then its end.

:meth:`Hive.stream` subscribes to the task's chunks (:mod:`hive_bus._chunks`, core NATS) before the
task is submitted, so that no chunk is missed, and follows the task's events from a consumer of its own
(the same reading as :meth:`Hive.wait`). It yields, in order:

- :class:`StreamText`: a piece of the output, in the order the provider produced it;
- :class:`StreamWaiting`: nothing came for ``keepalive_s`` (the task is queued, waits out a rate limit, or a
  call is slow to start); an HTTP answer sends an SSE comment, so that proxies keep it open;
- :class:`StreamRestarted`: an attempt whose text had begun to stream ended without completing the task (it
  failed and is retried, it moved to a fallback, or its worker is gone: while nothing comes, the reader
  looks for the worker's heartbeat at each ``keepalive_s``, and one that expired ends the attempt, long
  before the server hands the task to another worker after AckWait): the text streamed so far does not
  count, and the next attempt's text starts over;
- :class:`StreamEnded`, last: the task's view once it completed, failed or was cancelled (or when
  ``timeout_s`` passed).

Chunks are a side channel that may be lost; the completed event is the record. A chunk missing from the
sequence stops the attempt's pieces, and whatever the reader did not receive is yielded from the
completed event's output as one last :class:`StreamText`, so the text yielded always adds up to the output.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.lowlevel
import msgspec
import nats.errors
import nats.js.errors
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ._bus import Bus
from ._chunks import chunk_decoder
from ._errors import BusUnavailable
from ._events import CLOCKS_APART_S
from ._messages import (
    Cancelled,
    Completed,
    Failed,
    Moved,
    Queued,
    Retrying,
    Running,
    Task,
    TaskRequest,
    TaskStatus,
    TaskView,
    decode_event,
)
from ._nats import BUS_ERRORS, unsubscribe

if TYPE_CHECKING:
    from ._client import Hive

log = logging.getLogger("hive_bus.client")

DEFAULT_KEEPALIVE_S = 10.0
# A stream reads the task's state again after this long without an event, as a wait does.
RECHECK_S = 5.0
WATCH_IDLE_S = 30.0


@dataclass(frozen=True, slots=True)
class StreamText:
    """A piece of the output of the task's attempt ``attempt``."""

    text: str
    attempt: int


@dataclass(frozen=True, slots=True)
class StreamWaiting:
    """Nothing new for ``keepalive_s``; ``status`` is the task's as last seen."""

    status: TaskStatus


@dataclass(frozen=True, slots=True)
class StreamRestarted:
    """Attempt ``attempt`` had streamed ``discarded`` when it ended without completing the task
    (``why``); the task runs again and its text starts over."""

    attempt: int
    why: str
    discarded: str


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The task completed or failed (``view.done``), or the stream's ``timeout_s`` passed (not done)."""

    view: TaskView


StreamItem = StreamText | StreamWaiting | StreamRestarted | StreamEnded
_Source = Literal["chunk", "event"]


class TaskStream:
    """One streamed task; ``async for item in stream`` yields its :data:`StreamItem` s. Get one with
    ``async with hive.stream(request) as stream``."""

    def __init__(
        self,
        hive: Hive,
        task_id: str,
        provider: str,
        inbox: MemoryObjectReceiveStream[tuple[_Source, Msg]],
        chunks_pending: Callable[[], int],
        follow: Callable[[str, datetime], Awaitable[None]],
        *,
        duplicate: bool,
        warnings: tuple[str, ...] = (),
        keepalive_s: float,
        timeout_s: float | None,
    ) -> None:
        self.task_id = task_id
        self.duplicate = duplicate
        self.warnings = warnings  # as a submission's (a provider no worker serves)
        self._hive = hive
        self._names = hive.bus.names
        self._provider = provider  # the provider the task is assigned to: only its chunks count
        self._inbox = inbox
        self._chunks_pending = chunks_pending
        self._follow = follow  # the task's events under another provider: its stream, from a time
        self._keepalive_s = keepalive_s
        self._timeout_s = timeout_s
        self._status: TaskStatus = "queued"
        # the attempt whose chunks are read: (provider, delivery), its number, its text, the next seq
        self._run: tuple[str, int] | None = None
        self._attempt = 0
        self._worker = ""  # the worker running it, as its chunks and events say
        self._sent = ""
        self._next_seq = 0
        self._gap = False
        self._over: set[tuple[str, int]] = set()  # attempts that ended: late chunks of theirs are dropped
        self._held: deque[tuple[_Source, Msg]] = deque()  # read from the inbox out of turn, read next

    def __aiter__(self) -> AsyncIterator[StreamItem]:
        return self._items()

    async def _items(self) -> AsyncIterator[StreamItem]:
        end_at = math.inf if self._timeout_s is None else anyio.current_time() + self._timeout_s
        checked_at = anyio.current_time()
        while True:
            left_s = end_at - anyio.current_time()
            if left_s <= 0:
                # a task that ended as the time ran out: what its output has that was not streamed, too
                for item in self._ending(await self._hive.get(self.task_id)):
                    yield item
                return
            got: tuple[_Source, Msg] | None = self._held.popleft() if self._held else None
            if got is None:
                with anyio.move_on_after(min(self._keepalive_s, left_s)):
                    got = await self._inbox.receive()
            if got is None:
                if anyio.current_time() - checked_at >= RECHECK_S:
                    # a consumer lost with its server (a restart) delivers nothing more: read the state
                    checked_at = anyio.current_time()
                    view = await self._hive.get(self.task_id)
                    if view.done:
                        for item in self._ending(view):
                            yield item
                        return
                    self._status = view.status
                if self._sent and self._worker and not await self._beating(self._worker):
                    for item in self._restart(f"worker {self._worker} stopped: its heartbeat expired"):
                        yield item
                if end_at > anyio.current_time():
                    yield StreamWaiting(self._status)
                continue
            source, msg = got
            if source == "chunk":
                for item in self._on_chunk(msg):
                    yield item
                continue
            checked_at = anyio.current_time()
            items, ended = await self._on_event(msg)
            for item in items:
                yield item
            if ended is not None:
                for item in await self._arrived_chunks():
                    yield item
                ended = await self._hive._read_output(ended)  # an output kept in the Object Store
                for item in self._ending(ended):
                    yield item
                return

    async def _arrived_chunks(self, up_to_attempt: float = math.inf) -> list[StreamItem]:
        """The chunks of attempts up to ``up_to_attempt`` that reached this client before the event
        being read did (a final one, or an attempt's end). Each subscription hands its messages over in
        a task of its own, so the event may be handed over first; the worker published them before it,
        and they are parsed and queued before it: let their task hand them over. Messages read past
        them wait in ``_held``, in their order."""
        for _ in range(100):  # each pass lets the subscription's task take every queued message
            if not self._chunks_pending():
                break
            await anyio.lowlevel.checkpoint()
        items: list[StreamItem] = []
        while True:
            try:
                source, msg = self._inbox.receive_nowait()
            except anyio.WouldBlock:
                return items
            if source == "chunk" and _attempt_of(msg) <= up_to_attempt:
                items += self._on_chunk(msg)
            else:
                self._held.append((source, msg))

    async def _beating(self, worker: str) -> bool:
        """False once the worker's heartbeat has expired (killed, or cut off); True when unknown."""
        try:
            await self._hive.bus.workers_kv.get(worker)
        except nats.js.errors.KeyNotFoundError:  # deleted or expired alike
            return False
        except BUS_ERRORS:
            return True  # a credential that may not read heartbeats, a bus that does not answer
        return True

    def _on_chunk(self, msg: Msg) -> list[StreamItem]:
        if self._names.provider_of_subject(msg.subject) != self._provider:
            return []  # a worker of a provider the task is not on (a credential's own subjects only)
        try:
            chunk = chunk_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return []
        if chunk.task_id != self.task_id:
            return []
        run = (self._provider, chunk.delivery)
        items: list[StreamItem] = []
        if run != self._run:
            if run in self._over or (self._run is not None and chunk.delivery < self._run[1]):
                return []  # an attempt that ended already, or an older one still running (a zombie)
            if self._sent:
                items.append(
                    StreamRestarted(self._attempt, f"attempt {chunk.attempt} started over", self._sent)
                )
            self._begin(run, chunk.attempt)
        if self._gap:
            return items
        if chunk.seq != self._next_seq:
            self._gap = True  # a chunk was lost: the rest of this attempt comes from the completed event
            return items
        self._next_seq += 1
        self._sent += chunk.text
        self._worker = chunk.worker or self._worker
        self._status = "running"
        items.append(StreamText(chunk.text, chunk.attempt))
        return items

    def _begin(self, run: tuple[str, int] | None, attempt: int) -> None:
        if self._run is not None:
            self._over.add(self._run)
        self._run, self._attempt, self._sent, self._next_seq, self._gap = run, attempt, "", 0, False
        self._worker = ""

    def _restart(self, why: str) -> list[StreamItem]:
        """The current attempt is over without an outcome; its text, if any, no longer counts."""
        items: list[StreamItem] = [StreamRestarted(self._attempt, why, self._sent)] if self._sent else []
        self._begin(None, 0)
        return items

    async def _on_event(self, msg: Msg) -> tuple[list[StreamItem], TaskView | None]:
        try:
            event = decode_event(msg.subject, msg.data, msg.headers)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return [], None
        if isinstance(event, Queued | Moved):
            view = await self._hive.get(self.task_id)  # replayed or moved: where is it assigned now
            if view.provider != self._provider:
                self._provider = view.provider
                # its events there from the time of the move (a second early: two streams' clocks)
                await self._follow(view.provider, _stored_at(msg) - timedelta(seconds=CLOCKS_APART_S))
                return self._restart(f"moved to {view.provider}"), (view if view.done else None)
            return [], (view if view.done else None)
        if self._names.provider_of_subject(msg.subject) != self._provider or event.provider != self._provider:
            return [], None  # another credential's event: not the task's
        match event:
            case Running():
                self._status = "running"
                if self._sent and event.attempt > self._attempt:
                    return self._restart(f"attempt {event.attempt} started"), None
            case Retrying():
                self._status = "retrying"
                items = await self._arrived_chunks(event.attempt)  # what the attempt streamed first
                if self._sent:
                    return [*items, *self._restart(f"attempt {event.attempt} failed: {event.error}")], None
                return items, None
            case Completed() | Failed() | Cancelled():
                return [], TaskView.of(event)
        return [], None

    def _ending(self, view: TaskView) -> list[StreamItem]:
        """The last items: what the completed output has that was not streamed, then the end."""
        items: list[StreamItem] = []
        output = view.output
        if view.status == "completed":
            text = output if isinstance(output, str) else msgspec.json.encode(output).decode()
            if not isinstance(output, str) and self._sent:
                pass  # JSON streamed as text: its text is the model's, the value its parse
            elif text.startswith(self._sent):
                if len(text) > len(self._sent):
                    items.append(StreamText(text[len(self._sent) :], view.attempt))
            else:
                why = "the recorded output is not the text streamed (another attempt's)"
                items += [StreamRestarted(self._attempt, why, self._sent), StreamText(text, view.attempt)]
        items.append(StreamEnded(view))
        return items


def _attempt_of(msg: Msg) -> int:
    """The attempt a chunk message is of (0 when it is not a chunk: it is dropped when read)."""
    try:
        return chunk_decoder.decode(msg.data).attempt
    except (msgspec.DecodeError, msgspec.ValidationError):
        return 0


class _Watch:
    """The consumers of one task's events, one on the events stream of each provider it is followed on
    (a move takes it to another provider's), each delivering to the same inbox; deleted at the end."""

    def __init__(self, bus: Bus, task_id: str, inbox: str) -> None:
        self._bus = bus
        self._task_id = task_id
        self._inbox = inbox
        self._made: list[tuple[str, str]] = []  # (stream, consumer)

    async def follow(self, provider: str, since: datetime | None = None) -> None:
        """The task's events under ``provider``: its last one so far then each new one, or with
        ``since``, each stored since (a move: what the provider's workers wrote before is not the
        task's). Raises :class:`BusUnavailable`."""
        names = self._bus.names
        stream = names.events_stream_of(provider)
        config = ConsumerConfig(
            deliver_subject=self._inbox, filter_subject=names.events_of(self._task_id, provider),
            deliver_policy=DeliverPolicy.LAST if since is None else DeliverPolicy.BY_START_TIME,
            opt_start_time=since, ack_policy=AckPolicy.NONE, mem_storage=True, num_replicas=1,
            inactive_threshold=WATCH_IDLE_S,
        )  # fmt: skip
        try:
            self._made.append((stream, (await self._bus.js.add_consumer(stream, config)).name))
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not follow task {self._task_id} on {provider}: {exc}") from None

    async def close(self) -> None:
        """Delete the consumers at once, not after :data:`WATCH_IDLE_S` (no answer awaited)."""
        settings = self._bus.settings
        js_api = f"$JS.{settings.js_domain}.API" if settings.js_domain else "$JS.API"
        for stream, consumer in self._made:
            with contextlib.suppress(*BUS_ERRORS):
                await self._bus.nc.publish(f"{js_api}.CONSUMER.DELETE.{stream}.{consumer}")


@asynccontextmanager
async def open_stream(
    hive: Hive, request: TaskRequest, *, keepalive_s: float, timeout_s: float | None
) -> AsyncIterator[TaskStream]:
    """Subscribe to the task's chunks, submit it (asking its worker to stream), follow its events (on
    its provider's events stream, and after a move on the next one's)."""
    bus, names = hive.bus, hive.bus.names
    task = Task.from_request(msgspec.structs.replace(request, stream=True))
    send, receive = anyio.create_memory_object_stream[tuple[_Source, Msg]](max_buffer_size=math.inf)
    subs: list[Subscription] = []
    watch: _Watch | None = None
    try:
        subs.append(await _subscribe(hive, names.chunks_of(task.id), send, "chunk"))
        warnings = await hive._admit(request)
        accepted = await hive._submit_task(task, request.idempotency_key, warnings)
        provider = task.provider
        if accepted.id != task.id:  # an idempotency key seen before: the first task is the one to read
            await unsubscribe(subs.pop())
            subs.append(await _subscribe(hive, names.chunks_of(accepted.id), send, "chunk"))
            provider = (await hive.get(accepted.id)).provider
        inbox = bus.nc.new_inbox()
        subs.append(await _subscribe(hive, inbox, send, "event"))
        watch = _Watch(bus, accepted.id, inbox)
        await watch.follow(provider)
        with receive:
            chunk_sub = subs[0]
            yield TaskStream(
                hive, accepted.id, provider, receive, lambda: chunk_sub.pending_msgs, watch.follow,
                duplicate=accepted.duplicate, warnings=accepted.warnings, keepalive_s=keepalive_s,
                timeout_s=timeout_s,
            )  # fmt: skip
    finally:
        send.close()
        receive.close()  # a submission refused before the stream was handed out
        with anyio.CancelScope(shield=True):  # a reader cancelled (its client gone) still cleans up
            for sub in subs:
                await unsubscribe(sub)
            if watch is not None:
                await watch.close()


def _stored_at(msg: Msg) -> datetime:
    """When the server stored a message it delivered (now, when its reply subject does not say)."""
    try:
        return msg.metadata.timestamp
    except nats.errors.NotJSMessageError:
        return datetime.now(UTC)


async def _subscribe(
    hive: Hive, subject: str, send: MemoryObjectSendStream[tuple[_Source, Msg]], source: _Source
) -> Subscription:
    async def deliver(msg: Msg) -> None:
        if msg.data:  # not a status message of the server's
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                send.send_nowait((source, msg))

    try:
        return await hive.bus.nc.subscribe(subject, cb=deliver)
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not subscribe to {subject}: {exc}") from None
