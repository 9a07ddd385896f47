"""How many tasks were accepted for each provider, kept on the bus as JetStream counters.

The metrics once counted submissions by reading every ``queued`` event back: one more message for the
gateway to take in for each task it had just published, which made it lag behind a stream of batches
(bench/README.md). Now whoever submits adds what JetStream accepted to
``<prefix>.counters.submitted.<provider>`` in ``<PREFIX>_COUNTERS``, a stream of counters
(``allow_msg_counter``: a publish carries ``Nats-Incr: +n``, the server keeps the sum): at once after
a quiet spell, then at most every :data:`FLUSH_S`, one publish per provider with what accumulated
meanwhile. The gateway reads the sums. Gateways and Python clients anywhere
add to the same counters.

A task counts once, when its task message is stored and is not a duplicate: a repeated idempotency key
does not count again, and a task first refused by a full queue counts when it is accepted. A replay
from the dead letters or a move to a fallback is not a submission.

Counts wait in memory until published. An increment that fails is tried again as it was, with the
same ``Nats-Msg-Id``, before any other: one whose ack was lost (it was stored after all) is not added
twice, unless the retry comes after the duplicate window (``HIVE_DUPLICATE_WINDOW_S``). What a
process had not yet published when it died (at most :data:`FLUSH_S` of its submissions, or its counts
during an outage) is not counted; the tasks themselves are not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets

import anyio
import msgspec
import nats.errors
import nats.js.errors

from ._bus import Bus, ensure_counters_stream
from ._errors import HiveError
from ._nats import BUS_ERRORS
from ._nesting import Guarded
from ._size import check_fits

log = logging.getLogger("hive_bus.counts")

FLUSH_S = 0.25  # counts are published at most this often, and at most this long after the submission
RETRY_MAX_S = 30.0  # the longest wait between two tries while the bus does not take them
CLOSE_TIMEOUT_S = 5.0

_BUS_ERRORS = (*BUS_ERRORS, HiveError)


class _Counter(msgspec.Struct, frozen=True):
    val: str


_counter_decoder = Guarded(msgspec.json.Decoder(_Counter), enclosing=1)


class SubmissionCounts:
    """Accepted tasks by provider, added to the bus's counters in the background."""

    def __init__(self, bus: Bus, *, flush_s: float = FLUSH_S) -> None:
        self._bus = bus
        self._flush_s = flush_s
        self._pending: dict[str, int] = {}
        self._sending: tuple[str, int, str] | None = None  # provider, count, Nats-Msg-Id
        self._origin = secrets.token_hex(8)  # with a sequence, the Nats-Msg-Id of each increment
        self._sequence = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._retry_s = 0.0  # 0 while the last publish went through
        self._last_flush = -FLUSH_S  # event-loop time of the last flush
        self._declared = False
        self._closed = False

    def add(self, provider: str, n: int = 1) -> None:
        """``n`` more tasks accepted for ``provider``: published at once or within :data:`FLUSH_S`."""
        if n > 0:
            self._pending[provider] = self._pending.get(provider, 0) + n
            self._schedule()

    @property
    def pending(self) -> int:
        """Accepted tasks not yet added to the counters."""
        return sum(self._pending.values()) + (self._sending[1] if self._sending else 0)

    async def flush(self) -> bool:
        """Publish what is pending now; True when all of it went (what did not is kept)."""
        self._last_flush = asyncio.get_running_loop().time()
        while self._sending is not None or self._pending:
            if self._sending is None:
                # Submissions may add to the pending counts meanwhile: they go in the next increment.
                provider, n = self._pending.popitem()
                self._sending = (provider, n, f"{self._origin}.{next(self._sequence)}")
            provider, n, msg_id = self._sending
            try:
                await self._publish(provider, n, msg_id)
            except _BUS_ERRORS as exc:
                self._retry_s = min(RETRY_MAX_S, 2 * self._retry_s or 1.0)
                level = logging.WARNING if self._retry_s == 1.0 else logging.DEBUG
                log.log(
                    level,
                    "could not add %d accepted tasks to the submission counters (%s); trying again in %gs",
                    self.pending,
                    exc or type(exc).__name__,
                    self._retry_s,
                )
                return False
            self._sending = None
        self._retry_s = 0.0
        return True

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Publish what is left (within ``timeout_s``) and stop."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout_s):
            if self._flushing is not None:
                with contextlib.suppress(Exception):
                    await self._flushing
            await self.flush()
        if self.pending:
            log.warning("%d accepted tasks were not added to the submission counters", self.pending)

    def _schedule(self) -> None:
        if self._timer is None and self._flushing is None and not self._closed:
            loop = asyncio.get_running_loop()
            delay_s = self._retry_s or max(0.0, self._last_flush + self._flush_s - loop.time())
            self._timer = loop.call_later(delay_s, self._start)

    def _start(self) -> None:
        self._timer = None
        self._flushing = asyncio.get_running_loop().create_task(self._flush_in_background())

    async def _flush_in_background(self) -> None:
        try:
            await self.flush()
        except Exception:  # a bug here must not go unseen, nor stop the counting
            log.exception("adding to the submission counters failed")
        finally:
            self._flushing = None
        if self._pending and self._bus.nc.is_closed:  # nothing will take them any more
            log.warning("the connection is closed: %d accepted tasks were not counted", self.pending)
            self._pending.clear()
            self._sending = None
        elif self._pending:
            self._schedule()

    async def _publish(self, provider: str, n: int, msg_id: str) -> None:
        await add(self._bus, self._bus.names.submitted_counter(provider), n, msg_id, declared=self._declared)
        self._declared = True


