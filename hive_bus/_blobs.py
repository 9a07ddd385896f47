"""The claim check: what is too large for a message goes to the Object Store, and the message carries a
:class:`BlobRef` to it.

A task whose encoding is over ``claim_check_bytes`` (or half the server's ``max_payload``, when less)
keeps its prompt, system and payload in its provider's ``<prefix>_blobs_<provider>`` bucket (the client
puts them there before it publishes); the worker reads them back
before the call. An output over the same threshold goes there too, and the ``completed`` event carries
the reference; :class:`hive_bus.Hive` reads it back wherever it answers a task's state. So tasks and
outputs up to ``blob_max_bytes`` travel whatever the server's ``max_payload``.

Objects are written in the Object Store's bucket format (chunks on ``$O.<bucket>.C.<nuid>``, an entry
on ``$O.<bucket>.M.<name>``), with choices of our own: a bucket a provider, each within its own
``blobs_max_bytes``, so that a worker credential that writes chunk after chunk fills its own provider's
bucket, never the one another provider's large outputs go to (a bus made before kept one bucket,
``<prefix>_blobs``, whose objects are read until they age out); the nuid is ``<provider>.<task id>.
<kind>.<nonce>``, so that a worker credential may read and write one provider's chunks alone; an object of
more than one chunk keeps each on a subject of its own (``<nuid>.<i>``, the reference says ``apart``),
so that every chunk is read by a direct get of its subject, never through a consumer (one worker
credential that may make consumers may make them until the account has none left); and a reader reads
the chunks the reference names and checks their size and digest, never trusting an entry. ``nats
object ls/get`` sees an object of one chunk; one kept apart is listed by no entry. A worker writes no
entry (its credential may not): its outputs are found by their reference only. Objects expire with the
bucket's ``max_age``, the events' own: a reference outlives no event that carries it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
from datetime import UTC, datetime

import anyio
import msgspec
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ._bus import Bus, ensure_blobs
from ._errors import BusUnavailable, HiveError, TooLarge
from ._messages import BlobRef, Task, TaskContent, TaskView, content_decoder, encoder
from ._nats import BUS_ERRORS, why

CHUNK_BYTES = 128 * 1024  # the Object Store's own default
_PLACEHOLDER = "(in the object store)"


class BlobMissing(HiveError):
    """An object a reference names is gone (aged out, purged) or does not match its digest."""


async def put(
    bus: Bus, *, provider: str, task_id: str, kind: str, data: bytes, listed: bool = True
) -> BlobRef:
    """Store ``data`` as an object and return its reference. ``listed`` writes its entry too, for the
    processes whose credential may (a worker's may not). Raises :class:`BusUnavailable`."""
    names = bus.names
    bucket = await ensure_blobs(bus, provider)
    stream = f"OBJ_{bucket}"
    nuid = f"{provider}.{task_id}.{kind}.{secrets.token_hex(6)}"
    name = f"{provider}/{task_id}/{kind}/{nuid.rsplit('.', 1)[-1]}"
    subject = names.blob_chunks(bucket, nuid)
    chunk_bytes = max(1024, min(CHUNK_BYTES, bus.nc.max_payload - 1024))
    chunks = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
    digest = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
    apart = len(chunks) > 1
    ref = BlobRef(
        name=name, nuid=nuid, size_bytes=len(data), chunks=len(chunks), digest=digest, apart=apart,
        own_bucket=True,
    )  # fmt: skip
    try:
        for i, chunk in enumerate(chunks):
            await bus.js.publish(_chunk_subject(bus, ref, i), chunk, stream=stream)
        if listed and not apart:
            entry = {
                "name": name, "bucket": bucket, "nuid": nuid, "size": len(data),
                "chunks": len(chunks), "digest": digest, "mtime": datetime.now(UTC).isoformat(),
                "options": {"max_chunk_size": chunk_bytes},
            }  # fmt: skip
            await bus.js.publish(
                names.blob_meta(bucket, base64.urlsafe_b64encode(name.encode()).decode()),
                json.dumps(entry).encode(),
                headers={"Nats-Rollup": "sub"},
                stream=stream,
            )
    except BUS_ERRORS as exc:
        with contextlib.suppress(*BUS_ERRORS):
            await bus.js.purge_stream(stream, subject=f"{subject}.*" if apart else subject)
        raise BusUnavailable(f"could not store a {len(data)}-byte object in {bucket}: {why(exc)}") from None
    return ref


async def get(bus: Bus, ref: BlobRef) -> bytes:
    """The object ``ref`` names, checked against its size and digest. Raises :class:`BlobMissing` when
    it is gone, :class:`BusUnavailable` when the bus does not answer."""
    if ref.apart or ref.chunks == 1:
        parts = await _by_direct_gets(bus, ref)
    else:
        parts = await _by_consumer(bus, ref)
    data = b"".join(parts)
    digest = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
    if len(parts) < ref.chunks or len(data) != ref.size_bytes or digest != ref.digest:
        raise BlobMissing(
            f"object {ref.name} in {_bucket(bus, ref)} is missing or damaged "
            f"({len(parts)} of {ref.chunks} chunks, {len(data)} of {ref.size_bytes} bytes)"
        )
    return data


def _bucket(bus: Bus, ref: BlobRef) -> str:
    """The bucket ``ref``'s object is in: its provider's, or every provider's (as buses before kept)."""
    names = bus.names
    return names.blobs_bucket_of(ref.nuid.split(".", 1)[0]) if ref.own_bucket else names.blobs_bucket


def _chunk_subject(bus: Bus, ref: BlobRef, i: int) -> str:
    chunks = bus.names.blob_chunks(_bucket(bus, ref), ref.nuid)
    return f"{chunks}.{i}" if ref.apart else chunks


async def _by_direct_gets(bus: Bus, ref: BlobRef) -> list[bytes]:
    """The chunks of an object of one chunk, or of one kept apart: a direct get each."""
    parts: list[bytes] = []
    bucket = _bucket(bus, ref)
    try:
        for i in range(ref.chunks):
            raw = await bus.js.get_last_msg(f"OBJ_{bucket}", _chunk_subject(bus, ref, i), direct=True)
            parts.append(raw.data or b"")
    except nats.js.errors.NotFoundError:
        if not parts:
            raise BlobMissing(f"object {ref.name} is no longer in {bucket} (aged out or purged)") from None
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read object {ref.name}: {why(exc)}") from None
    return parts


async def _by_consumer(bus: Bus, ref: BlobRef) -> list[bytes]:
    """The chunks of an object stored before chunks were kept apart (all on one subject, in every
    provider's bucket), through a consumer deleted once read (a worker credential may make none: the
    gateway's reads)."""
    names = bus.names
    nc, js = bus.nc, bus.js
    inbox = nc.new_inbox()
    parts: list[bytes] = []
    done = anyio.Event()

    async def on_chunk(msg: Msg) -> None:
        if len(parts) < ref.chunks:
            parts.append(msg.data)
        if len(parts) >= ref.chunks:
            done.set()

    config = ConsumerConfig(
        name=f"blob_{secrets.token_hex(8)}",
        filter_subject=names.blob_chunks(names.blobs_bucket, ref.nuid),
        deliver_subject=inbox,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=10.0,
    )
    try:
        sub = await nc.subscribe(inbox, cb=on_chunk)
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read object {ref.name}: {exc}") from None
    try:
        info = await js.add_consumer(names.blobs_stream, config)
        delivered = info.delivered.stream_seq if info.delivered is not None else 0
        if not (info.num_pending or delivered or parts):
            raise BlobMissing(f"object {ref.name} is no longer in {names.blobs_bucket} (aged out or purged)")
        with anyio.move_on_after(bus.settings.request_timeout_s + ref.size_bytes / 4e6):
            await done.wait()
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read object {ref.name}: {exc}") from None
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(*BUS_ERRORS):
            await sub.unsubscribe()
            # a worker credential may not delete it: then it goes once inactive
            await js.delete_consumer(names.blobs_stream, config.name or "")
    return parts


def content_bytes(task: Task) -> bytes:
    return encoder.encode(
        TaskContent(prompt=task.prompt, system=task.system, payload=task.payload, messages=task.messages)
    )


def claim_check_bytes(bus: Bus) -> int:
    """Above this size an encoded task or event goes by the claim check: ``claim_check_bytes``, or half
    the server's ``max_payload`` when that is less (the message must fit in one, its headers with it,
    and a task inside the event that carries it)."""
    return min(bus.settings.claim_check_bytes, bus.nc.max_payload // 2)


async def check_in(bus: Bus, task: Task, *, listed: bool = True) -> Task:
    """The task as it travels: itself when small, else with its content in the Object Store. Raises
    :class:`TooLarge` when its content is over ``blob_max_bytes``."""
    settings = bus.settings
    if task.content is not None or len(encoder.encode(task)) <= claim_check_bytes(bus):
        return task
    data = content_bytes(task)
    if len(data) > settings.blob_max_bytes:
        raise TooLarge(
            f"the task's prompt, system and payload are {len(data)} bytes encoded, over the bus's limit "
            f"of {settings.blob_max_bytes} bytes (blob_max_bytes)",
            size_bytes=len(data),
            limit_bytes=settings.blob_max_bytes,
        )
    ref = await put(bus, provider=task.provider, task_id=task.id, kind="task", data=data, listed=listed)
    return msgspec.structs.replace(
        task, prompt=_PLACEHOLDER, system=None, payload=None, messages=None, content=ref
    )


async def check_out(bus: Bus, task: Task) -> Task:
    """The task with its content read back from the Object Store (itself when it has none there)."""
    if task.content is None:
        return task
    content = content_decoder.decode(await get(bus, task.content))
    return msgspec.structs.replace(
        task, prompt=content.prompt, system=content.system, payload=content.payload,
        messages=content.messages, content=None,
    )  # fmt: skip


async def moved_to(bus: Bus, task: Task) -> Task:
    """A task moved to another provider, with its content copied under that provider's chunks (whose
    workers may read only their own)."""
    if task.content is None or task.content.nuid.startswith(f"{task.provider}."):
        return task
    data = await get(bus, task.content)
    ref = await put(bus, provider=task.provider, task_id=task.id, kind="task", data=data)
    return msgspec.structs.replace(task, content=ref)


async def read_output(bus: Bus, view: TaskView) -> TaskView:
    """The view with its output read back from the Object Store (itself when it has none there)."""
    if view.output_ref is None:
        return view
    output = msgspec.json.decode(await get(bus, view.output_ref))
    return msgspec.structs.replace(view, output=output, output_ref=None)
