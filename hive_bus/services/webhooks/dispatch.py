"""Webhooks, delivered by the gateway from the bus, at least once, never in a task's way.

Durable consumers, shared by every gateway of the bus:

1. tasks' final events (:func:`source.final_events`, one consumer a provider's events stream, each
   stream followed as it appears): for each event that counts (recorded under the
   provider its task is assigned to, ``hive_bus._assigned``), one :class:`Delivery` per receiver (the
   task's own webhook, and each gateway-wide one that wants that kind of event) goes into the
   ``<PREFIX>_WEBHOOKS`` queue, de-duplicated by its webhook id; then the event is acked. The webhook
   URL is the task's as the bus knows it (its message in the tasks stream), never a worker's copy.
2. the deliveries: each is signed and POSTed; a 2xx acks it. A failure NAKs it with the next delay of
   ``retry_s`` (a timer in the server: a restart of the gateway, or another gateway, takes it up when it
   runs out), so the id and body stay those of the first attempt; past the last delay it is given up
   (TERM). Every attempt updates the delivery's record (``records``) and the counters.

The address is checked again at each attempt and the request goes to the very address checked
(``urls``). No redirect is followed, answers are not read, and an attempt lasts ``timeout_s`` at most.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import nats.aio.msg
from anyio.abc import TaskStatus
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from hive_bus import __version__
from hive_bus._assigned import assignment
from hive_bus._errors import HiveError, TooLarge
from hive_bus._events import watch_providers
from hive_bus._messages import Task, TaskEvent, decode_event, now_ms
from hive_bus._nats import BUS_ERRORS, unsubscribe
from hive_bus._size import js_publish
from hive_bus.bus import Bus

from . import records, urls
from .config import Signer, WebhookConfigError, WebhookSettings
from .payload import payload, webhook_id, without_output
from .records import Delivery, DeliveryRecord, DeliveryStatus
from .source import final_events, final_events_followed

log = logging.getLogger("hive_bus.webhooks")

FETCH_WAIT_S = 2.0
AT_ONCE = 64  # events queued, or deliveries made, at once by one gateway
PENDING_EVERY_S = 5.0
RESULTS = ("delivered", "retrying", "failed", "refused")


class _Pending:
    """``hive_webhook_deliveries_pending``: deliveries queued and not yet made or given up (waiting
    retries included), as the consumer last counted them."""

    def __init__(self) -> None:
        self.value: int | None = None

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(
            "hive_webhook_deliveries_pending",
            "Webhook deliveries queued and not yet delivered or given up (waiting retries included)",
        )
        if self.value is not None:
            gauge.add_metric([], self.value)
        yield gauge


class Webhooks:
    """``await tg.start(webhooks.run)`` in the gateway: queues and makes webhook deliveries."""

    def __init__(
        self, bus: Bus, settings: WebhookSettings, registry: CollectorRegistry | None = None
    ) -> None:
        if settings.signer is None:
            raise WebhookConfigError("webhooks need HIVE_WEBHOOK_SECRET (or HIVE_WEBHOOK_SECRET_FILE)")
        self._bus = bus
        self._settings = settings
        self._signer: Signer = settings.signer
        registry = registry or CollectorRegistry()
        self._results = Counter(
            "hive_webhook_deliveries",
            "Webhook delivery attempts by result: delivered; retrying (failed, tried again later); "
            "failed (the last retry failed: given up); refused (the address is not allowed)",
            ["result"],
            registry=registry,
        )
        for result in RESULTS:
            self._results.labels(result)
        # Unlabelled, so that it exists at 0 from the start and its first increase shows in increase().
        self._unexpected = Counter(
            "hive_webhook_delivery_errors",
            "Webhook delivery attempts that failed on an unexpected error in the gateway (a bug: the "
            "gateway's log names the delivery and where); each is retried, then given up, as a failed POST is",
            registry=registry,
        )
        self._pending = _Pending()
        registry.register(self._pending)
        self._counted_at = -math.inf

    async def check(self) -> None:
        """Raise :class:`WebhookConfigError` for a gateway-wide webhook whose address is not allowed
        (the operator's own setting: it stops the start, where a task's is refused on submission)."""
        for endpoint in self._settings.endpoints:
            try:
                await urls.check(endpoint.url, self._settings.allow_networks)
            except urls.Refused as exc:
                raise WebhookConfigError(f"gateway-wide webhook {urls.shown(endpoint.url)}: {exc}") from None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.check()
        await records.declare(self._bus, self._settings)
        events: list[JetStreamContext.PullSubscription] = []
        deliveries = await self._deliveries()
        # The transport itself, not a client: it follows no redirect, reads no proxy from the
        # environment (which would make the request from elsewhere), and logs no URL (a client logs
        # each request's, query and all, at INFO).
        # No kept-alive connections: the pool knows a connection by its address, and one made for a
        # name must never carry a request for another name at the same address.
        transport = httpx.AsyncHTTPTransport(retries=0, limits=httpx.Limits(max_keepalive_connections=0))
        try:
            # A provider's stream without the consumer is followed from its start when webhooks have
            # run on this bus before (the stream is newer than they are), or appears while they run;
            # else (webhooks new to the bus) from now.
            ran_before = await final_events_followed(self._bus)
            async with transport as client, anyio.create_task_group() as tg:
                listed = False  # the streams there are at the start are followed

                async def on_new(provider: str) -> None:
                    tg.start_soon(self._follow_events, provider, listed or ran_before, events)

                await tg.start(
                    lambda task_status: watch_providers(self._bus, on_new, task_status=task_status)
                )
                listed = True
                deliver = functools.partial(self._deliver, client)
                tg.start_soon(self._loop, deliveries, deliver, "deliveries", self._count_pending)
                task_status.started()
        finally:
            for sub in events:
                await unsubscribe(sub, timeout_s=3)
            await unsubscribe(deliveries, timeout_s=3)

    async def _follow_events(
        self, provider: str, from_start: bool, subs: list[JetStreamContext.PullSubscription]
    ) -> None:
        """Queue the deliveries of the final events of ``provider``'s tasks (its stream appeared since
        the start: ``from_start``), binding to its consumer until the bus answers."""
        while True:
            try:
                sub = await final_events(self._bus, provider, from_start=from_start)
                break
            except BUS_ERRORS as exc:
                log.warning(
                    "webhooks: cannot follow the final events of %s (%s); trying again", provider, exc
                )
                await anyio.sleep(5)
        subs.append(sub)
        await self._loop(sub, self._queue_or_set_aside, f"events of {provider}")

    async def _deliveries(self) -> JetStreamContext.PullSubscription:
        names = self._bus.names
        config = ConsumerConfig(
            durable_name=names.webhooks_consumer,
            description="hive-bus webhooks: deliveries to make",
            filter_subject=names.all_webhooks,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=max(30.0, 3 * self._settings.timeout_s),
            # attempts are counted here, against retry_s; a delivery waiting for its retry is pending
            max_deliver=-1,
            max_ack_pending=self._settings.max_pending,
        )
        return await self._bus.js.pull_subscribe(
            names.all_webhooks, durable=names.webhooks_consumer, stream=names.webhooks_stream, config=config
        )

    async def _loop(
        self,
        sub: JetStreamContext.PullSubscription,
        handle: Callable[[nats.aio.msg.Msg], Coroutine[Any, Any, None]],
        what: str,
        after: Callable[[JetStreamContext.PullSubscription], Awaitable[None]] | None = None,
    ) -> None:
        """Handle up to :data:`AT_ONCE` messages at a time, fetching more as soon as one is done (a
        receiver that never answers holds one slot for its timeout, not a whole batch); ``after``
        each fetch."""
        slots = anyio.Semaphore(AT_ONCE)

        async def handled(msg: nats.aio.msg.Msg) -> None:
            try:
                await handle(msg)
            finally:
                slots.release()

        async with anyio.create_task_group() as tg:
            while True:
                async with slots:  # wait for a free one
                    pass
                try:
                    msgs = await sub.fetch(batch=slots.value, timeout=FETCH_WAIT_S)
                except TimeoutError:
                    msgs = []
                except BUS_ERRORS as exc:
                    log.warning("webhooks: fetching %s failed (%s); trying again", what, exc)
                    await anyio.sleep(1)
                    continue
                for msg in msgs:
                    # a fetch hands over what earlier pull requests brought after theirs ended, too:
                    # more than were free may come, and wait for a slot
                    await slots.acquire()
                    tg.start_soon(handled, msg)
                if after is not None:
                    await after(sub)

    async def _count_pending(self, sub: JetStreamContext.PullSubscription) -> None:
        """The pending gauge, read from the consumer at most every few seconds."""
        if anyio.current_time() - self._counted_at < PENDING_EVERY_S:
            return
        self._counted_at = anyio.current_time()
        with contextlib.suppress(*BUS_ERRORS):
            info = await sub.consumer_info()
            self._pending.value = (info.num_pending or 0) + (info.num_ack_pending or 0)

    # queueing ----------------------------------------------------------------------------------------

    async def _queue_or_set_aside(self, msg: nats.aio.msg.Msg) -> None:
        """An event that cannot be decoded or processed is poison: logged (by its place) and
        terminated, never redelivered for ever."""
        try:
            await self._queue(msg)
        except (*BUS_ERRORS, HiveError) as exc:
            log.warning("webhooks: event %s not queued yet (%s); it comes back", _seq(msg), exc)
            with contextlib.suppress(*BUS_ERRORS):
                await msg.nak(delay=5.0)
        except Exception as exc:
            log.error(
                "webhooks: event %s could not be processed (%s); terminated", _seq(msg), type(exc).__name__
            )
            with contextlib.suppress(*BUS_ERRORS):
                await msg.term()

    async def _queue(self, msg: nats.aio.msg.Msg) -> None:
        names = self._bus.names
        try:
            event = decode_event(msg.subject, msg.data, msg.headers)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            log.error("webhooks: event %s does not decode (%s); terminated", _seq(msg), exc)
            await msg.term()
            return
        provider, status = names.provider_of_subject(msg.subject), names.status_of_subject(msg.subject)
        here = await assignment(self._bus, event.task_id)
        if (
            here is None
            or here.provider != provider
            or event.provider != provider
            or msg.metadata.sequence.stream < here.seq
        ):
            # not the outcome of the task as the bus has it (a forged one, or an earlier run's)
            log.debug("webhooks: event %s on %s does not count; nothing sent", _seq(msg), msg.subject)
            await msg.ack()
            return
        kind = f"task.{status}"
        task = here.task
        wanted = [task.webhook.url] if task.webhook and kind in task.webhook.events else []
        wanted += [e.url for e in self._settings.endpoints if kind in e.events]
        for url in dict.fromkeys(wanted):
            await self._enqueue(kind, event, task, url, status)
        await msg.ack()

    async def _enqueue(self, kind: str, event: TaskEvent, task: Task, url: str, status: str) -> None:
        names = self._bus.names
        wid = webhook_id(task, status, url)
        at = now_ms()
        await records.write(
            self._bus,
            DeliveryRecord(
                id=wid, url=urls.shown(url), event=kind, task_id=task.id, status="pending",
                created_at_ms=at, updated_at_ms=at,
            ),
            only_if_new=True,
        )  # fmt: skip
        body = payload(kind, event, task)
        for attempt in (body, without_output(body)):
            delivery = Delivery(
                id=wid, url=url, event=kind, task_id=task.id, created_at_ms=at, body=msgspec.Raw(attempt)
            )
            try:
                await js_publish(
                    self._bus.js, self._bus.nc, names.webhook_subject(wid), records.encoder.encode(delivery),
                    stream=names.webhooks_stream, headers={"Nats-Msg-Id": wid}, what="webhook delivery",
                )  # fmt: skip
                return
            except TooLarge:
                continue  # an output and metadata too large together: sent without them
        log.error("webhooks: the delivery %s of task %s does not fit a message; not sent", wid, task.id)

    # delivering --------------------------------------------------------------------------------------

    async def _deliver(self, client: httpx.AsyncHTTPTransport, msg: nats.aio.msg.Msg) -> None:
        try:
            delivery = records.delivery_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("webhooks: delivery %s does not decode (%s); terminated", _seq(msg), exc)
            with contextlib.suppress(*BUS_ERRORS):
                await msg.term()
            return
        attempt = msg.metadata.num_delivered or 1
        error: str | None
        code: int | None
        try:
            target = await urls.check(delivery.url, self._settings.allow_networks)
        except urls.Refused as exc:
            log.warning("webhooks: %s to %s refused: %s", delivery.id, urls.shown(delivery.url), exc)
            await self._settle(msg, delivery, "refused", attempt, str(exc))
            return
        except Exception as exc:
            error, code = self._unexpected_error(delivery, exc), None
        else:
            try:
                error, code = await self._post(client, target, delivery)
            except Exception as exc:
                error, code = self._unexpected_error(delivery, exc), None
        if error is None:
            await self._settle(msg, delivery, "delivered", attempt, None, code)
        elif attempt > len(self._settings.retry_s):
            log.warning(
                "webhooks: %s to %s given up after %d attempts: %s",
                delivery.id, urls.shown(delivery.url), attempt, error,
            )  # fmt: skip
            await self._settle(msg, delivery, "failed", attempt, error, code)
        else:
            await self._settle(msg, delivery, "retrying", attempt, error, code)

    def _unexpected_error(self, delivery: Delivery, exc: Exception) -> str:
        """An error no attempt should meet (a bug), which must not stop the gateway: logged by the
        delivery's id, its URL as shown, the error's type and where it was raised (not its text, which
        may hold the URL whole, its credentials and query with it), and counted; the attempt fails with
        it as a failed POST does (retried after the next delay, given up after the last)."""
        self._unexpected.inc()
        frame = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" at {Path(frame[0].filename).name}:{frame[0].lineno}" if frame else ""
        log.error(
            "webhooks: delivery %s to %s failed on an unexpected %s%s; it is retried as a failed one",
            delivery.id, urls.shown(delivery.url), type(exc).__name__, where,
        )  # fmt: skip
        return f"unexpected error in the gateway ({type(exc).__name__}); see its log"

    async def _post(
        self, client: httpx.AsyncHTTPTransport, target: urls.Target, delivery: Delivery
    ) -> tuple[str | None, int | None]:
        """POST the delivery to the checked address; (None, status) for a 2xx, else (why, status)."""
        body = bytes(delivery.body)
        address = target.addresses[0]
        default_port = 443 if target.scheme == "https" else 80
        url = httpx.URL(delivery.url)
        # the name as it goes on the wire: an internationalised one in its ASCII form (xn--...), which
        # the Host header and the TLS server name must carry (non-ASCII, the header is not encodable)
        name = url.raw_host.decode("ascii")
        host = f"[{name}]" if ":" in name else name
        headers = {
            "content-type": "application/json",
            "user-agent": f"hive-bus/{__version__}",
            "host": host if target.port == default_port else f"{host}:{target.port}",
            **self._signer.headers(delivery.id, body, datetime.now(UTC)),
        }
        url = url.copy_with(host=str(address))
        timeout_s = self._settings.timeout_s
        extensions: dict[str, Any] = {"timeout": httpx.Timeout(timeout_s).as_dict()}
        if target.scheme == "https":
            extensions["sni_hostname"] = name  # the certificate is checked for the name, not the address
        request = httpx.Request("POST", url, content=body, headers=headers, extensions=extensions)
        try:
            with anyio.fail_after(timeout_s + 1):  # each phase has timeout_s; the whole attempt too
                response = await client.handle_async_request(request)
                code = response.status_code
                await response.aclose()  # the answer's body is not read: its status says all
        except (httpx.TimeoutException, TimeoutError):
            return f"no answer within {self._settings.timeout_s:g} s", None
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}", None
        if 200 <= code < 300:
            return None, code
        if 300 <= code < 400:
            return f"answered {code}, a redirect (not followed)", code
        return f"answered {code}", code

    async def _settle(
        self,
        msg: nats.aio.msg.Msg,
        delivery: Delivery,
        status: DeliveryStatus,
        attempt: int,
        error: str | None,
        code: int | None = None,
    ) -> None:
        """Record the attempt, then ack (delivered), NAK with the next delay (retrying) or TERM."""
        now = now_ms()
        delay_s = self._settings.retry_s[attempt - 1] if status == "retrying" else None
        record = DeliveryRecord(
            id=delivery.id, url=urls.shown(delivery.url), event=delivery.event, task_id=delivery.task_id,
            status=status, attempts=attempt, created_at_ms=delivery.created_at_ms, updated_at_ms=now,
            last_error=error, last_status_code=code,
            next_try_at_ms=None if delay_s is None else now + int(delay_s * 1000),
        )  # fmt: skip
        self._results.labels(status).inc()
        try:
            await records.write(self._bus, record)
            if status == "delivered":
                await msg.ack()
            elif delay_s is not None:
                await msg.nak(delay=delay_s)
            else:
                await msg.term()
        except BUS_ERRORS as exc:
            # unsettled, it comes back after the consumer's AckWait: sent again under the same id
            log.warning("webhooks: delivery %s not settled (%s); it comes back", delivery.id, exc)
        except Exception as exc:  # a bug, which must not stop the gateway: unsettled, it comes back too
            self._unexpected.inc()
            log.error(
                "webhooks: delivery %s not settled on an unexpected %s; it comes back",
                delivery.id, type(exc).__name__,
            )  # fmt: skip


def _seq(msg: nats.aio.msg.Msg) -> str:
    try:
        return str(msg.metadata.sequence.stream)
    except Exception:
        return "?"
