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
"""

from __future__ import annotations

import logging
import time

import msgspec
import nats.js.errors

from . import _assigned
from ._bus import Bus
from ._counts import submitted_counts
from ._expiry import record_expired
from ._messages import task_decoder
from ._stats import ack_floors

log = logging.getLogger("hive_bus.ageing")

# at most this many tasks failed per provider and sweep: a backlog is taken over a few sweeps
MAX_PER_SWEEP = 1000


def wait_limit_s(max_age_s: float, every_s: float) -> float:
    """How long a task may wait in the queue before it is failed ``expired``: the stream's ``max_age``
    less a margin that leaves the sweeps (every ``every_s``) time to see it first: a tenth of the age,
    at least two sweeps, at most half the age."""
    return max_age_s - min(max_age_s / 2, max(max_age_s / 10, 2 * every_s))


class Ageing:
    """The sweep; :meth:`sweep` once per audit."""

    def __init__(self, bus: Bus, *, every_s: float) -> None:
        self._bus = bus
        self.limit_s = wait_limit_s(bus.settings.events_max_age_s, every_s)
        self._read_to: dict[str, int] = {}  # provider -> the next sequence to look at
        self.expired_total = 0

    async def sweep(self) -> list[str]:
        """Fail every task that has waited past :attr:`limit_s`; their ids."""
        bus = self._bus
        floors = await ack_floors(bus)
        cutoff_s = time.time() - self.limit_s
        expired: list[str] = []
        for provider in sorted(set(floors) | set(await submitted_counts(bus))):
            start = max(floors.get(provider, 0) + 1, self._read_to.get(provider, 1))
            expired += await self._sweep_provider(provider, start, cutoff_s)
        self.expired_total += len(expired)
        if expired:
            log.warning(
                "%d task(s) waited in the queue longer than %.0fs (the bus keeps tasks %.0fs): failed "
                "'expired' and dead-lettered (e.g. %s); `hive dlq replay <id>` queues one again",
                len(expired), self.limit_s, bus.settings.events_max_age_s, ", ".join(expired[:5]),
            )  # fmt: skip
        return expired

    async def _sweep_provider(self, provider: str, start: int, cutoff_s: float) -> list[str]:
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
            if await self._expire(provider, task.id, task.run):
                expired.append(task.id)
        return expired

    async def _expire(self, provider: str, task_id: str, run: int) -> bool:
        """Fail one task that waited too long, if the bus has it waiting on ``provider`` in this run."""
        bus = self._bus
        here = await _assigned.assignment(bus, task_id)
        if here is None or here.task.provider != provider or here.task.run != run:
            return False  # moved on, or replayed since: this message is not its queue place
        view = await _assigned.current_view(bus, task_id)
        if view is not None and view.done:
            return False  # it ended; a worker drops its message, or it ages out
        error = (
            f"it waited in the queue longer than {self.limit_s:.0f}s, and the bus keeps a task "
            f"{bus.settings.events_max_age_s:.0f}s (HIVE_EVENTS_MAX_AGE_S): no worker of {provider} took it"
        )
        return await record_expired(bus, here.task, attempt=view.attempt if view else 0, error=error)
