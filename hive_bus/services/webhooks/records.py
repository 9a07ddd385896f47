"""The webhook objects on the bus: the queue of deliveries to make, and the record of each delivery.

``<PREFIX>_WEBHOOKS`` (work queue) holds one :class:`Delivery` per event and receiver until it is
delivered or given up; its body is built once, so every attempt sends the same bytes under the same
``webhook-id``. ``<PREFIX>_WEBHOOK_LOG`` keeps each delivery's last :class:`DeliveryRecord` (one message
per subject, bounded by count and age, the oldest going first): what ``GET /v1/webhooks/deliveries``
lists, from whichever gateway made the attempt.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import anyio
import msgspec
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from hive_bus._bus import OBJECT_STORE_DUPLICATE_WINDOW_S, _ensure_stream
from hive_bus._nats import BUS_ERRORS, unsubscribe
from hive_bus.bus import Bus

from .config import WebhookSettings

log = logging.getLogger("hive_bus.webhooks")

DeliveryStatus = Literal["pending", "retrying", "delivered", "failed", "refused"]
# a record is a few hundred bytes; the log's byte limit leaves room for long URLs and errors
RECORD_MAX_BYTES = 2048


class Delivery(msgspec.Struct, frozen=True, kw_only=True, tag="webhook.delivery.v1", tag_field="type"):
    """One webhook to send: the same ``id`` and ``body`` on every attempt."""

    id: str
    url: str
    event: str
    task_id: str
    created_at_ms: int
    body: msgspec.Raw


class DeliveryRecord(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="webhook.record.v1", tag_field="type"
):
    """What became of one delivery so far. ``url`` is shown without its query or credentials."""

    id: str
    url: str
    event: str
    task_id: str
    status: DeliveryStatus
    attempts: int = 0
    created_at_ms: int
    updated_at_ms: int
    last_error: str | None = None
    last_status_code: int | None = None
    next_try_at_ms: int | None = None


delivery_decoder = msgspec.json.Decoder(Delivery)
record_decoder = msgspec.json.Decoder(DeliveryRecord)
encoder = msgspec.json.Encoder()


def queue_config(bus: Bus, webhooks: WebhookSettings) -> StreamConfig:
    names, settings = bus.names, bus.settings
    return StreamConfig(
        name=names.webhooks_stream,
        description="hive-bus webhook deliveries waiting to be made",
        subjects=[names.all_webhooks],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,  # full: the events wait in the events stream, none is dropped
        max_bytes=webhooks.queue_max_bytes,
        # a delivery queued again (its event redelivered before its ack) is recognised by its id
        duplicate_window=settings.duplicate_window_s,
        num_replicas=settings.replicas,
    )


def log_config(bus: Bus, webhooks: WebhookSettings) -> StreamConfig:
    names, settings = bus.names, bus.settings
    return StreamConfig(
        name=names.webhook_log_stream,
        description="hive-bus webhook deliveries: the last record of each",
        subjects=[names.all_webhook_logs],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_msgs_per_subject=1,
        max_msgs=webhooks.log_max_msgs,
        max_bytes=webhooks.log_max_msgs * RECORD_MAX_BYTES,
        max_age=webhooks.log_max_age_s,
        allow_direct=True,
        num_replicas=settings.replicas,
        # the server's own default, said out loud (never longer than the age, which the server
        # refuses): left unset, every gateway start after the first said the stream "keeps its own" 120 s
        duplicate_window=min(OBJECT_STORE_DUPLICATE_WINDOW_S, webhooks.log_max_age_s),
    )


async def declare(bus: Bus, webhooks: WebhookSettings) -> None:
    """Create the two streams if missing; check them if present."""
    await _ensure_stream(bus.js, queue_config(bus, webhooks))
    await _ensure_stream(bus.js, log_config(bus, webhooks))


async def write(bus: Bus, record: DeliveryRecord, *, only_if_new: bool = False) -> None:
    """Store ``record`` as its delivery's latest. ``only_if_new``: unless the delivery has one already
    (an attempt may have been recorded before its queueing is)."""
    names = bus.names
    headers = {"Nats-Expected-Last-Subject-Sequence": "0"} if only_if_new else None
    data = encoder.encode(record)
    try:
        await bus.js.publish(
            names.webhook_log_subject(record.id), data, stream=names.webhook_log_stream, headers=headers
        )
    except nats.js.errors.APIError as exc:
        if not (only_if_new and exc.err_code == 10071):  # 10071: a record is there already
            raise


async def recent(bus: Bus, *, timeout_s: float = 5.0) -> list[DeliveryRecord]:
    """Every record, the most recently updated first. Reads the whole log (bounded by
    ``log_max_msgs``: 10,000 records of a few hundred bytes by default), through a consumer deleted
    when the read ends (left to the server, each read's would stay a minute: sixty at a time for a
    client that lists the deliveries every second)."""
    names = bus.names
    stream = names.webhook_log_stream
    config = ConsumerConfig(
        filter_subject=names.all_webhook_logs,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        inactive_threshold=60.0,  # only if the deletion below does not reach the server
    )
    try:
        info = await bus.js.add_consumer(stream, config)
    except nats.js.errors.NotFoundError:
        return []  # no webhook was ever delivered on this bus
    found: list[DeliveryRecord] = []
    try:
        psub = await bus.js.pull_subscribe_bind(consumer=info.name, stream=stream)
        try:
            remaining = info.num_pending or 0
            while remaining > 0:
                msgs = await psub.fetch(min(remaining, 1000), timeout=timeout_s)
                for msg in msgs:
                    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                        found.append(record_decoder.decode(msg.data))
                remaining -= len(msgs)
        finally:
            await unsubscribe(psub)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(3), contextlib.suppress(*BUS_ERRORS):
            await bus.js.delete_consumer(stream, info.name)
    found.sort(key=lambda r: (r.updated_at_ms, r.id), reverse=True)
    return found
