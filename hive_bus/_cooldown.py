"""Provider-wide cooldowns, shared by every worker of a provider wherever it runs.

When a provider answers 429, the worker that got it writes ``until`` into the providers KV bucket
(compare-and-set, so a cooldown only ever grows). Every worker of that provider follows the key with a
core subscription on its KV subject and stops fetching until the time has passed: one 429 does not turn
into N. Tasks a worker already holds when a cooldown starts are handed back with the time left, and
that wait does not use up their attempts.
"""

from __future__ import annotations

import logging

import anyio
import msgspec
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from ._errors import Quota
from ._messages import encoder, now_ms

log = logging.getLogger("hive_bus.cooldown")


class CooldownRecord(msgspec.Struct, frozen=True, kw_only=True, tag="cooldown.v1", tag_field="type"):
    provider: str
    until_ms: int
    reason: str
    quota: Quota = "unknown"
    set_by: str = ""
    at_ms: int = 0


_decoder = msgspec.json.Decoder(CooldownRecord)


class ProviderCooldown:
    """One provider's cooldown as this worker sees it, kept current by :meth:`follow`."""

    def __init__(self, nc: NATS, kv: KeyValue, bucket: str, provider: str) -> None:
        self._nc = nc
        self._kv = kv
        self._subject = f"$KV.{bucket}.{provider}"
        self._provider = provider
        self.current: CooldownRecord | None = None
        self._changed = anyio.Event()

    def remaining_s(self) -> float:
        if self.current is None:
            return 0.0
        return max(0.0, (self.current.until_ms - now_ms()) / 1000)

    async def follow(self, sub: Subscription) -> None:
        """Apply every update of the key until cancelled (the subscription comes from :meth:`subscribe`)."""
        async for msg in sub.messages:
            self._apply(msg.data)

    async def subscribe(self) -> Subscription:
        """Subscribe first, then read the current value, so no update falls between the two."""
        sub = await self._nc.subscribe(self._subject)
        try:
            entry = await self._kv.get(self._provider)
            if entry.value:
                self._apply(entry.value)
        except nats.js.errors.KeyNotFoundError:
            pass
        return sub

    def _apply(self, data: bytes) -> None:
        if not data:  # a delete or purge marker
            self.current = None
        else:
            try:
                record = _decoder.decode(data)
            except msgspec.DecodeError as exc:
                log.warning("ignoring an unreadable cooldown for %s: %s", self._provider, exc)
                return
            if self.current is None or record.until_ms >= self.current.until_ms or record.until_ms < now_ms():
                self.current = record
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until_clear(self, stopping: anyio.Event) -> None:
        """Sleep while a cooldown holds (it may grow meanwhile); return early when ``stopping`` is set."""
        while (left_s := self.remaining_s()) > 0 and not stopping.is_set():
            with anyio.move_on_after(left_s):
                await stopping.wait()

    async def impose(self, until_ms: int, reason: str, quota: Quota, worker: str) -> None:
        """Extend the shared cooldown to ``until_ms`` unless a longer one is already set."""
        record = CooldownRecord(
            provider=self._provider,
            until_ms=until_ms,
            reason=reason,
            quota=quota,
            set_by=worker,
            at_ms=now_ms(),
        )
        for _ in range(5):  # compare-and-set: retried only when another worker wrote in between
            try:
                entry = await self._kv.get(self._provider)
            except nats.js.errors.KeyNotFoundError:
                entry = None
            revision = entry.revision if entry else None
            if entry and entry.value:
                try:
                    if _decoder.decode(entry.value).until_ms >= until_ms:
                        return
                except msgspec.DecodeError:
                    pass
            try:
                if revision is None:
                    await self._kv.create(self._provider, encoder.encode(record))
                else:
                    await self._kv.update(self._provider, encoder.encode(record), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            self._apply(encoder.encode(record))
            log.info(
                "%s cooling down for %.1fs (%s quota): %s",
                self._provider,
                (until_ms - now_ms()) / 1000,
                quota,
                reason,
            )
            return
        log.warning(
            "could not set the %s cooldown after 5 tries; other workers may run into the limit",
            self._provider,
        )
