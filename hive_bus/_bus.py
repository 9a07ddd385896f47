"""The connection to NATS and the bus objects: declared idempotently, checked, never silently reused.

Whichever process starts first (gateway, worker or client) declares the streams and the heartbeat
bucket; the others find them and check that what exists means the same thing. Limits (sizes, ages)
are the operator's to tune, so a difference there is logged, not fatal; a difference in meaning
(retention, storage, subjects, ack policy) is a :class:`BusConfigError` that names the object.

Why one module of about 800 lines: every stream, bucket and consumer of a bus is declared here, each
as a ``*_config`` function and an ``ensure_*`` one, beside the check that compares what exists with what
is wanted. Split, the one list a reader looks for (which objects a bus has, with which limits) would be
scattered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from ._credentials import closed_hint, connect_options, nats_client, refusal, server_urls
from ._errors import BusConfigError, BusRefused, BusUnavailable, NoRoom
from ._kv_read import kv_entries as kv_entries
from ._names import PRIORITIES, Names, is_valid_token
from ._nats import BUS_ERRORS, account_info, unsubscribe, why
from ._settings import Settings, redact_url

log = logging.getLogger("hive_bus.bus")

# Every bucket is bounded: a worker credential writes keys of its own provider (cooldowns, budgets) or
# name (heartbeats), and may make as many as it likes. A full bucket refuses new keys (discard new); a
# value over the size is refused. Real values are a few hundred bytes, and a bucket holds one per key
# (a provider key's cooldown, a budget per key and model, a heartbeat per worker).
BUCKET_MAX_BYTES = 8 * 1024**2
# what nats-server gives a stream that names no duplicate window (an Object Store's)
OBJECT_STORE_DUPLICATE_WINDOW_S = 120.0
HEARTBEATS_MAX_BYTES = 2 * 1024**2  # kept in memory
VALUE_MAX_BYTES = 64 * 1024


# how often a process that waits for its connection's loss also looks at the connection itself
LOST_CHECK_S = 0.5


class Link:
    """Whether the connection is gone for good: closed by the server or by nats-py (a protocol error
    such as ``maximum payload exceeded``: nats-py does not reconnect after one), not by this process.
    A long-running process watches :attr:`lost` and exits so that its supervisor starts it again, and
    the gateway's ``/healthz`` answers 503."""

    def __init__(self) -> None:
        self.closing = False  # this process is closing it: not a loss
        self.lost = asyncio.Event()
        self.reason = ""

    def closed(self, reason: str) -> None:
        if not self.closing and not self.lost.is_set():
            self.reason = reason
            self.lost.set()
            log.error("the NATS connection was closed for good: %s", reason)


class EventStreams:
    """The providers whose events stream this process has seen or made (:func:`ensure_events`), and an
    event set, then replaced, each time one is added: what wakes the readers of every provider's events
    (hive_bus._events) at once for a stream this process made."""

    def __init__(self) -> None:
        self.made: set[str] = set()
        self.added = anyio.Event()
        self.making = anyio.Lock()  # one declaration of a stream, however many submissions come at once

    def add(self, provider: str) -> None:
        self.made.add(provider)
        added, self.added = self.added, anyio.Event()
        added.set()


@dataclass(frozen=True, slots=True)
class Bus:
    """A live connection with the bus objects in place. Shared by the client, gateway and workers."""

    nc: NATS
    js: JetStreamContext
    settings: Settings
    workers_kv: KeyValue
    providers_kv: KeyValue
    budgets_kv: KeyValue
    cancels_kv: KeyValue
    link: Link = field(default_factory=Link)
    event_streams: EventStreams = field(default_factory=lambda: EventStreams(), init=False)
    # the providers whose claim check bucket this process has found or made (:func:`ensure_blobs`)
    blob_buckets: set[str] = field(default_factory=set, init=False)

    def is_lost(self) -> bool:
        """Whether the connection is gone for good: said by nats-py's closed callback, or seen here,
        since nats-py closes without calling it when it reads the server's ``-ERR`` while it is
        reconnecting (the server closed the socket first)."""
        if not self.link.lost.is_set() and self.nc.is_closed and not self.link.closing:
            self.link.closed(_reason(self.nc.last_error) if self.nc.last_error else "closed")
        return self.link.lost.is_set()

    async def wait_lost(self) -> None:
        """Return once the connection is gone for good, raising :class:`BusUnavailable` that says why:
        run it beside a long-running process's work so that the process ends (exit status 1)."""
        while not self.is_lost():
            with anyio.move_on_after(LOST_CHECK_S):
                await self.link.lost.wait()
        raise BusUnavailable(
            f"the NATS connection was closed for good ({self.link.reason}); exiting so that a "
            "supervisor (systemd, compose, a shell loop) starts this process again"
        )

    @property
    def names(self) -> Names:
        return self.settings.names


@asynccontextmanager
async def open_bus(settings: Settings, *, name: str = "hive") -> AsyncIterator[Bus]:
    """Connect to NATS, declare (or check) the bus objects, and close cleanly on the way out."""
    violations: list[str] = []
    link = Link()
    nc = await connect_nats(settings, name=name, violations=violations, link=link)
    try:
        js = nc.jetstream(timeout=settings.request_timeout_s, domain=settings.js_domain)
        try:
            buckets = await declare_bus(js, settings)
        except BusUnavailable as exc:
            if violations:  # the silence was the server refusing a request or a reply inbox
                raise BusRefused(f"{exc}; {_refused_because(violations[-1], settings)}") from None
            raise
        yield Bus(nc=nc, js=js, settings=settings, link=link, **buckets)
    finally:
        link.closing = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            # drain flushes pending acks and publishes before the socket closes; a connection that is
            # down has nothing to flush to, and nats-py refuses to drain it: it is closed instead
            if nc.is_connected:
                try:
                    await nc.drain()
                except nats.errors.Error as exc:
                    log.warning("could not drain the NATS connection (%s); closing it", exc)
            if not nc.is_closed:
                with contextlib.suppress(*BUS_ERRORS):  # it is gone either way
                    await nc.close()


