"""Wire messages: tasks, lifecycle events and heartbeats, as frozen msgspec Structs.

Every type carries a versioned tag in its ``type`` field. A new field always gets a default, so old and
new gateways and workers keep understanding each other; wire types therefore ignore fields they do not
know. The one strict type is :class:`TaskRequest`, the shape a user submits, which rejects unknown
fields so that a typo is an error rather than a silently ignored option.

Why about 700 lines: every wire type is here, so that the bus's whole vocabulary (what a task, an event
and a heartbeat hold, and which fields are optional) reads in one place. Types and their small checks,
no I/O.
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from ._names import PROVIDER_PATTERN
from ._nesting import Guarded

# scheduled: accepted with a not_before still ahead; the server's timer queues it then (hive_bus._timers).
# evicted: ended (its worker acked it), its events evicted since: no event says so, a read does
# (hive_bus._assigned)
TaskStatus = Literal[
    "scheduled", "queued", "running", "retrying", "completed", "failed", "cancelled", "evicted"
]
FINAL_STATUSES = ("completed", "failed", "cancelled")  # the ends an event records
# invalid_output: the provider answered, but not in the task's response_format (an attempt all the same)
RetryReason = Literal["rate_limit", "budget", "transient", "invalid_output", "shutdown"]
FailReason = Literal[
    "permanent",
    "out_of_attempts",
    "invalid_output",
    "deadline",
    "rejected",
    "undecodable",
    "lost",
    "interrupted",
    # its deadline passed before it ended, found by the server's timer (hive_bus._timers), run or not
    "expired",
]
Priority = Literal["high", "normal", "low"]
# in_order: the task's provider, then each fallback in turn, as each runs out of quota;
# cheapest: the candidate with the lowest token price that has quota left goes first.
Route = Literal["in_order", "cheapest"]
# What moves a task on to its next fallback, each taking in the one before it:
#   quota        its provider has no quota left for it (a daily limit, or a wait past max_wait_s);
#   unavailable  also its attempts used up on passing faults (connection errors, timeouts, 5xx);
#   failed       also any failure but the user's own bad request (the provider's 400, 413 or 422).
FallbackOn = Literal["quota", "unavailable", "failed"]

ProviderName = Annotated[
    str, Meta(pattern=PROVIDER_PATTERN, description="letters, digits, '_' or '-'; at most 64")
]
Prompt = Annotated[
    str,
    Meta(
        min_length=1,
        pattern=r"\S",
        description="the prompt; not blank. Give exactly one of prompt and messages",
    ),
]
IdempotencyKey = Annotated[str, Meta(min_length=1, max_length=256)]
MaxAttempts = Annotated[int, Meta(ge=1, le=100)]
Fallback = Annotated[
    str,
    Meta(
        pattern=PROVIDER_PATTERN.removesuffix("$") + r"(:\S+)?$",
        description="a provider, or provider:model (for example groq:llama-3.1-8b-instant)",
    ),
]
Seconds = Annotated[float, Meta(gt=0, le=30 * 86400)]
NotBefore = Annotated[
    datetime.datetime,
    Meta(
        tz=True,
        description="an RFC 3339 time with its offset (2026-12-24T09:00:00+01:00): the task waits, "
        "status scheduled, until then",
    ),
]
# What a task's webhook may announce ("task.cancelled" once cancelling lands; accepted already).
WebhookEvent = Literal["task.completed", "task.failed", "task.cancelled"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("task.completed", "task.failed", "task.cancelled")

DEFAULT_MAX_ATTEMPTS = 5
# A list of tasks shows each text (prompt, system, a message) cut to this many characters, and of a
# conversation this many messages (the first, and the last ones); a single read shows them whole.
LIST_TEXT_CHARS = 200
LIST_MESSAGES = 4
# How long a task waits out its provider's rate limit before it moves to a fallback (if it has one).
DEFAULT_MAX_WAIT_S = 300.0
# "(?!\n)": Python's "$" (msgspec's patterns are Python's) also matches before a final newline, and an id
# goes into subjects; the look-ahead keeps the pattern valid for JSON Schema (ECMA) readers too.
TASK_ID_PATTERN = r"^[0-9A-HJKMNP-TV-Z]{26}$(?!\n)"
TASK_ID_RE = re.compile(TASK_ID_PATTERN)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def is_task_id(value: str) -> bool:
    return TASK_ID_RE.fullmatch(value) is not None  # not match: "$" also matches before a final "\n"


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits -> two characters
_SHIFTS = range(120, -1, -10)  # 13 pairs: the 128 bits, with two leading zero bits


class _TaskIds:
    """ULIDs (48 bits of milliseconds, 80 random bits, Crockford base32), strictly increasing within
    a process as python-ulid's are: in the same millisecond the next id adds one to the last. Written
    out here because python-ulid's generator took a tenth of the gateway's time per task."""

    def __init__(self) -> None:
        self._last = 0
        self._random = b""  # os.urandom bytes, fetched 4 KiB at a time rather than 10 bytes an id
        self._used = 0
        if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork to guard against
            os.register_at_fork(after_in_child=self._forget)  # a child must never reuse the parent's

    def _forget(self) -> None:
        self._random, self._used, self._last = b"", 0, 0

    def new(self) -> str:
        if self._used + 10 > len(self._random):
            self._random, self._used = os.urandom(4090), 0
        random = int.from_bytes(self._random[self._used : self._used + 10])
        self._used += 10
        value = (time.time_ns() // 1_000_000) << 80 | random
        if value <= self._last:  # the same millisecond, or the clock stepped back
            value = self._last + 1
        self._last = value
        return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


_task_ids = _TaskIds()


def new_task_id() -> str:
    """A unique id that sorts by creation time (a ULID)."""
    return _task_ids.new()


def new_seal() -> str:
    """A task's seal (see :attr:`Task.seal`): 64 random bits, unrelated to the task id (whose random
    part only counts up within a millisecond)."""
    return secrets.token_hex(8)


def run_ended(headers: dict[str, str] | None) -> int:
    """Which run of its task a final event ends, read from its de-duplication id
    (:attr:`Task.final_msg_id`: ``<id>:final``, then the run when not the first, then the seal when
    the task has one): 0 for the first run, and for an event without such an id."""
    parts = (headers or {}).get("Nats-Msg-Id", "").split(":")
    if len(parts) < 3 or parts[1] != "final":
        return 0
    run = parts[2]
    if len(parts) == 3 and len(run) == 16:  # no run, then a seal (new_seal: 64 bits in hex)
        return 0
    return int(run) if run.isdigit() else 0


class Params(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Sampling parameters passed to the provider."""

    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    # Sequences at which the provider stops generating (OpenAI takes up to four), and a seed for
    # repeatable sampling. An adapter whose provider cannot honour one fails the task saying so.
    stop: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1, max_length=4)] | None = None
    seed: int | None = None


