"""What one HTTP connection may hold of the gateway: time to send its request, room for its request's
head, and a place among a bounded number of connections.

uvicorn alone bounds neither. Its keep-alive timeout runs only between requests, so a client that
sends a request's head (or body) one byte at a time, or nothing at all, holds its connection, and a
file descriptor, for ever; and its ``limit_concurrency`` is checked only once a request's head is
complete, so such clients are never counted. These protocols (uvicorn's h11 and httptools ones, with
two timers and two counts) close a connection whose request head has not arrived within
``header_timeout_s`` of its start (or of the previous answer's end), or whose body has not arrived
within ``body_timeout_s`` of its head, answering 408 when nothing has been answered yet; answer 431 and
close a connection whose request head grows past ``max_head_bytes`` (h11 caps a head by itself, at twice
that, httptools does not: without this a head could fill memory until its timer ran out); and answer 503
and close at once any connection beyond ``max_connections``. The time a handler takes (a wait, an event
stream) is not the client's and is not bounded here.

A head is counted in the bytes as they arrive, before the parser sees them, up to the blank line that
ends it: so it is held to its limit however it is cut into reads (all in one, in many, a byte at a time),
and an over-long request line is answered 431 too, before httptools could turn it into uvicorn's plain
text 400 (``httptools.parse_url`` takes no URL past 64 KiB). What arrives while a request's body is still
coming is its body, not counted; a head that starts in the same read as the end of the body before it
(pipelining) is counted from the next read on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal, get_args

from uvicorn.protocols.http.h11_impl import H11Protocol

from . import answers

log = logging.getLogger("hive_bus.gateway")

# File descriptors the gateway needs beside its HTTP connections: NATS, logs, files it serves, epoll.
OTHER_FILES = 256
# Logged at most this often, so that a flood of connections does not turn into a flood of lines.
LOG_EVERY_S = 10.0
# How long a connection refused for its head's size is read (and what it sends thrown away) after its
# 431: closed at once, with the rest of the head unread, it would be reset, and a reset can reach the
# client before the answer it follows, which is then lost.
LINGER_S = 1.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int = 1000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: int = 5  # uvicorn's timeout_keep_alive: an idle kept-alive connection's life
    max_head_bytes: int = 64 * 1024  # a request's line and headers


def _raw_answer(status: int, reason: str, message: str) -> bytes:
    body = answers.error(status, reason, message).body()
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n" % (
        status,
        reason.replace("_", " ").encode(),
    )
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


_FULL = _raw_answer(
    503, "service_unavailable", "the gateway has as many connections as it takes; retry later"
)
_SLOW_HEAD = _raw_answer(408, "request_timeout", "the request's head did not arrive in time")
_SLOW_BODY = _raw_answer(408, "request_timeout", "the request's body did not arrive in time")
# The blank line that ends a head (h11 takes a bare LF for a line's end as well as CRLF).
_HEAD_END = re.compile(rb"\r?\n\r?\n")


def _large_head(max_head_bytes: int) -> bytes:
    return _raw_answer(
        431,
        "request_header_fields_too_large",
        f"the request's line and headers are larger than the gateway takes ({max_head_bytes} bytes)",
    )


class _Coalesced:
    """A connection's transport whose writes of one step of the loop leave as one: uvicorn writes an
    answer's head and its body apart, two sends and two segments that wake the client twice; joined,
    a small answer costs one system call. What is written goes out at the loop's next turn, or at
    :meth:`close`."""

    __slots__ = ("_inner", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending is None:
            self._pending = [bytes(data)]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(bytes(data))

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._inner.is_closing():
            self._inner.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._inner.close()

    def write_eof(self) -> None:
        self._flush()
        self._inner.write_eof()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def __getattr__(self, name: str) -> Any:  # the rest of the transport's interface, as it is
        return getattr(self._inner, name)


class _Limited:
    """The limits, over either of uvicorn's HTTP/1.1 protocols (the class that follows this one in the
    bases of the classes that :func:`limited_protocol` makes)."""

    limits = ConnectionLimits()
    _logged_at = 0.0  # per class: when a refusal was last logged
    # the awaited head (see _head_fits): bytes counted so far, its last bytes, whether it has begun
    _head_bytes: int
    _head_tail: bytes
    _head_started: bool
    # what uvicorn's protocols have, for the type checker
    connections: set[Any]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any
    client: tuple[str, int] | None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._timer: asyncio.TimerHandle | None = None
        self._timed_cycle: Any = None
        self._refused = False  # a head over the limit was answered: what comes now is thrown away
        self._forget_head()
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.limits.max_connections:
            self._log(f"refused a connection: {self.limits.max_connections} are open, the most it takes")
            transport.write(_FULL)
            transport.close()
            return
        # every request's cycle gets the protocol's transport: from now on, the coalescing one
        self.transport = _Coalesced(transport, self.loop)  # type: ignore[assignment]
        self._arm(self.limits.header_timeout_s, _SLOW_HEAD)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_head() and not self._head_fits(data):
            self._log(f"closed a connection from {self.client}: a request's head over the limit")
            self._refuse_head()
            return
        super().data_received(data)  # type: ignore[misc]
        if self.transport.is_closing():
            return
        self._track()

    def eof_received(self) -> bool | None:
        if self._refused:
            return None  # the client read its 431 and is done: the transport closes
        return super().eof_received()  # type: ignore[misc,no-any-return]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]  # may start the next request, already received
        if not self.transport.is_closing():
            self._track()

    def _awaiting_head(self) -> bool:
        """Whether what arrives now is a request's head: the first, or the next after a request whose body
        is all in, answered or not (the rest of a body answered early is read and thrown away, not held)."""
        cycle = self.cycle
        return cycle is None or not cycle.more_body

    def _head_fits(self, data: bytes) -> bool:
        """Count what ``data`` adds to the awaited head, up to the blank line that ends it (blank lines
        before a request line are skipped, as httptools skips them); whether the head is still within
        the limit. Once a head has ended, the next starts from nothing."""
        skipped = 0
        if not self._head_started:
            skipped = len(data) - len(data.lstrip(b"\r\n"))
            if skipped == len(data):
                return True
            self._head_started = True
        seen = self._head_tail + data  # no tail when skipped: a tail is kept once a head has started
        end = _HEAD_END.search(seen, skipped)
        self._head_bytes += len(seen) - skipped if end is None else end.end() - skipped
        self._head_bytes -= len(self._head_tail)  # counted with the read before
        if self._head_bytes > self.limits.max_head_bytes:
            return False
        if end is not None:
            rest = seen[end.end() :]
            self._forget_head()
            # what follows is a body or the next head (pipelined): a blank line cut between this read
            # and the next must not be skipped as one before a request line
            self._head_started = bool(rest.strip(b"\r\n"))
        if self._head_started:
            self._head_tail = seen[-3:]
        return True

    def _forget_head(self) -> None:
        self._head_bytes = 0
        self._head_tail = b""
        self._head_started = False  # no byte but a blank line's yet

    def _track(self) -> None:
        """Set the timer for what the client owes now: a request's head, its body, or nothing."""
        cycle = self.cycle
        if cycle is None:
            return  # the first request's head is still coming: its timer runs from the connection's start
        if cycle is not self._timed_cycle:  # a new request's head is in: now its body has its time
            self._timed_cycle = cycle
            self._arm(self.limits.body_timeout_s, _SLOW_BODY)
        if not cycle.more_body:
            if not cycle.response_complete:
                self._disarm()  # the whole request is in: the handler's time is not the client's
            elif self._timer is None:  # answered: the next request's head has its time
                self._arm(self.limits.header_timeout_s, _SLOW_HEAD)

    def _arm(self, after_s: float, answer: bytes) -> None:
        self._disarm()
        self._timer = self.loop.call_later(after_s, self._expired, answer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, answer: bytes) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        self._log(
            f"closed a connection from {self.client}: {'head' if answer is _SLOW_HEAD else 'body'} too slow"
        )
        self._end(answer)

    def _refuse_head(self) -> None:
        """Answer 431 and end the connection; unless a handler is answering the request before this
        one, read on for :data:`LINGER_S` first, throwing away what comes, so that the answer is read."""
        answer = _large_head(self.limits.max_head_bytes)
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or not self.transport.can_write_eof():
            self._end(answer)
            return
        self._disarm()
        self._refused = True
        self.transport.write(answer)
        self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)

    def _end(self, answer: bytes) -> None:
        self._disarm()
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(answer)  # nothing of an answer is on the wire: say why it ends
        self.transport.close()

    @classmethod
    def _log(cls, message: str) -> None:
        now = time.monotonic()
        if now - cls._logged_at >= LOG_EVERY_S:
            cls._logged_at = now
            log.warning("%s (such lines are logged at most every %gs)", message, LOG_EVERY_S)


