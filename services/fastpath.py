"""The gateway's hot path: ``POST /v1/tasks`` with a valid task (and ``POST /v1/tasks/batch`` with a
valid batch), served without the framework's per-request work (signature model, dependency injection,
response negotiation).

On a Raspberry Pi the gateway's CPU per submission is its capacity, and that work cost about as much as
a whole ``GET /healthz``. This middleware sits inside the bearer-token check and takes only the common
case: a JSON body within the size limit that decodes, with the same msgspec decoder, into a valid
:class:`TaskRequest`. It answers exactly what the route would (202 ``{"id", "status"}``, 200 for a
known idempotency key, 503 with ``Retry-After`` when the bus does not store it). Anything else, a body
too large, not JSON, or not a valid task, goes on to the route with the body replayed, so every error
answer is the route's own.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPRequestEvent, Receive, ReceiveMessage, Scope, Send

from hive_bus import BusUnavailable, Hive, QueueFull
from hive_bus._errors import TooLarge
from hive_bus._messages import explain_error, request_decoder
from hive_bus._nesting import Guarded, NestedTooDeep, check_json

from .api import BATCH_MAX_BODY_BYTES, BatchRequest, batch_answer

log = logging.getLogger("hive_bus.gateway")

_JSON = (b"content-type", b"application/json")
_PATHS = frozenset({"/v1/tasks", "/v1/tasks/batch"})
_batch_decoder = Guarded(msgspec.json.Decoder(BatchRequest), enclosing=3)
_encode = msgspec.json.Encoder().encode
# After a 413 for a body over the limit, the rest of it is read and dropped, within these bounds.
DRAIN_MAX_BYTES = 256 * 1024**2
DRAIN_MAX_S = 30.0


class FastSubmit:
    def __init__(self, app: ASGIApp, hive: Hive, max_body_bytes: int, max_batch: int) -> None:
        self._app = app
        self._hive = hive
        self._max_body_bytes = max_body_bytes
        self._max_batch = max_batch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if scope["type"] != ScopeType.HTTP or scope["method"] != "POST" or path not in _PATHS:
            await self._app(scope, receive, send)
            return
        batch = path == "/v1/tasks/batch"
        limit = BATCH_MAX_BODY_BYTES if batch else self._max_body_bytes
        body, whole = await self._read(receive, limit)
        if not whole and len(body) > limit:
            await _too_large_body(send, receive, limit, "a batch" if batch else "a task", len(body))
            return
        if whole and (too_deep := _too_deep(body, batch)) is not None:
            # answered here: the route's own decoder would recurse until it fails
            await _answer(send, 400, {"error": {"code": "invalid_request", **too_deep}})
            return
        decoded = self._decode(scope, body, _batch_decoder if batch else request_decoder) if whole else None
        if batch and decoded is not None and not 1 <= len(decoded.tasks) <= self._max_batch:
            decoded = None  # the route says what is wrong
        if decoded is None:
            await self._app(scope, _replay(body, whole, receive), send)
            return
        if batch:
            try:
                answer = batch_answer(await self._hive.submit_batch(decoded.tasks))
            except TooLarge as exc:
                await _error(send, "too_large", str(exc), status=413)
                return
            retry = [(b"retry-after", b"5")] if answer.rejected else []
            await _answer(send, 503 if answer.rejected else 202, answer, retry)
            return
        request = decoded
        try:
            accepted = await self._hive.submit_request(request)
            if accepted.duplicate:
                view = await self._hive.get(accepted.id)
                await _answer(send, 200, {"id": accepted.id, "status": view.status, "duplicate": True})
            else:
                await _answer(send, 202, {"id": accepted.id, "status": "queued"})
        except TooLarge as exc:
            await _error(send, "too_large", str(exc), status=413)
        except QueueFull as exc:
            await _error(send, "queue_full", str(exc), str(int(exc.retry_after_s)))
        except BusUnavailable as exc:
            log.warning("POST /v1/tasks: %s", exc)
            await _error(send, "bus_unavailable", str(exc), "5")

    async def _read(self, receive: Receive, limit_bytes: int) -> tuple[bytes, bool]:
        """The body, and whether it is all there within the limit (else what was read so far)."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(parts), False
            chunk = message.get("body", b"")
            parts.append(chunk)
            size += len(chunk)
            if size > limit_bytes:
                return b"".join(parts), False
            if not message.get("more_body", False):
                return b"".join(parts), True

    def _decode(self, scope: Scope, body: bytes, decoder: Guarded[Any]) -> Any:
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        if not content_type.startswith(b"application/json"):
            return None
        try:
            return decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None  # the route says what is wrong, in its own words


def _too_deep(body: bytes, batch: bool) -> dict[str, str] | None:
    """The error of a body nested deeper than the bus carries, naming the field; None if it is not."""
    try:
        check_json(body, enclosing=3 if batch else 1)  # a batch's tasks are in {"tasks": [...]}
    except NestedTooDeep as exc:
        return {"message": explain_error(exc), "field": exc.field}
    return None


def _replay(body: bytes, whole: bool, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> ReceiveMessage:
        nonlocal sent
        if not sent:
            sent = True
            first: HTTPRequestEvent = {"type": "http.request", "body": body, "more_body": not whole}
            return first
        return await receive()

    return replayed


async def _answer(
    send: Send, status: int, content: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = _encode(content)
    headers = [_JSON, (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _error(
    send: Send, code: str, message: str, retry_after: str | None = None, *, status: int = 503
) -> None:
    body = _encode({"error": {"code": code, "message": message}})
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _too_large_body(send: Send, receive: Receive, limit: int, what: str, read_bytes: int) -> None:
    """413 naming the limit, then the rest of the body read and thrown away (up to
    :data:`DRAIN_MAX_BYTES`, for up to :data:`DRAIN_MAX_S`) before the connection closes: a client still
    sending when the server closes gets a connection reset instead of the answer."""
    message = f"the request body is larger than the gateway's limit of {limit} bytes for {what}"
    body = _encode({"error": {"code": "body_too_large", "message": message}})
    headers = [_JSON, (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": True})
    with anyio.move_on_after(DRAIN_MAX_S):
        while read_bytes < DRAIN_MAX_BYTES:
            message_in = await receive()
            if message_in["type"] != "http.request":
                break
            read_bytes += len(message_in.get("body", b""))
            if not message_in.get("more_body", False):
                break
    await send({"type": "http.response.body", "body": b"", "more_body": False})
