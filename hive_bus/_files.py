"""Uploaded files (OpenAI's Files API, for batches): kept in the JetStream Object Store bucket
``<prefix>_files``, so every gateway on the bus sees the same files and a restart loses none.

An upload is streamed: its bytes go to a spooled temporary file (memory up to ``SPOOL_BYTES``, then
disk) as they arrive, checked on the way (size, line count, each line a JSON object), and from there to
the Object Store in chunks; a download is written to a temporary file by the Object Store reader (which
checks the digest) and streamed from it. So no file is ever held whole in memory, whatever its size.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from typing import IO, Literal

import anyio
import msgspec
from nats.js.api import ObjectMeta, ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectDeletedError
from nats.js.object_store import ObjectStore

from ._bus import Bus
from ._errors import BusUnavailable, HiveError
from ._messages import explain_error
from ._nats import BUS_ERRORS, why
from ._nesting import NestedTooDeep, check_json

# OpenAI's limits for a batch input file
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_FILE_LINES = 50_000
SPOOL_BYTES = 1024 * 1024
READ_CHUNK_BYTES = 256 * 1024
Purpose = Literal["batch", "batch_output"]
# Windows editors start a UTF-8 file with it; JSON Lines has none, so it is left out
BOM = b"\xef\xbb\xbf"
# A line's request body sits one level in, and its response_format's schema three further (as
# POST /v1/chat/completions checks it): deeper is refused on upload, before a decoder recurses.
LINE_ENCLOSING = 4


class FileNotFound(HiveError):
    """No file of that id (never uploaded, or deleted)."""


class BadFile(HiveError):
    """An upload that is not a file the bus takes; the message says what and where (a line number)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class FileObject(msgspec.Struct, frozen=True, kw_only=True):
    """A file as OpenAI's API describes it."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: str = "file"
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "file"
    deleted: bool = True


def new_file_id() -> str:
    # time first, so that ids sort by upload time as OpenAI's list order (newest first) needs
    return f"file-{time.time_ns() // 1_000_000:012x}{secrets.token_hex(8)}"


class JsonLines:
    """Checks JSON Lines as its bytes arrive: every non-blank line a JSON object nested at most
    :data:`LINE_ENCLOSING` + ``MAX_NESTING`` levels, at most ``max_lines`` of them, at most ``max_bytes``
    in all (a leading byte order mark left out). Lines may be split anywhere between chunks."""

    def __init__(self, *, max_bytes: int = MAX_FILE_BYTES, max_lines: int = MAX_FILE_LINES) -> None:
        self.size_bytes = 0
        self.lines = 0
        self._number = 0  # lines seen, blank ones included: what an editor shows
        self._partial = bytearray()
        self._head: bytearray | None = bytearray()
        self._max_bytes = max_bytes
        self._max_lines = max_lines

    def feed(self, chunk: bytes) -> bytes:
        """Check ``chunk``; returns what to keep of it (a UTF-8 byte order mark at the start left out)."""
        if self._head is not None:  # the first bytes, held until a byte order mark is told apart
            self._head += chunk
            if len(self._head) < len(BOM) and BOM.startswith(self._head):
                return b""
            chunk, self._head = bytes(self._head).removeprefix(BOM), None
        self.size_bytes += len(chunk)
        if self.size_bytes > self._max_bytes:
            raise BadFile(f"the file is larger than {self._max_bytes} bytes, the limit", too_large=True)
        self._partial += chunk
        *complete, rest = self._partial.split(b"\n")
        for line in complete:
            self._line(bytes(line))
        self._partial = bytearray(rest)
        return chunk

    def end(self) -> None:
        if self._head:  # fewer bytes than a byte order mark, all of them its start: no JSON
            self._partial += self._head
        if self._partial:
            self._line(bytes(self._partial))
            self._partial.clear()
        if not self.lines:
            raise BadFile("the file holds no line: a batch file is JSON Lines, one request per line")

    def _line(self, line: bytes) -> None:
        self._number += 1
        if not line.strip():
            return
        self.lines += 1
        if self.lines > self._max_lines:
            raise BadFile(f"line {self._number}: the file has more than {self._max_lines} lines, the limit")
        try:
            check_json(line, enclosing=LINE_ENCLOSING)
            value = msgspec.json.decode(line)
        except NestedTooDeep as exc:
            raise BadFile(f"line {self._number}: {explain_error(exc)}") from None
        except msgspec.DecodeError as exc:
            raise BadFile(f"line {self._number}: not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise BadFile(f"line {self._number}: a line must be a JSON object, not {type(value).__name__}")


class Upload:
    """One upload on its way in: bytes are checked (:class:`JsonLines`) and spooled as they come;
    :meth:`FileStore.put` stores them."""

    def __init__(self, filename: str, purpose: str, *, max_bytes: int = MAX_FILE_BYTES) -> None:
        self.filename = filename
        self.purpose = purpose
        self.check = JsonLines(max_bytes=max_bytes)
        # open for as long as the upload: closed by close()
        self.spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115

    def write(self, chunk: bytes) -> None:
        self.spool.write(self.check.feed(chunk))

    def close(self) -> None:
        self.spool.close()


class FileStore:
    """The bus's files: put, show, list, read, delete."""

    def __init__(self, bus: Bus, store: ObjectStore) -> None:
        self._bus = bus
        self._store = store

    @classmethod
    async def open(cls, bus: Bus) -> FileStore:
        """The files bucket, declared when it is not there yet."""
        settings, names = bus.settings, bus.names
        try:
            try:
                store = await bus.js.object_store(names.files_bucket)
            except BucketNotFoundError:
                config = ObjectStoreConfig(
                    bucket=names.files_bucket,
                    description="uploaded files (OpenAI Files API): batch input and output",
                    max_bytes=settings.files_max_bytes,
                    storage=StorageType.FILE,
                    replicas=settings.replicas,
                )
                store = await bus.js.create_object_store(names.files_bucket, config=config)
        except BUS_ERRORS as exc:
            raise BusUnavailable(
                f"could not open the files bucket {names.files_bucket}: {why(exc)}"
            ) from None
        return cls(bus, store)

    async def put(self, upload: Upload) -> FileObject:
        """Store a checked upload. Raises :class:`BadFile` for an empty or unfinished one."""
        upload.check.end()
        upload.spool.seek(0)
        file = FileObject(
            id=new_file_id(),
            bytes=upload.check.size_bytes,
            created_at=int(time.time()),
            filename=upload.filename,
            purpose=upload.purpose,
        )
        meta = ObjectMeta(
            name=file.id,
            description=upload.filename,
            headers={"Hive-Purpose": upload.purpose, "Hive-Created-At": str(file.created_at)},
        )
        try:
            await self._store.put(file.id, upload.spool, meta=meta)  # type: ignore[arg-type]
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not store the file {upload.filename!r}: {why(exc)}") from None
        return file

    async def get(self, file_id: str) -> FileObject:
        try:
            info = await self._store.get_info(file_id)
        except (NotFoundError, ObjectDeletedError):
            raise FileNotFound(f"no file {file_id!r}") from None
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not read file {file_id!r}: {why(exc)}") from None
        if info.deleted:
            raise FileNotFound(f"no file {file_id!r}")
        headers = info.headers or {}
        return FileObject(
            id=info.name,
            bytes=info.size or 0,
            created_at=int(_first(headers.get("Hive-Created-At")) or 0),
            filename=info.description or info.name,
            purpose=_first(headers.get("Hive-Purpose")) or "batch",
        )

    async def list(self, purpose: str | None = None) -> list[FileObject]:
        """Every file (of one purpose), newest first."""
        try:
            infos = await self._store.list(ignore_deletes=True)
        except NotFoundError:
            return []  # no object yet
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not list the files: {why(exc)}") from None
        files = [await self.get(info.name) for info in infos if not info.deleted]
        return sorted(
            (f for f in files if purpose is None or f.purpose == purpose), key=lambda f: f.id, reverse=True
        )

    async def read(self, file_id: str) -> tuple[FileObject, AsyncIterator[bytes]]:
        """The file and its bytes in chunks: read into a temporary file first (the Object Store reader
        checks the digest), then streamed from there; the temporary file goes when the chunks end."""
        file = await self.get(file_id)
        spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the chunks' end, or on an error here
        try:
            await self._store.get(file_id, writeinto=spool)
        except (NotFoundError, ObjectDeletedError):
            spool.close()
            raise FileNotFound(f"no file {file_id!r}") from None
        except BUS_ERRORS as exc:
            spool.close()
            raise BusUnavailable(f"could not read file {file_id!r}: {why(exc)}") from None
        spool.seek(0)

        async def chunks() -> AsyncIterator[bytes]:
            with spool:
                while chunk := await anyio.to_thread.run_sync(spool.read, READ_CHUNK_BYTES):
                    yield chunk

        return file, chunks()

    async def delete(self, file_id: str) -> FileDeleted:
        await self.get(file_id)
        try:
            await self._store.delete(file_id)
        except (NotFoundError, ObjectDeletedError):
            raise FileNotFound(f"no file {file_id!r}") from None
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not delete file {file_id!r}: {why(exc)}") from None
        return FileDeleted(id=file_id)


def _first(value: str | list[str] | None) -> str | None:
    return value[0] if isinstance(value, list) else value
