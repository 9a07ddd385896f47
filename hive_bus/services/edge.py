"""The gateway's edge: what every request must pass before it is routed, and the end of a request whose
client has gone.

In order, each refusal a JSON error answer naming what is wrong (in OpenAI's shape on the paths of
OpenAI's files and batches, :mod:`services.openai_errors`):

- **401** without an accepted bearer token (see :mod:`services.auth`), for every path that is not
  open, known or not: no route can be found without a token.
- **421** without gateway tokens, for a ``Host`` that is not a loopback name (``localhost``,
  ``127.0.0.1``, ``[::1]``, with any port): a web page whose name was rebound to 127.0.0.1 (DNS
  rebinding) is not served.
- **403** without gateway tokens, for a POST, PUT, PATCH or DELETE sent by a page of another origin
  (its ``Origin`` is not this gateway's): a web page cannot make a tokenless gateway act.
- **415** for a request body that is not declared JSON (``Content-Type: application/json``): every
  body the gateway takes is JSON, and a page can send ``text/plain`` across sites without asking;
  except a file upload (``POST /v1/files``), which is ``multipart/form-data``.
- **400** for a task id in a path that is not one (26 characters of Crockford base32), before it
  reaches a subject on the bus or a log line.

A GET whose client goes away is cancelled at once: a wait (``?wait=``), a task's event stream and the
feed of every event end with their connection, rather than hold their handler until their time is up;
so is a chat completion (a POST that waits for its task) once its body has been read. The task goes on.
The few GETs that answer at once (health, readiness, metrics, stats) are spared the watch: a task group
and a listening task cost a probe or a scrape more than its own answer.
"""

from __future__ import annotations

import functools
import re

import anyio
import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPScope, Message, Receive, ReceiveMessage, Scope, Send

from hive_bus._messages import is_task_id

from . import answers
from .auth import ENV_TOKENS, Tokens, authorized, is_loopback
from .openai_errors import of_answer, speaks_openai

_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_BODILESS = frozenset({"GET", "HEAD"})
# POSTs whose answer waits for a task: ended, like a GET's wait, when their client goes away
_HELD_POSTS = frozenset({"/v1/chat/completions"})
# GETs whose handler answers without waiting on anything a client could tire of (see the docstring)
_INSTANT = frozenset({"/healthz", "/readyz", "/metrics", "/v1/stats"})
# /v1/tasks/{task_id}, /v1/tasks/{task_id}/events, /v1/tasks/{task_id}/timeline, /v1/tasks/{task_id}/cancel,
# /v1/dlq/{task_id}, /v1/dlq/{task_id}/replay
_ID_PATH = re.compile(
    r"/v1/(?:tasks/(?!(?:batch|cancel)\Z)([^/]+)(?:/events|/timeline|/cancel)?|dlq/([^/]+)(?:/replay)?)\Z"
)
# a task whose message on the bus could not be decoded is dead-lettered under this name
_UNDECODABLE_ID = re.compile(r"undecodable-[0-9]{1,20}\Z")


class Edge:
    """ASGI layer around the whole app (outside its router); see the module's docstring."""

    def __init__(self, app: ASGIApp, tokens: Tokens) -> None:
        self._app = app
        self._tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self._app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refuse(send, *refusal, openai=speaks_openai(scope["path"]))
        elif scope["method"] in _BODILESS and scope["path"] not in _INSTANT:
            await _cancelled_when_gone(self._app, scope, receive, send)
        elif scope["path"] in _HELD_POSTS:
            await _held_post_cancelled_when_gone(self._app, scope, receive, send)
        else:
            await self._app(scope, receive, send)

    def _refusal(
        self, scope: HTTPScope, headers: dict[bytes, bytes]
    ) -> tuple[int, str, str, str | None] | None:
        path: str = scope["path"]
        method: str = scope["method"]
        if not authorized(self._tokens, path, headers.get(b"authorization", b"")):
            return 401, "unauthorized", "this route needs Authorization: Bearer <token>", None
        if not self._tokens.enabled:
            host = headers.get(b"host")
            if host is not None and not _is_loopback_authority(host):
                return 421, "misdirected_request", _not_loopback(host), None
            origin = headers.get(b"origin")
            if method in _UNSAFE and origin is not None and not _same_origin(origin, host):
                return 403, "cross_origin", _cross_origin(origin), None
        if _has_body(headers):
            content_type = headers.get(b"content-type", b"")
            if path in _UPLOADS and method == "POST":
                if _media_type(content_type) != "multipart/form-data":
                    return 415, "unsupported_media_type", _not_multipart(headers.get(b"content-type")), None
            elif not _is_json(content_type):
                return 415, "unsupported_media_type", _not_json(headers.get(b"content-type")), None
        match = _ID_PATH.match(path)
        if match is not None:
            task_id = match.group(1) if match.group(1) is not None else match.group(2)
            dead_letter = match.group(2) is not None
            if not (is_task_id(task_id) or (dead_letter and _UNDECODABLE_ID.match(task_id))):
                message = f"{_shown(task_id)} is not a task id (26 characters of Crockford base32)"
                return 400, "invalid_request", message, "task_id"
        return None


