"""The one place that reaches below nats-py's public API, and the bus plumbing every module shares.

nats-py leaves a few things hive-bus needs without a public name: writing many messages to the
connection in one go (``Client._send_command``/``_flush_pending`` and the ``stats`` counters they skip),
the stream, subject prefix and JetStream context of a ``KeyValue`` (``_js``/``_stream``/``_pre``) and
whether it takes direct gets (``_direct``, with its context's client and API prefix ``_nc``/``_prefix``,
and with its timeout ``_timeout`` how the account's JetStream figures are asked for whole: :func:`account_info`), the
stream sequence in a message's reply subject (``Msg.Metadata._get_metadata_fields``), and a pull request
that answers at once on an empty consumer (its ``fetch`` always waits); and one it replaces, the parser
of a message's header block (``Client._parse_header_lines``, see :func:`parse_header_lines`). Each is
used here and nowhere else; :data:`PRIVATE_ATTRIBUTES` lists them, and ``tests/test_nats_seam.py`` checks each by name on the
real objects, so a nats-py upgrade that drops one fails that test, naming it, rather than a task.
pyproject.toml pins nats-py to the minor version this was checked with.

Also here: the errors a bus call may raise (:data:`BUS_ERRORS`) and how one is told (:func:`why`), the
JetStream pull protocol and the one pull client (:class:`PullInbox`), and following
an ordered consumer that is unsubscribed whatever ends the following (:func:`follow`, :func:`following`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import DEFAULT_SUB_PENDING_MSGS_LIMIT, Subscription
from nats.errors import NotJSMessageError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

#: What a call to the bus may raise when the bus, not the caller, is at fault: a NATS or JetStream
#: error, a request that timed out, or the socket itself.
BUS_ERRORS = (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)

#: Every private name of nats-py used below, by the object it is read from.
PRIVATE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "nats.aio.client.Client": (
        "_send_command",
        "_flush_pending",
        "stats",
        "_parse_header_lines",
        "_close",
        "_transport",
    ),
    "nats.js.kv.KeyValue": ("_js", "_stream", "_pre", "_direct"),
    "nats.js.client.JetStreamContext": ("_nc", "_prefix", "_timeout"),
    "nats.aio.msg.Msg.Metadata": ("_get_metadata_fields",),
    "nats.js.client.JetStreamContext.PushSubscription": ("_sub",),
    "nats.aio.subscription.Subscription": ("_jsi",),
    "nats.js.client.JetStreamContext._JSI": ("_sseq",),
}


# -- reading a message's headers ----------------------------------------------------------------------


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """A message's header block (``Name: Value\\r\\n`` a line) as nats-py 2.16's own
    ``Client._parse_header_lines`` reads it, to the byte, in well under half its time.

    nats-py parses the headers of every message it receives before handing it on: a task's ``queued``
    marker and a task fetched by a worker carry seven or more. Its parser runs a generator over each
    header name's characters to refuse a name with whitespace inside; a name of letters, digits and
    dashes (every name NATS and hive-bus write) cannot have any, and skips that test. Everything else
    is nats-py's: lines without a colon skipped, a name that is not ASCII skipped, both sides stripped
    of ASCII whitespace, the value decoded as UTF-8 with U+FFFD for what does not decode, the last of
    a repeated name kept. ``tests/test_nats_seam.py`` compares the two on crafted and random blocks.
    """
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if not key.replace("-", "").isalnum() and any(c.isspace() for c in key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def _replace_header_parser() -> Callable[[bytes], dict[str, str]] | None:
    """Put :func:`parse_header_lines` in nats-py's place; returns nats-py's own (None, and nothing
    replaced, when this nats-py has none that its ``_process_headers`` calls)."""
    own = NATS.__dict__.get("_parse_header_lines")
    process = getattr(NATS, "_process_headers", None)
    calls = process is not None and "_parse_header_lines" in process.__code__.co_names
    if not isinstance(own, staticmethod) or not calls:
        return None
    NATS._parse_header_lines = staticmethod(parse_header_lines)  # type: ignore[method-assign]
    return own.__func__


#: nats-py's own header parser, replaced on import by :func:`parse_header_lines`; None when this nats-py
#: has none to replace (``tests/test_nats_seam.py`` then fails, naming it).
NATS_HEADER_PARSER = _replace_header_parser()


def why(exc: BaseException) -> str:
    """An error in a few words for a log line or an answer: its message without nats-py's ``nats: ``
    prefix, or its type when it has none (a ``TimeoutError``)."""
    return (str(exc) or type(exc).__name__).replace("nats: ", "")


# -- writing below the public API ---------------------------------------------------------------------

Writer = tuple[Callable[[bytes], Awaitable[None]], Callable[[], Awaitable[None]]]


def raw_writer(nc: NATS) -> Writer | None:
    """The client's ``(write, flush)`` for protocol bytes written as they are (``HPUB ...``), or None
    when the client has no such buffer; after a write, :func:`count_out` keeps its counters true."""
    write = getattr(nc, "_send_command", None)
    flush = getattr(nc, "_flush_pending", None)
    if write is None or flush is None:
        return None
    return write, flush


def count_out(nc: NATS, messages: int, data_bytes: int) -> None:
    """Count messages written through :func:`raw_writer`, as ``publish`` counts its own."""
    nc.stats["out_msgs"] += messages
    nc.stats["out_bytes"] += data_bytes


def reconnects(nc: NATS) -> int:
    """How many times the client has reconnected since it connected."""
    return int(nc.stats["reconnects"])


# -- closing a connection the server reset ------------------------------------------------------------


class Client(NATS):
    """nats-py's client, which closes cleanly after the server reset the connection.

    Before it closes, nats-py writes out what is still pending and waits for it to drain. On a connection
    the server has just reset (after its ``-ERR`` for a message over ``max_payload``, say) the wait raises
    ``ConnectionResetError``, in a task nobody awaits, and the rest of the close never runs: the
    subscriptions are not ended, and the closed callback that tells the bus it is lost is not called.
    What was pending cannot reach that server any more, so the wait gives up quietly."""

    async def _close(self, status: int, do_cbs: bool = True) -> None:
        transport: Any = self._transport
        if transport is not None and "drain" not in vars(transport):
            drain = transport.drain

            async def drain_or_give_up() -> None:
                with contextlib.suppress(ConnectionError):
                    await drain()

            transport.drain = drain_or_give_up
        await super()._close(status, do_cbs)


# -- key-value buckets and messages -------------------------------------------------------------------


def kv_parts(kv: KeyValue) -> tuple[JetStreamContext, str, str]:
    """A bucket's JetStream context, stream name and subject prefix (``$KV.<bucket>.``)."""
    return kv._js, kv._stream, kv._pre


