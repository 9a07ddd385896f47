"""Per-provider figures read from the bus, so they hold for workers anywhere: the queue from the
provider's consumer, calls in flight from the heartbeats, cooldowns from the providers bucket, and
completed and failed counts from the events stream (its retention window, 7 days by default)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

from ._bus import Bus
from ._cooldown import CooldownRecord
from ._messages import WorkerBeat, now_ms


class ProviderStats(msgspec.Struct, frozen=True, kw_only=True):
    provider: str
    pending: int  # queued, not yet handed to a worker
    in_flight: int  # calls running now, by the workers' heartbeats
    retrying: int  # handed out and waiting for a retry (NAKed with a delay) or a worker's outcome
    completed: int  # in the events stream's window
    failed: int
    workers: int
    cooldown_until_ms: int | None = None
    cooldown_reason: str | None = None


_cooldown = msgspec.json.Decoder(CooldownRecord)


@dataclass(frozen=True, slots=True)
class QueueDepth:
    pending: int  # queued, not yet handed to a worker
    ack_pending: int  # handed out, not yet acked (running, or waiting for a retry)


async def queue_depths(bus: Bus) -> dict[str, QueueDepth]:
    """Each provider's queue: from its durable consumer, or, for a provider no worker has served yet
    (so no consumer), the tasks stream's count for its subject (one subject per provider)."""
    names = bus.names
    tasks = await bus.js.stream_info(names.tasks_stream, subjects_filter=names.all_tasks)
    depths = {
        names.provider_of_subject(subject): QueueDepth(pending=n, ack_pending=0)
        for subject, n in (tasks.state.subjects or {}).items()
    }
    prefix = f"{names.prefix}_"
    for info in await _consumers(bus):
        if info.name.startswith(prefix) and info.config.durable_name:
            depths[info.name.removeprefix(prefix)] = QueueDepth(
                info.num_pending or 0, info.num_ack_pending or 0
            )
    return depths


async def _consumers(bus: Bus) -> list[ConsumerInfo]:
    """Every consumer of the tasks stream (the server lists them 256 at a time)."""
    found: list[ConsumerInfo] = []
    while True:
        page = await bus.js.consumers_info(bus.names.tasks_stream, offset=len(found) or None)
        found.extend(page)
        if len(page) < 256:
            return found


async def provider_stats(bus: Bus, beats: list[WorkerBeat]) -> list[ProviderStats]:
    names = bus.names
    depths = await queue_depths(bus)
    providers = sorted(set(depths) | {b.provider for b in beats})
    result = []
    for provider in providers:
        depth = depths.get(provider, QueueDepth(0, 0))
        in_flight = sum(b.in_flight for b in beats if b.provider == provider)
        cooldown = await _cooldown_of(bus, provider)
        result.append(
            ProviderStats(
                provider=provider,
                pending=depth.pending,
                in_flight=in_flight,
                retrying=max(0, depth.ack_pending - in_flight),
                completed=await _count(bus, names.final_events(provider)[0]),
                failed=await _count(bus, names.final_events(provider)[1]),
                workers=sum(1 for b in beats if b.provider == provider),
                cooldown_until_ms=cooldown.until_ms if cooldown else None,
                cooldown_reason=cooldown.reason if cooldown else None,
            )
        )
    return result


async def _count(bus: Bus, subject: str) -> int:
    """Messages on ``subject`` in the events stream: a throwaway consumer's pending count."""
    config = ConsumerConfig(
        filter_subject=subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=5.0,
    )
    info = await bus.js.add_consumer(bus.names.events_stream, config)
    try:
        return int(info.num_pending or 0)
    finally:
        # if this fails, the consumer goes by itself after inactive_threshold
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await bus.js.delete_consumer(bus.names.events_stream, info.name)


async def _cooldown_of(bus: Bus, provider: str) -> CooldownRecord | None:
    try:
        entry = await bus.providers_kv.get(provider)
    except nats.js.errors.KeyNotFoundError:
        return None
    if not entry.value:
        return None
    try:
        record = _cooldown.decode(entry.value)
    except msgspec.DecodeError:
        return None
    return record if record.until_ms > now_ms() else None
