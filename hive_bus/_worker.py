"""The worker runtime: where a task is fetched and run.

One :class:`Worker` serves one provider. It pulls from the provider's durable consumer (shared by every
worker of that provider, wherever it runs), runs up to ``concurrency`` calls at once, keeps each task
alive with in-progress acks while its call runs, and hands every outcome to :class:`Settler`
(``_settle.py``), the one place that acks, NAKs or TERMs. While the provider is cooling down after a
429, the worker does not fetch, and hands back what it holds without calling the provider.

Why about 750 lines: :class:`Worker` is one loop with its states (fetching, holding, cooling down,
cancelled calls, draining). Choosing a key lives in ``_keys.py`` and settling in ``_settle.py``; what
is left is fetch, pick, call, settle, and cutting it further would split one state machine over files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo

from . import _blobs, _cancel, _output, _redact
from ._budget import Budgets, ProviderBudget, Reservation
from ._bus import Bus, ensure_consumers, redeclare_workers_bucket
from ._cache import ResponseCache
from ._cancel import CancelWatch
from ._chunks import ChunkSender, run_streamed
from ._cooldown import KeyCooldowns
from ._errors import (
    FailNow,
    KeyRejected,
    NoQuota,
    ProviderError,
    RetryAfter,
    RetryLater,
    TooLarge,
)
from ._keys import Blocked, KeyRing
from ._messages import (
    Cancelled,
    Failed,
    FailReason,
    Retrying,
    Running,
    Task,
    TaskEvent,
    WorkerBeat,
    decode_event,
    encoder,
    is_final,
    is_task_id,
    now_ms,
    status_of,
    task_decoder,
)
from ._nats import BUS_ERRORS, delivery_count, why
from ._nesting import MAX_NESTING, NestedTooDeep, check_json, check_value
from ._prices import PriceTable
from ._providers import Output, Provider, being_cancelled, describe
from ._pull import Puller
from ._settle import Backoff, Delivery, Outcome, Settler
from ._size import check_fits
from ._version import __version__

log = logging.getLogger("hive_bus.worker")

# A call that runs longer than this fraction of AckWait gets an in-progress ack, and another one each
# time that much more has passed: the server never sees a live call as a dead worker.
KEEPALIVE_FRACTION = 1 / 3
# A task's "running" event is published once its call has lasted this long. Quicker tasks go straight
# from queued to completed (their completed event says when they started, where, and which attempt):
# a status nobody could have seen is not worth a stored message per task.
RUNNING_AFTER_S = 0.25
# A busy worker asks the high- and low-priority queues at least this often, even without a sign of work
# there (a task that comes back from a retry is not published again).
PROBE_EVERY_S = 1.0
_ID_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    provider: str
    concurrency: int = 4
    drain_timeout_s: float = 30.0
    call_timeout_s: float = 600.0
    # How long an idle worker waits for work before it looks again; also bounds how fast a stop is noticed.
    fetch_wait_s: float = 2.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    # the last part of the worker's id, its heartbeat key (``[<credential name>.]<provider>.<this>``);
    # default ``<host>-<pid>-<rand>``
    worker_id: str | None = None
    prices: PriceTable | None = None
    budget: ProviderBudget | None = None
    # A task whose key has no budget left for up to this long waits in its lane; longer, it is handed
    # back until then (or moves to a fallback), so that the worker does not sit on it.
    hold_max_s: float = 15.0
    # While no key is usable for longer than this (a daily quota spent), the worker still fetches, so
    # that tasks with fallbacks move on and the rest learn when to come back; shorter, it fetches nothing.
    triage_after_s: float = 120.0
    # At most one call per task: a task delivered again after a delivery that ended without an outcome
    # (a crash mid-call, an ack timeout) is failed `interrupted` instead of called again. On by itself
    # for a handler whose retry policy is `never`.
    at_most_once: bool = False


@dataclass(frozen=True, slots=True)
class ProviderKey:
    """A provider adapter bound to one API key. ``name`` identifies the key in logs, metrics and the
    bus (a fingerprint or a name the user gave); it is never the key itself."""

    name: str
    provider: Provider


@dataclass(slots=True)
class _Held:
    """A task this worker holds: when the server last had a sign of life for it, and its ``running``
    event until that is published (only for calls that last; see :meth:`Worker._watch_loop`)."""

    msg: Msg
    started_s: float
    touched_s: float
    running: Running | None = None


class Worker:
    """Runs one provider's tasks from the bus until :meth:`stop` is called or it is cancelled.

    ``provider`` is one adapter, or several bound to keys of their own (:class:`ProviderKey`), which the
    worker uses in turn, each within its own budget and cooldown.
    """

    def __init__(self, bus: Bus, provider: Provider | Sequence[ProviderKey], options: WorkerOptions) -> None:
        self._bus = bus
        self._keys = list(provider) if isinstance(provider, Sequence) else [ProviderKey("default", provider)]
        if not self._keys:
            raise ValueError("a worker needs at least one provider key")
        self._opts = options
        self._at_most_once = options.at_most_once or any(
            getattr(k.provider, "at_most_once", False) for k in self._keys
        )
        self._host = socket.gethostname()
        self.id = _worker_id(options.provider, self._host, bus.settings.worker_name, options.worker_id)
        self._stopping = anyio.Event()
        self._changed = anyio.Event()
        self._watchers = 0  # tasks waiting on _changed
        self._in_flight = 0
        self._held: dict[int, _Held] = {}
        self._ack_wait_s = bus.settings.ack_wait_s
        self._waiting: tuple[str, int] | None = None  # why the worker is not fetching, until when
        self._high_hint = True  # a high-priority task may be waiting
        self._high_probed_s = 0.0
        self._doorbell = anyio.Event()  # rung when an idle worker has a task to fetch, or should stop
        self._low_hint = True
        self._low_probed_s = 0.0
        self._drained = False  # the last idle wait brought the last task of its queue
        names = bus.names
        self.model: str | None = getattr(self._keys[0].provider, "default_model", None)
        self.cooldowns = KeyCooldowns(
            bus.nc, bus.providers_kv, names.providers_bucket, options.provider, [k.name for k in self._keys],
            watch=bus.settings.js_domain is not None,
        )  # fmt: skip
        self.budgets = Budgets(bus.budgets_kv, options.provider, options.budget)
        self.cancels = CancelWatch(
            bus, options.provider, self._on_cancel, held=self._held_ids, running=lambda: list(self._calls)
        )
        self._calls: dict[str, anyio.CancelScope] = {}  # the running calls, by task id
        # which key may call now (cooldowns, refusals, no-quota memory, probes, budgets): one place
        self.ring = KeyRing(
            options.provider,
            [k.name for k in self._keys],
            self.cooldowns.records,
            self.budgets,
            owner=self.id,
        )
        self._by_name = {k.name: k for k in self._keys}
        backoff = Backoff(options.backoff_base_s, options.backoff_cap_s)
        self._settler = Settler(bus, self.id, self.cooldowns, options.prices or PriceTable(), backoff)
        self._counts = self._settler.counts
        self._cache = ResponseCache(bus)
        self._started_at_ms = now_ms()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def stop(self) -> None:
        """Stop taking work; finish what is in flight (NAK it after ``drain_timeout_s``), then return."""
        self._stopping.set()
        self._doorbell.set()
        self._notify()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        bus, opts = self._bus, self._opts
        infos = await self._find_consumers()
        if infos is None:  # stopped before the bus answered
            task_status.started()
            return
        self._ack_wait_s = infos[0].config.ack_wait or bus.settings.ack_wait_s
        names = bus.names
        domain = bus.settings.js_domain
        pullers = [
            Puller(bus.nc, names.tasks_stream, info.name, on_task=self._ring, domain=domain) for info in infos
        ]
        await self.cancels.start()  # before any fetch: a task cancelled while queued is never called
        await self._settler.start()
        for puller in pullers:
            await puller.start()
        high_sub = await bus.nc.subscribe(names.task_filter(opts.provider, "high"), cb=self._on_high)
        cooldown_sub = await self.cooldowns.subscribe()
        log.info("worker %s serving %s (concurrency %d)", self.id, opts.provider, opts.concurrency)
        try:
            async with anyio.create_task_group() as beats:
                await self._beat_once()  # before it says it started: whoever then looks finds it
                beats.start_soon(self._beat_loop)
                beats.start_soon(self._watch_loop)
                beats.start_soon(self.cooldowns.follow, cooldown_sub)
                beats.start_soon(self.cancels.keep)  # again after each reconnection
                task_status.started()
                # ``concurrency`` lanes take fetched tasks from a memory stream: bounded concurrency
                # without starting a task per message.
                send, receive = anyio.create_memory_object_stream[Msg](max_buffer_size=opts.concurrency)
                with receive:
                    async with anyio.create_task_group() as calls:
                        for _ in range(opts.concurrency):
                            calls.start_soon(self._lane, receive)
                        with send:
                            await self._fetch_loop(pullers, send)
                        await self._drain(calls, pullers)
                beats.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                for puller in pullers:
                    await puller.stop()
                await self.cancels.stop()
                await self._settler.stop()
                for sub in (high_sub, cooldown_sub):
                    try:
                        await sub.unsubscribe()
                    except nats.errors.Error as exc:  # a connection the server closed: nothing to undo
                        log.debug("unsubscribing failed: %s", exc)
                await self._forget_beat()
                for key in self._keys:
                    await _close(key.provider)
            log.info("worker %s stopped: %s", self.id, self._counts)

    async def _find_consumers(self) -> list[ConsumerInfo] | None:
        """The provider's consumers (high, normal, low); waits while JetStream does not answer (a server
        restarting) or while they do not exist and this worker may not create them."""
        said = False
        async with anyio.create_task_group() as beats:
            try:
                while not self._stopping.is_set():
                    try:
                        return await ensure_consumers(self._bus.js, self._bus.settings, self._opts.provider)
                    except BUS_ERRORS as exc:
                        if not said:
                            log.warning(
                                "the %s consumers are not there yet (%s); worker %s waits for them (the "
                                "gateway creates them once a task was submitted to %s and it sees this "
                                "worker's heartbeat)",
                                self._opts.provider, why(exc), self.id, self._opts.provider,
                            )  # fmt: skip
                            said = True
                            # be seen, so the gateway can help, however long the first task takes to come
                            await self._beat_once()
                            beats.start_soon(self._beat_loop)
                    with anyio.move_on_after(1):
                        await self._stopping.wait()
            finally:
                beats.cancel_scope.cancel()
        return None

    # fetch ---------------------------------------------------------------------------------------

    async def _fetch_loop(self, pullers: list[Puller], lanes: MemoryObjectSendStream[Msg]) -> None:
        opts = self._opts
        while not self._stopping.is_set():
            await self._wait_for(lambda: self._in_flight < opts.concurrency or self._stopping.is_set())
            await self._gate()
            if self._stopping.is_set():
                return
            try:
                # Right after an idle wait brought the only task there was, asking again would find
                # nothing: wait straight away (one round trip less on every task of a quiet bus).
                msgs = [] if self._drained else await self._pull(pullers, opts.concurrency - self._in_flight)
                if not msgs:
                    msgs = await self._idle(pullers)
                    self._drained = len(msgs) == 1 and not (msgs[0].metadata.num_pending or 0)
            except Exception as exc:  # a broken connection, a deleted consumer: log, pause, go on
                log.warning("fetch of %s tasks failed: %s; trying again", opts.provider, exc)
                with anyio.move_on_after(1):
                    await self._stopping.wait()
                continue
            for msg in msgs:
                if self._stopping.is_set():
                    await _nak_now(msg)  # fetched as the stop came: let another worker have it at once
                    continue
                self._in_flight += 1
                lanes.send_nowait(msg)  # never blocks: at most one message per free lane is fetched

    async def _pull(self, pullers: list[Puller], want: int) -> list[Msg]:
        """Up to ``want`` tasks, high priority first, then normal, then low. The high queue is asked when
        a high task was published (a core subscription says so), and the low one when the normal queue
        has run dry; each also once a second (for tasks coming back from a retry, which are not published
        again). So a busy worker spends one round trip per batch."""
        high, normal, low = pullers
        now = anyio.current_time()
        msgs = high.take(want) + normal.take(want) + low.take(want)  # delivered already: first
        if len(msgs) < want and (self._high_hint or now - self._high_probed_s >= PROBE_EVERY_S):
            self._high_hint, self._high_probed_s = False, now
            msgs += await high.pull(want - len(msgs))
            self._high_hint = len(msgs) >= want  # a full batch: there may be more
        if len(msgs) < want:
            msgs += await normal.pull(want - len(msgs))
        if len(msgs) < want and (self._low_hint or now - self._low_probed_s >= PROBE_EVERY_S):
            self._low_probed_s = now
            got = await low.pull(want - len(msgs))
            self._low_hint = bool(got) and (got[-1].metadata.num_pending or 0) > 0
            msgs += got
        return msgs

    async def _idle(self, pullers: list[Puller]) -> list[Msg]:
        """Nothing to do: wait for the first task of any priority, delivered the moment it is stored (the
        normal and low queues hold a waiting request each; a high task is announced by its publish)."""
        high, normal, low = pullers
        self._doorbell = anyio.Event()
        if not self._high_hint:  # else one came since the last look
            for puller in (normal, low):
                await puller.ask(self._opts.fetch_wait_s)
            if not (normal.spare or low.spare):
                with anyio.move_on_after(self._opts.fetch_wait_s):
                    await self._doorbell.wait()
        self._low_hint = True  # whichever answered, look again at once
        if self._high_hint:
            self._high_hint = False
            got = await high.wait(0.5)  # the announcement may come before the store
            if got:
                return got
        return normal.take(1) + low.take(1)

    def _ring(self) -> None:
        self._doorbell.set()

    async def _on_high(self, msg: Msg) -> None:
        self._high_hint = True
        self._doorbell.set()

    async def _gate(self) -> None:
        """Wait while no key can be used: all cooling down, or out of the budget this worker last saw.
        A long wait lets fetching go on (see ``triage_after_s``); so does a provider that refused every
        key, so that its tasks fail with a clear error or move on instead of lingering."""
        while not self._stopping.is_set():
            blocked = self.ring.blocked_now(self.model)
            self._waiting = None
            if blocked is not None:
                until_ms = now_ms() + int(blocked.wait_s * 1000)
                self._waiting = ("cooldown" if blocked.reason == "rate_limit" else "budget", until_ms)
            if blocked is None or blocked.wait_s > self._opts.triage_after_s:
                return
            with anyio.move_on_after(min(blocked.wait_s, 1.0)):
                await self._stopping.wait()

    async def _drain(self, calls: TaskGroup, pullers: list[Puller]) -> None:
        if self._in_flight:
            log.info("worker %s draining %d task(s)", self.id, self._in_flight)
        with anyio.move_on_after(self._opts.drain_timeout_s):
            await self._wait_for(lambda: self._in_flight == 0)
        for puller in pullers:
            await puller.quiet()
        # Whatever is still running now is cancelled; _handle NAKs it for prompt redelivery.
        calls.cancel_scope.cancel()

    def _notify(self) -> None:
        if self._watchers:  # else no one to wake: no event made a task
            self._changed.set()
            self._changed = anyio.Event()

    async def _wait_for(self, predicate: Any) -> None:
        while not predicate():
            self._watchers += 1
            try:
                await self._changed.wait()
            finally:
                self._watchers -= 1

    # one task: a key picked for it, the call, its settling ---------------------------------------

    async def _lane(self, receive: MemoryObjectReceiveStream[Msg]) -> None:
        while True:
            # a task already in the stream is taken without the checkpoint that ``receive`` makes first:
            # its handling awaits the bus anyway, so one loop pass a task less and nothing unfair
            try:
                msg = receive.receive_nowait()
            except anyio.WouldBlock:
                try:
                    msg = await receive.receive()
                except anyio.EndOfStream:
                    return
            except anyio.EndOfStream:
                return
            await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        now = anyio.current_time()
        held = _Held(msg, started_s=now, touched_s=now)
        self._held[id(held)] = held
        try:
            await self._process(held)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                await _nak_now(msg)
            raise
        except Exception:
            # A bug here must not take the worker down; the task is redelivered after AckWait.
            log.exception("worker %s could not process a task message", self.id)
        finally:
            del self._held[id(held)]
            self._in_flight -= 1
            self._notify()

    async def _process(self, held: _Held) -> None:
        msg = held.msg
        try:
            task = task_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._reject_undecodable(msg, exc)
            return
        self._settler.handed_back(task.id)  # delivered again: no longer waiting here
        if await self.cancels.ended(task):
            with anyio.CancelScope(shield=True):
                await self._abandon(msg, task, "it was cancelled while queued")
            return
        delivered = delivery_count(msg)
        last = await self._last_event(task) if delivered > 1 else None
        if last is not None and is_final(last):
            # its run has an end already (an outcome stored whose ack was lost, with the worker or the
            # connection): a call would be paid for twice, and its events would say it runs again
            with anyio.CancelScope(shield=True):
                await self._ended_already(msg, task, last)
            return
        waits = last.waits if isinstance(last, Running | Retrying) else 0
        d = Delivery(msg=msg, task=task, attempt=delivered - waits, waits=waits, started_ms=now_ms())
        settler = self._settler
        refused = self._refused(d, delivered, last)
        if refused is not None:
            with anyio.CancelScope(shield=True):
                await settler.fail(d, *refused)
            return
        try:
            task = await _blobs.check_out(self._bus, task)  # the call needs the content; events do not
        except _blobs.BlobMissing as exc:
            with anyio.CancelScope(shield=True):
                await settler.fail(d, "permanent", f"the task's content cannot be read: {exc}")
            return
        model = task.model or self.model
        if task.cache_ttl_s is not None:
            # before a key is picked: a hit makes no call and spends no budget (see hive_bus._cache)
            hit = await self._cache.lookup(task, model)
            if hit is not None:
                with anyio.CancelScope(shield=True):
                    d = dataclasses.replace(d, key="cache")
                    answer = Output(hit.output, hit.model, hit.usage, hit.finish_reason)
                    await settler.settle(d, answer, 0.0, cached=True)
                return
        for _ in range(len(self._keys)):
            got = await self._acquire(task)
            if isinstance(got, Blocked):
                with anyio.CancelScope(shield=True):
                    await settler.wait_or_move(
                        d, got.wait_s, got.why, got.quota, called=False, reason=got.reason
                    )
                return
            if got is None:
                with anyio.CancelScope(shield=True):
                    await self._no_key_left(d)
                return
            key, reservation = got
            d = d.keyed(key.name, now_ms())
            held.running = Running(
                task_id=task.id, provider=task.provider, at_ms=d.started_ms, attempt=d.attempt, worker=self.id,
                submitted_at_ms=task.submitted_at_ms, waits=waits,
            )  # fmt: skip
            t0 = time.perf_counter()
            # one scope for both ends of a call: a cancel of the task, and the call's time limit
            timeout_s = self._opts.call_timeout_s
            with anyio.CancelScope(deadline=anyio.current_time() + timeout_s) as call:
                self._calls[task.id] = call
                if await self.cancels.heard(task):  # cancelled since it was fetched
                    call.cancel()
                try:
                    outcome = await self._call(key.provider, task, d)
                except BaseException:
                    self.ring.released(key.name)
                    raise
                finally:
                    self._calls.pop(task.id, None)
            if call.cancelled_caught and anyio.current_time() >= call.deadline:
                # out of time, as ``fail_after`` tells it (whether or not a cancel came as well)
                outcome = RetryLater(f"{task.provider} gave no answer within {timeout_s:g}s")
            elif call.cancelled_caught:
                held.running = None
                with anyio.CancelScope(shield=True):
                    await self._abandon(msg, task, "it was cancelled while running: its call was abandoned")
                return
            if isinstance(outcome, NoQuota):
                self.ring.set_aside(key.name, task.model or self.model, outcome.message)
            self.ring.answered(key.name, rate_limited=isinstance(outcome, RetryAfter | KeyRejected))
            held.running = None  # too late to say: the outcome is next
            with anyio.CancelScope(shield=True):
                try:
                    if reservation is not None:
                        await self._spent(reservation, outcome)
                    if isinstance(outcome, KeyRejected):
                        await self.cooldowns.refuse(key.name, outcome.message, self.id)
                        continue  # the key was refused, not the task: the next key tries it
                    if isinstance(outcome, NoQuota):
                        continue  # the key cannot serve the model: the next key tries the task
                    call_s = time.perf_counter() - t0
                    if isinstance(outcome, Output) and task.cache_ttl_s is not None:
                        await self._cache.store(task, model, outcome)  # before its twins can ask
                    await settler.settle(d, outcome, call_s)
                finally:
                    # after a 429 or a refusal, the other lanes go on once the key's cooldown is known
                    self.ring.released(key.name)
            return
        with anyio.CancelScope(shield=True):
            await self._no_key_left(d)

    def _refused(self, d: Delivery, delivered: int, last: TaskEvent | None) -> tuple[FailReason, str] | None:
        """Why this delivery fails without a call (past its deadline, at most once, out of attempts), or
        None: it may be called."""
        task = d.task
        if (deadline_ms := task.deadline_at_ms) is not None and now_ms() >= deadline_ms:
            return "deadline", f"past its deadline ({task.deadline_s:g}s after submission)"
        if delivered > 1 and self._at_most_once and not isinstance(last, Retrying):
            # the delivery before this one ended with no outcome: its call may have run
            return "interrupted", (
                "delivered again after a delivery that ended without an outcome (a crash or an ack "
                "timeout); at most once: not called again"
            )
        if d.attempt > task.max_attempts:
            # Delivered again after crashes or ack timeouts; no call is made.
            return "out_of_attempts", (
                f"delivered {d.attempt - 1} times without an outcome (worker crashes or ack timeouts)"
            )
        return None

    async def _on_cancel(self, task_id: str) -> None:
        """A task of this provider was cancelled (or expired): if its call is running here, abandon it;
        if this worker handed it back to wait (a rate limit, a backoff), ack it now, or it would count
        as waiting (``retrying`` in the stats, the consumer's ack pending) until its delay passed."""
        call = self._calls.get(task_id)
        if call is None and task_id not in self._settler.waiting:
            return  # looked up at its fetch, if it comes
        if not await self.cancels.look_up(task_id):
            return  # heard, not stored
        if call is not None:
            call.cancel()
        if (d := self._settler.handed_back(task_id)) is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                await self._let_waiting_go(d)

    def _held_ids(self) -> list[str]:
        """The tasks this worker holds: its running calls, and the deliveries it handed back to wait."""
        return [*self._calls, *self._settler.waiting]

    async def _let_waiting_go(self, d: Delivery) -> None:
        log.info("worker %s lets task %s go: it ended while it waited to be tried again", self.id, d.task.id)
        try:
            # the delivery was NAKed with a delay, which leaves it pending: an ack takes it off
            await self._bus.nc.publish(d.msg.reply, b"+ACK")
        except BUS_ERRORS as exc:  # not acked: it comes back after its delay, and is let go then
            log.debug("could not ack waiting task %s: %s", d.task.id, exc)
            return
        self._settler.counts.cancelled += 1
        if self.cancels.was_queued(d.task.id):
            await _cancel.fetched(self._bus, d.task)

    async def _abandon(self, msg: Msg, task: Task, why: str) -> None:
        """Let a cancelled task go: the hub recorded its end (a ``cancelled`` event), so an ack is all;
        and, cancelled while queued, it is no longer among the queue's cancelled tasks (hive_bus._cancel).
        A task whose outcome this worker recorded was not cancelled (the cancel came second): not here."""
        log.info("worker %s lets task %s go: %s", self.id, task.id, why)
        try:
            await msg.ack()
        except BUS_ERRORS as exc:  # not acked: it comes back, and is let go then
            log.debug("could not ack cancelled task %s: %s", task.id, exc)
        self._settler.counts.cancelled += 1
        if self.cancels.was_queued(task.id):
            with anyio.move_on_after(3):
                await _cancel.fetched(self._bus, task)

    async def _ended_already(self, msg: Msg, task: Task, end: TaskEvent) -> None:
        """Let go a task delivered again whose end is recorded (the last event of it under this
        provider, after which a new run would have queued it again): an ack, and no call."""
        log.info("worker %s lets task %s go: it has ended already (%s)", self.id, task.id, status_of(end))
        try:
            await msg.ack()
        except BUS_ERRORS as exc:  # not acked: it comes back, and is let go then
            log.debug("could not ack ended task %s: %s", task.id, exc)
        if isinstance(end, Cancelled | Failed) and _cancel.counted_for(end, task):
            with anyio.move_on_after(3):
                await _cancel.fetched(self._bus, task)  # it ended while queued: off the count

    async def _last_event(self, task: Task) -> TaskEvent | None:
        """A redelivered task's last event on this provider (a worker credential may read no other
        provider's events; a task moved here starts anew): how many earlier deliveries only waited out a
        rate limit (its ``waits``), and whether the delivery before this one ended with an outcome (a
        ``retrying`` event) or without. None when unknown: every delivery then counts as an attempt, and
        as one that ended without an outcome (the safe side both ways)."""
        names = self._bus.names
        subject = names.events_of(task.id, self._opts.provider)
        try:
            stream = names.events_stream_of(self._opts.provider)
            raw = await self._bus.js.get_last_msg(stream, subject, direct=True)
            return decode_event(raw.subject or "", raw.data, raw.headers)
        except (*BUS_ERRORS, msgspec.DecodeError):
            return None

    # pick a key (which key may call is KeyRing's answer, _keys.py) -------------------------------

    async def _acquire(self, task: Task) -> tuple[ProviderKey, Reservation | None] | Blocked | None:
        """A key that may call now (:meth:`KeyRing.pick`), with its budget reserved. While every key is
        held for at most ``hold_max_s`` the task waits here; for longer, the reason and the wait come
        back. None when the provider refused every key, or none has quota for the task's model."""
        model = task.model or self.model
        tokens = _estimate_tokens(task)
        while True:
            got = await self.ring.pick(model, tokens)
            if not isinstance(got, Blocked):
                return None if got is None else (self._by_name[got[0]], got[1])
            if got.wait_s > min(self._opts.hold_max_s, task.max_wait_s) or got.quota == "day":
                return got
            with anyio.move_on_after(got.wait_s):
                await self._stopping.wait()
            if self._stopping.is_set():
                return got

    # call ----------------------------------------------------------------------------------------

    async def _call(self, provider: Provider, task: Task, d: Delivery) -> Outcome:
        """The provider's outcome, checked; its time limit is the caller's cancel scope."""
        outcome: Outcome
        try:
            if task.stream:
                outcome = await run_streamed(provider, task, self._chunk_sender(task, d))
            else:
                outcome = await provider.complete(task)
        except ProviderError as exc:
            outcome = exc
        except asyncio.CancelledError:
            if being_cancelled():  # a cancel of the call (time limit, the task cancelled) or the worker
                raise
            # the provider's own (a future it awaited was cancelled): a failure of the call; let through,
            # it would end every lane and stop the worker without a word while its process lived on
            why = f"{task.provider} raised CancelledError while nothing cancelled its call"
            log.error("provider %s raised an unexpected error on task %s: %s", task.provider, task.id, why)
            outcome = RetryLater(why)
        except Exception as exc:
            # no traceback: its frames may hold the key; the filter on the handlers scrubs the text
            why = _redact.scrub(_utf8(describe(exc)))  # logged too: a stream is UTF-8
            log.error("provider %s raised an unexpected error on task %s: %s", task.provider, task.id, why)
            outcome = RetryLater(why)
        if isinstance(outcome, ProviderError):
            # what a provider says may echo the key (a 429 body's quotaId): out before it is stored or logged
            # and a lone surrogate (a file name os.fsdecode gave) as its escape: an event is UTF-8
            outcome.message = _redact.scrub(_utf8(outcome.message))
            outcome.args = (outcome.message,)
        if not isinstance(outcome, Output | ProviderError):
            outcome = RetryLater(f"{task.provider} returned {type(outcome).__name__}, not an Output")
        elif isinstance(outcome, Output):
            try:  # every reader of the completed event must be able to decode it
                if _output.wants_json(task.response_format):
                    # checked here, for every provider alike: the output the task asked for, parsed
                    value = _output.structured(task.response_format, outcome.value)
                    outcome = dataclasses.replace(outcome, value=value)
                check_value(outcome.value, "output")
            except ProviderError as exc:  # InvalidOutput, or FailNow for a schema no output can match
                exc.message = _redact.scrub(exc.message)  # it quotes the output
                exc.args = (exc.message,)
                outcome = exc
            except NestedTooDeep:
                outcome = FailNow(
                    f"{task.provider} returned an output nested deeper than {MAX_NESTING} levels of arrays "
                    "or objects, more than the bus carries"
                )
        return outcome

    def _chunk_sender(self, task: Task, d: Delivery) -> ChunkSender:
        """Where this attempt's chunks go: under this worker's provider, the only one it may publish for."""
        subject = self._bus.names.chunk_subject(self._opts.provider, task.id)
        delivery = d.msg.metadata.num_delivered or 1
        return ChunkSender(
            self._bus.nc, subject, task.id, attempt=d.attempt, delivery=delivery, worker=self.id
        )

    async def _watch_loop(self) -> None:
        """One loop over every task held: publishes the ``running`` event of calls that have lasted
        ``RUNNING_AFTER_S``, and sends an in-progress ack for each that has run a third of AckWait."""
        keepalive_s = self._ack_wait_s * KEEPALIVE_FRACTION
        while True:
            await anyio.sleep(min(RUNNING_AFTER_S, keepalive_s / 2))
            now = anyio.current_time()
            for held in list(self._held.values()):
                if held.running is not None and now - held.started_s >= RUNNING_AFTER_S:
                    running, held.running = held.running, None
                    # appended to the connection's buffer at once: ahead of the task's later events
                    await self._publish_quietly(running)
                if now - held.touched_s >= keepalive_s:
                    held.touched_s = now
                    try:
                        await held.msg.in_progress()
                    except nats.errors.Error as exc:
                        log.warning("in-progress ack failed: %s", exc)

    async def _publish_quietly(self, event: TaskEvent) -> None:
        # Informational events go out without waiting for the store's ack; the connection keeps them
        # in order ahead of the task's later (acknowledged) events.
        subject = self._bus.names.event_subject(event.provider, event.task_id, status_of(event))
        try:
            data = encoder.encode(event)
            check_fits(self._bus.nc, data, what=f"{type(event).__name__} event")
            await self._bus.nc.publish(subject, data)
        except (*BUS_ERRORS, TooLarge) as exc:
            log.debug("could not publish %s event: %s", type(event).__name__, exc)

    # settle (the Settler acks, NAKs or TERMs; here what it needs from the worker) ----------------

    async def _spent(self, reservation: Reservation, outcome: Outcome) -> None:
        usage = outcome.usage if isinstance(outcome, Output) else None
        tokens = usage.input_tokens + usage.output_tokens if usage is not None else None
        try:
            await self.budgets.settle(reservation, tokens)
        except BUS_ERRORS as exc:
            log.warning("could not record a call in the %s budget: %s", self._opts.provider, exc)

    async def _no_key_left(self, d: Delivery) -> None:
        """No key may call for this task (each refused by the provider, or without quota for its model):
        move the task on, or fail it with the provider's word."""
        model = d.task.model or self.model
        why = "; ".join(self.ring.set_aside_reasons(model))
        if len(self._keys) > 1:
            why = f"no key of this worker can call {self._opts.provider} for this task: {why}"
        moved = d.task.next_hop()
        if moved is not None:
            await self._settler.move(d, moved, why)
        else:
            await self._settler.fail(d, "permanent", why)

    async def _reject_undecodable(self, msg: Msg, exc: Exception) -> None:
        seq = msg.metadata.sequence.stream
        task_id = _claimed_id(msg.data) or f"undecodable-{seq}"
        provider = self._opts.provider
        error = f"task message {seq} on {msg.subject} is not a valid task: {exc}"
        log.warning("%s; terminated and dead-lettered", error)
        event = Failed(
            task_id=task_id, provider=provider, at_ms=now_ms(), attempt=0, worker=self.id,
            reason="undecodable", error=error, raw=msg.data[:4096].decode("utf-8", "replace"),
        )  # fmt: skip
        await self._settler.reject(msg, event)

    # heartbeats ----------------------------------------------------------------------------------

    def beat(self) -> WorkerBeat:
        return WorkerBeat(
            worker_id=self.id,
            provider=self._opts.provider,
            host=self._host,
            pid=os.getpid(),
            version=__version__,
            state="draining" if self._stopping.is_set() else "running",
            concurrency=self._opts.concurrency,
            in_flight=self._in_flight,
            completed=self._counts.completed,
            failed=self._counts.failed,
            retried=self._counts.retried,
            started_at_ms=self._started_at_ms,
            at_ms=now_ms(),
            model=self.model,
            keys=[k.name for k in self._keys],
            waiting=self._waiting[0] if self._waiting else None,
            waiting_until_ms=self._waiting[1] if self._waiting else 0,
        )

    async def _beat_loop(self) -> None:
        interval_s = self._bus.settings.heartbeat_interval_s
        while True:
            await anyio.sleep(interval_s)
            await self._beat_once()

    async def _beat_once(self) -> None:
        try:
            await self._bus.workers_kv.put(self.id, encoder.encode(self.beat()))
        except BUS_ERRORS as exc:
            log.warning("heartbeat of %s not written: %s", self.id, exc)
            await redeclare_workers_bucket(self._bus)  # a restarted server has lost the bucket

    async def _forget_beat(self) -> None:
        try:
            await self._bus.workers_kv.delete(self.id)
        except BUS_ERRORS as exc:
            log.debug("heartbeat of %s not removed (%s); it expires by itself", self.id, exc)


async def _close(provider: Provider) -> None:
    """Providers that hold a client (an HTTP pool) may offer ``aclose``; the worker calls it last."""
    aclose = getattr(provider, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception as exc:
            log.debug("closing the provider failed: %s", exc)


async def _nak_now(msg: Msg) -> None:
    try:
        await msg.nak()
    except nats.errors.Error as exc:
        log.debug("NAK failed (%s); the task returns after AckWait", exc)


def _utf8(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) written as its ``\\udcff`` escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _estimate_tokens(task: Task) -> int:
    """Tokens a call may spend, counted against a tokens-per-minute budget until the real figure is in:
    about four characters a token in, and the task's output cap (or a typical answer) out."""
    if task.messages is None:
        chars = len(task.prompt) + len(task.system or "")
    else:  # the whole conversation is sent, every turn of it
        chars = sum(len(message.text) for message in task.messages)
    max_out = task.params.max_tokens if task.params and task.params.max_tokens else 256
    return chars // 4 + 1 + max_out


def _worker_id(provider: str, host: str, name: str | None = None, given: str | None = None) -> str:
    """``provider.host-pid-rand`` (or ``provider.<given>``); under a worker credential's name,
    ``name.provider.…``, the heartbeat keys (``$KV.<prefix>_workers.<name>.<provider>.*``) that
    credential may write: readers take a heartbeat only for the provider its key names
    (:func:`hive_bus._messages.beat_of`)."""
    last = (
        _ID_SAFE.sub("-", given)
        if given
        else f"{_ID_SAFE.sub('-', host)[:40]}-{os.getpid()}-{secrets.token_hex(2)}"
    )
    unique = f"{provider}.{last}"
    return f"{name}.{unique}" if name else unique


def _claimed_id(data: bytes) -> str | None:
    """The task id an undecodable message claims, if it carries a well-formed one."""
    try:
        check_json(data, enclosing=1)
        claimed = msgspec.json.decode(data)
    except msgspec.DecodeError:  # NestedTooDeep too: the id is not worth a deep decode
        return None
    value = claimed.get("id") if isinstance(claimed, dict) else None
    return value if isinstance(value, str) and is_task_id(value) else None
