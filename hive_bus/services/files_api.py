"""OpenAI's Files API on the gateway (the part batches need): upload, list, show, download, delete.

``POST /v1/files`` is parsed as it streams in (``multipart``'s push parser, the one Litestar itself
uses), so a 200 MB file is never held in memory: see :mod:`hive_bus._files`.
"""

# No "from __future__ import annotations" here: Litestar reads the parameter markers at run time.
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, QueryParameter
from litestar.response import Stream
from multipart import (  # type: ignore[import-untyped]
    MultipartError,
    MultipartSegment,
    PushMultipartParser,
)

from hive_bus._batches import batch_reading
from hive_bus._files import MAX_FILE_BYTES, BadFile, FileObject, FileStore, Upload

from .api import _errors
from .openai_errors import OpenAIError, OpenAIErrorBody

# room for the multipart framing around the largest file
UPLOAD_MAX_BODY_BYTES = MAX_FILE_BYTES + 1024 * 1024
PURPOSES = ("batch",)


class FileList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[FileObject]
    object: str = "list"
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


async def files(state: State) -> FileStore:
    """The bus's file store, opened on first use and kept in the app's state."""
    store: FileStore | None = state.get("files")
    if store is None:
        store = state["files"] = await FileStore.open(state.hive.bus)
    return store


def _boundary(request: Request[Any, Any, Any]) -> str | None:
    for part in request.headers.get("content-type", "").split(";")[1:]:
        name, _, value = part.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"')
    return None


def _bad(message: str, field: str | None = None, status: int = 400) -> Response[Any]:
    code = "body_too_large" if status == 413 else "invalid_request"
    return OpenAIError(status, message, param=field, code=code).response()


@post(
    "/v1/files",
    status_code=200,
    request_max_body_size=UPLOAD_MAX_BODY_BYTES,
    responses=_errors(400, 401, 413, 503, shape=OpenAIErrorBody),
    summary="Upload a file (multipart/form-data: purpose=batch, file=JSON Lines)",
)
async def upload_file(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    boundary = _boundary(request)
    if boundary is None:
        return _bad("the Content-Type multipart/form-data has no boundary")
    purpose: str | None = None
    upload: Upload | None = None
    field: str | None = None  # the segment being read
    text = bytearray()
    try:
        with PushMultipartParser(boundary, max_segment_count=16) as parser:
            async for chunk in _body(request):
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        field = event.name
                        if field == "file":
                            if upload is not None:
                                # raised, not returned: leaving the parser's block by a return would
                                # make it check that the body ended, and answer that it did not
                                raise BadFile(
                                    "an upload takes exactly one part named file; this form has more than one"
                                )
                            upload = Upload(event.filename or "upload.jsonl", "batch")
                        text.clear()
                    elif event is None:
                        if field == "purpose":
                            purpose = text.decode("utf-8", "replace").strip()
                        field = None
                    elif field == "file" and upload is not None:
                        upload.write(event)
                    elif len(text) < 1024:
                        text += event[: 1024 - len(text)]
        if purpose is None:
            return _bad("the form has no purpose field: purpose=batch", "purpose")
        if purpose not in PURPOSES:
            return _bad(
                f"purpose {purpose!r} is not one this gateway takes ({', '.join(PURPOSES)})", "purpose"
            )
        if upload is None:
            return _bad("the form has no file field", "file")
        return Response(
            msgspec.json.encode(await (await files(state)).put(upload)), media_type="application/json"
        )
    except BadFile as exc:
        return _bad(str(exc), "file", 413 if exc.too_large else 400)
    except MultipartError as exc:
        return _bad(f"the multipart body is malformed: {exc}")
    finally:
        if upload is not None:
            upload.close()


async def _body(request: Request[Any, Any, Any]) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        yield chunk
    yield b""  # the parser's end of input


@get(
    "/v1/files",
    responses=_errors(400, 401, 503, shape=OpenAIErrorBody),
    summary="Uploaded files, newest first",
)
async def list_files(
    state: State,
    purpose: Annotated[str | None, QueryParameter(description="only files of this purpose")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, QueryParameter(description="the id the last page ended with")] = None,
    order: Annotated[Literal["asc", "desc"], QueryParameter()] = "desc",
) -> FileList:
    found = await (await files(state)).list(purpose)
    if order == "asc":
        found.reverse()
    if after is not None:
        ids = [f.id for f in found]
        found = found[ids.index(after) + 1 :] if after in ids else []
    page = found[:limit]
    return FileList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(found) > limit,
    )


@get("/v1/files/{file_id:str}", responses=_errors(401, 404, 503, shape=OpenAIErrorBody), summary="One file")
async def show_file(state: State, file_id: FromPath[str]) -> FileObject:
    return await (await files(state)).get(file_id)


@get(
    "/v1/files/{file_id:str}/content",
    responses=_errors(401, 404, 503, shape=OpenAIErrorBody),
    summary="A file's bytes",
)
async def file_content(state: State, file_id: FromPath[str]) -> Stream:
    info, body = await (await files(state)).read(file_id)
    return Stream(
        body,
        media_type="application/jsonl" if info.filename.endswith(".jsonl") else "application/octet-stream",
        headers={"content-length": str(info.bytes)},
    )


@delete(
    "/v1/files/{file_id:str}",
    status_code=200,
    responses=_errors(401, 404, 409, 503, shape=OpenAIErrorBody),
    summary="Delete a file",
)
async def delete_file(state: State, file_id: FromPath[str]) -> Response[Any]:
    """A batch that has not ended reads its input file again (to queue its lines, to write its output in
    input order): deleting that file is refused, 409 ``file_in_use`` naming the batch."""
    store = await files(state)
    reading = await batch_reading(state.hive.bus, file_id)
    if reading is not None:
        return OpenAIError(
            409,
            f"file {file_id!r} is the input of batch {reading.id}, which has not ended ({reading.status}) "
            "and reads it again to write its output; delete it once the batch has ended (cancel it first "
            "to end it sooner)",
            param="file_id",
            code="file_in_use",
            final=True,
        ).response()
    return Response(msgspec.json.encode(await store.delete(file_id)), media_type="application/json")


FILE_ROUTES = [upload_file, list_files, show_file, file_content, delete_file]
