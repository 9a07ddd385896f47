"""Which provider a task is assigned to now, read from what only the hub writes; and the task's state,
counted from that provider alone.

A worker credential may write events under its own provider for any task id it likes: a forged
``completed`` on ``<prefix>.events.echo.<a gemini task's id>.completed`` is stored like any other
event. So no reader takes a task's last event, whoever wrote it. The task as the bus knows it is its
last ``queued`` event (the tasks stream's marker of the task's last message, which only the hub
writes; or, on a bus older than one write per submission, the event itself, which carried the task), then each ``moved``
event recorded under the provider the task was on at the time, to the next provider of that task's own
fallback list. An outcome counts only when it is recorded under the provider at the end of that chain,
after the event that put the task there.

Each provider's events are a stream of their own (``<PREFIX>_EVENTS_<provider>``), and sequences of two
streams do not compare. The chain starts from the task's last message in the tasks stream, which only the
hub writes, in one order for every provider: it names the provider the task was last queued on, and
that provider's ``queued`` marker is where its events start to count. Moves recorded there after it are
followed within that stream; a move to another provider ends the chain (the router has not queued the
task there yet: once it has, that queueing is the task's last message), and until then nothing recorded
under the new provider counts (:data:`PENDING`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy, RawStreamMsg

from ._bus import Bus, event_providers
from ._messages import (
    FINAL_STATUSES,
    Cancelled,
    Failed,
    Moved,
    Queued,
    Task,
    TaskEvent,
    TaskView,
    decode_event,
    event_decoder,
    is_final,
    task_decoder,
)
from ._nats import BUS_ERRORS

log = logging.getLogger("hive_bus.assigned")

# What a task whose events were evicted while its task message is kept reads (status ``evicted``).
EVICTED = (
    "the task has ended (its worker took it off the queue), but its events were evicted from the events "
    "stream (HIVE_EVENTS_MAX_BYTES): how it ended, and its output, are no longer kept"
)
# A task has at most 8 fallbacks (``Task.fallback``), so at most 8 moves per run.
MAX_HOPS = 8
# The sequence after which a task's events count when it has moved to a provider that has not had it
# queued yet: none does (an event of that provider's stream is never after it).
PENDING = sys.maxsize


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where the bus has a task now."""

    task: Task  # as queued, moved along its own fallbacks (never a worker's copy of it)
    event: Queued | Moved  # the event that put it on its provider
    # in the events stream of the task's provider, the sequence after which its events count: the
    # event that put it there, or PENDING when that was a move from another provider (not queued yet)
    seq: int
    # the sequence of ``event`` in the stream of the provider that recorded it (``seq`` but for a move
    # to another provider)
    event_seq: int = 0
    # False when ``task`` is a stand-in with no content: its message is gone and its ``queued`` event
    # is a marker, which carries no task
    whole: bool = True

    @property
    def provider(self) -> str:
        return self.task.provider

    @property
    def pending(self) -> bool:
        """Moved to its provider, which has not had it queued yet."""
        return self.seq == PENDING


def hop(task: Task, event: Moved) -> Task | None:
    """The task on its next provider, when ``event`` is a move of ``task`` that its assigned provider
    may make (to the first of its own fallbacks); else None."""
    moved = task.next_hop()
    if moved is None or event.task_id != task.id or event.provider != task.provider:
        return None
    if event.task.provider != moved.provider or event.task.run != task.run:
        return None
    return moved


async def assignment(bus: Bus, task_id: str) -> Assignment | None:
    """The task as the bus knows it now, or None when no submission ever queued it (or its events have
    aged out). Raises nats errors when the stream does not answer.

    The task is its last message in the tasks stream (a submission, a replay, a move the router made, a
    start timer that fired), on the provider its subject names; its ``queued`` marker there, the server's
    republish of that message, is where the provider's events of it start to count. A marker is best
    effort (republished over core NATS): a task whose marker was lost counts as queued before every event
    of its provider. A task whose message is gone (aged out, or a bus older than one stored write per
    submission, whose ``queued`` events carried the task) is found by its ``queued`` events."""
    return await _assigned(bus, task_id, await _queued_message(bus, task_id))