async def connect_nats(
    settings: Settings, *, name: str, violations: list[str] | None = None, link: Link | None = None
) -> NATS:
    """Connect, or raise :class:`BusUnavailable` with one line that says why (secrets left out).

    The first connection must succeed within ``connect_timeout_s``; once connected, the client
    reconnects for as long as it takes. A refusal that another try cannot change (bad login, TLS
    failure) raises :class:`BusRefused` at once. Permission violations the server reports later are
    logged and appended to ``violations``.
    """
    where = redact_url(settings.nats_url)
    options = connect_options(settings)  # files are checked here, before any connection
    nc = nats_client(settings)
    last_error: list[str] = []
    refused: list[str] = []
    first_connect = anyio.CancelScope()
    connected = False

    def closing() -> bool:
        return nc.is_closed or nc.is_draining

    async def on_error(exc: Exception) -> None:
        if not nc.is_connected and not nc.is_reconnecting and not closing():
            # still trying to connect the first time: say it once, at the end
            if (why := refusal(exc)) is not None:
                refused.append(why)
                first_connect.cancel()
            last_error.append(_reason(exc))
        elif not closing():
            text = refusal(exc) or _reason(exc)
            if "permissions violation" in text.lower() and violations is not None:
                violations.append(text)
            log.warning("NATS connection to %s: %s", where, text)

    async def on_disconnect() -> None:
        if not closing():
            log.warning("disconnected from NATS at %s; reconnecting", where)

    async def on_reconnect() -> None:
        log.info("reconnected to NATS at %s", where)

    async def on_closed() -> None:
        if link is not None and connected:  # a first connection that failed is said by the raise below
            link.closed(_reason(nc.last_error) if nc.last_error else "closed")

    try:
        with anyio.fail_after(settings.connect_timeout_s), first_connect:
            await nc.connect(
                server_urls(settings),
                name=name,
                connect_timeout=max(1, min(2, int(settings.connect_timeout_s))),
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                closed_cb=on_closed,
                **options,
            )
    except BUS_ERRORS as exc:
        with anyio.CancelScope(shield=True):
            await nc.close()
        why = last_error[-1] if last_error else _reason(exc)
        raise BusUnavailable(f"cannot reach NATS at {where}: {why}{closed_hint(settings, why)}") from None
    if refused:
        with anyio.CancelScope(shield=True):
            await nc.close()
        raise BusRefused(f"NATS at {where}: {refused[-1]}")
    connected = True
    return nc


def _refused_because(violation: str, settings: Settings) -> str:
    hint = ""
    if "_inbox." in violation.lower():
        hint = (
            " (a worker credential only reads inboxes under its own name: set HIVE_WORKER_NAME, or "
            "--name, to the name it was made with)"
            if not settings.worker_name
            else " (is HIVE_WORKER_NAME the name this credential was made with?)"
        )
    return f"the server refused: {violation}{hint}"


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.replace("nats: ", "")


async def declare_bus(js: JetStreamContext, settings: Settings) -> dict[str, KeyValue]:
    """Create the streams and the KV buckets if missing; check them if present."""
    names = settings.names
    try:
        await ensure_tasks_stream(js, settings)
        if not settings.worker_name:  # a worker's credential may not; the gateway's does it
            await split_shared_dlq(js, settings)
        return {
            "workers_kv": await _ensure_workers_bucket(js, settings),
            "providers_kv": await _ensure_file_bucket(
                js, settings, names.providers_bucket, "provider key cooldowns"
            ),
            "budgets_kv": await _ensure_file_bucket(
                js, settings, names.budgets_bucket, "request and token budgets"
            ),
            "cancels_kv": await _ensure_cancels_bucket(js, settings),
        }
    except nats.js.errors.ServiceUnavailableError:
        raise BusUnavailable("JetStream is not enabled on the NATS server (start it with -js)") from None
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise BusUnavailable(
            f"JetStream did not answer while declaring {names.prefix} objects: {exc}"
        ) from None


def tasks_stream_config(settings: Settings, *, republish: bool = True) -> StreamConfig:
    """The tasks stream: each task message is the record of its acceptance (one stored write per
    submission). Limits retention, kept as long as the events (an ack no longer deletes: what is
    queued is what the providers' consumers have not acked); each task stored is republished by the
    server, headers only, as the task's ``queued`` event. ``republish`` False: while an upgrade puts
    back the tasks of a work-queue stream (they have their ``queued`` events already)."""
    names = settings.names
    source, destination = names.queued_republish
    return StreamConfig(
        name=names.tasks_stream,
        description="hive-bus tasks, one subject per provider, priority and task",
        subjects=[names.all_tasks],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        # A full stream refuses new work (a clear 503) rather than dropping accepted work. It holds the
        # tasks of the history's age too (queued or not): size max_msgs and max_bytes for both.
        discard=DiscardPolicy.NEW,
        max_age=settings.events_max_age_s,
        max_msgs=settings.tasks_max_msgs,
        max_bytes=settings.tasks_max_bytes,
        duplicate_window=settings.duplicate_window_s,
        allow_direct=True,
        republish=RePublish(src=source, dest=destination, headers_only=True) if republish else None,
        num_replicas=settings.replicas,
    )


