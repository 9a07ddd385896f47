"""The HTTP gateway: a thin Litestar app that turns HTTP submissions into JetStream messages.

Litestar was chosen because it decodes and validates request bodies with msgspec natively (the same
Structs the bus uses, so the HTTP and wire shapes cannot drift) and generates an OpenAPI document from
them. uvicorn serves it, parsing HTTP with httptools where it is installed (h11 otherwise), on the
event loop that the ``hive`` command chose (uvloop where installed; see :mod:`hive_bus._loop`).

Every error answer is JSON of the form ``{"error": {"code": ..., "message": ..., "field": ...}}``, built
by :mod:`services.answers` (which the fast path of :mod:`services.fastpath` uses too).
"""

# No "from __future__ import annotations" here: Litestar reads the parameter markers at run time.
import asyncio
import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus
from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ASGIApp

from hive_bus import BusUnavailable, Hive, HiveError, NoRoom, QueueFull, TaskNotFound
from hive_bus._audit import StoreAudit
from hive_bus._bus import ensure_cache_stream, retire_shared_blobs
from hive_bus._dlq import NotReplayable
from hive_bus._errors import TaskEnded, TooLarge
from hive_bus._expiry import Timers
from hive_bus._files import FileNotFound
from hive_bus._messages import explain, field_named
from hive_bus._nats import BUS_ERRORS
from hive_bus._router import Router
from hive_bus._routes import Routes

from . import answers, apidocs, dashboard, openai_stream
from .api import AUDIT_ROUTES, METRICS_ROUTES, ROUTES, as_response
from .auth import Tokens, check_exposure
from .batch_runner import BatchRunner
from .batches_api import BATCH_ROUTES
from .board_api import BOARD_ROUTES, TASK_ROUTES, WebhookWatch
from .dlq_api import DLQ_ROUTES
from .edge import Edge
from .fastpath import FastSubmit
from .feeds import FEEDS_AT_ONCE, Feeds
from .files_api import FILE_ROUTES
from .limits import ConnectionLimits, HttpChoice, ensure_file_limit, http_parser, limited_protocol
from .list_reads import ListReadLimits, ListReads
from .metrics import BusMetrics
from .openai_chat import CHAT_ROUTES, DEFAULT_CHAT_WAIT_S, Catalog
from .openai_errors import of_answer, speaks_openai
from .room import Room
from .schedules_api import SCHEDULE_ROUTES
from .webhooks import WebhookConfigError, Webhooks, WebhookSettings
from .webhooks.api import ROUTES as WEBHOOK_ROUTES

log = logging.getLogger("hive_bus.gateway")


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    # one task's body: room for a task's content up to the bus's blob_max_bytes (16 MiB), escapes included
    max_body_bytes: int = 20 * 1024 * 1024
    max_batch: int = 500
    tokens: Tokens = field(default_factory=Tokens)
    # How long one GET /v1/events connection lasts; its client reconnects with Last-Event-ID.
    feed_max_s: float = 3600.0
    # Time to send a request, and how many connections at once (size LimitNOFILE above this).
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    # A streamed chat completion sends an SSE comment after this long without news (a task queued).
    stream_keepalive_s: float = openai_stream.DEFAULT_STREAM_KEEPALIVE_S
    # uvicorn's HTTP parser: httptools where installed (about twice h11's rate), else h11 (limits.http_parser)
    http: HttpChoice = "auto"
    # False sends every submission through its route: the same answers, for more CPU (services.fastpath);
    # tests/test_submit_parity.py compares the two.
    fast_path: bool = True
    # The aliases that chat completions' ``model`` may name (hive_bus._routes), and how long a chat
    # completion waits for its task when the request does not say (X-Hive-Wait).
    routes: Routes = field(default_factory=Routes)
    chat_wait_s: float = DEFAULT_CHAT_WAIT_S
    # webhooks (services.webhooks): none are sent without a secret
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    # how many task lists (GET /v1/tasks) the gateway reads at once, and how long one waits its turn
    list_reads: ListReadLimits = field(default_factory=ListReadLimits)
    # how many event feeds (GET /v1/events, GET /v1/tasks/{id}/events) the gateway serves at once
    feeds_at_once: int = FEEDS_AT_ONCE


# errors ------------------------------------------------------------------------------------------


def _answer(request: Request[Any, Any, Any], answer: answers.Answer) -> Response[Any]:
    """An error answer in the shape of its path: OpenAI's on the routes of OpenAI's API, else the
    gateway's own."""
    return of_answer(answer).response() if speaks_openai(request.url.path) else as_response(answer)


def _error(
    request: Request[Any, Any, Any], status: int, code: str, message: str, *, field: str | None = None
) -> Response[Any]:
    return _answer(request, answers.error(status, code, message, field=field))


