"""Batches (OpenAI's Batch API) as objects of the bus: a batch's definition and state live in the KV
bucket ``<prefix>_batches`` (one key per batch), its input, output and error files in the file store
(:mod:`hive_bus._files`), and its lines run as ordinary tasks.

Every change of a batch is a compare-and-set on its key's revision (:meth:`BatchStore.change`), so two
gateways driving the same batch never both make one transition: the second sees the first's state and
moves on from there.

Each line's task has an id made from the batch and the line (:func:`line_task_id`): a ULID whose time is
the batch's creation and whose random part is 40 bits of the batch id's hash and 40 bits of the line
number. So a final event on the bus says by its subject alone which batch and line it ends; no map from
task to line is kept anywhere; and a line enqueued twice (a gateway killed half-way, then restarted)
is the same task twice, which the tasks stream de-duplicates.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import nats.js.errors
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from ulid import ULID

from ._budget import ProviderBudget
from ._bus import Bus, kv_entries
from ._errors import BusUnavailable, HiveError
from ._nats import BUS_ERRORS, why

log = logging.getLogger("hive_bus.batches")

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
FINAL_STATUSES: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})
ENDPOINT = "/v1/chat/completions"
# the batch objects' bucket: small values (a batch's state, about 1 KB), the newest some thousands kept
BATCHES_MAX_BYTES = 8 * 1024**2
BATCH_VALUE_MAX_BYTES = 256 * 1024
# errors.data lists at most this many bad lines (the first ones): the value must fit the bucket
MAX_LISTED_ERRORS = 100
# a completion window: a number and a unit, s, m or h (OpenAI takes only "24h"), from 1 s to 7 days
_WINDOW_RE = re.compile(r"^([1-9][0-9]{0,6})([smh])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW_S = 7 * 86400
_BATCH_ID_RE = re.compile(r"^batch_[0-9a-f]{24}$")


class BatchNotFound(HiveError):
    """No batch of that id."""


class BadBatch(HiveError):
    """A batch request that cannot be taken; the message names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestCounts(msgspec.Struct, frozen=True, kw_only=True):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(msgspec.Struct, frozen=True, kw_only=True):
    """One error of a batch, as OpenAI lists them: ``line`` is the input line (1 for the first)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(msgspec.Struct, frozen=True, kw_only=True):
    object: str = "list"
    data: list[BatchError] = []


class BatchProgress(msgspec.Struct, frozen=True, kw_only=True):
    """Ours, beside OpenAI's fields (its SDK ignores unknown fields): lines ended in the last minute,
    and when the rest should end at that rate and within the providers' configured budgets."""

    per_minute: float = 0.0
    estimated_finish_at: int | None = None
    # why the estimate is what it is ("at 15 a minute and 1,500 a day (gemini): ...")
    basis: str | None = None


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """A batch as OpenAI's API describes it, with the bus's own fields after OpenAI's."""

    id: str
    object: str = "batch"
    endpoint: str = ENDPOINT
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = RequestCounts()
    metadata: dict[str, str] | None = None
    # ours: the creation in milliseconds (the time part of every line's task id), the lines queued so
    # far in input order (where an enqueue cut off resumes), the model every line is sent to instead
    # of its own (``hive batch create --model``), and the progress estimate
    created_at_ms: int = 0
    enqueued: int = 0
    model: str | None = None
    progress: BatchProgress | None = None
    # where the lines go: each target's provider (or provider:model) and its fallbacks, for the estimate
    routes_to: list[str] = []
    # the gateway running the batch, and until when its lease holds (it renews it while it runs)
    driver: str | None = None
    driver_until_ms: int = 0

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATUSES


class BatchList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[Batch]
    object: str = "list"
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


_decoder = msgspec.json.Decoder(Batch)
_encoder = msgspec.json.Encoder()


def window_s(window: str) -> int:
    """The seconds of a completion window: ``"24h"`` as OpenAI takes it, or any ``<n>s``, ``<n>m`` or
    ``<n>h`` from 1 s to 7 days. Raises :class:`BadBatch` naming ``completion_window``."""
    match = _WINDOW_RE.match(window)
    seconds = int(match[1]) * _UNIT_S[match[2]] if match else 0
    if not 1 <= seconds <= MAX_WINDOW_S:
        raise BadBatch(
            f"completion_window {window!r} is not a window this bus takes: a number and s, m or h, "
            f'from 1s to 168h ("24h" as OpenAI\'s API)',
            "completion_window",
        )
    return seconds


def new_batch_id() -> str:
    # time first, so that ids sort by creation as OpenAI's list (newest first) needs
    return f"batch_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def is_batch_id(text: str) -> bool:
    return _BATCH_ID_RE.match(text) is not None


