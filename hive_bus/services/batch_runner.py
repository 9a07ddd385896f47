"""The gateway's batch runner: it drives every batch on the bus through its states, from wherever the
last gateway left it (on start it takes up every batch not ended, and every new one as it is stored).

- ``validating``: every line of the input is checked (a JSON object with a unique ``custom_id``,
  ``method`` POST, ``url`` /v1/chat/completions, a ``body`` that is a chat completion request as
  :func:`openai_chat.parse_request` takes it, for a model :meth:`Catalog.target` knows). A bad line
  fails the batch (``failed``, ``errors.data`` naming the lines), and nothing is queued.
- ``in_progress``: the lines are queued in chunks, each a task whose id is made from the batch and the
  line (:func:`hive_bus._batches.line_task_id`) with the idempotency key ``batch:<id>:<line>``; after each
  chunk the lines queued so far are recorded in the batch (``enqueued``), so a gateway killed half-way
  resumes after them, and the chunk it was queueing is looked up task by task before it is queued again
  (past the de-duplication window too, no line runs twice). Meanwhile the tasks' final events are
  followed (one consumer of the events stream, not a read per task) into ``request_counts``.
- ``finalizing`` (or ``cancelling``, or past the window): the unfinished lines are cancelled when the batch
  is stopped, and once every queued line has ended the output and error files are written: the events
  are read again into a spooled file of records, then the input is read in order beside it, so that the
  output is in input order and no file is held whole in memory.

Why about 750 lines: the batch's states and every move between them (each a compare-and-set of its
record) are in one class, :class:`BatchRunner`, so that they read together; what holds no state (reading
the input, checking lines, following the final events) comes first as functions and types of its own.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import anyio
import msgspec
import nats.errors
from anyio.abc import TaskGroup, TaskStatus
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from hive_bus import Hive, HiveError, TaskNotFound, _cancel
from hive_bus._assigned import Assignments, current_view
from hive_bus._batches import (
    ENDPOINT,
    MAX_LISTED_ERRORS,
    Batch,
    BatchError,
    BatchErrors,
    BatchNotFound,
    BatchStore,
    LineIds,
    RequestCounts,
    estimate,
    line_task_id,
    now_s,
    replace,
    window_s,
)
from hive_bus._budget import BudgetError, ProviderBudget, load_budgets
from hive_bus._bus import Bus, event_providers
from hive_bus._events import merged_events
from hive_bus._files import FileNotFound, FileStore, Upload
from hive_bus._messages import Completed, Failed, TaskRequest, TaskView, event_decoder
from hive_bus._nats import BUS_ERRORS, unsubscribe
from hive_bus._routes import Target

from .openai_chat import Catalog, OpenAIError, completion_of, failure_of, parse_request, task_for

log = logging.getLogger("hive_bus.batches")

# lines looked up at once when a resumed enqueue checks which of its chunk are on the bus already
LOOKUP_WINDOW = 64
# how often the counts of a running batch are written to its state
COUNTS_EVERY_S = 1.0
# a runner that met an error (the bus away) tries again after this long
RETRY_S = 2.0
RATE_WINDOW_S = 60.0
# how often a batch's lines of which no event was read (their events evicted) are looked up: first,
# then at most (the wait doubles while some are left)
EVICTED_LOOK_S = 2.0
EVICTED_LOOK_MAX_S = 120.0
# how often a gateway looks for the batches bucket while the bus has none (its creation's advisory aside)
BUCKET_LOOK_S = 30.0


class BatchLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a batch input file, as OpenAI's Batch API takes it."""

    custom_id: str
    method: str
    url: str
    body: msgspec.Raw


_line_decoder = msgspec.json.Decoder(BatchLine)
_object_decoder = msgspec.json.Decoder(dict[str, Any])


class Record(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A line's end, spooled while finalizing: a response (to the output file, or to the error file
    when it is an error), or an error of the batch's own (the line never ran)."""

    task_id: str
    ok: bool = False
    response: Any = None
    error: Any = None


class OutputLine(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    custom_id: str
    response: Any = None
    error: Any = None


_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(Record)
# Characters JSON carries raw in a string that Python's str.splitlines() (and other readers) take for a
# line's end: written as escapes, so that an output line is one line to any reader of JSON Lines. In
# UTF-8 these bytes are only ever these characters (a lead byte never continues another character).
_LINE_BREAKS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))


