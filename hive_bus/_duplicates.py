"""Reports of duplicate results: a final outcome that JetStream refused because the task already had one.

Only the worker whose publish was refused learns of it (its ``PubAck`` says ``duplicate``): a zombie
worker that outlived its AckWait, or a redelivery after an ack the server never stored. The provider
was called for nothing, which costs money and quota, so the worker says so on the bus: a small
:class:`DuplicateResult` on ``<prefix>.events.<provider>.<task id>.<status>.duplicate``. That subject is
in the events stream (so the report is stored, and a gateway that follows the stream counts it even if
the worker dies a moment later) but one token longer than a task's events, so it never becomes a
task's latest state nor counts as its result. The gateway turns the reports into
``hive_duplicate_results_total{provider}``.
"""

from __future__ import annotations

import logging
from typing import Literal

import msgspec
import nats.errors

from ._bus import Bus
from ._messages import Task, encoder, now_ms
from ._nesting import Guarded

log = logging.getLogger("hive_bus.worker")


class DuplicateResult(msgspec.Struct, frozen=True, kw_only=True, tag="duplicate.v1", tag_field="type"):
    """A final outcome a worker reached and the record already had: its provider call was wasted."""

    task_id: str
    provider: str
    at_ms: int
    worker: str
    # what this worker would have recorded
    status: Literal["completed", "failed"]


duplicate_decoder = Guarded(msgspec.json.Decoder(DuplicateResult), enclosing=1)


async def report_duplicate(bus: Bus, task: Task, status: Literal["completed", "failed"], worker: str) -> None:
    """Publish the report without waiting for the store's ack; never raises (it is informational)."""
    report = DuplicateResult(
        task_id=task.id, provider=task.provider, at_ms=now_ms(), worker=worker, status=status
    )
    try:
        await bus.nc.publish(
            bus.names.duplicate_subject(task.provider, task.id, status), encoder.encode(report)
        )
    except nats.errors.Error as exc:
        log.debug("could not report the duplicate result of task %s: %s", task.id, exc)
