"""Errors, classified by what happens next.

A provider raises one of three kinds, and the worker runtime turns each into exactly one JetStream
action (see ``_worker.settle``):

- :class:`RetryAfter`: the provider said when to come back (a 429 with its delay): NAK with that delay.
- :class:`RetryLater`: a passing fault (5xx, timeout, connection): NAK with exponential backoff.
- :class:`FailNow`: retrying cannot help (bad request, bad key): TERM, with a failed event.

The rest are errors of the bus itself, raised to users of the client.
"""

from __future__ import annotations

import math
from typing import Literal

Quota = Literal["minute", "day", "unknown"]


class ProviderError(Exception):
    """Base of the three outcomes a provider may raise instead of returning an output.

    ``status`` is the HTTP status that says what went wrong, where there is one: the provider's own
    answer (400, 404, 503...), or 400 for a task the adapter knows its provider cannot take. A task that
    fails for good keeps it (``Failed.provider_status``), so that the OpenAI-style routes answer with
    the error the cause deserves."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class RetryAfter(ProviderError):
    """Come back after ``retry_after_s`` seconds; the provider said so (rate limit).

    ``quota`` tells a per-minute limit from a per-day one (``"minute"``, ``"day"`` or ``"unknown"``).
    Every worker of the provider waits it out together, and the wait never uses up the task's attempts.
    """

    def __init__(self, message: str, *, retry_after_s: float, quota: Quota = "unknown") -> None:
        super().__init__(message, status=429)
        self.retry_after_s = sane_delay_s(retry_after_s)
        self.quota: Quota = quota


# The longest a provider's word may hold a key: a daily quota resets within a day.
MAX_RETRY_AFTER_S = 86400.0
# When the provider's delay is not a number at all.
UNKNOWN_RETRY_AFTER_S = 10.0


def sane_delay_s(value: float) -> float:
    """A provider's delay made usable: not a number gives :data:`UNKNOWN_RETRY_AFTER_S`, a negative one
    0, an infinite or absurd one :data:`MAX_RETRY_AFTER_S` (``inf`` overflowed the settler's ints)."""
    if math.isnan(value):
        return UNKNOWN_RETRY_AFTER_S
    return min(max(0.0, value), MAX_RETRY_AFTER_S)


class RetryLater(ProviderError):
    """A transient fault: try again after a backoff that grows with the attempts."""


class InvalidOutput(RetryLater):
    """The provider answered, but not in the task's ``response_format`` (not JSON, not an object, or not
    matching the schema): a failed attempt with reason ``invalid_output``, tried again within the task's
    ``max_attempts``. The message names the first validation error (its path and what is wrong)."""


class FailNow(ProviderError):
    """A permanent fault: retrying cannot help."""


class BadRequest(FailNow):
    """The provider found the task itself wrong (400, 413, 422): the user's own bad request, which no
    other provider would take either; never moved to a fallback, whatever the task's ``fallback_on``."""


class NoQuota(FailNow):
    """The key's quota for this model is zero (a free tier without the model): no wait fixes it. The
    worker leaves that key out for the model for a while and tries the task with its next key; when no
    key has quota for the model, the task moves to its next fallback if it has one, else fails."""


class KeyRejected(FailNow):
    """The provider refused the API key itself (401/403). The worker sets that key aside for good and
    tries the task with its next key; only when none is left does the task fail."""


class HiveError(Exception):
    """Base of errors the bus raises to its users."""


class BusConfigError(HiveError):
    """A bus object exists with a configuration that this version cannot safely use."""


class BusUnavailable(HiveError):
    """NATS or JetStream did not answer; nothing was accepted."""


class BusRefused(BusUnavailable):
    """The NATS server refused this client (login, TLS or permissions): trying again cannot help."""


class QueueFull(HiveError):
    """The tasks stream is at its limits; nothing was accepted. Try again after ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoRoom(HiveError):
    """JetStream has no room for a stream the bus needs before it can run a provider's tasks (its
    events stream, its dead letters): every byte of the account's file storage is reserved by the
    ``max_bytes`` of the streams it has (``code`` ``storage_reserved``), or it has as many streams as
    its ``max_streams`` allows (``streams_limit``). Nothing was accepted, and trying again cannot help
    until the operator makes room; the message names the stream, the figures and what to raise."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class Unserved(HiveError):
    """No worker serves the task's provider now, and none did in the last day (a typo'd provider?), and
    the bus is set to refuse such tasks (``HIVE_REJECT_UNSERVED``); nothing was accepted. The message
    names the provider and the ones served."""

    def __init__(self, message: str, *, provider: str) -> None:
        super().__init__(message)
        self.provider = provider


class TaskNotFound(HiveError):
    """No event of this task id is on the bus (never submitted, or aged out)."""


class TaskEnded(HiveError):
    """The task has already ended (completed or failed): it cannot be cancelled."""


class TooLarge(HiveError):
    """A message, or a task's content, is larger than the bus can carry; nothing was accepted. Trying
    again cannot help. ``limit_bytes`` is the limit it broke, ``index`` the task's place in a batch."""

    def __init__(self, message: str, *, size_bytes: int, limit_bytes: int, index: int | None = None) -> None:
        super().__init__(message)
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes
        self.index = index
