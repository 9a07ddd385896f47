"""Cooldowns of a provider's keys, shared by every worker of the provider wherever it runs.

When a provider answers 429, the worker that got it writes ``until`` into the providers KV bucket under
``<provider>.<key>`` (compare-and-set, so a cooldown only ever grows). Every worker of that provider
follows its keys with one core subscription on their KV subjects (behind a leaf node, which passes no
``$KV.>`` subject, a watch of the bucket instead) and does not use a cooling key until the time has
passed: one 429 does not turn into N. A key the provider refused (401/403) is set aside
the same way, for good, until an operator clears it (``hive keys --clear``). When no key is usable the
worker stops fetching; tasks it already holds are handed back with the time left, and that wait does
not use up their attempts.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Protocol

import msgspec
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from ._errors import Quota
from ._messages import WorkerBeat, encoder, now_ms
from ._nesting import Guarded
from ._publish import refused_as_full

log = logging.getLogger("hive_bus.cooldown")


class CooldownRecord(msgspec.Struct, frozen=True, kw_only=True, tag="cooldown.v1", tag_field="type"):
    provider: str
    until_ms: int
    reason: str
    quota: Quota = "unknown"
    set_by: str = ""
    at_ms: int = 0
    key: str = "default"
    # the provider refused the key itself (401/403): it is not used again until cleared
    refused: bool = False

    def left_s(self, at_ms: int) -> float:
        return float("inf") if self.refused else max(0.0, (self.until_ms - at_ms) / 1000)


_decoder = Guarded(msgspec.json.Decoder(CooldownRecord), enclosing=1)


class Updates(Protocol):
    """A provider's key cooldowns as they change: (key, value) pairs, an empty value for a delete."""

    def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]: ...

    async def unsubscribe(self) -> None: ...


class _Subscribed:
    """By a core subscription on the keys' subjects: no consumer, so a worker's credentials need none."""

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub

    async def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]:
        async for msg in self._sub.messages:
            yield msg.subject.rpartition(".")[2], msg.data

    async def unsubscribe(self) -> None:
        await self._sub.unsubscribe()


class _Watched:
    """By a watch of the bucket (an ordered consumer), which crosses a leaf link."""

    def __init__(self, watcher: KeyValue.KeyWatcher) -> None:
        self._watcher = watcher

    async def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]:
        async for entry in self._watcher:
            if entry is not None:  # None: the values there were at the start have all come
                yield entry.key.rpartition(".")[2], entry.value or b""

    async def unsubscribe(self) -> None:
        await self._watcher.stop()  # type: ignore[no-untyped-call]


