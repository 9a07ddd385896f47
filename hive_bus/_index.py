"""The metadata index: which tasks carry a metadata key and value, read newest first at a cost in
proportion to what is returned, not to what the bus holds.

A task whose metadata has string values gets, in the same publish call as the task itself, one empty
message per such key (the first :data:`MAX_KEYS`) in the ``<PREFIX>_INDEX`` stream, on
``<prefix>.index.<key token>.<value hash>.<task id>`` (:func:`entries`). A task without metadata writes
nothing there. The key token is the key itself when it is a plain subject token (``customer``,
``batch_id``), else ``_`` and a hash of it; the value is always hashed (any text fits a subject token
so). So the tasks of one key and value are one subject filter, and JetStream answers for it from its
per-subject state, however many other messages the stream holds.

Newest first: a direct get with ``next_by_subj`` answers the first matching message at or after a
sequence together with how many match after it (``Nats-Num-Pending``): a count of the matches from any
sequence on, in one round trip. A binary search over sequences with that count finds where the newest
``limit`` matches start (a few dozen round trips of one small message each, whatever the stream's
size), and one batched direct get reads them. Readers check each task's metadata again, so a hash that
collides, or an entry left from a task the events no longer hold, never shows a task that does not match.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.msg import Msg

from ._assigned import current_view
from ._bus import Bus
from ._errors import BusUnavailable
from ._messages import TaskView, is_task_id
from ._names import Names, is_valid_token
from ._nats import BUS_ERRORS
from ._publish import Publish

# Keys of a task's metadata indexed, at most (the first ones with a string value, in its order): each
# costs one stored message per task.
MAX_KEYS = 8
_HASH_CHARS = 20  # 80 bits of SHA-256: a collision is filtered out by the reader all the same


def key_token(key: str) -> str:
    """A metadata key as a subject token: itself when it is one, else ``_`` and a hash of it (a plain
    token starts with a letter or digit, so the two never meet)."""
    if is_valid_token(key):
        return key
    return "_" + hashlib.sha256(key.encode()).hexdigest()[:_HASH_CHARS]


def value_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:_HASH_CHARS]


def indexed(metadata: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (key, value) pairs of ``metadata`` that the index holds: string values, the first few."""
    pairs = ((k, v) for k, v in metadata.items() if isinstance(v, str))
    return list(itertools.islice(pairs, MAX_KEYS))


def entries(names: Names, task_id: str, metadata: Mapping[str, Any], msg_id: str | None) -> list[Publish]:
    """The index messages of one task (none for a task without string metadata). ``msg_id``, the task
    message's de-duplication id, makes each entry's: a resubmission's entries are stored once."""
    return [
        (
            names.index_subject(key_token(key), value_hash(value), task_id),
            b"",
            f"{msg_id}:index:{key_token(key)}" if msg_id else None,
            names.index_stream,
        )
        for key, value in indexed(metadata)
    ]


def matches(metadata: Mapping[str, Any], wanted: Mapping[str, str]) -> bool:
    """Whether ``metadata`` has each key of ``wanted`` with that (string) value."""
    return all(metadata.get(key) == value for key, value in wanted.items())


@dataclass(frozen=True, slots=True)
class _Hit:
    seq: int
    task_id: str
    pending: int  # matching messages after this one


async def newest(bus: Bus, key: str, value: str, *, limit: int, skip: int = 0) -> list[str]:
    """The ids of the newest ``limit`` tasks indexed under ``key`` and ``value``, newest first, after
    leaving out the ``skip`` newest. Raises :class:`BusUnavailable`."""
    subject = bus.names.index_filter(key_token(key), value_hash(value))
    try:
        async with DirectGets(bus, bus.names.index_stream) as gets:
            first = await gets.first_at(subject, 0)
            if first is None:
                return []
            total = first.pending + 1  # matches 0 (the oldest) to total - 1
            end = total - skip
            if end <= 0:
                return []
            begin = max(0, end - limit)
            start = first.seq if begin == 0 else await gets.seq_of(subject, total - begin, first)
            hits = await gets.batch(subject, start, end - begin)
    except (TimeoutError, *BUS_ERRORS) as exc:
        raise BusUnavailable(f"could not read the metadata index: {exc or 'no answer in time'}") from None
    return [hit.task_id for hit in reversed(hits)]


