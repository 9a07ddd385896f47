"""Where an outcome becomes ack, NAK or TERM: the one place, with the event that records it.

- an output: the ``completed`` event is stored (JetStream acked the publish), then the task is acked;
- :class:`RetryAfter` (a rate limit): the key's shared cooldown is extended; then the task moves to its
  next fallback provider if the limit is per day or longer than the task will wait (a ``moved`` event,
  which the gateway's router queues again, then an ack), or else a ``retrying`` event records the wait
  and the task is NAKed with the provider's delay plus jitter; the wait is counted in ``waits``, not as
  an attempt;
- :class:`InvalidOutput` (an output not in the task's ``response_format``): as :class:`RetryLater`, with
  the reason ``invalid_output``, and out of attempts the task fails with that reason and the first
  validation error;
- :class:`RetryLater`: a ``retrying`` event, and a NAK with the task's backoff and jitter, unless the
  task is out of attempts;
- :class:`FailNow`, out of attempts, or past its deadline: the task goes to the dead letters with its
  last error, a ``failed`` event records it, then TERM; except that a task whose ``fallback_on`` says so
  moves to its next fallback instead (``unavailable``: out of attempts on passing faults; ``failed``:
  that, or any :class:`FailNow` but :class:`BadRequest`, the user's own bad request).

Each run's final event is published with ``Nats-Msg-Id: <id>:final:<seal>``, so a task that two workers
finished (one a zombie that outlived its AckWait) is recorded once; the seal (``Task.seal``) is known
only to who holds the task, so no other credential can take that id first.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from dataclasses import dataclass

import msgspec
from nats.aio.msg import Msg

from . import _blobs, _cancel, _dlq
from ._blobs import BlobMissing
from ._bus import Bus
from ._cooldown import KeyCooldowns
from ._duplicates import report_duplicate
from ._errors import (
    BadRequest,
    BusUnavailable,
    HiveError,
    InvalidOutput,
    ProviderError,
    Quota,
    RetryAfter,
    RetryLater,
    TooLarge,
)
from ._messages import Completed, Failed, FailReason, Moved, Retrying, RetryReason, Task, encoder, now_ms
from ._nats import BUS_ERRORS
from ._prices import PriceTable
from ._providers import Output
from ._publish import JetStreamPublisher, PubAck
from ._size import check_fits, js_publish

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

    def keyed(self, key: str, started_ms: int) -> Delivery:
        """This delivery as called on ``key`` from ``started_ms`` (``dataclasses.replace`` costs twice
        as much, once a task)."""
        return Delivery(self.msg, self.task, self.attempt, self.waits, started_ms, key)


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
    cancelled: int = 0


# A delivery handed back for less than this comes back soon enough to be let go then; the deliveries
# remembered at most (the newest), a bound on memory: each holds its message, the task's content with
# it. A provider's consumers keep at most max_ack_pending (256) deliveries each out at once, so this is
# room to spare; one forgotten is let go when it comes back.
WAITING_MIN_S = 1.0
WAITING_KEPT = 4_096


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
        self._names = bus.names
        # the events a task's outcome is recorded with (completed, failed, retrying), one a task: through
        # the client's publisher, which costs half of ``js.publish`` a message (no NUID and random
        # token, no ``wait_for``, the ack decoded by msgspec); same ack, same Nats-Expected-Stream
        self._publisher = JetStreamPublisher(bus.nc, bus.settings.request_timeout_s)
        # the deliveries handed back with a delay (a rate limit or a backoff waited out), by task id: one
        # cancelled or expired meanwhile is acked then, so that it does not count as waiting for the
        # rest of its delay, or until a worker fetches again (hive_bus._worker.Worker._on_cancel)
        self.waiting: OrderedDict[str, Delivery] = OrderedDict()

    async def start(self) -> None:
        """Listen for the acks of recorded events; before the first task is settled."""
        await self._publisher.start()

    async def stop(self) -> None:
        """Stop listening; an event still waiting for its ack counts as not recorded (not acked)."""
        await self._publisher.stop()

    async def settle(self, d: Delivery, outcome: Outcome, call_s: float, *, cached: bool = False) -> None:
        """Record ``outcome`` and ack, NAK or TERM the task. ``cached``: the output came from the response
        cache (hive_bus._cache), not from a call."""
        task = d.task
        try:
            match outcome:
                case Output():
                    await self._complete(d, outcome, call_s, cached=cached)
                case RetryAfter():
                    until_ms = now_ms() + int(outcome.retry_after_s * 1000)
                    await self._cooldowns.impose(
                        d.key, until_ms, outcome.message, outcome.quota, self._worker_id
                    )
                    self.counts.rate_limited += 1
                    await self.wait_or_move(d, outcome.retry_after_s, outcome.message, outcome.quota)
                case InvalidOutput() if d.attempt < task.max_attempts:
                    delay_s = self._backoff.of(task).delay_s(d.attempt)
                    await self._retry(
                        d, delay_s, reason="invalid_output", error=outcome.message, waits=d.waits
                    )
                case InvalidOutput():
                    error = f"no valid output in {d.attempt} attempts; last: {outcome.message}"
                    moved = task.next_hop() if task.fallback_on == "failed" else None
                    if moved is not None:  # another provider may well answer in the shape asked for
                        await self.move(d, moved, f"{task.provider} failed: {error}")
                    else:
                        await self.fail(d, "invalid_output", error)
                case RetryLater() if d.attempt < task.max_attempts:
                    delay_s = self._backoff.of(task).delay_s(d.attempt)
                    await self._retry(d, delay_s, reason="transient", error=outcome.message, waits=d.waits)
                case RetryLater():
                    error = f"out of attempts ({d.attempt}); last error: {outcome.message}"
                    moved = task.next_hop() if task.fallback_on != "quota" else None
                    if moved is not None:
                        await self.move(d, moved, f"{task.provider} unavailable: {error}")
                    else:
                        await self.fail(d, "out_of_attempts", error, status=outcome.status)
                case BadRequest():
                    # no provider would take it
                    await self.fail(d, "permanent", outcome.message, status=outcome.status)
                case ProviderError():
                    moved = task.next_hop() if task.fallback_on == "failed" else None
                    if moved is not None:
                        await self.move(d, moved, f"{task.provider} failed: {outcome.message}")
                    else:
                        await self.fail(d, "permanent", outcome.message, status=outcome.status)
        except (TooLarge, BlobMissing) as exc:
            # Retrying cannot make it fit: the task fails for good, with the reason (point of no return)
            log.warning("the outcome of task %s cannot be recorded (%s); it fails", task.id, exc)
            try:
                await self.fail(d, "permanent", f"its outcome could not be recorded: {exc}")
            except (*BUS_ERRORS, HiveError) as again:
                log.warning(
                    "could not record the failure of task %s (%s); it will be redelivered", task.id, again
                )
        except (*BUS_ERRORS, BusUnavailable) as exc:
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
        await js_publish(
            self._bus.js, self._bus.nc,
            names.event_subject(task.provider, task.id, "moved"),
            encoder.encode(event),
            headers={"Nats-Msg-Id": task.sealed(f"{moved.msg_id}:moved")},
            stream=names.events_stream_of(task.provider),
            what="moved event",
        )  # fmt: skip
        await d.msg.ack()
        self.counts.moved += 1
        log.info("task %s moves from %s to %s: %s", task.id, task.provider, moved.provider, why)

    async def fail(self, d: Delivery, reason: FailReason, error: str, *, status: int | None = None) -> None:
        """The task failed for good: it goes to the dead letters, its ``failed`` event records it, TERM.
        ``status``: the HTTP status of the provider's last answer, where it had one."""
        task = d.task
        event = Failed(
            task_id=task.id, provider=task.provider, at_ms=now_ms(), attempt=d.attempt, worker=self._worker_id,
            reason=reason, error=_clipped(error), task=task, provider_status=status,
        )  # fmt: skip
        data = encoder.encode(event)
        if len(data) > _blobs.claim_check_bytes(self._bus):
            # a task that came without the claim check (an older client): its content goes to the
            # object store so that its dead letter fits in a message
            try:
                event = msgspec.structs.replace(
                    event, task=await _blobs.check_in(self._bus, task, listed=False)
                )
            except TooLarge:
                event = msgspec.structs.replace(
                    event, task=None, error=f"{event.error} (the task was too large to keep)"
                )
            data = encoder.encode(event)
        await _dlq.keep(self._bus, task.provider, task.id, data, task.sealed(f"{task.id}:dlq:{task.run}"))
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
                names.event_subject(event.provider, event.task_id, "failed"),
                data,
                stream=names.events_stream_of(event.provider),
            )
        finally:
            await msg.term()
        self.counts.failed += 1

    async def _complete(self, d: Delivery, output: Output, call_s: float, *, cached: bool = False) -> None:
        task = d.task
        event = Completed(
            task_id=task.id, provider=task.provider, at_ms=now_ms(), attempt=d.attempt, worker=self._worker_id,
            output=output.value, model=output.model, usage=output.usage, submitted_at_ms=task.submitted_at_ms,
            started_at_ms=d.started_ms, call_s=round(call_s, 6),
            # an answer from the cache cost nothing: no call was made
            cost_usd=0.0 if cached else self._prices.cost_usd(output.model, output.usage),
            cached=cached, finish_reason=output.finish_reason,
        )  # fmt: skip
        try:
            data = encoder.encode(event)
        except (TypeError, UnicodeEncodeError, msgspec.EncodeError) as exc:  # a lone surrogate: not UTF-8
            await self.fail(d, "permanent", f"the output of {task.provider} is not JSON-serializable: {exc}")
            return
        settings = self._bus.settings
        if len(data) > _blobs.claim_check_bytes(self._bus):
            blob = encoder.encode(output.value)
            if len(blob) > settings.blob_max_bytes:
                await self.fail(
                    d, "permanent",
                    f"the output of {task.provider} is {len(blob)} bytes encoded, over the bus's limit of "
                    f"{settings.blob_max_bytes} bytes (blob_max_bytes)",
                )  # fmt: skip
                return
            ref = await _blobs.put(
                self._bus, provider=task.provider, task_id=task.id, kind="output", data=blob, listed=False
            )
            data = encoder.encode(msgspec.structs.replace(event, output=None, output_ref=ref))
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
            reason=reason, error=_clipped(error), retry_in_s=round(delay_s, 3), next_try_at_ms=now_ms() + int(delay_s * 1000),
            waits=waits, quota=quota, called=called,
        )  # fmt: skip
        await self._record(task, encoder.encode(event), "retrying")
        await d.msg.nak(delay=delay_s)
        self.counts.retried += 1
        if delay_s >= WAITING_MIN_S:
            self.waiting[task.id] = d
            self.waiting.move_to_end(task.id)
            if len(self.waiting) > WAITING_KEPT:
                self.waiting.popitem(last=False)  # the oldest: once fetched again, it is let go then

    def handed_back(self, task_id: str) -> Delivery | None:
        """The delivery of ``task_id`` this worker last handed back with a delay, if any, taken off the
        list (a task delivered here again, or let go, waits here no more). Its ack still holds once the
        delay has passed, and even once the task went to another worker: the server takes the message
        off the consumer's pending ones by its stream sequence."""
        return self.waiting.pop(task_id, None)

    async def _record(self, task: Task, data: bytes, status: str) -> None:
        """Store a task's event; raises :class:`TooLarge`, :class:`BusUnavailable` (refused, or no ack in
        time: not recorded) or what nats-py raises when it cannot send."""
        stream = self._names.events_stream_of(task.provider)
        msg_id = task.final_msg_id if status in ("completed", "failed") else None
        check_fits(self._bus.nc, data, _event_headers(msg_id, stream), what=f"{status} event")
        subject = self._names.event_subject(task.provider, task.id, status)
        (outcome,) = await self._publisher.publish_together([(subject, data, msg_id, stream)])
        if not isinstance(outcome, PubAck):
            why = "no acknowledgement in time" if outcome is None else str(outcome) or "no stream answered"
            raise BusUnavailable(f"the {status} event of task {task.id} was not stored: {why}")
        if outcome.duplicate:
            log.warning("task %s already had a final outcome; this worker's result is not recorded", task.id)
            await report_duplicate(
                self._bus, task, "completed" if status == "completed" else "failed", self._worker_id
            )
            # a cancel while it was queued can come first and reach this worker only after its call
            await _cancel.fetched_if_ended_while_queued(self._bus, task)


def _event_headers(msg_id: str | None, stream: str) -> dict[str, str]:
    """The headers an event goes with (the publisher writes them itself), for the size check."""
    headers = {"Nats-Expected-Stream": stream}
    if msg_id is not None:
        headers["Nats-Msg-Id"] = msg_id
    return headers


# A provider's error text goes into events and dead letters: kept to this many characters, so that a
# provider answering with a whole page cannot make an event too large to record.
MAX_ERROR_CHARS = 4000


def _clipped(error: str) -> str:
    return (
        error if len(error) <= MAX_ERROR_CHARS else f"{error[:MAX_ERROR_CHARS]}... ({len(error)} characters)"
    )


__all__ = ["Backoff", "Counters", "Delivery", "Outcome", "Settler"]