class KeyCooldowns:
    """The cooldowns of one provider's keys as this worker sees them, kept current by :meth:`follow`."""

    def __init__(
        self, nc: NATS, kv: KeyValue, bucket: str, provider: str, keys: list[str], *, watch: bool = False
    ) -> None:
        self._nc = nc
        self._kv = kv
        self._watch = watch  # a KV watch (a consumer) instead of a core subscription
        self._subject = f"$KV.{bucket}.{provider}.*"
        self._bucket = bucket
        self._provider = provider
        self.keys = keys
        self.records: dict[str, CooldownRecord] = {}

    def left_s(self, key: str) -> float:
        record = self.records.get(key)
        return 0.0 if record is None else record.left_s(now_ms())

    def wait_s(self) -> float:
        """Seconds until some key may be used (0 now; infinite when the provider refused them all)."""
        return min(self.left_s(key) for key in self.keys)

    async def follow(self, updates: Updates) -> None:
        """Apply every update of the keys until cancelled (the updates come from :meth:`subscribe`)."""
        async for key, data in updates:
            self._apply(key, data)

    async def subscribe(self) -> Updates:
        """Subscribe first, then read the current values, so no update falls between the two."""
        sub: Updates
        if self._watch:
            sub = _Watched(await self._kv.watch(f"{self._provider}.*"))
        else:
            sub = _Subscribed(await self._nc.subscribe(self._subject))
        for key in self.keys:  # a direct get each: a worker's credentials need no consumer for this
            try:
                entry = await self._kv.get(f"{self._provider}.{key}")
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value:
                self._apply(key, entry.value)
        return sub

    def _apply(self, key: str, data: bytes) -> None:
        if not data:  # a delete or purge marker: the key is clear
            self.records.pop(key, None)
        else:
            try:
                record = _decoder.decode(data)
            except msgspec.DecodeError as exc:
                log.warning("ignoring an unreadable cooldown of %s key %s: %s", self._provider, key, exc)
                return
            current = self.records.get(key)
            if (
                current is None
                or record.refused
                or record.until_ms >= current.until_ms
                or not current.left_s(now_ms())
            ):
                self.records[key] = record

    async def impose(self, key: str, until_ms: int, reason: str, quota: Quota, worker: str) -> None:
        """Extend the key's shared cooldown to ``until_ms`` unless a longer one is already set."""
        record = CooldownRecord(
            provider=self._provider, until_ms=until_ms, reason=reason, quota=quota, set_by=worker,
            at_ms=now_ms(), key=key,
        )  # fmt: skip
        if await self._write(record):
            log.info(
                "%s key %s cooling down for %.1fs (%s quota): %s",
                self._provider, key, (until_ms - now_ms()) / 1000, quota, reason,
            )  # fmt: skip

    async def refuse(self, key: str, reason: str, worker: str) -> None:
        """Set the key aside for good: the provider refused it (401/403)."""
        record = CooldownRecord(
            provider=self._provider, until_ms=0, reason=reason, set_by=worker, at_ms=now_ms(), key=key,
            refused=True,
        )  # fmt: skip
        if await self._write(record):
            log.error(
                "%s key %s was refused and is set aside (not used again until `hive keys --clear %s %s`): %s",
                self._provider, key, self._provider, key, reason,
            )  # fmt: skip

    async def clear(self, key: str) -> None:
        """Clear the key's cooldown, or put a refused key back (``hive keys --clear``)."""
        await self._kv.delete(f"{self._provider}.{key}")

    async def _write(self, record: CooldownRecord) -> bool:
        name = f"{self._provider}.{record.key}"
        for _ in range(5):  # compare-and-set: retried only when another worker wrote in between
            try:
                entry = await self._kv.get(name)
            except nats.js.errors.KeyNotFoundError:
                entry = None
            revision = entry.revision if entry else None
            if entry and entry.value:
                try:
                    have = _decoder.decode(entry.value)
                    if have.refused or (not record.refused and have.until_ms >= record.until_ms):
                        return False
                except msgspec.DecodeError:
                    pass
            try:
                if revision is None:
                    await self._kv.create(name, encoder.encode(record))
                else:
                    await self._kv.update(name, encoder.encode(record), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            except nats.js.errors.APIError as exc:
                if not refused_as_full(exc):
                    raise
                # the bucket is full (another provider's credential may have filled it): this worker
                # honours the cooldown alone rather than lose the task it holds
                self._apply(record.key, encoder.encode(record))
                log.warning(
                    "the %s cooldown is not shared with the other workers of %s: bucket %s refused it "
                    "(%s); this worker honours it alone. hive_bucket_keys tells whose keys fill it",
                    name, self._provider, self._bucket, exc.description,
                )  # fmt: skip
                return True
            self._apply(record.key, encoder.encode(record))
            return True
        log.warning("could not write the %s cooldown after 5 tries; other workers may run into it", name)
        return False


def provider_cooldowns(values: Mapping[str, bytes], beats: Iterable[WorkerBeat]) -> dict[str, CooldownRecord]:
    """Per provider, from the providers bucket's values and the heartbeats: the key record that ends
    first, where every key of the provider (that a record or a heartbeat names) is cooling or refused."""
    at_ms = now_ms()
    records: dict[str, dict[str, CooldownRecord]] = {}
    for record in decode_records(values):
        records.setdefault(record.provider, {})[record.key] = record
    for beat in beats:
        for key in beat.keys:
            records.get(beat.provider, {}).setdefault(key, _CLEAR)
    found = {}
    for provider, keys in records.items():
        if all(r.left_s(at_ms) > 0 for r in keys.values()):
            found[provider] = min(keys.values(), key=lambda r: r.left_s(at_ms))
    return found


def decode_records(values: Mapping[str, bytes]) -> list[CooldownRecord]:
    """The records among a providers bucket's values that decode (one bad value hides no other)."""
    found = []
    for name, raw in values.items():
        try:
            found.append(_decoder.decode(raw))
        except msgspec.DecodeError:
            log.debug("the cooldown %s does not decode", name)
    return found


_CLEAR = CooldownRecord(provider="", until_ms=0, reason="")
