"""The gateway's HTTP API v1: route handlers and the shapes they answer with.

Every shape is a msgspec Struct, so Litestar validates requests and writes the OpenAPI document from the
same types the bus uses.

Why about 600 lines: the ``/v1`` route handlers beside the shapes they answer with, one handler a
route, so the API reads in the order of its reference; the work behind each is elsewhere
(``answers.py``, the client).
"""

# No "from __future__ import annotations" here: Litestar reads the parameter markers at run time.
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any, get_args

import anyio
import msgspec
from litestar import MediaType, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import ValidationException
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from hive_bus import (
    BusUnavailable,
    Hive,
    ProviderStats,
    TaskRequest,
    TaskView,
    WorkerBeat,
)
from hive_bus._assigned import Assignments, marker_seq, task_at
from hive_bus._audit import AuditReport, StoreAudit
from hive_bus._bus import Bus, event_providers
from hive_bus._events import merged_events
from hive_bus._events import task_events as read_task_events
from hive_bus._messages import (
    Failed,
    Moved,
    ProviderName,
    Queued,
    TaskEvent,
    TaskStatus,
    encoder,
    event_decoder,
    is_final,
    is_marker,
    queued_marker,
)
from hive_bus._names import PROVIDER_PATTERN, is_valid_token
from hive_bus._nats import BUS_ERRORS

from . import answers
from .answers import BatchAccepted, ErrorBody, TaskAccepted
from .feeds import Feeds
from .list_reads import ListReads
from .metrics import SCRAPE_MAX_AGE_S, SCRAPE_REFRESH_S, BusMetrics, UsageSince, lost_count
from .room import Room
from .webhooks import urls as webhook_urls
from .webhooks.api import refusal as webhook_refusal

log = logging.getLogger("hive_bus.gateway")

MAX_WAIT_S = 300.0
# A batch's body; one task's is GatewayOptions.max_body_bytes. Both leave room for a task's content up
# to the bus's blob_max_bytes (16 MiB) with its JSON escapes.
BATCH_MAX_BODY_BYTES = 40 * 1024 * 1024
# A task's event stream ends with the task; this bounds one that never ends (its provider never runs).
MAX_EVENTS_STREAM_S = 3600.0
# A quiet feed of every event sends an SSE comment this often, so that proxies keep it open and a
# client that went away is noticed.
FEED_KEEPALIVE_S = 15.0
# A Last-Event-ID at most: a provider name and a sequence for each of many providers.
MAX_EVENT_ID_CHARS = 16_384
# How often a feed looks whether the gateway is stopping, so that a stop need not wait for its end.
FEED_POLL_S = 0.5
EVENT_STATUSES = frozenset(get_args(TaskStatus)) - {"evicted"}  # a read's finding: no event records it
SSE = "text/event-stream"


def _errors(*codes: int, shape: type[Any] = ErrorBody) -> dict[int, ResponseSpec]:
    """The error answers of a route for its OpenAPI document, in ``shape`` (OpenAI's for its routes)."""
    words = {
        400: "the request is not valid; the message says what and where",
        401: "a bearer token is needed",
        404: "no such task or route",
        409: "the request conflicts with the state of the bus (a dead letter without a task to replay)",
        413: "the body is larger than the gateway's limit, or a task larger than the bus carries "
        "(the message names the limit, and in a batch the task); nothing was accepted",
        503: "NATS or JetStream did not answer, or the queue is full (see Retry-After); nothing was accepted",
        507: "JetStream has no room for the streams of a new provider (code storage_reserved or "
        "streams_limit; the message says what to raise in the account's limits); nothing was accepted",
    }
    return {
        c: ResponseSpec(data_container=shape, description=words[c], generate_examples=False) for c in codes
    }


class BatchRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tasks: list[TaskRequest]


def _hive(state: State) -> Hive:
    hive: Hive = state.hive
    return hive


async def _too_deep(request: Request[Any, Any, Any]) -> Response[Any] | None:
    """The 400 for a body nested too deep, before the framework's decoder recurses into it (the fast
    path checks the same, so this serves a request it passed on, or a gateway without it; and a bulk
    cancel's ``metadata``, which sits where a task's does)."""
    answer = answers.too_deep(await request.body(), batch=request.url.path == "/v1/tasks/batch")
    return None if answer is None else as_response(answer)