def _jsonl_line(value: Any) -> bytes:
    """``value`` as one line of JSON Lines, its newline included."""
    encoded = _record_encoder.encode(value)
    for raw, escaped in _LINE_BREAKS:
        encoded = encoded.replace(raw, escaped)
    return encoded + b"\n"


async def input_lines(files: FileStore, file_id: str) -> AsyncIterator[tuple[int, bytes]]:
    """The non-blank lines of a file with their line numbers (1 for the first, blank lines counted as an
    editor does), read in chunks."""
    _, chunks = await files.read(file_id)
    number = 0
    partial = b""
    async for chunk in chunks:
        *complete, partial = (partial + chunk).split(b"\n")
        for line in complete:
            number += 1
            if line.strip():
                yield number, line
    if partial.strip():
        yield number + 1, partial


def _error(line: int, message: str, code: str = "invalid_request", param: str | None = None) -> BatchError:
    return BatchError(code=code, message=f"line {line}: {message}", param=param, line=line)


class Validation:
    """The checks of one batch's lines, and the targets of the models they name (kept for queueing)."""

    def __init__(self, catalog: Catalog, model: str | None, max_line_bytes: int) -> None:
        self._catalog = catalog
        self._model = model
        self._max_line_bytes = max_line_bytes
        self.targets: dict[str, Target] = {}
        self._custom_ids: set[str] = set()

    async def task(self, number: int, raw: bytes, batch_id: str, index: int) -> TaskRequest:
        """The task of one line, or :class:`LineError` saying what is wrong with it."""
        if len(raw) > self._max_line_bytes:  # the bus could not carry its task
            limit = self._max_line_bytes
            raise LineError(
                _error(number, f"{len(raw)} bytes, more than a task may carry ({limit})", "too_large")
            )
        try:
            line = _line_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise LineError(_error(number, f"not a batch request line ({exc})")) from None
        if line.method.upper() != "POST":
            raise LineError(_error(number, f"method {line.method!r}: only POST", param="method"))
        if line.url != ENDPOINT:
            raise LineError(_error(number, f"url {line.url!r}: only {ENDPOINT}", param="url"))
        body = bytes(line.body)
        if self._model is not None:  # the batch's model for every line (a line may then name none)
            fields = _object_decoder.decode(body) if body.lstrip().startswith(b"{") else None
            if fields is not None:
                body = msgspec.json.encode({**fields, "model": self._model})
        try:
            chat = parse_request(body)
            if chat.stream:
                raise OpenAIError(400, "a batch line cannot stream (`stream`)", param="stream")
            target = self.targets.get(chat.model)
            if target is None:
                target = self.targets[chat.model] = await self._catalog.target(chat.model)
            task = task_for(chat, target, idempotency_key=f"batch:{batch_id}:{index}")
        except OpenAIError as exc:
            detail = exc.body.error
            param = f"body.{detail.param}" if detail.param else "body"
            raise LineError(_error(number, detail.message, detail.code or "invalid_request", param)) from None
        metadata = {**task.metadata, "batch_id": batch_id, "custom_id": line.custom_id, "line": index}
        return msgspec.structs.replace(task, metadata=metadata)

    def unique(self, number: int, raw: bytes) -> None:
        try:
            custom_id = _line_decoder.decode(raw).custom_id
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # said by task()
        if custom_id in self._custom_ids:
            raise LineError(
                _error(number, f"custom_id {custom_id!r} is used by an earlier line", "duplicate_custom_id")
            )
        self._custom_ids.add(custom_id)


class LineError(Exception):
    def __init__(self, error: BatchError) -> None:
        super().__init__(error.message)
        self.error = error


def _deadline_s(batch: Batch) -> float:
    """Seconds until the batch's window closes (may be negative)."""
    return batch.created_at_ms / 1000 + window_s(batch.completion_window) - time.time()


