"""Streamed output: the chunks a worker forwards while a provider produces a task's output.

A task with ``stream: true`` is run through its provider's :meth:`StreamingProvider.stream` when the
adapter has one (every built-in does); an adapter without it runs as usual and its whole output goes
out as one chunk. Each piece is published on core NATS, on ``<prefix>.chunks.<provider>.<task id>``
(:meth:`Names.chunk_subject`), which only the workers of that provider may publish to and only the
gateway may read. Chunks are not stored: they are a side channel for the reader that waits (the
gateway's ``stream: true`` answers, ``hive chat``), and the completed event still holds the whole
output, its usage and cost. A chunk lost is therefore never a result lost; the reader
(:mod:`hive_bus._streamed`) fills in from the completed event what it did not receive.

Each chunk names its task, the attempt and the delivery of the task message it belongs to, and its
place in that attempt (``seq`` from 0), so that a reader can tell a chunk lost (a gap) from an attempt
that started over (another delivery).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

import msgspec
from msgspec import Struct
from nats.aio.client import Client as NATS

from ._messages import Task
from ._nats import BUS_ERRORS
from ._providers import Output, Provider

log = logging.getLogger("hive_bus.worker")


class Chunk(Struct, frozen=True, kw_only=True, tag="chunk.v1", tag_field="type"):
    """A piece of a streamed task's output."""

    task_id: str
    # the attempt as the task's events count it (rate-limit waits are not attempts), and the delivery of
    # the task message (unique per run of the call on one provider, where two attempts may share a number)
    attempt: int
    delivery: int
    seq: int
    text: str
    # the worker running the attempt: a reader that hears nothing more looks for its heartbeat
    worker: str = ""


chunk_encoder = msgspec.json.Encoder()
chunk_decoder = msgspec.json.Decoder(Chunk)


@runtime_checkable
class StreamingProvider(Provider, Protocol):
    """A provider that can also stream: ``stream(task)`` yields the output's text as it is produced,
    then, last, the whole :class:`Output` (its value, model and usage). It raises the same outcomes as
    ``complete`` (:class:`RetryAfter`, :class:`RetryLater`, :class:`FailNow`...), classified the same
    way, whether before the first piece or after some."""

    def stream(self, task: Task) -> AsyncIterator[str | Output]: ...


class ChunkSender:
    """Publishes one attempt's chunks of one task, numbered from 0."""

    def __init__(
        self, nc: NATS, subject: str, task_id: str, *, attempt: int, delivery: int, worker: str = ""
    ) -> None:
        self._nc = nc
        self._worker = worker
        self._subject = subject
        self._task_id = task_id
        self._attempt = attempt
        self._delivery = delivery
        self._seq = 0

    @property
    def sent(self) -> int:
        return self._seq

    async def send(self, text: str) -> None:
        if not text:
            return
        chunk = Chunk(
            task_id=self._task_id, attempt=self._attempt, delivery=self._delivery, seq=self._seq, text=text,
            worker=self._worker,
        )  # fmt: skip
        self._seq += 1
        try:
            # Into the connection's buffer, not flushed one by one: a pending flush carries many chunks.
            # A publish that fails (a connection that broke) loses the chunk, never the result.
            await self._nc.publish(self._subject, chunk_encoder.encode(chunk))
        except BUS_ERRORS as exc:
            log.debug("chunk %d of task %s not sent: %s", chunk.seq, self._task_id, exc)


async def run_streamed(provider: Provider, task: Task, sender: ChunkSender) -> Output:
    """The task's output from ``provider``, its pieces sent as they come. An adapter without ``stream``
    is called as usual, and its output (when it is text) goes as one chunk."""
    if not isinstance(provider, StreamingProvider):
        output = await provider.complete(task)
        if isinstance(output, Output) and isinstance(output.value, str):
            await sender.send(output.value)
        return output
    pieces: list[str] = []
    final: Output | None = None
    async for item in provider.stream(task):
        if isinstance(item, Output):
            final = item
            break
        pieces.append(item)
        await sender.send(item)
    text = "".join(pieces)
    if final is None:
        return Output(value=text)
    if isinstance(final.value, str) and final.value.startswith(text) and len(final.value) > len(text):
        await sender.send(final.value[len(text) :])  # what the adapter did not yield piece by piece
    return final
