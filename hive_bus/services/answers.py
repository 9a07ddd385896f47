"""Every answer the gateway gives to a submission, and every error body it writes, built in one place.

Two paths serve ``POST /v1/tasks`` and ``POST /v1/tasks/batch``: the fast path (:mod:`services.fastpath`,
plain ASGI) for the common valid case, and the routes (:mod:`services.api`, with the exception handlers
of :mod:`services.gateway`) for the rest. Both build their answers here, so they cannot drift apart;
``tests/test_submit_parity.py`` sends the same inputs through both and compares what comes back. The
:class:`~services.edge.Edge`'s refusals use the same error body.

An error body is always ``{"error": {"code": ..., "message": ..., "field": ...}}`` (``field`` only when
the error is about one).
"""

from __future__ import annotations

import logging

import msgspec

from hive_bus import Accepted, BusUnavailable, Hive, HiveError, QueueFull, TaskRequest
from hive_bus._errors import NoRoom, TooLarge, Unserved
from hive_bus._messages import error_field, explain, explain_error
from hive_bus._nesting import NestedTooDeep, check_json
from hive_bus.services.feeds import FeedsBusy
from hive_bus.services.list_reads import BUSY_RETRY_AFTER_S, ListsBusy

# as the body's idempotency_key (hive_bus._messages.IdempotencyKey)
IDEMPOTENCY_KEY_MAX_CHARS = 256

log = logging.getLogger("hive_bus.gateway")

# How long a client waits before sending again after the bus did not answer (or a batch was cut short).
BUS_RETRY_AFTER_S = 5
_encode = msgspec.json.Encoder().encode


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    code: str
    message: str
    field: str | None = None


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """Every error answer of the gateway."""

    error: ErrorDetail


