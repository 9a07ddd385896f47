"""The one place webhooks read the events: a durable pull consumer of tasks' final events on each
provider's events stream, shared by every gateway of the bus (each event is handed to one of them, and
kept until it is acked, so a restart loses none).

Its streams and subject filters come from :mod:`hive_bus._names`.
"""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext

from hive_bus._bus import event_providers, webhooks_consumer_config
from hive_bus.bus import Bus


async def final_events(bus: Bus, provider: str, *, from_start: bool) -> JetStreamContext.PullSubscription:
    """A pull subscription to the final events (completed, failed, cancelled) of the tasks of
    ``provider``, from the moment its consumer is first made (a bus new to webhooks does not announce
    the events it already holds), or, ``from_start``, from its stream's first event (a provider's stream
    newer than the webhooks, made while a gateway runs them or since they last ran: none of its events is
    missed)."""
    names = bus.names
    config = webhooks_consumer_config(bus.settings, provider, start_seq=1 if from_start else None)
    # a second gateway finds the consumer made and binds to it; two making it at once make the same one
    return await bus.js.pull_subscribe(
        names.final_events(provider)[0],
        durable=names.webhook_events_consumer,
        stream=names.events_stream_of(provider),
        config=config,
    )


async def final_events_followed(bus: Bus) -> bool:
    """Whether any provider's events stream has the consumer of :func:`final_events`: webhooks have run
    on this bus (a stream without it is newer than they are)."""
    for provider in await event_providers(bus):
        try:
            await bus.js.consumer_info(
                bus.names.events_stream_of(provider), bus.names.webhook_events_consumer
            )
        except nats.js.errors.NotFoundError:
            continue
        return True
    return False
