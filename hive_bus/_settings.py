"""Settings, read once at the edge (CLI, ``__main__``) into a frozen object and passed down."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from ._names import Names, is_valid_token

ENV_PREFIX = "HIVE_"
# Variables that start with HIVE_ but are read (and checked) by a component of their own, not by Settings.
_FOREIGN_ENV = frozenset({"HIVE_LOG_LEVEL", "HIVE_LOOP", "HIVE_METRICS_TOKEN", "HIVE_METRICS_TOKEN_FILE"})
# read by the gateway, whose own loaders reject unknown ones (HIVE_WEBHOOK: HIVE_WEBHOOK_* and HIVE_WEBHOOKS*)
_FOREIGN_PREFIXES = ("HIVE_GATEWAY_", "HIVE_WEBHOOK")

# Durations are finite and at most ten years: JetStream takes them in nanoseconds (an int64), and a
# longer one is a typo, not a plan. inf and nan fail the bound too (msgspec compares them as floats).
MAX_SECONDS = 10 * 365 * 86400.0
PositiveSeconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS)]
# Sizes and counts go to JetStream, which takes them as int64.
INT64_MAX = 2**63 - 1
PositiveInt = Annotated[int, Meta(gt=0, le=INT64_MAX)]
# JetStream keeps 1, 3 or 5 copies of a stream in practice; R5 is its largest sensible setting.
Replicas = Annotated[int, Meta(ge=1, le=5)]
# Fields whose values are secrets: never shown in a repr, a log line or an error message.
SECRET_FIELDS = frozenset({"nats_password"})


class SettingsError(ValueError):
    """A setting is unknown or has a value of the wrong kind; the message names it."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to reach the bus and how its objects are declared.

    Each field can be set by an environment variable named ``HIVE_`` plus the field in upper case, for
    example ``HIVE_NATS_URL`` or ``HIVE_ACK_WAIT_S``.
    """

    nats_url: str = "nats://127.0.0.1:4222"
    prefix: str = "hive"
    # How long a worker may hold a task without a sign of life before it goes to another worker.
    # Workers send in-progress acks while a call runs, so this bounds crash recovery, not call length.
    ack_wait_s: PositiveSeconds = 30.0
    # Tasks handed out and not yet acked, per provider, across all its workers.
    max_ack_pending: PositiveInt = 256
    tasks_max_msgs: PositiveInt = 1_000_000
    tasks_max_bytes: PositiveInt = 512 * 1024**2
    # Idempotency keys and task ids are remembered this long.
    duplicate_window_s: PositiveSeconds = 900.0
    events_max_age_s: PositiveSeconds = 7 * 86400.0
    # per provider: each provider's events have a stream of their own (JetStream reserves it), so that
    # no provider's workers can push another's history out
    events_max_bytes: PositiveInt = 256 * 1024**2
    # per provider: each provider's dead letters have a stream of their own (JetStream reserves it)
    dlq_max_bytes: PositiveInt = 64 * 1024**2
    # The cancels bucket (hive_bus._cancel): a word of about 200 bytes for each task cancelled, expired
    # or replayed, kept as long as task history; full, its oldest words go (about 350,000 a week).
    cancels_max_bytes: PositiveInt = 64 * 1024**2
    # The stream of the server's timers (hive_bus._timers): a deadline's one-shot schedule per task that
    # has one (about 300 bytes), until it fires, and each firing for a week. The server allows no
    # discard-new here: full, it would drop its oldest timers (a deadline still holds at a worker's fetch).
    schedules_max_bytes: PositiveInt = 64 * 1024**2
    # The claim check (hive_bus._blobs): a task whose content, or an output, encodes to more than
    # claim_check_bytes goes to its provider's Object Store bucket <prefix>_blobs_<provider> and its
    # message carries a reference; blob_max_bytes is the largest task content or output the bus takes (a
    # larger task is refused with 413, a larger output fails its task); blobs_max_bytes bounds each
    # provider's bucket (JetStream reserves it: one bucket a provider, so that no provider's workers can
    # fill the one another's large outputs go to). Objects live as long as the events that refer to them
    # (events_max_age_s).
    claim_check_bytes: PositiveInt = 64 * 1024
    blob_max_bytes: PositiveInt = 16 * 1024**2
    blobs_max_bytes: PositiveInt = 256 * 1024**2
    # The uploaded files' bucket (OpenAI's Files API: batch inputs and outputs), kept until deleted.
    files_max_bytes: PositiveInt = 2 * 1024**3
    # The metadata index (hive_bus._index): one small message per string value of a tagged task's
    # metadata, kept as long as the events (events_max_age_s) and within this many bytes (the oldest
    # go first). Tasks without metadata write nothing there.
    index_max_bytes: PositiveInt = 256 * 1024**2
    # Refuse (400) a submission for a provider that no worker serves now and none served in the last
    # day, instead of accepting it with a warning (hive_bus._served).
    reject_unserved: bool = False
    heartbeat_interval_s: PositiveSeconds = 5.0
    heartbeat_ttl_s: PositiveSeconds = 15.0
    # A TOML file of token prices that overrides the built-in table (see hive_bus._prices).
    prices_file: str | None = None
    # Request and token budgets per provider, key and model (see hive_bus._budget): a TOML file, and
    # inline TOML that wins over it provider by provider.
    budgets_file: str | None = None
    budgets: str | None = None
    # How long the first connection to NATS may take before a command gives up.
    connect_timeout_s: PositiveSeconds = 5.0
    # How long a publish waits for JetStream's acknowledgement before the bus counts as unavailable.
    request_timeout_s: PositiveSeconds = 5.0
    # The gateway's store audit (hive_bus._audit): how often it looks for tasks that the record says
    # are waiting but that the tasks stream no longer holds, and how old such a task's last event must
    # be before it counts as lost (its message may be on its way: a move the router is making).
    audit_every_s: PositiveSeconds = 600.0
    audit_grace_s: PositiveSeconds = 60.0
    # A batch's lines are queued this many at a time; the lines queued so far are recorded in the batch
    # after each chunk (where a gateway killed half-way resumes).
    batch_chunk_lines: PositiveInt = 500
    # One gateway at a time runs a batch, under a lease it renews every third of this; a gateway killed
    # while running one is replaced once its lease has run out.
    batch_lease_s: PositiveSeconds = 15.0
    # The hub's JetStream domain, for a process that reaches it through a NATS leaf node (a remote
    # site's server; see nats/leaf.conf): JetStream requests and bucket writes then go by
    # $JS.<domain>.API, which the leaf link passes on. None: connected to the hub or its cluster.
    js_domain: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    # Copies of each stream and bucket this process declares: 3 on a three-node cluster.
    replicas: Replicas = 1
    # Credentials (see _credentials.py): a user and password, an nkey seed file or a creds file, and
    # TLS files; the URL may also carry user:password@. Secrets are never logged nor put in errors.
    nats_user: str | None = None
    nats_password: str | None = None
    nats_password_file: str | None = None  # the password, on the file's first line
    nats_nkey_seed_file: str | None = None
    nats_creds_file: str | None = None
    nats_tls_ca_file: str | None = None
    nats_tls_cert_file: str | None = None
    nats_tls_key_file: str | None = None
    # The name of a worker's credential: its heartbeat keys are <name>.<worker id> and its reply
    # inboxes _INBOX.<name>.<...>, the subjects that credential's permissions allow (nats/worker-user.sh).
    worker_name: str | None = None

    def __repr__(self) -> str:
        def show(field: str) -> str:
            value = getattr(self, field)
            if field in SECRET_FIELDS and value is not None:
                return f"{field}=***"
            return f"{field}={redact_url(value) if field == 'nats_url' else value!r}"

        shown = (show(f) for f in self.__struct_fields__)
        return f"Settings({', '.join(shown)})"

    def __post_init__(self) -> None:
        try:
            Names(self.prefix)  # validates the prefix
        except ValueError as exc:
            raise SettingsError(f"HIVE_PREFIX (--prefix): {exc}") from None
        check_nats_urls(self.nats_url)
        _check_credentials(self)
        if self.heartbeat_ttl_s < 2 * self.heartbeat_interval_s:
            raise SettingsError(
                f"heartbeat_ttl_s ({self.heartbeat_ttl_s}) must be at least twice heartbeat_interval_s "
                f"({self.heartbeat_interval_s}), or live workers would flicker out of the list"
            )
        if self.events_max_age_s < self.duplicate_window_s:
            raise SettingsError(
                "events_max_age_s must not be shorter than duplicate_window_s: a resubmission "
                "inside the window looks its first task up in the events stream"
            )

        if self.blobs_max_bytes < self.blob_max_bytes:
            raise SettingsError(
                f"blobs_max_bytes ({self.blobs_max_bytes}) must be at least blob_max_bytes "
                f"({self.blob_max_bytes}): the bucket could not hold the largest task it accepts"
            )
        if self.audit_grace_s < 2 * self.request_timeout_s:
            raise SettingsError(
                f"audit_grace_s ({self.audit_grace_s}) must be at least twice request_timeout_s "
                f"({self.request_timeout_s}): a submission in flight would look lost"
            )

    @property
    def names(self) -> Names:
        return Names(self.prefix)


def _check_credentials(s: Settings) -> None:
    """Combinations that cannot work fail here, naming the variables (never their values)."""
    if s.nats_password is not None and s.nats_password_file:
        raise SettingsError("HIVE_NATS_PASSWORD and HIVE_NATS_PASSWORD_FILE are both set: give one")
    if (s.nats_password is not None or s.nats_password_file) and not s.nats_user:
        raise SettingsError("a NATS password is set but HIVE_NATS_USER is not: give both, or neither")
    ways = [
        name
        for name, value in (
            ("HIVE_NATS_USER", s.nats_user),
            ("HIVE_NATS_NKEY_SEED_FILE", s.nats_nkey_seed_file),
            ("HIVE_NATS_CREDS_FILE", s.nats_creds_file),
        )
        if value
    ]
    if len(ways) > 1:
        raise SettingsError(f"{' and '.join(ways)} are both set: a connection logs in one way only")
    if bool(s.nats_tls_cert_file) != bool(s.nats_tls_key_file):
        raise SettingsError(
            "HIVE_NATS_TLS_CERT_FILE and HIVE_NATS_TLS_KEY_FILE go together: a client certificate needs its key"
        )
    if s.worker_name is not None and not is_valid_token(s.worker_name):
        raise SettingsError(
            f"HIVE_WORKER_NAME (--name) {s.worker_name!r} must be 1-64 letters, digits, '_' or '-' "
            "(it becomes a subject token)"
        )


NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def check_nats_urls(urls: str) -> None:
    """``HIVE_NATS_URL`` as nats-py reads it: one or more URLs separated by commas, each
    ``SCHEME://HOST[:PORT]`` (nats, tls, ws or wss) or a bare ``HOST[:PORT]`` (nats, port 4222). A bad
    one fails here, naming it without its password; nats-py would spin or fail deep in its connect."""
    entries = [u.strip() for u in urls.split(",") if u.strip()]
    if not entries:
        raise SettingsError("HIVE_NATS_URL (--nats) is empty: give a URL such as nats://127.0.0.1:4222")
    for entry in entries:
        scheme, sep, _ = entry.partition("://")
        why: str | None
        if sep and scheme not in NATS_SCHEMES:  # nats-py knows them in lower case only
            why = f"the scheme must be one of {', '.join(NATS_SCHEMES)}"
        else:
            why = _bad_address(entry if sep else f"nats://{entry}")
        if why:
            raise SettingsError(f"HIVE_NATS_URL (--nats) {redact_url(entry)!r}: {why}")
    websocket = {u.partition("://")[0] in ("ws", "wss") for u in entries}
    if len(websocket) > 1:
        raise SettingsError("HIVE_NATS_URL (--nats) mixes websocket (ws, wss) and other URLs: give one kind")


def _bad_address(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "the port must be a number from 1 to 65535"
    if not parts.hostname:
        return "it names no host"
    if port == 0:
        return "the port must be a number from 1 to 65535"
    return None


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from ``HIVE_*`` environment variables, then ``overrides`` (from flags) on top.

    An unknown ``HIVE_*`` variable or a value of the wrong kind raises :class:`SettingsError`
    naming the variable, so a typo fails at start-up instead of being ignored.
    """
    env = os.environ if environ is None else environ
    known = set(Settings.__struct_fields__)
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key in _FOREIGN_ENV or key.startswith(_FOREIGN_PREFIXES):
            continue
        field = key[len(ENV_PREFIX) :].lower()
        if field in known:
            values[field] = value
        else:
            unknown.append(key)
    _check_unknown(unknown)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_name_the_variable(str(exc), values)) from None