def on_validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    problems = exc.extra if isinstance(exc.extra, list) else []
    if not problems:
        return _error(request, 400, "invalid_request", str(exc.detail))
    first = problems[0]
    key = str(first.get("key", ""))
    message = str(first.get("message", exc.detail))
    if first.get("source") == "query":
        return _answer(request, answers.invalid(f"query parameter {key!r}: {message}", field=key))
    if first.get("source") == "body" and key == "data":  # about the body's object itself
        if message == "'data'":  # Litestar's words for an empty body
            return _answer(request, answers.invalid("the request body is empty; send a JSON object"))
        key = ""
    return _answer(request, answers.invalid(explain(key, message), field=field_named(message, key) or None))


def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}
    message = str(exc.detail)
    if exc.status_code == 413:
        own, app = request.route_handler.request_max_body_size, request.app.request_max_body_size
        limit = next((n for n in (own, app) if isinstance(n, int)), 0)  # a route's own limit, else the app's
        return _answer(request, answers.body_too_large(limit, answers.what_is_posted(request.url.path)))
    if exc.status_code == 400:
        # Validation errors have their own handler; what reaches here is a body that did not decode.
        return _answer(request, answers.not_json(message.removeprefix("JSON is malformed: ")))
    return _error(request, exc.status_code, code.get(exc.status_code, "bad_request"), message)


def on_submission_error(request: Request[Any, Any, Any], exc: HiveError) -> Response[Any]:
    """The bus did not accept something (too large, queue full, bus down), in any route."""
    if isinstance(exc, BusUnavailable | NoRoom):
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    answer = answers.of_error(exc)
    return on_internal_error(request, exc) if answer is None else _answer(request, answer)


def on_not_found(request: Request[Any, Any, Any], exc: TaskNotFound) -> Response[Any]:
    return _error(request, 404, "task_not_found", str(exc))


def on_file_not_found(request: Request[Any, Any, Any], exc: FileNotFound) -> Response[Any]:
    return _error(request, 404, "file_not_found", str(exc))


def on_task_ended(request: Request[Any, Any, Any], exc: TaskEnded) -> Response[Any]:
    return _error(request, 409, "task_ended", str(exc))


def on_not_replayable(request: Request[Any, Any, Any], exc: NotReplayable) -> Response[Any]:
    return _error(request, 409, "not_replayable", str(exc))


def on_internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("%s %s failed", request.method, request.url.path)
    return _error(request, 500, "internal", "the gateway failed to answer this request; its log says why")


def create_app(
    hive: Hive,
    options: GatewayOptions | None = None,
    metrics: BusMetrics | None = None,
    stopping: threading.Event | None = None,
    audit: StoreAudit | None = None,
    room: Room | None = None,
) -> ASGIApp:
    """The gateway app, serving ``hive``'s bus, behind its :class:`Edge` (tokens, hosts, content types,
    ids, disconnects). Long answers (event feeds) end once ``stopping`` is set."""
    options = options or GatewayOptions()
    state = {
        "hive": hive,
        "max_batch": options.max_batch,
        "metrics": metrics,
        "stopping": stopping or threading.Event(),
        "feed_max_s": options.feed_max_s,
        "audit": audit,
        "room": room,
        "catalog": Catalog(hive, options.routes),
        "chat_wait_s": options.chat_wait_s,
        "stream_keepalive_s": options.stream_keepalive_s,
        "webhooks": options.webhooks,
        "webhook_watch": WebhookWatch(),
        "list_reads": ListReads(options.list_reads),
        "feeds": Feeds(options.feeds_at_once),
    }
    app = Litestar(
        route_handlers=[
            *ROUTES,
            *DLQ_ROUTES,
            *FILE_ROUTES,
            *BATCH_ROUTES,
            *SCHEDULE_ROUTES,
            *CHAT_ROUTES,
            *WEBHOOK_ROUTES,
            *(METRICS_ROUTES if metrics is not None else []),
            *(BOARD_ROUTES if metrics is not None else []),
            *TASK_ROUTES,
            *(AUDIT_ROUTES if audit is not None else []),
            *dashboard.ROUTES,
            apidocs.docs,
        ],
        state=State(state),
        openapi_config=apidocs.openapi_config(),
        request_max_body_size=options.max_body_bytes,
        exception_handlers={
            ValidationException: on_validation_error,
            HTTPException: on_http_error,
            BusUnavailable: on_submission_error,
            QueueFull: on_submission_error,
            NoRoom: on_submission_error,
            TooLarge: on_submission_error,
            TaskNotFound: on_not_found,
            TaskEnded: on_task_ended,
            FileNotFound: on_file_not_found,
            NotReplayable: on_not_replayable,
            Exception: on_internal_error,
        },
        logging_config=None,
    )
    # the fast path sits outside the framework: a submission skips its router and middleware too
    fast = FastSubmit(app, hive, options.max_body_bytes, options.max_batch) if options.fast_path else app
    return Edge(fast, options.tokens)


