"""What a webhook says: the body (Standard Webhooks' ``type``, ``timestamp``, ``data``) and its id."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import msgspec

from hive_bus._messages import Task, TaskEvent, TaskView


class WebhookTask(TaskView, frozen=True, kw_only=True, omit_defaults=True):
    """A webhook's ``data``: the task's end as ``GET /v1/tasks/{id}`` shows it, with its metadata."""

    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class Payload(msgspec.Struct, frozen=True, kw_only=True):
    """The body of every webhook, in the Standard Webhooks shape (``type``, ``timestamp``, ``data``)."""

    type: str
    timestamp: str
    data: WebhookTask


_encode = msgspec.json.Encoder().encode


def webhook_id(task: Task, status: str, url: str) -> str:
    """The same for one task run's end and one receiver, whichever gateway queues it and however often."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return f"msg_{task.id}_{task.run}_{status}_{digest}"


def payload(kind: str, event: TaskEvent, task: Task) -> bytes:
    """The body announcing ``event``, the end of ``task`` (as the bus knows it: its metadata)."""
    view = msgspec.structs.asdict(TaskView.of(event))
    at = datetime.fromtimestamp(event.at_ms / 1000, UTC).isoformat(timespec="milliseconds")
    body = Payload(
        type=kind,
        timestamp=at.replace("+00:00", "Z"),
        data=WebhookTask(**(view | {"metadata": task.metadata})),
    )
    return _encode(body)


def without_output(body: bytes) -> bytes:
    """The body without the output and metadata, for one too large for a message."""
    doc = msgspec.json.decode(body)
    doc["data"].pop("output", None)
    doc["data"].pop("metadata", None)
    doc["data"]["truncated"] = True
    return _encode(doc)
