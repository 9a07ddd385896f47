"""JetStream publishes that wait for the server's acknowledgement, for the submission path.

nats-py's ``JetStreamContext.publish`` costs, per message, a fresh NUID and four random bytes for the
reply token, an ``asyncio.wait_for`` and a stdlib ``json`` parse of the ack into a dataclass. On the
gateway's POST path that was a large share of the CPU a task costs. This publisher keeps what matters
(every publish waits for JetStream's ack, or fails within the timeout, and carries
``Nats-Expected-Stream`` so that it can only be stored where it is meant to be) and does the rest once:
one reply subscription per connection, tokens from a counter, the ack decoded by a msgspec decoder built
once, and for each call, however many messages it publishes, one future and one timer.

:meth:`JetStreamPublisher.publish` writes a call's messages to the connection in one piece, in order,
then waits for all their answers together. It writes the protocol itself: nats-py's ``publish`` costs
about 17 µs a message (subject checks, header encoding, a write-buffer append and a flusher wake-up
each), a third of what a task in a batch cost; the header block of each stream is encoded once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Mapping, Sequence

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ._errors import BusUnavailable, QueueFull
from ._nats import BUS_ERRORS, count_out, raw_writer
from ._size import check_fits

_STATUS_HEADER = "Status"
_NO_RESPONDERS = "503"
_HEADER_LINE = b"NATS/1.0\r\n"
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})  # a header value is one line, as nats-py makes it


def _one_line(value: str) -> str:
    """A header value on one line; ``translate`` only when it is needed (it costs a few µs a call)."""
    value = value.strip()
    return value.translate(_NEWLINES) if "\r" in value or "\n" in value else value


class PubAck(msgspec.Struct, frozen=True):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False


class _ApiError(msgspec.Struct, frozen=True):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Reply(msgspec.Struct, frozen=True):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_reply_decoder = msgspec.json.Decoder(_Reply)


class PublishRefused(Exception):
    """JetStream answered the publish with an error (a full stream, a wrong expected stream...)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{description} (code {code}, err_code {err_code})")
        self.code = code
        self.err_code = err_code
        self.description = description


class NoStream(Exception):
    """No stream took the subject: nothing answered the publish."""


# One submission publish: subject, data, Nats-Msg-Id (or None) and the one stream that may store it.
Publish = tuple[str, bytes, str | None, str]
# The header of a publish that must be the first on its subject: a task message whose id was made for
# its submission (``<prefix>.tasks.<provider>.<priority>.<task id>``). Sent again, it is refused, and
# :func:`stored` answers the sequence that holds it, as a duplicate's ack would: the same guarantee as a
# ``Nats-Msg-Id``, without the server keeping the id in memory for the duplicate window (about 220 B a
# task, and as much again for its ``queued`` marker, which carries the task's headers into the events
# stream: bench/server_memory.py).
FIRST_ON_SUBJECT: Mapping[str, str] = {"Nats-Expected-Last-Subject-Sequence": "0"}
# Headers of one publish beyond those (a message schedule's ``Nats-Schedule`` and its target), by its
# index in the call: most publishes have none, and so pay nothing for them.
Extra = Mapping[int, Mapping[str, str]]
# What became of it: the ack, the server's refusal, or None when no answer came in time.
Outcome = PubAck | PublishRefused | NoStream | None


class _Acks:
    """The answers to one call's publishes, in order; ``done`` once all came or time is up."""

    __slots__ = ("done", "left", "outcomes", "tokens")

    def __init__(self, done: asyncio.Future[None], tokens: list[str]) -> None:
        self.done = done
        self.tokens = tokens
        self.outcomes: list[Outcome] = [None] * len(tokens)
        self.left = len(tokens)

    def answer(self, index: int, outcome: Outcome) -> None:
        self.outcomes[index] = outcome
        self.left -= 1
        if not self.left and not self.done.done():
            self.done.set_result(None)


class _Call:
    """One call of :meth:`JetStreamPublisher.publish_together`, waiting to be sent with the others."""

    __slots__ = ("extra", "messages", "waiter")

    def __init__(
        self, messages: Sequence[Publish], extra: Extra | None, waiter: asyncio.Future[list[Outcome]]
    ) -> None:
        self.messages = messages
        self.extra = extra
        self.waiter = waiter


