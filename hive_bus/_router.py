"""The router: queues moved tasks on their new provider, and makes consumers for workers that may not.

A worker that moves a task to its next fallback only records a ``moved`` event (workers have no right to
publish tasks; see ``nats/``). The router, which runs in the gateway (and so in ``hive up``), follows those
events through a durable consumer: it publishes each moved task on its new provider's subject (with a
de-duplication id, so a redelivered event queues it once), then acks the event. If the gateway is down,
moved tasks wait in the events stream until it is back; nothing is lost.

It also creates the consumers of any provider whose workers heartbeat, so that workers whose credentials
do not allow creating consumers can bind to them.
"""

from __future__ import annotations

import logging

import anyio
import msgspec
import nats.aio.msg
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ._bus import Bus, ensure_consumers, kv_entries
from ._errors import HiveError
from ._messages import Moved, beat_decoder, encoder, event_decoder
from ._nats import BUS_ERRORS

log = logging.getLogger("hive_bus.router")

FETCH_WAIT_S = 2.0
CONSUMERS_EVERY_S = 5.0


class Router:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._served: set[str] = set()  # providers whose consumers exist

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        bus, names = self._bus, self._bus.names
        config = ConsumerConfig(
            durable_name=names.router,
            description="hive-bus router: queues moved tasks on their new provider",
            filter_subject=names.moved_events,
            deliver_policy=DeliverPolicy.NEW,  # where a new bus starts; the durable keeps its place
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
        )
        sub = await bus.js.pull_subscribe(
            names.moved_events, durable=names.router, stream=names.events_stream, config=config
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_consumers)
            task_status.started()
            try:
                while True:
                    try:
                        msgs = await sub.fetch(batch=64, timeout=FETCH_WAIT_S)
                    except TimeoutError:
                        continue
                    except BUS_ERRORS as exc:
                        log.warning("router: fetching moved tasks failed (%s); trying again", exc)
                        await anyio.sleep(1)
                        continue
                    for msg in msgs:
                        await self._queue(msg)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                    await sub.unsubscribe()

    async def _queue(self, msg: nats.aio.msg.Msg) -> None:
        try:
            event = event_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("router: a moved event does not decode (%s); dropped", exc)
            await msg.term()
            return
        if not isinstance(event, Moved):
            await msg.term()
            return
        task, names = event.task, self._bus.names
        try:
            await self._bus.js.publish(
                names.task_subject(task.provider, task.priority),
                encoder.encode(task),
                headers={"Nats-Msg-Id": task.msg_id},
                stream=names.tasks_stream,
            )
        except (*BUS_ERRORS, HiveError) as exc:
            log.warning(
                "router: task %s not yet queued on %s (%s); trying again", task.id, task.provider, exc
            )
            await msg.nak(delay=5.0)
            return
        await msg.ack()
        log.info("router: task %s queued on %s", task.id, task.provider)

    async def _keep_consumers(self) -> None:
        while True:
            try:
                beats = await kv_entries(self._bus.workers_kv)
                for raw in beats.values():
                    try:
                        provider = beat_decoder.decode(raw).provider
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue
                    if provider not in self._served:
                        await ensure_consumers(self._bus.js, self._bus.settings, provider)
                        self._served.add(provider)
            except (*BUS_ERRORS, HiveError) as exc:
                log.warning("router: could not check the providers' consumers: %s", exc)
            await anyio.sleep(CONSUMERS_EVERY_S)
