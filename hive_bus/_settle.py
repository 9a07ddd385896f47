"""Where an outcome becomes ack, NAK or TERM: the one place, with the event that records it.

- an output: the ``completed`` event is stored (JetStream acked the publish), then the task is acked;
- :class:`RetryAfter` (a rate limit): the key's shared cooldown is extended; then the task moves to its
  next fallback provider if the limit is per day or longer than the task will wait (a ``moved`` event,
  which the gateway's router queues again, then an ack), or else a ``retrying`` event records the wait
  and the task is NAKed with the provider's delay plus jitter; the wait is counted in ``waits``, not as
  an attempt;
- :class:`RetryLater`: a ``retrying`` event, and a NAK with the task's backoff and jitter, unless the
  task is out of attempts;
- :class:`FailNow`, out of attempts, or past its deadline: the task goes to the dead letters with its
  last error, a ``failed`` event records it, then TERM.

Each run's final event is published with ``Nats-Msg-Id: <id>:final``, so a task that two workers
finished (one a zombie that outlived its AckWait) is recorded once.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import msgspec
from nats.aio.msg import Msg

from . import _dlq
from ._bus import Bus
from ._cooldown import KeyCooldowns
from ._duplicates import report_duplicate
from ._errors import ProviderError, Quota, RetryAfter, RetryLater
from ._messages import Completed, Failed, FailReason, Moved, Retrying, RetryReason, Task, encoder, now_ms
from ._nats import BUS_ERRORS
from ._prices import PriceTable
from ._providers import Output

log = logging.getLogger("hive_bus.worker")

Outcome = Output | ProviderError


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a task to this worker."""

    msg: Msg
    task: Task
    attempt: int  # deliveries that were real tries, this one included
    waits: int  # earlier deliveries that only waited out a rate limit
    started_ms: int
    key: str = "default"  # the provider key the call used


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = 1.0
    cap_s: float = 300.0

    def delay_s(self, attempt: int) -> float:
        """Exponential in the attempt, capped, with jitter so that retries do not return in step."""
        return min(self.cap_s, self.base_s * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def of(self, task: Task) -> Backoff:
        """This backoff with the task's own base and cap where it sets them."""
        return Backoff(task.backoff_base_s or self.base_s, task.backoff_cap_s or self.cap_s)


def rate_limit_delay_s(retry_after_s: float) -> float:
    """The provider's own delay plus a little jitter, so that waiters do not all return at once."""
    return retry_after_s + random.uniform(0.1, max(0.25, 0.1 * retry_after_s))


@dataclass
class Counters:
    completed: int = 0
    failed: int = 0
    retried: int = 0
    rate_limited: int = 0
    moved: int = 0


class Settler:
    def __init__(
        self, bus: Bus, worker_id: str, cooldowns: KeyCooldowns, prices: PriceTable, backoff: Backoff
    ) -> None:
        self._bus = bus
        self._worker_id = worker_id
        self._cooldowns = cooldowns
        self._prices = prices
        self._backoff = backoff
        self.counts = Counters()

    async def settle(self, d: Delivery, outcome: Outcome, call_s: float) -> None:
        task = d.task
        try:
            match outcome:
                case Output():
                    await self._complete(d, outcome, call_s)
                case RetryAfter():
                    until_ms = now_ms() + int(outcome.retry_after_s * 1000)
                    await self._cooldowns.impose(
                        d.key, until_ms, outcome.message, outcome.quota, self._worker_id
                    )
                    self.counts.rate_limited += 1
                    await self.wait_or_move(d, outcome.retry_after_s, outcome.message, outcome.quota)
                case RetryLater() if d.attempt < task.max_attempts:
                    delay_s = self._backoff.of(task).delay_s(d.attempt)
                    await self._retry(d, delay_s, reason="transient", error=outcome.message, waits=d.waits)
                case RetryLater():
                    error = f"out of attempts ({d.attempt}); last error: {outcome.message}"
                    await self.fail(d, "out_of_attempts", error)
                case ProviderError():
                    await self.fail(d, "permanent", outcome.message)
        except BUS_ERRORS as exc:
            # Not recorded, so not acked: the task comes back after AckWait and nothing is lost.
            log.warning("could not record the outcome of task %s (%s); it will be redelivered", task.id, exc)

    async def wait_or_move(
        self,
        d: Delivery,
        wait_s: float,
        why: str,
        quota: Quota,
        *,
        called: bool = True,
        reason: RetryReason = "rate_limit",
    ) -> None:
        """The provider cannot take the task for ``wait_s``: move it to its next fallback if the wait is
        for the day or longer than the task will wait, else hand it back until then (a wait, not an
        attempt). ``called`` says whether the provider was called (and refused) or the call was spared."""
        moved = d.task.next_hop() if quota == "day" or wait_s > d.task.max_wait_s else None
        if moved is not None:
            await self.move(d, moved, f"{why} (a {'daily' if quota == 'day' else f'{wait_s:.0f}s'} wait)")
            return
        await self._retry(
            d,
            rate_limit_delay_s(wait_s),
            reason=reason,
            error=why,
            waits=d.waits + 1,
            quota=quota,
            called=called,
        )

    async def move(self, d: Delivery, moved: Task, why: str) -> None:
        """Record the move (the router queues ``moved`` on its provider), then let this copy go."""
        task = d.task
        event = Moved(
            task_id=task.id, provider=task.provider, at_ms=now_ms(), worker=self._worker_id, reason=why,
            task=moved,
        )  # fmt: skip
        names = self._bus.names
        await self._bus.js.publish(
            names.event_subject(task.provider, task.id, "moved"),
            encoder.encode(event),
            headers={"Nats-Msg-Id": f"{moved.msg_id}:moved"},
            stream=names.events_stream,
        )
        await d.msg.ack()
        self.counts.moved += 1
        log.info("task %s moves from %s to %s: %s", task.id, task.provider, moved.provider, why)

    async def fail(self, d: Delivery, reason: FailReason, error: str) -> None:
        """The task failed for good: it goes to the dead letters, its ``failed`` event records it, TERM."""
        task = d.task
        event = Failed(
            task_id=task.id, provider=task.provider, at_ms=now_ms(), attempt=d.attempt, worker=self._worker_id,
            reason=reason, error=error, task=task,
        )  # fmt: skip
        data = encoder.encode(event)
        await _dlq.keep(self._bus, task.provider, task.id, data, f"{task.id}:dlq:{task.run}")
        await self._record(task, data, "failed")
        await d.msg.term()
        self.counts.failed += 1

    async def reject(self, msg: Msg, event: Failed) -> None:
        """A message that is not a task: dead-lettered as it came, recorded, terminated."""
        data = encoder.encode(event)
        names = self._bus.names
        try:
            await _dlq.keep(self._bus, event.provider, event.task_id, data, f"{event.task_id}:dlq")
            await self._bus.js.publish(
                names.event_subject(event.provider, event.task_id, "failed"), data, stream=names.events_stream
            )
        finally:
            await msg.term()
        self.counts.failed += 1

    async def _complete(self, d: Delivery, output: Output, call_s: float) -> None:
        task = d.task
        event = Completed(
            task_id=task.id, provider=task.provider, at_ms=now_ms(), attempt=d.attempt, worker=self._worker_id,
            output=output.value, model=output.model, usage=output.usage, submitted_at_ms=task.submitted_at_ms,
            started_at_ms=d.started_ms, call_s=round(call_s, 6),
            cost_usd=self._prices.cost_usd(output.model, output.usage),
        )  # fmt: skip
        try:
            data = encoder.encode(event)
        except (TypeError, msgspec.EncodeError) as exc:
            await self.fail(d, "permanent", f"the output of {task.provider} is not JSON-serializable: {exc}")
            return
        await self._record(task, data, "completed")
        await d.msg.ack()
        self.counts.completed += 1

    async def _retry(
        self,
        d: Delivery,
        delay_s: float,
        *,
        reason: RetryReason,
        error: str,
        waits: int,
        quota: str | None = None,
        called: bool = True,
    ) -> None:
        task = d.task
        deadline_ms = task.deadline_at_ms
        if deadline_ms is not None:
            # back at the deadline at the latest, to fail then rather than linger
            delay_s = max(0.0, min(delay_s, (deadline_ms - now_ms()) / 1000 + 0.05))
        event = Retrying(
            task_id=task.id, provider=task.provider, at_ms=now_ms(), attempt=d.attempt, worker=self._worker_id,
            reason=reason, error=error, retry_in_s=round(delay_s, 3), next_try_at_ms=now_ms() + int(delay_s * 1000),
            waits=waits, quota=quota, called=called,
        )  # fmt: skip
        await self._record(task, encoder.encode(event), "retrying")
        await d.msg.nak(delay=delay_s)
        self.counts.retried += 1

    async def _record(self, task: Task, data: bytes, status: str) -> None:
        names = self._bus.names
        final = status in ("completed", "failed")
        headers = {"Nats-Msg-Id": task.final_msg_id} if final else None
        ack = await self._bus.js.publish(
            names.event_subject(task.provider, task.id, status),
            data,
            headers=headers,
            stream=names.events_stream,
        )
        if ack.duplicate:
            log.warning("task %s already had a final outcome; this worker's result is not recorded", task.id)
            await report_duplicate(
                self._bus, task, "completed" if status == "completed" else "failed", self._worker_id
            )


__all__ = ["Backoff", "Counters", "Delivery", "Outcome", "Settler"]
