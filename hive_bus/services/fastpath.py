"""The gateway's hot path: ``POST /v1/tasks`` with a valid task (and ``POST /v1/tasks/batch`` with a
valid batch), served without the framework's per-request work (signature model, dependency injection,
response negotiation).

On a Raspberry Pi the gateway's CPU per submission is its capacity, and that work cost about as much as
a whole ``GET /healthz``. This layer sits inside the gateway's edge (tokens, hosts, content types) and
outside the framework (its router and middleware are skipped too), and takes only the common case: a JSON body within the size limit that decodes, with the same msgspec decoder, into a valid
:class:`TaskRequest`. It answers exactly what the route would (202 ``{"id", "status"}``, 200 for a
known idempotency key, in the body or the ``Idempotency-Key`` header, 503 with ``Retry-After`` when
the bus does not store it), built by the same functions (:mod:`services.answers`). A body too large or
nested too deep is answered here; anything else, not JSON or not a valid task, goes on to the route
with the body replayed.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPRequestEvent, Receive, ReceiveMessage, Scope, Send

from hive_bus import BusUnavailable, Hive, HiveError
from hive_bus._messages import request_decoder
from hive_bus._nesting import Guarded

from . import answers
from .api import BATCH_MAX_BODY_BYTES, BatchRequest

log = logging.getLogger("hive_bus.gateway")

_JSON = (b"content-type", b"application/json")
_PATHS = frozenset({"/v1/tasks", "/v1/tasks/batch"})
_batch_decoder = Guarded(msgspec.json.Decoder(BatchRequest), enclosing=3)
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
        if scope["type"] != ScopeType.HTTP or scope["method"] != "POST" or scope["path"] not in _PATHS:
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        batch = path == "/v1/tasks/batch"
        limit = BATCH_MAX_BODY_BYTES if batch else self._max_body_bytes
        body, whole = await self._read(receive, limit)
        if not whole and len(body) > limit:
            await _too_large_body(
                send, receive, answers.body_too_large(limit, answers.what_is_posted(path)), len(body)
            )
            return
        if whole and (too_deep := answers.too_deep(body, batch=batch)) is not None:
            await _send(send, too_deep)
            return
        decoded = self._decode(scope, body, _batch_decoder if batch else request_decoder) if whole else None
        if decoded is None or _has_webhook(decoded):  # a webhook's address is checked by its route
            await self._app(scope, _replay(body, whole, receive), send)
            return
        try:
            if batch:
                answer = answers.batch_size_error(len(decoded.tasks), self._max_batch)
                answer = answer or await answers.submit_many(self._hive, decoded.tasks)
            else:
                answer = await answers.submit_one(self._hive, decoded, _key_header(scope))
        except HiveError as exc:
            answer = answers.of_error(exc) or _internal(path)
            if isinstance(exc, BusUnavailable):
                log.warning("POST %s: %s", path, exc)
        except Exception:
            answer = _internal(path)
        await _send(send, answer)

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


def _key_header(scope: Scope) -> str | None:
    """The ``Idempotency-Key`` header, as the route reads it (the first, in Latin-1), or None."""
    key = next((value for name, value in scope["headers"] if name == b"idempotency-key"), None)
    return None if key is None else key.decode("latin-1")


def _internal(path: str) -> answers.Answer:
    """What the gateway's handler of unexpected errors answers (this layer is outside the framework)."""
    log.exception("POST %s failed", path)
    return answers.error(500, "internal", "the gateway failed to answer this request; its log says why")


def _has_webhook(decoded: Any) -> bool:
    tasks = decoded.tasks if hasattr(decoded, "tasks") else [decoded]
    return any(task.webhook is not None for task in tasks)


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


async def _send(send: Send, answer: answers.Answer) -> None:
    body = answer.body()
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in answer.headers.items()]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _too_large_body(send: Send, receive: Receive, answer: answers.Answer, read_bytes: int) -> None:
    """413 naming the limit, then the rest of the body read and thrown away (up to
    :data:`DRAIN_MAX_BYTES`, for up to :data:`DRAIN_MAX_S`) before the connection closes: a client still
    sending when the server closes gets a connection reset instead of the answer."""
    body = answer.body()
    headers = [_JSON, (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
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
