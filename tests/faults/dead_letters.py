"""The dead-letter streams: ``<PREFIX>_DLQ_<provider>``, one per provider, subjects
``<prefix>.dlq.<provider>.<task id>``, each holding the failed event with the task.

:func:`dead_lettered_ids` feeds the ledger (no stream yet: nothing is dead-lettered).
:func:`assert_dead_lettered` is the poison case's dead-letter check; it runs today as a strict xfail
(``test_poison.py::test_poison_is_dead_lettered``) and passes once the stream lands: then drop the
xfail marker.
"""

from __future__ import annotations

import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from hive_bus._dlq import streams
from hive_bus.bus import Bus


def dlq_stream(bus: Bus, provider: str) -> str:
    return f"{bus.names.prefix.upper()}_DLQ_{provider}"


def dlq_subject(bus: Bus, provider: str, task_id: str) -> str:
    return f"{bus.names.prefix}.dlq.{provider}.{task_id}"


async def dead_lettered_ids(bus: Bus) -> set[str]:
    """The task ids in the dead-letter streams (their subjects' last token)."""
    ids: set[str] = set()
    for stream in await streams(bus):
        try:
            info = await bus.js.stream_info(stream, subjects_filter=f"{bus.names.prefix}.dlq.>")
        except nats.js.errors.NotFoundError:
            continue
        ids |= {subject.rsplit(".", 1)[-1] for subject in (info.state.subjects or {})}
    return ids


async def assert_dead_lettered(bus: Bus, provider: str, task_id: str, reason: str) -> None:
    """The task is in its provider's dead-letter stream under its own subject, with the failed event's
    reason."""
    stream = dlq_stream(bus, provider)
    try:
        await bus.js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        raise AssertionError(f"no dead-letter stream {stream} on the bus") from None
    subject = dlq_subject(bus, provider, task_id)
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    sub = await bus.js.subscribe(subject, stream=stream, ordered_consumer=True, config=config)
    try:
        msg = await sub.next_msg(timeout=5)
    except TimeoutError:
        raise AssertionError(f"nothing dead-lettered on {subject}") from None
    finally:
        await sub.unsubscribe()
    assert reason.encode() in msg.data, f"the dead letter on {subject} does not give the reason {reason!r}"