class RequestParams(Params, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """:class:`Params` as a user submits them: unknown names are an error."""


class Usage(Struct, frozen=True, kw_only=True):
    input_tokens: int = 0
    output_tokens: int = 0


class BlobRef(Struct, frozen=True, kw_only=True):
    """A claim check: where an object of the claim check's Object Store buckets is, and what it holds.

    ``nuid`` names the subject of its chunks (``<provider>.<task id>.<kind>.<nonce>``); ``digest`` is the
    Object Store's (``SHA-256=`` and the base64url digest), checked by every reader. ``apart``: each of
    its chunks on a subject of its own (``<nuid>.<i>``), read one direct get a chunk; else all on the
    nuid's (one chunk, or an object stored before chunks were kept apart). ``own_bucket``: in its
    provider's bucket (``<prefix>_blobs_<provider>``, the provider the nuid names); else in
    ``<prefix>_blobs``, every provider's, as buses before kept them."""

    name: str
    nuid: str
    size_bytes: int
    chunks: int
    digest: str
    apart: bool = False
    own_bucket: bool = False


class TextPart(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One part of a chat message's content, as OpenAI's ``{"type": "text", "text": ...}``."""

    type: Literal["text"]
    text: str


class ChatMessage(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One message of a conversation, in OpenAI's roles; content is a string or a list of text parts."""

    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[TextPart], Meta(min_length=1)]

    @property
    def text(self) -> str:
        """The content as one string (the text parts joined, as OpenAI reads them)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


Messages = Annotated[
    list[ChatMessage],
    Meta(
        min_length=1,
        max_length=1024,
        description="a conversation in OpenAI's roles (system, user, assistant), instead of prompt and "
        "system; give exactly one of prompt and messages",
    ),
]


class JsonSchemaSpec(Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """The ``json_schema`` of an OpenAI ``response_format``: a named JSON Schema the output must match."""

    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    schema: dict[str, Any] = {}
    description: str | None = None
    strict: bool | None = None


class TextFormat(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="text", tag_field="type"):
    """Free text, the default."""


class JsonObjectFormat(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="json_object", tag_field="type"
):
    """Any JSON object."""


class JsonSchemaFormat(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="json_schema", tag_field="type"
):
    """JSON matching ``json_schema.schema``."""

    json_schema: JsonSchemaSpec


# OpenAI's ``response_format``, in chat completions and in tasks alike.
ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class RequestJsonSchemaSpec(
    JsonSchemaSpec, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """:class:`JsonSchemaSpec` as a user submits it: the schema must be a valid JSON Schema. Checked on
    submission only: a task on the bus is not checked again, so a newer checker cannot make it poison."""

    def __post_init__(self) -> None:
        from ._output import schema_error  # jsonschema loads on the first schema, not on every import

        if (problem := schema_error(self.schema)) is not None:
            raise ValueError(f"schema is {problem}")


class RequestJsonSchemaFormat(
    JsonSchemaFormat,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag="json_schema",
    tag_field="type",
):
    json_schema: RequestJsonSchemaSpec


RequestResponseFormat = TextFormat | JsonObjectFormat | RequestJsonSchemaFormat


class WebhookSpec(Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Where to announce a task's end: an http(s) URL, and which ends (all by default). The gateway
    refuses private, loopback and link-local addresses (see ``hive_bus.services.webhooks``)."""

    url: Annotated[str, Meta(min_length=1, max_length=2048, pattern=r"^[hH][tT][tT][pP][sS]?://\S+$")]
    events: Annotated[list[WebhookEvent], Meta(min_length=1, max_length=3)] = msgspec.field(
        default_factory=lambda: list(WEBHOOK_EVENTS)
    )

    def __post_init__(self) -> None:
        if len(set(self.events)) != len(self.events):
            raise ValueError("webhook.events names an event twice")


class TaskContent(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The part of a task that the claim check moves to the Object Store when it is large."""

    prompt: str = ""
    system: str | None = None
    payload: Any = None
    messages: list[ChatMessage] | None = None


class _TaskFields(Struct, frozen=True, kw_only=True, omit_defaults=True):
    provider: ProviderName
    # What to ask: one prompt (with ``system`` beside it), or a conversation; exactly one of the two
    # (a task of messages has the prompt "", so that a handler reads ``task.prompt`` as a string).
    prompt: Prompt = ""
    messages: Messages | None = None
    model: str | None = None
    system: str | None = None
    params: Params | None = None
    metadata: dict[str, Any] = {}
    payload: Any = None
    idempotency_key: IdempotencyKey | None = None
    priority: Priority = "normal"
    # Where the task may go when its provider has no quota left (see ``route``).
    fallback: Annotated[list[Fallback], Meta(max_length=8)] = []
    route: Route = "in_order"
    fallback_on: FallbackOn = "quota"
    # Retry policy: real attempts (rate-limit waits are not attempts), the backoff between them (the
    # worker's own when unset), how long a rate limit may hold the task before it moves on, and the
    # deadline after submission past which it fails and goes to the dead letters.
    max_attempts: MaxAttempts = DEFAULT_MAX_ATTEMPTS
    backoff_base_s: Seconds | None = None
    backoff_cap_s: Seconds | None = None
    max_wait_s: Seconds = DEFAULT_MAX_WAIT_S
    deadline_s: Seconds | None = None
    # The shape of the output: free text (unset), a JSON object, or JSON matching a schema.
    response_format: ResponseFormat | None = None
    # Opt in to the response cache (hive_bus._cache): an identical task (provider, model, what it asks,
    # parameters, output shape) within this many seconds of one that completed answers from the cache,
    # with no provider call and no budget spent.
    cache_ttl_s: Seconds | None = None
    # Ask the worker to forward the output as it is produced, in chunks on core NATS (``hive_bus._chunks``),
    # to a reader that subscribed before submission; the completed event still holds the whole output.
    stream: bool = False
    # Announce the task's end to this URL (signed; see hive_bus.services.webhooks).
    webhook: WebhookSpec | None = None
    # Queue the task no earlier than this (a server timer, hive_bus._timers); a deadline still counts
    # from submission. A time already past queues it at once. On the bus, only until it is queued.
    not_before: NotBefore | None = None

    def __post_init__(self) -> None:
        # checked on every decode too (msgspec reports the ValueError as a validation error)
        if (self.prompt == "") == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        if self.messages is not None and self.system is not None:
            raise ValueError("`system` goes with `prompt`; with `messages`, give a message of role system")

    def conversation(self) -> list[ChatMessage]:
        """The task as chat messages: ``messages`` itself, or ``system`` and ``prompt`` as two messages."""
        if self.messages is not None:
            return self.messages
        head = [ChatMessage(role="system", content=self.system)] if self.system else []
        return [*head, ChatMessage(role="user", content=self.prompt)]


class TaskRequest(_TaskFields, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """What a user submits.

    ``payload`` is any JSON value for custom handlers (for example a list of actions to run);
    ``idempotency_key`` makes a resubmission inside the de-duplication window return the first task's
    id instead of queueing the work twice.
    """

    params: RequestParams | None = None
    response_format: RequestResponseFormat | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.not_before is not None:
            try:  # the server's timer is set at its time in UTC, which must be a date
                self.not_before.astimezone(datetime.UTC)
            except OverflowError:
                raise ValueError(
                    "`not_before` is out of range: in UTC it must fall in years 1 to 9999"
                ) from None


class Task(_TaskFields, frozen=True, kw_only=True, omit_defaults=True, tag="task.v1", tag_field="type"):
    """A task as it travels on the bus."""

    # checked on decoding too: it goes into subjects, so a message whose id is not a task id is poison
    id: Annotated[str, Meta(pattern=TASK_ID_PATTERN)]
    submitted_at_ms: int
    # 0 for the first run; each replay from the dead letters adds one
    run: int = 0
    # providers this task has left for a fallback, in order
    tried: list[str] = []
    # A random token the hub gives the task each time it queues it (submission, move, replay). Only who
    # can read the task (the gateway, and the workers of the provider it is queued on) knows it, and
    # every de-duplication id a worker stamps on the task's events carries it: no other credential can
    # take such an id first, and so have the real worker's outcome refused as a duplicate.
    seal: str = ""
    # Set when the task's prompt, system and payload were too large for a message: they are in the
    # Object Store (see hive_bus._blobs), ``prompt`` is a placeholder, and the worker reads them back
    # before the call.
    content: BlobRef | None = None

    @classmethod
    def from_request(cls, request: TaskRequest) -> Task:
        fields = msgspec.structs.asdict(request)
        submitted_ms = now_ms()
        if request.not_before is not None and request.not_before.timestamp() * 1000 <= submitted_ms:
            fields["not_before"] = None  # its time has come: queued at once
        return cls(id=new_task_id(), submitted_at_ms=submitted_ms, seal=new_seal(), **fields)

    @property
    def not_before_ms(self) -> int | None:
        return None if self.not_before is None else int(self.not_before.timestamp() * 1000)

    @property
    def deadline_at_ms(self) -> int | None:
        return None if self.deadline_s is None else self.submitted_at_ms + int(self.deadline_s * 1000)

    @property
    def msg_id(self) -> str:
        """The de-duplication id of this task's publish: each run and each move is queued once."""
        return self.id if not (self.run or self.tried) else f"{self.id}:{self.run}:{len(self.tried)}"

    @property
    def final_msg_id(self) -> str:
        """The de-duplication id of this run's final event: a run is recorded as ended once."""
        return self.sealed(f"{self.id}:final" if not self.run else f"{self.id}:final:{self.run}")

    def sealed(self, msg_id: str) -> str:
        """``msg_id`` with the task's seal: a de-duplication id that only who holds the task can use."""
        return f"{msg_id}:{self.seal}" if self.seal else msg_id

    def next_hop(self) -> Task | None:
        """This task moved to its next fallback, or None when it has none left."""
        if not self.fallback:
            return None
        provider, _, model = self.fallback[0].partition(":")
        return msgspec.structs.replace(
            self, provider=provider, model=model or None, fallback=self.fallback[1:],
            tried=[*self.tried, self.provider],
        )  # fmt: skip


class _Event(Struct, frozen=True, kw_only=True, tag_field="type"):
    task_id: str
    provider: str
    at_ms: int


class Queued(_Event, frozen=True, kw_only=True, tag="queued.v1"):
    """The task was accepted. Stored today as a marker, not as this message: the tasks stream
    republishes each task it stores as a headers-only ``queued`` event (:func:`queued_marker` makes one
    of these from it, without ``task``: the task is read from the tasks stream). Buses before one
    stored write per submission published this with the whole task; those still decode."""

    task: Task | None = None


class Running(_Event, frozen=True, kw_only=True, tag="running.v1"):
    attempt: int
    worker: str
    submitted_at_ms: int = 0
    # deliveries of this task so far that only waited out a rate limit (they are not attempts)
    waits: int = 0


class Retrying(_Event, frozen=True, kw_only=True, tag="retrying.v1"):
    attempt: int
    worker: str
    reason: RetryReason
    error: str
    retry_in_s: float
    next_try_at_ms: int
    waits: int = 0
    quota: str | None = None
    # False when the task was handed back without a call, because a provider cooldown was holding
    called: bool = True


class Moved(_Event, frozen=True, kw_only=True, tag="moved.v1"):
    """The task left ``provider`` for ``task.provider`` (its next fallback); the router queues it there."""

    worker: str
    reason: str
    task: Task


class Completed(_Event, frozen=True, kw_only=True, tag="completed.v1"):
    attempt: int
    worker: str
    output: Any
    model: str | None = None
    usage: Usage | None = None
    submitted_at_ms: int = 0
    started_at_ms: int = 0
    call_s: float = 0.0
    # from the price table; None where the model's price is not known
    cost_usd: float | None = None
    # Set when the output was too large for a message: it is in the Object Store and ``output`` is
    # None; the client's readers (Hive.get, wait, results) read it back.
    output_ref: BlobRef | None = None
    # True when the output came from the response cache: no provider call, no budget, no cost.
    cached: bool = False
    # why the model stopped, in OpenAI's words ("stop", "length", "content_filter"), where it said
    finish_reason: str | None = None


class Failed(_Event, frozen=True, kw_only=True, tag="failed.v1"):
    attempt: int
    worker: str | None
    reason: FailReason
    error: str
    # The task as it was last run: what a dead letter keeps so that it can be replayed.
    task: Task | None = None
    # the start of a message that was not a task at all (reason "undecodable")
    raw: str | None = None
    # the HTTP status of the provider's last answer (400 bad request, 404 no such model, 503...), where
    # it had one; 400 for a task the adapter knew its provider could not take
    provider_status: int | None = None
    # an expiry at its deadline: the status the task was in then (``queued``: no worker had it)
    was: TaskStatus | None = None


class Cancelled(_Event, frozen=True, kw_only=True, tag="cancelled.v1"):
    """The task was cancelled: a final status, recorded by the hub (never a worker) under the provider
    the task is assigned to, with the run's final de-duplication id, so that it and an outcome cannot
    both be recorded."""

    was: TaskStatus  # its status when it was cancelled
    reason: str = ""


TaskEvent = Queued | Running | Retrying | Moved | Completed | Failed | Cancelled

_STATUS: dict[type[_Event], TaskStatus] = {
    Queued: "queued",
    Running: "running",
    Retrying: "retrying",
    Moved: "queued",
    Completed: "completed",
    Failed: "failed",
    Cancelled: "cancelled",
}


def status_of(event: TaskEvent) -> TaskStatus:
    return _STATUS[type(event)]


def is_final(event: TaskEvent) -> bool:
    return isinstance(event, Completed | Failed | Cancelled)


class TaskView(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A task's state as the client and the gateway report it, read from its latest event."""

    id: str
    provider: str
    status: TaskStatus
    updated_at_ms: int
    attempt: int = 0
    output: Any = None
    model: str | None = None
    usage: Usage | None = None
    error: str | None = None
    reason: str | None = None
    next_try_at_ms: int | None = None
    worker: str | None = None
    # timings of a completed task: when it was submitted, when its last attempt started, how long the
    # provider call took (it finished at updated_at_ms)
    submitted_at_ms: int | None = None
    started_at_ms: int | None = None
    call_s: float | None = None
    cost_usd: float | None = None
    # an output kept in the Object Store that this view has not read back (lists of tasks leave it)
    output_ref: BlobRef | None = None
    # the output came from the response cache (no provider call)
    cached: bool = False
    finish_reason: str | None = None
    # of a failed task: the HTTP status of the provider's last answer, where it had one
    provider_status: int | None = None
    # What the task asks, and its metadata: whole in a single read (``Hive.get``), cut in a list
    # (:meth:`trimmed`: ``content_cut`` says so). Left out by the reads that follow events alone
    # (``Hive.results``, and ``Hive.wait`` unless asked).
    prompt: str | None = None
    system: str | None = None
    messages: list[ChatMessage] | None = None
    metadata: dict[str, Any] = {}
    content_cut: bool = False
    # The task's content is in the Object Store (the claim check): its size in bytes, not read back.
    content_stored_bytes: int | None = None

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATUSES or self.status == "evicted"

    @property
    def has_content(self) -> bool:
        """Whether this view carries what its task asks (or the marker that it is stored apart)."""
        return self.prompt is not None or self.messages is not None or self.content_stored_bytes is not None

    def with_task(self, task: Task) -> TaskView:
        """This view with ``task``'s content and metadata, whole (a claim-checked content: its size)."""
        if task.content is not None:
            return msgspec.structs.replace(
                self, metadata=task.metadata, content_stored_bytes=task.content.size_bytes
            )
        return msgspec.structs.replace(
            self,
            prompt=task.prompt or None,
            system=task.system,
            messages=task.messages,
            metadata=task.metadata,
        )

    def content_from(self, other: TaskView) -> TaskView:
        """This view with ``other``'s content and metadata (a view of the same task, read whole)."""
        if not other.has_content:
            return self
        return msgspec.structs.replace(
            self, prompt=other.prompt, system=other.system, messages=other.messages, metadata=other.metadata,
            content_cut=other.content_cut, content_stored_bytes=other.content_stored_bytes,
        )  # fmt: skip

    def trimmed(self, chars: int = LIST_TEXT_CHARS, messages: int = LIST_MESSAGES) -> TaskView:
        """This view as a list shows it: each text cut to ``chars`` characters, and of a conversation
        the first message and the last ``messages - 1``; ``content_cut`` when anything was cut."""
        cut = False

        def short(text: str | None) -> str | None:
            nonlocal cut
            if text is None or len(text) <= chars:
                return text
            cut = True
            return text[:chars]

        kept = self.messages
        if kept is not None:
            if len(kept) > messages:
                cut = True
                kept = [kept[0], *kept[len(kept) - messages + 1 :]]
            kept = [
                m if len(m.text) <= chars else ChatMessage(role=m.role, content=short(m.text) or "")
                for m in kept
            ]
        prompt, system = short(self.prompt), short(self.system)
        if not cut:
            return self
        return msgspec.structs.replace(self, prompt=prompt, system=system, messages=kept, content_cut=True)

    @classmethod
    def of(cls, event: TaskEvent) -> TaskView:
        id_, provider, at_ms = event.task_id, event.provider, event.at_ms
        match event:
            case Queued():
                # a marker (no task) is a task on its queue: a scheduled one is queued when its time comes
                status: TaskStatus = "scheduled" if event.task and event.task.not_before else "queued"
                return cls(id=id_, provider=provider, updated_at_ms=at_ms, status=status)
            case Running():
                return cls(
                    id=id_, provider=provider, updated_at_ms=at_ms, status="running",
                    attempt=event.attempt, worker=event.worker,
                )  # fmt: skip
            case Retrying():
                return cls(
                    id=id_, provider=provider, updated_at_ms=at_ms, status="retrying",
                    attempt=event.attempt, worker=event.worker, reason=event.reason, error=event.error,
                    next_try_at_ms=event.next_try_at_ms,
                )  # fmt: skip
            case Moved():
                return cls(
                    id=id_, provider=event.task.provider, updated_at_ms=at_ms, status="queued",
                    worker=event.worker, reason="moved", error=f"moved from {provider}: {event.reason}",
                )  # fmt: skip
            case Completed():
                return cls(
                    id=id_, provider=provider, updated_at_ms=at_ms, status="completed",
                    attempt=event.attempt, worker=event.worker, output=event.output, model=event.model,
                    usage=event.usage, submitted_at_ms=event.submitted_at_ms or None,
                    started_at_ms=event.started_at_ms or None, call_s=event.call_s, cost_usd=event.cost_usd,
                    output_ref=event.output_ref, cached=event.cached, finish_reason=event.finish_reason,
                )  # fmt: skip
            case Failed():
                return cls(
                    id=id_, provider=provider, updated_at_ms=at_ms, status="failed",
                    attempt=event.attempt, worker=event.worker, reason=event.reason, error=event.error,
                    provider_status=event.provider_status,
                )  # fmt: skip
            case Cancelled():
                return cls(
                    id=id_, provider=provider, updated_at_ms=at_ms, status="cancelled",
                    reason=f"cancelled while {event.was}", error=event.reason or None,
                )  # fmt: skip


class WorkerBeat(Struct, frozen=True, kw_only=True, tag="worker.v1", tag_field="type"):
    """A worker's heartbeat: who it is, what it is doing, and its counters since it started."""

    worker_id: str
    provider: str
    host: str
    pid: int
    version: str
    state: Literal["running", "draining"] = "running"
    concurrency: int = 1
    in_flight: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    started_at_ms: int = 0
    at_ms: int = 0
    # the model used when a task names none
    model: str | None = None
    # the names of its provider keys (never the keys)
    keys: list[str] = []
    # why the worker is not fetching now ("cooldown" or "budget"), and until when
    waiting: str | None = None
    waiting_until_ms: int = 0


_PLAIN_WORDS = {
    "prompt": "prompt must be a string with at least one non-blank character",
    "provider": "provider must be 1-64 letters, digits, '_' or '-' (it becomes a NATS subject token)",
    "fallback": "each fallback must be a provider name, or provider:model",
    "url": "url must be an http:// or https:// URL of at most 2048 characters, without spaces",
}


def explain(field: str, message: str) -> str:
    """A validation message in plain words, naming the field (msgspec's regex messages are cryptic)."""
    parent, _, leaf = re.sub(r"\[\d+\]$", "", field).rpartition(".")
    if leaf in _PLAIN_WORDS and ("regex" in message or "length" in message):
        return f"{parent}: {_PLAIN_WORDS[leaf]}" if parent else _PLAIN_WORDS[leaf]
    return f"{field}: {message}" if field else message


def explain_error(exc: msgspec.ValidationError) -> str:
    """:func:`explain` for a msgspec error, whose text ends in ``- at `$.field```."""
    message, sep, path = str(exc).rpartition(" - at `$.")
    return explain(path.rstrip("`"), message) if sep else str(exc)


# "`not_before` is out of range: ...": a type's own check after decoding names its field first
_NAMES_ITS_FIELD = re.compile(r"`([a-z_]+)` ")


def error_field(exc: msgspec.ValidationError) -> str | None:
    """The field a msgspec error is about (``tasks[1].not_before``), or None for the object as a whole."""
    message, sep, path = str(exc).rpartition(" - at `$.")
    return field_named(message, path.rstrip("`")) if sep else field_named(str(exc), "") or None


def field_named(message: str, at: str) -> str:
    """The field an error reported at ``at`` (a path; "" for the object itself) is about: msgspec reports
    a type's own check (``__post_init__``) at the object that holds the field, and its message names the
    field first."""
    named = _NAMES_ITS_FIELD.match(message)
    if named is None:
        return at
    return f"{at}.{named[1]}" if at else named[1]


# Built once: encoding and decoding are on every task's hot path. Each decoder checks the nesting first
# (``_nesting``): a task's fields sit one level in, an event's task two.
encoder = msgspec.json.Encoder()
task_decoder = Guarded(msgspec.json.Decoder(Task), enclosing=1)
event_decoder = Guarded(msgspec.json.Decoder(TaskEvent), enclosing=2)

# What the server puts on a message it republishes (and a stream's message has no other way to carry)
MARKER_HEADER = "Nats-Msg-Size"


def is_marker(data: bytes | None, headers: dict[str, str] | None) -> bool:
    """Whether a ``queued`` event is the tasks stream's headers-only republish of a task."""
    return not data and headers is not None and MARKER_HEADER in headers


def queued_marker(subject: str, headers: dict[str, str] | None) -> Queued | None:
    """The ``queued`` event that a headers-only marker on ``subject``
    (``<prefix>.events.<provider>.<task id>.queued``) stands for, without its task; None when the subject
    is not one. Its time is the marker's ``Nats-Time-Stamp`` (now, when it has none)."""
    tokens = subject.split(".")
    if len(tokens) != 5 or tokens[4] != "queued":
        return None
    return Queued(
        task_id=tokens[3], provider=tokens[2], at_ms=_stamp_ms((headers or {}).get("Nats-Time-Stamp"))
    )


def decode_event(subject: str, data: bytes | None, headers: dict[str, str] | None) -> TaskEvent:
    """An event as stored: a marker becomes its :class:`Queued` (without the task), anything else is
    decoded (raises as :data:`event_decoder` does)."""
    if is_marker(data, headers) and (marker := queued_marker(subject, headers)) is not None:
        return marker
    return event_decoder.decode(data or b"")


def _stamp_ms(stamp: str | None) -> int:
    """An RFC 3339 time with nanoseconds, as the server writes it, in epoch milliseconds."""
    if not stamp:
        return now_ms()
    try:
        head, _, rest = stamp.rstrip("Z").partition(".")
        seconds = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC).timestamp()
        fraction = float("0." + rest[:6]) if rest[:6].isdigit() else 0.0
        return int((seconds + fraction) * 1000)
    except ValueError:
        return now_ms()


beat_decoder = Guarded(msgspec.json.Decoder(WorkerBeat), enclosing=1)


def beat_of(key: str, data: bytes) -> WorkerBeat | None:
    """The heartbeat stored under ``key`` in the heartbeats bucket, when it decodes and is the one its
    key names: the key is the worker's id, ``[<credential name>.]<provider>.<host>-<pid>-<rand>``, and
    a worker credential may write keys under its name and its providers alone, so a heartbeat that
    claims another provider (or another worker) than its key's is left out (None), as one that does
    not decode (an old or foreign writer's)."""
    try:
        beat = beat_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    tokens = key.split(".")
    if beat.worker_id != key or len(tokens) < 2 or tokens[-2] != beat.provider:
        return None
    return beat


request_decoder = Guarded(msgspec.json.Decoder(TaskRequest), enclosing=1)
content_decoder = Guarded(msgspec.json.Decoder(TaskContent), enclosing=1)
