"""How full the bus's buckets are, and whose keys fill the ones every provider shares.

A worker credential writes keys of its own provider (cooldowns, budgets, cached answers) or of its own
name (heartbeats), as many as it likes, within each bucket's one byte limit: full, a discard-new bucket
refuses every provider's new keys, and the response cache (discard old) forgets every provider's oldest
answers. Each provider's claim check bucket is its own. :class:`BucketFill` reads, for the gateway's
metrics, each bucket's bytes against its limit (one stream info a bucket) and, for a shared bucket
over :data:`OWNERS_FROM` of its limit, how many keys each owner holds there (the first token of a key:
the provider, or the credential's name for heartbeats), from the stream's subject counts, at most every
:data:`OWNERS_EVERY_S` a bucket. A bucket over :data:`WARN_FROM` is said in the log with the owner
holding most keys: whose credential to look at.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import nats.js.errors

from hive_bus.bus import Bus

log = logging.getLogger("hive_bus.metrics")

OWNERS_FROM = 0.5  # a shared bucket's keys are counted by owner once it is this full
OWNERS_EVERY_S = 60.0  # and counted again at most this often (a listing of every key)
OWNERS_KEPT = 5  # the owners with most keys, a bucket, given as series
WARN_FROM = 0.9  # a bucket this full is said in the log
WARN_EVERY_S = 600.0
MAX_OWNER_CHARS = 128


@dataclass(frozen=True, slots=True)
class Fill:
    """The buckets' figures: bytes used against the limit, by bucket; keys by (bucket, owner)."""

    used_ratio: dict[str, float] = field(default_factory=dict)
    keys: dict[tuple[str, str], float] = field(default_factory=dict)


class BucketFill:
    """Reads :class:`Fill` for one bus, keeping each bucket's owner counts between their reads."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._owners: dict[str, tuple[float, Counter[str]]] = {}  # by bucket: when counted, and the counts
        self._warned: dict[str, float] = {}

    async def read(self, providers: list[str]) -> Fill:
        """The figures of the shared buckets, and of the claim check buckets of ``providers``."""
        names = self._bus.names
        shared = [names.workers_bucket, names.providers_bucket, names.budgets_bucket, names.cache_bucket]
        fill = Fill()
        for bucket in shared:
            await self._one(fill, f"KV_{bucket}", bucket, owners=f"$KV.{bucket}.>")
        for bucket in (names.blobs_bucket, *(names.blobs_bucket_of(p) for p in providers)):
            await self._one(fill, f"OBJ_{bucket}", bucket, owners=None)
        return fill

    async def _one(self, fill: Fill, stream: str, bucket: str, *, owners: str | None) -> None:
        try:
            info = await self._bus.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return  # not made yet (the cache, a claim check bucket), or gone (the old shared one)
        limit = info.config.max_bytes or -1
        if limit <= 0:
            return
        ratio = info.state.bytes / limit
        fill.used_ratio[bucket] = ratio
        counts: Counter[str] = Counter()
        if owners is not None and ratio >= OWNERS_FROM:
            counts = await self._owners_of(stream, bucket, owners)
            for owner, keys in counts.most_common(OWNERS_KEPT):
                fill.keys[bucket, owner] = float(keys)
        if ratio >= WARN_FROM and time.monotonic() - self._warned.get(bucket, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[bucket] = time.monotonic()
            top = counts.most_common(1)
            whose = (
                f"; most of its keys ({top[0][1]} of {sum(counts.values())}) are {top[0][0]}'s: a "
                f"credential of {top[0][0]} may be filling it"
                if top
                else ""
            )
            log.warning(
                "bucket %s is %.0f%% full (%d of %d bytes)%s",
                bucket,
                100 * ratio,
                info.state.bytes,
                limit,
                whose,
            )

    async def _owners_of(self, stream: str, bucket: str, subjects: str) -> Counter[str]:
        at_s, counts = self._owners.get(bucket, (float("-inf"), Counter()))
        if time.monotonic() - at_s < OWNERS_EVERY_S:
            return counts
        info = await self._bus.js.stream_info(stream, subjects_filter=subjects)
        counts = Counter()
        prefix = len(subjects) - 1  # "$KV.<bucket>." before the key
        for subject, n in (info.state.subjects or {}).items():
            counts[subject[prefix:].partition(".")[0][:MAX_OWNER_CHARS]] += n
        self._owners[bucket] = (time.monotonic(), counts)
        return counts
