"""What needs a person, named in one list: the problem strip at the top of the dashboard.

Read from the metrics' last read of the bus (:class:`services.metrics.Snapshot`), so it costs the bus
nothing more: a provider with queued work and no live worker, a key its provider refused, a provider
cooling down (and until when), dead letters waiting, messages a stream lost, and a stale read (the
gateway has not managed to read the bus for a while, so every other figure is old), and webhooks
failing (deliveries retrying now, or given up or refused lately: :class:`WebhookTrouble`). Each names
the place that tells more (``link``: a fragment of the dashboard).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec

from .metrics import Snapshot
from .webhooks.records import DeliveryRecord

ProblemKind = Literal[
    "no_worker", "key_refused", "cooling_down", "dead_letters", "stream_lost", "stale", "webhooks_failing"
]
STALE_READS = 3  # refresh periods without a successful read before the figures count as stale
MIN_STALE_S = 15.0


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    kind: ProblemKind
    message: str  # a sentence for a person: what is wrong and what it holds up
    link: str  # where the page says more: "#provider-gemini", "#dlq", "#connection"
    provider: str | None = None
    count: int | None = None
    until_ms: int | None = None  # a cooldown's end


class WebhookTrouble(msgspec.Struct, frozen=True, kw_only=True):
    """Webhook deliveries going wrong, from the bus's delivery records (every gateway's)."""

    retrying: int = 0  # failing now: an attempt failed and another is due
    failed: int = 0  # given up after the last retry, lately
    refused: int = 0  # not sent, lately: the address is not allowed (or not a valid URL)
    last_error: str | None = None  # the newest of their errors


FAILED_WITHIN_MS = 24 * 3600 * 1000  # a delivery given up or refused counts as a problem for a day


def webhook_trouble(found: Sequence[DeliveryRecord], *, now_ms: int) -> WebhookTrouble:
    """What the delivery records (newest first) say is going wrong."""
    failing = [
        r
        for r in found
        if r.status == "retrying"
        or (r.status in ("failed", "refused") and now_ms - r.updated_at_ms <= FAILED_WITHIN_MS)
    ]
    return WebhookTrouble(
        retrying=sum(r.status == "retrying" for r in failing),
        failed=sum(r.status == "failed" for r in failing),
        refused=sum(r.status == "refused" for r in failing),
        last_error=next((r.last_error for r in failing if r.last_error), None),
    )


def problems_of(
    snap: Snapshot,
    *,
    now_s: float,
    refresh_s: float,
    since_s: float = 0.0,
    webhooks: WebhookTrouble | None = None,
) -> list[Problem]:
    """The problems the figures show, the most pressing first (``since_s``: when the gateway began
    reading the bus, so that a first read still under way is not called stale)."""
    found: list[Problem] = []
    stale_after_s = max(MIN_STALE_S, STALE_READS * refresh_s)
    last_s = snap.at_s if snap.at_s is not None else since_s
    if now_s - last_s > stale_after_s:
        since = (
            "has not read the bus yet"
            if snap.at_s is None
            else f"last read the bus {now_s - snap.at_s:.0f} s ago"
        )
        found.append(
            Problem(
                kind="stale",
                message=f"The gateway {since}: NATS is not answering it, and every figure here may be old.",
                link="#connection",
            )
        )
    for provider in sorted(snap.pending):
        queued = snap.pending.get(provider, 0) + snap.ack_pending.get(provider, 0)
        if queued and not snap.workers.get(provider, 0):
            found.append(
                Problem(
                    kind="no_worker",
                    message=f"{queued} task(s) wait for {provider} and no {provider} worker is online.",
                    link=f"#provider-{provider}",
                    provider=provider,
                    count=queued,
                )
            )
    for (provider, key), refused in sorted(snap.key_refused.items()):
        if refused:
            found.append(
                Problem(
                    kind="key_refused",
                    message=f"{provider} refused the key {key!r} (401/403): it is set aside until cleared.",
                    link=f"#provider-{provider}",
                    provider=provider,
                )
            )
    for provider, left_s in sorted(snap.cooldown_s.items()):
        if left_s > 0 and snap.at_s is not None:
            found.append(
                Problem(
                    kind="cooling_down",
                    message=f"{provider} is cooling down after a rate limit; its tasks wait.",
                    link=f"#provider-{provider}",
                    provider=provider,
                    until_ms=int((snap.at_s + left_s) * 1000),
                )
            )
    if snap.dead_letters:
        found.append(
            Problem(
                kind="dead_letters",
                message=f"{snap.dead_letters} dead letter(s) wait: tasks that failed for good, to replay or purge.",
                link="#dlq",
                count=snap.dead_letters,
            )
        )
    if webhooks is not None and (webhooks.retrying or webhooks.failed or webhooks.refused):
        said = [f"{webhooks.retrying} retrying"] if webhooks.retrying else []
        said += [f"{webhooks.failed} given up in the last day"] if webhooks.failed else []
        said += [f"{webhooks.refused} refused in the last day"] if webhooks.refused else []
        found.append(
            Problem(
                kind="webhooks_failing",
                message=(
                    f"Webhook deliveries are failing: {', '.join(said)}"
                    + (f" (last: {webhooks.last_error})." if webhooks.last_error else ".")
                ),
                link="#webhooks",
                count=webhooks.retrying + webhooks.failed + webhooks.refused,
            )
        )
    for stream, lost in sorted(snap.lost.items()):
        if lost:
            found.append(
                Problem(
                    kind="stream_lost",
                    message=f"The {stream} stream reports {lost} message(s) lost from its store (see docs/reliability.md).",
                    link="#problems",
                    count=lost,
                )
            )
    return found


__all__ = ["Problem", "WebhookTrouble", "problems_of", "webhook_trouble"]
