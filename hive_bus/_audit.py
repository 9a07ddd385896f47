"""The store audit: tasks the record says are waiting whose message the tasks stream no longer holds.

nats-server rebuilds each stream from its message blocks when it starts. A damaged block costs the
messages in it, and nats-server 2.15 does not say so in the stream state (its ``lost`` stays unset; see
docs/reliability.md). The record still knows those tasks: the events stream holds each task's
``queued`` event (the tasks stream's headers-only marker of the task message, or on an older bus the
event with the whole task) and no final event after it. The audit compares the two:

1. first by counts, which nats-server keeps up to date as events are stored (hive_bus._tallies):
   the tasks the record says are open (``queued`` events less final ones: ``completed``, ``failed``,
   ``cancelled``) against the tasks the queue holds (the workers' consumers' pending and unacked
   tasks: a damaged message can stay in the stream's own count after the consumer has gone past it for
   good; the stream's count per subject where no worker has a consumer). When it holds at least as many,
   no task is missing and the audit ends there: its cost does not grow with the bus, and it keeps no
   task in memory (a bus of a million queued tasks is audited in milliseconds; bench/scale.py). A
   count can only hide a loss, never invent one: a held message that is no longer open (a cancelled
   task no worker has dropped yet, an outcome stored and not yet acked) or a second final of one task
   (a rejected submission queued again, a forged final of another provider's task) makes up for a
   missing one until it is gone;
2. when it holds fewer, task by task (``AuditReport.compared == "ids"``): it reads every provider's
   events stream by subject only (headers, no bodies) from its start, merged in the order they were
   stored, keeping the tasks whose last lifecycle event is ``queued`` or ``moved`` with no ``completed``
   or ``failed`` after it: the open tasks;
3. it reads the ids of the tasks the tasks stream holds that its consumers may not have acked (from
   the lowest ack floor on), by their subjects, with a headers-only consumer: no body is read;
4. an open task missing from the tasks stream (on the provider its ``queued`` event names), whose last
   event is older than ``grace_s`` and that is not a move the router has yet to queue, is read again
   by its last event. If nothing happened to it since, it is lost: a
   ``failed`` event with reason ``lost`` records it (``Nats-Msg-Id: <id>:final``, so a late outcome of
   a worker, or another gateway's audit, is recorded once), and it goes to the dead letters, from
   where ``hive dlq replay <id>`` queues it again when its record kept the task (a bus older than one
   write per submission, whose ``queued`` events carried it). A marker carries no task: the content of
   a task lost with its message is lost too, and its dead letter names the task and cannot replay it.
   The open tasks are then let go: each such audit reads the record anew.

What the audit can no longer see: the server republishes a task as its marker over core NATS, best
effort. A task whose marker was never stored is not in the record, and if its message is lost as well
nothing names it (the submitter had its ack all the same). A marker alone lost costs nothing: the task
runs, and its readers find it in the tasks stream (:func:`hive_bus._assigned.assignment`).

A move, or a scheduled task that started, stores a second ``queued`` event of the task: the counts of
open tasks come out higher than the tasks held, and the audit compares ids, finding nothing lost. An
outcome in progress makes them differ for a moment: they are taken again (:data:`COUNT_TRIES`).

The gateway runs it (:meth:`StoreAudit.run`): at start, after every reconnection, and every
``every_s``. Metrics count the ``lost`` failures (``hive_tasks_lost_total``); an alert rule fires on them.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import time
from dataclasses import dataclass
from typing import Literal

import anyio
import msgspec
import nats.errors
import nats.js
import nats.js.errors
from anyio.abc import TaskStatus
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from . import _dlq
from ._ageing import Ageing
from ._bus import Bus, ensure_events, event_providers
from ._counts import submitted_counts
from ._errors import TooLarge
from ._messages import FINAL_STATUSES, Failed, Moved, Queued, Task, decode_event, encoder, now_ms
from ._nats import BUS_ERRORS
from ._nats import reconnects as nats_reconnects
from ._nesting import Guarded
from ._size import check_fits, js_publish
from ._stats import ack_floors, queue_depths
from ._tallies import tally

log = logging.getLogger("hive_bus.audit")

FETCH_BATCH = 1000
CHECK_EVERY_S = 2.0  # how often the loop looks for a reconnection
AFTER_RECONNECT_S = 3.0  # a restarted server recovers its streams first
SHOWN_IDS = 20
# counts that differ are taken again this many times in all, this far apart, before the audit compares
# task by task: a moment's difference is a submission or an outcome in progress
COUNT_TRIES = 3
COUNT_RETRY_S = 0.2

_FINAL = FINAL_STATUSES


class _TaskId(msgspec.Struct):
    id: str


_task_id_decoder = Guarded(msgspec.json.Decoder(_TaskId), enclosing=1)


class AuditReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one audit found."""

    at_ms: int
    open: int  # tasks whose record says they wait (queued, moved, retrying, running)
    held: int  # tasks the queue holds (counted, or the ids read when compared task by task)
    lost: int  # tasks this audit found lost and dead-lettered
    lost_ids: list[str]  # the first of them
    lost_total: int  # since this process started
    seconds: float  # how long the audit took
    # "counts": the tasks stream held as many tasks as the record has open ones, compared as counts;
    # "ids": it held fewer, and the audit compared them task by task
    compared: Literal["counts", "ids"] = "ids"
    # tasks that had waited in the queue nearly as long as the bus keeps tasks, failed ``expired``
    # (hive_bus._ageing) by this audit
    expired: int = 0


