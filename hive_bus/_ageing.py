"""Tasks that have waited in the queue nearly as long as the bus keeps tasks: failed ``expired``, never
dropped unseen.

The tasks stream keeps each task message for ``HIVE_EVENTS_MAX_AGE_S`` (its ``max_age``, as long as the
events), acked or not: a task that no worker has taken by then would leave the stream, and its
``queued`` marker with it, and nothing would say it was ever accepted. Before that happens, the gateway's
store audit (:class:`hive_bus._audit.StoreAudit`, every ``audit_every_s``) fails each such task with
reason ``expired`` as a fired deadline does (:mod:`hive_bus._expiry`): its key in the cancels bucket, so
a worker that fetches it later drops it; a ``failed`` event with the run's final de-duplication id, so it
and a worker's outcome cannot both be recorded; and a dead letter that keeps the task, from where
``hive dlq replay`` queues it again.

Where it looks: for each provider, from the lowest ack floor of its consumers (everything before it was
acked: ended or moved) forward through the messages older than the cut-off, one direct get each
(``next_by_subj``). It remembers how far it has read, so each message is looked at about once.

A task cancelled while queued, or expired at its deadline while queued, is counted among its queue's
ended tasks until a worker fetches its message and lets it go (:mod:`hive_bus._cancel`): the queue's
depth is the consumers' pending count less that count. A message that no worker fetches would leave
the stream by age while the count kept it, one too many for good, and the depth would hide a task
queued later. The sweep takes such a message out instead, when no worker was ever handed it (it is
past the sequence its consumer delivered up to): it deletes it and takes it off the count, with the
de-duplication id that a worker's fetch uses, so that a fetch at the same moment counts once. The
message of a task this sweep expires, which no worker was handed, goes at once (not counted, it leaves
the depth with its message). The task's events say how it ended; what it asked goes with its message,
a little before its age would have taken it. An expired task stays replayable: its expiry, in the
cancels bucket (which only the hub writes), keeps the task, and a replay whose task message is gone
reads it there (:mod:`hive_bus._dlq`).

The stream keeps the finished tasks too, as history, within its limits (``HIVE_TASKS_MAX_MSGS`` and
``_BYTES``, discard-new so that nothing accepted is dropped): a bus that finishes more tasks in a week
than those hold (a million: 1.7 a second) would refuse every submission (503 ``queue_full``) with nothing
waiting, until the oldest aged out. Past :data:`TRIM_AT` of either limit, the sweep lets the older half
of the finished history go (:meth:`Ageing.trim`): of each queue, only messages up to its consumer's ack
floor, every one of which a worker acked (ended, or moved on). Such a task is still read from its
``queued`` event, as one whose message aged out.
"""

from __future__ import annotations

import logging
import time

import msgspec
import nats.js.errors

from . import _assigned, _cancel
from ._bus import Bus, consumer_infos
from ._counts import submitted_counts
from ._expiry import record_expired
from ._messages import Failed, Task, task_decoder
from ._nats import delete_message
from ._settings import wait_limit_s
from ._stats import queue_marks

log = logging.getLogger("hive_bus.ageing")

# at most this many tasks failed per provider and sweep: a backlog is taken over a few sweeps
MAX_PER_SWEEP = 1000
# the share of the tasks stream's message or byte limit past which the older finished history goes
TRIM_AT = 0.75


