"""The gateway's webhook settings (``HIVE_WEBHOOK_*``, ``HIVE_WEBHOOKS``, ``HIVE_WEBHOOKS_FILE``), read once
at start-up, and the signer that holds the secret.

Signing is the reference implementation's (the ``standardwebhooks`` package: no dependencies of its
own), so what a receiver verifies with any Standard Webhooks library matches by construction. The
secret is kept inside :class:`Signer` and never shown: not in a repr, a log line, an event, a metric or
an error message (errors about it name the variable only).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from standardwebhooks import Webhook

from hive_bus._messages import WEBHOOK_EVENTS
from hive_bus._settings import INT64_MAX, MAX_SECONDS
from hive_bus._textfile import UnreadableFile, read_text

from .urls import Network, parse_networks, split

SECRET_PREFIX = "whsec_"
# The spec asks for secrets of 24 to 64 random bytes.
SECRET_MIN_BYTES, SECRET_MAX_BYTES = 24, 64
# What a gateway-wide webhook may announce: a task's end, and (once batches land) a batch's.
GATEWAY_EVENTS: tuple[str, ...] = (*WEBHOOK_EVENTS, "batch.completed")
# Seconds before each retry of a failed delivery: the first within 10 s, then growing; about 12 hours
# in all, so a receiver down for a night still gets its deliveries.
DEFAULT_RETRY_S: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 14400)


class WebhookConfigError(ValueError):
    """A webhook setting cannot be used; the message names it (never the secret)."""


class Signer:
    """Signs deliveries as Standard Webhooks says: ``webhook-signature: v1,<base64 HMAC-SHA256 of
    id.timestamp.body>`` with the ``whsec_`` secret."""

    def __init__(self, secret: str, *, where: str = "HIVE_WEBHOOK_SECRET") -> None:
        secret = secret.strip()
        if not secret.startswith(SECRET_PREFIX):
            raise WebhookConfigError(f"{where} must start with {SECRET_PREFIX} (a Standard Webhooks secret)")
        try:
            raw = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
        except (binascii.Error, ValueError):
            raise WebhookConfigError(f"{where}: what follows {SECRET_PREFIX} is not base64") from None
        if not SECRET_MIN_BYTES <= len(raw) <= SECRET_MAX_BYTES:
            raise WebhookConfigError(
                f"{where} holds {len(raw)} bytes; use {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} random bytes "
                f"(for example: echo {SECRET_PREFIX}$(head -c 32 /dev/urandom | base64))"
            )
        self._webhook = Webhook(raw)

    def __repr__(self) -> str:
        return "Signer(***)"

    def headers(self, webhook_id: str, body: bytes, at: datetime) -> dict[str, str]:
        """The three Standard Webhooks headers for one attempt of a delivery sent at ``at``."""
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(math.floor(at.timestamp())),
            "webhook-signature": self._webhook.sign(webhook_id, at, body.decode()),
        }


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A gateway-wide webhook: every task's (or batch's) end of the kinds in ``events``."""

    url: str
    events: tuple[str, ...] = GATEWAY_EVENTS


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """What the gateway needs to deliver webhooks; without a signer it delivers none (and refuses
    tasks that ask for one)."""

    signer: Signer | None = field(default=None, repr=False)
    allow_networks: tuple[Network, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    retry_s: tuple[float, ...] = DEFAULT_RETRY_S
    # one attempt: connecting, sending and reading the answer
    timeout_s: float = 10.0
    # the deliveries waiting to be made (stream <PREFIX>_WEBHOOKS); full, new ones are refused and
    # their events wait in the events stream
    queue_max_bytes: int = 64 * 1024**2
    # the records GET /v1/webhooks/deliveries lists (stream <PREFIX>_WEBHOOK_LOG), the oldest going first
    log_max_msgs: int = 10_000
    log_max_age_s: float = 7 * 86400.0
    # deliveries handed out and not settled; a delivery waiting for its retry counts as one
    max_pending: int = 10_000

    @property
    def enabled(self) -> bool:
        return self.signer is not None


_NUMBERS = {
    "HIVE_WEBHOOK_TIMEOUT_S": ("timeout_s", float),
    "HIVE_WEBHOOK_QUEUE_MAX_BYTES": ("queue_max_bytes", int),
    "HIVE_WEBHOOK_LOG_MAX_MSGS": ("log_max_msgs", int),
    "HIVE_WEBHOOK_LOG_MAX_AGE_S": ("log_max_age_s", float),
    "HIVE_WEBHOOK_MAX_PENDING": ("max_pending", int),
}
KNOWN_ENV = frozenset(
    {
        "HIVE_WEBHOOK_SECRET",
        "HIVE_WEBHOOK_SECRET_FILE",
        "HIVE_WEBHOOK_ALLOW_NETWORKS",
        "HIVE_WEBHOOK_RETRY_S",
        "HIVE_WEBHOOKS",
        "HIVE_WEBHOOKS_FILE",
        *_NUMBERS,
    }
)


def load_webhook_settings(environ: Mapping[str, str]) -> WebhookSettings:
    """The settings from ``HIVE_WEBHOOK*`` variables; raises :class:`WebhookConfigError` naming what is
    wrong (an unknown ``HIVE_WEBHOOK*`` name, with the one probably meant)."""
    unknown = sorted(k for k in environ if k.startswith("HIVE_WEBHOOK") and k not in KNOWN_ENV)
    if unknown:
        said = [
            f"{name} (did you mean {close[0]}?)"
            if (close := difflib.get_close_matches(name, KNOWN_ENV, 1))
            else name
            for name in unknown
        ]
        raise WebhookConfigError(
            f"unknown webhook setting(s) {', '.join(said)}; known: {', '.join(sorted(KNOWN_ENV))}"
        )
    values: dict[str, Any] = {"signer": _signer(environ)}
    try:
        values["allow_networks"] = parse_networks(environ.get("HIVE_WEBHOOK_ALLOW_NETWORKS", ""))
    except ValueError as exc:
        raise WebhookConfigError(f"HIVE_WEBHOOK_ALLOW_NETWORKS: {exc}") from None
    if "HIVE_WEBHOOK_RETRY_S" in environ:
        values["retry_s"] = _retries(environ["HIVE_WEBHOOK_RETRY_S"])
    for name, (attr, kind) in _NUMBERS.items():
        if name in environ:
            values[attr] = _positive(name, environ[name], kind)
    endpoints = _endpoints_file(environ.get("HIVE_WEBHOOKS_FILE"))
    if environ.get("HIVE_WEBHOOKS"):
        endpoints += endpoints_of(_toml(environ["HIVE_WEBHOOKS"], "HIVE_WEBHOOKS"), "HIVE_WEBHOOKS")
    if endpoints and values["signer"] is None:
        raise WebhookConfigError(
            "gateway-wide webhooks are set but HIVE_WEBHOOK_SECRET (or HIVE_WEBHOOK_SECRET_FILE) is not: "
            "deliveries must be signed"
        )
    values["endpoints"] = tuple(endpoints)
    return WebhookSettings(**values)


def _signer(environ: Mapping[str, str]) -> Signer | None:
    inline, path = environ.get("HIVE_WEBHOOK_SECRET"), environ.get("HIVE_WEBHOOK_SECRET_FILE")
    if inline and path:
        raise WebhookConfigError("HIVE_WEBHOOK_SECRET and HIVE_WEBHOOK_SECRET_FILE are both set: give one")
    if path:
        try:
            lines = read_text(path).splitlines()
        except UnreadableFile as exc:
            raise WebhookConfigError(f"cannot read HIVE_WEBHOOK_SECRET_FILE {path}: {exc}") from None
        return Signer(lines[0] if lines else "", where=f"HIVE_WEBHOOK_SECRET_FILE {path}")
    return Signer(inline) if inline else None


def _retries(text: str) -> tuple[float, ...]:
    delays = tuple(_positive("HIVE_WEBHOOK_RETRY_S", part, float) for part in text.split(",") if part.strip())
    if not delays:
        raise WebhookConfigError("HIVE_WEBHOOK_RETRY_S: give the seconds before each retry, comma-separated")
    return delays


def _positive(name: str, text: str, kind: type[int] | type[float]) -> Any:
    try:
        value = kind(text.strip())
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise WebhookConfigError(f"{name}: {text.strip()!r} is not a positive {kind.__name__}")
    # as the bus's settings: sizes and counts go to JetStream as int64, and every float here is seconds
    most = INT64_MAX if kind is int else MAX_SECONDS
    if value > most:
        raise WebhookConfigError(f"{name}: {text.strip()!r} is more than {most:,}")
    return value


def _toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise WebhookConfigError(f"{where} is not valid TOML: {exc}") from None


def _endpoints_file(path: str | None) -> list[Endpoint]:
    if not path:
        return []
    try:
        text = read_text(path)
    except UnreadableFile as exc:
        raise WebhookConfigError(f"cannot read HIVE_WEBHOOKS_FILE {path}: {exc}") from None
    return endpoints_of(_toml(text, f"HIVE_WEBHOOKS_FILE {path}"), f"HIVE_WEBHOOKS_FILE {path}")


def endpoints_of(doc: dict[str, Any], where: str) -> list[Endpoint]:
    """The ``[[webhook]]`` tables of a TOML document: each a ``url`` and optional ``events``."""
    unknown = sorted(set(doc) - {"webhook"})
    if unknown:
        raise WebhookConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; write [[webhook]] tables")
    tables = doc.get("webhook", [])
    if not isinstance(tables, list):
        raise WebhookConfigError(f"{where}: webhook must be an array of tables ([[webhook]])")
    found = []
    for i, table in enumerate(tables):
        at = f"{where}: webhook[{i}]"
        if not isinstance(table, dict) or set(table) - {"url", "events"}:
            raise WebhookConfigError(f"{at} takes url and events only")
        url, events = table.get("url"), table.get("events", list(GATEWAY_EVENTS))
        if not isinstance(url, str):
            raise WebhookConfigError(f"{at}.url is missing or not a string")
        try:
            split(url)
        except ValueError as exc:
            raise WebhookConfigError(f"{at}.url: {exc}") from None
        if not isinstance(events, list) or not events or not set(events) <= set(GATEWAY_EVENTS):
            raise WebhookConfigError(f"{at}.events must list some of {', '.join(GATEWAY_EVENTS)}")
        found.append(Endpoint(url=url, events=tuple(dict.fromkeys(events))))
    return found