def events_stream_config(settings: Settings, provider: str) -> StreamConfig:
    """One provider's events stream: what happens to its tasks after they are queued (their ``queued``
    markers, which the tasks stream republishes, included). One per provider, each within its own
    ``events_max_bytes``: the provider's workers may publish any event under their provider, and can
    push out their own provider's oldest history, no other's."""
    names = settings.names
    return StreamConfig(
        name=names.events_stream_of(provider),
        description=f"hive-bus task lifecycle events of provider {provider}",
        subjects=[names.events_under(provider)],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=settings.events_max_age_s,
        max_bytes=settings.events_max_bytes,
        duplicate_window=settings.duplicate_window_s,
        allow_direct=True,
        num_replicas=settings.replicas,
    )


def shared_events_stream_config(settings: Settings) -> StreamConfig:
    """The one events stream of every provider, as buses made before events were kept per provider
    had it: what the upgrade looks for (hive_bus._upgrade)."""
    names = settings.names
    return dataclasses.replace(
        events_stream_config(settings, "any"),
        name=names.events_stream,
        description="hive-bus task lifecycle events",
        subjects=[names.all_events],
    )


async def ensure_events_stream(js: JetStreamContext, settings: Settings, provider: str) -> None:
    """The provider's events stream, created on first use, else checked."""
    await _ensure_stream(js, events_stream_config(settings, provider))


async def ensure_events(bus: Bus, provider: str) -> None:
    """:func:`ensure_events_stream`, once per provider and process: before the first task of a
    provider is stored (the tasks stream republishes its ``queued`` marker into it, over core NATS: a
    marker with no stream to take it is lost) and before any event of the provider is written.
    Raises :class:`BusUnavailable` or :class:`BusConfigError` when it can be neither found nor made."""
    if provider in bus.event_streams.made:
        return
    async with bus.event_streams.making:
        if provider in bus.event_streams.made:
            return
        try:
            await ensure_events_stream(bus.js, bus.settings, provider)
        except BUS_ERRORS as exc:
            raise BusUnavailable(
                f"the events stream of provider {provider} is not there: {why(exc)}"
            ) from None
        bus.event_streams.add(provider)


async def stream_names(bus: Bus, subject: str) -> list[str]:
    """The names of the streams whose subjects overlap ``subject``, every page of them, sorted."""
    domain = bus.settings.js_domain
    api = f"$JS.{domain}.API" if domain else "$JS.API"
    found: list[str] = []
    while True:
        request = json.dumps({"subject": subject, "offset": len(found)}).encode()
        msg = await bus.nc.request(f"{api}.STREAM.NAMES", request, timeout=bus.settings.request_timeout_s)
        answer = json.loads(msg.data)
        if "error" in answer:
            raise BusUnavailable(
                f"could not list the streams of {subject}: {answer['error'].get('description')}"
            )
        page = answer.get("streams") or []
        found += page
        if not page or len(found) >= int(answer.get("total", 0)):
            return sorted(found)


async def event_providers(bus: Bus) -> list[str]:
    """The providers that have an events stream, sorted."""
    names = bus.names
    found = [names.provider_of_events_stream(s) for s in await stream_names(bus, names.all_events)]
    return sorted(p for p in found if p is not None)


# how long a gateway may hold a final event while it queues that event's webhook deliveries
WEBHOOK_EVENT_ACK_WAIT_S = 30.0


def webhooks_consumer_config(settings: Settings, provider: str, *, start_seq: int | None) -> ConsumerConfig:
    """The webhooks' durable consumer of ``provider``'s final events: from ``start_seq`` in its stream,
    or (None) from the moment it is made; the durable keeps its place after that."""
    names = settings.names
    return ConsumerConfig(
        durable_name=names.webhook_events_consumer,
        description=f"hive-bus webhooks: final events of {provider} whose deliveries are to be queued",
        filter_subjects=names.final_events(provider),
        deliver_policy=DeliverPolicy.NEW if start_seq is None else DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=WEBHOOK_EVENT_ACK_WAIT_S,
        max_deliver=-1,
    )


def dlq_stream_config(settings: Settings, provider: str) -> StreamConfig:
    names = settings.names
    return StreamConfig(
        name=names.dlq_stream(provider),
        description=f"hive-bus dead letters of provider {provider}: tasks that failed for good",
        subjects=[names.dlq_subject(provider, "*")],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        # Kept until replayed or purged. When full, a new dead letter is refused (the worker logs it);
        # its failed event, which carries the task too, stays in the events stream. One stream per
        # provider: a provider's workers (or a credential of theirs) can fill their own, no other.
        discard=DiscardPolicy.NEW,
        max_bytes=settings.dlq_max_bytes,
        duplicate_window=settings.duplicate_window_s,
        allow_direct=True,
        num_replicas=settings.replicas,
    )


async def ensure_dlq_stream(js: JetStreamContext, settings: Settings, provider: str) -> None:
    """The provider's dead-letter stream, created on first use (with its consumers), else checked."""
    await _ensure_stream(js, dlq_stream_config(settings, provider))


