"""The router: queues moved tasks on their new provider, and makes consumers for workers that may not.

A worker that moves a task to its next fallback only records a ``moved`` event (workers have no right to
publish tasks; see ``nats/``). The router, which runs in the gateway (and so in ``hive up``), follows those
events through a durable consumer of each provider's events stream (``<prefix>_router``, made for a
provider's stream as it appears, from the stream's start): it publishes each moved task on its new provider's subject (with a
de-duplication id, so a redelivered event queues it once), then acks the event. If the gateway is down,
moved tasks wait in the events stream until it is back; nothing is lost.

It also creates the consumers of the providers whose workers heartbeat and that have work (tasks were
submitted to them, or are queued for them), so that workers whose credentials do not allow creating
consumers can bind to them; at its start, it checks the objects of each provider that has consumers.
A move is taken only when the bus knows the task, the event was recorded under the provider the task
is assigned to, and it goes to that task's next fallback (``_assigned``).
"""

from __future__ import annotations

import contextlib
import enum
import logging

import anyio
import msgspec
import nats.aio.msg
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from . import _blobs
from ._assigned import assignment, hop
from ._bus import Bus, consumer_infos, ensure_consumers, kv_entries
from ._counts import submitted_counts
from ._errors import HiveError, TooLarge
from ._events import watch_providers
from ._messages import Moved, Task, beat_of, encoder, event_decoder, new_seal
from ._nats import BUS_ERRORS, handle_each
from ._size import js_publish

log = logging.getLogger("hive_bus.router")

FETCH_WAIT_S = 2.0
CONSUMERS_EVERY_S = 5.0
# A move that is valid but not yet the last of its task's chain, as the bus was read (a replica behind
# its leader), is looked at again this many times before it is refused.
STALE_TRIES = 5


class _Later(enum.Enum):
    LATER = "later"


LATER = _Later.LATER


