"""Timers kept by the server: a task's deadline as a JetStream message schedule.

A task with ``deadline_s`` is submitted together with a one-shot schedule (nats-server 2.12+, ADR-51): a
message on ``<prefix>.schedule.deadline.<task id>`` in the ``<PREFIX>_SCHEDULES`` stream (made with
``allow_msg_schedules``) whose headers say ``Nats-Schedule: @at <deadline, RFC 3339>`` and
``Nats-Schedule-Target: <prefix>.fired.deadline.<task id>``. At that time the server stores the
message's body on the target and removes the schedule; nothing in a process has to stay alive for it.
The timer costs a publish only to tasks that have a deadline, and it goes out in the same write as the
task (``JetStreamPublisher.publish``). What the gateway does with a fired one: ``hive_bus._expiry``.
"""

from __future__ import annotations

import datetime

import msgspec
import nats.aio.msg
import nats.errors
import nats.js.errors
from nats.js.api import (
    DiscardPolicy,
    Header,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext

from ._bus import _ensure_stream
from ._errors import BusUnavailable
from ._messages import Task, encoder
from ._publish import Publish
from ._settings import Settings

# A fired message is kept this long after it fires (its own TTL), however long the gateways are away.
FIRED_TTL = "168h"


class DeadlineTimer(msgspec.Struct, frozen=True, kw_only=True, tag="deadline.v1", tag_field="type"):
    """The body of a deadline's schedule, stored again by the server when it fires."""

    task_id: str
    run: int = 0
    at_ms: int


class StartTimer(msgspec.Struct, frozen=True, kw_only=True, tag="start.v1", tag_field="type"):
    """The body of a ``not_before``'s schedule: when it fires, the gateway queues the task as the bus
    records it (never a copy the timer could carry)."""

    task_id: str
    run: int = 0
    at_ms: int


class RecurringTimer(msgspec.Struct, frozen=True, kw_only=True, tag="recurring.v1", tag_field="type"):
    """The body of a recurring schedule's timer (hive_bus._schedules): which schedule fired."""

    schedule_id: str


Timer = DeadlineTimer | StartTimer | RecurringTimer
timer_decoder = msgspec.json.Decoder(Timer)


def schedules_stream_config(settings: Settings) -> StreamConfig:
    names = settings.names
    return StreamConfig(
        name=names.schedules_stream,
        description="hive-bus timers: message schedules (deadlines) and their firings",
        subjects=[names.all_schedules, names.all_fired],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        # no max_age: a definition must outlive any age limit; each firing carries its own TTL instead.
        # The server refuses discard-new with schedules: a full stream would drop its oldest timers,
        # so it is sized far above the timers pending (a dropped deadline still holds at a worker's fetch).
        discard=DiscardPolicy.OLD,
        max_bytes=settings.schedules_max_bytes,
        duplicate_window=settings.duplicate_window_s,
        allow_msg_schedules=True,
        allow_msg_ttl=True,
        num_replicas=settings.replicas,
    )


async def ensure_schedules_stream(js: JetStreamContext, settings: Settings) -> None:
    """Create the timers' stream if missing, or check it. Made by whoever first needs it (a submitter of
    a task with a deadline, or the gateway): never by a worker, whose credential may not see it."""
    try:
        await _ensure_stream(js, schedules_stream_config(settings))
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise BusUnavailable(
            f"JetStream did not answer while declaring {settings.names.schedules_stream}: {exc}"
        ) from None


def rfc3339(at_ms: int) -> str:
    """A time in epoch milliseconds as the server's ``@at`` reads it (UTC, millisecond precision)."""
    at = datetime.datetime.fromtimestamp(at_ms / 1000, tz=datetime.UTC)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def deadline_schedule(settings: Settings, task: Task) -> tuple[Publish, dict[str, str]] | None:
    """The publish that sets ``task``'s deadline timer and its schedule headers; None without a
    deadline. De-duplicated per run, and one per task in the stream (a new run's replaces the last)."""
    at_ms = task.deadline_at_ms
    if at_ms is None:
        return None
    names = settings.names
    body = encoder.encode(DeadlineTimer(task_id=task.id, run=task.run, at_ms=at_ms))
    publish: Publish = (
        names.schedule_subject("deadline", task.id),
        body,
        f"{task.id}:deadline:{task.run}",
        names.schedules_stream,
    )
    headers = {
        Header.SCHEDULE.value: f"@at {rfc3339(at_ms)}",
        Header.SCHEDULE_TARGET.value: names.fired_subject("deadline", task.id),
        Header.SCHEDULE_TTL.value: FIRED_TTL,
    }
    return publish, headers


def start_schedule(settings: Settings, task: Task) -> tuple[Publish, dict[str, str]] | None:
    """The publish that queues ``task`` at its ``not_before`` (instead of the task message), and its
    schedule headers; None for a task to queue now."""
    at_ms = task.not_before_ms
    if at_ms is None:
        return None
    names = settings.names
    body = encoder.encode(StartTimer(task_id=task.id, run=task.run, at_ms=at_ms))
    publish: Publish = (
        names.schedule_subject("start", task.id),
        body,
        f"{task.id}:start:{task.run}",
        names.schedules_stream,
    )
    headers = {
        Header.SCHEDULE.value: f"@at {rfc3339(at_ms)}",
        Header.SCHEDULE_TARGET.value: names.fired_subject("start", task.id),
        Header.SCHEDULE_TTL.value: FIRED_TTL,
    }
    return publish, headers