@post(
    "/v1/tasks",
    status_code=202,
    summary="Submit a task",
    before_request=_too_deep,
    responses=_errors(400, 401, 413, 503, 507),
)
async def submit_task(
    data: JSONBody[TaskRequest],
    state: State,
    idempotency_key: Annotated[
        str | None,
        HeaderParameter(
            name="idempotency-key",
            required=False,
            description="the task's idempotency key, as the body's idempotency_key (1 to 256 characters; "
            "both given, they must be the same)",
        ),
    ] = None,
) -> Response[TaskAccepted]:
    """Queue one task. 202 once JetStream has stored it; 200 with the first task's id and current
    status when the idempotency key (the body's ``idempotency_key``, or the ``Idempotency-Key`` header)
    was already used inside the de-duplication window."""
    refused = await webhook_refusal(state.webhooks, data)
    if refused is not None:
        return as_response(answers.invalid(refused[1], field=refused[0]))
    return as_response(await answers.submit_one(_hive(state), data, idempotency_key))


@post(
    "/v1/tasks/batch",
    status_code=202,
    summary="Submit several tasks",
    request_max_body_size=BATCH_MAX_BODY_BYTES,
    before_request=_too_deep,
    responses=_errors(400, 401, 413)
    | {503: ResponseSpec(data_container=BatchAccepted, description="some not accepted")},
)
async def submit_batch(data: JSONBody[BatchRequest], state: State) -> Response[BatchAccepted]:
    """Queue up to the gateway's batch limit of tasks, each stored by JetStream before it counts.
    202 when all were accepted; 503 with each task's outcome (its id, or why not) when some were not.
    A task that is not valid makes the whole batch a 400 naming it, and nothing is queued."""
    limit: int = state.max_batch
    answer = answers.batch_size_error(len(data.tasks), limit)
    for i, task in enumerate(data.tasks if answer is None else []):
        refused = await webhook_refusal(state.webhooks, task)
        if refused is not None:  # the whole batch, as for any task that is not valid
            return as_response(answers.invalid(f"tasks[{i}].{refused[1]}", field=f"tasks[{i}].{refused[0]}"))
    return as_response(answer or await answers.submit_many(_hive(state), data.tasks))


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which queued tasks to cancel: those of a provider, those whose metadata has each key and value
    given, or both; one of the two at least."""

    provider: ProviderName | None = None
    metadata: dict[str, Any] | None = None
    reason: Annotated[str, msgspec.Meta(max_length=1000)] = ""


class CancelledTasks(msgspec.Struct, frozen=True, kw_only=True):
    cancelled: list[TaskView]


@post(
    "/v1/tasks/{task_id:str}/cancel",
    status_code=200,
    summary="Cancel a task",
    responses=_errors(400, 401, 404, 409, 503),
)
async def cancel_task(state: State, task_id: FromPath[str]) -> TaskView:
    """A queued or waiting task never runs; a running one is abandoned by its worker. 200 with its
    state (``cancelled``), also when it was cancelled before; 409 when it completed or failed first."""
    return await _hive(state).cancel(task_id, reason="cancelled through the HTTP API")


@post(
    "/v1/tasks/cancel",
    status_code=200,
    summary="Cancel the queued tasks of a provider, or of a metadata key and value",
    before_request=_too_deep,
    responses=_errors(400, 401, 503),
)
async def cancel_tasks(data: JSONBody[CancelRequest], state: State) -> CancelledTasks:
    """Every task still in the queue (queued, waiting or running) that matches; the ones cancelled."""
    if data.provider is None and not data.metadata:
        raise ValidationException("give provider, metadata or both: which tasks to cancel")
    views = await _hive(state).cancel_where(
        provider=data.provider,
        metadata=data.metadata,
        reason=data.reason or "cancelled in bulk through the HTTP API",
    )
    return CancelledTasks(cancelled=views)


def as_response(answer: answers.Answer) -> Response[Any]:
    """An answer of :mod:`services.answers` as the framework sends it."""
    return Response(
        answer.content, status_code=answer.status, media_type=MediaType.JSON, headers=answer.headers or None
    )


@get(
    "/v1/tasks/{task_id:str}",
    summary="A task's status and, once done, its result",
    responses=_errors(400, 401, 404, 503),
)
async def get_task(
    task_id: FromPath[str],
    state: State,
    wait: Annotated[
        float,
        QueryParameter(
            ge=0, le=MAX_WAIT_S, description="hold the request up to this many seconds for the end"
        ),
    ] = 0.0,
) -> TaskView:
    """The task's state, what it asks (``prompt`` and ``system``, or ``messages``: whole; a content kept in
    the Object Store is ``content_stored_bytes``, its size) and its ``metadata``."""
    hive = _hive(state)
    if wait > 0:
        return await hive.wait(task_id, wait, content=True)
    return await hive.get(task_id)


@get(
    "/v1/tasks/{task_id:str}/events",
    summary="A task's status changes as Server-Sent Events",
    media_type=SSE,
    responses=_errors(400, 401, 404, 503),
)
async def task_events(task_id: FromPath[str], state: State) -> ServerSentEvent:
    """Every event of the task so far, then each new one as it happens, until the task has completed
    or failed. Each message's ``event`` is the status; its ``data`` the event as JSON; its ``id`` the
    event's place in the record (``<provider>=<sequence>``). A task that ended with its events evicted
    since is one message, ``evicted``, whose ``data`` is the task as ``GET /v1/tasks/{id}`` reads it."""
    hive = _hive(state)
    view = await hive.get(task_id)  # 404 now, before the stream starts, for an unknown task
    bus = hive.bus
    assigned = Assignments(bus)  # events another credential wrote for the task are left out

    async def events() -> AsyncIterator[ServerSentEventMessage]:
        if view.status == "evicted":  # no event of it is left to send, nor will one come
            yield ServerSentEventMessage(data=encoder.encode(view).decode(), event=view.status)
            return
        # the task's provider's stream, then at each move the next provider's
        found = read_task_events(bus, task_id, assigned, live=True, quiet_s=FEED_KEEPALIVE_S)
        async with contextlib.aclosing(found):
            with anyio.move_on_after(MAX_EVENTS_STREAM_S):
                async for item in found:
                    if item is None:  # quiet: so that proxies keep it open, and a client gone is noticed
                        yield ServerSentEventMessage(data=None, comment="keep-alive")
                        continue
                    msg, event = item
                    yield ServerSentEventMessage(
                        data=(await _event_json(bus, msg)).decode(),
                        event=TaskView.of(event).status,  # a task waiting for its not_before: scheduled
                        id=f"{event_provider(bus, msg)}={_seq(msg)}",
                    )
                    if is_final(event):
                        return

    feeds: Feeds = state.feeds
    return ServerSentEvent(feeds.opened(events()))


@get(
    "/v1/events",
    summary="Every task event as Server-Sent Events",
    media_type=SSE,
    responses=_errors(400, 401, 503),
)
async def all_events(
    state: State,
    provider: Annotated[
        str | None, QueryParameter(pattern=PROVIDER_PATTERN, description="only this provider's events")
    ] = None,
    last_event_id: Annotated[
        str | None,
        HeaderParameter(
            name="last-event-id",
            max_length=MAX_EVENT_ID_CHARS,
            required=False,
            description="resume after this event: the ``id`` of the last one received (with "
            "``provider``, a plain sequence of that provider's events is taken too)",
        ),
    ] = None,
) -> ServerSentEvent:
    """Each task event from now on (or, with ``Last-Event-ID``, from just after that one), as it
    happens. Each message's ``event`` is the status, its ``data`` the event as JSON and its ``id`` its
    place in the record: where the feed is in each provider's events, ``<provider>=<sequence>`` joined by
    commas (each provider's events are in order; two providers' are not ordered between them). The
    gateway ends a feed after an hour (and when it stops); a client that reconnects with
    ``Last-Event-ID`` misses nothing (a provider the id does not name, whose events began since, is read
    from its first event)."""
    bus = _hive(state).bus
    names = bus.names
    # by provider, the sequence of the last event read (or skipped) in its stream: the ``id`` sent
    read = None if last_event_id is None else _resume_positions(last_event_id, provider)
    if read is None:  # from now on: where each stream there is ends
        try:
            read = {
                of: (await bus.js.stream_info(names.events_stream_of(of))).state.last_seq
                for of in await event_providers(bus)
                if provider in (None, of)
            }
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not read the events streams: {exc}") from None
    stopping: threading.Event = state.stopping
    feed_max_s: float = state.feed_max_s
    assigned = Assignments(bus)  # events a credential wrote for another provider's task are left out

    def config(of: str) -> ConsumerConfig:
        read.setdefault(of, 0)  # a stream the id does not name, made since: from its start
        return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=read[of] + 1)

    async def events() -> AsyncIterator[ServerSentEventMessage]:
        async with merged_events(bus, names.events, config, only=provider) as received:
            end = anyio.current_time() + feed_max_s
            quiet_since = anyio.current_time()
            while not stopping.is_set() and (left_s := end - anyio.current_time()) > 0:
                msg: Msg | None = None
                with anyio.move_on_after(min(FEED_POLL_S, left_s)):
                    msg = await anext(received)
                if msg is None:
                    if anyio.current_time() - quiet_since >= FEED_KEEPALIVE_S:
                        quiet_since = anyio.current_time()
                        yield ServerSentEventMessage(data=None, comment="keep-alive")
                    continue
                read[event_provider(bus, msg)] = _seq(msg)
                status = names.status_of_subject(msg.subject)
                if status not in EVENT_STATUSES:
                    continue  # not a task event: nothing a client could read
                if not await assigned.counts(msg.subject):
                    continue
                quiet_since = anyio.current_time()
                body = await _event_json(bus, msg)
                yield ServerSentEventMessage(
                    data=body.decode(errors="replace"), event=_fed_status(status, body), id=event_id(read)
                )

    feeds: Feeds = state.feeds
    return ServerSentEvent(feeds.opened(events()))


def _fed_status(status: str, body: bytes) -> str:
    """The status a feed's message names, as ``GET /v1/tasks/{id}``, the list and ``hive watch`` read
    the event: a ``queued`` event whose task waits for its ``not_before`` is ``scheduled``."""
    if status != "queued" or b'"not_before"' not in body:  # most are not scheduled: no decoding
        return status
    try:
        return TaskView.of(event_decoder.decode(body)).status
    except (msgspec.DecodeError, msgspec.ValidationError):
        return status


def event_id(read: dict[str, int]) -> str:
    """A feed's place: each provider's with the sequence of its last event read, ``echo=12,groq=40``."""
    return ",".join(f"{provider}={seq}" for provider, seq in sorted(read.items()))


def _resume_positions(last_event_id: str, provider: str | None) -> dict[str, int]:
    """The places a ``Last-Event-ID`` names, by provider (a 400 for one that names none); with
    ``provider``, a plain sequence is that provider's, and the places of other providers are left out."""
    read: dict[str, int] = {}
    text = last_event_id.strip()
    # ASCII digits only: a header's bytes are read as Latin-1, where b"\xb2" is "²", a digit to
    # str.isdigit() that int() refuses
    if provider is not None and _is_sequence(text):
        read[provider] = int(text)
    else:
        for part in text.split(","):
            name, sep, seq = part.strip().partition("=")
            if not sep or not is_valid_token(name) or not _is_sequence(seq):
                message = "Last-Event-ID must be the id of an event of this feed: <provider>=<sequence>,..."
                raise ValidationException(
                    detail=message, extra=[{"message": message, "key": "last-event-id", "source": "header"}]
                )
            read[name] = int(seq)
    return read if provider is None else {p: seq for p, seq in read.items() if p == provider}