class Ended:
    """Which lines of a batch have ended, read from the tasks' final events: counts and a rate."""

    def __init__(self, batch: Batch) -> None:
        self.lines = bytearray(batch.request_counts.total)  # 0 open, 1 completed, 2 failed, 3 cancelled
        self.completed = self.failed = self.cancelled = 0
        self._times: deque[float] = deque()

    @property
    def count(self) -> int:
        return self.completed + self.failed + self.cancelled

    def add(self, line: int, status: str) -> bool:
        if self.lines[line]:
            return False  # a line's first end is its end
        if status == "completed":
            self.lines[line], self.completed = 1, self.completed + 1
        elif status in ("failed", "evicted"):  # evicted: ended, and how is no longer known
            self.lines[line], self.failed = 2, self.failed + 1
        else:
            self.lines[line], self.cancelled = 3, self.cancelled + 1
        now = anyio.current_time()
        self._times.append(now)
        while self._times and self._times[0] < now - RATE_WINDOW_S:
            self._times.popleft()
        return True

    def per_minute(self) -> float:
        now = anyio.current_time()
        while self._times and self._times[0] < now - RATE_WINDOW_S:
            self._times.popleft()
        return float(len(self._times)) * 60.0 / RATE_WINDOW_S


async def follow_ends(
    hive: Hive,
    batch: Batch,
    on_end: Callable[[int, str, bytes, str], Awaitable[None]],
    on_caught_up: Callable[[], None] | None = None,
) -> None:
    """Call ``on_end(line, status, event data, subject)`` for each of the batch's tasks' final events
    recorded under the provider the task is assigned to, from the batch's creation on, and
    ``on_caught_up()`` each time every event stored so far has been read; forever (the caller stops it).
    One ordered consumer a provider's events stream, filtered by the server on the events that matter.

    A line queued before this call (``batch.enqueued``) of which no event at all is read once the reader
    has caught up had its events evicted (``HIVE_EVENTS_MAX_BYTES``): it is looked up, and one whose task
    has ended (``evicted``: its worker acked it) ends as ``on_end(line, "evicted", why, "")``: a look-up
    a line, of those lines only."""
    bus, names = hive.bus, hive.bus.names
    ids = LineIds(batch)
    assigned = Assignments(bus, size=max(10_000, batch.request_counts.total + 1))
    # lines queued before, of which no event was read yet: 1 (a byte a line, as Ended keeps them)
    unread = bytearray(b"\x01" * batch.enqueued + b"\x00" * (batch.request_counts.total - batch.enqueued))
    statuses = ("queued", "moved", "completed", "failed", "cancelled")
    since = datetime.fromtimestamp(batch.created_at_ms / 1000, UTC) - timedelta(seconds=1)

    def config(provider: str) -> ConsumerConfig:
        return ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=since,
            filter_subjects=[names.event_subject(provider, "*", status) for status in statuses],
        )

    # by provider, how many of its events were left to read when its last one read was
    left: dict[str, int] = {}

    async def caught_up() -> bool:
        """Whether every event stored so far is read: of each stream read from, and none stored in a
        stream nothing was read from yet (its first would come)."""
        if any(left.values()):
            return False
        for provider in await event_providers(bus):
            if provider not in left and await _stored(bus, provider, config(provider)):
                return False
        return True

    async def look_up_unread() -> None:
        """The lines of which no event was read, once the reader has caught up: ended ones whose events
        were evicted end now; the others (a marker lost, its task still queued) are looked up again,
        less and less often."""
        wait_s = EVICTED_LOOK_S
        while any(unread):
            await anyio.sleep(wait_s)
            try:
                if not await caught_up():
                    continue
                wait_s = min(2 * wait_s, EVICTED_LOOK_MAX_S)
                for line in [i for i, flag in enumerate(unread) if flag]:
                    await look_up(line)
                if on_caught_up is not None:
                    on_caught_up()  # with the ends looked up: no event may come to say so
            except (HiveError, *BUS_ERRORS) as exc:  # the bus away: the next pass looks again
                log.debug("batch %s: could not look up its unread lines: %s", batch.id, exc)

    async def look_up(line: int) -> None:
        task_id = line_task_id(batch, line)
        try:
            view = await hive.get(task_id)
        except TaskNotFound:
            return  # its message gone too (aged out, or lost: the store audit records it)
        if view.status == "evicted" and unread[line]:
            unread[line] = 0
            await on_end(line, "evicted", f"task {task_id}: {view.error}".encode(), "")

    async with anyio.create_task_group() as tg, merged_events(bus, names.events_under, config) as received:
        tg.start_soon(look_up_unread)
        async for msg in received:
            tokens = msg.subject.split(".")
            line = ids.line_of(tokens[3]) if len(tokens) == 5 else None
            # an end counts once its task is assigned to the provider that recorded it; the queued and
            # moved events tell where it is
            if line is not None and await assigned.counts(msg.subject):
                unread[line] = 0
                if tokens[4] in ("completed", "failed", "cancelled"):
                    await on_end(line, tokens[4], msg.data, msg.subject)
            left[tokens[2]] = msg.metadata.num_pending
            if on_caught_up is not None and msg.metadata.num_pending == 0:
                with contextlib.suppress(*BUS_ERRORS):
                    if await caught_up():
                        on_caught_up()