def kv_direct(kv: KeyValue) -> tuple[NATS, str] | None:
    """A bucket's client and the subject of its stream's direct gets (``$JS[.<domain>].API.DIRECT.GET.
    <stream>``), which batched gets are sent to; None when the bucket takes no direct gets."""
    if not kv._direct:
        return None
    return kv._js._nc, f"{kv._js._prefix}.DIRECT.GET.{kv._stream}"


class _SubjectsState(msgspec.Struct):
    subjects: dict[str, int] | None = None


class _SubjectsPage(msgspec.Struct):
    state: _SubjectsState = msgspec.field(default_factory=_SubjectsState)
    total: int = 0
    error: dict[str, Any] | None = None


_subjects_page = msgspec.json.Decoder(_SubjectsPage)


async def stream_subjects(js: JetStreamContext, stream: str, subjects_filter: str) -> dict[str, int]:
    """Every subject of ``stream`` that matches ``subjects_filter``, with its count of messages: a stream
    info request, page by page (nats-server sends at most 100,000 subjects an answer; nats-py's
    ``stream_info`` asks for the first page alone). Raises nats errors."""
    found: dict[str, int] = {}
    while True:
        body = msgspec.json.encode({"subjects_filter": subjects_filter, "offset": len(found)})
        msg = await js._nc.request(f"{js._prefix}.STREAM.INFO.{stream}", body, timeout=js._timeout)
        page = _subjects_page.decode(msg.data)
        if page.error is not None:
            nats.js.errors.APIError.from_error(page.error)  # raises it
        subjects = page.state.subjects or {}
        found.update(subjects)
        if not subjects or len(found) >= page.total:
            return found


