"""The Python client: submit tasks, read their state, wait for them, follow results.

A submission is accepted only once JetStream has stored it, and it is stored once: the task message on
``<prefix>.tasks.<provider>.<priority>.<task id>``, in the tasks stream (limits retention, kept as long
as the events), with ``Nats-Msg-Id`` set to the idempotency key's de-duplication id. A task without a
key, whose id is made here, is expected to be the first message on its subject instead
(``FIRST_ON_SUBJECT``): sent twice, it is stored once, and the server keeps no id for it.
That message is the record of the task's acceptance. The stream's RePublish (done by the server, with no
round trip of the client's) stores a headers-only copy of it in the events stream as the task's
``queued`` event, so every reader that goes by event subjects sees the task arrive; a reader that needs
what the task asks reads it from the tasks stream (:func:`hive_bus._assigned.assignment`).

If JetStream says the publish is a duplicate, its ack names the first task message's sequence: the first
task is read back from it, and a resubmission returns the first task's id (within the duplicate
window). A task with a ``not_before`` is the exception: its ``queued`` event, which carries it (its status
reads ``scheduled``), and its start timer are its record until the server queues it at its time.

Why about 900 lines: :class:`Hive` is the one object a user holds, and each of its methods is a short
path onto the bus (submit, read, wait, follow, cancel, batches, schedules, dead letters); the work with
state of its own lives beside it (``_waits``, ``_assigned``, ``_cancel``, ``_batch_client``,
``_schedules``, ``_dlq``).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy
from ulid import ULID

from . import _batch_client, _blobs, _cancel, _dlq, _index, _recent
from ._assigned import PENDING, Assignments, assignment, current
from ._batches import Batch, BatchStore, cancelling
from ._bus import (
    Bus,
    ensure_blobs,
    ensure_dlq_stream,
    ensure_events,
    ensure_index_stream,
    kv_entries,
    open_bus,
    redeclare_workers_bucket,
)
from ._counts import SubmissionCounts
from ._dlq import DeadLetter, Replayed
from ._errors import BusUnavailable, HiveError, NoRoom, QueueFull, TaskEnded, TaskNotFound, TooLarge, Unserved
from ._events import evicted_before_ms, merged_events
from ._messages import (
    ChatMessage,
    Failed,
    Moved,
    Queued,
    ResponseFormat,
    Task,
    TaskRequest,
    TaskView,
    WorkerBeat,
    beat_of,
    decode_event,
    encoder,
    event_decoder,
    is_final,
    is_task_id,
    now_ms,
    task_decoder,
)
from ._names import check_provider
from ._nats import BUS_ERRORS, why
from ._nesting import NestedTooDeep, check_value
from ._prices import PriceTable
from ._publish import FIRST_ON_SUBJECT, Extra, JetStreamPublisher, PubAck, Publish, stored
from ._route import CheapestRouter
from ._schedules import Schedule, ScheduleRequest, Schedules
from ._served import ServedProviders, WebhooksSeen
from ._settings import Settings, load_settings, wait_limit_s
from ._size import header_bytes
from ._stats import ProviderStats, provider_stats
from ._streamed import DEFAULT_KEEPALIVE_S, TaskStream, open_stream
from ._timers import deadline_schedule, ensure_schedules_stream, start_schedule
from ._waits import Seen, Waits

log = logging.getLogger("hive_bus.client")

SUBMIT_WINDOW = 256
# submit_many's tasks go in parts of this many, each one write and one wait (Hive.submit_batch)
SUBMIT_CHUNK = 32
# cancels in flight at once in a bulk cancel
CANCEL_WINDOW = 64
# Tasks this client queued lately, with nowhere to move to: a wait on one reads nothing when the waits'
# follower says nothing has ended it since it was queued (hive_bus._waits), and results() of them reads
# no queued markers. About 240 bytes each: 8 MB when full.
MINE_TASKS = 32_768
# A wait reads the task's state again after this long without an event: only a follower lost with its
# server (a restart) needs it, as the follower delivers every event stored after its start.
RECHECK_S = 5.0
# Tasks :meth:`Hive.results` looks up at once when their events may have been evicted.
EVICTED_LOOKUPS_AT_ONCE = 16


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    duplicate: bool = False
    # why the task may never run: no worker serves its provider now, none did in the last day
    warnings: tuple[str, ...] = ()
    scheduled: bool = False  # it waits for its not_before (status scheduled)


@dataclass(slots=True)
class PartialSubmit(HiveError):
    """Some tasks of a batch were not accepted. ``ids[i]`` is the i-th task's id, or None where it
    was not accepted, and ``errors[i]`` says why."""

    ids: list[str | None]
    errors: dict[int, HiveError] = field(default_factory=dict)

    def __str__(self) -> str:
        first = next(iter(self.errors.items()), None)
        detail = f"; first: task {first[0]}: {first[1]}" if first else ""
        return f"{len(self.errors)} of {len(self.ids)} tasks were not accepted{detail}"


def validate(request: TaskRequest | dict[str, Any]) -> TaskRequest:
    """Check a request as the gateway would; raises :class:`msgspec.ValidationError` naming the field."""
    check_fields(request)  # before anything recursive walks it
    # to builtins first: a dict may hold Structs (ChatMessage, a response format) among plain values
    return msgspec.convert(msgspec.to_builtins(request), TaskRequest)


def request_of(provider: str, prompt: str | None = None, **fields: Any) -> TaskRequest:
    """The checked request of :meth:`Hive.submit`'s arguments (a field given as None is left out)."""
    if fields.get("messages") is not None:
        fields["messages"] = list(fields["messages"])
    fields["metadata"] = fields.get("metadata") or {}
    given = {"provider": provider, "prompt": prompt, **fields}
    return validate({k: v for k, v in given.items() if v is not None})


def _refused(provider: str, warning: str) -> Unserved:
    """A submission for a provider no worker serves, refused (``HIVE_REJECT_UNSERVED``)."""
    return Unserved(f"{warning}; nothing was accepted (HIVE_REJECT_UNSERVED)", provider=provider)


_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


def key_msg_id(key: str) -> str:
    """The de-duplication id of an idempotency key, one per key exactly. A header value loses white
    space and control characters (``"k\n"`` arrived as ``"k"``, ``"a\nb"`` as ``"a b"``), so a key
    with anything but visible ASCII goes by its SHA-256 instead of by itself."""
    if _HEADER_SAFE.fullmatch(key):
        return f"key:{key}"
    return "key#" + hashlib.sha256(key.encode()).hexdigest()