class TaskAccepted(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str
    status: str
    duplicate: bool = False  # written only when true
    # why the task may never run (no worker serves its provider now, none did in the last day)
    warnings: list[str] = []


class BatchItem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One task of a batch: its id once accepted, or why it was not."""

    index: int
    id: str | None = None
    status: str | None = None
    error: str | None = None


class BatchAccepted(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    accepted: int
    rejected: int
    tasks: list[BatchItem]
    # each distinct warning of the accepted tasks, once (a provider no worker serves, named)
    warnings: list[str] = []


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """One answer: its status, its body, and the headers that go with it (``Retry-After``)."""

    status: int
    content: TaskAccepted | BatchAccepted | ErrorBody
    headers: dict[str, str] = {}

    def body(self) -> bytes:
        return _encode(self.content)


# errors ------------------------------------------------------------------------------------------


def error(status: int, code: str, message: str, *, field: str | None = None, **headers: str) -> Answer:
    """An error answer in the gateway's one shape."""
    return Answer(
        status=status,
        content=ErrorBody(error=ErrorDetail(code=code, message=message, field=field)),
        headers=headers,
    )


def invalid(message: str, *, field: str | None = None) -> Answer:
    """400: the request is not valid; ``message`` says what, ``field`` where."""
    return error(400, "invalid_request", message, field=field)


def not_json(detail: str) -> Answer:
    """400: a body that does not decode as JSON (``detail`` is the decoder's words)."""
    return error(400, "invalid_request", f"the request body is not valid JSON: {detail}")


def body_too_large(limit_bytes: int, what: str | None = None) -> Answer:
    """413: a body over the gateway's limit for ``what`` (a task, a batch), before any of it is read."""
    message = f"the request body is larger than the gateway's limit of {limit_bytes} bytes"
    return error(413, "body_too_large", f"{message} for {what}" if what else message)


def too_deep(body: bytes, *, batch: bool) -> Answer | None:
    """400 for a body nested deeper than the bus carries, naming the field; None for one that is not.
    Checked before any decoder sees the body: msgspec's (and so the framework's) would recurse until it
    fails."""
    try:
        check_json(body, enclosing=3 if batch else 1)  # a batch's tasks are in {"tasks": [...]}
    except NestedTooDeep as exc:
        return invalid(explain_error(exc), field=exc.field)
    return None


def what_is_posted(path: str) -> str | None:
    """What a body posted to ``path`` holds, as :func:`body_too_large` names it."""
    return {"/v1/tasks": "a task", "/v1/tasks/batch": "a batch"}.get(path)


def of_error(exc: HiveError) -> Answer | None:
    """The answer to a submission the bus did not accept, or None for an error no submission raises."""
    if isinstance(exc, TooLarge):
        return error(413, "too_large", str(exc))  # trying again cannot help: no Retry-After
    if isinstance(exc, Unserved):
        return error(400, "unserved_provider", str(exc), field="provider")
    if isinstance(exc, NoRoom):  # the operator's to fix (accounts.conf): no Retry-After
        return error(507, exc.code, str(exc))
    if isinstance(exc, QueueFull):
        return error(503, "queue_full", str(exc), **{"Retry-After": str(int(exc.retry_after_s))})
    if isinstance(exc, ListsBusy | FeedsBusy):
        return error(503, "busy", str(exc), **{"Retry-After": str(BUSY_RETRY_AFTER_S)})
    if isinstance(exc, BusUnavailable):
        return error(503, "bus_unavailable", str(exc), **{"Retry-After": str(BUS_RETRY_AFTER_S)})
    return None


# submissions -------------------------------------------------------------------------------------


async def submit_one(hive: Hive, request: TaskRequest, key_header: str | None = None) -> Answer:
    """Queue one task: 202 once JetStream has stored it; 200 with the first task's id and current status
    when its idempotency key (the body's, or ``key_header``: the ``Idempotency-Key`` header's, as chat
    completions take it) was already used. Raises what :meth:`Hive.submit_request` raises (answered
    by :func:`of_error`)."""
    if key_header is not None:
        if not 1 <= len(key_header) <= IDEMPOTENCY_KEY_MAX_CHARS:
            return invalid(
                f"header Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX_CHARS} characters",
                field="Idempotency-Key",
            )
        if request.idempotency_key not in (None, key_header):
            return invalid(
                "header Idempotency-Key and body field idempotency_key differ: give one of them, "
                "or the same key in both",
                field="idempotency_key",
            )
        request = msgspec.structs.replace(request, idempotency_key=key_header)
    try:
        accepted = await hive.submit_request(request)
    except msgspec.ValidationError as exc:  # valid, but not on this bus: a not_before too far ahead
        return invalid(explain_error(exc), field=error_field(exc))
    warnings = list(accepted.warnings)
    if accepted.duplicate:
        view = await hive.get(accepted.id)
        content = TaskAccepted(id=accepted.id, status=view.status, duplicate=True, warnings=warnings)
        return Answer(status=200, content=content)
    status = "scheduled" if accepted.scheduled else "queued"
    return Answer(status=202, content=TaskAccepted(id=accepted.id, status=status, warnings=warnings))


def batch_size_error(count: int, limit: int) -> Answer | None:
    """400 for a batch of no task or of more than ``limit``; None for one of a fitting size."""
    if count == 0:
        return invalid(explain("tasks", "a batch needs at least one task"), field="tasks")
    if count > limit:
        return invalid(
            explain("tasks", f"a batch holds at most {limit} tasks; this one has {count}"), field="tasks"
        )
    return None


async def submit_many(hive: Hive, tasks: list[TaskRequest]) -> Answer:
    """Queue a batch: 202 when every task was accepted; 503 with each task's outcome and ``Retry-After``
    when some were not; 400 naming the first task for a provider no worker serves when the bus refuses
    those (``HIVE_REJECT_UNSERVED``). Raises :class:`TooLarge` for a task the bus cannot carry (nothing
    queued)."""
    if hive.bus.settings.reject_unserved:
        for i, task in enumerate(tasks):
            if (warning := await hive.unserved(task.provider)) is not None:
                return error(400, "unserved_provider", f"tasks[{i}]: {warning}; nothing was accepted",
                             field=f"tasks[{i}].provider")  # fmt: skip
    try:
        content = batch_answer(await hive.submit_batch(tasks))
    except msgspec.ValidationError as exc:  # as one task's: the whole batch, nothing queued
        return invalid(explain_error(exc), field=error_field(exc))
    if content.rejected:
        return Answer(status=503, content=content, headers={"Retry-After": str(BUS_RETRY_AFTER_S)})
    return Answer(status=202, content=content)


def batch_answer(outcomes: list[Accepted | HiveError]) -> BatchAccepted:
    """What a batch's submission answers: each task's id, or why it was not accepted, in order."""
    items = [
        BatchItem(index=i, error=str(outcome))
        if isinstance(outcome, HiveError)
        else BatchItem(
            index=i,
            id=outcome.id,
            status="duplicate" if outcome.duplicate else "scheduled" if outcome.scheduled else "queued",
        )
        for i, outcome in enumerate(outcomes)
    ]
    rejected = sum(1 for item in items if item.error is not None)
    warnings = [w for o in outcomes if isinstance(o, Accepted) for w in o.warnings]
    return BatchAccepted(
        accepted=len(items) - rejected, rejected=rejected, tasks=items, warnings=list(dict.fromkeys(warnings))
    )