def stream_seq(reply: str) -> int | None:
    """The stream sequence of a JetStream message, read from its reply subject without decoding the
    rest of its metadata; None when the subject is not a JetStream ack subject."""
    try:
        tokens = Msg.Metadata._get_metadata_fields(reply)
        return int(tokens[5] if len(tokens) == _V1_ACK_TOKENS else tokens[Msg.Ack.StreamSeq])
    except (ValueError, IndexError, NotJSMessageError):
        return None


#: Tokens of a JetStream ack subject without a domain and account hash (``$JS.ACK.<stream>...``).
_V1_ACK_TOKENS = 9


def num_pending(msg: Msg) -> int:
    """How many messages its consumer had yet to deliver after ``msg``, read from its reply subject
    alone (as :func:`delivery_count`)."""
    tokens = Msg.Metadata._get_metadata_fields(msg.reply)
    return int(tokens[8] if len(tokens) == _V1_ACK_TOKENS else tokens[Msg.Ack.NumPending])


def delivery_count(msg: Msg) -> int:
    """How many times JetStream has delivered ``msg`` (this delivery included), read from its reply
    subject alone: ``msg.metadata`` decodes every field, its timestamp into a datetime, once a task."""
    tokens = Msg.Metadata._get_metadata_fields(msg.reply)
    return int(tokens[4] if len(tokens) == _V1_ACK_TOKENS else tokens[Msg.Ack.NumDelivered]) or 1


# -- the pull protocol --------------------------------------------------------------------------------

#: Statuses that end a pull request: 404 no messages, 408 expired, 409 the consumer or request is gone.
END_STATUSES = frozenset({"404", "408", "409"})
HEARTBEAT = "100"


class _Pull(msgspec.Struct, frozen=True, omit_defaults=True):
    batch: int
    expires: int = 0  # nanoseconds; 0: none
    no_wait: bool = False


_pull_encoder = msgspec.json.Encoder()


def pull_subject(stream: str, consumer: str, *, domain: str | None = None) -> str:
    """Where pull requests for ``consumer`` go; with a domain, from behind a leaf node."""
    api = f"$JS.{domain}.API" if domain else "$JS.API"
    return f"{api}.CONSUMER.MSG.NEXT.{stream}.{consumer}"


async def request_pull(
    nc: NATS, subject: str, reply: str, *, batch: int, expires_s: float = 0.0, no_wait: bool = False
) -> None:
    """Ask a consumer (at :func:`pull_subject`) for up to ``batch`` messages, delivered to ``reply``:
    with ``no_wait`` answered at once (a 404 status when it has none), else within ``expires_s``
    (a 408 status when fewer came). JetStream's documented protocol, spoken over the core client."""
    request = _Pull(batch=batch, expires=int(expires_s * 1e9), no_wait=no_wait)
    await nc.publish(subject, _pull_encoder.encode(request), reply=reply)


def status_of(msg: Msg) -> str | None:
    """The status of a message that answers a pull request (``404``, ``408``, ``409``, ``100`` for a
    heartbeat), or None for a message of the stream."""
    if msg.data or not msg.headers:
        return None
    return msg.headers.get("Status")


