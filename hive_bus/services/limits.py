"""What one HTTP connection may hold of the gateway: time to send its request, and a place among a
bounded number of connections.

uvicorn alone bounds neither. Its keep-alive timeout runs only between requests, so a client that
sends a request's head (or body) one byte at a time, or nothing at all, holds its connection, and a
file descriptor, for ever; and its ``limit_concurrency`` is checked only once a request's head is
complete, so such clients are never counted. This protocol (uvicorn's h11 one, with two timers and a
count) closes a connection whose request head has not arrived within ``header_timeout_s`` of its start
(or of the previous answer's end), or whose body has not arrived within ``body_timeout_s`` of its head,
answering 408 when nothing has been answered yet; and it answers 503 and closes at once any connection
beyond ``max_connections``. The time a handler takes (a wait, an event stream) is not the client's and
is not bounded here.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

from . import answers

log = logging.getLogger("hive_bus.gateway")

# File descriptors the gateway needs beside its HTTP connections: NATS, logs, files it serves, epoll.
OTHER_FILES = 256
# Logged at most this often, so that a flood of connections does not turn into a flood of lines.
LOG_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int = 1000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: int = 5  # uvicorn's timeout_keep_alive: an idle kept-alive connection's life


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


class _Limited(H11Protocol):
    limits = ConnectionLimits()
    _logged_at = 0.0  # per class: when a refusal was last logged

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None
        self._timed_cycle: object = None
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._log(f"refused a connection: {self.limits.max_connections} are open, the most it takes")
            transport.write(_FULL)
            transport.close()
            return
        self._arm(self.limits.header_timeout_s, _SLOW_HEAD)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next request, already received
        if not self.transport.is_closing():
            self._track()

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
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(answer)  # nothing of an answer is on the wire: say why it ends
        self._log(
            f"closed a connection from {self.client}: {'head' if answer is _SLOW_HEAD else 'body'} too slow"
        )
        self.transport.close()

    @classmethod
    def _log(cls, message: str) -> None:
        now = time.monotonic()
        if now - cls._logged_at >= LOG_EVERY_S:
            cls._logged_at = now
            log.warning("%s (such lines are logged at most every %gs)", message, LOG_EVERY_S)


def limited_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol held to ``limits`` (pass it as ``uvicorn.Config(http=...)``)."""
    return type("LimitedH11Protocol", (_Limited,), {"limits": limits, "_logged_at": 0.0})


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
