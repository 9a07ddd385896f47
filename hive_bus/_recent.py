"""The most recent tasks, whatever their metadata: ``GET /v1/tasks`` without a filter of metadata,
``Hive.recent`` and ``hive list`` without one.

Read from the tail of each provider's events stream (enough events for ``limit`` tasks of a few events
each), so a read costs what it returns, not what the bus holds: a task older than the tail is not
"recent". An event counts only from the provider its task is assigned to (a worker credential may write
events for any task id under its own provider). Older tasks of a metadata are found through the index
(:mod:`hive_bus._index`, ``Hive.find``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import msgspec
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from ._assigned import marker_seq, task_at
from ._bus import Bus, event_providers
from ._errors import BusUnavailable, TaskNotFound
from ._messages import Moved, Queued, Task, TaskView, decode_event, is_final, is_task_id
from ._nats import BUS_ERRORS, follow, num_pending, unsubscribe, why

if TYPE_CHECKING:
    from ._client import Hive

log = logging.getLogger("hive_bus.client")


# Events read per task asked for: a task has a few (queued, running, completed; retries, moves).
EVENTS_PER_TASK = 8
# With a status to match, the tail read grows fourfold while too few match, up to this many events in
# all (shared among the providers read): a bound on the read, so "recent" reaches further back for a
# rare status, not for ever.
MAX_TAIL_EVENTS = 20_000


async def recent_tasks(
    hive: Hive, *, status: str | None = None, provider: str | None = None, limit: int = 50
) -> list[TaskView]:
    """The latest state of the most recent tasks, read from the tail of each provider's events stream
    (of ``provider``'s alone, when given). With ``status``, a tail in which fewer than ``limit`` tasks
    have that status is read further back, up to :data:`MAX_TAIL_EVENTS` events in all."""
    bus = hive.bus
    try:
        providers = [provider] if provider is not None else await event_providers(bus)
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read the events streams: {exc}") from None
    span = limit * EVENTS_PER_TASK  # events of each provider
    most = max(span, MAX_TAIL_EVENTS // max(1, len(providers)))
    while True:
        tails: list[_Tail] = []
        failed: list[str] = []
        # each read says what failed rather than raising: a task group would raise an ExceptionGroup
        async with anyio.create_task_group() as tg:
            for of in providers:
                tg.start_soon(_read_tail, bus, of, span, tails, failed)
        if failed:
            raise BusUnavailable(f"could not read the events streams' tails: {'; '.join(sorted(failed))}")
        found, tasks, at, moved = await _latest(hive, tails, status, limit)
        if len(found) >= limit or status is None or span >= most or all(t.whole for t in tails):
            break
        span = min(span * 4, most)

    async def content(view: TaskView) -> None:  # its content (its queued event is a marker): one read
        with contextlib.suppress(*BUS_ERRORS):
            if (task := await task_at(bus, at[view.id], view.id)) is not None:
                tasks[view.id] = task

    async with anyio.create_task_group() as tg:  # together: one read after another cost 50 round trips
        for view in found:
            if view.id not in tasks and view.id not in moved and view.id in at:
                tg.start_soon(content, view)
    checked = [view if view.id in moved else await _checked(hive, view, tasks.get(view.id)) for view in found]
    return [view.trimmed() for view in checked if view is not None]


async def _latest(
    hive: Hive, tails: list[_Tail], status: str | None, limit: int
) -> tuple[list[TaskView], dict[str, Task], dict[str, int], set[str]]:
    """The newest ``limit`` tasks the tails hold (of ``status``), with the tasks they carry, where
    the others are, and which moved between providers (read whole)."""
    latest: dict[str, TaskView] = {}
    tasks: dict[str, Task] = {}
    at: dict[str, int] = {}
    # A task whose events more than one provider's tail holds (it moved) is read whole (``Hive.get``):
    # two streams' events are in no order between them.
    moved: set[str] = set()
    for tail in tails:
        moved |= latest.keys() & tail.latest.keys()
        latest |= tail.latest
        tasks |= tail.tasks
        at |= tail.at
    found: list[TaskView] = []
    for view in sorted(latest.values(), key=lambda v: v.id, reverse=True):
        if len(found) >= limit:
            break
        if view.id in moved:
            try:
                view = await hive.get(view.id)
            except TaskNotFound:
                continue
        if status is None or view.status == status:
            found.append(view)
    return found, tasks, at, moved


@dataclass
class _Tail:
    """What the tail of one provider's events stream says of the tasks it holds."""

    latest: dict[str, TaskView] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)  # each task as queued or moved: content, metadata
    at: dict[str, int] = field(default_factory=dict)  # where a task whose queued event is a marker is
    whole: bool = True  # the stream read from its first event: reading further back finds nothing more