async def _assigned(bus: Bus, task_id: str, found: _TaskMessage | None) -> Assignment | None:
    """:func:`assignment`, given the task's last message in the tasks stream."""
    names = bus.names
    if found is not None:
        task, provider = found.task, found.provider
        got = await _last(bus, provider, names.event_subject(provider, task_id, "queued"))
        seq = got[1] if got is not None and isinstance(got[0], Queued) else 0
        queued = got[0] if got is not None and isinstance(got[0], Queued) else None
        if queued is None or queued.provider != provider:
            queued = Queued(task_id=task_id, provider=provider, at_ms=task.submitted_at_ms, task=task)
        if task.provider != provider:
            return None  # a message that names another provider than its subject: not the hub's
    else:
        got_old = await _queued_event(bus, task_id)
        if got_old is None:
            return None
        queued, seq = got_old
        task = queued.task or Task(
            id=task_id, provider=queued.provider, submitted_at_ms=queued.at_ms, messages=[]
        )
    if task.id != task_id:
        return None
    here = Assignment(
        task=task, event=queued, seq=seq, event_seq=seq, whole=found is not None or queued.task is not None
    )
    for _ in range(MAX_HOPS):
        if here.task.next_hop() is None:
            break  # nowhere left to move to: no move recorded under it can count (and no read for it)
        on = here.provider
        got = await _last(bus, on, names.event_subject(on, task_id, "moved"))
        if got is None:
            break
        event, seq = got
        moved = hop(here.task, event) if isinstance(event, Moved) and seq > here.seq else None
        if moved is None:
            break
        assert isinstance(event, Moved)
        if moved.provider != on:  # to another provider's stream: queued there by the router, later
            return Assignment(task=moved, event=event, seq=PENDING, event_seq=seq)
        here = Assignment(task=moved, event=event, seq=seq, event_seq=seq)
    return here


class _TaskMessage(NamedTuple):
    """A task's last message in the tasks stream: the task, the provider and priority its subject
    names (whose consumer takes it), and its sequence there."""

    task: Task
    provider: str
    priority: str
    seq: int


async def _queued_message(bus: Bus, task_id: str) -> _TaskMessage | None:
    """The task's last message in the tasks stream, or None when there is none (or it does not
    decode)."""
    try:
        raw: RawStreamMsg = await bus.js.get_last_msg(
            bus.names.tasks_stream, bus.names.tasks_of(task_id), direct=True
        )
    except nats.js.errors.NotFoundError:
        return None
    task = _decoded(raw, task_id)
    if task is None:
        return None
    tokens = (raw.subject or "").split(".")  # <prefix>.tasks.<provider>.<priority>.<task id>
    return _TaskMessage(task, tokens[2], tokens[3] if len(tokens) == 5 else "normal", raw.seq or 0)


async def _taken(bus: Bus, message: _TaskMessage) -> bool | None:
    """Whether a worker has taken ``message`` off its queue, as its consumer's state says (one
    consumer-info call): True when it is acked (or terminated), so the task has ended; None when it was
    handed to a worker and may or may not be acked yet (acked after an older task of its queue still
    pending, which only a read per message would tell); False when no worker has had it yet."""
    names = bus.names
    try:
        info = await bus.js.consumer_info(
            names.tasks_stream, names.consumer(message.provider, message.priority)
        )
    except nats.js.errors.NotFoundError:
        return False  # no worker of its provider and priority has ever taken from its queue
    if message.seq <= info.ack_floor.stream_seq:
        return True
    if message.seq > info.delivered.stream_seq:
        return False
    return True if not info.num_ack_pending else None


async def _queued_event(bus: Bus, task_id: str) -> tuple[Queued, int] | None:
    """The task's last ``queued`` event, of whichever provider recorded it last, with its sequence
    there: one that carries the task (buses before one stored write per submission), or a marker of a
    message that is gone (aged out, or lost from the store: the audit records that)."""
    names = bus.names
    found: list[tuple[Queued, int]] = []

    async def read(provider: str) -> None:
        got = await _last(bus, provider, names.event_subject(provider, task_id, "queued"))
        if got is not None and isinstance(got[0], Queued) and got[0].provider == provider:
            found.append((got[0], got[1]))

    async with anyio.create_task_group() as tg:
        for provider in await event_providers(bus):
            tg.start_soon(read, provider)
    return max(found, key=lambda q: q[0].at_ms) if found else None