def _batch_bits(batch_id: str) -> int:
    return int.from_bytes(hashlib.sha256(batch_id.encode()).digest()[:5])


def line_task_id(batch: Batch, line: int) -> str:
    """The id of the task of ``batch``'s input line ``line`` (0 for the first)."""
    value = batch.created_at_ms << 80 | _batch_bits(batch.id) << 40 | line
    return str(ULID.from_int(value))


class LineIds:
    """Which line of one batch a task id is, or None for another batch's or any other task."""

    def __init__(self, batch: Batch) -> None:
        self._head = batch.created_at_ms << 40 | _batch_bits(batch.id)
        self._total = batch.request_counts.total

    def line_of(self, task_id: str) -> int | None:
        try:
            value = int(ULID.from_str(task_id))
        except ValueError:
            return None
        line = value & (2**40 - 1)
        return line if value >> 40 == self._head and line < self._total else None


def now_s() -> int:
    return int(time.time())


class BatchStore:
    """The batches bucket: create, read, list, and change by compare-and-set."""

    def __init__(self, bus: Bus, kv: KeyValue) -> None:
        self._bus = bus
        self.kv = kv

    @classmethod
    async def open(cls, bus: Bus) -> BatchStore:
        """The batches bucket, declared when it is not there yet."""
        store = await cls._open(bus, create=True)
        assert store is not None
        return store

    @classmethod
    async def find(cls, bus: Bus) -> BatchStore | None:
        """The batches bucket, or None when the bus has none yet."""
        return await cls._open(bus, create=False)

    @classmethod
    async def _open(cls, bus: Bus, *, create: bool) -> BatchStore | None:
        name = bus.names.batches_bucket
        try:
            try:
                kv = await bus.js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    return None
                kv = await bus.js.create_key_value(
                    KeyValueConfig(
                        bucket=name,
                        description="hive-bus batches (OpenAI Batch API): definition and state",
                        history=1,
                        storage=StorageType.FILE,
                        replicas=bus.settings.replicas,
                        max_bytes=BATCHES_MAX_BYTES,
                        max_value_size=BATCH_VALUE_MAX_BYTES,
                    )
                )
                await cls(bus, kv).keep_newest()
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not open the batches bucket {name}: {why(exc)}") from None
        return cls(bus, kv)

    async def keep_newest(self) -> None:
        """Have the bucket let its oldest records go when full. A record stays after its batch ended and
        nothing removes it (OpenAI's API deletes no batch), so a bucket that refused new records once
        full (as nats-py makes it) answered every new batch with a 503 after some thousands, and left
        the running ones unable to record their progress. A running batch's record is written again
        with each renewal of its lease, so the oldest records are of batches long ended."""
        stream = f"KV_{self._bus.names.batches_bucket}"
        try:
            config = (await self._bus.js.stream_info(stream)).config
            if config.discard != DiscardPolicy.OLD:
                config.discard = DiscardPolicy.OLD
                await self._bus.js.update_stream(config)
        except BUS_ERRORS as exc:  # a credential that may not change it leaves it to the gateway
            log.warning("the batches bucket %s keeps its policy for now: %s", stream, why(exc))

    async def create(self, batch: Batch) -> Batch:
        try:
            await self.kv.create(batch.id, _encoder.encode(batch))
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not store batch {batch.id}: {why(exc)}") from None
        return batch

    async def read(self, batch_id: str) -> tuple[Batch, int]:
        """The batch and its revision. Raises :class:`BatchNotFound`."""
        if not is_batch_id(batch_id):
            raise BatchNotFound(f"no batch {batch_id!r} (a batch id is batch_ and 24 hex digits)")
        try:
            entry = await self.kv.get(batch_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            raise BatchNotFound(f"no batch {batch_id!r}") from None
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not read batch {batch_id}: {why(exc)}") from None
        return _decoder.decode(entry.value or b""), entry.revision or 0

    async def get(self, batch_id: str) -> Batch:
        return (await self.read(batch_id))[0]

    async def list(self) -> list[Batch]:
        """Every batch, newest first: one read of the bucket's last values (nats-py's ``keys()`` can
        come back short under load, see :func:`hive_bus._bus.kv_entries`)."""
        try:
            values = await kv_entries(self.kv)
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not list the batches: {why(exc)}") from None
        found = [_decoder.decode(value) for value in values.values()]
        return sorted(found, key=lambda b: b.id, reverse=True)

    async def change(self, batch_id: str, how: Callable[[Batch], Batch | None]) -> tuple[Batch, bool]:
        """Apply ``how`` to the batch as stored, by compare-and-set, again on a lost race (another
        gateway changed it first): ``how`` sees the latest state each time and returns None to leave
        it. Returns the batch as stored after, and whether this call changed it."""
        while True:
            batch, revision = await self.read(batch_id)
            changed = how(batch)
            if changed is None or changed == batch:
                return batch, False
            try:
                await self.kv.update(batch_id, _encoder.encode(changed), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            except BUS_ERRORS as exc:
                raise BusUnavailable(f"could not change batch {batch_id}: {why(exc)}") from None
            return changed, True


def replace(batch: Batch, **changes: Any) -> Batch:
    return msgspec.structs.replace(batch, **changes)


async def batch_reading(bus: Bus, file_id: str) -> Batch | None:
    """The batch not ended yet whose input is ``file_id``, or None. Such a batch reads its input again
    to the end, to queue its lines and then to write its output and error files in input order (each
    line's ``custom_id``): the file must stay until the batch has ended."""
    store = await BatchStore.find(bus)
    if store is None:
        return None
    return next((b for b in await store.list() if not b.done and b.input_file_id == file_id), None)


async def create_batch(
    bus: Bus,
    input_file_id: str,
    *,
    endpoint: str = ENDPOINT,
    completion_window: str = "24h",
    metadata: dict[str, str] | None = None,
    model: str | None = None,
) -> Batch:
    """Store a new batch (``validating``) of an uploaded file; a gateway on the bus takes it from there.
    Raises :class:`BadBatch` naming the field, :class:`hive_bus._files.FileNotFound`."""
    from ._files import FileStore  # the file store opens the files bucket: only once a batch is made

    if endpoint != ENDPOINT:
        raise BadBatch(f"endpoint {endpoint!r} is not supported: batches run {ENDPOINT}", "endpoint")
    seconds = window_s(completion_window)
    if metadata is not None and (
        len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items())
    ):
        raise BadBatch("metadata: at most 16 keys of 64 characters, values of 512", "metadata")
    file = await (await FileStore.open(bus)).get(input_file_id)
    if file.purpose != "batch":
        raise BadBatch(f"file {input_file_id} has purpose {file.purpose!r}, not 'batch'", "input_file_id")
    created_ms = time.time_ns() // 1_000_000
    batch = Batch(
        id=new_batch_id(),
        input_file_id=input_file_id,
        completion_window=completion_window,
        created_at=created_ms // 1000,
        created_at_ms=created_ms,
        expires_at=created_ms // 1000 + seconds,
        metadata=metadata,
        model=model,
    )
    return await (await BatchStore.open(bus)).create(batch)


def cancelling(batch: Batch) -> Batch | None:
    """The change that asks a batch to stop (``cancelling``); None for one that has ended or is already
    stopping."""
    if batch.done or batch.status == "cancelling":
        return None
    return replace(batch, status="cancelling", cancelling_at=now_s())


def estimate(
    left: int,
    per_minute: float,
    routes_to: list[str],
    budgets: dict[str, ProviderBudget],
    *,
    now_s: float,
) -> BatchProgress:
    """When ``left`` lines should end: at the rate of the last minute, held to the budgets configured for
    the providers the batch routes to (``provider`` or ``provider:model``; their requests per minute and
    per day added up, as the lines spread over them). A provider without a budget bounds nothing; with
    no rate and no budget there is no estimate."""
    rpm = rpd = 0.0
    unbounded_minute = unbounded_day = not routes_to
    named: list[str] = []
    for route in dict.fromkeys(routes_to):
        provider, _, model = route.partition(":")
        budget = budgets.get(provider)
        limits = budget.limits("", model or None) if budget is not None else None
        if limits is None or limits.rpm is None:
            unbounded_minute = True
        else:
            rpm += limits.rpm * 60_000 / limits.window_ms
        if limits is None or limits.rpd is None:
            unbounded_day = True
        else:
            rpd += limits.rpd * 86_400_000 / limits.day_ms
        if limits is not None and limits.any:
            named.append(provider)
    rate = per_minute
    if not unbounded_minute:
        rate = min(rate, rpm) if rate > 0 else rpm
    if left <= 0 or rate <= 0:
        return BatchProgress(per_minute=per_minute)
    minutes = left / rate
    parts = [f"{rate:,.0f} a minute"]
    if not unbounded_day and rpd > 0:
        parts.append(f"{rpd:,.0f} a day")
        days, rest = divmod(left, rpd)
        if days >= 1:  # whole days of quota, then the rest at the rate
            minutes = days * 1440 + rest / rate
    where = f" ({', '.join(dict.fromkeys(named))})" if named else ""
    return BatchProgress(
        per_minute=per_minute,
        estimated_finish_at=int(now_s + minutes * 60),
        basis=f"at {' and '.join(parts)}{where}, {left:,} lines left",
    )