class JetStreamPublisher:
    """Publishes to JetStream over one connection; start with :meth:`start` once connected."""

    def __init__(self, nc: NATS, timeout_s: float, *, unchecked: frozenset[str] = frozenset()) -> None:
        """``unchecked``: streams whose messages go without ``Nats-Expected-Stream`` (the tasks stream:
        its RePublish would carry the header to the events stream, which would refuse the copy); the
        stream named in the ack is checked instead (:func:`stored`)."""
        self._nc = nc
        self._timeout_s = timeout_s
        self._unchecked = unchecked
        self._tokens = itertools.count()
        self._waiting: dict[str, tuple[_Acks, int]] = {}
        self._prefix = ""
        self._sub: Subscription | None = None
        self._header_lines: dict[str, bytes] = {}  # by stream: the header block up to the Nats-Msg-Id
        # publish_together's: the calls of this pass of the event loop after its first, and the sends of
        # earlier ones
        self._queued: list[_Call] = []
        self._pass_open = False  # a call of publish_together was sent in this pass of the event loop
        self._sending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._prefix = f"{self._nc.new_inbox()}."
        self._sub = await self._nc.subscribe(f"{self._prefix}*", cb=self._on_reply)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(*BUS_ERRORS):  # the connection is closing anyway
                await self._sub.unsubscribe()
        for acks, _ in self._waiting.values():
            if not acks.done.done():
                acks.done.set_result(None)
        self._waiting.clear()

    async def publish(self, messages: Sequence[Publish], extra: Extra | None = None) -> list[Outcome]:
        """Publish every message now, in order, in one write, and wait (up to the timeout, for all of
        them together) for their answers: each one's :class:`Outcome`, in order. ``extra``: more
        headers of some of them, by index. Raises what nats-py raises when it cannot send, and then
        nothing was sent."""
        if self._sub is None:
            raise RuntimeError("JetStreamPublisher.start() was not called")
        loop = asyncio.get_running_loop()
        tokens = [str(next(self._tokens)) for _ in messages]
        acks = _Acks(loop.create_future(), tokens)
        waiting = self._waiting
        for i, token in enumerate(tokens):
            waiting[token] = (acks, i)
        timer = loop.call_later(self._timeout_s, _expire, acks.done)
        try:
            await self._write(messages, tokens, extra or {})
            await acks.done
        finally:
            timer.cancel()
            for token in tokens:
                waiting.pop(token, None)
        return acks.outcomes

    async def publish_together(
        self, messages: Sequence[Publish], extra: Extra | None = None
    ) -> list[Outcome]:
        """As :meth:`publish`, but the calls of ``publish_together`` made in one pass of the event loop
        after its first go out together: one write, one future and one timer for them all (a worker
        whose lanes settle many tasks at once, a gateway answering many POSTs, pays for them once). The
        first call of a pass is sent at once, as :meth:`publish` sends it, so that a lone publish waits
        for no later pass. A call's messages stay together and in order; one too large for the server
        fails its own call alone."""
        loop = asyncio.get_running_loop()
        if not self._pass_open:
            self._pass_open = True
            loop.call_soon(self._close_pass)  # runs once every call this pass makes is made
            return await self.publish(messages, extra)
        waiter: asyncio.Future[list[Outcome]] = loop.create_future()
        self._queued.append(_Call(messages, extra, waiter))
        return await waiter

    def _close_pass(self) -> None:
        """The end of a pass that published: the calls made after its first, sent together."""
        self._pass_open = False
        if self._queued:
            calls, self._queued = self._queued, []
            sending = asyncio.get_running_loop().create_task(self._send(calls))
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[_Call]) -> None:
        messages: list[Publish] = []
        extra: dict[int, Mapping[str, str]] = {}
        for call in calls:
            if call.extra:
                extra.update((len(messages) + i, headers) for i, headers in call.extra.items())
            messages += call.messages
        try:
            outcomes = await self.publish(messages, extra)
        except nats.errors.MaxPayloadError:
            if len(calls) > 1:  # one of them is too large (nothing was sent): each call on its own
                for call in calls:
                    await self._send([call])
                return
            _fail(calls, nats.errors.MaxPayloadError())
            return
        except Exception as exc:  # nothing was sent: each caller raises it
            _fail(calls, exc)
            return
        except BaseException:
            _fail(calls, BusUnavailable("the publisher stopped before the messages were sent"))
            raise
        at = 0
        for call in calls:
            if not call.waiter.done():  # its caller may have given up
                call.waiter.set_result(outcomes[at : at + len(call.messages)])
            at += len(call.messages)

    async def _write(self, messages: Sequence[Publish], tokens: list[str], extra: Extra) -> None:
        """The messages on the connection, in order. The protocol is written here (``HPUB <subject>
        <reply> <header bytes> <total bytes>``) and handed to the client's write buffer at once, below
        nats-py's public API; a client without that buffer, or one that is not connected (nats-py's own
        rules for buffering during a reconnection apply), gets them one ``publish`` at a time."""
        nc = self._nc
        prefix = self._prefix
        writer = raw_writer(nc)
        if writer is None or not nc.is_connected:
            sends = [
                (s, d, {**_headers(m, stream), **extra.get(i, {})})
                for i, (s, d, m, stream) in enumerate(messages)
            ]
            for _, data, headers in sends:  # all checked before any goes: nats-py counts no header
                check_fits(nc, data, headers)
            for (subject, data, headers), token in zip(sends, tokens, strict=True):
                await nc.publish(subject, data, reply=prefix + token, headers=headers)
            return
        if nc.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        wire: list[bytes] = []
        out_bytes = 0
        for i, ((subject, data, msg_id, stream), token) in enumerate(zip(messages, tokens, strict=True)):
            hdr = self._header_lines.get(stream) or self._stream_header(stream)
            if msg_id:
                hdr += f"Nats-Msg-Id: {_one_line(msg_id)}\r\n".encode()
            for name, value in extra.get(i, {}).items():
                hdr += f"{name}: {_one_line(value)}\r\n".encode()
            hdr += b"\r\n"
            if len(hdr) + len(data) > nc.max_payload:  # the server counts the headers too
                raise nats.errors.MaxPayloadError
            wire.append(f"HPUB {subject} {prefix}{token} {len(hdr)} {len(hdr) + len(data)}\r\n".encode())
            wire += (hdr, data, b"\r\n")
            out_bytes += len(data)
        write, flush = writer
        await write(b"".join(wire))
        await flush()
        count_out(nc, len(messages), out_bytes)

    def _stream_header(self, stream: str) -> bytes:
        lines = _HEADER_LINE
        if stream not in self._unchecked:
            lines += f"Nats-Expected-Stream: {stream}\r\n".encode()
        self._header_lines[stream] = lines
        return lines

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if entry is None:
            return  # it timed out, or its caller gave up
        acks, index = entry
        if msg.headers and msg.headers.get(_STATUS_HEADER) == _NO_RESPONDERS:
            acks.answer(index, NoStream())
            return
        try:
            reply = _reply_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            acks.answer(index, PublishRefused(0, 0, f"an acknowledgement that does not decode: {exc}"))
            return
        if reply.error is not None:
            error = reply.error
            acks.answer(index, PublishRefused(error.code, error.err_code, error.description))
            return
        acks.answer(index, PubAck(stream=reply.stream, seq=reply.seq, duplicate=reply.duplicate))