class DirectGets:
    """Batched direct gets of one stream over one reply subscription (``$JS.API.DIRECT.GET``), each
    request answered on an inbox of its own and ended by the server's end-of-batch status: nothing is
    left on the server (no consumer), and a batch of messages is one round trip."""

    def __init__(self, bus: Bus, stream: str) -> None:
        self._bus = bus
        domain = bus.settings.js_domain
        api = f"$JS.{domain}.API" if domain else "$JS.API"
        self._api = f"{api}.DIRECT.GET.{stream}"
        self._inbox = ""
        self._requests = itertools.count()
        self._send: MemoryObjectSendStream[Msg] | None = None
        self._receive: MemoryObjectReceiveStream[Msg] | None = None
        self._sub: Any = None

    async def __aenter__(self) -> DirectGets:
        # unbounded: the replies are bounded by the batches asked for (each at most a page of tasks)
        self._send, self._receive = anyio.create_memory_object_stream[Msg](math.inf)
        send = self._send

        async def on_msg(msg: Msg) -> None:
            with contextlib.suppress(anyio.ClosedResourceError):
                send.send_nowait(msg)

        self._inbox = self._bus.nc.new_inbox()
        self._sub = await self._bus.nc.subscribe(f"{self._inbox}.*", cb=on_msg)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(*BUS_ERRORS):
                    await self._sub.unsubscribe()
        if self._send is not None:
            self._send.close()
        if self._receive is not None:
            self._receive.close()

    async def messages(
        self, subject: str, start_seq: int, count: int, *, max_bytes: int | None = None
    ) -> list[Msg]:
        """Up to ``count`` messages matching ``subject`` at or after ``start_seq``, oldest first (fewer
        when their data would pass ``max_bytes``); each has the server's ``Nats-Sequence``,
        ``Nats-Subject`` and ``Nats-Num-Pending`` (matches after it) headers."""
        reply = f"{self._inbox}.{next(self._requests)}"
        request: dict[str, Any] = {"batch": count, "seq": start_seq, "next_by_subj": subject}
        if max_bytes is not None:
            request["max_bytes"] = max_bytes
        await self._bus.nc.publish(self._api, msgspec.json.encode(request), reply=reply)
        found: list[Msg] = []
        assert self._receive is not None
        with anyio.fail_after(self._bus.settings.request_timeout_s):
            async for msg in self._receive:
                if msg.subject != reply:
                    continue  # a late answer to an earlier request
                if (msg.headers or {}).get("Status"):  # 204: the end of the batch; 404: nothing matches
                    return found
                found.append(msg)
        return found

    async def batch(self, subject: str, start_seq: int, count: int) -> list[_Hit]:
        """Up to ``count`` matches of ``subject`` at or after ``start_seq``, oldest first."""
        hits: list[_Hit] = []
        for msg in await self.messages(subject, start_seq, count):
            headers = msg.headers or {}
            hits.append(
                _Hit(
                    seq=int(headers.get("Nats-Sequence", "0")),
                    task_id=headers.get("Nats-Subject", "").rsplit(".", 1)[-1],
                    pending=int(headers.get("Nats-Num-Pending", "0")),
                )
            )
        return hits

    async def first_at(self, subject: str, seq: int) -> _Hit | None:
        """The first match at or after ``seq`` (with how many match after it), or None."""
        found = await self.batch(subject, seq, 1)
        return found[0] if found else None

    async def seq_of(self, subject: str, from_end: int, low: _Hit) -> int:
        """The sequence of the match that has ``from_end`` matches from it to the end (itself
        counted), found by halving: the first match at or after any sequence says how many follow it.
        ``low`` is a match with at least that many."""
        last = await self._bus.js.get_last_msg(self._bus.names.index_stream, subject, direct=True)
        best, high = low, (last.seq or low.seq) + 1
        while high - best.seq > 1 and best.pending + 1 > from_end:
            mid = (best.seq + high) // 2
            probe = await self.first_at(subject, mid)
            if probe is not None and probe.pending + 1 >= from_end:
                best = probe  # every sequence from mid to this match counts the same
            else:
                high = mid
        return best.seq


# A filtered list reads the index a page at a time until it has ``limit`` tasks in the status and of
# the provider asked for; it stops after this many tasks read, so a status no recent tagged task is
# in costs a bounded read (the answer then holds what was found among them).
MAX_READ_TASKS = 2000
# tasks read at once
READ_WINDOW = 32


async def find(
    bus: Bus,
    wanted: Mapping[str, str],
    *,
    status: str | None = None,
    provider: str | None = None,
    limit: int = 50,
) -> list[TaskView]:
    """The newest ``limit`` tasks whose metadata has each key and value of ``wanted`` (and, when given,
    in ``status`` and on ``provider``), newest first, each as its latest event has it with its content
    and metadata (outputs in the Object Store not read back). Raises :class:`BusUnavailable`."""
    if not wanted:
        raise ValueError("find needs at least one metadata key and value")
    key, value = next(iter(wanted.items()))
    found: list[TaskView] = []
    seen: set[str] = set()
    skip = 0
    page = max(limit, READ_WINDOW)
    while len(found) < limit and skip < MAX_READ_TASKS:
        got = await newest(bus, key, value, limit=page, skip=skip)
        skip += len(got)
        ids = [i for i in got if i not in seen]  # entries that moved between two pages' reads
        seen.update(ids)
        views = await _views(bus, ids)
        found += [
            v
            for v in views
            if v is not None
            and matches(v.metadata, wanted)
            and (status is None or v.status == status)
            and (provider is None or v.provider == provider)
        ]
        if len(got) < page:
            break
    return found[:limit]


async def _views(bus: Bus, ids: list[str]) -> list[TaskView | None]:
    """Each task's state (None for one the bus does not know), up to :data:`READ_WINDOW` read at once."""
    views: list[TaskView | None] = [None] * len(ids)
    failed: list[BaseException] = []
    window = anyio.Semaphore(READ_WINDOW)

    async def read(i: int, task_id: str) -> None:
        async with window:
            try:
                views[i] = await current_view(bus, task_id)
            except BUS_ERRORS as exc:
                failed.append(exc)

    async with anyio.create_task_group() as tg:
        for i, task_id in enumerate(ids):
            if is_task_id(task_id):
                tg.start_soon(read, i, task_id)
    if failed:
        raise BusUnavailable(f"could not read the tasks of the metadata index: {failed[0]}")
    return views
