"""The Python client's side of batches: upload a file of lines and create its batch, wait for it (a
watch of its key in the batches bucket, not a poll), read its results in input order.

A batch is run by a gateway on the bus (any gateway: see :mod:`hive_bus.services.batch_runner`);
these functions only read and write the bus's objects.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio
import msgspec

from ._batches import Batch, BatchStore, LineIds, create_batch
from ._bus import Bus
from ._errors import BusUnavailable
from ._files import READ_CHUNK_BYTES, FileObject, FileStore, Upload
from ._nats import BUS_ERRORS

Lines = Iterable[Mapping[str, Any] | bytes | str] | str | Path
_object_decoder = msgspec.json.Decoder(dict[str, Any])


async def upload(bus: Bus, lines: Lines, *, filename: str | None = None) -> FileObject:
    """Store a batch input file: a path, or the lines themselves (dicts in OpenAI's batch line shape,
    or JSON text). Raises :class:`hive_bus._files.BadFile` naming the line that is not JSON Lines."""
    files = await FileStore.open(bus)
    if isinstance(lines, str | Path):
        path = Path(lines)
        file = Upload(filename or path.name, "batch")
        try:
            async with await anyio.open_file(path, "rb") as source:
                while chunk := await source.read(READ_CHUNK_BYTES):
                    file.write(chunk)
            return await files.put(file)
        finally:
            file.close()
    file = Upload(filename or "batch.jsonl", "batch")
    try:
        for item in lines:
            if isinstance(item, Mapping):
                data = json.dumps(item, ensure_ascii=False).encode()
            else:
                data = item.encode() if isinstance(item, str) else item
            file.write(data.rstrip(b"\n") + b"\n")
        return await files.put(file)
    finally:
        file.close()


async def create(
    bus: Bus,
    lines: Lines,
    *,
    window: str = "24h",
    model: str | None = None,
    metadata: dict[str, str] | None = None,
) -> Batch:
    """Upload ``lines`` and create their batch (``validating``)."""
    file = await upload(bus, lines)
    return await create_batch(bus, file.id, completion_window=window, metadata=metadata, model=model)


async def wait(
    bus: Bus,
    batch_id: str,
    *,
    timeout_s: float | None = None,
    progress: Callable[[Batch], Any] | None = None,
) -> Batch:
    """The batch once it has ended, or as it is when ``timeout_s`` runs out; ``progress`` is called
    with each state it passes through (counts, estimate), the current one first."""
    store = await BatchStore.open(bus)
    batch = await store.get(batch_id)  # BatchNotFound before any watch
    if progress is not None:
        progress(batch)
    if batch.done:
        return batch
    try:
        watcher = await store.kv.watch(batch_id)
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not watch batch {batch_id}: {exc}") from None
    try:
        with anyio.move_on_after(math.inf if timeout_s is None else timeout_s):
            async for entry in watcher:
                if entry is None or entry.value is None:
                    continue
                batch = msgspec.json.decode(entry.value, type=Batch)
                if progress is not None:
                    progress(batch)
                if batch.done:
                    break
    finally:
        with anyio.CancelScope(shield=True):
            await watcher.stop()  # type: ignore[no-untyped-call]
    return batch


async def _lines(files: FileStore, file_id: str | None) -> AsyncIterator[dict[str, Any]]:
    if file_id is None:
        return
    _, chunks = await files.read(file_id)
    partial = b""
    async for chunk in chunks:
        *complete, partial = (partial + chunk).split(b"\n")
        for line in complete:
            if line.strip():
                yield _object_decoder.decode(line)
    if partial.strip():
        yield _object_decoder.decode(partial)


async def results(bus: Bus, batch_id: str) -> AsyncIterator[dict[str, Any]]:
    """Every line of an ended batch's output and error files, merged in input order (each file is in
    input order; a line's place is told by its request id)."""
    batch = await (await BatchStore.open(bus)).get(batch_id)
    files = await FileStore.open(bus)
    ids = LineIds(batch)

    def place(item: dict[str, Any] | None) -> float:
        if item is None:
            return math.inf
        line = ids.line_of(str(item.get("id", "")).removeprefix("batch_req_"))
        return math.inf if line is None else line

    outputs, errors = _lines(files, batch.output_file_id), _lines(files, batch.error_file_id)
    a = await anext(outputs, None)
    b = await anext(errors, None)
    while a is not None or b is not None:
        if b is None or (a is not None and place(a) <= place(b)):
            assert a is not None
            yield a
            a = await anext(outputs, None)
        else:
            yield b
            b = await anext(errors, None)
