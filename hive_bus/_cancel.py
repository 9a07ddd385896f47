"""Cancelling a task: a final ``cancelled`` event, and a word to its provider's workers.

The hub records the cancel under the provider the task is assigned to, with the run's final
de-duplication id (``Task.final_msg_id``), so a cancel and an outcome cannot both be recorded: whichever
JetStream stores first is the task's end, and the other is refused as a duplicate (a cancel that came
second answers :class:`TaskEnded`). Before that event it puts the task's key in the cancels bucket
(``<prefix>_cancels``, ``<provider>.<task id>``), which each worker of the provider watches: a worker
that fetches a cancelled task acks it without a call, and one whose call is running abandons it and
acks. So a queued or waiting task never runs, and a running one stops.

A task cancelled while queued, or expired at its deadline while queued (hive_bus._expiry, which puts
its key in the same bucket), stays in its consumer's pending count until a worker fetches it (a
consumer cannot ack what it has not delivered, and the task message is the task's record). So the hub
adds one to its provider's ``unfetched_cancels`` counter (``<PREFIX>_COUNTERS``), and the worker that
fetches it takes one off; the queue's depth (``hive_bus._stats.queue_depths``) is the pending count
less that counter. The recorded end says which ends were counted (its ``was``: ``queued``). Each side
goes once per task run (``Nats-Msg-Id``), so a redelivery or a second path does not count twice. A hub
that dies between the end and its increment leaves that task counted in the depth until its fetch (the
counter then reads -1, which subtracts nothing). An ended task that no worker was handed is taken out
of the tasks stream, and off the count, by the store audit's ageing sweep before it would age out
(hive_bus._ageing).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from . import _assigned, _counts
from ._bus import Bus, ensure_events
from ._errors import BusRefused, BusUnavailable, HiveError, TaskEnded, TaskNotFound
from ._index import DirectGets
from ._messages import (
    Cancelled,
    Failed,
    Task,
    TaskStatus,
    TaskView,
    encoder,
    is_task_id,
    now_ms,
    task_decoder,
)
from ._nats import BUS_ERRORS, reconnects, stream_subjects, unsubscribe, why
from ._nesting import Guarded
from ._size import js_publish

log = logging.getLogger("hive_bus.cancel")

# An end recorded by the hub, as the cancels bucket and the events stream hold it: a cancel, or an
# expiry's ``failed`` event (hive_bus._expiry).
_end_decoder = Guarded(msgspec.json.Decoder(Cancelled | Failed), enclosing=1)

# a cancel's reason is kept in events and dead letters: bounded like a provider's error text
MAX_REASON_CHARS = 1000


async def cancel(bus: Bus, task_id: str, reason: str = "") -> TaskView:
    """Cancel one task; its state afterwards. Cancelling a cancelled task again is harmless (the same
    answer); one that completed or failed raises :class:`TaskEnded`. Raises :class:`TaskNotFound`,
    :class:`BusUnavailable`."""
    view, _ = await cancel_once(bus, task_id, reason)
    return view


async def cancel_once(bus: Bus, task_id: str, reason: str = "") -> tuple[TaskView, bool]:
    """:func:`cancel`, and whether this call is the one that cancelled the task."""
    if not is_task_id(task_id):
        raise TaskNotFound(f"{task_id!r} is not a task id (26 characters of Crockford base32)")
    names = bus.names
    try:
        here = await _assigned.assignment(bus, task_id)
        view = await _assigned.current_view(bus, task_id) if here is not None else None
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read task {task_id}: {exc}") from None
    if here is None or view is None:
        raise TaskNotFound(f"no task {task_id} on the bus")
    if view.done:
        return _ended(view), False
    task = here.task
    event = Cancelled(
        task_id=task.id, provider=task.provider, at_ms=now_ms(), was=view.status,
        reason=reason[:MAX_REASON_CHARS],
    )  # fmt: skip
    try:
        await ensure_events(bus, task.provider)  # a provider none of whose work was queued here yet
        await bus.cancels_kv.put(names.cancel_key(task.provider, task.id), encoder.encode(event))
        ack = await js_publish(
            bus.js, bus.nc,
            names.event_subject(task.provider, task.id, "cancelled"),
            encoder.encode(event),
            headers={"Nats-Msg-Id": task.final_msg_id},
            stream=names.events_stream_of(task.provider),
            what="cancelled event",
        )  # fmt: skip
        if ack.duplicate:  # it ended first, or a cancel came before this one
            view = await _assigned.current_view(bus, task_id) or view
            return _ended(view), False
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not cancel task {task_id}: {exc}") from None
    await ended(bus, here, view.status)
    return TaskView.of(event).with_task(task), True


async def ended(bus: Bus, here: _assigned.Assignment, was: TaskStatus | None) -> None:
    """The task ``here`` was cancelled, or expired at its deadline, in status ``was``: counted among
    the queue's ended tasks when its message waited in its provider's queue then (not a move to a
    provider that has yet to queue it)."""
    if was == "queued" and not here.pending:
        await _count_unfetched(bus, here.task, +1)


async def fetched(bus: Bus, task: Task) -> None:
    """A worker fetched ``task``, which had ended while queued: it no longer waits in the queue."""
    await _count_unfetched(bus, task, -1)


async def fetched_if_ended_while_queued(bus: Bus, task: Task) -> None:
    """:func:`fetched`, for a task whose outcome was refused as a duplicate, when the end recorded first
    is a cancel or an expiry of it while queued (the worker had fetched it before the word reached it,
    or fetched the message of a run replayed since)."""
    names = bus.names
    for status in ("cancelled", "failed"):
        try:
            raw = await bus.js.get_last_msg(
                names.events_stream_of(task.provider),
                names.event_subject(task.provider, task.id, status),
                direct=True,
            )
        except nats.js.errors.NotFoundError:
            continue
        except BUS_ERRORS as exc:
            log.warning("could not read how task %s ended: %s", task.id, exc)
            return
        end = _end(raw.data or b"")
        if end is not None and _counted(end) and _same_run(end, task):
            await fetched(bus, task)
        return


async def recorded_end(bus: Bus, task: Task) -> Cancelled | Failed | None:
    """How the cancels bucket records ``task``'s end (a cancel, or an expiry), if it does."""
    try:
        entry = await bus.cancels_kv.get(bus.names.cancel_key(task.provider, task.id))
    except nats.js.errors.KeyNotFoundError:
        return None
    return _end(entry.value or b"")