class PullInbox:
    """Where pull requests are answered: the one pull client of hive-bus, under the worker's
    :class:`~hive_bus._pull.Puller` and the gateway's event follower.

    Each request gets a reply subject of its own (:meth:`next_reply`, taken before :meth:`send` so that
    an answer cannot come before its caller knows the subject). Every answer goes to
    ``on_answer(msg, status)``: a message of the stream with status None, or the status that ended a
    request (``msg.subject`` is that request's reply subject); idle heartbeats are dropped here.
    """

    def __init__(
        self,
        nc: NATS,
        on_answer: Callable[[Msg, str | None], None],
        *,
        pending_msgs_limit: int = DEFAULT_SUB_PENDING_MSGS_LIMIT,
    ) -> None:
        self._nc = nc
        self._on_answer = on_answer
        self._pending_msgs_limit = pending_msgs_limit
        self._inbox = nc.new_inbox()
        self._seq = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(
            f"{self._inbox}.*", cb=self._on_msg, pending_msgs_limit=self._pending_msgs_limit
        )

    async def stop(self) -> None:
        """Stop listening, ignoring a bus that is gone; the caller bounds it (and shields it if it must
        happen while cancelled)."""
        if self._sub is not None:
            with contextlib.suppress(*BUS_ERRORS):
                await self._sub.unsubscribe()

    def next_reply(self) -> str:
        self._seq += 1
        return f"{self._inbox}.{self._seq}"

    async def send(
        self, subject: str, reply: str, *, batch: int, expires_s: float = 0.0, no_wait: bool = False
    ) -> None:
        """A pull request to ``subject`` (:func:`pull_subject`), answered on ``reply``."""
        await request_pull(self._nc, subject, reply, batch=batch, expires_s=expires_s, no_wait=no_wait)

    async def _on_msg(self, msg: Msg) -> None:
        status = status_of(msg)
        if status != HEARTBEAT:
            self._on_answer(msg, status)


# -- a durable pull consumer's messages, one at a time, until cancelled ------------------------------


async def handle_each(
    sub: JetStreamContext.PullSubscription,
    handle: Callable[[Msg], Awaitable[None]],
    *,
    what: str,
    wait_s: float,
    log: logging.Logger,
    batch: int = 64,
) -> None:
    """Fetch from ``sub`` and hand each message to ``handle``, in order, until cancelled: a fetch that
    fails (the server away) is logged, naming ``what``, and tried again a second later. The
    subscription is given back on the way out."""
    try:
        while True:
            try:
                msgs = await sub.fetch(batch=batch, timeout=wait_s)
            except TimeoutError:
                continue
            except BUS_ERRORS as exc:
                log.warning("fetching %s failed (%s); trying again", what, exc)
                await anyio.sleep(1)
                continue
            for msg in msgs:
                await handle(msg)
    finally:
        # a connection the server closed refuses the unsubscribe: nothing is left to undo
        with anyio.CancelScope(shield=True), anyio.move_on_after(3), contextlib.suppress(*BUS_ERRORS):
            await sub.unsubscribe()


# -- following an ordered consumer --------------------------------------------------------------------


async def follow(
    js: JetStreamContext,
    subject: str,
    *,
    stream: str,
    config: ConsumerConfig,
    cb: Callable[[Msg], Awaitable[None]] | None = None,
) -> JetStreamContext.PushSubscription:
    """An ordered consumer of ``stream`` on ``subject``: every message in order, recreated by nats-py
    when a gap shows; handed to ``cb`` one at a time when given. Give it back with :func:`unsubscribe`."""
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, config=config, cb=cb)
    _FOLLOWED[sub] = js
    try:
        await _recreated_from_its_start(sub, config)
    except BaseException:
        await unsubscribe(sub)
        raise
    return sub


# Subscriptions of ordered consumers made by follow(): unsubscribe() deletes their consumer, which
# nats-py leaves to the server (gone once inactive for 5 s: a gateway listing the recent tasks ten
# times a second kept some fifty of them per provider).
_FOLLOWED: weakref.WeakKeyDictionary[Any, JetStreamContext] = weakref.WeakKeyDictionary()