HttpParser = Literal["h11", "httptools"]
HttpChoice = Literal["auto", "httptools", "h11"]
HTTP_CHOICES: tuple[str, ...] = get_args(HttpChoice)


class ParserUnavailable(RuntimeError):
    """``--http httptools`` was asked for where httptools is not installed."""


def http_parser(choice: HttpChoice = "auto") -> HttpParser:
    """The HTTP/1.1 parser for ``choice``: for ``"auto"`` httptools (C, llhttp) where it is installed,
    else h11 (pure Python, always there with uvicorn), said once at debug."""
    if choice == "h11":
        return "h11"
    if _httptools_installed():
        return "httptools"
    if choice == "httptools":
        raise ParserUnavailable("--http httptools: httptools is not installed (pip install httptools)")
    _say_once("httptools is not installed; the gateway parses HTTP with h11")
    return "h11"


@functools.cache
def _httptools_installed() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _say_once(message: str) -> None:
    log.debug(message)


def limited_protocol(limits: ConnectionLimits, parser: HttpParser = "h11") -> type[asyncio.Protocol]:
    """uvicorn's h11 or httptools protocol held to ``limits`` (pass it as ``uvicorn.Config(http=...)``).
    httptools must be importable for ``"httptools"`` (see :func:`http_parser`)."""
    if parser == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base: type[asyncio.Protocol] = HttpToolsProtocol
    else:
        base = H11Protocol
    name = "LimitedHttpToolsProtocol" if parser == "httptools" else "LimitedH11Protocol"
    return type(name, (_Limited, base), {"limits": limits, "_logged_at": 0.0})


def ensure_file_limit(max_connections: int) -> int:
    """Raise this process's soft limit of open files to what ``max_connections`` needs, when the hard
    limit allows; say so when it does not (an exhausted limit makes every accept fail). Returns the
    soft limit now in force (0 where there is none to read)."""
    if sys.platform == "win32":
        return 0
    import resource

    needed = max_connections + OTHER_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if raised > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    if raised < needed:
        log.warning(
            "open files are limited to %d, fewer than %d connections need (%d); raise LimitNOFILE "
            "(systemd) or ulimit -n, or lower --max-connections",
            raised,
            max_connections,
            needed,
        )
    return raised
