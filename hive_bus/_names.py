"""Every subject, stream, consumer and bucket name on the bus, in one place.

All names derive from a prefix (``hive`` by default), so several buses, or several tests, can share one
NATS server without seeing each other's work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._errors import HiveError

# A provider name becomes a subject token and part of a consumer name, so it may hold neither dots,
# wildcards nor white space. Kept short and plain so that it also reads well in metrics and logs.
PROVIDER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_PROVIDER_RE = re.compile(PROVIDER_PATTERN)
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# Each provider has one queue per priority; a worker takes from "high" before "normal" before "low".
PRIORITIES = ("high", "normal", "low")


def is_valid_token(name: str) -> bool:
    """A name fit to be one subject token (a provider's, or a worker credential's)."""
    return _PROVIDER_RE.match(name) is not None


def check_provider(provider: str | None) -> None:
    """Raise :class:`HiveError` for a provider filter that is not a provider's name (it goes into a
    subject)."""
    if provider is not None and not is_valid_token(provider):
        raise HiveError(f"provider {provider!r} must be 1-64 letters, digits, '_' or '-'")


@dataclass(frozen=True, slots=True)
class Names:
    """The names of one bus's objects.

    ``<prefix>.tasks.<provider>.<priority>.<task id>`` carries task messages into ``<PREFIX>_TASKS``
    (limits retention, kept as long as the events: a task message is its own record of acceptance), which
    republishes each one, headers only, as the task's ``queued`` event;
    ``<prefix>.events.<provider>.<task id>.<status>`` carries each task's lifecycle into ``<PREFIX>_EVENTS``
    (the status token lets a reader ask for completions alone);
    ``<prefix>.events.<provider>.<task id>.<status>.duplicate`` reports a final outcome that JetStream
    refused as a duplicate (a second worker finished a task already recorded): one token longer, so no
    reader of a task's events (``events_of``, ``final_events``) ever sees it;
    ``<prefix>.counters.submitted.<provider>`` is the count of tasks accepted for a provider, kept by
    ``<PREFIX>_COUNTERS``, a stream of JetStream counters (each publish adds its ``Nats-Incr``);
    ``<prefix>.counters.unfetched_cancels.<provider>`` counts the tasks cancelled while queued that no
    worker has fetched yet (the hub adds one, the worker that fetches one takes it off): what the
    consumers' pending counts hold beyond the queue; ``<prefix>.counters.room`` is the gateways' probe
    that JetStream still stores writes (each adds 0 to it: services.room);
    ``<prefix>.dlq.<provider>.<task id>`` carries dead letters (a failed event with its task) into
    ``<PREFIX>_DLQ_<provider>``, one stream per provider with limits of its own, so that no provider's
    workers can fill another's (``<PREFIX>_DLQ`` held every provider's before);
    ``<prefix>_<provider>_<priority>`` are the durable pull consumers all workers of a provider share;
    ``<prefix>_router`` is the gateway's consumer of ``moved`` events, which queues a moved task again;
    ``<prefix>_workers`` is the KV bucket of worker heartbeats;
    ``<prefix>_providers`` is the KV bucket of each provider key's cooldown (keys ``<provider>.<key>``);
    ``<prefix>_budgets`` is the KV bucket of request and token budgets (keys ``<provider>.<key>.<model>``);
    ``<prefix>_cache`` is the KV bucket (stream ``KV_<prefix>_cache``) of the response cache: one key per
    cached answer, ``<provider>.<sha256 of the request>``, each expiring by its own message TTL;
    ``<prefix>_batches`` is the KV bucket of batches (OpenAI's Batch API): one key per batch id, its
    definition and state, changed by compare-and-set on its revision (hive_bus._batches);
    ``<prefix>.chunks.<provider>.<task id>`` carries a streamed task's output as it is produced, on core
    NATS (not stored: a chunk lost is recovered from the completed event), from the workers of the
    provider the task runs on to the gateway, the only reader;
    ``<prefix>_blobs_<provider>`` is one provider's Object Store bucket (stream
    ``OBJ_<prefix>_blobs_<provider>``) of the claim check: a task's content or an output too large for a
    message, its chunks on ``$O.<prefix>_blobs_<provider>.C.<provider>.<task id>.<kind>.<nonce>`` (a
    bucket a provider, each within its own limit, so that a worker credential can fill its own provider's
    alone); ``<prefix>_blobs`` is the one bucket of every provider, as buses before kept them, still read.
    ``<PREFIX>_SCHEDULES`` holds the server's timers (JetStream message schedules, hive_bus._timers):
    each definition on ``<prefix>.schedule.<kind>.<id>`` fires into ``<prefix>.fired.<kind>.<id>``, which
    the gateways read through the durable consumer ``<prefix>_timers``; no worker credential may
    publish or read either.
    """

    prefix: str = "hive"

    def __post_init__(self) -> None:
        if _PREFIX_RE.match(self.prefix) is None:
            raise ValueError(
                f"bus prefix {self.prefix!r} is not valid: use 1-32 lower-case letters, digits or '_', "
                "starting with a letter"
            )

    @property
    def tasks_stream(self) -> str:
        return f"{self.prefix.upper()}_TASKS"

    def events_stream_of(self, provider: str) -> str:
        """The stream of one provider's task events, ``<prefix>.events.<provider>.>``: one per provider,
        with limits of its own, so that no provider's workers (or a credential of theirs) can push
        another provider's history out."""
        return f"{self.prefix.upper()}_EVENTS_{provider}"

    def events_streams_prefix(self) -> str:
        """What the name of every provider's events stream starts with."""
        return f"{self.prefix.upper()}_EVENTS_"

    def provider_of_events_stream(self, stream: str) -> str | None:
        """The provider whose events ``stream`` holds, or None for a stream that is not one."""
        provider = stream.removeprefix(self.events_streams_prefix())
        return provider if provider != stream and is_valid_token(provider) else None

    @property
    def events_stream(self) -> str:
        """The one events stream of every provider that buses made before events were kept per
        provider; split into per-provider streams by the upgrade (hive_bus._upgrade)."""
        return f"{self.prefix.upper()}_EVENTS"

    @property
    def shared_events_parked(self) -> str:
        """The subject the shared events stream is given while it is split: none that anyone uses."""
        return f"{self.prefix}.events_split"

    def dlq_stream(self, provider: str) -> str:
        """The stream of one provider's dead letters."""
        return f"{self.prefix.upper()}_DLQ_{provider}"

    @property
    def shared_dlq_stream(self) -> str:
        """The one dead-letter stream of every provider that buses made before dead letters were kept
        per provider; split into per-provider streams when the gateway starts."""
        return f"{self.prefix.upper()}_DLQ"

    @property
    def shared_dlq_parked(self) -> str:
        """The subject the shared stream is given while it is split: none that anyone publishes on."""
        return f"{self.prefix}.dlq_split"

    @property
    def counters_stream(self) -> str:
        return f"{self.prefix.upper()}_COUNTERS"

    @property
    def workers_bucket(self) -> str:
        return f"{self.prefix}_workers"

    @property
    def providers_bucket(self) -> str:
        return f"{self.prefix}_providers"

    @property
    def budgets_bucket(self) -> str:
        return f"{self.prefix}_budgets"

    @property
    def cache_bucket(self) -> str:
        return f"{self.prefix}_cache"

    @property
    def cache_stream(self) -> str:
        return f"KV_{self.cache_bucket}"

    def cache_subject(self, provider: str, digest: str) -> str:
        """A cached answer's key in the response cache bucket: ``<provider>.<sha256 of the request>``."""
        return f"$KV.{self.cache_bucket}.{provider}.{digest}"

    @property
    def blobs_bucket(self) -> str:
        return f"{self.prefix}_blobs"

    @property
    def served_bucket(self) -> str:
        """The KV bucket of the providers a worker served in the last day (hive_bus._served)."""
        return f"{self.prefix}_served"

    @property
    def cancels_bucket(self) -> str:
        return f"{self.prefix}_cancels"

    def cancel_key(self, provider: str, task_id: str) -> str:
        """A cancelled task's key in the cancels bucket: what its provider's workers watch."""
        return f"{provider}.{task_id}"

    @property
    def files_bucket(self) -> str:
        return f"{self.prefix}_files"

    @property
    def batches_bucket(self) -> str:
        return f"{self.prefix}_batches"

    @property
    def blobs_stream(self) -> str:
        return f"OBJ_{self.blobs_bucket}"

    def blobs_bucket_of(self, provider: str) -> str:
        """One provider's claim check bucket."""
        return f"{self.blobs_bucket}_{provider}"

    def blob_chunks(self, bucket: str, nuid: str) -> str:
        """The subject of one object's chunks in ``bucket``; ``nuid`` is ``<provider>.<task id>.<kind>.<nonce>``."""
        return f"$O.{bucket}.C.{nuid}"

    def blob_meta(self, bucket: str, encoded_name: str) -> str:
        """The subject of one object's entry (its name base64url-encoded, as the Object Store does)."""
        return f"$O.{bucket}.M.{encoded_name}"

    @property
    def schedules_bucket(self) -> str:
        """The KV bucket of recurring schedules' records (hive_bus._schedules), one key per schedule."""
        return f"{self.prefix}_schedules"

    @property
    def schedules_stream(self) -> str:
        return f"{self.prefix.upper()}_SCHEDULES"

    def schedule_subject(self, kind: str, key: str) -> str:
        """A timer's definition (one per subject: a new one replaces it)."""
        return f"{self.prefix}.schedule.{kind}.{key}"

    def fired_subject(self, kind: str, key: str) -> str:
        """Where the server publishes a timer's firing."""
        return f"{self.prefix}.fired.{kind}.{key}"

    @property
    def all_schedules(self) -> str:
        return f"{self.prefix}.schedule.>"

    @property
    def all_fired(self) -> str:
        return f"{self.prefix}.fired.>"

    @property
    def timers(self) -> str:
        """The gateways' durable consumer of fired timers."""
        return f"{self.prefix}_timers"

    @property
    def router(self) -> str:
        return f"{self.prefix}_router"

    def tally(self, status: str, provider: str | None = None) -> str:
        """The durable consumer of the events stream that counts ``status`` events (of one provider, or
        of all): see hive_bus._tallies. A status holds no ``_``, so no two (status, provider) share one."""
        return f"{self.prefix}_tally_{status}" + (f"_{provider}" if provider else "")

    @property
    def all_tasks(self) -> str:
        """Every task message: ``<prefix>.tasks.<provider>.<priority>.<task id>``."""
        return f"{self.prefix}.tasks.*.*.*"

    def tasks_of(self, task_id: str) -> str:
        """The subject filter of one task's messages, whatever provider and priority it was queued on
        (a move puts it on another provider; a replay queues it again)."""
        return f"{self.prefix}.tasks.*.*.{task_id}"

    @property
    def all_dlq(self) -> str:
        return f"{self.prefix}.dlq.>"

    def dlq_subject(self, provider: str, task_id: str) -> str:
        return f"{self.prefix}.dlq.{provider}.{task_id}"

    def dead_letters_of(self, task_id: str) -> str:
        return f"{self.prefix}.dlq.*.{task_id}"

    @property
    def moved_events(self) -> str:
        return f"{self.prefix}.events.*.*.moved"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.events.>"

    def events_under(self, provider: str) -> str:
        """Every event recorded under ``provider``: the subjects of its events stream."""
        return f"{self.prefix}.events.{provider}.>"

    @property
    def all_counters(self) -> str:
        return f"{self.prefix}.counters.>"

    def submitted_counter(self, provider: str) -> str:
        return f"{self.prefix}.counters.submitted.{provider}"

    @property
    def submitted_counters(self) -> str:
        return f"{self.prefix}.counters.submitted.*"

    def unfetched_cancels_counter(self, provider: str) -> str:
        return f"{self.prefix}.counters.unfetched_cancels.{provider}"

    @property
    def unfetched_cancels_counters(self) -> str:
        return f"{self.prefix}.counters.unfetched_cancels.*"

    @property
    def room_probe(self) -> str:
        return f"{self.prefix}.counters.room"

    @property
    def outcome_events(self) -> list[str]:
        """The subject filters of the events that say how a run went (retries, final outcomes and
        reports of duplicate ones): every event but ``queued``, ``running`` and ``moved``."""
        ending = [
            f"{self.prefix}.events.*.*.{status}"
            for status in ("retrying", "completed", "failed", "cancelled")
        ]
        return [*ending, f"{self.prefix}.events.*.*.*.duplicate"]

    def task_subject(self, provider: str, priority: str, task_id: str) -> str:
        """Where a task is queued: the tasks stream republishes each one stored as a headers-only
        ``queued`` event on ``<prefix>.events.<provider>.<task id>.queued``."""
        return f"{self.prefix}.tasks.{provider}.{priority}.{task_id}"

    def task_filter(self, provider: str, priority: str = "normal") -> str:
        """The subject filter of a provider's tasks of one priority (its durable consumer's)."""
        return f"{self.prefix}.tasks.{provider}.{priority}.*"

    @property
    def queued_republish(self) -> tuple[str, str]:
        """The tasks stream's RePublish source and destination: each task stored becomes its ``queued``
        event, headers only (the server adds ``Nats-Subject`` and ``Nats-Sequence``: where the task is)."""
        return self.all_tasks, f"{self.prefix}.events.{{{{wildcard(1)}}}}.{{{{wildcard(3)}}}}.queued"

    @property
    def upgrade_stream(self) -> str:
        """Where an upgrade keeps a work-queue tasks stream's tasks while the stream is made again."""
        return f"{self.prefix.upper()}_TASKS_UPGRADE"

    @property
    def upgrade_subjects(self) -> str:
        return f"{self.prefix}.tasks_upgrade.>"

    def event_subject(self, provider: str, task_id: str, status: str) -> str:
        return f"{self.prefix}.events.{provider}.{task_id}.{status}"

    def chunk_subject(self, provider: str, task_id: str) -> str:
        """Where a worker of ``provider`` publishes the chunks of a streamed task it runs."""
        return f"{self.prefix}.chunks.{provider}.{task_id}"

    def chunks_of(self, task_id: str) -> str:
        """The subject filter of one task's chunks, whatever provider runs it."""
        return f"{self.prefix}.chunks.*.{task_id}"

    def duplicate_subject(self, provider: str, task_id: str, status: str) -> str:
        """Where a worker reports a final outcome that was not recorded because one already was."""
        return f"{self.prefix}.events.{provider}.{task_id}.{status}.duplicate"

    def is_duplicate_report(self, subject: str) -> bool:
        tokens = subject.split(".")
        return len(tokens) == 6 and tokens[-1] == "duplicate" and subject.startswith(f"{self.prefix}.events.")

    def events_of(self, task_id: str, provider: str | None = None) -> str:
        """The subject filter that matches every event of one task, whatever its provider (or those
        recorded under ``provider``)."""
        return f"{self.prefix}.events.{provider or '*'}.{task_id}.*"

    def events(self, provider: str | None = None) -> str:
        """The subject filter that matches every event of one provider's tasks, or of all tasks."""
        return f"{self.prefix}.events.{provider or '*'}.*.*"

    def status_of_subject(self, subject: str) -> str:
        """The status token that ends an event subject."""
        return subject.rsplit(".", 1)[-1]

    def final_events(self, provider: str | None = None) -> list[str]:
        """Subject filters for tasks' last events (completed, failed or cancelled), of one provider or all."""
        return [
            f"{self.prefix}.events.{provider or '*'}.*.{status}"
            for status in ("completed", "failed", "cancelled")
        ]

    def consumer(self, provider: str, priority: str = "normal") -> str:
        # Every name ends in its priority, so no two (provider, priority) pairs share one, even though
        # provider names may themselves hold '_'.
        return f"{self.prefix}_{provider}_{priority}"

    def of_consumer(self, name: str) -> tuple[str, str] | None:
        """The (provider, priority) of one of this bus's task consumers, or None."""
        head, sep, priority = name.rpartition("_")
        provider = head.removeprefix(f"{self.prefix}_")
        if not sep or priority not in PRIORITIES or provider == head or not is_valid_token(provider):
            return None
        return provider, priority

    def provider_of_subject(self, subject: str) -> str:
        """The provider token of a task or event subject."""
        return subject.split(".")[2]

    # the metadata index (hive_bus._index) ------------------------------------------------------------
    # ``<PREFIX>_INDEX`` keeps one message per indexed metadata key of a task, on
    # ``<prefix>.index.<key token>.<value hash>.<task id>``: the tasks of one key and value are one
    # subject filter. Written by the processes that submit (gateway, client), never by a worker.

    @property
    def index_stream(self) -> str:
        return f"{self.prefix.upper()}_INDEX"

    @property
    def all_index(self) -> str:
        return f"{self.prefix}.index.>"

    def index_subject(self, key_token: str, value_hash: str, task_id: str) -> str:
        return f"{self.prefix}.index.{key_token}.{value_hash}.{task_id}"

    def index_filter(self, key_token: str, value_hash: str) -> str:
        """The subject filter of every task indexed under one metadata key and value."""
        return f"{self.prefix}.index.{key_token}.{value_hash}.*"

    # webhooks (hive_bus.services.webhooks) -------------------------------------------------------
    # ``<PREFIX>_WEBHOOKS`` is the work-queue stream of deliveries to make, one message per event and
    # receiver on ``<prefix>.webhooks.out.<webhook id>``; ``<PREFIX>_WEBHOOK_LOG`` keeps the last record
    # of each delivery on ``<prefix>.webhooks.log.<webhook id>`` (one message per subject). The gateways
    # share two durable consumers: ``<prefix>_webhooks_events`` reads the final events and queues their
    # deliveries, ``<prefix>_webhooks`` makes them.

    @property
    def webhooks_stream(self) -> str:
        return f"{self.prefix.upper()}_WEBHOOKS"

    @property
    def webhook_log_stream(self) -> str:
        return f"{self.prefix.upper()}_WEBHOOK_LOG"

    def webhook_subject(self, webhook_id: str) -> str:
        return f"{self.prefix}.webhooks.out.{webhook_id}"

    @property
    def all_webhooks(self) -> str:
        return f"{self.prefix}.webhooks.out.*"

    def webhook_log_subject(self, webhook_id: str) -> str:
        return f"{self.prefix}.webhooks.log.{webhook_id}"

    @property
    def all_webhook_logs(self) -> str:
        return f"{self.prefix}.webhooks.log.*"

    @property
    def webhook_events_consumer(self) -> str:
        return f"{self.prefix}_webhooks_events"

    @property
    def webhooks_consumer(self) -> str:
        return f"{self.prefix}_webhooks"

    @property
    def webhook_events(self) -> list[str]:
        """The subject filters of the events a webhook may announce: every task's final event
        (``cancelled`` included, for the cancel of issue 16)."""
        return [f"{self.prefix}.events.*.*.{status}" for status in ("completed", "failed", "cancelled")]