async def _stored(bus: Bus, provider: str, config: ConsumerConfig) -> int:
    """How many events of ``provider``'s stream a consumer of ``config`` has to read: a throwaway
    one's pending count (the server's index of subjects tells it, no message read)."""
    stream = bus.names.events_stream_of(provider)
    config = dataclasses.replace(config, ack_policy=AckPolicy.NONE, inactive_threshold=5.0, mem_storage=True)
    info = await bus.js.add_consumer(stream, config)
    with anyio.CancelScope(shield=True), anyio.move_on_after(2), contextlib.suppress(*BUS_ERRORS):
        await bus.js.delete_consumer(stream, info.name)
    return int(info.num_pending or 0)


def _first(group: BaseExceptionGroup[HiveError]) -> HiveError:
    """The first error of ``group``, however deep: one raised in a task group inside the step's comes in
    a group of its own, whose message says only how many it holds."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


class BatchRunner:
    """Drives every batch of the bus: ``await tg.start(runner.run)``."""

    def __init__(self, hive: Hive, catalog: Catalog) -> None:
        self._hive = hive
        self._catalog = catalog
        self._running: set[str] = set()
        self._store: BatchStore | None = None
        self._files: FileStore | None = None
        # one gateway at a time runs a batch: the one whose lease (renewed every third of it) is on it
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._lease_s = hive.bus.settings.batch_lease_s
        settings = hive.bus.settings
        # the budgets the estimate reads; a budget the workers cannot use either is none for it
        try:
            self._budgets = load_budgets(settings.budgets_file, settings.budgets)
        except BudgetError as exc:
            log.warning("batch estimates leave the budgets out: %s", exc)
            self._budgets = {}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:  # the bus away at start, or the watch lost: never the gateway's end
            try:
                await self._watch()
            except (*BUS_ERRORS, HiveError) as exc:
                log.warning("batches: %s; watching again in %gs", exc, RETRY_S)
            await anyio.sleep(RETRY_S)

    async def _watch(self) -> None:
        """Run every batch not ended that the batches bucket holds, and each one stored later."""
        store = self._store = await self._batches_bucket()
        watcher = await store.kv.watchall()
        try:
            async with anyio.create_task_group() as tg:
                async for entry in watcher:
                    if entry is None or entry.value is None or entry.operation is not None:
                        continue  # the end of the initial values, or a delete
                    try:
                        batch = msgspec.json.decode(entry.value, type=Batch)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        log.warning("batch %s does not decode; left alone", entry.key)
                        continue
                    if not batch.done and batch.id not in self._running:
                        self._running.add(batch.id)
                        tg.start_soon(self._drive, tg, batch.id)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(*BUS_ERRORS):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _batches_bucket(self) -> BatchStore:
        """The batches bucket once it exists. A bus that has never had a batch has none, and this
        gateway does not make one (nor the files bucket) just to watch it: JetStream's advisory of the
        bucket's stream being created says when to look (a look every BUCKET_LOOK_S in case it is missed)."""
        bus = self._hive.bus
        created = f"$JS.EVENT.ADVISORY.STREAM.CREATED.KV_{bus.names.batches_bucket}"
        sub = await bus.nc.subscribe(created)
        try:
            while True:
                store = await BatchStore.find(bus)
                if store is not None:
                    await store.keep_newest()  # a bucket made before it let its oldest records go
                    return store
                with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                    await sub.next_msg(timeout=BUCKET_LOOK_S)
        finally:
            await unsubscribe(sub)

    async def _file_store(self) -> FileStore:
        if self._files is None:
            self._files = await FileStore.open(self._hive.bus)
        return self._files

    async def _drive(self, tg: TaskGroup, batch_id: str) -> None:
        """Run one batch while this gateway holds its lease; wait out another gateway's."""
        assert self._store is not None
        try:
            while True:
                error: Exception | None = None
                gone = False
                try:
                    await self._file_store()
                    if await self._step(batch_id):
                        return
                except* BatchNotFound:  # deleted from the bucket: nothing left to run
                    gone = True
                except* HiveError as group:  # the bus away, a model gone: try again
                    error = _first(group)
                    log.warning("batch %s: %s; trying again in %gs", batch_id, error, RETRY_S)
                except* Exception as group:  # never the gateway's end: logged, and tried again later
                    error = group
                    log.error("batch %s failed; trying again in %gs", batch_id, 10 * RETRY_S, exc_info=group)
                if gone:
                    return
                if error is not None:
                    await anyio.sleep(RETRY_S if isinstance(error, HiveError) else 10 * RETRY_S)
        finally:
            self._running.discard(batch_id)

    async def _step(self, batch_id: str) -> bool:
        """One phase of the batch under this gateway's lease, or a wait for another's; True once it has
        ended."""
        assert self._store is not None
        batch, _ = await self._store.change(batch_id, self._claim)
        if batch.done:
            return True
        if batch.driver != self.id:  # another gateway's, while it renews it
            await anyio.sleep(max(0.0, batch.driver_until_ms / 1000 - time.time()) + RETRY_S / 4)
            return False
        async with anyio.create_task_group() as phase:
            phase.start_soon(self._renew, batch_id, phase.cancel_scope)
            await self._phase(batch)
            phase.cancel_scope.cancel()
        return False

    async def _phase(self, batch: Batch) -> None:
        try:
            if batch.status == "validating":
                await self._validate(batch)
            elif batch.status == "in_progress":
                await self._run_lines(batch)
            else:  # finalizing, cancelling
                await self._finalize(batch)
        except* FileNotFound as group:  # the one file a batch reads is its input
            await self._input_gone(batch, group.exceptions[0])

    async def _input_gone(self, batch: Batch, exc: BaseException) -> None:
        """The input file gone before the batch ended (deleted by a gateway that did not refuse it, or
        in a race with the refusal's check): no output can be written in input order without it, so the
        batch fails, its lines not ended cancelled, rather than trying again for ever."""
        assert self._store is not None
        await self._hive.cancel_where(
            metadata={"batch_id": batch.id}, reason=f"batch {batch.id} failed: its input file is gone"
        )
        error = BatchError(
            code="input_file_missing",
            message=f"the input file was deleted before the batch ended ({exc}); the tasks of its lines "
            f"are listed by GET /v1/tasks?batch={batch.id}",
            param="input_file_id",
        )
        at = now_s()

        def failed(now: Batch) -> Batch | None:
            if now.done:
                return None
            return replace(now, status="failed", failed_at=at, errors=BatchErrors(data=[error]))

        _, changed = await self._store.change(batch.id, failed)
        if changed:
            log.warning("batch %s failed: %s", batch.id, error.message)

    def _claim(self, now: Batch) -> Batch | None:
        """The batch with this gateway's lease on it (taken when free or expired, else renewed)."""
        at_ms = int(time.time() * 1000)
        if now.done or (now.driver not in (None, self.id) and now.driver_until_ms > at_ms):
            return None
        return replace(now, driver=self.id, driver_until_ms=at_ms + int(self._lease_s * 1000))

    async def _renew(self, batch_id: str, scope: anyio.CancelScope) -> None:
        """Renew the lease every third of it; stop the phase when it was lost (this gateway was cut off
        from the bus for longer than the lease, and another took the batch)."""
        assert self._store is not None
        while True:
            await anyio.sleep(self._lease_s / 3)
            batch, _ = await self._store.change(batch_id, self._claim)
            if batch.driver != self.id and not batch.done:
                log.warning("batch %s: another gateway holds it now; this one stops", batch_id)
                scope.cancel()
                return

    # validating ----------------------------------------------------------------------------------

    async def _validate(self, batch: Batch) -> None:
        assert self._store is not None and self._files is not None
        check = Validation(self._catalog, batch.model, self._hive.bus.settings.blob_max_bytes)
        errors: list[BatchError] = []
        bad = total = 0
        async for number, raw in input_lines(self._files, batch.input_file_id):
            try:
                check.unique(number, raw)
                await check.task(number, raw, batch.id, total)
            except LineError as exc:
                bad += 1
                if len(errors) < MAX_LISTED_ERRORS:
                    errors.append(exc.error)
            total += 1
        at = now_s()

        def validated(now: Batch) -> Batch | None:
            if now.status != "validating":
                return None  # cancelled meanwhile, or another gateway was first
            counts = RequestCounts(total=total)
            routes_to = [
                f"{t.provider}:{t.model}" if t.model else t.provider for t in check.targets.values()
            ] + [f for t in check.targets.values() for f in t.fallback]
            if errors:
                log.info("batch %s failed validation: %d bad lines of %d", batch.id, bad, total)
                return replace(
                    now, status="failed", failed_at=at, errors=BatchErrors(data=errors), request_counts=counts
                )
            return replace(
                now, status="in_progress", in_progress_at=at, request_counts=counts, routes_to=routes_to
            )

        await self._store.change(batch.id, validated)

    # in_progress ---------------------------------------------------------------------------------

    async def _run_lines(self, batch: Batch) -> None:
        assert self._store is not None
        store = self._store
        ended = Ended(batch)
        all_ended = anyio.Event()

        async def on_end(line: int, status: str, data: bytes, subject: str) -> None:
            if ended.add(line, status) and ended.count >= batch.request_counts.total:
                all_ended.set()

        async def write_counts() -> None:
            while True:
                await anyio.sleep(COUNTS_EVERY_S)
                await store.change(batch.id, lambda now: _counted(now, ended, self._budgets))

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow_ends, self._hive, batch, on_end)
            tg.start_soon(write_counts)
            with anyio.move_on_after(max(0.0, _deadline_s(batch))) as window:
                stopped = await self._enqueue(batch)
                if not stopped:
                    await _until(all_ended, store, batch.id)
            tg.cancel_scope.cancel()
        ending = "completed"
        if window.cancelled_caught:
            ending = "expired"

        def finalizing(now: Batch) -> Batch | None:
            if now.status != "in_progress":
                return None  # cancelling, or finalizing by another gateway
            counted = _counted(now, ended, self._budgets) or now
            return replace(
                counted,
                status="finalizing",
                finalizing_at=now_s(),
                expired_at=now_s() if ending == "expired" else None,
            )

        await store.change(batch.id, finalizing)

    async def _enqueue(self, batch: Batch) -> bool:
        """Queue the lines not queued yet, chunk by chunk, recording after each. True when the batch
        was stopped (cancelled) before all were queued."""
        assert self._store is not None and self._files is not None
        store, files = self._store, self._files
        check = Validation(self._catalog, batch.model, self._hive.bus.settings.blob_max_bytes)
        start = batch.enqueued

        chunk: list[tuple[int, TaskRequest]] = []
        first = True
        index = 0

        async def flush() -> bool:
            nonlocal first, chunk
            now = await store.get(batch.id)
            if now.status != "in_progress":
                return True
            todo = chunk
            if first:  # queued perhaps before a restart that lost its record: look each up
                todo = await self._not_on_bus(batch, chunk)
                first = False
            requests = [request for _, request in todo]
            ids = [line_task_id(batch, line) for line, _ in todo]
            for outcome in await self._hive.submit_batch(requests, task_ids=ids) if requests else []:
                if isinstance(outcome, HiveError):
                    raise outcome
            done_to = chunk[-1][0] + 1
            await store.change(
                batch.id, lambda now: replace(now, enqueued=done_to) if now.enqueued < done_to else None
            )
            chunk = []
            return False

        async for number, raw in input_lines(files, batch.input_file_id):
            if index >= start:
                try:
                    chunk.append((index, await check.task(number, raw, batch.id, index)))
                except LineError as exc:  # a model gone since validation: the line waits for it
                    raise HiveError(f"line {number} cannot be queued now: {exc}") from None
                if len(chunk) >= self._hive.bus.settings.batch_chunk_lines and await flush():
                    return True
            index += 1
        return bool(chunk) and await flush()

    async def _not_on_bus(
        self, batch: Batch, chunk: list[tuple[int, TaskRequest]]
    ) -> list[tuple[int, TaskRequest]]:
        """The lines of ``chunk`` whose tasks are not on the bus. A submission stores the task alone
        now; a gateway of an older hive-bus stored its ``queued`` event, then the task: a line whose task
        went no further than that event is on the bus only if its message is in the queue (one pass
        over the queue finds those), else it was cut off between the two and is queued again."""
        bus = self._hive.bus
        status: dict[int, str] = {}
        limit = anyio.Semaphore(LOOKUP_WINDOW)

        async def look(line: int) -> None:
            async with limit:
                view = await current_view(bus, line_task_id(batch, line))
                if view is not None:
                    status[line] = view.status

        async with anyio.create_task_group() as tg:
            for line, _ in chunk:
                tg.start_soon(look, line)
        in_queue: dict[str, int] = {}
        if any(s == "queued" for s in status.values()):
            in_queue = await _cancel.queued(bus, metadata={"batch_id": batch.id})

        def on_bus(line: int) -> bool:
            if line not in status:
                return False
            return status[line] != "queued" or line_task_id(batch, line) in in_queue

        return [(line, request) for line, request in chunk if not on_bus(line)]

    # finalizing ----------------------------------------------------------------------------------

    async def _finalize(self, batch: Batch) -> None:
        assert self._store is not None and self._files is not None
        stopping = batch.status == "cancelling" or batch.expired_at is not None
        if stopping:
            await self._hive.cancel_where(
                metadata={"batch_id": batch.id}, reason=f"batch {batch.id} {batch.status}"
            )
        batch = await self._store.get(batch.id)
        if not batch.request_counts.total:  # stopped before its lines were counted: nothing ran
            await self._store.change(batch.id, _stopped_empty)
            return
        expected = batch.request_counts.total if not stopping else batch.enqueued
        with tempfile.TemporaryFile() as spool:
            spans = array.array("q", [-1]) * (2 * batch.request_counts.total)
            counts = await self._spool_ends(batch, spool, spans, expected)
            output, errors = await self._write_files(batch, spool, spans)
        ending = (
            "cancelled" if batch.status == "cancelling" else "expired" if batch.expired_at else "completed"
        )
        at = now_s()

        def ended(now: Batch) -> Batch | None:
            if now.status not in ("finalizing", "cancelling"):
                return None
            times = {"cancelled": "cancelled_at", "expired": "expired_at", "completed": "completed_at"}
            return replace(
                now, status=ending, output_file_id=output, error_file_id=errors,
                request_counts=counts, **{times[ending]: getattr(now, times[ending]) or at},
            )  # fmt: skip

        _, changed = await self._store.change(batch.id, ended)
        if not changed:  # another gateway finished it first: its files are the batch's
            for file_id in (output, errors):
                if file_id is not None:
                    with contextlib.suppress(HiveError):
                        await self._files.delete(file_id)
        else:
            log.info(
                "batch %s %s: %d completed, %d failed", batch.id, ending, counts.completed, counts.failed
            )

    async def _spool_ends(
        self, batch: Batch, spool: IO[bytes], spans: array.array[int], expected: int
    ) -> RequestCounts:
        """Each line's end as a record in ``spool``, its place in ``spans``; once ``expected`` lines
        have ended (all of them, or those queued when the batch was stopped)."""
        ended = Ended(batch)
        enough = anyio.Event()
        if expected <= 0:
            return RequestCounts(total=batch.request_counts.total)

        async def on_end(line: int, status: str, data: bytes, subject: str) -> None:
            if not ended.add(line, status):
                return
            record = await self._record(batch, line, status, data)
            encoded = _record_encoder.encode(record)
            spans[2 * line], spans[2 * line + 1] = spool.tell(), len(encoded)
            spool.write(encoded)

        def caught_up() -> None:
            # every event stored so far read: lines queued past the record of a killed gateway have
            # ended too (or are still running, and come after), not only the ``expected`` ones
            if ended.count >= expected:
                enough.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow_ends, self._hive, batch, on_end, caught_up)
            await enough.wait()
            tg.cancel_scope.cancel()
        return RequestCounts(total=batch.request_counts.total, completed=ended.completed, failed=ended.failed)

    async def _record(self, batch: Batch, line: int, status: str, data: bytes) -> Record:
        task_id = line_task_id(batch, line)
        if status == "evicted":  # ``data`` says so (follow_ends): how it ended is no longer kept
            return Record(task_id=task_id, error={"code": "task_evicted", "message": data.decode()})
        try:
            event = event_decoder.decode(data)
        except msgspec.DecodeError:
            return Record(
                task_id=task_id, error={"code": "undecodable", "message": "the task's end did not decode"}
            )
        if isinstance(event, Completed):
            view = await self._hive._read_output(TaskView.of(event))
            if view.error is None:
                response = {"status_code": 200, "request_id": task_id, "body": completion_of(view)}
                return Record(task_id=task_id, ok=True, response=msgspec.to_builtins(response))
            event = Failed(
                task_id=task_id,
                provider=view.provider,
                at_ms=view.updated_at_ms,
                attempt=view.attempt,
                worker=None,
                reason="lost",
                error=view.error,
            )
        if isinstance(event, Failed):
            error = failure_of(TaskView.of(event))
            response = {"status_code": error.status, "request_id": task_id, "body": error.body}
            return Record(task_id=task_id, response=msgspec.to_builtins(response))
        if batch.status == "cancelling" or batch.expired_at is not None:
            why = "cancelled" if batch.status == "cancelling" else "expired"
            message = f"the batch was {why} before this request ended"
            return Record(task_id=task_id, error={"code": f"batch_{why}", "message": message})
        # the batch neither cancelled nor expired: the line's own task was (POST /v1/tasks/{id}/cancel)
        view = TaskView.of(event)
        message = f"task {task_id} of this request was cancelled before it ended: {view.error or view.reason}"
        return Record(task_id=task_id, error={"code": "request_cancelled", "message": message})

    async def _write_files(
        self, batch: Batch, spool: IO[bytes], spans: array.array[int]
    ) -> tuple[str | None, str | None]:
        """The output and error files, in input order: the input read again beside the spooled records."""
        assert self._files is not None
        output = Upload(f"{batch.id}_output.jsonl", "batch_output")
        errors = Upload(f"{batch.id}_error.jsonl", "batch_output")
        try:
            line = 0
            async for _, raw in input_lines(self._files, batch.input_file_id):
                custom_id = str(_object_decoder.decode(raw).get("custom_id", ""))
                task_id = line_task_id(batch, line)
                at, size = spans[2 * line], spans[2 * line + 1]
                if at < 0:
                    why = "cancelled" if batch.status == "cancelling" else "expired"
                    record = Record(
                        task_id=task_id,
                        error={
                            "code": f"batch_{why}",
                            "message": f"the batch was {why} before this request ran",
                        },
                    )
                else:
                    spool.seek(at)
                    record = _record_decoder.decode(spool.read(size))
                    spool.seek(0, 2)
                out = OutputLine(
                    id=f"batch_req_{task_id}",
                    custom_id=custom_id,
                    response=record.response,
                    error=record.error,
                )
                (output if record.ok else errors).write(_jsonl_line(out))
                line += 1
            output_id = (await self._files.put(output)).id if output.check.size_bytes else None
            error_id = (await self._files.put(errors)).id if errors.check.size_bytes else None
            return output_id, error_id
        finally:
            output.close()
            errors.close()


