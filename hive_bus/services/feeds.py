"""How many event feeds (Server-Sent Events: ``GET /v1/events``, ``GET /v1/tasks/{id}/events``) one
gateway serves at once.

A feed follows its providers' events streams through ordered consumers of its own, and the events it has
read and its client has not wait in this process: a hundred and fifty feeds open at once (their clients
slow, or not reading) took a gateway from 70 MB to over a gigabyte, its NATS connection timed out, and
submissions were refused. So a gateway serves at most ``at_once`` feeds; one more is answered 503 with
``Retry-After`` at once (an ``EventSource`` connects again by itself). A feed holds its slot from its
request until its events end (its client gone, the task ended, the hour up); one whose response is
dropped before it starts holds none. The bound is per process.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Generic, TypeVar

from hive_bus import BusUnavailable

FEEDS_AT_ONCE = 32
T = TypeVar("T")


class FeedsBusy(BusUnavailable):
    """The gateway serves as many event feeds as it serves at once."""


class Feeds:
    """The gateway's open event feeds: ``return ServerSentEvent(feeds.opened(events()))``."""

    def __init__(self, at_once: int = FEEDS_AT_ONCE) -> None:
        if at_once < 1:
            raise ValueError(f"a gateway serves at least one feed, not {at_once}")
        self.at_once = at_once
        self.serving = 0  # feeds whose events have begun and not ended
        self._asked: weakref.WeakSet[_Feed[Any]] = weakref.WeakSet()  # answered, not begun

    def opened(self, events: AsyncIterator[T]) -> AsyncIterator[T]:
        """``events``, counted among the open feeds; raises :class:`FeedsBusy` when they are all taken."""
        if self.serving + len(self._asked) >= self.at_once:
            raise FeedsBusy(
                f"the gateway serves {self.at_once} event feeds at once, all open now: try again shortly"
            )
        feed = _Feed(self, events)
        self._asked.add(feed)
        return feed


class _Feed(Generic[T]):
    """One feed's events, its slot given back when they end, however they end."""

    def __init__(self, feeds: Feeds, events: AsyncIterator[T]) -> None:
        self._feeds = feeds
        self._events = events
        self._state = "asked"  # then "serving", then "ended"

    def __aiter__(self) -> _Feed[T]:
        return self

    async def __anext__(self) -> T:
        if self._state == "asked":
            self._state = "serving"
            self._feeds._asked.discard(self)
            self._feeds.serving += 1
        try:
            return await anext(self._events)
        except BaseException:  # its end, its client gone (cancelled), or a failure
            self._end()
            raise

    async def aclose(self) -> None:
        self._end()
        if isinstance(self._events, AsyncGenerator):
            await self._events.aclose()

    def __del__(self) -> None:
        self._end()

    def _end(self) -> None:
        if self._state == "serving":
            self._feeds.serving -= 1
        self._state = "ended"
