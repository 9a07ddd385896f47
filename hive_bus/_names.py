"""Every subject, stream, consumer and bucket name on the bus, in one place.

All names derive from a prefix (``hive`` by default), so several buses, or several tests, can share one
NATS server without seeing each other's work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A provider name becomes a subject token and part of a consumer name, so it may hold neither dots,
# wildcards nor white space. Kept short and plain so that it also reads well in metrics and logs.
PROVIDER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_PROVIDER_RE = re.compile(PROVIDER_PATTERN)
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def is_valid_provider(name: str) -> bool:
    return _PROVIDER_RE.match(name) is not None


@dataclass(frozen=True, slots=True)
class Names:
    """The names of one bus's objects.

    ``<prefix>.tasks.<provider>`` carries task messages into the work-queue stream ``<PREFIX>_TASKS``;
    ``<prefix>.events.<provider>.<task id>.<status>`` carries each task's lifecycle into ``<PREFIX>_EVENTS``
    (the status token lets a reader ask for completions alone);
    ``<prefix>_<provider>`` is the durable pull consumer all workers of a provider share;
    ``<prefix>_workers`` is the KV bucket of worker heartbeats;
    ``<prefix>_providers`` is the KV bucket of provider-wide cooldowns, one key per provider.
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

    @property
    def events_stream(self) -> str:
        return f"{self.prefix.upper()}_EVENTS"

    @property
    def workers_bucket(self) -> str:
        return f"{self.prefix}_workers"

    @property
    def providers_bucket(self) -> str:
        return f"{self.prefix}_providers"

    @property
    def all_tasks(self) -> str:
        return f"{self.prefix}.tasks.*"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.events.>"

    def task_subject(self, provider: str) -> str:
        return f"{self.prefix}.tasks.{provider}"

    def event_subject(self, provider: str, task_id: str, status: str) -> str:
        return f"{self.prefix}.events.{provider}.{task_id}.{status}"

    def events_of(self, task_id: str) -> str:
        """The subject filter that matches every event of one task, whatever its provider."""
        return f"{self.prefix}.events.*.{task_id}.*"

    def events(self, provider: str | None = None) -> str:
        """The subject filter that matches every event of one provider's tasks, or of all tasks."""
        return f"{self.prefix}.events.{provider or '*'}.*.*"

    def status_of_subject(self, subject: str) -> str:
        """The status token that ends an event subject."""
        return subject.rsplit(".", 1)[-1]

    def final_events(self, provider: str | None = None) -> list[str]:
        """Subject filters for tasks' last events (completed or failed), of one provider or all."""
        return [f"{self.prefix}.events.{provider or '*'}.*.{status}" for status in ("completed", "failed")]

    def consumer(self, provider: str) -> str:
        return f"{self.prefix}_{provider}"

    def provider_of_subject(self, subject: str) -> str:
        """The provider token of a task or event subject."""
        return subject.split(".")[2]
