"""Which providers a worker serves now, or served in the last day: what a submission is checked against,
so that a typo'd provider (``"gemnii"``) gets a warning instead of a silent ``queued`` forever.

Followed, not asked: two watches (ordered consumers whose callbacks keep a view in memory) of

- the workers bucket, ``<prefix>_workers``: each heartbeat says which provider its worker serves; a
  worker counts as live while its last heartbeat is younger than the heartbeat TTL;
- the served bucket, ``<prefix>_served`` (file storage, a day's TTL per key): one key per provider,
  written by the gateway when it sees a live worker of a provider whose record is older than an hour.
  A key expires a day after its provider's last worker went.

So checking a submission costs no round trip: only the first check of a process waits for the watches'
first answers. A process that follows without recording (a client) reads the served bucket if a
gateway made it, and otherwise knows the live workers alone.

Beside it, :class:`WebhooksSeen`: whether a submission's webhook will be sent at all, that is whether a
gateway with webhooks has run on the bus.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import anyio
import msgspec
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType

from ._bus import Bus, _ensure_bucket
from ._messages import beat_of, now_ms
from ._nats import BUS_ERRORS

log = logging.getLogger("hive_bus.served")

SERVED_TTL_S = 86400.0  # "served in the last day"
# A provider's record is written again once it is this old while a worker serves it: the day is
# counted from the last hour a worker was seen, at one write an hour per provider.
REFRESH_S = 3600.0
SERVED_MAX_BYTES = 1024**2  # one small key per provider
# A process whose served bucket was missing (no gateway made it yet) looks again this often.
RETRY_S = 30.0
# How long a provider's warning is given again as it was worked out, unless a heartbeat or a record came
# in between: every submission to a provider nobody serves asks, and only an expiry can change the
# answer without a message (the providers it names).
WARNING_REUSE_S = 1.0
_KV_OPERATION = "KV-Operation"


_Callback = Callable[[Msg], Awaitable[None]]


class _Record(msgspec.Struct, frozen=True, kw_only=True):
    at_ms: int


_record_decoder = msgspec.json.Decoder(_Record)


def served_bucket_config(bus: Bus) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=bus.names.served_bucket,
        description="hive-bus providers a worker served in the last day (written by the gateway)",
        history=1,
        ttl=SERVED_TTL_S,
        storage=StorageType.FILE,
        replicas=bus.settings.replicas,
        max_bytes=SERVED_MAX_BYTES,
        max_value_size=1024,
    )


class ServedProviders:
    """The providers served now or in the last day, followed from the bus; :meth:`start` once, then
    :meth:`warning` for each submission. ``record`` (the gateway) also writes the served records."""

    def __init__(self, bus: Bus, *, record: bool = False) -> None:
        self._bus = bus
        self._record = record
        self._beats: dict[str, tuple[str, float]] = {}  # worker key -> (provider, monotonic time seen)
        self._served: dict[str, int] = {}  # provider -> when a worker was last recorded (ms)
        self._warnings: dict[str, tuple[str, float]] = {}  # provider -> (warning, monotonic time made)
        self._subs: list[object] = []
        self._served_followed = False
        self._next_try = 0.0
        self._lock = anyio.Lock()

    async def start(self) -> None:
        """Follow both buckets and wait (up to the request timeout) for their current contents."""
        async with self._lock:
            if self._subs:
                return
            await self._follow(self._bus.names.workers_bucket, self._on_beat)
            await self._follow_served()

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(*BUS_ERRORS):
                await sub.unsubscribe()  # type: ignore[attr-defined]
        self._subs.clear()

    async def warning(self, provider: str) -> str | None:
        """Why a task for ``provider`` may never run (no worker serves it now, none did in the last
        day), naming the providers served; None when one does. No round trip once started."""
        if not self._subs:
            await self.start()
        elif not self._served_followed and time.monotonic() >= self._next_try:
            async with self._lock:
                await self._follow_served()
        if self._served_lately(provider):  # the common case once a gateway recorded it: one look-up
            return None
        made = self._warnings.get(provider)
        if made is not None and time.monotonic() - made[1] < WARNING_REUSE_S:
            return made[0]
        live = self.live()
        if provider in live:
            return None
        served = sorted(live | {p for p in self._served if self._served_lately(p)})
        names = ", ".join(served) if served else "none"
        warning = f"no worker serves provider {provider!r} now or in the last day; served: {names}"
        self._warnings[provider] = (warning, time.monotonic())
        return warning

    def live(self) -> set[str]:
        """The providers a live worker serves now."""
        oldest = time.monotonic() - self._bus.settings.heartbeat_ttl_s
        return {provider for provider, seen in self._beats.values() if seen >= oldest}

    def _served_lately(self, provider: str) -> bool:
        at_ms = self._served.get(provider)
        return at_ms is not None and now_ms() - at_ms < SERVED_TTL_S * 1000

    async def _follow_served(self) -> None:
        bucket = self._bus.names.served_bucket
        try:
            if self._record:
                await _ensure_bucket(
                    self._bus.js, served_bucket_config(self._bus), self._bus.settings.js_domain
                )
            await self._follow(bucket, self._on_record)
            self._served_followed = True
        except nats.js.errors.NotFoundError:
            self._next_try = time.monotonic() + RETRY_S  # no gateway made it yet: live workers alone
        except (*BUS_ERRORS, nats.js.errors.Error) as exc:
            log.warning("cannot follow the providers served lately (%s); live workers alone count", exc)
            self._next_try = time.monotonic() + RETRY_S

    async def _follow(self, bucket: str, on_msg: _Callback) -> None:
        """An ordered consumer of the bucket's last value per key; returns once they were delivered."""
        js = self._bus.js
        stream = f"KV_{bucket}"
        info = await js.stream_info(stream)
        caught_up = anyio.Event()
        if not info.state.messages:
            caught_up.set()

        async def cb(msg: Msg) -> None:
            try:
                await on_msg(msg)
            finally:
                if msg.metadata.num_pending == 0:
                    caught_up.set()

        config = ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
        sub = await js.subscribe(
            f"$KV.{bucket}.>", stream=stream, ordered_consumer=True, cb=cb, config=config
        )
        self._subs.append(sub)
        consumer = await sub.consumer_info()
        if not consumer.num_pending and not (consumer.delivered and consumer.delivered.consumer_seq):
            caught_up.set()  # what the stream held had expired by the time the consumer looked
        with anyio.move_on_after(self._bus.settings.request_timeout_s):
            await caught_up.wait()

    async def _on_beat(self, msg: Msg) -> None:
        key = msg.subject.split(".", 2)[-1]
        if msg.headers and msg.headers.get(_KV_OPERATION) in ("DEL", "PURGE"):
            self._beats.pop(key, None)
            self._warnings.clear()
            return
        beat = beat_of(key, msg.data)
        if beat is None:
            return  # a foreign or old writer's key, or one claiming another provider: it serves nothing
        self._beats[key] = (beat.provider, time.monotonic())
        self._warnings.clear()
        if self._record and self._served_followed:
            last = self._served.get(beat.provider)
            if last is None or now_ms() - last >= REFRESH_S * 1000:
                await self._write(beat.provider)

    async def _on_record(self, msg: Msg) -> None:
        provider = msg.subject.split(".", 2)[-1]
        if msg.headers and msg.headers.get(_KV_OPERATION) in ("DEL", "PURGE"):
            self._served.pop(provider, None)
            self._warnings.clear()
            return
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            record = _record_decoder.decode(msg.data)
            self._served[provider] = max(record.at_ms, self._served.get(provider, 0))
            self._warnings.clear()

    async def _write(self, provider: str) -> None:
        at_ms = now_ms()
        self._served[provider] = at_ms  # written once, not again for each beat while the put is out
        self._warnings.clear()
        subject = f"$KV.{self._bus.names.served_bucket}.{provider}"
        try:
            await self._bus.js.publish(subject, msgspec.json.encode(_Record(at_ms=at_ms)))
        except BUS_ERRORS as exc:
            log.warning("could not record that provider %s is served: %s", provider, exc)


