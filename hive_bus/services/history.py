"""The last hour of the gateway's figures, a minute at a time, for the dashboard's charts.

Like ``/metrics``, the figures come from the bus, not from what this process happened to see: on start
the last hour of each provider's events stream is read once (:func:`backfill`, with the follower's
reader, up to :data:`BACKFILL_MAX_EVENTS` in all), then :class:`services.metrics.BusMetrics` hands on what its
follower applies from then on. So a page opened on a fresh gateway shows the past hour at once, and
two gateways of one bus show the same. Memory is bounded: :data:`MINUTES` + 1 buckets, each with a
count per provider (providers are capped by the metrics' labels) and two sparse histograms.

Per minute: completions, failures, 429s (retries for a rate limit that made a call), the end-to-end and
queue-wait times of completed tasks (p50 and p95, from log-spaced buckets 9 % wide), and each provider's
queue depth at the minute's end. Since the gateway started, that depth is what the metrics read of the
queues themselves (:meth:`History.record_depths`, every refresh: the server's own count of each
consumer's pending tasks), so the live follower never reads a task's ``queued`` marker, one message per
submission. For the hour before, nothing in the stream says how deep a queue was, but every change since
is in it: the backfill records each provider's arrivals (queued, moved in, replayed) and departures
(completed, failed, moved out), and the depth of those minutes is worked back from the first depth read
through them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from hive_bus._messages import is_marker, now_ms, queued_marker, run_ended
from hive_bus._nats import BUS_ERRORS
from hive_bus._nesting import Guarded
from hive_bus.bus import Bus

from .follower import EventFollower

log = logging.getLogger("hive_bus.history")

MINUTE_MS = 60_000
MINUTES = 60  # the charts' span; the current minute is kept beside them
BACKFILL_MAX_EVENTS = 500_000  # read on start at most; beyond, the oldest minutes stay short
BACKFILL_BATCH = 512
_STEPS_PER_DOUBLING = 8  # latency buckets: 2 ** (1/8) apart, so a percentile is within 9 %
_RECENT_FINALS = 20_000  # task ids remembered while backfilling, so a final seen twice counts once


class HistoryView(msgspec.Struct, frozen=True, kw_only=True):
    """The minutes of the last hour, oldest first; each list has one value per minute of ``start_ms``."""

    minute_ms: int = MINUTE_MS
    start_ms: list[int]  # when each minute began (unix ms); the last one is the current minute
    completed: list[int]
    failed: list[int]
    rate_limited: list[int]  # provider calls refused by a rate limit (429s)
    e2e_p50_s: list[float | None]  # of the tasks completed in the minute; None with none
    e2e_p95_s: list[float | None]
    wait_p50_s: list[float | None]  # from submission to the start of the attempt that completed
    wait_p95_s: list[float | None]
    queue_depth: dict[str, list[int]]  # per provider, queued and unfinished tasks at each minute's end
    backfilled: bool  # the hour before this gateway started has been read from the bus
    at_ms: int


@dataclass(slots=True)
class _Minute:
    completed: int = 0
    failed: int = 0
    rate_limited: int = 0
    net: dict[str, int] = field(default_factory=dict)  # per provider: arrivals minus departures
    # per provider, the queue depths read in the minute: the first read (what the net changes before it
    # are worked back from) and the last (the depth at the minute's end); None when none was read
    first_depth: dict[str, int] | None = None
    last_depth: dict[str, int] | None = None
    e2e: dict[int, int] = field(default_factory=dict)  # latency bucket -> tasks
    wait: dict[int, int] = field(default_factory=dict)


def _bucket(seconds: float) -> int:
    ms = max(1.0, seconds * 1000)
    return math.ceil(_STEPS_PER_DOUBLING * math.log2(ms))


def _percentile(buckets: dict[int, int], q: float) -> float | None:
    total = sum(buckets.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for index in sorted(buckets):
        seen += buckets[index]
        if seen >= rank:
            return round(2 ** (index / _STEPS_PER_DOUBLING) / 1000, 4)  # the bucket's upper bound
    return None  # not reached: the counts add up to total


class History:
    """Minute buckets of the last hour. The ``record_*`` methods take what happened (from the live
    follower, the backfill, or the metrics' reads of the queues); :meth:`view` gives the charts' series.
    Arrivals and departures (``net``) are the backfill's: the live follower passes ``live=True``, and
    the minutes it sees take their depths from :meth:`record_depths`."""

    def __init__(self, *, minutes: int = MINUTES) -> None:
        self._minutes = minutes
        self._buckets: dict[int, _Minute] = {}  # by minute number (unix ms // MINUTE_MS)
        self.backfilled = False

    @property
    def minutes(self) -> int:
        return self._minutes

    def _minute(self, at_ms: int) -> _Minute | None:
        now = now_ms() // MINUTE_MS
        number = min(at_ms // MINUTE_MS, now)  # a worker's clock ahead of ours counts as now
        if number < now - self._minutes:
            return None  # older than the charts
        bucket = self._buckets.get(number)
        if bucket is None:
            bucket = self._buckets[number] = _Minute()
            for old in [n for n in self._buckets if n < now - self._minutes]:
                del self._buckets[old]
        return bucket

    def record_depths(self, depths: dict[str, int], at_ms: int) -> None:
        """The queue depths read at ``at_ms``, by provider (one missing is empty)."""
        if (minute := self._minute(at_ms)) is not None:
            if minute.first_depth is None:
                minute.first_depth = dict(depths)
            minute.last_depth = dict(depths)

    def record_arrival(self, provider: str, at_ms: int) -> None:
        if (minute := self._minute(at_ms)) is not None:
            minute.net[provider] = minute.net.get(provider, 0) + 1

    def record_departure(self, provider: str, at_ms: int) -> None:
        if (minute := self._minute(at_ms)) is not None:
            minute.net[provider] = minute.net.get(provider, 0) - 1

    def record_rate_limit(self, at_ms: int) -> None:
        if (minute := self._minute(at_ms)) is not None:
            minute.rate_limited += 1

    def record_failed(self, provider: str, at_ms: int, *, live: bool = False) -> None:
        if (minute := self._minute(at_ms)) is not None:
            minute.failed += 1
            if not live:
                minute.net[provider] = minute.net.get(provider, 0) - 1

    def record_completed(
        self, provider: str, at_ms: int, submitted_at_ms: int, started_at_ms: int, *, live: bool = False
    ) -> None:
        if (minute := self._minute(at_ms)) is None:
            return
        minute.completed += 1
        if not live:
            minute.net[provider] = minute.net.get(provider, 0) - 1
        if submitted_at_ms:
            e2e = _bucket(max(0.0, (at_ms - submitted_at_ms) / 1000))
            minute.e2e[e2e] = minute.e2e.get(e2e, 0) + 1
            if started_at_ms:
                wait = _bucket(max(0.0, (started_at_ms - submitted_at_ms) / 1000))
                minute.wait[wait] = minute.wait.get(wait, 0) + 1

    def view(self, depth_now: dict[str, int], *, since_ms: int = 0) -> HistoryView:
        """The series, from the minute holding ``since_ms`` on (the whole hour by default); queue depths
        ``depth_now`` for this minute, the depths read for a minute that has them, and for one that has
        none, worked back from the next minute's through the changes recorded in it."""
        at = now_ms()
        now = at // MINUTE_MS
        numbers = [n for n in range(now - self._minutes + 1, now + 1) if n >= since_ms // MINUTE_MS]
        empty = _Minute()
        minutes = [self._buckets.get(n, empty) for n in numbers]
        providers = set(depth_now) | {
            p for m in self._buckets.values() for p in (*m.net, *(m.last_depth or ()))
        }
        depth: dict[str, list[int]] = {}
        for provider in sorted(providers):
            level = depth_now.get(provider, 0)
            series: list[int] = []
            # from now backwards: the depth at the end of a minute, read then, or else the next one's
            # less what that one changed (from its first read, when it has one: the changes recorded in
            # it are the backfill's, from before that read)
            for number in range(now, numbers[0] - 1, -1) if numbers else ():
                bucket = self._buckets.get(number, empty)
                if number != now and bucket.last_depth is not None:
                    level = bucket.last_depth.get(provider, 0)
                if number in numbers:
                    series.append(max(0, level))
                if bucket.first_depth is not None:
                    level = bucket.first_depth.get(provider, 0)
                level -= bucket.net.get(provider, 0)
            depth[provider] = series[::-1]
        return HistoryView(
            start_ms=[n * MINUTE_MS for n in numbers],
            completed=[m.completed for m in minutes],
            failed=[m.failed for m in minutes],
            rate_limited=[m.rate_limited for m in minutes],
            e2e_p50_s=[_percentile(m.e2e, 0.5) for m in minutes],
            e2e_p95_s=[_percentile(m.e2e, 0.95) for m in minutes],
            wait_p50_s=[_percentile(m.wait, 0.5) for m in minutes],
            wait_p95_s=[_percentile(m.wait, 0.95) for m in minutes],
            queue_depth=depth,
            backfilled=self.backfilled,
            at_ms=at,
        )


# the backfill ---------------------------------------------------------------------------------------


class _SeenTask(msgspec.Struct, kw_only=True):
    provider: str = ""


class _Seen(msgspec.Struct, kw_only=True):
    """What the backfill reads of an event (msgspec skips the rest: outputs, tasks' content)."""

    provider: str = ""
    at_ms: int = 0
    submitted_at_ms: int = 0
    started_at_ms: int = 0
    reason: str = ""
    called: bool = True
    task: _SeenTask | None = None


_seen_decoder = Guarded(msgspec.json.Decoder(_Seen), enclosing=2)


class _Backfill:
    """Applies stored events to a :class:`History` as the live follower would have."""

    def __init__(self, history: History, bus: Bus, provider_label: Callable[[str], str]) -> None:
        self._history = history
        self._names = bus.names
        self._label = provider_label
        self._finals: OrderedDict[str, None] = OrderedDict()

    def apply(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        tokens = subject.split(".")
        if len(tokens) != 5:
            return  # a duplicate report
        on, task_id, status = tokens[2], tokens[3], tokens[4]
        if status not in ("queued", "moved", "retrying", "completed", "failed", "cancelled"):
            return
        if status == "queued" and is_marker(data, headers) and (marker := queued_marker(subject, headers)):
            self._history.record_arrival(self._label(on), marker.at_ms)  # a task stored on its queue
            return
        try:
            event = _seen_decoder.decode(data)
        except msgspec.DecodeError:
            return
        if event.provider != on:
            return  # written under another provider than it names: forged, as the metrics say
        history, provider = self._history, self._label(on)
        if status == "queued":
            history.record_arrival(provider, event.at_ms)
        elif status == "moved":
            # its arrival on the next provider is the router's publish of it there: its queued event
            history.record_departure(provider, event.at_ms)
        elif status == "retrying":
            if event.reason == "rate_limit" and event.called:
                history.record_rate_limit(event.at_ms)
        elif self._first(
            f"{on}:{task_id}:{'rejected' if event.reason == 'rejected' else 'final'}:{run_ended(headers)}"
        ):
            if status == "completed":
                history.record_completed(provider, event.at_ms, event.submitted_at_ms, event.started_at_ms)
            elif status == "cancelled":
                history.record_departure(provider, event.at_ms)  # left its queue, neither done nor failed
            else:
                history.record_failed(provider, event.at_ms)

    def _first(self, key: str) -> bool:
        if key in self._finals:
            return False
        self._finals[key] = None
        if len(self._finals) > _RECENT_FINALS:
            self._finals.popitem(last=False)
        return True


async def backfill(
    history: History, bus: Bus, *, before: dict[str, int], provider_label: Callable[[str], str]
) -> None:
    """Apply the events stored in the last hour to ``history``: of each provider in ``before``, up to
    the sequence of its stream where its live follower began, with the live follower's own reader (a
    batch at a time, no task per message); sets ``history.backfilled``. A provider's stream made since
    is followed from its start: nothing of it to read here. Logs and gives up if the bus fails."""
    apply = _Backfill(history, bus, provider_label).apply
    at_most = BACKFILL_MAX_EVENTS // max(1, len(before))  # the whole read stays within the bound
    for provider, before_seq in sorted(before.items()):
        stream = bus.names.events_stream_of(provider)
        try:
            first = await _first_seq_since(bus, provider, now_ms() - history.minutes * MINUTE_MS)
        except BUS_ERRORS as exc:
            log.warning("history: could not find the last hour of %s (%s); the charts start now", stream, exc)
            return
        start = max(first, before_seq - at_most)
        if start > first:
            log.warning(
                "history: reading the last %d events of %s only; the charts' oldest minutes are short",
                before_seq - start,
                stream,
            )
        reader = EventFollower(
            bus,
            stream,
            [bus.names.events_under(provider)],
            apply,
            batch=BACKFILL_BATCH,
            expires_s=1.0,
            start_seq=start,
            stop_seq=before_seq,
        )
        try:
            await reader.run()
        except BUS_ERRORS as exc:
            log.warning("history: reading the last hour of %s stopped (%s)", stream, exc)
            return
        log.info("history: the last hour of %s read (sequences %d to %d)", stream, start, before_seq - 1)
    history.backfilled = True


async def _first_seq_since(bus: Bus, provider: str, at_ms: int) -> int:
    """The sequence of the first event of ``provider`` stored at or after ``at_ms`` in its stream: where
    a consumer that starts by time would start (the server finds it), read from a throwaway one."""
    names = bus.names
    stream = names.events_stream_of(provider)
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=datetime.fromtimestamp(at_ms / 1000, tz=UTC),
        ack_policy=AckPolicy.NONE,
        filter_subject=names.events_under(provider),
        inactive_threshold=5.0,
        mem_storage=True,
        num_replicas=1,
    )
    info = await bus.js.add_consumer(stream, config)
    with anyio.CancelScope(shield=True), anyio.move_on_after(2), contextlib.suppress(*BUS_ERRORS):
        await bus.js.delete_consumer(stream, info.name)
    return (info.delivered.stream_seq if info.delivered else 0) + 1