# serving -----------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling: ``hive`` handles signals and stops us by itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


# The gateway's own latest tasks its client remembers (hive_bus.Hive.remember_own): about 1 MB.
OWN_TASKS = 4096


class GatewayError(RuntimeError):
    """The gateway could not start; the message says why in one line."""


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only on connections whose
    # socket says TCP, and without that every answer on a kept-alive connection waits ~40 ms for the
    # client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise GatewayError(f"port {port} on {host} is taken; choose another with --port") from None
        raise GatewayError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Gateway:
    """The gateway's HTTP server: ``await tg.start(gateway.serve)``, later :meth:`stop`."""

    def __init__(self, hive: Hive, options: GatewayOptions, *, sock: socket.socket | None = None) -> None:
        check_exposure(options.host, options.tokens)
        ensure_file_limit(options.limits.max_connections)
        self.options = options
        self._hive = hive
        # a wait here comes right after its submission, and no results() read: the last few are enough
        hive.remember_own(OWN_TASKS)
        self.metrics = BusMetrics(hive.bus)
        self.router = Router(hive.bus)
        # deadlines, starts and recurring schedules fired in the server
        self.timers = Timers(hive.bus, hive, self.metrics.registry)
        # drives every batch of the bus (OpenAI's Batch API), beside any other gateway's
        self.batches = BatchRunner(hive, Catalog(hive, options.routes))
        settings = hive.bus.settings
        self.audit = StoreAudit(hive.bus, grace_s=settings.audit_grace_s, every_s=settings.audit_every_s)
        # whether JetStream stores writes: GET /readyz, hive_bus_writable
        self.room = Room(hive.bus, self.metrics.registry)
        enabled = options.webhooks.enabled
        self.webhooks = Webhooks(hive.bus, options.webhooks, self.metrics.registry) if enabled else None
        self._stopping = threading.Event()
        self.parser = http_parser(options.http)
        self._sock = sock or bind(options.host, options.port)
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(hive, options, self.metrics, self._stopping, self.audit, self.room),
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            http=limited_protocol(options.limits, self.parser),
            timeout_keep_alive=options.limits.keep_alive_s,
            # nothing here reads the client's address or scheme: no X-Forwarded-* middleware per request
            proxy_headers=False,
            # h11's own cap on a request's head, above the limits' own (which answers 431 first)
            h11_max_incomplete_event_size=2 * options.limits.max_head_bytes,
        )
        self._server = _Server(config)

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.port}"

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with self._sock:  # uvicorn does not close a socket it was handed
            if self.webhooks is not None:
                try:
                    await self.webhooks.check()
                except WebhookConfigError as exc:
                    raise GatewayError(str(exc)) from None
            await self._serve(task_status)

    async def _serve(self, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:

            async def http_then_done() -> None:
                await self._server.serve([self._sock])
                tg.cancel_scope.cancel()  # uvicorn has stopped: so does the metrics follower

            # the claim check bucket of every provider that older hubs kept, once empty
            await retire_shared_blobs(self._hive.bus.js, self._hive.bus.settings)
            try:  # the response cache's bucket, before a worker that may not create it needs it
                await ensure_cache_stream(self._hive.bus.js, self._hive.bus.settings)
            except (*BUS_ERRORS, HiveError) as exc:
                log.warning("the response cache cannot be used: %s", exc)
            try:  # which providers are served: submissions are checked against it (hive_bus._served)
                await self._hive.follow_served(record=True)
            except (*BUS_ERRORS, HiveError) as exc:
                log.warning("providers served lately cannot be followed: %s", exc)
            await tg.start(self.metrics.run)
            await tg.start(self.room.run)
            await tg.start(self.router.run)
            await tg.start(self.timers.run)
            await tg.start(self.audit.run)
            if self.webhooks is not None:
                await tg.start(self.webhooks.run)
            await tg.start(self.batches.run)
            tg.start_soon(http_then_done)
            with anyio.fail_after(10):
                while not self._server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
                    await anyio.sleep(0.01)
            loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]  # uvloop or asyncio
            log.info("gateway listening on %s (uvicorn, %s, %s)", self.url, self.parser, loop)
            task_status.started()

    def stop(self) -> None:
        self._stopping.set()  # event feeds end now, rather than hold the stop for its grace period
        self._server.should_exit = True
