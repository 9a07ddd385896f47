"""Per-provider figures read from the bus, so they hold for workers anywhere: the queue from the
provider's consumer, calls in flight from the heartbeats, cooldowns from the providers bucket, and
completed and failed counts from the events stream (its retention window, 7 days by default)."""

from __future__ import annotations

import contextlib

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

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


async def provider_stats(bus: Bus, beats: list[WorkerBeat]) -> list[ProviderStats]:
    names = bus.names
    consumers = await bus.js.consumers_info(names.tasks_stream)
    prefix = f"{names.prefix}_"
    queues = {c.name.removeprefix(prefix): c for c in consumers if c.name.startswith(prefix)}
    # One subject per provider: the stream counts what waits for a provider no worker has served yet.
    tasks = await bus.js.stream_info(names.tasks_stream, subjects_filter=names.all_tasks)
    waiting = {names.provider_of_subject(subj): n for subj, n in (tasks.state.subjects or {}).items()}
    providers = sorted(set(queues) | set(waiting) | {b.provider for b in beats})
    result = []
    for provider in providers:
        info = queues.get(provider)
        ack_pending = (info.num_ack_pending or 0) if info else 0
        in_flight = sum(b.in_flight for b in beats if b.provider == provider)
        cooldown = await _cooldown_of(bus, provider)
        result.append(
            ProviderStats(
                provider=provider,
                pending=(info.num_pending or 0) if info else waiting.get(provider, 0),
                in_flight=in_flight,
                retrying=max(0, ack_pending - in_flight),
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