async def current_view(bus: Bus, task_id: str) -> TaskView | None:
    """The task's state: its last event under the provider it is assigned to (events any other
    credential wrote for it are left out). None when the bus does not know the task."""
    got = await current(bus, task_id)
    return None if got is None else got[0]


async def current(bus: Bus, task_id: str) -> tuple[TaskView, int] | None:
    """:func:`current_view`, with the sequence of the event that put the task on its provider, in that
    provider's events stream (:data:`PENDING` for a move not queued yet): a later event of the task counts
    when it is recorded under that provider after that sequence. The view carries the task's content and
    metadata (read with the assignment: no read of its own)."""
    names = bus.names
    found = await _queued_message(bus, task_id)
    # the provider it was last queued on has nearly always its last event: read beside the assignment
    latest: list[tuple[TaskEvent, int] | None] = []
    here: Assignment | None = None

    async def read_latest(provider: str) -> None:
        latest.append(await _last(bus, provider, names.events_of(task_id, provider)))

    async with anyio.create_task_group() as tg:
        if found is not None:
            tg.start_soon(read_latest, found.provider)
        here = await _assigned(bus, task_id, found)
    if here is None:
        return None
    if here.pending:
        return TaskView.of(here.event).with_task(here.task), here.seq
    got = latest[0] if latest and found is not None and here.provider == found.provider else None
    if got is not None and got[1] >= here.seq:
        last: tuple[TaskEvent, int] | None = got
    else:  # read before the event that put it there, or another provider's: read again
        last = await _last(bus, here.provider, names.events_of(task_id, here.provider))
    if last is not None and last[1] > here.seq and not isinstance(last[0], Queued | Moved):
        if not is_final(last[0]):
            ended = await _ended(bus, here, task_id)
            if ended is not None:
                return TaskView.of(ended).with_task(here.task), here.seq
        return TaskView.of(last[0]).with_task(here.task), here.seq
    if found is not None and here.event_seq == 0 and last is None:
        # not one event of the task is left (nor its queued marker): the events stream evicted them
        # (its byte limit), or the marker was lost and no worker has had the task yet
        return await _unrecorded(bus, found, here), here.seq
    return TaskView.of(here.event).with_task(here.task), here.seq


async def _unrecorded(bus: Bus, found: _TaskMessage, here: Assignment) -> TaskView:
    """The state of a task whose only record is its task message: a cancel or an expiry the cancels
    bucket keeps for it (as long as the events); else ``queued`` while no worker has had it, ``evicted``
    (an end, its outcome gone with its events) once its worker has acked it, and ``running`` in between
    (handed to a worker, not known to be acked)."""
    end = await _hub_end(bus, here.task)
    if end is not None:
        return TaskView.of(end).with_task(here.task)
    queued = TaskView.of(here.event).with_task(here.task)
    match await _taken(bus, found):
        case False:
            return queued
        case True:
            return msgspec.structs.replace(queued, status="evicted", error=EVICTED)
        case None:
            return msgspec.structs.replace(queued, status="running", reason="record evicted")


