"""What happens when a deadline's timer fires (``hive_bus._timers`` sets it): the task expires.

:class:`Timers` runs in every gateway, on one durable consumer (``<prefix>_timers``) that they share. A
fired deadline is taken at its word only as far as the bus agrees: the task must be known (its
``queued`` event), the timer must be for its current run, and the run's deadline as the bus records it
must have passed. Then the task is told to stop (its key in the cancels bucket, which the workers of its
provider watch: one that fetches it drops it, one that runs it abandons the call) and failed with reason
``expired``: a ``failed`` event with the run's final de-duplication id (``Task.final_msg_id``), so that
it and a worker's outcome cannot both be recorded, and a dead letter when that event is the task's end.
An expiry for a task that ended meanwhile is dropped. A worker credential may neither publish nor read
the schedules stream (``nats/``), so no worker can forge or delay a deadline.
"""

from __future__ import annotations

import contextlib
import logging

import anyio
import msgspec
import nats.aio.msg
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, Header
from prometheus_client import CollectorRegistry, Counter

from . import _assigned, _cancel, _dlq, _redact
from ._bus import Bus, ensure_events
from ._client import Hive
from ._errors import BusUnavailable, HiveError, QueueFull, TooLarge
from ._messages import Failed, Task, encoder, now_ms
from ._messages import TaskStatus as Status
from ._nats import BUS_ERRORS, handle_each
from ._schedules import Schedules, run_task_id, template_for
from ._size import check_fits, js_publish
from ._timers import DeadlineTimer, RecurringTimer, StartTimer, ensure_schedules_stream, timer_decoder

log = logging.getLogger("hive_bus.expiry")

FETCH_WAIT_S = 2.0