def check_start(request: TaskRequest, settings: Settings, where: str = "") -> None:
    """Raise :class:`msgspec.ValidationError` naming ``not_before`` if it is further ahead than a task
    may wait (:func:`wait_limit_s` of ``HIVE_EVENTS_MAX_AGE_S``): until its time the task's one record
    is its ``queued`` event, which the events stream drops at that age, and its start timer would then
    find no task to queue. ``where``: the task's place in a batch (``tasks[3]``), reported as msgspec
    reports a type's own check."""
    if request.not_before is None:
        return
    limit_s = wait_limit_s(settings.events_max_age_s, settings.audit_every_s)
    ahead_s = request.not_before.timestamp() - now_ms() / 1000
    if ahead_s > limit_s:
        raise msgspec.ValidationError(
            f"`not_before` is {_span(ahead_s)} away, past the {_span(limit_s)} a task may wait on this "
            f"bus (it forgets a task after HIVE_EVENTS_MAX_AGE_S, {_span(settings.events_max_age_s)}): "
            "submit it later, or raise HIVE_EVENTS_MAX_AGE_S" + (f" - at `$.{where}`" if where else "")
        )


def _span(seconds: float) -> str:
    return f"{seconds:.0f}s" + (f" ({seconds / 86400:.1f} days)" if seconds >= 86400 else "")


def check_fields(request: TaskRequest | dict[str, Any]) -> None:
    """Raise :class:`NestedTooDeep` (a :class:`msgspec.ValidationError`) if the request's ``payload``
    or ``metadata`` nests deeper than the bus carries."""
    for name in ("payload", "metadata"):
        value = getattr(request, name) if isinstance(request, TaskRequest) else request.get(name)
        check_value(value, name)