async def add(bus: Bus, subject: str, n: int, msg_id: str, *, declared: bool = False) -> None:
    """Add ``n`` (negative takes off) to the counter on ``subject``, once per ``msg_id`` within the
    duplicate window. The counters stream is made first unless ``declared`` (and made again, with one
    more try, when it is gone). Raises nats errors and :class:`HiveError`."""
    for first in (True, False):
        if not declared:
            await ensure_counters_stream(bus.js, bus.settings)
            declared = True
        try:
            # No Nats-Expected-Stream: nats-server 2.15 refuses a counter increment that has one.
            headers = {"Nats-Incr": f"{n:+d}", "Nats-Msg-Id": msg_id}
            check_fits(bus.nc, b"", headers, what="counter increment")
            await bus.js.publish(subject, b"", headers=headers)
            return
        except nats.js.errors.NoStreamResponseError:
            if not first:
                raise
            declared = False  # the stream was removed: declared again, then one more try


async def submitted_counts(bus: Bus) -> dict[str, int]:
    """Tasks accepted so far for each provider, as the counters stream holds them (none before the
    stream exists: its first submitter makes it)."""
    return await _counts(bus, bus.names.submitted_counters)


async def unfetched_cancels(bus: Bus) -> dict[str, int]:
    """Each provider's tasks cancelled or expired while queued that no worker has fetched yet
    (hive_bus._cancel)."""
    return await _counts(bus, bus.names.unfetched_cancels_counters)


async def _counts(bus: Bus, subjects: str) -> dict[str, int]:
    """The counters on ``subjects`` (one token a provider, the last), by provider."""
    names = bus.names
    try:
        info = await bus.js.stream_info(names.counters_stream, subjects_filter=subjects)
    except nats.js.errors.NotFoundError:
        return {}
    counts: dict[str, int] = {}
    for subject in info.state.subjects or {}:
        raw = await bus.js.get_msg(names.counters_stream, subject=subject, direct=True)
        try:
            counts[subject.rsplit(".", 1)[1]] = int(_counter_decoder.decode(raw.data or b"").val)
        except (msgspec.DecodeError, ValueError) as exc:
            log.warning("the counter %s does not hold a count: %s", subject, exc)
    return counts