def _is_sequence(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 16


def event_provider(bus: Bus, msg: Msg) -> str:
    """The provider whose events stream ``msg`` was read from (its subject names it)."""
    return bus.names.provider_of_subject(msg.subject)


@get("/v1/tasks", summary="Recent tasks, newest first", responses=_errors(400, 401, 503))
async def list_tasks(
    state: State,
    status: Annotated[TaskStatus | None, QueryParameter(description="only tasks in this status")] = None,
    provider: Annotated[
        str | None, QueryParameter(pattern=PROVIDER_PATTERN, description="only this provider's tasks")
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=500, description="at most this many")] = 50,
    meta: Annotated[
        list[str] | None,
        QueryParameter(
            description="only tasks whose metadata has this key and string value, given as KEY:VALUE "
            "(repeat for several; each must hold); read from the metadata index",
            max_items=8,
        ),
    ] = None,
    batch: Annotated[
        str | None,
        QueryParameter(min_length=1, description="only this batch's lines (metadata batch_id)"),
    ] = None,
    schedule: Annotated[
        str | None,
        QueryParameter(min_length=1, description="only this schedule's runs (metadata schedule_id)"),
    ] = None,
) -> list[TaskView]:
    """Each task's state with its ``metadata`` and what it asks, cut: each of ``prompt``, ``system`` and
    a message's text to its first 200 characters, of ``messages`` the first and the last three, and
    ``content_cut: true`` when anything was (``GET /v1/tasks/{id}`` has it whole).

    Without ``meta``, ``batch`` or ``schedule``: the most recent tasks, from the tail of the events.
    With them: the newest tasks of that metadata, however old, from the metadata index (its cost follows
    what is returned; ``status`` and ``provider`` are applied to the newest 2,000 such tasks at most)."""
    hive = _hive(state)
    wanted = _wanted(meta, batch, schedule)
    if status == "evicted" and not wanted:  # the tail of the events holds none: [] would say none was
        message = (
            "status evicted lists only with meta, batch or schedule: a task whose events were evicted "
            "is in no events tail, the recent list's source; its metadata index entry still finds it"
        )
        raise ValidationException(
            detail=message, extra=[{"message": message, "key": "status", "source": "query"}]
        )
    reads: ListReads = state.list_reads
    async with reads.turn():  # a few at a time, however many ask (services.list_reads)
        if wanted:
            found = await hive.find(wanted, status=status, provider=checked_provider(provider), limit=limit)
            return [view.trimmed() for view in found]
        return await hive.recent(status=status, provider=checked_provider(provider), limit=limit)