class Hive:
    """A client of the bus. Get one with :func:`connect`."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._router: CheapestRouter | None = None
        self._timers_ready = False  # the timers' stream checked (on the first task with a deadline)
        self._schedule_records: Schedules | None = None  # opened on first use
        self._names = bus.names  # built once: it is on every submission's path
        self._publisher: JetStreamPublisher | None = None
        self._submitted = SubmissionCounts(bus)
        self._waits = Waits(bus)  # every wait on one follower of the events stream
        # id -> (provider, waits' mark: None when its provider's follower did not run then)
        self._mine: OrderedDict[str, tuple[str, int | None]] = OrderedDict()
        self._mine_max = MINE_TASKS
        self._served = ServedProviders(bus)  # started on the first submission
        self._webhooks = WebhooksSeen(bus)  # asked on the first submission with a webhook
        self._index_ready = False  # the metadata index stream is declared (on the first tagged task)
        self._index_lock = anyio.Lock()
        self._streams_made: set[str] = set()  # providers whose events and dead-letter streams are there
        self._streams_lock = anyio.Lock()

    @property
    def bus(self) -> Bus:
        return self._bus

    async def close(self) -> None:
        """Add the last accepted tasks to the bus's submission counters and stop following the events
        for waits; :func:`connect` calls it."""
        await self._waits.close()
        await self._submitted.close()
        await self._served.stop()

    async def submit(
        self,
        provider: str,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage | dict[str, Any]] | None = None,
        response_format: ResponseFormat | dict[str, Any] | None = None,
        model: str | None = None,
        system: str | None = None,
        params: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        payload: Any = None,
        idempotency_key: str | None = None,
        **policy: Any,
    ) -> str:
        """Queue one task and return its id once JetStream has stored it.

        The task asks with ``prompt`` (and ``system`` beside it) or with ``messages``, a conversation
        in OpenAI's roles (``{"role": "user", "content": "..."}``, or :class:`ChatMessage`), never
        both. ``response_format`` (``{"type": "json_object"}``, or ``{"type": "json_schema",
        "json_schema": {"name": ..., "schema": {...}}}``) makes the output a JSON value the worker
        checks. ``policy`` takes the other fields of :class:`TaskRequest`: ``priority``, ``fallback``,
        ``route``, ``max_attempts``, ``backoff_base_s``, ``backoff_cap_s``, ``max_wait_s``,
        ``deadline_s``, ``cache_ttl_s`` (answer from the response cache when a twin completed within it),
        ``not_before`` (a timezone-aware :class:`datetime.datetime`: the server queues the task then;
        its status reads ``scheduled`` until). Raises :class:`msgspec.ValidationError` naming the field of a request that is
        not valid (a schema that is not JSON Schema among them).
        """
        request = request_of(
            provider, prompt, messages=messages, response_format=response_format, model=model,
            system=system, params=params, metadata=metadata, payload=payload,
            idempotency_key=idempotency_key, **policy,
        )  # fmt: skip
        accepted = await self.submit_request(request)
        for warning in accepted.warnings:
            log.warning("task %s: %s", accepted.id, warning)
        return accepted.id

    async def submit_request(self, request: TaskRequest) -> Accepted:
        """Queue a validated request. Raises :class:`BusUnavailable`, :class:`QueueFull`,
        :class:`NestedTooDeep` for a payload or metadata nested deeper than ``MAX_NESTING``,
        :class:`msgspec.ValidationError` for a ``not_before`` further ahead than a task may wait
        (:func:`check_start`), or :class:`TooLarge` for a task the bus cannot carry (its content over
        ``blob_max_bytes``)."""
        warnings = await self._admit(request)
        return await self._submit_task(Task.from_request(request), request.idempotency_key, warnings)

    async def _admit(self, request: TaskRequest) -> tuple[str, ...]:
        """Check a request before it is queued (raises as :meth:`submit_request` says); its warnings."""
        check_fields(request)
        check_start(request, self._bus.settings)
        warning = await self.unserved(request.provider)
        if warning is not None and self._bus.settings.reject_unserved:
            raise _refused(request.provider, warning)
        return await self._warnings(request, warning)

    async def _warnings(self, request: TaskRequest, unserved: str | None) -> tuple[str, ...]:
        """A submission's warnings: its provider served by no worker (``unserved``, as
        :meth:`unserved` said), its webhook sent by no gateway."""
        webhook = await self._webhooks.warning() if request.webhook is not None else None
        return tuple(w for w in (unserved, webhook) if w is not None)

    async def unserved(self, provider: str) -> str | None:
        """Why a task for ``provider`` may never run: no worker serves it now and none did in the last
        day (the message names the providers served); None when one does. Read from a view the client
        follows (:mod:`hive_bus._served`): no round trip but the first."""
        try:
            return await self._served.warning(provider)
        except BUS_ERRORS as exc:
            log.debug("could not tell whether provider %s is served: %s", provider, exc)
            return None

    async def follow_served(self, *, record: bool = False) -> None:
        """Start following which providers are served (the first submission does it otherwise);
        ``record``: also write the record of the providers served, as the gateway does."""
        if record:
            await self._served.stop()
            self._served = ServedProviders(self._bus, record=True)
        await self._served.start()

    async def _submit_task(self, task: Task, key: str | None, warnings: tuple[str, ...] = ()) -> Accepted:
        """Queue a task made from a checked request (its id known to the caller beforehand: a reader of
        its chunks subscribes first); ``warnings`` go into its :class:`Accepted`."""
        if not self._bus.nc.is_connected:
            raise BusUnavailable("not connected to NATS; nothing was accepted")
        task = await self._routed(task)
        self._check_content(task)
        await self._ensure_streams(task.provider)
        task = await _blobs.check_in(self._bus, task)
        message = self._check_messages(task, key)
        await self._ready_timers([task])
        mark = self._waits.mark(task.provider)
        [ack] = await self._publish_tasks([task], [key], [message])
        if isinstance(ack, QueueFull):
            await self._record_rejection(task, str(ack))
        if isinstance(ack, HiveError):
            raise ack
        if ack.duplicate:  # a key seen before: the first task is the one that counts
            task = await self._first_task(ack)
        else:
            self._submitted.add(task.provider)
            self._remember(task, mark)
        return Accepted(task.id, bool(ack.duplicate), warnings, scheduled=task.not_before is not None)

    async def submit_batch(
        self, requests: Sequence[TaskRequest], *, task_ids: Sequence[str] | None = None
    ) -> list[Accepted | HiveError]:
        """Queue validated requests, each as :meth:`submit_request` would, with the publishes of all of
        them in flight together, in one write: each task's message (its one stored write), with its
        metadata index entries and timers. A task counts as accepted only once JetStream stored it.
        Returns each request's outcome, in order: accepted, or the error that
        kept it out. A task the bus cannot carry raises :class:`TooLarge` naming its index, before
        anything is queued. ``task_ids`` gives each task its id (a batch's lines have ids made from the
        batch and the line, so that a line queued twice is one task); new ids by default."""
        for i, request in enumerate(requests):
            try:
                check_fields(request)
            except NestedTooDeep as exc:
                raise NestedTooDeep(f"tasks[{i}].{exc.field}", exc.limit) from None
            check_start(request, self._bus.settings, f"tasks[{i}]")
        return await self._queue_batch(requests, task_ids)

    async def _queue_batch(
        self, requests: Sequence[TaskRequest], task_ids: Sequence[str] | None = None
    ) -> list[Accepted | HiveError]:
        """:meth:`submit_batch` of requests whose nesting is checked (:func:`validate` did it)."""
        if not self._bus.nc.is_connected:  # each task's outcome all the same: none was accepted
            return [BusUnavailable("not connected to NATS; not accepted") for _ in requests]
        made = [Task.from_request(r) for r in requests]
        if task_ids is not None:
            made = [msgspec.structs.replace(t, id=i) for t, i in zip(made, task_ids, strict=True)]
        tasks = [await self._routed(t) for t in made]
        keys = [r.idempotency_key for r in requests]
        for i, task in enumerate(tasks):
            with _naming_task(i):
                self._check_content(task)
        outcomes: list[Accepted | HiveError | None] = [None] * len(tasks)
        no_room: dict[str, NoRoom] = {}
        for provider in sorted({t.provider for t in tasks}):
            try:
                await self._ensure_streams(provider)
            except NoRoom as exc:
                no_room[provider] = exc
        for i, task in enumerate(tasks):
            if task.provider in no_room:
                outcomes[i] = no_room[task.provider]
                continue
            try:
                tasks[i] = await _blobs.check_in(self._bus, task)
            except HiveError as exc:
                outcomes[i] = exc
        messages: dict[int, Publish] = {}
        for i, task in enumerate(tasks):
            if outcomes[i] is None:
                with _naming_task(i):
                    messages[i] = self._check_messages(task, keys[i], fresh=task_ids is None)
        going = [i for i, outcome in enumerate(outcomes) if outcome is None]
        await self._ready_timers(tasks)
        marks = {t.provider: self._waits.mark(t.provider) for t in tasks}
        task_acks = await self._publish_tasks(
            [tasks[i] for i in going], [keys[i] for i in going], [messages[i] for i in going]
        )
        unserved: dict[str, str | None] = {}  # asked once a provider
        for i, task_ack in zip(going, task_acks, strict=True):
            if isinstance(task_ack, QueueFull):
                await self._record_rejection(tasks[i], str(task_ack))
                outcomes[i] = task_ack
                continue
            if isinstance(task_ack, HiveError):
                outcomes[i] = task_ack
                continue
            if task_ack.duplicate:  # a key seen before: the first task is the one that counts
                try:
                    tasks[i] = await self._first_task(task_ack)
                except HiveError as exc:
                    outcomes[i] = exc
                    continue
            else:
                self._submitted.add(tasks[i].provider)
                self._remember(tasks[i], marks[tasks[i].provider])
            if (provider := tasks[i].provider) not in unserved:
                unserved[provider] = await self.unserved(provider)
            outcomes[i] = Accepted(
                tasks[i].id,
                bool(task_ack.duplicate),
                await self._warnings(requests[i], unserved[provider]),
                scheduled=tasks[i].not_before is not None,
            )
        return [outcome for outcome in outcomes if outcome is not None]

    async def submit_many(
        self,
        requests: Iterable[TaskRequest],
        *,
        window: int = SUBMIT_WINDOW,
        on_warning: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Queue many tasks, up to ``window`` publishes in flight at once; ids come back in order.

        Every request is checked first: one that is not valid raises :class:`msgspec.ValidationError`
        naming its index, and nothing is queued. If some are not accepted by the bus, raises
        :class:`PartialSubmit`, which says which ones were. Each warning (a provider no worker serves)
        goes once to ``on_warning``, logged by default.
        """
        tell = on_warning or (lambda warning: log.warning("%s", warning))
        items = []
        for i, request in enumerate(requests):
            try:
                items.append(validate(request))  # Structs are not checked when built in Python
                check_start(items[-1], self._bus.settings)
            except msgspec.ValidationError as exc:
                raise msgspec.ValidationError(f"task {i}: {exc}") from None
        ids: list[str | None] = [None] * len(items)
        errors: dict[int, HiveError] = {}
        size = max(1, min(SUBMIT_CHUNK, window))
        chunks = iter(range(0, len(items), size))
        warned: set[str] = set()

        async def lane() -> None:
            for start in chunks:
                part = range(start, min(start + size, len(items)))
                for i, outcome in zip(part, await self._submit_part([items[i] for i in part]), strict=True):
                    if isinstance(outcome, HiveError):
                        errors[i] = outcome
                        continue
                    ids[i] = outcome.id
                    for warning in set(outcome.warnings) - warned:  # once each, not once a task
                        warned.add(warning)
                        tell(warning)

        async with anyio.create_task_group() as tg:
            for _ in range(min(max(1, window // size), len(items))):
                tg.start_soon(lane)
        if errors:
            raise PartialSubmit(ids, errors)
        return [i for i in ids if i is not None]

    async def _submit_part(self, requests: list[TaskRequest]) -> list[Accepted | HiveError]:
        """Each request's outcome, in order, as :meth:`submit_request` gives it, for the cost of one
        :meth:`submit_batch`: one write and one wait for all of them."""
        refused: dict[str, HiveError] = {}
        if self._bus.settings.reject_unserved:
            for provider in {r.provider for r in requests}:
                if (warning := await self.unserved(provider)) is not None:
                    refused[provider] = _refused(provider, warning)
        try:
            outcomes = iter(await self._queue_batch([r for r in requests if r.provider not in refused]))
        except HiveError:  # one the bus cannot carry (nothing was queued): each alone, to say which
            return [await self._submit_alone(r) for r in requests]
        return [refused[r.provider] if r.provider in refused else next(outcomes) for r in requests]

    async def _submit_alone(self, request: TaskRequest) -> Accepted | HiveError:
        try:
            return await self.submit_request(request)
        except HiveError as exc:
            return exc

    async def get(self, task_id: str) -> TaskView:
        """The task's current state, with what it asks and its metadata. Raises :class:`TaskNotFound`."""
        if not is_task_id(task_id):
            raise TaskNotFound(f"{task_id!r} is not a task id (26 characters of Crockford base32)")
        view, _ = await self._current(task_id)
        return await self._read_output(view)

    async def wait(self, task_id: str, timeout_s: float, *, content: bool = False) -> TaskView:
        """The task's state once it has completed or failed, or when ``timeout_s`` has passed. With
        ``content``, the view carries the task's content and metadata as :meth:`get`'s does (at most
        one more read; without, it may or may not)."""
        if not is_task_id(task_id):  # before it goes into a subject: no wildcards, no white space
            raise TaskNotFound(f"{task_id!r} is not a task id (26 characters of Crockford base32)")
        view = await self._wait(task_id, timeout_s)
        if content and not view.has_content:
            try:
                here = await assignment(self._bus, task_id)
            except BUS_ERRORS as exc:
                raise BusUnavailable(f"could not read task {task_id}: {exc}") from None
            view = view if here is None else view.with_task(here.task)
        return view

    async def _wait(self, task_id: str, timeout_s: float) -> TaskView:
        deadline = anyio.current_time() + timeout_s
        async with self._waits.watch(task_id) as events:
            provider, mark = self._mine.get(task_id, ("", None))
            if mark is not None and self._waits.quiet_since(task_id, provider, mark):
                # queued here, with nowhere to move to, and nothing has ended it since: no read needed
                since = mark
                view = TaskView(id=task_id, provider=provider, status="queued", updated_at_ms=0)
            else:
                # read once the watch stands: every event stored after this read reaches ``events``
                view, since = await self._watched(task_id)
            read = view  # the last view read whole (with the task's content), if any
            while not view.done and (left_s := deadline - anyio.current_time()) > 0:
                seen: Seen | None = None
                with anyio.move_on_after(min(left_s, RECHECK_S)):
                    seen = await events.receive()
                if seen is None:  # quiet: read again, in case the follower was lost with its server
                    read, since = await self._watched(task_id)
                    view = read
                    continue
                try:
                    event = event_decoder.decode(seen.data)
                except (msgspec.DecodeError, RecursionError):
                    continue  # poison: the task's real events still come
                on = self._names.provider_of_subject(seen.subject)
                if isinstance(event, Queued | Moved) or (on == view.provider and since == PENDING):
                    # where is it assigned now (a task moved to a provider that had not queued it yet
                    # has it queued there by now, when that provider records an outcome of it)
                    read, since = await self._watched(task_id)
                    view = read
                elif seen.seq > since and on == view.provider:
                    # under the provider the task is assigned to, after it was put there; and its body
                    # names that provider (else another credential's event)
                    ours = event.provider == view.provider and event.task_id == task_id
                    view = TaskView.of(event) if ours else view
            if not view.done:  # out of time: the task's state as stored (running, retrying...)
                view, _ = await self._current(task_id)
            elif not view.has_content:  # an event's view: the task as a read on the way had it
                view = view.content_from(read)
            return await self._read_output(view)

    def stream(
        self,
        request: TaskRequest,
        *,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
        timeout_s: float | None = None,
    ) -> AbstractAsyncContextManager[TaskStream]:
        """Submit a task whose worker streams its output, and read it as it comes::

            async with hive.stream(request) as stream:
                async for item in stream:  # StreamText, StreamWaiting, StreamRestarted; StreamEnded last
                    ...

        The task's chunks are subscribed to before it is submitted, so none is missed; submission errors
        (:class:`QueueFull`, :class:`BusUnavailable`...) are raised on entering. ``stream.task_id`` is the
        task's id (the first task's, for an idempotency key used before). A :class:`StreamWaiting` comes after
        each ``keepalive_s`` without news; the last item is always :class:`StreamEnded`. See :mod:`hive_bus._streamed`.
        """
        return open_stream(self, request, keepalive_s=keepalive_s, timeout_s=timeout_s)

    def _remember(self, task: Task, mark: int | None) -> None:
        """A task this client queued, for its waits and :meth:`results`, with where the waits'
        follower was before it (:meth:`Waits.mark`, None when it did not run); only one with nowhere to
        move to (a move would put its outcome under another provider)."""
        if task.fallback:
            return
        self._mine[task.id] = (task.provider, mark)
        if len(self._mine) > self._mine_max:
            self._mine.popitem(last=False)

    def remember_own(self, tasks: int) -> None:
        """Remember this client's last ``tasks`` tasks (``MINE_TASKS`` by default, about 240 bytes each),
        which spares a :meth:`wait` or :meth:`results` of them a read. A server whose waits come right
        after each submission, and which calls no :meth:`results` (the gateway), needs few."""
        self._mine_max = max(0, tasks)
        while len(self._mine) > self._mine_max:
            self._mine.popitem(last=False)

    @property
    def waiting(self) -> int:
        """How many tasks this client's waits (:meth:`wait`) are waiting on now."""
        return len(self._waits)

    async def _watched(self, task_id: str) -> tuple[TaskView, int]:
        """:meth:`_current`, read once the task's provider is followed (:meth:`Waits.follow`): every
        event of that provider stored after the read reaches the wait."""
        view, since = await self._current(task_id)
        if not self._waits.follows(view.provider):
            await self._waits.follow(view.provider)
            view, since = await self._current(task_id)
        return view, since

    async def _current(self, task_id: str) -> tuple[TaskView, int]:
        """The task's state (its output not read back), counted from the provider it is assigned to (no
        other credential's events), and the sequence after which an event of it counts."""
        try:
            got = await current(self._bus, task_id)
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not read task {task_id}: {exc}") from None
        if got is None:
            raise TaskNotFound(f"no task {task_id} on the bus")
        return got

    async def results(
        self, task_ids: Sequence[str] | None = None, *, provider: str | None = None
    ) -> AsyncIterator[TaskView]:
        """Yield tasks as they complete or fail.

        With ``task_ids``, each of those tasks is yielded once (including ones that ended before the
        call) and the iterator ends after the last; without, it follows every task from now on.
        """
        names = self._names
        wanted = set(task_ids) if task_ids is not None else None
        # The queued and moved events too: they tell where each task is assigned, and so whose outcome
        # counts, without a look-up per task (a task queued before the first event read is looked up).
        # from now on; with task ids (ULIDs), from the oldest one's time: ids sort by their time. By
        # time, so that a provider's stream made later is read from the same moment.
        since = datetime.datetime.now(datetime.UTC)
        if wanted is not None:
            if not wanted:
                return
            since = ULID.from_str(min(wanted)).datetime

        assigned = Assignments(self._bus, size=max(10_000, 2 * len(wanted or ())))
        # Tasks this client queued with nowhere to move to are assigned where it queued them: when every
        # wanted task is one, their queued markers need not be read (half the messages of a feed).
        mine = [(t, p) for t in wanted or () if (p := self._mine.get(t, ("",))[0])]
        for task_id, provider in mine:
            assigned.assume(task_id, provider)
        assigns_known = wanted is not None and len(mine) == len(wanted)

        def config(on: str) -> ConsumerConfig:
            assigns = [names.event_subject(on, "*", "queued"), names.event_subject(on, "*", "moved")]
            return ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=since,
                filter_subjects=[*([] if assigns_known else assigns), *names.final_events(on)],
            )

        async with merged_events(self._bus, names.events_under, config) as messages:
            # an end evicted before this read began is in no stream: such a task reads evicted
            for view in await self._evicted(wanted or ()):
                assert wanted is not None
                wanted.discard(view.id)
                yield view
                if not wanted:
                    return
            async for msg in messages:
                tokens = msg.subject.split(".")
                if len(tokens) != 5 or (wanted is not None and tokens[3] not in wanted):
                    continue  # another task's: not even decoded
                if tokens[4] == "queued" and self._mine.get(tokens[3], ("",))[0] == tokens[2]:
                    await assigned.counts(msg.subject)  # queued here with nowhere to move to: no decoding
                    continue
                try:
                    event = decode_event(msg.subject, msg.data, msg.headers)
                except (msgspec.DecodeError, RecursionError):
                    continue  # poison, set aside
                if not await assigned.counts(msg.subject, event) or not is_final(event):
                    continue  # recorded under a provider the task is not assigned to, or not an end
                if wanted is not None:
                    wanted.discard(event.task_id)
                yield await self._read_output(TaskView.of(event))
                if wanted is not None and not wanted:
                    return

    async def _evicted(self, task_ids: Iterable[str]) -> list[TaskView]:
        """Those of ``task_ids`` that ended and whose events were evicted since: a read each of the tasks
        submitted before the newest first event the events streams keep (the only ones that may have
        lost theirs), none when no stream has lost any."""
        before_ms = await evicted_before_ms(self._bus) if task_ids else 0
        maybe = [t for t in task_ids if is_task_id(t) and ULID.from_str(t).milliseconds < before_ms]
        found: list[TaskView] = []
        failed: list[HiveError] = []
        limiter = anyio.CapacityLimiter(EVICTED_LOOKUPS_AT_ONCE)

        async def look_up(task_id: str) -> None:
            async with limiter:
                try:
                    view, _ = await self._current(task_id)
                except TaskNotFound:
                    return
                except HiveError as exc:  # raised alone, not in a group
                    failed.append(exc)
                    return
                if view.status == "evicted":
                    found.append(view)

        async with anyio.create_task_group() as tg:
            for task_id in maybe:
                tg.start_soon(look_up, task_id)
        if failed:
            raise failed[0]
        return found

    async def find(
        self,
        metadata: Mapping[str, str],
        *,
        status: str | None = None,
        provider: str | None = None,
        limit: int = 50,
    ) -> list[TaskView]:
        """The newest ``limit`` tasks whose metadata has each key and (string) value of ``metadata``,
        newest first, read from the metadata index (:mod:`hive_bus._index`): the cost of a read follows
        what it returns, not what the bus holds. ``{"batch_id": ...}`` finds a batch's lines,
        ``{"schedule_id": ...}`` a schedule's runs. Each view has its content and metadata (outputs
        kept in the Object Store not read back)."""
        return await _index.find(self._bus, metadata, status=status, provider=provider, limit=limit)

    async def recent(
        self, *, status: str | None = None, provider: str | None = None, limit: int = 50
    ) -> list[TaskView]:
        """The most recent ``limit`` tasks (of ``provider``, in ``status``), newest first, as
        ``GET /v1/tasks`` lists them: read from the tail of the events (:mod:`hive_bus._recent`), each
        with its metadata and its texts cut (:meth:`get` has them whole). Raises :class:`HiveError`
        for a provider that is not a provider's name, and for ``status`` ``evicted``: a task whose events
        were evicted is in no events tail (:meth:`find` lists it by its metadata, :meth:`get` by id)."""
        check_provider(provider)
        if status == "evicted":  # [] would say that none was
            raise HiveError(
                "status evicted is not read from the recent events: a task whose events were evicted "
                "has none there; find it by its metadata (Hive.find) or its id (Hive.get)"
            )
        return await _recent.recent_tasks(self, status=status, provider=provider, limit=limit)

    async def workers(self) -> list[WorkerBeat]:
        """The workers whose heartbeat has not expired, by provider then id. Raises
        :class:`BusUnavailable` when the bus does not answer."""
        timeout_s = self._bus.settings.request_timeout_s
        try:
            values = await kv_entries(self._bus.workers_kv, timeout_s=timeout_s)
        except nats.js.errors.NotFoundError:
            # a restarted server has lost the (in-memory) bucket: no worker has beaten since
            await redeclare_workers_bucket(self._bus)
            return []
        except TimeoutError:
            raise BusUnavailable(f"reading the workers' heartbeats timed out after {timeout_s:g} s") from None
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not read the workers' heartbeats: {why(exc)}") from None
        beats: list[WorkerBeat] = []
        for key, value in values.items():
            if (beat := beat_of(key, value)) is not None:
                beats.append(beat)
            else:  # one bad key (an old or foreign writer) must not hide every other worker
                log.warning(
                    "ignoring heartbeat %s: it does not decode, or is not the worker its key names", key
                )
        return sorted(beats, key=lambda b: (b.provider, b.worker_id))

    async def stats(self) -> list[ProviderStats]:
        """Per provider: queued, in flight, retrying, completed and failed tasks, workers, cooldown."""
        try:
            return await provider_stats(self._bus, await self.workers())
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not read the bus's figures: {exc}") from None

    # dead letters ------------------------------------------------------------------------------------

    async def dead_letters(self, *, provider: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters (of one provider): tasks that failed for good."""
        return await _dlq.dead_letters(self._bus, provider=provider, limit=limit)

    async def dead_letter(self, task_id: str) -> DeadLetter:
        """One task's dead letter. Raises :class:`TaskNotFound`."""
        return await _dlq.dead_letter(self._bus, task_id)

    async def cancel(self, task_id: str, *, reason: str = "") -> TaskView:
        """Cancel a task: a queued or waiting one never runs, a running one is abandoned by its worker,
        and ``cancelled`` is its final status. Cancelling it again is harmless. Raises
        :class:`TaskNotFound`, :class:`TaskEnded` (it completed or failed first), :class:`BusUnavailable`."""
        return await _cancel.cancel(self._bus, task_id, reason)

    async def cancel_where(
        self, *, provider: str | None = None, metadata: Mapping[str, Any] | None = None, reason: str = ""
    ) -> list[TaskView]:
        """Cancel every task still in the queue (queued, waiting or running) of one provider, or all,
        whose metadata has each key and value of ``metadata``; the cancelled tasks' states. Tasks that
        end meanwhile are left out."""
        check_provider(provider)  # it goes into a subject: "*" would name every provider's tasks
        found = await _cancel.queued(self._bus, provider=provider, metadata=metadata)
        views: list[TaskView] = []
        limit = anyio.Semaphore(CANCEL_WINDOW)

        async def one(task_id: str, seq: int) -> None:
            async with limit:
                with contextlib.suppress(TaskEnded, TaskNotFound):
                    view, fresh = await _cancel.cancel_once(self._bus, task_id, reason)
                    if fresh:
                        views.append(view)
                    # its message stays: the tasks stream keeps history, and its workers drop it unrun
                    # (the cancels bucket), acking it

        async with anyio.create_task_group() as tg:
            for task_id, seq in found.items():
                tg.start_soon(one, task_id, seq)
        return sorted(views, key=lambda v: v.id)

    # recurring schedules (a gateway on the bus turns their firings into tasks) ---------------------

    async def create_schedule(
        self,
        task: TaskRequest | dict[str, Any],
        *,
        cron: str | None = None,
        time_zone: str | None = None,
        every_s: float | None = None,
        every: str | None = None,
        name: str = "",
    ) -> Schedule:
        """A recurring schedule of ``task`` (a template: each firing submits it with
        ``metadata["schedule_id"]``): ``cron`` (five fields, or six with seconds first) in ``time_zone``,
        or an interval, ``every_s`` or ``every`` (``"90s"``, ``"15m"``, ``"1h"``, ``"1d"``). Raises
        :class:`hive_bus.BadSchedule` naming the field that is wrong, :class:`TooLarge` for a template
        the bus cannot keep, and :class:`Unserved` as :meth:`submit` would for its provider."""
        request = ScheduleRequest(
            task=validate(task), cron=cron, time_zone=time_zone, every_s=every_s, every=every, name=name
        )
        provider = request.task.provider
        if self._bus.settings.reject_unserved and (warning := await self.unserved(provider)) is not None:
            raise _refused(provider, warning)
        return await (await self._schedule_store()).create(request)

    async def schedules(self) -> list[Schedule]:
        """Every recurring schedule, oldest first."""
        return await (await self._schedule_store()).listed()

    async def schedule(self, schedule_id: str) -> Schedule:
        """One schedule, with its next firing and recent runs. Raises :class:`hive_bus.ScheduleNotFound`."""
        return await (await self._schedule_store()).get(schedule_id)

    async def pause_schedule(self, schedule_id: str) -> Schedule:
        """Stop a schedule's firings (its timer is removed from the server; its record stays)."""
        return await (await self._schedule_store()).pause(schedule_id)

    async def resume_schedule(self, schedule_id: str) -> Schedule:
        """Fire a paused schedule again."""
        return await (await self._schedule_store()).resume(schedule_id)

    async def delete_schedule(self, schedule_id: str) -> None:
        """Remove a schedule (the tasks it submitted stay)."""
        await (await self._schedule_store()).delete(schedule_id)

    async def _schedule_store(self) -> Schedules:
        if self._schedule_records is None:
            self._schedule_records = await Schedules.open(self._bus)
        return self._schedule_records

    # batches (OpenAI's Batch API; a gateway on the bus runs them) ---------------------------------

    async def create_batch(
        self,
        lines: _batch_client.Lines,
        *,
        window: str = "24h",
        model: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Batch:
        """Upload ``lines`` (a path to a JSON Lines file, or the lines: dicts in OpenAI's batch line shape,
        ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``) and create
        their batch. ``model`` sends every line to that model or alias instead of its own; ``window``
        is ``"24h"`` or any ``<n>s``, ``<n>m``, ``<n>h`` up to 168h."""
        return await _batch_client.create(self._bus, lines, window=window, model=model, metadata=metadata)

    async def batch(self, batch_id: str) -> Batch:
        """A batch as it is now. Raises :class:`hive_bus.BatchNotFound`."""
        return await (await BatchStore.open(self._bus)).get(batch_id)

    async def batches(self) -> list[Batch]:
        """Every batch, newest first."""
        return await (await BatchStore.open(self._bus)).list()

    async def wait_batch(
        self, batch_id: str, *, timeout_s: float | None = None, progress: Callable[[Batch], Any] | None = None
    ) -> Batch:
        """The batch once it has ended (or when ``timeout_s`` runs out); ``progress(batch)`` is called
        with each state it passes through."""
        return await _batch_client.wait(self._bus, batch_id, timeout_s=timeout_s, progress=progress)

    def batch_results(self, batch_id: str) -> AsyncIterator[dict[str, Any]]:
        """An ended batch's output and error lines, merged in input order."""
        return _batch_client.results(self._bus, batch_id)

    async def cancel_batch(self, batch_id: str) -> Batch:
        """Ask a batch to stop (``cancelling``; ``cancelled`` once its running lines have ended): its
        queued lines never run."""
        batch, _ = await (await BatchStore.open(self._bus)).change(batch_id, cancelling)
        return batch

    async def replay(self, task_id: str) -> Replayed:
        """Queue a dead-lettered task again (same id, its next run) and take it off the dead letters."""
        return await _dlq.replay(self._bus, task_id)

    async def purge_dead_letters(self, *, task_id: str | None = None, provider: str | None = None) -> int:
        """Drop dead letters: one task's, one provider's, or all. Returns how many went."""
        return await _dlq.purge(self._bus, task_id=task_id, provider=provider)

    # -----------------------------------------------------------------------------------------------

    def _check_content(self, task: Task) -> None:
        """Raise :class:`TooLarge` when the task's content is over what the claim check takes."""
        limit = self._bus.settings.blob_max_bytes
        if (size := len(_blobs.content_bytes(task))) > limit:
            raise TooLarge(
                f"the task's prompt, system and payload are {size} bytes encoded, over the bus's limit "
                f"of {limit} bytes",
                size_bytes=size,
                limit_bytes=limit,
            )

    def _check_messages(self, task: Task, key: str | None, *, fresh: bool = True) -> Publish:
        """The task's message (``fresh``: its id was made for this submission); raises
        :class:`TooLarge` when it (or a scheduled task's ``queued`` event), headers counted, is over the
        server's ``max_payload`` (what is left once the claim check took the content: metadata,
        params...)."""
        limit = self._bus.nc.max_payload
        messages = [self._task_message(task, key, fresh=fresh)]
        if task.not_before is not None:
            messages.append(self._queued_event(task, key))
        for subject, data, msg_id, stream in messages:
            headers = {
                "Nats-Expected-Stream": stream,
                **({"Nats-Msg-Id": msg_id} if msg_id else FIRST_ON_SUBJECT),
            }
            size = len(data) + header_bytes(headers)
            if size > limit:
                raise TooLarge(
                    f"the task is {size} bytes on {subject.split('.', 2)[1]} with its headers once its "
                    f"content is in the object store (its metadata, params or fallbacks are too large), "
                    f"over the NATS server's max_payload of {limit} bytes",
                    size_bytes=size,
                    limit_bytes=limit,
                )
        return messages[0]

    def _queued_event(self, task: Task, key: str | None) -> Publish:
        """A scheduled task's ``queued`` event, with the task: its record until its start timer queues
        it (its status reads ``scheduled``). Other tasks have none but the tasks stream's marker."""
        names = self._names
        queued = Queued(task_id=task.id, provider=task.provider, at_ms=task.submitted_at_ms, task=task)
        subject = names.event_subject(task.provider, task.id, "queued")
        # not the task's own id: its marker, once its timer queues it, carries that one to this stream
        msg_id = key_msg_id(key) if key else f"{task.id}:scheduled"
        return subject, encoder.encode(queued), msg_id, names.events_stream_of(task.provider)

    def _task_message(self, task: Task, key: str | None, *, fresh: bool) -> Publish:
        """The task's message, its one stored write: the de-duplication id of its idempotency key, so
        that a key used again is answered with the first task's id. Without a key, a task whose id was
        made for this submission (``fresh``) has none: it goes as the first message on its subject
        (:meth:`_publish_tasks`); one whose id was given (a batch's line) has its own."""
        names = self._names
        return (
            names.task_subject(task.provider, task.priority, task.id),
            encoder.encode(task),
            key_msg_id(key) if key else None if fresh else task.msg_id,
            names.tasks_stream,
        )

    async def _publish_tasks(
        self, tasks: Sequence[Task], keys: Sequence[str | None], task_messages: Sequence[Publish]
    ) -> list[PubAck | HiveError]:
        """What queues ``tasks``, all in one write: each one's task message (the record of its
        acceptance), or for a task with a ``not_before`` its ``queued`` event (which carries it) and its
        start timer (the server queues it then), with its metadata index entries
        (:mod:`hive_bus._index`); after them all, the deadline timers of those that have one. Returns
        each task's outcome, in order: its task message's, or its ``queued`` event's. An index entry,
        a start or a deadline timer that was not stored is logged, and the task is accepted all the
        same (a filter by its metadata misses it; its workers still check its deadline).
        ``task_messages``: each task's message, as :meth:`_check_messages` made and checked it."""
        settings = self._bus.settings
        messages: list[Publish] = []
        extra: dict[int, Mapping[str, str]] = {}
        places: list[int] = []
        for task, key, message in zip(tasks, keys, task_messages, strict=True):
            places.append(len(messages))
            if (start := start_schedule(settings, task)) is not None:
                message = self._queued_event(task, key)
                messages.append(message)
                extra[len(messages)] = start[1]
                messages.append(start[0])
            else:
                if message[2] is None:  # its id made here: the first message on its subject
                    extra[len(messages)] = FIRST_ON_SUBJECT
                messages.append(message)
            messages += _index.entries(self._names, task.id, task.metadata, message[2] or task.msg_id)
        if len(messages) > len(tasks):
            await self._ensure_index()
        for task in tasks:
            if (timer := deadline_schedule(settings, task)) is not None:
                extra[len(messages)] = timer[1]
                messages.append(timer[0])
        outcomes = await self._publish_all(messages, extra)
        work = set(places)
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, HiveError) and i not in work:
                log.warning("not stored, the task is accepted all the same (%s): %s", messages[i][0], outcome)
        return [outcomes[place] for place in places]

    async def _ensure_streams(self, provider: str) -> None:
        """The provider's events and dead-letter streams and its claim check bucket, made before its first
        task is stored: the tasks stream republishes each task as its ``queued`` marker into the first,
        and its workers start only once all three are there. Raises :class:`NoRoom` when JetStream has
        no room for one: a task accepted then would never run. One that can be neither found nor made for
        another reason (NATS slow, a credential that may not make streams) is logged and the task is
        queued all the same: its marker is lost, and its readers find it in the tasks stream
        (hive_bus._assigned)."""
        if provider in self._streams_made:
            return
        async with self._streams_lock:  # one declaration, however many first submissions come at once
            if provider in self._streams_made:
                return
            try:
                await ensure_events(self._bus, provider)
            except NoRoom:
                raise
            except HiveError as exc:
                log.warning("tasks of %s are queued without their queued markers: %s", provider, exc)
                return
            try:
                await ensure_dlq_stream(self._bus.js, self._bus.settings, provider)
            except NoRoom:
                raise
            except (HiveError, *BUS_ERRORS) as exc:  # its dead letters are refused; its workers say so
                log.warning("the dead-letter stream of provider %s is not there: %s", provider, why(exc))
                return
            try:
                await ensure_blobs(self._bus, provider)
            except NoRoom:
                raise
            except HiveError as exc:  # its large tasks are refused, its large outputs redelivered: logged
                log.warning("%s", exc)
                return
            self._streams_made.add(provider)

    async def _ensure_index(self) -> None:
        """The metadata index stream, made on the first tagged submission (untagged work never needs
        it); a failure is logged, and the entries' publishes say what became of them."""
        if self._index_ready:
            return
        async with self._index_lock:  # one declaration, however many tagged submissions come at once
            if self._index_ready:
                return
            try:
                await ensure_index_stream(self._bus.js, self._bus.settings)
                self._index_ready = True
            except (HiveError, *BUS_ERRORS) as exc:
                log.warning("could not declare the metadata index stream: %s", exc)

    async def _routed(self, task: Task) -> Task:
        """The task with its providers put in order by its routing policy (``cheapest`` reorders)."""
        if task.route != "cheapest" or not task.fallback:
            return task
        if self._router is None:
            self._router = CheapestRouter(self._bus, PriceTable.load(self._bus.settings.prices_file))
        return await self._router.route(task)

    async def _ready_timers(self, tasks: Sequence[Task]) -> None:
        """The timers' stream made or checked, before the first task with a deadline publishes anything."""
        timed = any(task.deadline_s is not None or task.not_before is not None for task in tasks)
        if not self._timers_ready and timed:
            await ensure_schedules_stream(self._bus.js, self._bus.settings)
            self._timers_ready = True

    async def _publish_all(
        self, messages: list[Publish], extra: Extra | None = None
    ) -> list[PubAck | HiveError]:
        """Every message on the wire in one write, then every ack (one deadline for them all): each
        one's ack, or why it was not stored. ``extra``: more headers of some, by index."""
        timeout_s = self._bus.settings.request_timeout_s
        try:
            outcomes = await (await self._js_publisher()).publish_together(messages, extra)
        except TooLarge as exc:
            return [exc for _ in messages]
        except BUS_ERRORS as exc:
            return [
                BusUnavailable(f"JetStream did not store the publish to {stream}: {exc}")
                for _, _, _, stream in messages
            ]
        results: list[PubAck | HiveError] = []
        for outcome, (_, _, _, stream) in zip(outcomes, messages, strict=True):
            try:
                results.append(stored(outcome, stream, timeout_s))
            except HiveError as exc:
                results.append(exc)
        return results

    async def _read_output(self, view: TaskView) -> TaskView:
        """The view with an output kept in the Object Store read back; without it (and its reference
        kept) if the object is gone."""
        try:
            return await _blobs.read_output(self._bus, view)
        except _blobs.BlobMissing as exc:
            log.warning("task %s: %s", view.id, exc)
            return msgspec.structs.replace(view, error=str(exc))

    async def _js_publisher(self) -> JetStreamPublisher:
        if self._publisher is None:
            publisher = JetStreamPublisher(
                self._bus.nc,
                self._bus.settings.request_timeout_s,
                unchecked=frozenset({self._names.tasks_stream}),
            )
            await publisher.start()
            if self._publisher is None:
                self._publisher = publisher
            else:  # another submission started one meanwhile
                await publisher.stop()
        return self._publisher

    async def _first_task(self, ack: PubAck) -> Task:
        """The task a repeated idempotency key first queued, read by the sequence its duplicate's ack
        names: a task message, or a scheduled task's ``queued`` event."""
        try:
            raw = await self._bus.js.get_msg(ack.stream, seq=ack.seq, direct=True)
        except BUS_ERRORS as exc:
            raise BusUnavailable(
                f"could not read the first task of a repeated idempotency key: {exc}"
            ) from None
        try:
            if ack.stream == self._names.tasks_stream:
                return task_decoder.decode(raw.data or b"")
            event = event_decoder.decode(raw.data or b"")
        except (msgspec.DecodeError, RecursionError) as exc:
            raise HiveError(
                f"{ack.stream} message {ack.seq} does not decode ({exc}); cannot resolve duplicate"
            ) from None
        if not isinstance(event, Queued) or event.task is None:
            raise HiveError(f"{ack.stream} message {ack.seq} is not a queued task; cannot resolve duplicate")
        return event.task

    async def _record_rejection(self, task: Task, why: str) -> None:
        event = Failed(
            task_id=task.id, provider=task.provider, at_ms=now_ms(), attempt=0, worker=None,
            reason="rejected", error=why,
        )  # fmt: skip
        try:
            await self._bus.js.publish(
                self._names.event_subject(task.provider, task.id, "failed"), encoder.encode(event)
            )
        except BUS_ERRORS as exc:
            log.warning("could not record the rejection of task %s: %s", task.id, exc)


@contextlib.contextmanager
def _naming_task(index: int) -> Iterator[None]:
    """A :class:`TooLarge` raised inside names the task's place in its batch."""
    try:
        yield
    except TooLarge as exc:
        raise TooLarge(
            f"task {index}: {exc}", size_bytes=exc.size_bytes, limit_bytes=exc.limit_bytes, index=index
        ) from None


@asynccontextmanager
async def connect(
    url: str | None = None, *, settings: Settings | None = None, **options: Any
) -> AsyncIterator[Hive]:
    """Connect to a bus: ``async with hive_bus.connect("nats://pi.local:4222") as hive: ...``.

    ``options`` are :class:`Settings` fields (``prefix``, ``request_timeout_s``, ...); ``HIVE_*``
    environment variables fill in the rest.
    """
    if settings is None:
        settings = load_settings(nats_url=url, **options)
    async with open_bus(settings, name="hive-client") as bus:
        hive = Hive(bus)
        try:
            yield hive
        finally:
            await hive.close()