@dataclass(slots=True)
class _Open:
    provider: str  # the provider token of its last lifecycle event's subject (whose stream holds it)
    status: str  # queued or moved
    event_seq: int  # that event's sequence in the provider's events stream
    last_seq: int  # the sequence of its last event of any kind there
    last_at_s: float  # when that one was stored (unix seconds)


class StoreAudit:
    def __init__(self, bus: Bus, *, grace_s: float, every_s: float) -> None:
        self._bus = bus
        self.grace_s = grace_s
        self.every_s = every_s
        self._open: dict[str, _Open] = {}
        self._next_seq: dict[str, int] = {}  # of each provider's events stream, the next sequence to read
        self._reconnects = nats_reconnects(bus.nc)
        self._lost_total = 0
        self.last: AuditReport | None = None
        self.ageing = Ageing(bus, every_s=every_s)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Audit now, after each reconnection, and every ``every_s``; failures are logged and retried."""
        task_status.started()
        due = time.monotonic()
        while True:
            reconnects = nats_reconnects(self._bus.nc)
            if reconnects != self._reconnects:
                self._reconnects = reconnects
                self._start_over()
                due = time.monotonic() + AFTER_RECONNECT_S
            if time.monotonic() >= due and self._bus.nc.is_connected:
                try:
                    await self.audit()
                    due = time.monotonic() + self.every_s
                except BUS_ERRORS as exc:
                    log.warning("store audit failed (%s); trying again", exc)
                    due = time.monotonic() + 10 * CHECK_EVERY_S
                except Exception as exc:  # a message it cannot process must not stop the gateway
                    log.error("store audit failed (%s: %s); trying again later", type(exc).__name__, exc)
                    due = time.monotonic() + self.every_s
            await anyio.sleep(CHECK_EVERY_S)

    def _start_over(self) -> None:
        self._open.clear()
        self._next_seq.clear()

    async def audit(self) -> AuditReport:
        """One audit: fail the tasks that waited too long (:mod:`hive_bus._ageing`), read the record on,
        read the queue, and record each task found lost."""
        t0 = time.perf_counter()
        expired = len(await self.ageing.sweep())
        await self.ageing.trim()
        for attempt in range(COUNT_TRIES):
            if attempt:  # submissions and outcomes in progress may have made the counts differ
                await anyio.sleep(COUNT_RETRY_S)
            open_count, held_count = await self._counts()
            if held_count >= open_count:
                break
        if held_count >= open_count:
            report = AuditReport(
                at_ms=now_ms(), open=open_count, held=held_count, lost=0, lost_ids=[],
                lost_total=self._lost_total, seconds=round(time.perf_counter() - t0, 3), compared="counts",
                expired=expired,
            )  # fmt: skip
            self.last = report
            return report
        self._start_over()  # the record is read from its start, and let go after
        try:
            self.last = msgspec.structs.replace(await self._audit_ids(t0), expired=expired)
            return self.last
        finally:
            self._start_over()

    async def _counts(self) -> tuple[int, int]:
        """The tasks the record says are open (queued events less final ones), and the tasks the
        queue holds."""
        providers = await event_providers(self._bus)
        queued = sum([await tally(self._bus, "queued", p) for p in providers])
        final = sum([await tally(self._bus, status, p) for status in _FINAL for p in providers])
        # What the workers' consumers have yet to deliver or have out, rather than the stream's message
        # count: a damaged message can stay in that count after the consumer has gone past it for good.
        held = sum(d.pending + d.ack_pending for d in (await queue_depths(self._bus)).values())
        return max(0, queued - final), held

    async def _audit_ids(self, t0: float) -> AuditReport:
        await self._follow_record()
        cutoff_s = time.time() - self.grace_s
        old = {task_id for task_id, o in self._open.items() if o.last_at_s <= cutoff_s}
        held = await self._held_ids() if old else {}
        routed_up_to = await self._router_ack_floors() if old else {}
        lost: list[str] = []
        for task_id in sorted(old):
            o = self._open[task_id]
            on = held.get(task_id, set())
            if o.provider in on if o.status == "queued" else bool(on - {o.provider}):
                continue  # held on the provider it waits on (a moved one: on another)
            if o.status == "moved" and o.event_seq > routed_up_to.get(o.provider, 0):
                continue  # the router has yet to queue it on its next provider
            if await self._record_lost(task_id, o):
                lost.append(task_id)
                del self._open[task_id]
        self._lost_total += len(lost)
        report = AuditReport(
            at_ms=now_ms(), open=len(self._open), held=len(held.keys() & self._open.keys()), lost=len(lost),
            lost_ids=lost[:SHOWN_IDS],
            lost_total=self._lost_total, seconds=round(time.perf_counter() - t0, 3),
        )  # fmt: skip
        if lost:
            log.error(
                "store audit: %d task(s) missing from %s with no final outcome, dead-lettered as lost "
                "(e.g. %s); `hive dlq replay <id>` queues one again",
                len(lost), self._bus.names.tasks_stream, ", ".join(lost[:5]),
            )  # fmt: skip
        self.last = report
        return report

    async def _follow_record(self) -> None:
        """Read every provider's events stream on from where it was left, subjects only, merged in the
        order the events were stored (a task moved from one provider to another has events in both),
        into the open tasks."""
        bus = self._bus
        readers = [_Reader(bus, p, self._next_seq.get(p, 1)) for p in await event_providers(bus)]
        try:
            heads: list[tuple[float, int, int, str]] = []  # (stored at, reader, seq, subject)
            for i, reader in enumerate(readers):
                await reader.start()
                if (got := await reader.next()) is not None:
                    heapq.heappush(heads, (got[0], i, got[1], got[2]))
            while heads:
                at_s, i, seq, subject = heapq.heappop(heads)
                self._next_seq[readers[i].provider] = seq + 1
                self._note(readers[i].provider, subject, seq, at_s)
                if (got := await readers[i].next()) is not None:
                    heapq.heappush(heads, (got[0], i, got[1], got[2]))
        finally:
            for reader in readers:
                await reader.stop()

    def _note(self, on: str, subject: str, seq: int, at_s: float) -> None:
        provider, task_id, status = subject.rsplit(".", 3)[1:]
        if provider != on:
            return  # not an event of this stream's provider (a stream holds its provider's alone)
        o = self._open.get(task_id)
        if status == "queued":  # the tasks stream's markers (and a scheduled task's submission)
            self._open[task_id] = _Open(provider, status, seq, seq, at_s)
            return
        # Any other event counts only from the provider the task is on: a worker credential may write
        # events for any task id under its own provider. (After a move the subjects read here do not
        # say where to, so any provider's event counts then.)
        if o is None or (provider != o.provider and o.status != "moved"):
            return
        if status == "moved":
            self._open[task_id] = _Open(provider, status, seq, seq, at_s)
        elif status in _FINAL:
            del self._open[task_id]
        elif provider == o.provider:  # running, retrying: still open
            o.last_seq, o.last_at_s = seq, at_s

    async def _held_ids(self) -> dict[str, set[str]]:
        """The tasks the tasks stream holds that its consumers may not have acked (every message from
        the lowest ack floor of the providers' consumers on): each id with the providers it is queued on.
        Read from their subjects alone (``<prefix>.tasks.<provider>.<priority>.<task id>``), headers
        only: no body is read, and none needs to decode."""
        bus, names = self._bus, self._bus.names
        state = (await bus.js.stream_info(names.tasks_stream)).state
        held: dict[str, set[str]] = {}
        if not state.messages:
            return held
        config = ConsumerConfig(
            description="hive-bus store audit",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(state.first_seq, await self._unacked_from()),
            ack_policy=AckPolicy.NONE,
            headers_only=True,
            mem_storage=True,
            inactive_threshold=60.0,
        )
        if config.opt_start_seq is not None and config.opt_start_seq > state.last_seq:
            return held
        psub = await bus.js.pull_subscribe(names.all_tasks, stream=names.tasks_stream, config=config)
        try:
            remaining = (await psub.consumer_info()).num_pending or 0
            while remaining > 0:
                try:
                    msgs = await psub.fetch(
                        min(remaining, FETCH_BATCH), timeout=bus.settings.request_timeout_s
                    )
                except nats.errors.TimeoutError:
                    # counted and never delivered: a message the store cannot read (a flipped byte) is
                    # skipped by every consumer, and so is not held
                    log.warning(
                        "store audit: %d message(s) of %s counted but not delivered",
                        remaining,
                        names.tasks_stream,
                    )
                    break
                for msg in msgs:
                    tokens = msg.subject.split(".")
                    if len(tokens) == 5:
                        held.setdefault(tokens[4], set()).add(tokens[2])
                remaining -= len(msgs)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(*BUS_ERRORS):
                await psub.unsubscribe()
        return held

    async def _unacked_from(self) -> int:
        """The lowest sequence of the tasks stream that a provider's consumer has not acked: every
        open task's message is at or after it (a worker acks a task once its outcome is stored). 1 when
        a provider tasks were submitted to has no consumer yet (nothing acked its tasks)."""
        floors = await ack_floors(self._bus)
        if set(await submitted_counts(self._bus)) - set(floors) or not floors:
            return 1
        return min(floors.values()) + 1

    async def _router_ack_floors(self) -> dict[str, int]:
        """Of each provider, the last moved event the router has queued (all before it are too); none
        without a router."""
        names = self._bus.names
        floors: dict[str, int] = {}
        for provider in await event_providers(self._bus):
            try:
                info = await self._bus.js.consumer_info(names.events_stream_of(provider), names.router)
            except nats.js.errors.NotFoundError:
                continue
            floors[provider] = (
                info.ack_floor.stream_seq if info.ack_floor and info.ack_floor.stream_seq else 0
            )
        return floors

    async def _record_lost(self, task_id: str, o: _Open) -> bool:
        """Record one task as lost if nothing happened to it since the record was read."""
        bus, names = self._bus, self._bus.names
        try:
            stream = names.events_stream_of(o.provider)
            last = await bus.js.get_last_msg(stream, names.events_of(task_id, o.provider), direct=True)
        except nats.js.errors.NotFoundError:
            return False  # its events are gone too (aged out): nothing to say it was ever queued
        if last.seq != o.last_seq:
            return False  # something happened since: the next audit reads it
        task = await self._task_of(o)
        if task is not None and task.not_before is not None:
            return False  # scheduled: it waits in the server's timers, not in the queue (hive_bus._timers)
        provider = task.provider if task else o.provider
        event = Failed(
            task_id=task_id, provider=provider, at_ms=now_ms(), attempt=0, worker=None, reason="lost",
            error=(
                f"its message is not in the {names.tasks_stream} stream and no outcome was recorded: lost "
                "from the NATS store (a damaged or purged stream), or its submission was cut off before "
                "the task was stored; "
                + (
                    f"`hive dlq replay {task_id}` queues it again"
                    if task is not None
                    else "what it asked was in that message and is lost with it: submit it again"
                )
            ),
            task=task,
        )  # fmt: skip
        data = encoder.encode(event)
        final_id = task.final_msg_id if task else f"{task_id}:final"
        headers = {"Nats-Msg-Id": final_id}
        stream = names.events_stream_of(provider)
        await ensure_events(bus, provider)
        try:
            check_fits(bus.nc, data, {**headers, "Nats-Expected-Stream": stream})
        except TooLarge:  # a task from before the claim check: its record keeps it, this event cannot
            data = encoder.encode(msgspec.structs.replace(event, task=None))
        ack = await js_publish(
            bus.js, bus.nc, names.event_subject(provider, task_id, "failed"), data,
            headers=headers, stream=stream, what="failed event",
        )  # fmt: skip
        if ack.duplicate:
            return False  # an outcome was recorded meanwhile
        await _dlq.keep(
            bus,
            provider,
            task_id,
            data,
            task.sealed(f"{task_id}:dlq:{task.run}") if task else f"{task_id}:dlq:0",
        )
        return True

    async def _task_of(self, o: _Open) -> Task | None:
        """The task as its last ``queued`` or ``moved`` event carries it; a marker carries none (the
        task was in the message found missing: its content is lost with it, and its dead letter holds
        its id alone)."""
        try:
            stream = self._bus.names.events_stream_of(o.provider)
            raw = await self._bus.js.get_msg(stream, seq=o.event_seq, direct=True)
            event = decode_event(raw.subject or "", raw.data, raw.headers)
        except (nats.js.errors.NotFoundError, msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return None
        return event.task if isinstance(event, Queued | Moved) else None


class _Reader:
    """One provider's events stream read on from a sequence, subjects only (headers, no bodies), in
    batches: each event's time stored, sequence and subject, in order, until the stream has no more."""

    def __init__(self, bus: Bus, provider: str, start_seq: int) -> None:
        self._bus = bus
        self.provider = provider
        self._stream = bus.names.events_stream_of(provider)
        self._start_seq = start_seq
        self._psub: nats.js.JetStreamContext.PullSubscription | None = None
        self._remaining = 0
        self._batch: collections.deque[tuple[float, int, str]] = collections.deque()

    async def start(self) -> None:
        names = self._bus.names
        config = ConsumerConfig(
            description="hive-bus store audit",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._start_seq,
            ack_policy=AckPolicy.NONE,
            headers_only=True,
            mem_storage=True,
            inactive_threshold=60.0,
        )
        self._psub = await self._bus.js.pull_subscribe(
            names.events_of("*", self.provider), stream=self._stream, config=config
        )
        self._remaining = (await self._psub.consumer_info()).num_pending or 0

    async def next(self) -> tuple[float, int, str] | None:
        if not self._batch and self._remaining > 0 and self._psub is not None:
            timeout_s = self._bus.settings.request_timeout_s
            msgs = await self._psub.fetch(min(self._remaining, FETCH_BATCH), timeout=timeout_s)
            self._remaining -= len(msgs)
            self._batch.extend(
                (m.metadata.timestamp.timestamp(), m.metadata.sequence.stream, m.subject) for m in msgs
            )
        return self._batch.popleft() if self._batch else None

    async def stop(self) -> None:
        psub, self._psub = self._psub, None
        if psub is None:
            return
        with anyio.CancelScope(shield=True), contextlib.suppress(*BUS_ERRORS):
            name = (await psub.consumer_info()).name
            await psub.unsubscribe()
            with anyio.move_on_after(self._bus.settings.request_timeout_s):
                await self._bus.js.delete_consumer(self._stream, name)