class Router:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._served: set[str] = set()  # providers whose consumers exist

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:

            async def on_new(provider: str) -> None:
                await tg.start(self._route, provider)

            await self._serve_known()
            tg.start_soon(self._keep_consumers)
            await tg.start(lambda task_status: watch_providers(self._bus, on_new, task_status=task_status))
            task_status.started()

    async def _route(
        self, provider: str, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Queue the tasks moved away from ``provider``, as its events stream records the moves."""
        bus, names = self._bus, self._bus.names
        subject = names.event_subject(provider, "*", "moved")
        config = ConsumerConfig(
            durable_name=names.router,
            description=f"hive-bus router: queues the tasks moved from {provider} on their new provider",
            filter_subject=subject,
            deliver_policy=DeliverPolicy.ALL,  # from the stream's start; the durable keeps its place
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
        )
        while True:
            try:
                sub = await bus.js.pull_subscribe(
                    subject, durable=names.router, stream=names.events_stream_of(provider), config=config
                )
                break
            except BUS_ERRORS as exc:
                log.warning("router: cannot follow the moves from %s (%s); trying again", provider, exc)
                await anyio.sleep(5)
        task_status.started()
        what = f"the tasks moved from {provider}"
        await handle_each(sub, self._queue_or_set_aside, what=what, wait_s=FETCH_WAIT_S, log=log)

    async def _queue_or_set_aside(self, msg: nats.aio.msg.Msg) -> None:
        """A moved event that cannot be decoded or processed is poison: logged and terminated, so it
        is never redelivered, and the router goes on with the next."""
        try:
            await self._queue(msg)
        except BUS_ERRORS as exc:
            log.warning("router: moved event %s not settled (%s); it comes back", _seq(msg), exc)
        except Exception as exc:
            log.error(
                "router: moved event %s could not be processed (%s); terminated",
                _seq(msg),
                type(exc).__name__,
            )
            with contextlib.suppress(*BUS_ERRORS):
                await msg.term()

    async def _queue(self, msg: nats.aio.msg.Msg) -> None:
        try:
            event = event_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("router: moved event %s does not decode (%s); terminated", _seq(msg), exc)
            await msg.term()
            return
        if not isinstance(event, Moved):
            await msg.term()
            return
        try:
            task = await self._next_hop(msg, event)
        except BUS_ERRORS as exc:
            log.warning("router: could not look up moved task %s (%s); trying again", event.task_id, exc)
            await msg.nak(delay=5.0)
            return
        if task is LATER:
            await msg.nak(delay=1.0)
            return
        if task is None:
            await msg.term()
            return
        names = self._bus.names
        try:
            await self._serve(task.provider)  # a move's target is a fallback a submitter named
            task = await _blobs.moved_to(self._bus, task)  # its content where its new workers may read it
            await js_publish(
                self._bus.js, self._bus.nc, names.task_subject(task.provider, task.priority, task.id),
                encoder.encode(task), headers={"Nats-Msg-Id": task.msg_id}, stream=names.tasks_stream, expect=False,
                what="moved task",
            )  # fmt: skip
        except (TooLarge, _blobs.BlobMissing) as exc:
            # it can never be queued: said once, and the event set aside (its task's record says moved)
            log.error(
                "router: task %s cannot be queued on %s: %s; the move is dropped", task.id, task.provider, exc
            )
            await msg.term()
            return
        except (*BUS_ERRORS, HiveError) as exc:
            log.warning(
                "router: task %s not yet queued on %s (%s); trying again", task.id, task.provider, exc
            )
            await msg.nak(delay=5.0)
            return
        await msg.ack()
        log.info("router: task %s queued on %s", task.id, task.provider)

    async def _next_hop(self, msg: nats.aio.msg.Msg, event: Moved) -> Task | _Later | None:
        """The task to queue for a ``moved`` event, or None when the move is not one to take. The bus
        must know the task, and the event must be the last link of its chain (``assignment``): recorded
        under the provider the task was assigned to, after it was queued there, to the first of that
        task's own fallbacks. What is queued is the task as the bus knows it on its next provider,
        with a new seal, never the copy the event carries."""
        here = await assignment(self._bus, event.task_id)
        seq = msg.metadata.sequence.stream
        on = self._bus.names.provider_of_subject(msg.subject)
        if (
            here is not None
            and here.event_seq == seq
            and isinstance(here.event, Moved)
            and here.event.provider == on
        ):
            return msgspec.structs.replace(here.task, seal=new_seal())
        if (
            here is not None
            and not here.pending
            and here.seq < seq
            and hop(here.task, event) is not None
            and self._bus.names.provider_of_subject(msg.subject) == here.provider
            and (msg.metadata.num_delivered or 1) < STALE_TRIES
        ):
            return LATER  # a valid move that a replica's read has not seen yet
        log.warning(
            "router: a moved event on %s for task %s is refused: %s", msg.subject, event.task_id,
            "the bus knows no such task" if here is None else
            f"not a move the task's provider made to its next fallback (the task is on {here.provider})",
        )  # fmt: skip
        return None

    async def _serve(self, provider: str) -> None:
        if provider not in self._served:
            await ensure_consumers(self._bus.js, self._bus.settings, provider)
            self._served.add(provider)

    async def _serve_known(self) -> None:
        """The objects of each provider whose consumers a gateway made before, made or checked now: a
        hub made before one claim check bucket a provider has no bucket for them, and their workers,
        which may not make it, bind to those consumers at once and could not store a large output
        (the task called again after AckWait) until this router saw their heartbeats."""
        names = self._bus.names
        try:
            infos = await consumer_infos(self._bus, names.tasks_stream)
        except BUS_ERRORS as exc:
            log.warning("router: could not list the providers' consumers: %s", exc)
            return
        for provider in sorted({q[0] for info in infos if (q := names.of_consumer(info.name)) is not None}):
            try:
                await self._serve(provider)
            except (*BUS_ERRORS, HiveError) as exc:
                log.warning("router: could not check the objects of provider %s: %s", provider, exc)

    async def _keep_consumers(self) -> None:
        while True:
            try:
                beats = await kv_entries(self._bus.workers_kv)
                wanted = {
                    beat.provider for key, raw in beats.items() if (beat := beat_of(key, raw)) is not None
                }
                if wanted - self._served:
                    # A heartbeat is a worker's word, and any name will do: consumers are made only for
                    # providers that work was submitted to, so nothing a worker writes makes the hub
                    # create objects without bound.
                    for provider in sorted((wanted - self._served) & await self._with_work()):
                        await self._serve(provider)
            except (*BUS_ERRORS, HiveError) as exc:
                log.warning("router: could not check the providers' consumers: %s", exc)
            await anyio.sleep(CONSUMERS_EVERY_S)

    async def _with_work(self) -> set[str]:
        """The providers that tasks were submitted to (the submission counters, which only submitters
        write) or are queued for (the tasks stream, which only the gateway publishes to)."""
        names = self._bus.names
        providers = set(await submitted_counts(self._bus))
        for info in await consumer_infos(
            self._bus, self._bus.names.tasks_stream
        ):  # the providers a move or a replay queued tasks on
            if (queue := names.of_consumer(info.name)) is not None:
                providers.add(queue[0])
        return providers


def _seq(msg: nats.aio.msg.Msg) -> str:
    """The event's place in the events stream, for a log line (never its content)."""
    try:
        return str(msg.metadata.sequence.stream)
    except Exception:  # not a JetStream message: no place to name
        return "?"