def counted_for(end: Cancelled | Failed | None, task: Task) -> bool:
    """Whether ``end`` was counted among the queue's ended tasks for ``task``'s run."""
    return end is not None and _counted(end) and _same_run(end, task)


async def _count_unfetched(bus: Bus, task: Task, n: int) -> None:
    """Add ``n`` to the task's provider's count of tasks ended while queued that no worker has fetched,
    once per run and direction. Best effort: a failure is logged, and the queue's depth is off by one."""
    side = "ended" if n > 0 else "fetched"
    try:
        await _counts.add(
            bus, bus.names.unfetched_cancels_counter(task.provider), n, f"{task.id}:{task.run}:unfetched:{side}",
            declared=n < 0,  # a worker may not make streams: the hub made it with its increment
        )  # fmt: skip
    except (*BUS_ERRORS, HiveError) as exc:
        log.warning("task %s: the count of tasks ended while queued is off by one: %s", task.id, exc)


def _ended(view: TaskView) -> TaskView:
    if view.status == "cancelled":
        return view
    raise TaskEnded(f"task {view.id} has already ended ({view.status}); there is nothing to cancel")


async def queued(
    bus: Bus, *, provider: str | None = None, metadata: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """The tasks the providers' consumers have not acked yet (queued, waiting or running), of one
    provider or all, whose metadata has every key and value of ``metadata``: each id with its message's
    sequence, read in one pass from the lowest ack floor of those consumers, by batched direct gets
    (:data:`SCAN_BATCH` messages a round trip; the tasks stream keeps acked tasks too: one acked out of
    order may be among them, and cancelling it finds it ended)."""
    names = bus.names
    subject = names.task_filter(provider, "*") if provider else names.all_tasks
    found: dict[str, int] = {}
    try:
        seq = await _first_unacked(bus, provider)
        async with DirectGets(bus, names.tasks_stream) as gets:
            # room for the largest message at least: a batch that returned none would end the scan
            most = max(SCAN_BATCH_BYTES, bus.nc.max_payload)
            while msgs := await gets.messages(subject, seq, SCAN_BATCH, max_bytes=most):
                for msg in msgs:
                    seq = int((msg.headers or {}).get("Nats-Sequence", "0")) + 1
                    try:
                        task = task_decoder.decode(msg.data)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue  # poison: its worker dead-letters it
                    if all(task.metadata.get(k) == v for k, v in (metadata or {}).items()):
                        found[task.id] = seq - 1
    except (TimeoutError, *BUS_ERRORS) as exc:
        raise BusUnavailable(f"could not read the queue: {why(exc)}") from None
    return found


# Task messages read a round trip when the queue is scanned (a bulk cancel, a batch's end), and the
# bytes at most (a task may carry up to the server's max_payload).
SCAN_BATCH = 512
SCAN_BATCH_BYTES = 4 * 1024 * 1024


async def _first_unacked(bus: Bus, provider: str | None) -> int:
    """The lowest stream sequence that a consumer of ``provider`` (or of any) has not acked, 1 when the
    provider has no consumer (nothing acked its tasks)."""
    names = bus.names
    floors: list[int] = []
    offset = 0
    while True:
        page = await bus.js.consumers_info(names.tasks_stream, offset=offset or None)
        offset += len(page)
        for info in page:
            queue = names.of_consumer(info.name)
            if queue is not None and (provider is None or queue[0] == provider):
                floors.append((info.ack_floor.stream_seq if info.ack_floor else 0) + 1)
        if len(page) < 256:
            break
    return min(floors) if floors else 1


class CancelWatch:
    """The cancelled (and expired) tasks of one provider, as its workers see them, read without a
    consumer: one worker credential that may make consumers may make them until the account has none
    left, and then no worker of any provider starts. Two reads instead, each granted on the provider's
    keys alone:

    - a core subscription to the provider's keys in the cancels bucket hears each cancel as the hub puts
      it. What is heard is a hint: the server hands a publish to subscribers whether or not the stream
      then stores it, so nothing is let go on a hint alone;
    - a direct get of one task's key reads what the bucket stores. A task fetched is looked up when its
      key was listed or heard: the provider's keys are listed (a stream info of the bucket's subjects)
      once the subscription is surely live, so a key put since is heard, and one put before is listed.
      Until then every task fetched is looked up.

    A reconnection forgets the list at once (what was put while the link was down was heard by no one):
    every task fetched is looked up until it is listed again, and the tasks this worker holds are looked
    up.

    Behind a leaf node (a JetStream domain) the hub's ``$KV`` messages do not cross the link, so nothing
    is heard: every task fetched is looked up, and the running calls are looked up every
    :data:`RENEW_CHECK_S` (a task handed back to wait is looked up when it comes back)."""

    def __init__(
        self,
        bus: Bus,
        provider: str,
        on_cancel: Callable[[str], Awaitable[None]],
        *,
        held: Callable[[], Iterable[str]] = tuple,
        running: Callable[[], Iterable[str]] = tuple,
        size: int = 65_536,
    ) -> None:
        self._bus = bus
        self._provider = provider
        self._on_cancel = on_cancel
        self._held = held  # the ids of the tasks this worker holds (running, or waiting to be tried again)
        self._running = running  # the ids of its running calls
        self._deaf = bus.settings.js_domain is not None  # behind a leaf node: nothing is heard
        self._size = size  # ids remembered at most, of each kind (the newest): a bound on memory
        self._heard: OrderedDict[str, None] = OrderedDict()  # cancels heard, not yet looked up
        # ends looked up: each id with whether it ended while queued, and the run it ended (None: every run)
        self._ends: OrderedDict[str, tuple[bool, int | None]] = OrderedDict()
        self._sub: Subscription | None = None
        # the tasks with a key in the bucket (listed, or heard since), looked up at their fetch; None:
        # every task, until listed. Valid while the connection has made ``_listed_reconnects``.
        self._keys: set[str] | None = None
        self._listed_reconnects = -1
        self._list_due = anyio.Event()  # set: list them (again)

    def ends(self, task: Task) -> bool:
        """Whether ``task``'s run was cancelled or expired, as looked up. An expiry ends its own run only:
        a run replayed since is to be run even before the deletion of the key that replay made is heard
        (a fetch may come first)."""
        end = self._ends.get(task.id)
        return end is not None and end[1] in (None, task.run)

    def was_queued(self, task_id: str) -> bool:
        """Whether the task was cancelled (or expired) while queued: its fetch takes it off the count."""
        return self._ends.get(task_id, (False, None))[0]

    async def ended(self, task: Task) -> bool:
        """Whether ``task``, fetched, was cancelled or expired: looked up when its key was listed or
        heard, or when it may have been put unheard. A look-up that fails says no (a call of a cancelled
        task is refused as a duplicate when it ends: a cancel records first)."""
        if task.id in self._heard or not self._unlisted(task.id):
            await self.look_up(task.id)
        return self.ends(task)

    async def heard(self, task: Task) -> bool:
        """Whether a cancel of ``task`` was heard and is stored (looked up now)."""
        if task.id in self._heard:
            await self.look_up(task.id)
        return self.ends(task)

    async def look_up(self, task_id: str) -> bool:
        """Read the task's key as the bucket stores it; whether it records an end. False also when the
        bus does not answer (logged). A cancel heard and not found is kept among the heard: the server
        hands a publish to subscribers before the stream has stored it, so it is looked up again."""
        names = self._bus.names
        try:
            raw = await self._bus.js.get_last_msg(
                f"KV_{names.cancels_bucket}",
                f"$KV.{names.cancels_bucket}.{names.cancel_key(self._provider, task_id)}",
                direct=True,
            )
        except nats.js.errors.NotFoundError:
            self._ends.pop(task_id, None)
            return False
        except BUS_ERRORS as exc:
            log.warning(
                "could not look up whether task %s was cancelled (%s): taken as not", task_id, why(exc)
            )
            return False
        self._heard.pop(task_id, None)
        if (raw.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            # a replay of an expired task: its new run is to be run (hive_bus._dlq.replay)
            self._ends.pop(task_id, None)
            return False
        self._remember(self._ends, task_id, _what_ended(raw.data or b""))
        return True

    def _unlisted(self, task_id: str) -> bool:
        """Whether the task surely has no key in the bucket: not listed, and none heard since."""
        keys = self._keys
        return (
            keys is not None and task_id not in keys and self._listed_reconnects == reconnects(self._bus.nc)
        )

    async def start(self) -> None:
        """Listen to the provider's cancels. Raises :class:`BusRefused` when the worker's credential may
        not read them (one made for an older hive-bus), nats errors."""
        bus, names = self._bus, self._bus.names
        self._listed_reconnects = reconnects(bus.nc)
        self._sub = await bus.nc.subscribe(
            f"$KV.{names.cancels_bucket}.{self._provider}.*", cb=self._on_message
        )
        await bus.nc.flush()
        try:  # a key no task has: the server says it is not there, unless the credential may not ask
            await bus.js.get_last_msg(
                f"KV_{names.cancels_bucket}", f"$KV.{names.cancels_bucket}.{self._provider}.0", direct=True
            )
        except nats.js.errors.NotFoundError:
            pass
        except nats.errors.TimeoutError:
            raise BusRefused(
                f"no answer to a read of the {self._provider} cancels in KV_{names.cancels_bucket} within "
                f"{bus.settings.request_timeout_s:g}s (a worker credential made before workers read them "
                "without a consumer may not: print its block again with nats/worker-user.sh, README "
                '"Upgrading a hub")'
            ) from None
        self._list_due.set()

    async def keep(self) -> None:
        """List the provider's keys once the subscription is surely live, and again after each
        reconnection, until cancelled. nats-py subscribes again as it reconnects; the server hears of it
        at once, its cluster's other servers a moment later, so the keys are listed :data:`LIVE_AFTER_S`
        after the subscription."""
        nc, names = self._bus.nc, self._bus.names
        while self._deaf:
            await anyio.sleep(RENEW_CHECK_S)
            await self._look_up_held(list(self._running()))
        while True:
            with anyio.move_on_after(RENEW_CHECK_S):
                await self._list_due.wait()
            # held tasks whose cancel was heard and not found stored yet: looked up again
            await self._look_up_held([t for t in self._held() if t in self._heard])
            now = reconnects(nc)
            if not nc.is_connected or (now == self._listed_reconnects and not self._list_due.is_set()):
                continue
            self._list_due = anyio.Event()
            if now != self._listed_reconnects:
                self._keys, self._listed_reconnects = None, now
                # held tasks whose cancel was put while the link was down: looked up
                await self._look_up_held(list(self._held()))
            await anyio.sleep(LIVE_AFTER_S)
            try:
                listed = await stream_subjects(
                    self._bus.js,
                    f"KV_{names.cancels_bucket}",
                    f"$KV.{names.cancels_bucket}.{self._provider}.*",
                )
            except BUS_ERRORS as exc:
                log.warning("could not list the %s cancels (%s); trying again", self._provider, why(exc))
                self._list_due.set()
                continue
            keys = {subject.rpartition(".")[2] for subject in listed}
            if len(keys) > MAX_KEYS_LISTED:  # every task looked up instead: a bound on memory
                log.warning("%d %s cancels kept: every task is looked up", len(keys), self._provider)
                continue
            self._keys = keys | set(self._heard)  # valid until the next reconnection (``_unlisted``)

    async def _look_up_held(self, task_ids: list[str]) -> None:
        """Tell the worker of each of these tasks it holds, as of a cancel heard: it looks the key up."""
        for task_id in task_ids:
            self._heard[task_id] = None
            await self._on_cancel(task_id)

    async def stop(self) -> None:
        if self._sub is not None:
            await unsubscribe(self._sub)

    async def _on_message(self, msg: Msg) -> None:
        task_id = msg.subject.rpartition(".")[2]
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            # a replay of an expired task: its new run is to be run (hive_bus._dlq.replay)
            self._heard.pop(task_id, None)
            self._ends.pop(task_id, None)
            return
        self._remember(self._heard, task_id, None)
        if self._keys is not None:
            self._keys.add(task_id)  # looked up at its fetch, forgotten among the heard or not
            if len(self._keys) > MAX_KEYS_LISTED:
                self._keys = None  # every task looked up: a bound on memory
        await self._on_cancel(task_id)

    def _remember(self, ids: OrderedDict[str, Any], task_id: str, value: Any) -> None:
        """Keep ``task_id`` among ``ids``, the newest (the oldest forgotten past ``size``)."""
        ids[task_id] = value
        ids.move_to_end(task_id)
        if len(ids) > self._size:
            ids.popitem(last=False)


# How often a worker looks whether its connection was made again (and its cancels are to be followed
# again).
RENEW_CHECK_S = 1.0
# How long after a subscription every server that may store a cancel (a cluster's) surely knows of it.
LIVE_AFTER_S = 1.0
# The cancelled tasks of a provider a worker keeps the ids of at most (about 100 B each); past it, every
# task it fetches is looked up.
MAX_KEYS_LISTED = 1_000_000


def _what_ended(data: bytes) -> tuple[bool, int | None]:
    """Of a recorded end (a cancel, an expiry): whether it came while the task was queued (counted
    then), and the run it ended (None: every run, as :func:`_same_run` reads it)."""
    end = _end(data)
    if end is None:
        return False, None
    run = end.task.run if isinstance(end, Failed) and end.task is not None else None
    return _counted(end), run


def _end(data: bytes) -> Cancelled | Failed | None:
    try:
        return _end_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # a value of another writer


def _counted(end: Cancelled | Failed) -> bool:
    """Whether the hub counted this end among the queue's tasks ended while queued."""
    return end.was == "queued" and (isinstance(end, Cancelled) or end.reason == "expired")


def _same_run(end: Cancelled | Failed, task: Task) -> bool:
    """Whether an end is of ``task``'s run: a cancel ends every run (a cancelled task is never
    replayed); an expiry, its own (a replayed task's earlier run expired too)."""
    return isinstance(end, Cancelled) or end.task is None or end.task.run == task.run