class Timers:
    """The gateway's reader of fired timers: ``await tg.start(timers.run)``."""

    def __init__(self, bus: Bus, hive: Hive | None = None, registry: CollectorRegistry | None = None) -> None:
        self._bus = bus
        self._hive = hive  # submits the tasks of recurring schedules; without it, they wait for a gateway
        self._schedules: Schedules | None = None
        # counted where the firing is read (each is read by one gateway): Prometheus sums the gateways
        self._firings = Counter(
            "hive_schedule_firings",
            "Firings of recurring schedules turned into tasks by this gateway, by schedule id",
            ["schedule"],
            registry=registry or CollectorRegistry(),
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        bus, names = self._bus, self._bus.names
        await ensure_schedules_stream(bus.js, bus.settings)
        config = ConsumerConfig(
            durable_name=names.timers,
            description="hive-bus gateways: fired timers (deadlines)",
            filter_subject=names.all_fired,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
        )
        sub = await bus.js.pull_subscribe(
            names.all_fired, durable=names.timers, stream=names.schedules_stream, config=config
        )
        task_status.started()
        await handle_each(sub, self._settle, what="fired timers", wait_s=FETCH_WAIT_S, log=log)

    async def _settle(self, msg: nats.aio.msg.Msg) -> None:
        try:
            timer = timer_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("timers: a fired timer on %s does not decode (%s); dropped", msg.subject, exc)
            with contextlib.suppress(*BUS_ERRORS):
                await msg.term()
            return
        try:
            if isinstance(timer, StartTimer):
                later_s = await start(self._bus, timer)
            elif isinstance(timer, RecurringTimer):
                later_s = await self._fire(msg, timer)
            else:
                later_s = await expire(self._bus, timer)
        except (*BUS_ERRORS, BusUnavailable, QueueFull) as exc:  # the bus, not this timer: again soon
            log.warning("timers: the timer on %s not handled yet (%s); again soon", msg.subject, exc)
            with contextlib.suppress(*BUS_ERRORS):
                await msg.nak(delay=2.0)
            return
        except Exception as exc:  # one timer's fault: it must not stop the reader, nor come back forever
            # a message naming the cause, not the task's content (a template's prompt may hold secrets)
            log.error(
                "timers: the timer on %s failed for good (%s); dropped",
                msg.subject, _redact.scrub(f"{type(exc).__name__}: {exc}"),
            )  # fmt: skip
            with contextlib.suppress(*BUS_ERRORS):
                await msg.term()
            return
        with contextlib.suppress(*BUS_ERRORS):
            if later_s is not None:
                await msg.nak(delay=later_s)  # fired early by this clock: back at the deadline
            else:
                await msg.ack()

    async def _fire(self, msg: nats.aio.msg.Msg, timer: RecurringTimer) -> float | None:
        """A recurring schedule fired: its task submitted (once, however often this firing is read)."""
        if self._hive is None:
            return 5.0  # a reader without a client: left for a gateway's
        if self._schedules is None:
            self._schedules = await Schedules.open(self._bus)
        schedule = await self._schedules.current(timer.schedule_id)
        if schedule is None or schedule.paused:
            return None  # deleted or paused since: this firing submits nothing
        meta = msg.metadata
        fired_ms = int(meta.timestamp.timestamp() * 1000) if meta.timestamp else now_ms()
        task_id = run_task_id(schedule.id, meta.sequence.stream, fired_ms)
        request = template_for(schedule, task_id, meta.sequence.stream)
        [outcome] = await self._hive.submit_batch([request], task_ids=[task_id])
        if isinstance(outcome, HiveError):
            raise outcome
        next_at = (msg.headers or {}).get(Header.SCHEDULE_NEXT.value)
        await self._schedules.fired(schedule.id, task_id, fired_ms, next_at)
        self._firings.labels(schedule.id).inc()
        log.info("schedule %s fired: task %s", schedule.id, task_id)
        return None


async def start(bus: Bus, timer: StartTimer) -> float | None:
    """Queue the task of a fired ``not_before`` as the bus records it, unless it ended meanwhile
    (cancelled, or expired): its task message, as it goes on the queue (no ``not_before`` left; the
    tasks stream's marker of it is its ``queued`` event, and its status reads ``queued``), with a
    de-duplication id so that a firing read twice queues it once. The seconds to wait first when this clock reads the time
    as not yet come, else None."""
    names = bus.names
    here = await _assigned.assignment(bus, timer.task_id)
    if here is None:
        log.warning("timers: a start for task %s is refused: the bus knows no such task", timer.task_id)
        return None
    task = here.task
    if task.run != timer.run:
        return None
    view = await _assigned.current_view(bus, task.id)
    if view is not None and view.done:
        return None  # cancelled or expired before its time
    if task.not_before is not None:
        left_ms = (task.not_before_ms or 0) - now_ms()
        if left_ms > 0:
            return left_ms / 1000 + 0.05
        task = msgspec.structs.replace(task, not_before=None)
    elif now_ms() - here.event.at_ms > bus.settings.duplicate_window_s * 1000:
        return None  # queued long ago: a publish now would no longer be recognised as the same
    await js_publish(
        bus.js, bus.nc, names.task_subject(task.provider, task.priority, task.id), encoder.encode(task),
        headers={"Nats-Msg-Id": task.msg_id}, stream=names.tasks_stream, what="task", expect=False,
    )  # fmt: skip
    log.info("task %s queued on %s: its not_before came", task.id, task.provider)
    return None


async def expire(bus: Bus, timer: DeadlineTimer) -> float | None:
    """Fail the task of a fired deadline as ``expired``, if the bus agrees it is due; the seconds to
    wait first when this clock reads the deadline as not yet reached, else None (done with it)."""
    here = await _assigned.assignment(bus, timer.task_id)
    if here is None:
        log.warning("timers: a deadline for task %s is refused: the bus knows no such task", timer.task_id)
        return None
    task = here.task
    if task.run != timer.run or task.deadline_at_ms is None:
        return None  # a timer of an earlier run (replayed since), or of no deadline the bus knows
    left_ms = task.deadline_at_ms - now_ms()
    if left_ms > 0:
        return left_ms / 1000 + 0.05
    view = await _assigned.current_view(bus, task.id)
    if view is not None and view.done:
        await _keep_letter(bus, task, view.reason)  # an expiry recorded before its timer came again
        return None
    error = f"its deadline passed ({task.deadline_s:g}s after submission) before it ended"
    was = view.status if view is not None else None
    if await record_expired(bus, task, attempt=view.attempt if view else 0, error=error, was=was):
        log.info("task %s expired: its deadline passed before it ended", task.id)
        await _cancel.ended(bus, here, was)
    return None


async def record_expired(
    bus: Bus, task: Task, *, attempt: int, error: str, was: Status | None = None
) -> bool:
    """Fail ``task`` (as the bus has it queued now) with reason ``expired``: its key in the cancels
    bucket first (a worker that fetches it drops it, one running it abandons the call), then its
    ``failed`` event with the run's final de-duplication id, then its dead letter. False when an
    outcome was recorded first (or another gateway expired it a moment ago). ``was``: a deadline's
    expiry, the status the task was in (``queued`` is counted off the queue's depth by the caller)."""
    names = bus.names
    event = Failed(
        task_id=task.id, provider=task.provider, at_ms=now_ms(), attempt=attempt, worker=None,
        reason="expired", error=error, task=task, was=was,
    )  # fmt: skip
    data = encoder.encode(event)
    headers = {"Nats-Msg-Id": task.final_msg_id}
    stream = names.events_stream_of(task.provider)
    await ensure_events(bus, task.provider)  # a provider none of whose work was queued here yet
    try:
        check_fits(bus.nc, data, {**headers, "Nats-Expected-Stream": stream})
    except TooLarge:  # a task from before the claim check: its queued event keeps it
        data = encoder.encode(msgspec.structs.replace(event, task=None))
    await bus.cancels_kv.put(names.cancel_key(task.provider, task.id), data)
    ack = await js_publish(
        bus.js, bus.nc, names.event_subject(task.provider, task.id, "failed"), data,
        headers=headers, stream=stream, what="failed event",
    )  # fmt: skip
    if ack.duplicate:
        return False
    await _dlq.keep(bus, task.provider, task.id, data, task.sealed(f"{task.id}:dlq:{task.run}"))
    return True


async def _keep_letter(bus: Bus, task: Task, reason: str | None) -> None:
    """The dead letter of an expiry already recorded (a gateway stopped between the two), kept once."""
    if reason != "expired":
        return
    names = bus.names
    try:
        raw = await bus.js.get_last_msg(
            names.events_stream_of(task.provider),
            names.event_subject(task.provider, task.id, "failed"),
            direct=True,
        )
    except (nats.js.errors.NotFoundError, nats.errors.NoRespondersError):
        return
    await _dlq.keep(bus, task.provider, task.id, raw.data or b"", task.sealed(f"{task.id}:dlq:{task.run}"))
