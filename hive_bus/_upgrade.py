"""Upgrade a work-queue tasks stream (buses before one stored write per submission) to the limits one.

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
   that task is there already (a put-back cut short);
4. the RePublish is turned on, and the copy deleted.

A message that does not decode as a task is put back all the same (on a task id token made from its
place, ``undecodable-<seq>``): its workers set it aside as poison, as they would have.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from ._bus import tasks_stream_config
from ._errors import BusConfigError
from ._messages import Task, task_decoder
from ._settings import Settings

log = logging.getLogger("hive_bus.upgrade")

_MSG_ID = "Nats-Msg-Id"


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
        back = await _put_back(js, settings)
        await js.update_stream(tasks_stream_config(settings))
        await js.delete_stream(names.upgrade_stream)
    except nats.js.errors.APIError as exc:
        raise BusConfigError(
            f"stream {names.tasks_stream} could not be upgraded from work-queue to limits retention: "
            f"{exc.description}. Its tasks are kept in {names.upgrade_stream} (if it exists) or in it; "
            "start the gateway again to go on"
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
