"""Where an outcome becomes ack, NAK or TERM: the one place, with the event that records it.

- an output: the ``completed`` event is stored (JetStream acked the publish), then the task is acked;
- :class:`RetryAfter` (a rate limit): the provider-wide cooldown is extended, a ``retrying`` event
  records the wait, and the task is NAKed with the provider's delay plus jitter; the wait is counted in
  ``waits``, not as an attempt;
- :class:`RetryLater`: a ``retrying`` event, and a NAK with exponential backoff and jitter, unless the
  task is out of attempts;
- :class:`FailNow`, or out of attempts: a ``failed`` event, then TERM.

Each task's final event is published with ``Nats-Msg-Id: <id>:final``, so a task that two workers
finished (one a zombie that outlived its AckWait) is recorded once.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from ._bus import Bus
from ._cooldown import ProviderCooldown
from ._duplicates import report_duplicate
from ._errors import ProviderError, Quota, RetryAfter, RetryLater
from ._messages import Completed, Failed, Retrying, Task, encoder, now_ms
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


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = 1.0
    cap_s: float = 300.0

    def delay_s(self, attempt: int) -> float:
        """Exponential in the attempt, capped, with jitter so that retries do not return in step."""
        return min(self.cap_s, self.base_s * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def rate_limit_delay_s(retry_after_s: float) -> float:
    """The provider's own delay plus a little jitter, so that waiters do not all return at once."""
    return retry_after_s + random.uniform(0.1, max(0.25, 0.1 * retry_after_s))


@dataclass
class Counters:
    completed: int = 0
    failed: int = 0
    retried: int = 0
    rate_limited: int = 0


class Settler:
    def __init__(
        self, bus: Bus, worker_id: str, cooldown: ProviderCooldown, prices: PriceTable, backoff: Backoff
    ) -> None:
        self._bus = bus
        self._worker_id = worker_id
        self._cooldown = cooldown
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
                    await self._cooldown.impose(until_ms, outcome.message, outcome.quota, self._worker_id)
                    self.counts.rate_limited += 1
                    await self.wait_out(d, outcome.retry_after_s, outcome.message, outcome.quota)
                case RetryLater() if d.attempt < task.max_attempts:
                    delay_s = self._backoff.delay_s(d.attempt)
                    await self._retry(d, delay_s, reason="transient", error=outcome.message, waits=d.waits)
                case RetryLater():
                    await self._fail(
                        d, "out_of_attempts", f"out of attempts ({d.attempt}); last error: {outcome.message}"
                    )
                case ProviderError():
                    await self._fail(d, "permanent", outcome.message)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            # Not recorded, so not acked: the task comes back after AckWait and nothing is lost.
            log.warning("could not record the outcome of task %s (%s); it will be redelivered", task.id, exc)

    async def wait_out(
        self, d: Delivery, retry_after_s: float, why: str, quota: Quota, *, called: bool = True
    ) -> None:
        """Hand the task back until a rate limit has passed; this delivery counts as a wait.
        ``called`` says whether the provider was called (and refused) or a cooldown spared the call."""
        await self._retry(
            d,
            rate_limit_delay_s(retry_after_s),
            reason="rate_limit",
            error=why,
            waits=d.waits + 1,
            quota=quota,
            called=called,
        )

    async def fail(self, d: Delivery, error: str) -> None:
        await self._fail(d, "out_of_attempts", error)

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
            await self._fail(d, "permanent", f"the output of {task.provider} is not JSON-serializable: {exc}")
            return
        await self._record(task, data, "completed")
        await d.msg.ack()
        self.counts.completed += 1

    async def _retry(
        self,
        d: Delivery,
        delay_s: float,
        *,
        reason: str,
        error: str,
        waits: int,
        quota: str | None = None,
        called: bool = True,
    ) -> None:
        task = d.task
        event = Retrying(
            task_id=task.id, provider=task.provider, at_ms=now_ms(), attempt=d.attempt, worker=self._worker_id,
            reason="rate_limit" if reason == "rate_limit" else "transient", error=error,
            retry_in_s=round(delay_s, 3), next_try_at_ms=now_ms() + int(delay_s * 1000), waits=waits, quota=quota,
            called=called,
        )  # fmt: skip
        await self._record(task, encoder.encode(event), "retrying")
        await d.msg.nak(delay=delay_s)
        self.counts.retried += 1

    async def _fail(self, d: Delivery, reason: str, error: str) -> None:
        task = d.task
        event = Failed(
            task_id=task.id, provider=task.provider, at_ms=now_ms(), attempt=d.attempt, worker=self._worker_id,
            reason="permanent" if reason == "permanent" else "out_of_attempts", error=error,
        )  # fmt: skip
        await self._record(task, encoder.encode(event), "failed")
        await d.msg.term()
        self.counts.failed += 1

    async def _record(self, task: Task, data: bytes, status: str) -> None:
        names = self._bus.names
        final = status in ("completed", "failed")
        headers = {"Nats-Msg-Id": f"{task.id}:final"} if final else None
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