class Ageing:
    """The sweep; :meth:`sweep` once per audit."""

    def __init__(self, bus: Bus, *, every_s: float) -> None:
        self._bus = bus
        self.limit_s = wait_limit_s(bus.settings.events_max_age_s, every_s)
        self._read_to: dict[str, int] = {}  # provider -> the next sequence to look at
        self.expired_total = 0
        self.taken_out_total = 0  # messages of tasks ended while queued, taken out unfetched

    async def sweep(self) -> list[str]:
        """Fail every task that has waited past :attr:`limit_s`; their ids."""
        bus = self._bus
        floors, delivered = await queue_marks(bus)
        cutoff_s = time.time() - self.limit_s
        expired: list[str] = []
        for provider in sorted(set(floors) | set(await submitted_counts(bus))):
            start = max(floors.get(provider, 0) + 1, self._read_to.get(provider, 1))
            expired += await self._sweep_provider(provider, start, cutoff_s, delivered)
        self.expired_total += len(expired)
        if expired:
            log.warning(
                "%d task(s) waited in the queue longer than %.0fs (the bus keeps tasks %.0fs): failed "
                "'expired' and dead-lettered (e.g. %s); `hive dlq replay <id>` queues one again",
                len(expired), self.limit_s, bus.settings.events_max_age_s, ", ".join(expired[:5]),
            )  # fmt: skip
        return expired

    async def trim(self) -> int:
        """Past :data:`TRIM_AT` of the tasks stream's limits, purge of each queue the acked messages of
        the stream's older half; how many went."""
        bus, stream = self._bus, self._bus.names.tasks_stream
        info = await bus.js.stream_info(stream)
        limits, state = info.config, info.state
        if not (
            0 < (limits.max_msgs or 0) * TRIM_AT < state.messages
            or 0 < (limits.max_bytes or 0) * TRIM_AT < state.bytes
        ):
            return 0
        half = state.first_seq + (state.last_seq - state.first_seq) // 2
        for consumer in await consumer_infos(bus, stream):
            floor = (consumer.ack_floor.stream_seq if consumer.ack_floor else 0) or 0
            queue = consumer.config.filter_subject
            if bus.names.of_consumer(consumer.name) is not None and queue and min(floor, half) > 0:
                await bus.js.purge_stream(stream, subject=queue, seq=min(floor, half) + 1)
        gone = max(0, state.messages - (await bus.js.stream_info(stream)).state.messages)
        log.info(
            "the tasks stream held %d messages, %d bytes, past %.0f%% of its limits: %d of its oldest "
            "finished tasks let go", state.messages, state.bytes, TRIM_AT * 100, gone,
        )  # fmt: skip
        return gone

    async def _sweep_provider(
        self, provider: str, start: int, cutoff_s: float, delivered: dict[tuple[str, str], int]
    ) -> list[str]:
        bus, names = self._bus, self._bus.names
        subject = names.task_subject(provider, "*", "*")
        expired: list[str] = []
        seq = start
        while len(expired) < MAX_PER_SWEEP:
            try:
                raw = await bus.js.get_msg(
                    names.tasks_stream, seq=seq, subject=subject, next=True, direct=True
                )
            except nats.js.errors.NotFoundError:
                break  # nothing more of this provider
            if raw.seq is None or raw.time is None or raw.time.timestamp() > cutoff_s:
                break  # the rest are younger
            seq = raw.seq + 1
            self._read_to[provider] = seq
            try:
                task = task_decoder.decode(raw.data or b"")
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                continue  # poison: the workers terminate it
            handed = raw.seq <= delivered.get((provider, task.priority), 0)  # to a worker, ever
            if await self._expire(provider, task):
                expired.append(task.id)
                end = await _cancel.recorded_end(bus, task)
                if not handed and isinstance(end, Failed) and end.task is not None:  # kept for a replay
                    await self._take_out(task, raw.seq, counted=False)
            elif not handed and _cancel.counted_for(await _cancel.recorded_end(bus, task), task):
                await self._take_out(task, raw.seq)
        return expired

    async def _expire(self, provider: str, task: Task) -> bool:
        """Fail one task that waited too long, if the bus has it waiting on ``provider`` in this run."""
        bus = self._bus
        here = await _assigned.assignment(bus, task.id)
        if here is None or here.task.provider != provider or here.task.run != task.run:
            return False  # moved on, or replayed since: this message is not its queue place
        view = await _assigned.current_view(bus, task.id)
        if view is not None and view.done:
            return False  # it ended: a worker drops its message, or it is taken out, or it ages out
        error = (
            f"it waited in the queue longer than {self.limit_s:.0f}s, and the bus keeps a task "
            f"{bus.settings.events_max_age_s:.0f}s (HIVE_EVENTS_MAX_AGE_S): no worker of {provider} took it"
        )
        return await record_expired(bus, here.task, attempt=view.attempt if view else 0, error=error)

    async def _take_out(self, task: Task, seq: int, *, counted: bool = True) -> None:
        """Delete the message of a task that ended while queued, which no worker was handed: cancelled
        or expired at its deadline (``counted`` among its queue's ended tasks, and taken off that
        count), or expired by this sweep (not counted: it leaves the depth with its message)."""
        bus = self._bus
        if not await delete_message(bus.js, bus.names.tasks_stream, seq):
            return  # gone already (its age, or another gateway's sweep): the count is that one's to mend
        if counted:
            await _cancel.fetched(bus, task)
        self.taken_out_total += 1
        log.info("task %s, ended while queued and never fetched, taken out of the queue", task.id)