async def split_shared_dlq(js: JetStreamContext, settings: Settings) -> None:
    """Move the dead letters of a bus made before they were kept per provider (one ``<PREFIX>_DLQ`` on
    ``<prefix>.dlq.>``) into each provider's stream, then delete the shared one. The shared stream is
    first given a subject nobody publishes on (its messages keep theirs), so the providers' streams can
    take ``<prefix>.dlq.<provider>.*``; a split cut short goes on at the next start (each letter keeps
    its de-duplication id). Nothing happens when no such stream exists."""
    names = settings.names
    try:
        info = await js.stream_info(names.shared_dlq_stream)
    except nats.js.errors.NotFoundError:
        return
    try:
        if info.config.subjects != [names.shared_dlq_parked]:
            info.config.subjects = [names.shared_dlq_parked]
            await js.update_stream(info.config)
        moved, left = await _move_dead_letters(js, settings, names.shared_dlq_stream)
        if left:  # kept for the operator: never deleted with a letter in it
            log.warning(
                "stream %s keeps %d dead letters on subjects that name no provider; inspect them with "
                "`nats stream view %s`, then remove it",
                names.shared_dlq_stream, left, names.shared_dlq_stream,
            )  # fmt: skip
        else:
            await js.delete_stream(names.shared_dlq_stream)
    except nats.js.errors.NotFoundError:
        return  # another process (a second gateway, a client) split it meanwhile
    except nats.js.errors.APIError as exc:
        raise BusConfigError(
            f"stream {names.shared_dlq_stream} (every provider's dead letters, as buses before this "
            f"version kept them) could not be split into one stream per provider: {exc.description}. "
            f"List its dead letters with `nats stream view {names.shared_dlq_stream}`, then remove it "
            f"(`nats stream rm {names.shared_dlq_stream}`) or free the room the new streams need"
        ) from None
    if moved:
        log.info("moved %d dead letters from %s into one stream per provider", moved, names.shared_dlq_stream)


async def drain_parked(
    js: JetStreamContext, settings: Settings, stream: str, move: Callable[[Msg], Awaitable[bool]]
) -> tuple[int, int]:
    """Hand each message of a parked ``stream`` (given a subject nobody publishes on, its messages
    keeping theirs) to ``move``, in order, and delete each one it moved, so that a drain cut short goes
    on where it stopped: how many were moved, and how many ``move`` left where they are (False)."""
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, mem_storage=True, inactive_threshold=30.0)
    info = await js.add_consumer(stream, config)  # no filter: the stored subjects are not the stream's now
    psub = await js.pull_subscribe_bind(info.name, stream=stream)
    moved = left_behind = 0
    try:
        left = info.num_pending or 0
        while left > 0:
            for msg in await psub.fetch(min(left, 256), timeout=settings.request_timeout_s):
                left -= 1
                if not await move(msg):
                    left_behind += 1
                    continue
                with contextlib.suppress(nats.js.errors.APIError):  # another process moved it as well
                    await js.delete_msg(stream, msg.metadata.sequence.stream)  # moved: not moved again
                moved += 1
    finally:
        await unsubscribe(psub)
        with contextlib.suppress(*BUS_ERRORS):
            await js.delete_consumer(stream, info.name)
    return moved, left_behind


async def _move_dead_letters(js: JetStreamContext, settings: Settings, stream: str) -> tuple[int, int]:
    """Each dead letter of ``stream`` published again to its provider's stream: how many were, and how
    many name no provider (left where they are)."""
    names = settings.names
    ensured: set[str] = set()

    async def move(msg: Msg) -> bool:
        tokens = msg.subject.split(".")
        provider = tokens[2] if len(tokens) == 4 and tokens[1] == "dlq" else ""
        if not is_valid_token(provider):
            return False  # said once, with the count, by the caller
        if provider not in ensured:
            await ensure_dlq_stream(js, settings, provider)
            ensured.add(provider)
        msg_id = (msg.headers or {}).get("Nats-Msg-Id") or f"split:{msg.metadata.sequence.stream}"
        await js.publish(
            msg.subject, msg.data, headers={"Nats-Msg-Id": msg_id}, stream=names.dlq_stream(provider)
        )
        return True

    return await drain_parked(js, settings, stream, move)


def blobs_stream_config(settings: Settings, provider: str | None) -> StreamConfig:
    """One provider's claim check bucket (hive_bus._blobs), an Object Store bucket declared as nats-py's
    ``create_object_store`` would (``nats object`` tools see it as a bucket), within its own
    ``blobs_max_bytes``: the provider's workers may write any chunk under their provider, and can fill
    their own provider's bucket, no other's. ``provider`` None: the one bucket of every provider, as
    buses before kept it (still read, never written)."""
    names = settings.names
    bucket = names.blobs_bucket if provider is None else names.blobs_bucket_of(provider)
    return StreamConfig(
        name=f"OBJ_{bucket}",
        description="hive-bus claim check: task contents and outputs too large for a message"
        + ("" if provider is None else f", of provider {provider}"),
        subjects=[names.blob_chunks(bucket, ">"), names.blob_meta(bucket, ">")],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        # full: a new large task is refused (503), never an accepted one's content dropped
        discard=DiscardPolicy.NEW,
        # an object lives as long as the events that refer to it
        max_age=settings.events_max_age_s,
        max_bytes=settings.blobs_max_bytes,
        allow_rollup_hdrs=True,
        allow_direct=True,
        num_replicas=settings.replicas,
        # the server's own default, said out loud: left unset, every process found the stream "keeping
        # its own" 120 s and said so on each start; never longer than the age (the server refuses that)
        duplicate_window=min(OBJECT_STORE_DUPLICATE_WINDOW_S, settings.events_max_age_s),
    )