async def _hub_end(bus: Bus, task: Task) -> Cancelled | Failed | None:
    """The end the hub recorded for ``task``'s run in the cancels bucket (a cancel, or an expiry at
    its deadline), if any."""
    try:
        entry = await bus.cancels_kv.get(bus.names.cancel_key(task.provider, task.id))
    except nats.js.errors.KeyNotFoundError:
        return None
    try:
        end = event_decoder.decode(entry.value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None  # a value of another writer
    if end.task_id != task.id:
        return None
    if isinstance(end, Cancelled) or (
        isinstance(end, Failed) and (end.task is None or end.task.run == task.run)
    ):
        return end  # a cancel ends every run; an expiry, its own
    return None


async def _ended(bus: Bus, here: Assignment, task_id: str) -> TaskEvent | None:
    """The task's end recorded under its provider since it was put there, when a later event that is
    not one came after it: a worker's last word may follow the end (the ``running`` event of a call
    being abandoned for a cancel, or of a twin delivery whose run another worker completed, or a call
    the hub expired meanwhile). A run is recorded as ended once, so whatever follows its end does not
    undo it."""
    names = bus.names
    found: list[tuple[TaskEvent, int]] = []

    async def read(status: str) -> None:
        got = await _last(bus, here.provider, names.event_subject(here.provider, task_id, status))
        if got is not None and got[1] > here.seq and is_final(got[0]):
            found.append(got)

    async with anyio.create_task_group() as tg:
        for status in FINAL_STATUSES:
            tg.start_soon(read, status)
    return max(found, key=lambda f: f[1])[0] if found else None


def marker_seq(headers: dict[str, str] | None) -> int | None:
    """The tasks stream sequence a ``queued`` marker read from a consumer names (its stored headers;
    a direct get of the marker answers with the events stream's own instead)."""
    try:
        return int((headers or {})["Nats-Sequence"])
    except (KeyError, ValueError):
        return None


async def task_at(bus: Bus, seq: int, task_id: str) -> Task | None:
    """The task message at ``seq`` in the tasks stream, when it is ``task_id``'s (else None)."""
    try:
        raw: RawStreamMsg = await bus.js.get_msg(bus.names.tasks_stream, seq=seq, direct=True)
    except nats.js.errors.NotFoundError:
        return None
    task = _decoded(raw, task_id)
    return task if task is not None and task.id == task_id else None


def _decoded(raw: RawStreamMsg, task_id: str) -> Task | None:
    """A task message read back, or None (logged) when it does not decode: poison, which its workers
    set aside."""
    try:
        return task_decoder.decode(raw.data or b"")
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        log.warning("task message %s of %s does not decode", raw.seq, task_id)
        return None


async def _last(bus: Bus, provider: str, subject: str) -> tuple[TaskEvent, int] | None:
    """The last event on ``subject`` (a filter) in ``provider``'s events stream, and its sequence; None
    when there is none (or no such stream), or it does not decode (a reader of outcomes has nothing to
    take from it)."""
    stream = bus.names.events_stream_of(provider)
    try:
        raw: RawStreamMsg = await bus.js.get_last_msg(stream, subject, direct=True)
    except (nats.js.errors.NotFoundError, nats.errors.NoRespondersError):
        return None  # none there, or no such stream (a provider none of whose work was queued)
    try:
        return decode_event(raw.subject or "", raw.data, raw.headers), raw.seq or 0
    except (msgspec.DecodeError, RecursionError):
        log.warning("event %s on %s does not decode; reading past it", raw.seq, subject)
    return await _last_readable(bus, stream, subject)


async def _last_readable(bus: Bus, stream: str, subject: str) -> tuple[TaskEvent, int] | None:
    """The last event on ``subject`` that decodes: poison stored after it is read past, not taken for
    the task's end (a subject holds one task's events: a handful of messages)."""
    found: tuple[TaskEvent, int] | None = None
    sub = await bus.js.subscribe(
        subject, stream=stream, ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )  # fmt: skip
    try:
        with anyio.move_on_after(bus.settings.request_timeout_s):
            async for msg in sub.messages:
                with contextlib.suppress(msgspec.DecodeError, RecursionError):
                    found = decode_event(msg.subject, msg.data, msg.headers), msg.metadata.sequence.stream
                if msg.metadata.num_pending == 0:
                    break
    finally:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    return found


def _hopped(task: Task, source: str, destination: str | None) -> bool:
    """Whether ``task`` (as queued now) moved from ``source`` to ``destination`` (to anywhere, for None)
    on its way (its ``tried`` lists the providers it left, in order)."""
    path = [*task.tried, task.provider]
    return any(a == source and destination in (None, b) for a, b in itertools.pairwise(path))


@dataclass(frozen=True, slots=True)
class Place:
    """Where a task is assigned, and what a reader needs to check its next move: its fallbacks and
    run (None when only the provider is known). A few strings, not the task: a feed remembers
    thousands."""

    provider: str
    fallback: tuple[str, ...] | None = None
    run: int = 0

    @classmethod
    def of(cls, task: Task) -> Place:
        return cls(task.provider, tuple(task.fallback), task.run)

    def hop(self, on: str, event: Moved) -> Place | None:
        """The place after ``event``, read from ``on``'s subjects, when it is a move this task's
        provider may make (to the first of its own fallbacks, as :func:`hop` says); else None."""
        if self.fallback is None or not self.fallback or on != self.provider or event.provider != on:
            return None
        provider = self.fallback[0].partition(":")[0]
        if event.task.id != event.task_id or event.task.provider != provider or event.task.run != self.run:
            return None
        return Place(provider, self.fallback[1:], self.run)


class Assignments:
    """Where each task of a feed is assigned, for a reader that follows many tasks' events in stream
    order: learnt from the ``queued`` and ``moved`` events it reads, looked up (:func:`assignment`) for
    a task first met by another event, and remembered for the last ``size`` tasks."""

    def __init__(self, bus: Bus, size: int = 10_000) -> None:
        self._bus = bus
        self._size = size
        self._known: OrderedDict[str, Place | None] = OrderedDict()

    async def counts(self, subject: str, event: TaskEvent | None = None) -> bool:
        """Whether the event read from ``subject`` is its task's: from the provider the task is
        assigned to (a ``moved`` event: the last valid move of the task, as the bus has it now).
        ``event``, the message decoded, spares a look-up: a ``queued`` one tells the task's fallbacks,
        and a ``moved`` one is then checked against them."""
        tokens = subject.split(".")
        if len(tokens) != 5:
            return False
        provider, task_id, status = tokens[2:]
        if event is not None and event.task_id != task_id:
            return False  # a body naming another task than its subject: not that task's, nor this one's
        if status == "queued":  # only submissions and replays write these
            task = event.task if isinstance(event, Queued) else None
            known = task is not None and task.id == task_id and task.provider == provider
            self._remember(task_id, Place.of(task) if task is not None and known else Place(provider))
            return True
        place = self._known.get(task_id)
        if (
            status == "moved"
            and place is not None
            and place.fallback is not None
            and isinstance(event, Moved)
        ):
            if (moved := place.hop(provider, event)) is not None:
                self._remember(task_id, moved)
                return True
            if place.provider == provider:
                return False  # not the move its provider may make: the task stays where it is
            # a move from another provider, read after the task's events there (a reader of several
            # providers' streams reads them in no order across streams): the lookup says
        if task_id not in self._known or status == "moved" or self._elsewhere(place, provider):
            # a lookup counts every move recorded so far: this one too, when it is a valid one
            try:
                here = await assignment(self._bus, task_id)
            except BUS_ERRORS as exc:
                log.debug("could not look up task %s (%s); its event is left out", task_id, exc)
                return False
            self._remember(task_id, Place.of(here.task) if here is not None else None)
            if here is None:
                return False
            if status == "moved":
                if isinstance(here.event, Moved) and here.event.provider == provider:
                    return True
                # the router has queued it on its next provider since (the marker of that is the
                # task's last queued event), or it moved on from there: a move counts when it is a hop
                # the task made
                to = event.task.provider if isinstance(event, Moved) else None
                return _hopped(here.task, provider, to)
            # moved to a provider that has not had it queued yet: nothing recorded there counts yet
            return here.provider == provider and not here.pending
        return (
            place is not None and place.provider == provider and (event is None or event.provider == provider)
        )

    @staticmethod
    def _elsewhere(place: Place | None, provider: str) -> bool:
        """Whether an event under ``provider`` of a task known to be on another provider may be of a
        move not read yet: one to ``provider`` (one of the task's fallbacks, or any when they are not
        known). A reader of several providers' streams may read it after the events of the move's end.
        """
        if place is None or place.provider == provider:
            return False
        return place.fallback is None or provider in (f.partition(":")[0] for f in place.fallback)

    def assume(self, task_id: str, provider: str) -> None:
        """Take ``task_id`` as queued on ``provider`` with no fallbacks (its submitter knows it)."""
        self._remember(task_id, Place(provider, ()))

    def _remember(self, task_id: str, place: Place | None) -> None:
        self._known[task_id] = place
        self._known.move_to_end(task_id)
        if len(self._known) > self._size:
            self._known.popitem(last=False)