def _stopped_empty(now: Batch) -> Batch | None:
    if now.status != "cancelling":
        return None
    return replace(now, status="cancelled", cancelled_at=now_s())


def _counted(now: Batch, ended: Ended, budgets: dict[str, ProviderBudget]) -> Batch | None:
    """The batch with the counts and rate read so far, when they are ahead of what it holds."""
    if now.status not in ("in_progress", "cancelling"):
        return None
    counts = RequestCounts(total=now.request_counts.total, completed=ended.completed, failed=ended.failed)
    held = now.request_counts
    if counts.completed + counts.failed < held.completed + held.failed:
        counts = held  # another gateway has read further
    left = now.request_counts.total - ended.count
    progress = estimate(left, ended.per_minute(), now.routes_to, budgets, now_s=time.time())
    changed = replace(now, request_counts=counts, progress=progress)
    return None if changed == now else changed


async def _until(event: anyio.Event, store: BatchStore, batch_id: str) -> None:
    """Wait for ``event``, or for the batch to be stopped (cancelled) meanwhile: a watch of its key."""
    async with anyio.create_task_group() as tg:

        async def stopped() -> None:
            watcher = await store.kv.watch(batch_id)
            try:
                async for entry in watcher:
                    if entry is None or entry.value is None:
                        continue
                    if msgspec.json.decode(entry.value, type=Batch).status != "in_progress":
                        tg.cancel_scope.cancel()
                        return
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(*BUS_ERRORS):
                    await watcher.stop()  # type: ignore[no-untyped-call]

        tg.start_soon(stopped)
        await event.wait()
        tg.cancel_scope.cancel()