def with_overrides(settings: Settings, **overrides: Any) -> Settings:
    """``settings`` with some fields replaced (from flags), checked as :func:`load_settings` checks."""
    values = msgspec.structs.asdict(settings)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_name_the_variable(str(exc), values)) from None


def _check_unknown(names: list[str]) -> None:
    """A ``HIVE_*`` name that looks like one of ours misspelt is an error naming the one meant; any other
    (Apache Hive's ``HIVE_HOME``, ``HIVE_CONF_DIR``, ...) is someone else's: a warning, once."""
    ours = [ENV_PREFIX + f.upper() for f in Settings.__struct_fields__]
    ours += sorted(_FOREIGN_ENV)
    misspelt = {}
    for name in sorted(names):
        close = difflib.get_close_matches(name, ours, n=1, cutoff=0.85)
        if close:
            misspelt[name] = close[0]
        elif name not in _warned:
            _warned.add(name)
            # one short line: Apache Hive's users see it on every command, and a list of ours here
            # would be long and still miss the gateway's (HIVE_GATEWAY_*, HIVE_WEBHOOK*)
            log.warning(
                "%s is not a hive-bus setting; ignored (hive-bus's own are listed in its README, under Settings)",
                name,
            )
    if misspelt:
        meant = "; ".join(f"{name}: did you mean {close}?" for name, close in misspelt.items())
        raise SettingsError(f"unknown setting(s) {meant}")