async def _recreated_from_its_start(sub: JetStreamContext.PushSubscription, config: ConsumerConfig) -> None:
    """nats-py recreates an ordered consumer whose heartbeats stop (a server restart, a reconnection)
    from just after the last message it delivered (``_JSI._sseq``); until it has delivered one, that is
    0, and the new consumer starts at the stream's first message, not where this one started: a feed
    of events from now on replayed every event the stream held. The count starts where the consumer
    does."""
    if config.deliver_policy in (None, DeliverPolicy.ALL):
        return
    if config.deliver_policy == DeliverPolicy.BY_START_SEQUENCE and config.opt_start_seq:
        before = config.opt_start_seq - 1
    else:  # from now on, the last, or a time: where the server put it
        info = await sub.consumer_info()
        before = (info.delivered.stream_seq or 0) if info.delivered is not None else 0
    if (jsi := sub._sub._jsi) is not None:
        jsi._sseq = max(jsi._sseq, before)


async def unsubscribe(sub: Any, *, timeout_s: float = math.inf) -> None:
    """Unsubscribe even while being cancelled (else the server keeps delivering to a dead inbox until the
    consumer goes inactive), giving up after ``timeout_s`` and ignoring a bus that is gone."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(timeout_s), contextlib.suppress(*BUS_ERRORS):
        await sub.unsubscribe()
        if (js := _FOLLOWED.pop(sub, None)) is not None:  # its consumer too (ephemeral, its alone)
            with anyio.move_on_after(3):
                info = await sub.consumer_info()
                await js.delete_consumer(info.stream_name, info.name)


@asynccontextmanager
async def following(
    js: JetStreamContext, subject: str, *, stream: str, config: ConsumerConfig
) -> AsyncIterator[JetStreamContext.PushSubscription]:
    """:func:`follow` for the length of a block, then :func:`unsubscribe`."""
    sub = await follow(js, subject, stream=stream, config=config)
    try:
        yield sub
    finally:
        await unsubscribe(sub)


# JetStream's error code for a stream that does not exist (a 404 like a missing consumer's, 10014)
STREAM_NOT_FOUND = 10059


def stream_missing(exc: BaseException) -> bool:
    """Whether a JetStream API error says the stream does not exist (not that a consumer or message
    does not)."""
    return getattr(exc, "err_code", None) == STREAM_NOT_FOUND


# JetStream's error code for a message that is not in the stream: a deletion's is a 500 with it, not a
# 404 (nats-py raises ServerError), a get's a 404 with 10037.
NO_MESSAGE_FOUND = 10057
NO_MESSAGE_GOT = 10037


async def delete_message(js: JetStreamContext, stream: str, seq: int) -> bool:
    """Delete message ``seq`` of ``stream``: False when it was not there (gone by age, or deleted by
    another), True when this call deleted it. Raises nats errors otherwise."""
    try:
        return bool(await js.delete_msg(stream, seq))
    except nats.js.errors.APIError as exc:
        if exc.err_code in (NO_MESSAGE_FOUND, NO_MESSAGE_GOT):
            return False
        raise


async def account_info(js: JetStreamContext) -> dict[str, Any]:
    """JetStream's answer about this account (``$JS.API.INFO``) as it came: its storage in use, its
    ``reserved_storage`` (the ``max_bytes`` of its streams, which nats-py's ``AccountInfo`` leaves
    out) and its ``limits``. Raises nats errors, and :class:`nats.js.errors.APIError` for an error
    answer."""
    msg = await js._nc.request(f"{js._prefix}.INFO", b"", timeout=js._timeout)
    answer: dict[str, Any] = json.loads(msg.data)
    if "error" in answer:
        nats.js.errors.APIError.from_error(answer["error"])
    return answer
