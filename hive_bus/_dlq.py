"""Dead letters: tasks that failed for good (out of attempts, past their deadline, refused), kept with
their last error in their provider's ``<PREFIX>_DLQ_<provider>`` until replayed or purged. Each provider
has a stream of its own, with its own limit, so that one provider's workers (or a credential of theirs)
can fill their own dead letters and no other provider's; readers read across them.

A dead letter is the task's ``failed`` event, task included, on ``<prefix>.dlq.<provider>.<task id>``.
Replaying one queues the task again under the same id, as its next run (``run`` + 1), so its history in
the events stream reads on: queued, ..., failed, queued (replayed), ..., completed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg

from . import _cancel
from ._assigned import assignment
from ._bus import Bus, ensure_dlq_stream, stream_names
from ._errors import BusUnavailable, HiveError, QueueFull, TaskNotFound, TooLarge
from ._messages import Failed, Task, encoder, event_decoder, is_task_id, new_seal, now_ms
from ._names import check_provider
from ._nats import BUS_ERRORS, delete_message, unsubscribe
from ._publish import QUEUE_FULL_RETRY_S, STREAM_FULL_CODES
from ._size import js_publish
from ._timers import deadline_schedule, ensure_schedules_stream

log = logging.getLogger("hive_bus.dlq")


async def keep(bus: Bus, provider: str, task_id: str, failed: bytes, msg_id: str) -> None:
    """Keep a task's encoded ``failed`` event as its dead letter, once per ``msg_id``. When the
    provider's dead letters are full it is logged and not kept: the failed event, which carries the
    task too, still records it. The provider's stream is made here when it is missing and this
    process may make it (the gateway's audit dead-letters tasks of providers no worker served yet)."""
    names = bus.names
    for last in (False, True):
        try:
            await js_publish(
                bus.js, bus.nc, names.dlq_subject(provider, task_id), failed,
                headers={"Nats-Msg-Id": msg_id}, stream=names.dlq_stream(provider), what="dead letter",
            )  # fmt: skip
            return
        except nats.js.errors.NoStreamResponseError:
            if last:
                log.error("dead letter of task %s not kept: no dead-letter stream for %s", task_id, provider)
                return
            try:
                await ensure_dlq_stream(bus.js, bus.settings, provider)
            except (*BUS_ERRORS, HiveError) as exc:
                log.error("dead letter of task %s not kept (its failed event has the task): %s", task_id, exc)
                return
        except nats.js.errors.APIError as exc:
            log.error(
                "dead letter of task %s not kept (its failed event has the task): %s",
                task_id,
                exc.description,
            )
            return
        except TooLarge as exc:
            log.error("dead letter of task %s not kept (its failed event has the task): %s", task_id, exc)
            return


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


async def streams(bus: Bus, provider: str | None = None) -> list[str]:
    """The dead-letter streams there are: one provider's, or every provider's (and a shared one not
    split yet)."""
    names = bus.names
    return await stream_names(bus, names.dlq_subject(provider, "*") if provider else names.all_dlq)


def _timeout(bus: Bus) -> float:
    return bus.settings.request_timeout_s


async def dead_letters(bus: Bus, *, provider: str | None = None, limit: int = 100) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters (of one provider)."""
    check_provider(provider)
    found: list[DeadLetter] = []
    try:
        for stream in await streams(bus, provider):
            found += await _letters(bus, stream, provider, limit)
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read the dead letters: {exc}") from None
    return sorted(found, key=lambda letter: (letter.failed.at_ms, letter.seq))[:limit]


async def _letters(bus: Bus, stream: str, provider: str | None, limit: int) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters of one stream (of one provider)."""
    names = bus.names
    config = ConsumerConfig(
        filter_subject=names.dlq_subject(provider, "*") if provider else names.all_dlq,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=10.0,
        mem_storage=True,
    )
    found: list[DeadLetter] = []
    info = await bus.js.add_consumer(stream, config)
    left = min(limit, int(info.num_pending or 0))
    sub = await bus.js.pull_subscribe_bind(info.name, stream=stream)
    try:
        while left > 0:
            for msg in await sub.fetch(batch=min(left, 256), timeout=_timeout(bus)):
                left -= 1
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                    event = event_decoder.decode(msg.data)
                    if isinstance(event, Failed):
                        found.append(DeadLetter(seq=msg.metadata.sequence.stream, failed=event))
    finally:
        await unsubscribe(sub)
        # at once, even when the read is cancelled (its client went): polled reads must not pile up
        with anyio.CancelScope(shield=True), anyio.move_on_after(3), contextlib.suppress(*BUS_ERRORS):
            await bus.js.delete_consumer(stream, info.name)
    return found


async def dead_letter(bus: Bus, task_id: str) -> DeadLetter:
    """One task's dead letter. Raises :class:`TaskNotFound`."""
    raw = (await _find(bus, task_id))[1]
    try:
        event = event_decoder.decode(raw.data or b"")
    except msgspec.DecodeError as exc:
        raise NotReplayable(f"the dead letter of {task_id} does not decode ({exc}); purge it") from None
    if not isinstance(event, Failed):
        raise NotReplayable(f"the dead letter of {task_id} is not a failed event; purge it")
    return DeadLetter(seq=raw.seq or 0, failed=event)


async def _find(bus: Bus, task_id: str) -> tuple[str, RawStreamMsg]:
    """The stream that holds the task's dead letter, and the letter. Raises :class:`TaskNotFound`."""
    names = bus.names
    if not is_task_id(task_id) and not task_id.startswith("undecodable-"):
        raise TaskNotFound(f"{task_id!r} is not a task id (26 characters of Crockford base32)")
    if any(c in task_id for c in ".*> \t\r\n"):
        raise TaskNotFound(f"{task_id!r} is not a task id")
    try:
        for stream in await streams(bus):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                return stream, await bus.js.get_last_msg(stream, names.dead_letters_of(task_id), direct=True)
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read the dead letter of {task_id}: {exc}") from None
    raise TaskNotFound(f"task {task_id} is not among the dead letters")


async def replay(bus: Bus, task_id: str) -> Replayed:
    """Queue a dead-lettered task again as its next run, and take it out of the dead letters."""
    letter = await dead_letter(bus, task_id)
    if letter.failed.task is None:
        raise NotReplayable(f"dead letter {task_id} holds no task to replay: {letter.failed.error}")
    known = await _replayable(bus, task_id)
    # a new run: its own attempts, its deadline counted from now, and a new seal
    task = msgspec.structs.replace(known, run=known.run + 1, submitted_at_ms=now_ms(), seal=new_seal())
    names = bus.names
    try:
        if (timer := deadline_schedule(bus.settings, task)) is not None:  # the new run's own deadline
            (subject, data, msg_id, stream), schedule = timer
            await ensure_schedules_stream(bus.js, bus.settings)
            await js_publish(
                bus.js,
                bus.nc,
                subject,
                data,
                headers={"Nats-Msg-Id": msg_id or "", **schedule},
                stream=stream,
            )
        subject = names.task_subject(task.provider, task.priority, task.id)
        earlier = await _message_seq(bus, subject)  # the run before this one's, if still held
        letters = await _letters_of(bus, task.id)  # these go; a letter of the new run stays
        # an expired run told its workers to drop the task: the new run is theirs to run
        end = await _cancel.recorded_end(bus, known)
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await bus.cancels_kv.delete(names.cancel_key(task.provider, task.id))
        ack = await js_publish(
            bus.js, bus.nc, subject, encoder.encode(task),
            headers={"Nats-Msg-Id": task.msg_id}, stream=names.tasks_stream, expect=False,
        )  # fmt: skip
        # not when this run was queued already (a replay at the same moment): ``earlier`` may be it
        if earlier is not None and not ack.duplicate and earlier < ack.seq:
            await _drop_earlier_run(bus, known, earlier, counted=_cancel.counted_for(end, known))
        for stream, last in letters.items():
            await bus.js.purge_stream(stream, subject=names.dead_letters_of(task.id), seq=last + 1)
    except BUS_ERRORS as exc:
        if getattr(exc, "err_code", None) in STREAM_FULL_CODES:  # as a submission to a full queue is told
            raise QueueFull(
                f"could not replay task {task_id}: the {names.tasks_stream} stream is full "
                f"({getattr(exc, 'description', exc)}); it stays among the dead letters",
                retry_after_s=QUEUE_FULL_RETRY_S,
            ) from None
        raise BusUnavailable(f"could not replay task {task_id}: {exc}") from None
    return Replayed(task.id, task.provider, task.run)


async def _letters_of(bus: Bus, task_id: str) -> dict[str, int]:
    """By dead-letter stream, the sequence of the task's last dead letter there. A replay takes out
    these, no later one: the new run can fail for good, and be dead-lettered, before the replay is done."""
    found: dict[str, int] = {}
    for stream in await streams(bus):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            raw = await bus.js.get_last_msg(stream, bus.names.dead_letters_of(task_id), direct=True)
            found[stream] = raw.seq or 0
    return found


async def _message_seq(bus: Bus, subject: str) -> int | None:
    try:
        return (await bus.js.get_last_msg(bus.names.tasks_stream, subject, direct=True)).seq
    except nats.js.errors.NotFoundError:
        return None


async def _drop_earlier_run(bus: Bus, task: Task, seq: int, *, counted: bool) -> None:
    """Delete the message of the run a replay follows (``task``, at ``seq``), once the new run is
    queued. That run ended (it failed, or expired), but its message may still wait in the queue: a task
    expired while queued that no worker fetched, or one waiting out a backoff. A worker that fetched it
    after the replay took its key off the cancels bucket would call the task for it as well as for the
    new run. Deleted, it is fetched no more (one in a worker's hands at this moment is not stopped). A
    run ``counted`` among the queue's ended tasks that no worker was handed is taken off that count,
    with the id a worker's fetch uses (so a fetch just before the deletion counts once). An acked
    message is deleted too: the new run's carries the task."""
    names = bus.names
    handed_up_to = 0
    if counted:
        with contextlib.suppress(nats.js.errors.NotFoundError):  # no worker ever served this queue
            info = await bus.js.consumer_info(
                names.tasks_stream, names.consumer(task.provider, task.priority)
            )
            handed_up_to = (info.delivered.stream_seq if info.delivered else 0) or 0
    if await delete_message(bus.js, names.tasks_stream, seq) and counted and seq > handed_up_to:
        await _cancel.fetched(bus, task)


async def _replayable(bus: Bus, task_id: str) -> Task:
    """The task a replay queues again: as the bus knows it (never the copy a dead letter carries, which
    any worker of the letter's provider could have written; its message, or when that is gone the copy
    its expiry keeps in the cancels bucket), and only when its dead letter was kept under the provider
    the task is assigned to, and names that provider. Raises :class:`NotReplayable`."""
    names = bus.names
    try:
        here = await assignment(bus, task_id)
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not look up task {task_id}: {exc}") from None
    if here is None:
        raise NotReplayable(f"dead letter {task_id} names a task the bus does not know; not replayed")
    try:
        raw = await bus.js.get_last_msg(
            names.dlq_stream(here.provider), names.dlq_subject(here.provider, task_id), direct=True
        )
    except nats.js.errors.NotFoundError:
        raise NotReplayable(
            f"task {task_id} is on provider {here.provider}, which kept no dead letter of it; not replayed"
        ) from None
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not check the dead letter of {task_id}: {exc}") from None
    try:
        letter = event_decoder.decode(raw.data or b"")
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        letter = None
    if not isinstance(letter, Failed) or letter.provider != here.provider or letter.task_id != task_id:
        raise NotReplayable(
            f"the dead letter of task {task_id} on {here.provider} does not name that provider and task; "
            "not replayed"
        )
    if here.whole:
        return here.task
    # its message is gone: an expiry recorded while it was queued, whose message no worker fetched and
    # the ageing sweep took out (hive_bus._ageing), left the task in the cancels bucket, which only the
    # hub writes
    try:
        end = await _cancel.recorded_end(bus, here.task)
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read how task {task_id} ended: {exc}") from None
    kept = end.task if isinstance(end, Failed) else None
    if kept is not None and kept.id == task_id and kept.provider == here.provider:
        return kept
    raise NotReplayable(
        f"the message of task {task_id} has left the {names.tasks_stream} stream, and what the task asked "
        "went with it: submit it again"
    )


async def purge(bus: Bus, *, task_id: str | None = None, provider: str | None = None) -> int:
    """Remove dead letters: one task's, one provider's, or all; returns how many went."""
    names = bus.names
    check_provider(provider)
    if task_id is not None:
        await dead_letter(bus, task_id)  # checks the id, and that it is there
        subject = names.dead_letters_of(task_id)
    else:
        subject = names.dlq_subject(provider, ">") if provider else names.all_dlq
    gone = 0
    try:
        for stream in await streams(bus, None if task_id else provider):
            before = (await bus.js.stream_info(stream)).state.messages
            await bus.js.purge_stream(stream, subject=subject)
            gone += before - (await bus.js.stream_info(stream)).state.messages
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not purge dead letters: {exc}") from None
    return gone
