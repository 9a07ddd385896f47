"""Upgrades of a bus made by an older hive-bus: a work-queue tasks stream (buses before one stored write
per submission) made a limits one; one events stream of every provider (buses before events were kept per
provider) split into one stream per provider (:func:`split_shared_events`).

The tasks stream's upgrade:

nats-server cannot change a stream's retention to or from work-queue in place, so the upgrade makes the
stream again, in steps that an interrupted upgrade resumes from at the next start of any process that
declares the bus (a worker's credential may not: it is told to start the gateway first):

1. every message of the old stream is copied to ``<PREFIX>_TASKS_UPGRADE`` on
   ``<prefix>.tasks_upgrade.<provider>.<priority>`` (a copy cut short is purged and made again: the old
   stream still holds every task);
2. the old stream is deleted (its consumers with it; they are made again as before, on first use);
3. the tasks stream is made anew, without its RePublish (a task put back already has its ``queued``
   event, with its body), and every copied task is published back on
   ``<prefix>.tasks.<provider>.<priority>.<task id>`` with its de-duplication id, unless a message of
   that task is there already (a put-back cut short; the stream then takes this start's limits, so that
   one cut short by them goes on once they are raised);
4. the RePublish is turned on, and the copy deleted.

A message that does not decode as a task is put back all the same (on a task id token made from its
place, ``undecodable-<seq>``): its workers set it aside as poison, as they would have.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from ._bus import drain_parked, ensure_events_stream, tasks_stream_config, webhooks_consumer_config
from ._errors import BusConfigError
from ._messages import FINAL_STATUSES, Task, task_decoder
from ._names import is_valid_token
from ._settings import Settings

log = logging.getLogger("hive_bus.upgrade")

_MSG_ID = "Nats-Msg-Id"
_EXPECTED = "Nats-Expected-"  # a publish's conditions (stream, last sequence...), not part of the message


async def upgrade_tasks_stream(js: JetStreamContext, settings: Settings) -> None:
    """Upgrade the bus's tasks stream if it is a work-queue one, or finish an upgrade cut short; nothing
    when it is already a limits one (or missing). Raises :class:`BusConfigError` for a worker (it may
    not) and when a step fails."""
    names = settings.names
    info = await _info(js, names.tasks_stream)
    old = info is not None and info.config.retention == RetentionPolicy.WORK_QUEUE
    # a worker's credential may look at the tasks stream alone: a copy left by an upgrade cut short is
    # the gateway's to finish (the worker finds the stream missing, or made again, meanwhile)
    copy = None if settings.worker_name else await _info(js, names.upgrade_stream)
    if not old and copy is None:
        if info is not None and info.config.republish is None and _ours(info.config, settings):
            await js.update_stream(tasks_stream_config(settings))  # the last step of one cut short
        return
    if settings.worker_name:
        raise BusConfigError(
            f"stream {names.tasks_stream} is a work-queue stream of an older hive-bus (or its upgrade was "
            "cut short): start the gateway (`hive gateway`, `hive up`, or `hive upgrade`) once, which "
            "upgrades it, then start this worker"
        )
    try:
        if old:
            await _copy_out(js, settings)
            await js.delete_stream(names.tasks_stream)
            log.warning(
                "upgrade: the work-queue stream %s is deleted; putting its tasks back", names.tasks_stream
            )
            info = None
        if info is None:
            await js.add_stream(tasks_stream_config(settings, republish=False))
        else:  # made by an upgrade cut short: with this start's limits (raised, if they cut it short)
            await js.update_stream(tasks_stream_config(settings, republish=False))
        back = await _put_back(js, settings)
        await js.update_stream(tasks_stream_config(settings))
        await js.delete_stream(names.upgrade_stream)
    except nats.js.errors.APIError as exc:
        raise BusConfigError(
            f"stream {names.tasks_stream} could not be upgraded from work-queue to limits retention: "
            f"{exc.description}. Its tasks are kept in {names.upgrade_stream} (if it exists) or in it; "
            "start the gateway again to go on (with HIVE_TASKS_MAX_MSGS and HIVE_TASKS_MAX_BYTES that "
            "hold them all, if the stream was full)"
        ) from None
    log.warning("upgrade: %s is a limits stream now; %d queued tasks were put back", names.tasks_stream, back)


def _ours(have: StreamConfig, settings: Settings) -> bool:
    """Whether a tasks stream without its RePublish is one an upgrade made (else it is refused by what
    differs, as any stream is)."""
    want = tasks_stream_config(settings)
    return (have.retention, have.discard, have.subjects) == (want.retention, want.discard, want.subjects)


async def _info(js: JetStreamContext, stream: str) -> nats.js.api.StreamInfo | None:
    try:
        return await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return None


async def _copy_out(js: JetStreamContext, settings: Settings) -> None:
    names = settings.names
    config = StreamConfig(
        name=names.upgrade_stream,
        description="hive-bus: the tasks of a work-queue tasks stream, kept while it is upgraded",
        subjects=[names.upgrade_subjects],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        num_replicas=settings.replicas,
    )
    if await _info(js, names.upgrade_stream) is None:
        await js.add_stream(config)
    else:
        await js.purge_stream(names.upgrade_stream)  # a copy cut short: made again whole
    tasks_prefix = f"{names.prefix}.tasks."
    copied = 0
    async for subject, headers, data in _messages(js, settings, names.tasks_stream):
        rest = subject[len(tasks_prefix) :] if subject.startswith(tasks_prefix) else "unknown.normal"
        await js.publish(
            f"{names.prefix}.tasks_upgrade.{rest}", data, headers=headers or None, stream=names.upgrade_stream
        )
        copied += 1
    log.warning("upgrade: %d tasks of %s copied to %s", copied, names.tasks_stream, names.upgrade_stream)


async def _put_back(js: JetStreamContext, settings: Settings) -> int:
    names = settings.names
    copy_prefix = f"{names.prefix}.tasks_upgrade."
    back = 0
    seq = 0
    async for subject, headers, data in _messages(js, settings, names.upgrade_stream):
        seq += 1
        tokens = subject[len(copy_prefix) :].split(".")
        provider, priority = ([*tokens, "normal"])[:2] if tokens and tokens[0] else ("unknown", "normal")
        try:
            task: Task | None = task_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            task = None
        task_id = task.id if task is not None and _is_token(task.id) else f"undecodable-{seq}"
        msg_id = (headers or {}).get(_MSG_ID) or (task.msg_id if task is not None else f"upgrade:{seq}")
        try:
            await js.get_last_msg(names.tasks_stream, names.tasks_of(task_id), direct=True)
            continue  # put back before an interruption
        except nats.js.errors.NotFoundError:
            pass
        await js.publish(
            names.task_subject(provider, priority, task_id),
            data,
            headers={**(headers or {}), _MSG_ID: msg_id},
            stream=names.tasks_stream,
        )
        back += 1
    return back


def _is_token(text: str) -> bool:
    return bool(text) and not any(c in text for c in " .*>\t\r\n")


async def _messages(
    js: JetStreamContext, settings: Settings, stream: str
) -> AsyncIterator[tuple[str, dict[str, str], bytes]]:
    """Every message of ``stream`` in order: subject, headers (the server's own left out), body. Read
    by message gets (a work-queue stream allows no second consumer beside its workers'); an upgrade
    is done once."""
    info = await _info(js, stream)
    if info is None or not info.state.messages or not info.config.subjects:
        return
    seq = info.state.first_seq
    while seq <= info.state.last_seq:
        try:
            raw = await js.get_msg(stream, seq=seq, subject=info.config.subjects[0], next=True)
        except nats.js.errors.NotFoundError:
            return  # none after seq
        seq = (raw.seq or seq) + 1
        headers = {k: v for k, v in (raw.headers or {}).items() if not k.startswith("Nats-") or k == _MSG_ID}
        yield raw.subject or "", headers, raw.data or b""


# -- one events stream per provider ------------------------------------------------------------------


async def split_shared_events(js: JetStreamContext, settings: Settings) -> None:
    """Move the events of a bus made before they were kept per provider (one ``<PREFIX>_EVENTS`` on
    ``<prefix>.events.>``) into each provider's ``<PREFIX>_EVENTS_<provider>``, in order, then delete
    the shared stream. The shared stream is first given a subject nobody publishes on (its messages
    keep theirs), so that the providers' streams can take ``<prefix>.events.<provider>.>``; each event
    is deleted from it once copied, so a split cut short goes on at the next start where it stopped
    (an event copied and not yet deleted is copied again under its de-duplication id: once). An event
    keeps its headers (a ``queued`` marker's name the task message it stands for) and its body; its
    time in the new stream is the split's. Nothing happens when no such stream exists, or for a worker's
    credential (it may not: it waits for its provider's stream, which the gateway makes)."""
    names = settings.names
    if settings.worker_name:
        return  # it may not look: it finds its provider's events stream missing, and waits for it
    info = await _info(js, names.events_stream)
    if info is None:
        return
    try:
        if info.config.subjects != [names.shared_events_parked]:
            info.config.subjects = [names.shared_events_parked]
            await js.update_stream(info.config)
        announced = await _announced_up_to(js, settings)
        moved, left, unannounced = await _move_events(js, settings, names.events_stream, announced)
        if announced is not None:
            await _keep_webhooks_place(js, settings, unannounced)
        if left:
            log.warning(
                "upgrade: %d messages of %s name no provider; they stay there (read them with "
                "`nats stream view %s`)", left, names.events_stream, names.events_stream,
            )  # fmt: skip
        else:
            await js.delete_stream(names.events_stream)
    except nats.js.errors.NotFoundError:
        return  # another process split it meanwhile
    except nats.js.errors.APIError as exc:
        raise BusConfigError(
            f"stream {names.events_stream} (every provider's events, as buses before this version kept "
            f"them) could not be split into one stream per provider: {exc.description}. Its events are "
            "still there; start the gateway again to go on, or free the room the new streams need"
        ) from None
    log.warning("upgrade: %d events of %s moved into one stream per provider", moved, names.events_stream)


async def _announced_up_to(js: JetStreamContext, settings: Settings) -> int | None:
    """Where the webhooks' durable consumer of the shared stream is (every final event up to this
    sequence has had its deliveries queued); None when webhooks never ran on this bus."""
    names = settings.names
    try:
        info = await js.consumer_info(names.events_stream, names.webhook_events_consumer)
    except nats.js.errors.NotFoundError:
        return None
    return info.ack_floor.stream_seq if info.ack_floor and info.ack_floor.stream_seq else 0


async def _keep_webhooks_place(
    js: JetStreamContext, settings: Settings, unannounced: dict[str, int | None]
) -> None:
    """The webhooks' durable consumer on each provider's stream that events were moved into, from the
    first final event whose deliveries were not queued yet (``unannounced``: by provider, its sequence
    in the new stream, or None for none), or from the stream's end (a stream no event was moved into
    is newer than the webhooks, and they read it from its start): what the webhooks had not announced before the split they announce after it.
    (Two processes that split the same bus at once each make it from what they moved; the first made
    stays, so an event moved by the other may be announced late or not: only then, on an old bus.)"""
    names = settings.names
    for provider, start in unannounced.items():
        stream = names.events_stream_of(provider)
        if start is None:
            start = (await js.stream_info(stream)).state.last_seq + 1
        config = webhooks_consumer_config(settings, provider, start_seq=start)
        with contextlib.suppress(nats.js.errors.BadRequestError):  # another process made it first
            await js.add_consumer(stream, config)


async def _move_events(
    js: JetStreamContext, settings: Settings, stream: str, announced: int | None
) -> tuple[int, int, dict[str, int | None]]:
    """Each event of ``stream`` published again to its provider's stream, in order: how many were, how
    many name no provider (left where they are), and by provider moved into, the new sequence of the
    first final event after ``announced`` (the webhooks' place in the shared stream), or None."""
    names = settings.names
    ensured: set[str] = set()
    unannounced: dict[str, int | None] = {}
    count = 0

    async def move(msg: Msg) -> bool:
        nonlocal count
        tokens = msg.subject.split(".")
        provider = tokens[2] if len(tokens) >= 5 and tokens[1] == "events" else ""
        if not is_valid_token(provider):
            return False
        if provider not in ensured:
            await ensure_events_stream(js, settings, provider)
            ensured.add(provider)
            unannounced.setdefault(provider, None)
        seq = msg.metadata.sequence.stream
        # a marker carries its task message's headers, the conditions of that publish among them
        # (``Nats-Expected-Last-Subject-Sequence``): the copy is not held to them, and is de-duplicated
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith(_EXPECTED)}
        headers["Nats-Msg-Id"] = headers.get("Nats-Msg-Id") or f"split:{seq}"
        ack = await js.publish(
            msg.subject, msg.data, headers=headers, stream=names.events_stream_of(provider)
        )
        if announced is not None and seq > announced and tokens[-1] in FINAL_STATUSES:
            unannounced[provider] = unannounced[provider] or ack.seq
        count += 1
        if count % 50_000 == 0:
            log.warning("upgrade: %d events of %s moved so far", count, stream)
        return True

    moved, left_behind = await drain_parked(js, settings, stream, move)
    return moved, left_behind, unannounced
