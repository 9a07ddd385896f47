"""Prometheus metrics read from the bus, so they hold for workers anywhere.

:class:`BusMetrics` keeps two kinds of figures in a registry of its own (never the process-wide
default one, so several gateways, or tests, can live in one process):

- counters and histograms, from the events that say how a run went (retries, final outcomes, reports
  of duplicate ones) on each provider's events stream, followed from the moment it starts (a batch at a time,
  resumed after the last event seen if its consumer is lost; see :mod:`services.follower`):
  completions by model, failures and retries by reason, rate-limit waits, tokens, cost, and the
  queue-wait, call and end-to-end times of completed tasks. ``running``, ``queued`` and ``moved``
  events are not read (one ``queued`` marker a submission was a good share of a POST's CPU): submissions
  are counted apart (below), and the last hour's queue depths (:mod:`services.history`, which the events
  read also feed, minute by minute) are the queues' own counts, read with the gauges.
  A task's final event is stored once by JetStream (``Nats-Msg-Id: <id>:final:<seal>``); a bounded set
  of recently seen (provider, task id) pairs also keeps a final event seen twice from counting twice.
  Each event counts under the provider of its subject, and only when its body names that provider: a
  worker credential writes under its own provider only, so what it forges counts there, never as
  another provider's outcome. The final outcomes
  JetStream refused as duplicates (a provider call made for a task already finished) are reported by
  their workers on the events stream (``hive_bus._duplicates``) and counted apart;
- submissions, from the bus's submission counters (:mod:`hive_bus._counts`, which every submitter
  adds to), as they have grown since following began;
- gauges, read every ``refresh_s`` seconds (and on a scrape, when the last read is older than
  :data:`SCRAPE_MAX_AGE_S` and the bus answers within :data:`SCRAPE_REFRESH_S`), like the submission
  counters: each provider's queue (its durable consumer's pending and
  ack-pending counts, or the stream's own count for a provider no worker has served yet), workers
  whose heartbeat has not expired (draining ones included), and the seconds left of each provider's
  cooldown, and the messages each stream has lost (the ``lost`` of its state, when JetStream reports
  one: nats-server 2.15 leaves it unset for a damaged last block, see docs/reliability.md). A refresh
  that fails (NATS down) logs a warning and the last figures stay.

Labels hold provider names (subject tokens, validated on submission), models, reasons and token
directions; never prompts, outputs, error messages, worker hosts or credentials. Distinct providers and
models per provider are capped so that a misbehaving client cannot blow up the series count.

Why about 600 lines: one class reads every figure from the bus and writes the Prometheus families;
each family's reading sits beside its declaration.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar, cast

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.js.api import StreamInfo, StreamState
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from hive_bus import WorkerBeat
from hive_bus._budget import Ledger, ledgers
from hive_bus._bus import ensure_counters_stream, event_providers, kv_entries, redeclare_workers_bucket
from hive_bus._cooldown import decode_records, provider_cooldowns
from hive_bus._counts import submitted_counts
from hive_bus._dlq import streams as dlq_streams
from hive_bus._duplicates import duplicate_decoder
from hive_bus._messages import (
    Cancelled,
    Completed,
    Failed,
    Retrying,
    beat_of,
    event_decoder,
    now_ms,
    run_ended,
)
from hive_bus._nats import BUS_ERRORS, why
from hive_bus._stats import QueueDepth, queue_depths
from hive_bus.bus import Bus

from .fill import BucketFill, Fill
from .follower import follow_providers
from .history import History, HistoryView, backfill

_Metric = TypeVar("_Metric", bound=MetricWrapperBase)

log = logging.getLogger("hive_bus.metrics")

# Seconds. LLM calls take from tens of milliseconds (a cache, a tiny model) to minutes (long outputs);
# waits in the queue and whole tasks may last as long as a rate limit, so their tail is longer.
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)

MAX_PROVIDERS = 1000  # distinct provider label values; beyond, "other"
MAX_MODELS_PER_PROVIDER = 100  # distinct model label values per provider; beyond, "other"
MAX_LABEL_CHARS = 128
RECENT_IDS = 20_000  # task ids remembered to keep a repeated final event from counting twice
SCRAPE_MAX_AGE_S = 1.0  # a scrape reads the bus again when the figures are older than this
SCRAPE_REFRESH_S = 1.0  # for at most this long; then it is served the last figures
OTHER = "other"
UNKNOWN_MODEL = "unknown"

# What a bus that does not answer raises, and a value in a bucket that does not decode.
_BUS_ERRORS = (*BUS_ERRORS, msgspec.DecodeError)  # and a heartbeat or count that does not decode


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The gauges' figures as the last successful refresh read them, by provider label."""

    pending: dict[str, int] = field(default_factory=dict)
    ack_pending: dict[str, int] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)
    cooldown_s: dict[str, float] = field(default_factory=dict)
    # by (provider, key) / (provider, reason) / (provider, key, model, limit)
    key_cooldown_s: dict[tuple[str, ...], float] = field(default_factory=dict)
    key_refused: dict[tuple[str, ...], float] = field(default_factory=dict)
    waiting: dict[tuple[str, ...], float] = field(default_factory=dict)
    budget_used: dict[tuple[str, ...], float] = field(default_factory=dict)
    budget_limit: dict[tuple[str, ...], float] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)  # by stream name
    stream_fill: dict[str, float] = field(default_factory=dict)  # by stream name: those that refuse when full
    submitted: dict[str, int] = field(default_factory=dict)  # since following began
    dead_letters: int = 0  # messages in the dead-letter stream
    bucket_fill: Fill = field(default_factory=Fill)  # the buckets' bytes against their limits, keys by owner
    at_s: float | None = None  # unix time of the refresh


class ModelUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens and cost of the tasks one model of a provider completed."""

    provider: str
    model: str
    completed: int
    input_tokens: int
    output_tokens: int
    cost_usd: float  # of the tasks whose model's price is known
    unpriced: int  # completed tasks whose model's price is not known, so not in cost_usd


class UsageSince(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway has counted since it began following the events stream."""

    since_ms: int
    models: list[ModelUsage]


@dataclass(slots=True)
class _UsageTotals:
    completed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0


class _Gauges:
    """A collector that exposes the last snapshot: providers that went away go away with it."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot
        submitted = CounterMetricFamily(
            "hive_tasks_submitted", "Tasks accepted onto the bus.", labels=["provider"]
        )
        for provider, count in sorted(snap.submitted.items()):
            submitted.add_metric([provider], float(count))
        yield submitted
        specs: list[tuple[str, str, dict[str, int] | dict[str, float]]] = [
            (
                "hive_queue_pending",
                "Tasks queued for the provider, not yet handed to a worker.",
                snap.pending,
            ),
            (
                "hive_queue_ack_pending",
                "Tasks handed to the provider's workers and not yet acked (running or waiting for a retry).",
                snap.ack_pending,
            ),
            ("hive_workers_online", "Workers of the provider whose heartbeat has not expired.", snap.workers),
            (
                "hive_provider_cooldown_seconds",
                "Seconds left of the provider's shared rate-limit cooldown (0 when none).",
                snap.cooldown_s,
            ),
        ]
        for name, doc, values in specs:
            family = GaugeMetricFamily(name, doc, labels=["provider"])
            for provider, value in sorted(values.items()):
                family.add_metric([provider], float(value))
            yield family
        labelled: list[tuple[str, str, list[str], dict[tuple[str, ...], float]]] = [
            ("hive_key_cooldown_seconds", "Seconds left of a provider key's rate-limit cooldown.",
             ["provider", "key"], snap.key_cooldown_s),
            ("hive_key_refused", "1 for a provider key the provider refused (401/403), set aside until cleared.",
             ["provider", "key"], snap.key_refused),
            ("hive_workers_waiting", "Workers not fetching because no key has budget or all are cooling down.",
             ["provider", "reason"], snap.waiting),
            ("hive_budget_used", "Requests (rpm, rpd) or tokens (tpm) spent in the budget's current window.",
             ["provider", "key", "model", "limit"], snap.budget_used),
            ("hive_budget_limit", "The budget's limit per window (rpm, tpm: a minute; rpd: a day).",
             ["provider", "key", "model", "limit"], snap.budget_limit),
        ]  # fmt: skip
        for name, doc, labels, by_labels in labelled:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for label_values, figure in sorted(by_labels.items()):
                family.add_metric(list(label_values), figure)
            yield family
        lost = GaugeMetricFamily(
            "hive_stream_lost_messages",
            "Messages the stream reports lost (damaged or missing store data found when the server started).",
            labels=["stream"],
        )
        for stream, count in sorted(snap.lost.items()):
            lost.add_metric([stream], float(count))
        yield lost
        used = GaugeMetricFamily(
            "hive_bucket_used_ratio",
            "Bytes a bucket holds against its limit (1: full; a full bucket refuses new keys, the response "
            "cache forgets its oldest). One per provider for the claim check (<prefix>_blobs_<provider>).",
            labels=["bucket"],
        )
        for bucket, ratio in sorted(snap.bucket_fill.used_ratio.items()):
            used.add_metric([bucket], ratio)
        yield used
        keys = GaugeMetricFamily(
            "hive_bucket_keys",
            "Keys in a bucket every provider shares, by owner (the provider, or the worker credential's name "
            "for heartbeats): the few with most, once the bucket is half full.",
            labels=["bucket", "owner"],
        )
        for (bucket, owner), held in sorted(snap.bucket_fill.keys.items()):
            keys.add_metric([bucket, owner], held)
        yield keys
        stream_fill = GaugeMetricFamily(
            "hive_stream_fill_ratio",
            "How full a stream that refuses writes when full is (the tasks stream, each dead-letter stream): "
            "the larger of its messages over max_msgs and its bytes over max_bytes.",
            labels=["stream"],
        )
        for stream, ratio in sorted(snap.stream_fill.items()):
            stream_fill.add_metric([stream], ratio)
        yield stream_fill
        last = GaugeMetricFamily(
            "hive_metrics_last_refresh_timestamp_seconds",
            "When the queue, worker and cooldown gauges were last read from the bus (unix time).",
        )
        if snap.at_s is not None:
            last.add_metric([], snap.at_s)
        yield last


class BusMetrics:
    """Prometheus figures of one bus: run :meth:`run` in a task group, serve :meth:`render`."""

    def __init__(self, bus: Bus, *, refresh_s: float = 5.0) -> None:
        if refresh_s <= 0:
            raise ValueError(f"refresh_s must be positive, not {refresh_s!r}")
        self._bus = bus
        self._refresh_s = refresh_s
        self._refresh_lock = anyio.Lock()
        # insertion-ordered: the oldest is dropped first (an OrderedDict pops it in constant time)
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._providers: set[str] = set()
        self._models: dict[str, set[str]] = {}
        self._usage: dict[tuple[str, str], _UsageTotals] = {}  # by provider and model label
        # Each series once labelled (see _series): bounded as the labels are.
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        self._since_ms = 0  # when following began
        self._fill = BucketFill(bus)
        self._submitted_before: dict[str, int] = {}  # the submission counters when following began

        self._registry = CollectorRegistry(auto_describe=True)
        r = self._registry
        self._completed = Counter(
            "hive_tasks_completed",
            "Tasks completed, by the model that answered.",
            ["provider", "model"],
            registry=r,
        )
        self._failed = Counter(
            "hive_tasks_failed",
            "Tasks that failed for good (permanent, out_of_attempts, invalid_output, deadline, expired, rejected, "
            "undecodable, lost).",
            ["provider", "reason"],
            registry=r,
        )
        self._cancelled = Counter(
            "hive_tasks_cancelled",
            "Tasks cancelled (through the API, hive cancel or the client), by the status they were in.",
            ["provider", "was"],
            registry=r,
        )
        # Unlabelled, so that it exists at 0 from the start and its first increase shows in increase().
        self._lost = Counter(
            "hive_tasks_lost",
            "Accepted tasks the store audit found missing from the tasks stream with no outcome recorded "
            "(dead-lettered with reason lost; see hive_bus._audit).",
            registry=r,
        )
        self._retries = Counter(
            "hive_task_retries",
            "Deliveries handed back for a later try (transient error, invalid_output, rate limit, budget).",
            ["provider", "reason"],
            registry=r,
        )
        self._rate_limited = Counter(
            "hive_rate_limited",
            "Provider calls refused by a rate limit (429s); hand-backs during a cooldown, which make no call, are not counted.",
            ["provider"],
            registry=r,
        )
        self._duplicates = Counter(
            "hive_duplicate_results",
            "Final outcomes not recorded because the task already had one: provider calls made for nothing "
            "(a worker that outlived its AckWait, or a redelivery after a lost ack).",
            ["provider"],
            registry=r,
        )
        self._cache_hits = Counter(
            "hive_cache_hits",
            "Tasks completed from the response cache, with no provider call (see hive_bus._cache).",
            ["provider", "model"],
            registry=r,
        )
        self._tokens = Counter(
            "hive_tokens",
            "Tokens of completed tasks, by direction (input or output).",
            ["provider", "model", "direction"],
            registry=r,
        )
        self._cost = Counter(
            "hive_cost_usd",
            "Cost of completed tasks in US dollars, where the model's price is known.",
            ["provider", "model"],
            registry=r,
        )
        self._queue_wait = Histogram(
            "hive_task_queue_wait_seconds",
            "From submission to the start of the attempt that completed the task.",
            ["provider"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self._call = Histogram(
            "hive_provider_call_seconds",
            "Duration of the provider call that completed the task.",
            ["provider"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self._duration = Histogram(
            "hive_task_duration_seconds",
            "From submission to completion (end to end).",
            ["provider"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self._gauges = _Gauges()
        r.register(self._gauges)
        self.history = History()

    @property
    def snapshot(self) -> Snapshot:
        """The gauges' figures as the last successful read of the bus found them."""
        return self._gauges.snapshot

    @property
    def since_ms(self) -> int:
        """When following the bus began (unix ms); 0 before."""
        return self._since_ms

    @property
    def refresh_s(self) -> float:
        return self._refresh_s

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for ``GET /metrics``."""
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def usage(self) -> UsageSince:
        """Tokens and cost of the tasks completed since following began, by provider and model."""
        models = [
            ModelUsage(
                provider=provider,
                model=model,
                completed=totals.completed,
                input_tokens=totals.input_tokens,
                output_tokens=totals.output_tokens,
                cost_usd=totals.cost_usd,
                unpriced=totals.unpriced,
            )
            for (provider, model), totals in sorted(self._usage.items())
        ]
        return UsageSince(since_ms=self._since_ms, models=models)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the events and refresh the gauges until cancelled; started once subscribed."""
        async with anyio.create_task_group() as tg:
            self._since_ms = now_ms()
            bus = self._bus
            await ensure_counters_stream(bus.js, bus.settings)
            self._submitted_before = await submitted_counts(bus)
            # not the queued and moved events: the history's queue depths are read from the queues
            began = await tg.start(follow_providers, bus, self._followed, self._observe)
            tg.start_soon(self._refresh_loop)
            # the hour before: read once, up to where each provider's follower began
            tg.start_soon(
                lambda: backfill(self.history, bus, before=began, provider_label=self._provider_label)
            )
            task_status.started()

    async def refresh(self, *, max_age_s: float = 0.0) -> None:
        """Read the gauges' figures from the bus now (unless read within ``max_age_s``); on failure, log
        a warning and keep the last ones."""
        async with self._refresh_lock:
            last = self._gauges.snapshot.at_s
            if max_age_s > 0 and last is not None and time.time() - last < max_age_s:
                return
            try:
                with anyio.fail_after(max(self._refresh_s, 2 * self._bus.settings.request_timeout_s)):
                    snapshot = await self._read_gauges()
            except _BUS_ERRORS as exc:
                log.warning(
                    "metrics: could not read queues, workers and cooldowns from the bus: %s", why(exc)
                )
                return
            self._gauges.snapshot = snapshot
            self.history.record_depths(
                _depths(snapshot), int(snapshot.at_s * 1000) if snapshot.at_s else now_ms()
            )

    # events --------------------------------------------------------------------------------------

    def history_view(self, *, since_ms: int = 0) -> HistoryView:
        """The last hour a minute at a time (see :mod:`services.history`), queue depths as the queues
        were read (this minute's, the last read)."""
        return self.history.view(_depths(self._gauges.snapshot), since_ms=since_ms)

    def _followed(self, provider: str) -> list[str]:
        """What is followed of a provider's events: its outcomes, and reports of duplicate ones."""
        names = self._bus.names
        statuses = ("retrying", "completed", "failed", "cancelled")
        return [
            *(names.event_subject(provider, "*", status) for status in statuses),
            names.duplicate_subject(provider, "*", "*"),
        ]

    def _observe(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        names = self._bus.names
        if names.is_duplicate_report(subject):
            self._observe_duplicate(data)
            return
        try:
            event = event_decoder.decode(data)
        except msgspec.DecodeError as exc:
            log.debug("metrics: skipping an event that does not decode: %s", exc)
            return
        on = self._bus.names.provider_of_subject(subject)
        if event.provider != on:
            return  # a worker may write under its own provider only: an event naming another is forged
        # Counted under the provider whose subject it is on; a final is counted once per task, run and
        # provider, so that another credential's forged final of a task cannot hide the real one, and
        # a run replayed from the dead letters counts its own outcome.
        provider, run = self._provider_label(on), run_ended(headers)
        match event:
            case Retrying():
                self._series(self._retries, provider, event.reason).inc()
                if event.reason == "rate_limit" and event.called:
                    self._series(self._rate_limited, provider).inc()
                    self.history.record_rate_limit(event.at_ms)
            case Failed():
                # A rejected submission is recorded outside the worker's final events (and may be
                # followed by the same task's completion once it is queued again).
                kind = "rejected" if event.reason == "rejected" else "final"
                if self._first_time(f"{on}:{event.task_id}:{kind}:{run}"):
                    self._series(self._failed, provider, event.reason).inc()
                    self.history.record_failed(provider, event.at_ms, live=True)
                    if event.reason == "lost":
                        self._lost.inc()
            case Completed():
                if self._first_time(f"{on}:{event.task_id}:final:{run}"):
                    self._completed_task(provider, event)
                    self.history.record_completed(
                        provider, event.at_ms, event.submitted_at_ms, event.started_at_ms, live=True
                    )
            case Cancelled():
                if self._first_time(f"{on}:{event.task_id}:final:{run}"):
                    self._series(self._cancelled, provider, event.was).inc()
            case _:
                pass  # running: nothing to count

    def _observe_duplicate(self, data: bytes) -> None:
        try:
            report = duplicate_decoder.decode(data)
        except msgspec.DecodeError as exc:
            log.debug("metrics: skipping a duplicate report that does not decode: %s", exc)
            return
        self._series(self._duplicates, self._provider_label(report.provider)).inc()

    def _completed_task(self, provider: str, event: Completed) -> None:
        model = self._model_label(provider, event.model)
        self._series(self._completed, provider, model).inc()
        totals = self._usage.setdefault((provider, model), _UsageTotals())
        totals.completed += 1
        if event.cached:  # no call: no tokens spent (its usage is the first answer's), no cost
            self._series(self._cache_hits, provider, model).inc()
        elif event.usage is not None:
            input_tokens, output_tokens = max(0, event.usage.input_tokens), max(0, event.usage.output_tokens)
            self._series(self._tokens, provider, model, "input").inc(input_tokens)
            self._series(self._tokens, provider, model, "output").inc(output_tokens)
            totals.input_tokens += input_tokens
            totals.output_tokens += output_tokens
        if event.cost_usd is not None and event.cost_usd >= 0:
            self._series(self._cost, provider, model).inc(event.cost_usd)
            totals.cost_usd += event.cost_usd
        else:
            totals.unpriced += 1
        if event.submitted_at_ms and event.started_at_ms:
            wait_s = (event.started_at_ms - event.submitted_at_ms) / 1000
            self._series(self._queue_wait, provider).observe(max(0.0, wait_s))  # clocks of two machines
        if event.call_s > 0:
            self._series(self._call, provider).observe(event.call_s)
        if event.submitted_at_ms and event.at_ms:
            self._series(self._duration, provider).observe(
                max(0.0, (event.at_ms - event.submitted_at_ms) / 1000)
            )

    def _series(self, metric: _Metric, *labels: str) -> _Metric:
        """``metric.labels(*labels)``, looked up once: prometheus_client's ``labels()`` costs about as
        much as the rest of counting a completion, and a completion counts up to seven series."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return cast(_Metric, child)

    def _first_time(self, key: str) -> bool:
        if key in self._recent:
            return False
        self._recent[key] = None
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)
        return True

    def _provider_label(self, provider: str) -> str:
        provider = provider[:MAX_LABEL_CHARS]
        if provider in self._providers:
            return provider
        if len(self._providers) >= MAX_PROVIDERS:
            return OTHER
        self._providers.add(provider)
        return provider

    def _model_label(self, provider: str, model: str | None) -> str:
        if not model:
            return UNKNOWN_MODEL
        model = model[:MAX_LABEL_CHARS]
        seen = self._models.setdefault(provider, set())
        if model in seen:
            return model
        if len(seen) >= MAX_MODELS_PER_PROVIDER:
            return OTHER
        seen.add(model)
        return model

    # gauges --------------------------------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug here must not take the gateway down with it
                log.exception("metrics: refreshing the gauges failed")
            await anyio.sleep(self._refresh_s)

    async def _read_gauges(self) -> Snapshot:
        bus = self._bus
        depths = await queue_depths(bus)
        try:
            beats = _beats(await kv_entries(bus.workers_kv, timeout_s=bus.settings.request_timeout_s))
        except nats.js.errors.NotFoundError:  # a restarted server lost the in-memory heartbeat bucket
            await redeclare_workers_bucket(bus)
            beats = []
        cooldown_values = await kv_entries(bus.providers_kv, timeout_s=bus.settings.request_timeout_s)
        cooldowns = provider_cooldowns(cooldown_values, beats)
        dead_letter_streams = await dlq_streams(bus)
        providers_with_events = await event_providers(bus)
        events_streams = [bus.names.events_stream_of(p) for p in providers_with_events]
        infos = {
            stream: await bus.js.stream_info(stream)
            for stream in (bus.names.tasks_stream, *events_streams, *dead_letter_streams)
        }
        states = {stream: info.state for stream, info in infos.items()}
        lost = {stream: lost_count(state) for stream, state in states.items()}
        refusing = (bus.names.tasks_stream, *dead_letter_streams)  # discard new: full, they refuse
        counted = await submitted_counts(bus)

        pending: dict[str, int] = {}
        ack_pending: dict[str, int] = {}
        workers: dict[str, int] = {}
        cooldown_s: dict[str, float] = {}
        snap = Snapshot(
            pending=pending,
            ack_pending=ack_pending,
            workers=workers,
            cooldown_s=cooldown_s,
            lost=lost,
            stream_fill={stream: fill_ratio(infos[stream]) for stream in refusing},
            dead_letters=sum(states[stream].messages for stream in dead_letter_streams),
            bucket_fill=await self._fill.read(providers_with_events),
            at_s=time.time(),
        )
        for provider, count in counted.items():
            before = self._submitted_before.get(provider, 0)
            if count < before:  # the counters stream was made anew
                before = self._submitted_before[provider] = 0
            label = self._provider_label(provider)
            snap.submitted[label] = snap.submitted.get(label, 0) + count - before
        providers = set(depths) | {b.provider for b in beats} | set(cooldowns)
        for provider in providers:
            label = self._provider_label(provider)
            depth = depths.get(provider, QueueDepth(0, 0))
            pending[label] = pending.get(label, 0) + depth.pending
            ack_pending[label] = ack_pending.get(label, 0) + depth.ack_pending
            workers.setdefault(label, 0)
            cooldown_s.setdefault(label, 0.0)
        now = now_ms()
        for beat in beats:
            label = self._provider_label(beat.provider)
            workers[label] += 1
            if beat.waiting:
                snap.waiting[label, beat.waiting] = snap.waiting.get((label, beat.waiting), 0) + 1
        for provider, record in cooldowns.items():
            if not record.refused:
                label = self._provider_label(provider)
                cooldown_s[label] = max(cooldown_s[label], max(0, record.until_ms - now) / 1000)
        for record in decode_records(cooldown_values):
            key = (self._provider_label(record.provider), record.key[:MAX_LABEL_CHARS])
            snap.key_refused[key] = float(record.refused)
            snap.key_cooldown_s[key] = 0.0 if record.refused else max(0, record.until_ms - now) / 1000
        for scope, ledger in (await ledgers(bus.budgets_kv)).items():
            self._budget_figures(snap, scope, ledger, now)
        return snap

    def _budget_figures(self, snap: Snapshot, scope: str, ledger: Ledger, now: int) -> None:
        limits = ledger.limits
        if limits is None:
            return
        provider, _, rest = scope.partition(".")
        key, _, model = rest.partition(".")
        ledger.prune(limits, now)
        labels = (self._provider_label(provider), key[:MAX_LABEL_CHARS], self._model_label(provider, model))
        used = {
            "rpm": len(ledger.calls),
            "tpm": sum(c[1] for c in ledger.calls),
            "rpd": sum(n for _, n in ledger.day),
        }
        for limit, value in used.items():
            cap = getattr(limits, limit)
            if cap is not None:
                snap.budget_used[(*labels, limit)] = float(value)
                snap.budget_limit[(*labels, limit)] = float(cap)


def fill_ratio(info: StreamInfo) -> float:
    """How full a stream is: the larger of its messages over its max_msgs and its bytes over its
    max_bytes (0 for a stream with neither limit)."""
    config, state = info.config, info.state
    ratios = [
        used / most
        for used, most in ((state.messages, config.max_msgs or -1), (state.bytes, config.max_bytes or -1))
        if most > 0
    ]
    return max(ratios, default=0.0)


def lost_count(state: StreamState) -> int:
    """How many messages the server says a stream lost (``state.lost``), 0 when it says none."""
    return len(state.lost.msgs or []) if state.lost is not None else 0


def _beats(values: dict[str, bytes]) -> list[WorkerBeat]:
    """The heartbeats that decode (one unreadable key must not hide every worker, nor stop the gauges)."""
    beats = []
    for key, raw in values.items():
        if (beat := beat_of(key, raw)) is not None:
            beats.append(beat)
        else:
            log.debug("metrics: the heartbeat %s does not decode, or is not the worker its key names", key)
    return beats


def _depths(snap: Snapshot) -> dict[str, int]:
    """Each provider's queue depth in a snapshot: its tasks not yet handed out, and those in hand."""
    return {p: snap.pending.get(p, 0) + snap.ack_pending.get(p, 0) for p in snap.pending}