def _fail(calls: list[_Call], exc: Exception) -> None:
    for call in calls:
        if not call.waiter.done():
            call.waiter.set_exception(exc)


def _expire(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _headers(msg_id: str | None, stream: str) -> dict[str, str]:
    """A submission publish's headers: stored only in ``stream``, and de-duplicated by ``msg_id``."""
    headers = {"Nats-Expected-Stream": stream}
    if msg_id:
        headers["Nats-Msg-Id"] = msg_id
    return headers


# JetStream's answer when a discard-new stream is at its limits, and when a client is told to try again.
STREAM_FULL_CODES = frozenset({10077})
QUEUE_FULL_RETRY_S = 5.0


def refused_as_full(exc: BaseException) -> bool:
    """Whether JetStream refused a write because its stream (a bucket) is at its limits."""
    return getattr(exc, "err_code", None) in STREAM_FULL_CODES


# JetStream's answer to a publish whose expected last sequence on its subject is not the subject's:
# "wrong last sequence: <the subject's last sequence>".
_WRONG_LAST_SEQUENCE = 10071


def stored(outcome: Outcome, stream: str, timeout_s: float) -> PubAck:
    """The ack of a publish to ``stream``, or the error that says what the caller can do about it:
    :class:`QueueFull` for a full stream, :class:`BusUnavailable` for everything else."""
    if isinstance(outcome, PubAck):
        if outcome.stream != stream:  # sent without Nats-Expected-Stream: checked here instead
            raise BusUnavailable(
                f"the publish meant for {stream} was stored in {outcome.stream}: streams overlap on its "
                "subject (check the bus's stream configuration)"
            )
        return outcome
    if isinstance(outcome, PublishRefused):
        if (held := _held_at(outcome)) is not None:  # a FIRST_ON_SUBJECT publish, sent before
            return PubAck(stream=stream, seq=held, duplicate=True)
        if outcome.err_code in STREAM_FULL_CODES or "exceeded" in outcome.description:
            full = (  # the account's room used up refuses every stream's writes, an empty one's too
                "the account's JetStream storage is used up"
                if "for account" in outcome.description
                else f"the {stream} stream is full"
            )
            raise QueueFull(
                f"{full} ({outcome.description}); nothing was accepted", retry_after_s=QUEUE_FULL_RETRY_S
            )
        raise BusUnavailable(f"JetStream refused the publish to {stream}: {outcome.description}")
    if isinstance(outcome, NoStream):
        raise BusUnavailable(f"JetStream did not store the publish to {stream}: no stream answered")
    raise BusUnavailable(  # stored or not: the ack may be what was lost
        f"no acknowledgement from {stream} within {timeout_s:g}s: it may be stored all the same (sent "
        "again with the same idempotency key, it is stored once)"
    )


def _held_at(refused: PublishRefused) -> int | None:
    """The sequence of the message a :data:`FIRST_ON_SUBJECT` publish found on its subject, if that is
    why it was refused."""
    if refused.err_code != _WRONG_LAST_SEQUENCE:
        return None
    _, _, seq = refused.description.rpartition(":")
    return int(seq) if seq.strip().isdigit() else None