# A submission with a webhook, on a bus where no gateway has sent webhooks, is accepted with this warning:
# a gateway that starts with webhooks later announces only the tasks that end after it started.
NO_WEBHOOKS = (
    "no gateway on this bus has sent webhooks (none has run with HIVE_WEBHOOK_SECRET): this task's webhook "
    "is sent only if one is running when the task ends"
)


class WebhooksSeen:
    """Whether a gateway has sent webhooks on this bus: its webhooks stream is there (the first gateway
    with ``HIVE_WEBHOOK_SECRET`` makes it, and from then on every task's end is queued for delivery,
    whether a gateway runs at that moment or not). Asked on the first submission with a webhook; a yes
    is kept, a no asked again after ``RETRY_S``."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._seen = False
        self._ask_at = 0.0

    async def warning(self) -> str | None:
        """:data:`NO_WEBHOOKS` when none has, else None (also when the bus cannot say: no false alarm)."""
        if self._seen:
            return None
        if time.monotonic() < self._ask_at:
            return NO_WEBHOOKS
        try:
            await self._bus.js.stream_info(self._bus.names.webhooks_stream)
        except nats.js.errors.NotFoundError:
            self._ask_at = time.monotonic() + RETRY_S
            return NO_WEBHOOKS
        except (*BUS_ERRORS, nats.js.errors.Error) as exc:  # a credential that may not ask, say
            log.debug("cannot tell whether a gateway sends webhooks: %s", exc)
            return None
        self._seen = True
        return None
