"""What one fake provider remembers between requests, and what it decides for the next one.

The limits work the way the real APIs' limits look from outside:

* ``limit(requests, window_s)``: a fixed window per API key. The first request admitted after a window
  has ended opens a new one; inside a window, requests past ``requests`` get a 429 whose delay is the
  time left in the window. Refused requests do not use up the window.
* ``daily_quota(requests)``: after that many admitted requests for a key, every request of that key gets
  the provider's per-day 429. The "day" is a 24 h window opened by the key's first admitted request; the
  429's delay is the time left in it, or ``retry_after_s`` when given.
* ``no_quota(key, model)``: that key has no quota at all for that model (a free tier without the model):
  each of its requests for the model gets the per-day 429 with a limit of 0.
* ``fail_next(status, count)``: the next ``count`` requests (any key) answer ``status`` with the
  provider's real error body, before any other check.
* ``stream_gap_s`` spaces the events of a streamed answer; ``pause_streams(after_events)`` holds every
  streamed answer after that many events until the returned ``threading.Event`` is set;
  ``break_streams(after_events, status)`` ends each streamed answer after that many events with the
  API's in-stream error event for ``status`` (an overloaded model mid-answer).

The 429s keep the real APIs' wording ("per minute", ``PerMinute``, RPM) whatever ``window_s`` is: the fakes
compress time, the clients still read the same words; the delays they carry are the real ones.

Every method and property is thread-safe: the HTTP server answers each connection on its own thread.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

DAY_S = 86_400.0


@dataclass(frozen=True)
class Budget:
    """One limit as the rate-limit headers describe it, after the current request."""

    limit: int
    remaining: int
    reset_s: float  # until the limit is whole again


@dataclass(frozen=True)
class Snapshot:
    window: Budget | None
    daily: Budget | None


@dataclass(frozen=True)
class Admitted:
    snapshot: Snapshot


@dataclass(frozen=True)
class Forced:
    """An answer ordered by ``fail_next``."""

    status: int
    retry_after_s: float
    snapshot: Snapshot


@dataclass(frozen=True)
class Unauthorized:
    missing: bool  # no key at all, rather than a key not in ``valid_keys``
    snapshot: Snapshot


@dataclass(frozen=True)
class RateLimited:
    daily: bool
    limit: int
    used: int
    retry_after_s: float
    snapshot: Snapshot


Decision = Admitted | Forced | Unauthorized | RateLimited


@dataclass
class _Window:
    ends_at: float
    count: int = 0


class ProviderState:
    """One provider's knobs and counters (``fakes.gemini``, ``fakes.groq``, ...)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self.valid_keys: set[str] | None = None
        self.delay_s: float = 0.0
        self.stream_gap_s: float = 0.0
        self._stream_gate: tuple[int, threading.Event] | None = None
        self._stream_break: tuple[int, int] | None = None
        self._window_limit: int | None = None
        self._window_s = 60.0
        self._daily_limit: int | None = None
        self._daily_retry_after_s: float | None = None
        self._no_quota: set[tuple[str, str]] = set()  # (key, model)
        self._failures: deque[tuple[int, float]] = deque()
        self._windows: dict[str, _Window] = {}
        self._days: dict[str, float] = {}  # key -> when its "day" ends
        self._daily_used: Counter[str] = Counter()
        self._requests = 0
        self._completed = 0
        self._rate_limited = 0
        self._requests_by_key: Counter[str] = Counter()
        self._rate_limited_by_key: Counter[str] = Counter()
        self._prompts_seen: list[str] = []
        self._prompts_completed: list[str] = []
        self._bodies_seen: list[dict[str, Any]] = []
        self._replies: deque[str] = deque()

    # -- knobs ---------------------------------------------------------------------------------------

    def limit(self, requests: int, window_s: float) -> None:
        """At most ``requests`` admitted requests per key in each fixed window of ``window_s`` s."""
        if requests < 0 or window_s <= 0:
            raise ValueError("limit needs requests >= 0 and window_s > 0")
        with self._lock:
            self._window_limit = requests
            self._window_s = window_s
            self._windows.clear()

    def daily_quota(self, requests: int, *, retry_after_s: float | None = None) -> None:
        """After ``requests`` admitted requests, a key gets the per-day 429 on every request."""
        if requests < 0:
            raise ValueError("daily_quota needs requests >= 0")
        with self._lock:
            self._daily_limit = requests
            self._daily_retry_after_s = retry_after_s

    def no_quota(self, key: str, model: str) -> None:
        """``key`` gets the per-day 429 with a limit of 0 on every request for ``model``."""
        with self._lock:
            self._no_quota.add((key, model))

    def fail_next(self, status: int, count: int = 1, *, retry_after_s: float = 1.0) -> None:
        """The next ``count`` requests answer ``status`` (a 429 says to come back in ``retry_after_s``)."""
        if not 400 <= status <= 599 or count < 0:
            raise ValueError("fail_next needs an error status (4xx or 5xx) and count >= 0")
        with self._lock:
            self._failures.extend([(status, retry_after_s)] * count)

    def reply_with(self, *texts: str) -> None:
        """The next successful answers are these texts, in order (then the usual ones): to drive what a
        provider returns, such as JSON that does not match a schema. Anthropic's forced tool answers
        with the text parsed as its input."""
        with self._lock:
            self._replies.extend(texts)

    def pause_streams(self, after_events: int) -> threading.Event:
        """Hold every streamed answer after ``after_events`` events until the returned event is set."""
        gate = threading.Event()
        with self._lock:
            self._stream_gate = (after_events, gate)
        return gate

    def break_streams(self, after_events: int, status: int) -> None:
        """End every streamed answer after ``after_events`` events with the in-stream error for ``status``."""
        with self._lock:
            self._stream_break = (after_events, status)

    @property
    def stream_break(self) -> tuple[int, int] | None:
        with self._lock:
            return self._stream_break

    @property
    def stream_gate(self) -> tuple[int, threading.Event] | None:
        with self._lock:
            return self._stream_gate

    def reset(self) -> None:
        """Back to the state of a new fake: no limits, no failures, any key, no delay, no counts."""
        with self._lock:
            self._clear()

    # -- counters (snapshots) --------------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """Every request that reached this provider's endpoint."""
        with self._lock:
            return self._requests

    @property
    def completed(self) -> int:
        """Requests answered with success."""
        with self._lock:
            return self._completed

    @property
    def rate_limited(self) -> int:
        """Requests answered 429 (window, daily quota, or ``fail_next(429)``)."""
        with self._lock:
            return self._rate_limited

    @property
    def requests_by_key(self) -> dict[str, int]:
        with self._lock:
            return dict(self._requests_by_key)

    @property
    def rate_limited_by_key(self) -> dict[str, int]:
        with self._lock:
            return dict(self._rate_limited_by_key)

    @property
    def prompts_seen(self) -> list[str]:
        """The prompt of every request whose body could be read, in arrival order."""
        with self._lock:
            return list(self._prompts_seen)

    @property
    def prompts_completed(self) -> list[str]:
        """The prompts answered with success, in the order the answers were sent."""
        with self._lock:
            return list(self._prompts_completed)

    @property
    def bodies_seen(self) -> list[dict[str, Any]]:
        """The JSON body of every request that sent a JSON object, as the SDK sent it, in arrival order."""
        with self._lock:
            return list(self._bodies_seen)

    # -- used by the server --------------------------------------------------------------------------

    def seen(self, body: dict[str, Any]) -> None:
        with self._lock:
            self._bodies_seen.append(body)

    def next_reply(self) -> str | None:
        """The next scripted answer, if a test set one (:meth:`reply_with`)."""
        with self._lock:
            return self._replies.popleft() if self._replies else None

    def admit(self, key: str | None, prompt: str | None, model: str | None = None) -> Decision:
        """Count a request and decide its answer; an admitted request uses up its window and quota."""
        now = time.monotonic()
        who = key or ""
        with self._lock:
            self._requests += 1
            self._requests_by_key[who] += 1
            if prompt is not None:
                self._prompts_seen.append(prompt)
            if self._failures:
                status, retry_after_s = self._failures.popleft()
                if status == 429:
                    self._count_rate_limited(who)
                return Forced(status, retry_after_s, self._snapshot(who, now))
            if key is None or (self.valid_keys is not None and key not in self.valid_keys):
                return Unauthorized(missing=key is None, snapshot=self._snapshot(who, now))
            if (who, model) in self._no_quota:
                self._count_rate_limited(who)
                return RateLimited(
                    daily=True, limit=0, used=0, retry_after_s=DAY_S, snapshot=self._snapshot(who, now)
                )
            if who in self._days and self._days[who] <= now:  # a new "day" for this key
                del self._days[who]
                self._daily_used[who] = 0
            if self._daily_limit is not None and self._daily_used[who] >= self._daily_limit:
                self._count_rate_limited(who)
                delay = self._daily_retry_after_s
                if delay is None:
                    delay = self._days.get(who, now + DAY_S) - now
                return RateLimited(
                    daily=True,
                    limit=self._daily_limit,
                    used=self._daily_used[who],
                    retry_after_s=delay,
                    snapshot=self._snapshot(who, now),
                )
            if self._window_limit is not None:
                window = self._windows.get(who)
                if window is None or now >= window.ends_at:
                    window = self._windows[who] = _Window(ends_at=now + self._window_s)
                if window.count >= self._window_limit:
                    self._count_rate_limited(who)
                    return RateLimited(
                        daily=False,
                        limit=self._window_limit,
                        used=window.count,
                        retry_after_s=window.ends_at - now,
                        snapshot=self._snapshot(who, now),
                    )
                window.count += 1
            self._days.setdefault(who, now + DAY_S)
            self._daily_used[who] += 1
            return Admitted(self._snapshot(who, now))

    def admit_invalid(self, key: str | None) -> Unauthorized | None:
        """Count a request whose body the API refuses; its key is still checked first, as real APIs do."""
        who = key or ""
        with self._lock:
            self._requests += 1
            self._requests_by_key[who] += 1
            if key is None or (self.valid_keys is not None and key not in self.valid_keys):
                return Unauthorized(missing=key is None, snapshot=self._snapshot(who, time.monotonic()))
            return None

    def complete(self, prompt: str) -> None:
        with self._lock:
            self._completed += 1
            self._prompts_completed.append(prompt)

    def _count_rate_limited(self, who: str) -> None:
        self._rate_limited += 1
        self._rate_limited_by_key[who] += 1

    def _snapshot(self, who: str, now: float) -> Snapshot:
        window = None
        if self._window_limit is not None:
            current = self._windows.get(who)
            if current is None or now >= current.ends_at:
                window = Budget(self._window_limit, self._window_limit, 0.0)
            else:
                window = Budget(
                    self._window_limit,
                    max(0, self._window_limit - current.count),
                    current.ends_at - now,
                )
        daily = None
        if self._daily_limit is not None:
            ends_at = self._days.get(who, 0.0)
            used = self._daily_used[who] if ends_at > now else 0
            daily = Budget(self._daily_limit, max(0, self._daily_limit - used), max(0.0, ends_at - now))
        return Snapshot(window=window, daily=daily)
