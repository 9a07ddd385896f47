"""Following every message of a stream from now on, with memory bounded however far behind one falls.

A push subscription hands a process whatever the server sends: when the gateway is busy (a burst of
submissions), the events it follows for its metrics pile up in its memory, tens of megabytes at a
time. Here an ephemeral pull consumer (no acks) is asked for ``batch`` messages at a time, and for the
next batch once those are in: whatever the gateway has not reached yet waits in the stream, on the
server. Each message costs one callback, with no per-message task or timer.

If the consumer is lost (a server restart, or it timed out while the connection was down), a new one
starts just after the last message applied, so nothing is applied twice or skipped.

Given ``start_seq`` and ``stop_seq``, it reads a stretch of the stream that is already stored (the
history's backfill on start) the same way: from ``start_seq`` up to, not including, ``stop_seq``, and
:meth:`EventFollower.run` returns once it has.

Each provider's events are a stream of their own: :func:`follow_providers` runs a follower for each,
and for each provider's stream that appears later, from its start.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import anyio
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from hive_bus._events import watch_providers
from hive_bus._nats import BUS_ERRORS, PullInbox, pull_subject, stream_seq, why
from hive_bus.bus import Bus

log = logging.getLogger("hive_bus.follower")


class EventFollower:
    """Hands every message of ``stream`` on one of ``subjects`` (filters) to ``apply(subject, data)``,
    in stream order, from the moment :meth:`run` starts."""

    def __init__(
        self,
        bus: Bus,
        stream: str,
        subjects: Sequence[str],
        apply: Callable[[str, bytes, dict[str, str] | None], None],
        *,
        batch: int = 256,
        expires_s: float = 5.0,
        start_seq: int | None = None,
        stop_seq: int | None = None,
    ) -> None:
        self._bus = bus
        self.stream = stream
        self._subjects = list(subjects)
        self._apply = apply
        self._batch = batch
        self._expires_s = expires_s
        self.next_seq = 0  # the next stream sequence to apply
        self._last_reply: str | None = None  # of the last message applied: it holds its sequence
        self._consumer_token = ""  # in the reply subject of each message of the current consumer
        self._received = 0
        self._status: str | None = None
        self._answered = anyio.Event()
        self._start_seq = start_seq
        self._stop_seq = stop_seq
        self._reached_stop = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow until cancelled; started once the first consumer exists (it raises if the bus does
        not answer then)."""
        bus = self._bus
        if self._start_seq is None:
            info = await bus.js.stream_info(self.stream)
            self.next_seq = info.state.last_seq + 1
        else:
            self.next_seq = self._start_seq
        if self._stop_seq is not None and self.next_seq >= self._stop_seq:
            task_status.started()
            return
        inbox = PullInbox(bus.nc, self._on_message, pending_msgs_limit=4 * self._batch)
        await inbox.start()
        try:
            consumer: str | None = await self._consumer(first=True)
            task_status.started()
            pause_s = 1.0
            while True:
                if consumer is None:
                    await anyio.sleep(pause_s)
                    pause_s = min(2 * pause_s, 30.0)
                    consumer = await self._consumer()
                    continue
                pause_s = 1.0
                pulled = await self._pull(consumer, inbox)
                if self._stop_seq is not None and self._stretch_read():
                    await self._delete(consumer)
                    return
                if not pulled:
                    log.warning(
                        "the %s consumer %s is gone; following again from %d",
                        self.stream,
                        consumer,
                        self.next_seq,
                    )
                    await self._delete(consumer)
                    consumer = await self._consumer()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await inbox.stop()

    async def _consumer(self, *, first: bool = False) -> str | None:
        """A new consumer from :attr:`next_seq`; None when the bus does not answer (logged), or the
        error itself the first time."""
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq,
            ack_policy=AckPolicy.NONE,
            filter_subjects=self._subjects,
            inactive_threshold=max(30.0, 4 * self._expires_s),
            mem_storage=True,
            num_replicas=1,
        )
        try:
            info = await self._bus.js.add_consumer(self.stream, config)
        except BUS_ERRORS as exc:
            if first:
                raise
            log.warning("could not follow the %s stream (%s); trying again", self.stream, exc)
            return None
        # Messages of an earlier consumer may still be on their way: only this one's count.
        self._consumer_token = f".{info.name}."
        return info.name

    async def _pull(self, consumer: str, inbox: PullInbox) -> bool:
        """Ask for a batch and apply what comes until it is full or expires. False when the consumer
        no longer answers as it should."""
        self._received, self._status, self._answered = 0, None, anyio.Event()
        subject = pull_subject(self.stream, consumer)
        try:
            await inbox.send(subject, inbox.next_reply(), batch=self._batch, expires_s=self._expires_s)
        except BUS_ERRORS as exc:
            log.warning("could not ask the %s stream for events: %s", self.stream, exc)
            await anyio.sleep(1.0)
            return True  # the connection comes back; the consumer outlives a short outage
        with anyio.move_on_after(self._expires_s + 5.0):
            await self._answered.wait()
        self._advance()
        if not self._answered.is_set():
            return self._bus.nc.is_connected is False  # no answer while connected: it is gone
        # 408: the request expired with fewer messages than asked; anything else ended the consumer
        return self._status in (None, "408")

    def _stretch_read(self) -> bool:
        """Whether a bounded read is done: it met ``stop_seq``, or a pull ended short (408, 404: the
        stream had no more for it, and everything before ``stop_seq`` was stored when it began)."""
        return self._reached_stop or self.next_seq >= (self._stop_seq or 0) or self._status in ("404", "408")

    def _advance(self) -> None:
        if self._last_reply is not None and (seq := stream_seq(self._last_reply)) is not None:
            self.next_seq = seq + 1

    def _on_message(self, msg: Msg, status: str | None) -> None:
        if status is not None:  # the end of the request (idle heartbeats do not come here)
            self._status = status
            self._answered.set()
            return
        if self._consumer_token not in msg.reply:
            return
        seq = stream_seq(msg.reply) if self._stop_seq is not None else None
        if self._stop_seq is not None and seq is not None and seq >= self._stop_seq:
            self._reached_stop = True  # the live follower applies this one
            self._answered.set()
            return
        self._last_reply = msg.reply
        try:
            self._apply(msg.subject, msg.data, msg.headers)
        except Exception:  # a bug here must not stop the following, nor the gateway
            log.exception("could not apply a message of the %s stream", self.stream)
        self._received += 1
        if self._received >= self._batch:
            self._answered.set()
        elif self._stop_seq is not None and seq is not None and seq + 1 >= self._stop_seq:
            # the last one of a bounded read: done now, not when the pull expires (a second a stream,
            # which made a gateway's reading of the hour take as many seconds as there are providers)
            self._answered.set()

    async def _delete(self, consumer: str) -> None:
        with anyio.move_on_after(2), contextlib.suppress(*BUS_ERRORS):
            await self._bus.js.delete_consumer(self.stream, consumer)