async def ensure_blobs(bus: Bus, provider: str) -> str:
    """The name of ``provider``'s claim check bucket, found or made once per process (a worker's
    credential finds it made by the gateway, with the provider's consumers). Raises
    :class:`BusUnavailable` when it can be neither."""
    names = bus.names
    if provider not in bus.blob_buckets:
        try:
            await _ensure_stream(bus.js, blobs_stream_config(bus.settings, provider))
        except (*BUS_ERRORS, BusConfigError) as exc:
            raise BusUnavailable(
                f"the claim check bucket of provider {provider} is not there: {why(exc)}"
            ) from None
        bus.blob_buckets.add(provider)
    return names.blobs_bucket_of(provider)


async def retire_shared_blobs(js: JetStreamContext, settings: Settings) -> None:
    """Delete the one claim check bucket of every provider (buses before one bucket a provider) once
    nothing is left in it: its objects age out with the events that name them (``events_max_age_s``),
    and until then they are read there. It holds its ``blobs_max_bytes`` of the account's storage.
    A gateway's start alone does it, not any process's: an older gateway still running stores its
    large tasks there, and one whose bucket a client or a worker deleted refused each until restarted."""
    stream = settings.names.blobs_stream
    try:
        info = await js.stream_info(stream)
        if info.state.messages == 0:
            await js.delete_stream(stream)
            log.info("deleted stream %s: every provider has a claim check bucket of its own now", stream)
    except nats.js.errors.NotFoundError:
        return
    except BUS_ERRORS as exc:
        log.debug("stream %s not looked at (%s)", stream, exc)


def counters_stream_config(settings: Settings) -> StreamConfig:
    names = settings.names
    return StreamConfig(
        name=names.counters_stream,
        description="hive-bus counters: tasks accepted per provider",
        subjects=[names.all_counters],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        # A counter's value is in its last message; the ones before it are history nobody reads.
        max_msgs_per_subject=1,
        # an increment retried after a lost ack is recognised by its Nats-Msg-Id within this window
        duplicate_window=settings.duplicate_window_s,
        allow_msg_counter=True,
        allow_direct=True,
        num_replicas=settings.replicas,
    )


def index_stream_config(settings: Settings) -> StreamConfig:
    """The metadata index (hive_bus._index): empty messages whose subjects say which task carries which
    metadata key and value, bounded like the events they point to (by age) and by bytes."""
    names = settings.names
    return StreamConfig(
        name=names.index_stream,
        description="hive-bus metadata index: the tasks of each metadata key and value",
        subjects=[names.all_index],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=settings.events_max_age_s,
        max_bytes=settings.index_max_bytes,
        # an entry is nothing but its subject and a few headers; one per task and key (a task queued
        # again past the duplicate window, a batch line resumed, replaces its entry rather than adding one)
        max_msg_size=1024,
        max_msgs_per_subject=1,
        duplicate_window=settings.duplicate_window_s,
        allow_direct=True,
        num_replicas=settings.replicas,
    )


async def ensure_index_stream(js: JetStreamContext, settings: Settings) -> None:
    """Create the metadata index if missing, or check it. Not part of :func:`declare_bus`: only the
    processes that submit tagged tasks, or read the index, use it (a worker's credential may not)."""
    try:
        await _ensure_stream(js, index_stream_config(settings))
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise BusUnavailable(
            f"JetStream did not answer while declaring {settings.names.index_stream}: {exc}"
        ) from None


# The response cache (hive_bus._cache): each answer expires by its own TTL; a full bucket drops its
# oldest answers (a cache, unlike the queue, may forget). No answer outlives the longest TTL a task takes.
CACHE_MAX_BYTES = 64 * 1024**2
CACHE_MAX_AGE_S = 30 * 86400.0