_warned: set[str] = set()
log = logging.getLogger("hive_bus.settings")


# what msgspec says of text that is not of a setting's kind, and what a user reads instead: every
# variable is text, so "got `str`" says nothing of what is wrong
_NOT_OF_ITS_KIND = {
    "Expected `float`, got `str`": "is not a number",
    "Expected `int`, got `str`": "is not a whole number",
    "Expected `bool`, got `str`": "is not true or false (give 1, true, 0 or false)",
}


def _name_the_variable(message: str, values: Mapping[str, Any]) -> str:
    # msgspec says "... - at `$.ack_wait_s`"; users set HIVE_ACK_WAIT_S, so name that.
    head, sep, path = message.rpartition(" - at `$.")
    if not sep:
        return f"invalid setting: {message}"
    field = path.rstrip("`")
    value = values.get(field)
    if head in _NOT_OF_ITS_KIND and isinstance(value, str):  # a number or a switch: never a secret
        shown = value if len(value) <= 40 else value[:40] + "..."
        head = f"{shown!r} {_NOT_OF_ITS_KIND[head]}"
    return f"invalid setting {ENV_PREFIX}{field.upper()} ({field}): {head}"


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) without any user name, password or token in it, fit for logs
    and error messages."""
    if "," in url:
        return ",".join(redact_url(u.strip()) for u in url.split(","))
    # by hand, not urlsplit: a bare user:password@host has no scheme, and a bad port must not raise
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    netloc, slash, tail = rest.partition("/")
    if "@" not in netloc:
        return url
    return f"{scheme}{sep}***@{netloc.rpartition('@')[2]}{slash}{tail}"


def wait_limit_s(max_age_s: float, every_s: float) -> float:
    """How long a task may wait in the queue before it is failed ``expired``, and for its ``not_before``
    at most: the stream's ``max_age`` less a margin that leaves the sweeps (every ``every_s``) time to
    see it first: a tenth of the age, at least two sweeps, at most half the age."""
    return max_age_s - min(max_age_s / 2, max(max_age_s / 10, 2 * every_s))
