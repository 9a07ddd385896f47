"""Dead letters: tasks that failed for good (out of attempts, past their deadline, refused), kept with
their last error in ``<PREFIX>_DLQ`` until replayed or purged.

A dead letter is the task's ``failed`` event, task included, on ``<prefix>.dlq.<provider>.<task id>``.
Replaying one queues the task again under the same id, as its next run (``run`` + 1), so its history in
the events stream reads on: queued, ..., failed, queued (replayed), ..., completed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ._bus import Bus
from ._errors import BusUnavailable, HiveError, TaskNotFound
from ._messages import Failed, Queued, encoder, event_decoder, is_task_id, now_ms
from ._names import is_valid_provider
from ._nats import BUS_ERRORS

log = logging.getLogger("hive_bus.dlq")


async def keep(bus: Bus, provider: str, task_id: str, failed: bytes, msg_id: str) -> None:
    """Keep a task's encoded ``failed`` event as its dead letter, once per ``msg_id``. When the dead
    letters are full it is logged and not kept: the failed event, which carries the task too, still
    records it."""
    names = bus.names
    try:
        await bus.js.publish(
            names.dlq_subject(provider, task_id),
            failed,
            headers={"Nats-Msg-Id": msg_id},
            stream=names.dlq_stream,
        )
    except nats.js.errors.APIError as exc:
        log.error(
            "dead letter of task %s not kept (its failed event has the task): %s", task_id, exc.description
        )


def _check_provider(provider: str | None) -> None:
    if provider is not None and not is_valid_provider(provider):
        raise HiveError(f"provider {provider!r} must be 1-64 letters, digits, '_' or '-'")


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A dead letter as listed: where it sits in the stream, and the failure it records."""

    seq: int
    failed: Failed


@dataclass(frozen=True, slots=True)
class Replayed:
    id: str
    provider: str
    run: int


class NotReplayable(HiveError):
    """A dead letter that holds no task (a message that was not a task at all)."""


async def dead_letters(bus: Bus, *, provider: str | None = None, limit: int = 100) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters (of one provider)."""
    names = bus.names
    _check_provider(provider)
    config = ConsumerConfig(
        filter_subject=names.dlq_subject(provider, "*") if provider else names.all_dlq,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=10.0,
        mem_storage=True,
    )
    found: list[DeadLetter] = []
    try:
        info = await bus.js.add_consumer(names.dlq_stream, config)
        left = min(limit, int(info.num_pending or 0))
        sub = await bus.js.pull_subscribe_bind(info.name, stream=names.dlq_stream)
        try:
            while left > 0:
                for msg in await sub.fetch(batch=min(left, 256), timeout=bus.settings.request_timeout_s):
                    left -= 1
                    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                        event = event_decoder.decode(msg.data)
                        if isinstance(event, Failed):
                            found.append(DeadLetter(seq=msg.metadata.sequence.stream, failed=event))
        finally:
            with contextlib.suppress(*BUS_ERRORS):
                await sub.unsubscribe()
                await bus.js.delete_consumer(names.dlq_stream, info.name)
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read the dead letters: {exc}") from None
    return found


async def dead_letter(bus: Bus, task_id: str) -> DeadLetter:
    """One task's dead letter. Raises :class:`TaskNotFound`."""
    names = bus.names
    if not is_task_id(task_id) and not task_id.startswith("undecodable-"):
        raise TaskNotFound(f"{task_id!r} is not a task id (26 characters of Crockford base32)")
    if any(c in task_id for c in ".*> \t"):
        raise TaskNotFound(f"{task_id!r} is not a task id")
    try:
        raw = await bus.js.get_last_msg(names.dlq_stream, names.dead_letters_of(task_id), direct=True)
    except nats.js.errors.NotFoundError:
        raise TaskNotFound(f"task {task_id} is not among the dead letters") from None
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read the dead letter of {task_id}: {exc}") from None
    event = event_decoder.decode(raw.data or b"")
    assert isinstance(event, Failed)
    return DeadLetter(seq=raw.seq or 0, failed=event)


async def replay(bus: Bus, task_id: str) -> Replayed:
    """Queue a dead-lettered task again as its next run, and take it out of the dead letters."""
    letter = await dead_letter(bus, task_id)
    task = letter.failed.task
    if task is None:
        raise NotReplayable(f"dead letter {task_id} holds no task to replay: {letter.failed.error}")
    # a new run: its own attempts, and its deadline counted from now
    task = msgspec.structs.replace(task, run=task.run + 1, submitted_at_ms=now_ms())
    names = bus.names
    queued = Queued(task_id=task.id, provider=task.provider, at_ms=task.submitted_at_ms, task=task)
    try:
        await bus.js.publish(
            names.event_subject(task.provider, task.id, "queued"),
            encoder.encode(queued),
            headers={"Nats-Msg-Id": f"{task.id}:replay:{task.run}"},
            stream=names.events_stream,
        )
        await bus.js.publish(
            names.task_subject(task.provider, task.priority),
            encoder.encode(task),
            headers={"Nats-Msg-Id": task.msg_id},
            stream=names.tasks_stream,
        )
        await bus.js.purge_stream(names.dlq_stream, subject=names.dead_letters_of(task.id))
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not replay task {task_id}: {exc}") from None
    return Replayed(task.id, task.provider, task.run)


async def purge(bus: Bus, *, task_id: str | None = None, provider: str | None = None) -> int:
    """Remove dead letters: one task's, one provider's, or all; returns how many went."""
    names = bus.names
    _check_provider(provider)
    if task_id is not None:
        await dead_letter(bus, task_id)  # checks the id, and that it is there
        subject = names.dead_letters_of(task_id)
    else:
        subject = names.dlq_subject(provider, ">") if provider else names.all_dlq
    try:
        before = (await bus.js.stream_info(names.dlq_stream)).state.messages
        await bus.js.purge_stream(names.dlq_stream, subject=subject)
        after = (await bus.js.stream_info(names.dlq_stream)).state.messages
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not purge dead letters: {exc}") from None
    return before - after