def cache_stream_config(settings: Settings) -> StreamConfig:
    """The response cache, a KV bucket whose keys carry their own TTL (``Nats-TTL``, nats-server 2.11+):
    declared as a stream, as nats-py's ``KeyValueConfig`` has no per-message TTL switch."""
    names = settings.names
    return StreamConfig(
        name=names.cache_stream,
        description="hive-bus response cache: answers of tasks that opted in, each with its own TTL",
        subjects=[f"$KV.{names.cache_bucket}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_msgs_per_subject=1,
        max_age=CACHE_MAX_AGE_S,
        max_bytes=CACHE_MAX_BYTES,
        max_msg_size=VALUE_MAX_BYTES,
        allow_msg_ttl=True,
        allow_direct=True,
        allow_rollup_hdrs=True,
        deny_delete=True,
        num_replicas=settings.replicas,
        # the server's own default, said out loud, as for the claim check's stream
        duplicate_window=OBJECT_STORE_DUPLICATE_WINDOW_S,
    )


async def ensure_cache_stream(js: JetStreamContext, settings: Settings) -> None:
    """Create the response cache's bucket if missing, or check it. Not part of :func:`declare_bus`:
    only tasks that opt in use it (the gateway declares it at start, a worker on first use)."""
    try:
        await _ensure_stream(js, cache_stream_config(settings))
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise BusUnavailable(
            f"JetStream did not answer while declaring {settings.names.cache_stream}: {exc}"
        ) from None


async def ensure_counters_stream(js: JetStreamContext, settings: Settings) -> None:
    """Create the counters stream if missing, or check it. Not part of :func:`declare_bus`: only the
    processes that submit tasks or count them use it, and a worker's credential may not look at it."""
    try:
        await _ensure_stream(js, counters_stream_config(settings))
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise BusUnavailable(
            f"JetStream did not answer while declaring {settings.names.counters_stream}: {exc}"
        ) from None


async def ensure_tasks_stream(js: JetStreamContext, settings: Settings) -> None:
    """The tasks stream, made or checked; a work-queue one (buses before one write per submission) is
    upgraded, and one events stream of every provider split, by any process but a worker
    (:mod:`hive_bus._upgrade`)."""
    from ._upgrade import split_shared_events, upgrade_tasks_stream  # it builds on this module

    await upgrade_tasks_stream(js, settings)
    await _ensure_stream(js, tasks_stream_config(settings))
    # after the tasks stream, which any credential may look at: a worker's refused request says why
    await split_shared_events(js, settings)


def consumer_config(settings: Settings, provider: str, priority: str = "normal") -> ConsumerConfig:
    names = settings.names
    return ConsumerConfig(
        durable_name=names.consumer(provider, priority),
        description=f"hive-bus workers of provider {provider}, {priority} priority",
        filter_subject=names.task_filter(provider, priority),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        # Attempts are counted by the worker runtime against each task's own max_attempts, so that
        # waiting out a rate limit does not use up the attempts a task has for real failures.
        max_deliver=-1,
        max_ack_pending=settings.max_ack_pending,
    )


async def _ensure_stream(js: JetStreamContext, want: StreamConfig) -> None:
    assert want.name is not None
    try:
        info = await js.stream_info(want.name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(want)
            log.info("created stream %s", want.name)
            return
        except nats.js.errors.APIError as exc:
            if exc.err_code in (NO_STORAGE_LEFT, NO_STREAMS_LEFT):
                raise await _no_room(js, want, exc) from None
            if not isinstance(exc, nats.js.errors.BadRequestError):
                raise BusConfigError(f"cannot create stream {want.name}: {exc.description}") from None
            try:
                info = await js.stream_info(want.name)  # another process won the race
            except nats.js.errors.NotFoundError:  # refused, not raced: say why
                raise BusConfigError(f"cannot create stream {want.name}: {exc.description}") from None
    have = info.config
    _check(
        f"stream {want.name}",
        meaning={
            "retention": (have.retention, want.retention),
            "storage": (have.storage, want.storage),
            "discard": (have.discard, want.discard),
            "subjects": (sorted(have.subjects or []), sorted(want.subjects or [])),
            "allow_direct": (bool(have.allow_direct), bool(want.allow_direct)),
            "allow_msg_counter": (bool(have.allow_msg_counter), bool(want.allow_msg_counter)),
            "republish": (have.republish, want.republish),
        },
        limits={
            "max_msgs": (have.max_msgs, want.max_msgs),
            "max_bytes": (have.max_bytes, want.max_bytes),
            "max_age": (have.max_age, want.max_age),
            "max_msgs_per_subject": (have.max_msgs_per_subject, want.max_msgs_per_subject),
            "duplicate_window": (have.duplicate_window, want.duplicate_window),
            "num_replicas": (have.num_replicas, want.num_replicas),
        },
    )


# JetStream's answers to a stream it has no room for: every byte of file storage the account (or the
# server) may use is reserved by its streams' max_bytes; the account has max_streams streams.
NO_STORAGE_LEFT = 10047
NO_STREAMS_LEFT = 10027


async def _no_room(js: JetStreamContext, want: StreamConfig, refused: nats.js.errors.APIError) -> NoRoom:
    """What to say of a stream JetStream has no room for: its reason and figures, and what to raise."""
    name = f"{want.name}: {refused.description}"
    try:
        account = await account_info(js)
    except BUS_ERRORS as exc:
        account = {}
        log.debug("could not read the account's JetStream figures: %s", why(exc))
    limits = account.get("limits") or {}
    if refused.err_code == NO_STREAMS_LEFT:
        return NoRoom(
            f"no room for stream {name} (the account has {account.get('streams', '?')} streams, its "
            f"max_streams {limits.get('max_streams', '?')}); each provider has three (its events, its dead "
            "letters, its claim check bucket). Raise max_streams of the account (jetstream block of HIVE in "
            "nats/accounts.conf, then reload nats-server), or remove the streams of providers no longer used",
            code="streams_limit",
        )
    reserved, most = account.get("reserved_storage"), limits.get("max_storage", -1)
    by_account = (
        isinstance(reserved, int) and isinstance(most, int) and 0 < most < reserved + (want.max_bytes or 0)
    )
    if by_account:
        whose, figures = "the account's", f" ({size_text(reserved)} of its {size_text(most)})"
        where = (
            "max_file of the account (its jetstream block in nats/accounts.conf) and max_file_store of the "
            "server with it when no larger (nats/hub.conf: a reload refuses an account's max_file above it, "
            "saying so only in the server's log), then reload nats-server"
        )
    else:  # within the account's limit: the server's own is the one reached
        whose, figures = "the server's", ""
        where = (
            "max_file_store of the server (the jetstream block of its config; without one, nats-server "
            "takes 75% of the disk's free space when it starts)"
        )
    return NoRoom(
        f"no room for stream {name} (max_bytes {size_text(want.max_bytes)}); {whose} JetStream file storage "
        f"is all reserved by the max_bytes of the streams it holds{figures}; each provider reserves its "
        "events, its dead letters and its claim check bucket (HIVE_EVENTS_MAX_BYTES + HIVE_DLQ_MAX_BYTES + "
        f"HIVE_BLOBS_MAX_BYTES). Raise {where}, lower those three for new providers, or remove the streams "
        "of providers no longer used",
        code="storage_reserved",
    )


def size_text(n: int | None) -> str:
    """Bytes as a person reads them: ``512 MiB``, ``8.0 GiB``."""
    if n is None or n < 0:
        return "no limit"
    if n >= 1024**3:
        return f"{n / 1024**3:.1f} GiB"
    return f"{n / 1024**2:.0f} MiB"


async def ensure_consumers(js: JetStreamContext, settings: Settings, provider: str) -> list[ConsumerInfo]:
    """The provider's durable pull consumers, one per priority (high first), its events stream, its
    dead-letter stream and its claim check bucket, created on first use (by the gateway: a worker's credential finds them made)."""
    await ensure_events_stream(js, settings, provider)  # before its tasks are fetched: their events go there
    consumers = [await ensure_consumer(js, settings, provider, priority) for priority in PRIORITIES]
    try:
        await ensure_dlq_stream(js, settings, provider)
    except (*BUS_ERRORS, BusConfigError, NoRoom) as exc:
        # its dead letters are then refused (and logged); each failed event still holds its task
        log.warning("the dead-letter stream of provider %s is not there: %s", provider, exc)
    try:
        await _ensure_stream(js, blobs_stream_config(settings, provider))
    except (*BUS_ERRORS, BusConfigError, NoRoom) as exc:
        # its workers' large outputs are then refused (logged, the task redelivered) until it is made
        log.warning("the claim check bucket of provider %s is not there: %s", provider, exc)
    return consumers


async def ensure_consumer(
    js: JetStreamContext, settings: Settings, provider: str, priority: str = "normal"
) -> ConsumerInfo:
    """One of the provider's durable pull consumers, created on first use and shared by all its workers."""
    want = consumer_config(settings, provider, priority)
    stream = settings.names.tasks_stream
    assert want.durable_name is not None
    try:
        info: ConsumerInfo = await js.consumer_info(stream, want.durable_name)
    except nats.js.errors.NotFoundError:
        created: ConsumerInfo = await js.add_consumer(stream, want)
        log.info("created consumer %s on %s", want.durable_name, stream)
        return created
    have = info.config
    _check(
        f"consumer {want.durable_name} on stream {stream}",
        meaning={
            "filter_subject": (have.filter_subject, want.filter_subject),
            "ack_policy": (have.ack_policy, want.ack_policy),
            "deliver_policy": (have.deliver_policy, want.deliver_policy),
            "push delivery": (have.deliver_subject, None),
            "max_deliver": (have.max_deliver, want.max_deliver),
        },
        limits={
            "ack_wait": (have.ack_wait, want.ack_wait),
            "max_ack_pending": (have.max_ack_pending, want.max_ack_pending),
        },
    )
    return info


async def redeclare_workers_bucket(bus: Bus) -> None:
    """Declare the heartbeat bucket again: it is kept in memory, so a restart of nats-server loses it,
    and the processes that lived through the restart must bring it back (any of them may)."""
    try:
        await _ensure_workers_bucket(bus.js, bus.settings)
    except (*BUS_ERRORS, BusConfigError) as exc:
        log.debug("the heartbeat bucket could not be declared again: %s", exc)


async def _ensure_workers_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    # Heartbeats are rewritten every few seconds and worthless after a restart: memory storage spares
    # a Raspberry Pi's SD card. max_age makes each key vanish once its worker stops beating.
    want = KeyValueConfig(
        bucket=settings.names.workers_bucket,
        description="hive-bus worker heartbeats",
        history=1,
        ttl=settings.heartbeat_ttl_s,
        storage=StorageType.MEMORY,
        replicas=settings.replicas,
        direct=True,
        max_bytes=HEARTBEATS_MAX_BYTES,
        max_value_size=VALUE_MAX_BYTES,
    )
    kv, have_ttl = await _ensure_bucket(js, want, settings.js_domain)
    if have_ttl and have_ttl < 2 * settings.heartbeat_interval_s:
        raise BusConfigError(
            f"key-value bucket {want.bucket} keeps heartbeats for {have_ttl}s, less than two heartbeat "
            f"intervals ({settings.heartbeat_interval_s}s): live workers would vanish from it"
        )
    return kv


async def _ensure_cancels_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The cancels bucket: a word for each task cancelled, expired or replayed, kept as long as task
    history (a cancelled task may wait that long in its queue). Only the hub writes it (no worker
    credential may), so when full it lets its oldest words go rather than refuse new ones: a bucket
    that refused them answered every cancel with a 503, and failed every expiry and replay, once a
    week's words had filled it. A bucket made before is given that policy and room (before it is
    checked, which would log the size it had as one it keeps)."""
    names = settings.names
    made_before = await _give_cancels_room(js, settings)
    kv = await _ensure_file_bucket(
        js, settings, names.cancels_bucket, "cancelled tasks",
        ttl_s=settings.events_max_age_s, max_bytes=settings.cancels_max_bytes,
    )  # fmt: skip
    if not made_before:  # made now, by nats-py, which makes a bucket discard-new
        await _give_cancels_room(js, settings)
    return kv


async def _give_cancels_room(js: JetStreamContext, settings: Settings) -> bool:
    """Give the cancels bucket discard-old, and its room if it has the size it was made with before.
    Whether it was there."""
    bucket = settings.names.cancels_bucket
    try:
        config = (await js.stream_info(f"KV_{bucket}")).config
        roomier = dataclasses.replace(config, discard=DiscardPolicy.OLD)
        if config.max_bytes == BUCKET_MAX_BYTES:  # the size it was made with before
            roomier.max_bytes = settings.cancels_max_bytes
        if roomier != config:
            await js.update_stream(roomier)
            log.info("bucket %s now lets its oldest words go, in %s", bucket, size_text(roomier.max_bytes))
    except nats.js.errors.NotFoundError:
        return False
    except BUS_ERRORS as exc:  # a credential that may not change it (a worker's) leaves it to the gateway
        log.debug("bucket %s not changed by this process (%s)", bucket, exc)
    return True


async def _ensure_file_bucket(
    js: JetStreamContext,
    settings: Settings,
    bucket: str,
    what: str,
    *,
    ttl_s: float | None = None,
    max_bytes: int = BUCKET_MAX_BYTES,
) -> KeyValue:
    # File storage: a daily quota's cooldown or budget must outlive a restart of the hub.
    want = KeyValueConfig(
        bucket=bucket,
        description=f"hive-bus {what}",
        history=1,
        ttl=ttl_s,
        storage=StorageType.FILE,
        replicas=settings.replicas,
        # reads by key go to $JS.API.DIRECT.GET.<stream>.<key subject>, which a worker's permissions
        # can narrow to its own provider's keys (a plain message get names no subject to check)
        direct=True,
        max_bytes=max_bytes,
        max_value_size=VALUE_MAX_BYTES,
    )
    kv, _ = await _ensure_bucket(js, want, settings.js_domain)
    return kv


async def _ensure_bucket(
    js: JetStreamContext, want: KeyValueConfig, domain: str | None
) -> tuple[KeyValue, float | None]:
    """The bucket, created if missing, else checked; with the TTL it really has."""
    try:
        kv = await js.key_value(want.bucket)
    except nats.js.errors.BucketNotFoundError:
        return _writes_through(await js.create_key_value(want), want, js, domain), want.ttl
    config = (await kv.status()).stream_info.config
    _check(
        f"key-value bucket {want.bucket}",
        meaning={"history": (config.max_msgs_per_subject, want.history)},
        limits={
            "ttl": (config.max_age, want.ttl),
            "replicas": (config.num_replicas, want.replicas),
            "allow_direct": (bool(config.allow_direct), want.direct),
            "max_bytes": (config.max_bytes, want.max_bytes),
            "max_value_size": (config.max_msg_size, want.max_value_size),
        },
    )
    await _bound(js, config, want)
    return _writes_through(kv, want, js, domain), config.max_age


async def _bound(js: JetStreamContext, config: StreamConfig, want: KeyValueConfig) -> None:
    """Give a bucket made before buckets were bounded (no byte or value limit) the limits it would be
    made with now. A limit the operator set is theirs; a credential that may not change the bucket (a
    worker's) leaves it to the gateway."""
    bounded = dataclasses.replace(config)
    if want.max_bytes and (config.max_bytes or -1) < 0:
        bounded.max_bytes = want.max_bytes
    if want.max_value_size and (config.max_msg_size or -1) < 0:
        bounded.max_msg_size = want.max_value_size
    if bounded == config:
        return
    try:
        await js.update_stream(bounded)
        log.info(
            "bucket %s is bounded now (%s bytes, values of %s)",
            want.bucket,
            want.max_bytes,
            want.max_value_size,
        )
    except BUS_ERRORS as exc:
        log.debug("bucket %s not bounded by this process (%s)", want.bucket, exc)


class _DomainWrites:
    """What a bucket publishes through from behind a leaf node: a leaf link passes no ``$KV.>`` (nor
    ``$JS.API.>``) of an ordinary account, but the hub maps ``$JS.<domain>.API.$KV.>`` back to
    ``$KV.>``. nats-py's KeyValue publishes its writes to ``$KV.<bucket>.<key>`` whatever the domain, so
    its context is this one: writes go by the domain, and everything else (direct gets, watches, which
    the domain's API prefix already carries) to the context itself."""

    def __init__(self, js: JetStreamContext, domain: str) -> None:
        self._js = js
        # not ``_prefix``: that is the context's own API prefix, which a bucket's direct gets read through
        self._writes_to = f"$JS.{domain}.API."

    async def publish(self, subject: str, *args: Any, **kwargs: Any) -> Any:
        if subject.startswith("$KV."):
            subject = self._writes_to + subject
        return await self._js.publish(subject, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)


def _writes_through(kv: KeyValue, want: KeyValueConfig, js: JetStreamContext, domain: str | None) -> KeyValue:
    """The bucket's handle; with a JetStream domain (a client behind a leaf node), one whose writes
    reach the hub."""
    if domain is None:
        return kv
    context = cast(JetStreamContext, _DomainWrites(js, domain))
    return KeyValue(
        name=want.bucket,
        stream=f"KV_{want.bucket}",
        pre=f"$KV.{want.bucket}.",
        js=context,
        direct=bool(want.direct),
    )


def _check(
    what: str, *, meaning: Mapping[str, tuple[Any, Any]], limits: Mapping[str, tuple[Any, Any]]
) -> None:
    wrong = [f"{k} is {have!r}, expected {want!r}" for k, (have, want) in meaning.items() if have != want]
    if wrong:
        raise BusConfigError(
            f"{what} exists with an incompatible configuration ({'; '.join(wrong)}). "
            "Remove it, or use another bus prefix (--prefix / HIVE_PREFIX)."
        )
    for k, (have, want) in limits.items():
        if want is not None and have != want and not _close(have, want):
            log.info("%s keeps its own %s=%r (this process would have set %r)", what, k, have, want)


def _close(a: Any, b: Any) -> bool:
    return isinstance(a, int | float) and isinstance(b, int | float) and abs(a - b) < 1e-6


async def consumer_infos(bus: Bus, stream: str) -> list[ConsumerInfo]:
    """Every consumer of ``stream``: the server lists them 256 at a time, and nats-py's
    ``consumers_info`` returns one page."""
    found: list[ConsumerInfo] = []
    while True:
        page = await bus.js.consumers_info(stream, offset=len(found) or None)
        found.extend(page)
        if len(page) < 256:
            return found