async def _read_tail(bus: Bus, provider: str, span: int, tails: list[_Tail], failed: list[str]) -> None:
    """The tail of ``provider``'s events stream, its last ``span`` events (older tasks are not
    "recent"), added to ``tails``; nothing for a provider without a stream. What went wrong (the bus
    did not answer, or not all of the tail within the bus's request timeout) is added to ``failed``."""
    stream = bus.names.events_stream_of(provider)
    timeout_s = bus.settings.request_timeout_s
    try:
        with anyio.fail_after(timeout_s):
            await _tail_of(bus, provider, stream, span, tails)
    except TimeoutError:
        failed.append(f"reading the last {span} events of {stream} timed out after {timeout_s:g} s")
    except BUS_ERRORS as exc:
        failed.append(f"{stream}: {why(exc)}")


async def _tail_of(bus: Bus, provider: str, stream: str, span: int, tails: list[_Tail]) -> None:
    names = bus.names
    try:
        info = await bus.js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return
    if not info.state.messages:
        return
    start = max(info.state.first_seq, info.state.last_seq - span + 1)
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
    tail = _Tail(whole=start == info.state.first_seq)
    # An event counts only from the provider its task is assigned to (a worker credential may write
    # events for any task id under its own provider): followed here from the queued and moved events in
    # the tail; a task whose queued event is older than the tail is looked up (``Hive.get``).
    assigned: dict[str, str] = {}
    # read whole first, by a callback: nats-py's message iterator makes a task a message
    got: list[Msg] = []
    read = anyio.Event()

    async def collect(msg: Msg) -> None:
        got.append(msg)
        if num_pending(msg) == 0:
            read.set()

    sub = await follow(bus.js, names.events(provider), stream=stream, config=config, cb=collect)
    try:
        await read.wait()  # bounded by the caller's deadline
    finally:
        await unsubscribe(sub)
    for msg in got:  # no await below: the callback adds nothing meanwhile
        try:
            event = decode_event(msg.subject, msg.data, msg.headers)
        except msgspec.DecodeError as exc:
            log.warning(
                "recent tasks: event %s does not decode (%s); skipped", msg.metadata.sequence.stream, exc
            )
            continue
        on = names.provider_of_subject(msg.subject)
        if not is_task_id(event.task_id) or on != event.provider:
            pass
        elif isinstance(event, Queued):
            assigned[event.task_id] = on
            if event.task is not None:
                tail.tasks[event.task_id] = event.task
            elif (seq := marker_seq(msg.headers)) is not None:
                tail.tasks.pop(event.task_id, None)
                tail.at[event.task_id] = seq
            tail.latest[event.task_id] = TaskView.of(event)
        elif assigned.get(event.task_id, on) == on:
            if (was := tail.latest.get(event.task_id)) is not None and was.done and not is_final(event):
                continue  # a worker's last word after the end (as ``_assigned.current`` reads it)
            if isinstance(event, Moved) and event.task_id in assigned:
                assigned[event.task_id] = event.task.provider
                tail.tasks[event.task_id] = event.task
            tail.latest[event.task_id] = TaskView.of(event)
    tails.append(tail)


async def _checked(hive: Hive, view: TaskView, task: Task | None) -> TaskView | None:
    """``view`` with its task's content, or when its task's queued event was not in the tail read, the
    task as ``Hive.get`` reads it (None when the bus does not know the task)."""
    if task is not None:
        return view.with_task(task)
    try:
        return await hive.get(view.id)
    except TaskNotFound:
        return None
