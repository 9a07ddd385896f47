"""Counts of events by status, kept up to date by nats-server, read at the same cost at any size of bus.

Every task has subjects of its own in the events stream (``<prefix>.events.<provider>.<task id>.<status>``),
so counting one status of one provider from scratch (a throwaway consumer's pending count,
``_stats._count``) makes nats-server walk every subject of that provider in its index: 18 ms with 800,000
events stored, 120 ms of ``GET /v1/stats`` with 2,000,000 (bench/scale.py), and more as the bus grows.

A tally is a durable consumer of a provider's events stream, filtered on one status from the stream's
start, that nobody fetches from (no acks, its state in memory). Its pending count is
the number of such events the stream holds: nats-server works it out once when the consumer is made,
then keeps it as events are stored and as they age out of the stream's window, so reading it is one
consumer info (0.2 ms at any size). Whoever counts first makes it (the same config from two processes
makes one consumer). The server removes it :data:`TALLY_IDLE_S` after it was made (a consumer's activity
is fetching, and nobody fetches from a tally; reading its info does not count), so a tally of a provider
that is gone does not stay, and the next read makes it again: one fresh count an hour.
"""

from __future__ import annotations

import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ._bus import Bus, event_providers
from ._nats import stream_missing

TALLY_IDLE_S = 3600.0


async def tally(bus: Bus, status: str, provider: str | None = None) -> int:
    """How many ``status`` events of ``provider`` (or of every provider: one tally a provider) the
    events streams hold; 0 for a provider without a stream."""
    if provider is None:
        return sum([await tally(bus, status, p) for p in await event_providers(bus)])
    names = bus.names
    name = names.tally(status, provider)
    stream = names.events_stream_of(provider)
    try:
        info = await bus.js.consumer_info(stream, name)
    except nats.js.errors.NotFoundError as exc:
        if stream_missing(exc):
            return 0  # no such stream: nothing of the provider was ever queued or run
        config = ConsumerConfig(
            durable_name=name,
            description="hive-bus tally: counts events, delivers none",
            filter_subject=names.event_subject(provider, "*", status),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=TALLY_IDLE_S,
            mem_storage=True,
        )
        try:
            info = await bus.js.add_consumer(stream, config)
        except nats.js.errors.NotFoundError as exc:
            if stream_missing(exc):
                return 0
            raise
    return int(info.num_pending or 0)