def _wanted(meta: list[str] | None, batch: str | None, schedule: str | None) -> dict[str, str]:
    """The metadata a list is filtered by, from its query parameters (a 400 naming a bad ``meta``)."""
    wanted: dict[str, str] = {}  # the index is read by the first: a batch or a schedule is narrow
    if batch is not None:
        wanted["batch_id"] = batch
    if schedule is not None:
        wanted["schedule_id"] = schedule
    for item in meta or []:
        key, sep, value = item.partition(":")
        message = None
        if not sep or not key:
            message = f"meta must be KEY:VALUE (a metadata key, a colon, its value); got {item!r}"
        elif key in wanted:
            message = f"meta names the metadata key {key!r} twice (batch is batch_id, schedule schedule_id)"
        if message is not None:
            raise ValidationException(
                detail=message, extra=[{"message": message, "key": "meta", "source": "query"}]
            )
        wanted[key] = value
    return wanted


async def _event_json(bus: Bus, msg: Msg) -> bytes:
    """An event as a feed sends it: a ``queued`` marker as the event with its task (read from the tasks
    stream by the sequence the marker names: what it asks is what a reader shows), else as stored; a
    task in it as :func:`shown_event` shows it."""
    if not is_marker(msg.data, msg.headers) or (event := queued_marker(msg.subject, msg.headers)) is None:
        data = msg.data or b""
        if bus.names.status_of_subject(msg.subject) not in _WITH_TASK or b'"task"' not in data:
            return data  # most events carry no task: no decoding
        try:
            return encoder.encode(shown_event(event_decoder.decode(data)))
        except (msgspec.DecodeError, msgspec.ValidationError):
            return data
    seq = marker_seq(msg.headers)
    with contextlib.suppress(*BUS_ERRORS):
        if seq is not None and (task := await task_at(bus, seq, event.task_id)) is not None:
            event = msgspec.structs.replace(event, task=task)
    return encoder.encode(shown_event(event))


