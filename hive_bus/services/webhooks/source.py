"""The one place webhooks read the events stream: a durable pull consumer of tasks' final events,
shared by every gateway of the bus (each event is handed to one of them, and kept until it is acked,
so a restart loses none).

Its stream and subject filters come from :mod:`hive_bus._names`; if the events are ever split (one
stream per provider, say), this is the function to change.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from hive_bus.bus import Bus

# how long a gateway may hold an event while it queues that event's deliveries
EVENT_ACK_WAIT_S = 30.0


async def final_events(bus: Bus) -> JetStreamContext.PullSubscription:
    """A pull subscription to every task's final event (completed, failed, cancelled), from the moment
    the consumer is first made (a new bus does not announce the events it already holds)."""
    names = bus.names
    config = ConsumerConfig(
        durable_name=names.webhook_events_consumer,
        description="hive-bus webhooks: final events whose deliveries are to be queued",
        filter_subjects=names.webhook_events,
        deliver_policy=DeliverPolicy.NEW,  # where a new bus starts; the durable keeps its place
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=EVENT_ACK_WAIT_S,
        max_deliver=-1,
    )
    # a second gateway finds the consumer made and binds to it; two making it at once make the same one
    return await bus.js.pull_subscribe(
        names.webhook_events[0],
        durable=names.webhook_events_consumer,
        stream=names.events_stream,
        config=config,
    )