async def refuse(
    send: Send, status: int, code: str, message: str, field: str | None = None, *, openai: bool = False
) -> None:
    """Answer with the gateway's JSON error shape (OpenAI's with ``openai``), before the app has seen
    the request."""
    answer = answers.error(status, code, message, field=field)
    body = msgspec.json.encode(of_answer(answer).body) if openai else answer.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _cancelled_when_gone(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run a request without a body, cancelled as soon as its client disconnects.

    The server tells of a disconnect only through ``receive``, which a handler that waits on the bus
    never calls; so this layer listens instead, and gives the app the (empty) body and then, when it
    asks again, the disconnect."""
    gone = anyio.Event()
    answered = False
    given = False

    async def app_receive() -> ReceiveMessage:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def app_send(message: Message) -> None:
        nonlocal answered
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered = True  # the server answers every later receive() with a disconnect
        await send(message)

    async with anyio.create_task_group() as tg:

        async def listen() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if not answered:
                        tg.cancel_scope.cancel()
                    return

        tg.start_soon(listen)
        await app(scope, app_receive, app_send)
        tg.cancel_scope.cancel()


async def _held_post_cancelled_when_gone(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run a request with a body, cancelled as soon as its client disconnects: as
    :func:`_cancelled_when_gone`, but this layer hands the app the body as it arrives, then listens on."""
    body_in, body_out = anyio.create_memory_object_stream[ReceiveMessage](max_buffer_size=16)
    gone = anyio.Event()
    answered = False

    async def app_receive() -> ReceiveMessage:
        try:
            return await body_out.receive()
        except anyio.EndOfStream:  # the whole body was handed over
            await gone.wait()
            return {"type": "http.disconnect"}

    async def app_send(message: Message) -> None:
        nonlocal answered
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered = True
        await send(message)

    async with anyio.create_task_group() as tg:

        async def listen() -> None:
            reading = True
            with body_in:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        gone.set()
                        if not answered:
                            tg.cancel_scope.cancel()
                        return
                    if reading:
                        await body_in.send(message)
                        reading = bool(message.get("more_body", False))
                        if not reading:
                            body_in.close()

        tg.start_soon(listen)
        with body_out:
            await app(scope, app_receive, app_send)
        tg.cancel_scope.cancel()


# the checks ---------------------------------------------------------------------------------------


def _host_name(authority: bytes) -> str:
    """The name in a ``Host`` or origin authority: ``[::1]:8080`` -> ``::1``, ``localhost:80`` ->
    ``localhost``."""
    text = authority.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    name, _, port = text.rpartition(":")
    return name if name and port.isdigit() else text


@functools.lru_cache(maxsize=64)  # a gateway sees a handful of Host values: parsing one costs a POST ~10 %
def _is_loopback_authority(authority: bytes) -> bool:
    return is_loopback(_host_name(authority))


def _same_origin(origin: bytes, host: bytes | None) -> bool:
    scheme, _, authority = origin.decode("latin-1").strip().lower().partition("://")
    if scheme not in ("http", "https") or host is None:
        return False  # "null" (a sandboxed page, a file) included
    return authority == host.decode("latin-1").strip().lower() and _is_loopback_authority(host)


def _has_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length", b"").strip()
    return b"transfer-encoding" in headers or (bool(length) and length != b"0")


# Paths whose POST body is a file upload (multipart/form-data, as OpenAI's Files API takes it).
_UPLOADS = frozenset({"/v1/files"})


def _media_type(content_type: bytes) -> str:
    return content_type.decode("latin-1").partition(";")[0].strip().lower()


def _is_json(content_type: bytes) -> bool:
    kind, _, subtype = _media_type(content_type).partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def _shown(value: bytes | str, limit: int = 64) -> str:
    """A value from the request, quoted and escaped (no raw newline reaches an answer or a log)."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _not_loopback(host: bytes) -> str:
    return (
        f"this gateway has no token, so it serves only requests addressed to a loopback name (localhost, "
        f"127.0.0.1, [::1]); Host {_shown(host)} is not one. Set {ENV_TOKENS} to serve other names"
    )


def _cross_origin(origin: bytes) -> str:
    return (
        f"this gateway has no token, so it takes no {', '.join(sorted(_UNSAFE))} from a page of another "
        f"origin ({_shown(origin)}); set {ENV_TOKENS} and send a bearer token"
    )


def _not_json(content_type: bytes | None) -> str:
    given = "no Content-Type" if content_type is None else f"Content-Type {_shown(content_type)}"
    return f"the request body must be JSON, sent with Content-Type: application/json; this one has {given}"


def _not_multipart(content_type: bytes | None) -> str:
    given = "no Content-Type" if content_type is None else f"Content-Type {_shown(content_type)}"
    return f"a file is uploaded as multipart/form-data (fields purpose and file); this request has {given}"