_WITH_TASK = frozenset({"queued", "moved", "failed"})  # the events that may carry their task


def shown_event(event: TaskEvent) -> TaskEvent:
    """``event`` as the HTTP API shows it: its task without the seal (known only to the gateway and the
    workers of the task's provider) and with its webhook's URL as the delivery records show it, without
    user, password or query (where a receiver's token lives)."""
    if not isinstance(event, Queued | Moved | Failed) or event.task is None:
        return event
    task = event.task
    webhook = task.webhook and msgspec.structs.replace(task.webhook, url=webhook_urls.shown(task.webhook.url))
    return msgspec.structs.replace(event, task=msgspec.structs.replace(task, seal="", webhook=webhook))


@get(
    "/v1/stats",
    summary="Per provider: queued, in flight, retrying, completed, failed, cooldown",
    responses=_errors(401, 503),
)
async def stats(state: State) -> list[ProviderStats]:
    return await _hive(state).stats()


@get("/v1/workers", summary="Workers whose heartbeat has not expired", responses=_errors(401, 503))
async def list_workers(state: State) -> list[WorkerBeat]:
    return await _hive(state).workers()


class Readiness(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    status: str
    reason: str | None = None


@get(
    "/healthz",
    summary="The gateway process is up, and its NATS connection is not gone for good",
    responses={503: ResponseSpec(data_container=Readiness, description="the NATS connection is gone")},
)
async def healthz(state: State) -> Response[Readiness]:
    bus = _hive(state).bus
    link = bus.link
    if bus.is_lost():
        # nats-py does not reconnect after the server closed the connection: restart this process
        reason = f"the NATS connection was closed for good: {link.reason}"
        return Response(Readiness(status="unavailable", reason=reason), status_code=503)
    return Response(Readiness(status="ok"), status_code=200)


@get(
    "/readyz",
    summary="NATS answers and JetStream stores what is submitted",
    responses={503: ResponseSpec(data_container=Readiness, description="not ready, and why")},
)
async def readyz(state: State) -> Response[Readiness]:
    """Read from the gateway's last look at JetStream's room (every few seconds, services.room): no
    request to NATS per call while it is ready."""
    bus = _hive(state).bus
    if not bus.nc.is_connected:
        return Response(Readiness(status="unavailable", reason="not connected to NATS"), status_code=503)
    room: Room | None = state.room
    if room is None:  # an app made without its gateway: looked at now
        room = Room(bus)
        await room.read()
    if (reason := await room.why_not()) is not None:
        return Response(Readiness(status="unavailable", reason=reason), status_code=503)
    return Response(Readiness(status="ready"), status_code=200)


@get("/metrics", summary="Prometheus metrics, read from the bus", include_in_schema=False)
async def metrics_route(state: State) -> Response[bytes]:
    metrics: BusMetrics = state.metrics
    # The figures of this moment rather than of the last periodic read, unless the bus is slow to
    # answer: then the last ones, at once (a scrape that timed out would read as the gateway down).
    with anyio.move_on_after(SCRAPE_REFRESH_S):
        await metrics.refresh(max_age_s=SCRAPE_MAX_AGE_S)
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@get(
    "/v1/usage",
    summary="Tokens and cost of the tasks completed since the gateway started, by provider and model",
    responses=_errors(401),
)
async def usage_route(state: State) -> UsageSince:
    metrics: BusMetrics = state.metrics
    return metrics.usage()


class StreamState(msgspec.Struct, frozen=True, kw_only=True):
    """The tasks stream as nats-server reports it."""

    messages: int
    first_seq: int
    last_seq: int
    deleted: int  # sequences between first and last that hold no message (acked, or lost)
    lost: int  # messages the server reports lost (nats-server 2.15 leaves this 0 for a damaged block)


class AuditStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The store audit: tasks the record says are waiting that the tasks stream no longer holds."""

    every_s: float
    grace_s: float
    last: AuditReport | None  # None until the first audit has run
    tasks_stream: StreamState


@get(
    "/v1/audit",
    summary="The last store audit: tasks found missing from the tasks stream, dead-lettered as lost",
    responses=_errors(401, 503),
)
async def audit_route(state: State) -> AuditStatus:
    audit: StoreAudit = state.audit
    bus = _hive(state).bus
    try:
        info = await bus.js.stream_info(bus.names.tasks_stream)
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read the tasks stream: {exc}") from None
    s = info.state
    figures = StreamState(
        messages=s.messages,
        first_seq=s.first_seq,
        last_seq=s.last_seq,
        deleted=s.num_deleted or 0,
        lost=lost_count(s),
    )
    return AuditStatus(every_s=audit.every_s, grace_s=audit.grace_s, last=audit.last, tasks_stream=figures)


@get("/openapi.json", summary="This API's OpenAPI document", include_in_schema=False)
async def openapi_document(request: Request[Any, Any, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = request.app.openapi_schema.to_schema()
    return schema


def checked_provider(provider: str | None) -> str | None:
    """A provider query parameter, checked: it goes into a subject filter."""
    from litestar.exceptions import ValidationException

    if provider is not None and not is_valid_token(provider):
        message = "provider must be 1-64 letters, digits, '_' or '-'"
        raise ValidationException(
            detail=message, extra=[{"message": message, "key": "provider", "source": "query"}]
        )
    return provider


ROUTES = [
    submit_task,
    submit_batch,
    cancel_task,
    cancel_tasks,
    get_task,
    task_events,
    all_events,
    list_tasks,
    stats,
    list_workers,
    healthz,
    readyz,
    openapi_document,
]

# Served only by a gateway that follows the bus's events (its BusMetrics) and audits its store.
METRICS_ROUTES = [metrics_route, usage_route]
AUDIT_ROUTES = [audit_route]

__all__ = ["AUDIT_ROUTES", "MAX_WAIT_S", "METRICS_ROUTES", "ROUTES"]


def _seq(msg: Msg) -> int:
    """An event's place in the events stream: what a log line names instead of its content."""
    return msg.metadata.sequence.stream
