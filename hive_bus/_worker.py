"""The worker runtime: where a task is fetched and run.

One :class:`Worker` serves one provider. It pulls from the provider's durable consumer (shared by every
worker of that provider, wherever it runs), runs up to ``concurrency`` calls at once, keeps each task
alive with in-progress acks while its call runs, and hands every outcome to :class:`Settler`
(``_settle.py``), the one place that acks, NAKs or TERMs. While the provider is cooling down after a
429, the worker does not fetch, and hands back what it holds without calling the provider.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from ._bus import Bus, ensure_consumer
from ._cooldown import ProviderCooldown
from ._errors import ProviderError, RetryLater
from ._messages import (
    Failed,
    Retrying,
    Running,
    Task,
    TaskEvent,
    WorkerBeat,
    encoder,
    event_decoder,
    is_task_id,
    now_ms,
    status_of,
    task_decoder,
)
from ._prices import PriceTable
from ._providers import Output, Provider
from ._settle import Backoff, Delivery, Outcome, Settler
from ._version import __version__

log = logging.getLogger("hive_bus.worker")

# A call that runs longer than this fraction of AckWait gets an in-progress ack, and another one each
# time that much more has passed: the server never sees a live call as a dead worker.
KEEPALIVE_FRACTION = 1 / 3
# A task's "running" event is published once its call has lasted this long. Quicker tasks go straight
# from queued to completed (their completed event says when they started, where, and which attempt):
# a status nobody could have seen is not worth a stored message per task.
RUNNING_AFTER_S = 0.25
_ID_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    provider: str
    concurrency: int = 4
    drain_timeout_s: float = 30.0
    call_timeout_s: float = 600.0
    # How long one fetch waits on the server for work; also bounds how fast a stop is noticed.
    fetch_wait_s: float = 2.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    worker_id: str | None = None
    prices: PriceTable | None = None


@dataclass(slots=True)
class _Held:
    """A task this worker holds: when the server last had a sign of life for it, and its ``running``
    event until that is published (only for calls that last; see :meth:`Worker._watch_loop`)."""

    msg: Msg
    started_s: float
    touched_s: float
    running: Running | None = None


class Worker:
    """Runs one provider's tasks from the bus until :meth:`stop` is called or it is cancelled."""

    def __init__(self, bus: Bus, provider: Provider, options: WorkerOptions) -> None:
        self._bus = bus
        self._provider = provider
        self._opts = options
        self._host = socket.gethostname()
        self.id = options.worker_id or _worker_id(options.provider, self._host, bus.settings.worker_name)
        self._stopping = anyio.Event()
        self._changed = anyio.Event()
        self._in_flight = 0
        self._held: dict[int, _Held] = {}
        self._ack_wait_s = bus.settings.ack_wait_s
        names = bus.names
        self.cooldown = ProviderCooldown(bus.nc, bus.providers_kv, names.providers_bucket, options.provider)
        backoff = Backoff(options.backoff_base_s, options.backoff_cap_s)
        self._settler = Settler(bus, self.id, self.cooldown, options.prices or PriceTable(), backoff)
        self._counts = self._settler.counts
        self._started_at_ms = now_ms()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def stop(self) -> None:
        """Stop taking work; finish what is in flight (NAK it after ``drain_timeout_s``), then return."""
        self._stopping.set()
        self._notify()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        bus, opts = self._bus, self._opts
        info = await self._find_consumer()
        if info is None:  # stopped before the bus answered
            task_status.started()
            return
        self._ack_wait_s = info.config.ack_wait or bus.settings.ack_wait_s
        psub = await bus.js.pull_subscribe_bind(
            durable=bus.names.consumer(opts.provider), stream=bus.names.tasks_stream
        )
        cooldown_sub = await self.cooldown.subscribe()
        log.info("worker %s serving %s (concurrency %d)", self.id, opts.provider, opts.concurrency)
        try:
            async with anyio.create_task_group() as beats:
                beats.start_soon(self._beat_loop)
                beats.start_soon(self._watch_loop)
                beats.start_soon(self.cooldown.follow, cooldown_sub)
                task_status.started()
                # ``concurrency`` lanes take fetched tasks from a memory stream: bounded concurrency
                # without starting a task per message.
                send, receive = anyio.create_memory_object_stream[Msg](max_buffer_size=opts.concurrency)
                with receive:
                    async with anyio.create_task_group() as calls:
                        for _ in range(opts.concurrency):
                            calls.start_soon(self._lane, receive)
                        with send:
                            await self._fetch_loop(psub, send)
                        await self._drain(calls)
                beats.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                await psub.unsubscribe()
                await cooldown_sub.unsubscribe()
                await self._forget_beat()
                await _close(self._provider)
            log.info("worker %s stopped: %s", self.id, self._counts)

    async def _find_consumer(self) -> ConsumerInfo | None:
        """The provider's consumer; waits for JetStream while it does not answer (a server restarting)."""
        while not self._stopping.is_set():
            try:
                return await ensure_consumer(self._bus.js, self._bus.settings, self._opts.provider)
            except (
                TimeoutError,
                nats.errors.NoRespondersError,
                nats.js.errors.ServiceUnavailableError,
            ) as exc:
                log.warning(
                    "JetStream did not answer (%s); worker %s waits for it", type(exc).__name__, self.id
                )
                with anyio.move_on_after(1):
                    await self._stopping.wait()
        return None

    # fetch ---------------------------------------------------------------------------------------

    async def _fetch_loop(
        self, psub: JetStreamContext.PullSubscription, lanes: MemoryObjectSendStream[Msg]
    ) -> None:
        opts = self._opts
        while not self._stopping.is_set():
            await self._wait_for(lambda: self._in_flight < opts.concurrency or self._stopping.is_set())
            await self.cooldown.wait_until_clear(self._stopping)  # a 429 elsewhere: fetch nothing
            if self._stopping.is_set():
                return
            try:
                msgs = await psub.fetch(batch=opts.concurrency - self._in_flight, timeout=opts.fetch_wait_s)
            except TimeoutError:  # nats-py raises its own subclass or the builtin: no work yet
                continue
            except Exception as exc:  # a broken connection, a deleted consumer: log, pause, go on
                log.warning(
                    "fetch from %s failed: %s; trying again", self._bus.names.consumer(opts.provider), exc
                )
                with anyio.move_on_after(1):
                    await self._stopping.wait()
                continue
            for msg in msgs:
                if self._stopping.is_set():
                    await _nak_now(msg)  # fetched as the stop came: let another worker have it at once
                    continue
                self._in_flight += 1
                lanes.send_nowait(msg)  # never blocks: at most one message per free lane is fetched

    async def _drain(self, calls: TaskGroup) -> None:
        if self._in_flight:
            log.info("worker %s draining %d task(s)", self.id, self._in_flight)
        with anyio.move_on_after(self._opts.drain_timeout_s):
            await self._wait_for(lambda: self._in_flight == 0)
        # Whatever is still running now is cancelled; _handle NAKs it for prompt redelivery.
        calls.cancel_scope.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait_for(self, predicate: Any) -> None:
        while not predicate():
            await self._changed.wait()

    # one task ------------------------------------------------------------------------------------

    async def _lane(self, receive: MemoryObjectReceiveStream[Msg]) -> None:
        async for msg in receive:
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
        delivered = msg.metadata.num_delivered or 1
        waits = await self._waits_so_far(task) if delivered > 1 else 0
        d = Delivery(msg=msg, task=task, attempt=delivered - waits, waits=waits, started_ms=now_ms())
        if (left_s := self.cooldown.remaining_s()) > 0:
            # The provider is cooling down: hand the task back without a call and without an attempt.
            reason = self.cooldown.current.reason if self.cooldown.current else "rate limited"
            quota = self.cooldown.current.quota if self.cooldown.current else "unknown"
            with anyio.CancelScope(shield=True):
                await self._settler.wait_out(
                    d, left_s, f"waiting out the {task.provider} cooldown: {reason}", quota, called=False
                )
            return
        if d.attempt > task.max_attempts:
            # Delivered again after crashes or ack timeouts; no call is made.
            error = f"delivered {d.attempt - 1} times without an outcome (worker crashes or ack timeouts)"
            with anyio.CancelScope(shield=True):
                await self._settler.fail(d, error)
            return
        held.running = Running(
            task_id=task.id,
            provider=task.provider,
            at_ms=d.started_ms,
            attempt=d.attempt,
            worker=self.id,
            submitted_at_ms=task.submitted_at_ms,
            waits=waits,
        )
        t0 = time.perf_counter()
        outcome = await self._call(task)
        held.running = None  # too late to say: the outcome is next
        with anyio.CancelScope(shield=True):
            await self._settler.settle(d, outcome, time.perf_counter() - t0)

    async def _waits_so_far(self, task: Task) -> int:
        """How many earlier deliveries of a redelivered task only waited out a rate limit."""
        names = self._bus.names
        try:
            raw = await self._bus.js.get_last_msg(names.events_stream, names.events_of(task.id), direct=True)
            event = event_decoder.decode(raw.data or b"")
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, msgspec.DecodeError):
            return 0  # unknown: count every delivery as an attempt, the safe side
        return event.waits if isinstance(event, Running | Retrying) else 0

    async def _call(self, task: Task) -> Outcome:
        outcome: Outcome
        try:
            with anyio.fail_after(self._opts.call_timeout_s):
                outcome = await self._provider.complete(task)
        except ProviderError as exc:
            outcome = exc
        except TimeoutError:
            outcome = RetryLater(f"{task.provider} gave no answer within {self._opts.call_timeout_s:g}s")
        except Exception as exc:
            log.exception("provider %s raised an unexpected error on task %s", task.provider, task.id)
            outcome = RetryLater(f"{type(exc).__name__}: {exc}")
        if not isinstance(outcome, Output | ProviderError):
            outcome = RetryLater(f"{task.provider} returned {type(outcome).__name__}, not an Output")
        return outcome

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
            await self._bus.nc.publish(subject, encoder.encode(event))
        except nats.errors.Error as exc:
            log.debug("could not publish %s event: %s", type(event).__name__, exc)

    async def _reject_undecodable(self, msg: Msg, exc: Exception) -> None:
        seq = msg.metadata.sequence.stream
        task_id = _claimed_id(msg.data) or f"undecodable-{seq}"
        provider = self._opts.provider
        error = f"task message {seq} on {msg.subject} is not a valid task: {exc}"
        log.warning("%s; terminated", error)
        event = Failed(
            task_id=task_id, provider=provider, at_ms=now_ms(), attempt=0, worker=self.id,
            reason="undecodable", error=error,
        )  # fmt: skip
        subject = self._bus.names.event_subject(provider, task_id, "failed")
        try:
            await self._bus.js.publish(subject, encoder.encode(event), stream=self._bus.names.events_stream)
        finally:
            await msg.term()
        self._counts.failed += 1

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
        )

    async def _beat_loop(self) -> None:
        interval_s = self._bus.settings.heartbeat_interval_s
        while True:
            try:
                await self._bus.workers_kv.put(self.id, encoder.encode(self.beat()))
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                log.warning("heartbeat of %s not written: %s", self.id, exc)
            await anyio.sleep(interval_s)

    async def _forget_beat(self) -> None:
        try:
            await self._bus.workers_kv.delete(self.id)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
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


def _worker_id(provider: str, host: str, name: str | None = None) -> str:
    """``provider-host-pid-rand``; under a worker credential's name, ``name.provider-host-pid-rand``,
    the heartbeat keys (``$KV.<prefix>_workers.<name>.>``) that credential may write."""
    unique = f"{provider}-{_ID_SAFE.sub('-', host)[:40]}-{os.getpid()}-{secrets.token_hex(2)}"
    return f"{name}.{unique}" if name else unique


def _claimed_id(data: bytes) -> str | None:
    """The task id an undecodable message claims, if it carries a well-formed one."""
    try:
        claimed = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    value = claimed.get("id") if isinstance(claimed, dict) else None
    return value if isinstance(value, str) and is_task_id(value) else None
