"""Per-provider figures read from the bus, so they hold for workers anywhere: the queue from the
provider's consumer, calls in flight from the heartbeats, cooldowns from the providers bucket, and
completed and failed counts from the events stream (its retention window, 7 days by default), as
nats-server keeps them in tallies (hive_bus._tallies)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import anyio
import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ._bus import Bus, consumer_infos, kv_entries
from ._cooldown import decode_records, provider_cooldowns
from ._counts import submitted_counts, unfetched_cancels
from ._messages import WorkerBeat
from ._nats import BUS_ERRORS
from ._tallies import tally


class ProviderStats(msgspec.Struct, frozen=True, kw_only=True):
    provider: str
    pending: int  # queued, not yet handed to a worker
    in_flight: int  # calls running now, by the workers' heartbeats
    retrying: int  # handed out and waiting for a retry (NAKed with a delay) or a worker's outcome
    completed: int  # in the events stream's window
    failed: int
    workers: int
    cooldown_until_ms: int | None = None  # when every key is cooling down: when the first is usable again
    cooldown_reason: str | None = None
    # workers that are not fetching because no key has budget or all are cooling down, and until when
    waiting: int = 0
    waiting_until_ms: int | None = None
    keys_refused: int = 0  # keys the provider refused (401/403), set aside


@dataclass(frozen=True, slots=True)
class QueueDepth:
    pending: int  # queued, not yet handed to a worker
    ack_pending: int  # handed out, not yet acked (running, or waiting for a retry)


async def queue_depths(bus: Bus) -> dict[str, QueueDepth]:
    """Each provider's queue, summed over its priorities: from the durable consumer of each (the tasks
    stream keeps what was acked too: the queue is what its consumers have not acked), or, for a
    provider tasks were submitted to that no consumer serves yet, the tasks stream's count of its
    messages (nothing acked them): a throwaway consumer's pending count, from the server's index. Less,
    in both cases, the tasks cancelled or expired while queued that no worker has fetched yet
    (hive_bus._cancel)."""
    names = bus.names
    queues: dict[tuple[str, str], QueueDepth] = {}
    for info in await consumer_infos(bus, names.tasks_stream):
        queue = names.of_consumer(info.name)
        if queue is not None and info.config.durable_name:
            queues[queue] = QueueDepth(info.num_pending or 0, info.num_ack_pending or 0)
    depths: dict[str, QueueDepth] = {}
    for (provider, _), depth in queues.items():
        have = depths.get(provider, QueueDepth(0, 0))
        depths[provider] = QueueDepth(have.pending + depth.pending, have.ack_pending + depth.ack_pending)
    for provider in set(await submitted_counts(bus)) - set(depths):
        waiting = await _count(bus, names.task_filter(provider, "*"), stream=names.tasks_stream)
        depths[provider] = QueueDepth(waiting, 0)
    # A task cancelled or expired while queued is pending until a worker fetches it (and lets it go):
    # not queued. A count below 0 (a hub that stopped before counting an end) subtracts nothing.
    for provider, ended in (await unfetched_cancels(bus)).items():
        if ended > 0 and (queued := depths.get(provider)) is not None:
            depths[provider] = dataclasses.replace(queued, pending=max(0, queued.pending - ended))
    return depths


async def ack_floors(bus: Bus) -> dict[str, int]:
    """Each provider's lowest ack floor over its priorities' consumers: every message of the tasks
    stream up to it is acked (ended, or moved on); a provider with no consumer yet is left out."""
    return (await queue_marks(bus))[0]


async def queue_marks(bus: Bus) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """:func:`ack_floors`, and how far each (provider, priority) consumer has delivered: a message of
    its queue past that sequence was never handed to a worker."""
    names = bus.names
    floors: dict[str, int] = {}
    delivered: dict[tuple[str, str], int] = {}
    for info in await consumer_infos(bus, names.tasks_stream):
        if (queue := names.of_consumer(info.name)) is not None:
            floor = (info.ack_floor.stream_seq if info.ack_floor else 0) or 0
            floors[queue[0]] = min(floors.get(queue[0], floor), floor)
            delivered[queue] = (info.delivered.stream_seq if info.delivered else 0) or 0
    return floors, delivered


async def provider_stats(bus: Bus, beats: list[WorkerBeat]) -> list[ProviderStats]:
    depths = await queue_depths(bus)
    providers = sorted(set(depths) | {b.provider for b in beats})
    values = await kv_entries(bus.providers_kv)
    cooldowns = provider_cooldowns(values, beats)
    refused = [r.provider for r in decode_records(values) if r.refused]
    result = []
    for provider in providers:
        depth = depths.get(provider, QueueDepth(0, 0))
        # Counting makes two consumers a provider. Only a provider with a queue (tasks were queued for
        # it) can have outcomes; one that only heartbeats name gets none, so that heartbeats naming
        # made-up providers make nothing on the hub.
        queued = provider in depths
        in_flight = sum(b.in_flight for b in beats if b.provider == provider)
        cooldown = cooldowns.get(provider)
        waiting = [b.waiting_until_ms for b in beats if b.provider == provider and b.waiting]
        result.append(
            ProviderStats(
                provider=provider,
                pending=depth.pending,
                in_flight=in_flight,
                retrying=max(0, depth.ack_pending - in_flight),
                completed=await tally(bus, "completed", provider) if queued else 0,
                failed=await tally(bus, "failed", provider) if queued else 0,
                workers=sum(1 for b in beats if b.provider == provider),
                cooldown_until_ms=(cooldown.until_ms if not cooldown.refused else None) if cooldown else None,
                cooldown_reason=cooldown.reason if cooldown else None,
                waiting=len(waiting),
                waiting_until_ms=min(waiting) if waiting else None,
                keys_refused=refused.count(provider),
            )
        )
    return result


async def _count(bus: Bus, subject: str | list[str], *, stream: str) -> int:
    """Messages on ``subject`` (or on any of a list) in ``stream``: a throwaway consumer's pending
    count, which nats-server works out from its index of subjects without reading a message."""
    config = ConsumerConfig(
        filter_subject=subject if isinstance(subject, str) else None,
        filter_subjects=subject if isinstance(subject, list) else None,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=5.0,
    )
    info = await bus.js.add_consumer(stream, config)
    try:
        return int(info.num_pending or 0)
    finally:
        # at once, even when the read is cancelled; if this fails, it goes after inactive_threshold
        with anyio.CancelScope(shield=True), anyio.move_on_after(3), contextlib.suppress(*BUS_ERRORS):
            await bus.js.delete_consumer(stream, info.name)