async def follow_providers(
    bus: Bus,
    subjects: Callable[[str], Sequence[str]],
    apply: Callable[[str, bytes, dict[str, str] | None], None],
    *,
    task_status: TaskStatus[dict[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """An :class:`EventFollower` of each provider's events stream, on ``subjects(provider)``: from now
    on for the streams there are, from its start for each that appears later (nothing of it is missed).
    Runs until cancelled; started, once every stream there is is followed, with the sequence each of
    those followers began at, by provider (what is stored before it is the history's backfill)."""
    began: dict[str, int] = {}
    started = False

    async def on_new(provider: str) -> None:
        stream = bus.names.events_stream_of(provider)
        if not started:
            follower = EventFollower(bus, stream, subjects(provider), apply)
            await tg.start(follower.run)
            began[provider] = follower.next_seq
        else:
            tg.start_soon(_follow_new, EventFollower(bus, stream, subjects(provider), apply, start_seq=1))

    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: watch_providers(bus, on_new, task_status=task_status))
        started = True
        task_status.started(began)


async def _follow_new(follower: EventFollower) -> None:
    """Follow a stream that appeared, trying again until its first consumer is made."""
    pause_s = 1.0
    while True:
        try:
            await follower.run()
            return
        except BUS_ERRORS as exc:
            log.warning("could not follow the new stream %s (%s); trying again", follower.stream, why(exc))
        await anyio.sleep(pause_s)
        pause_s = min(2 * pause_s, 30.0)
