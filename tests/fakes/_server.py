"""One loopback HTTP server that answers for all four providers, as their real servers would.

Why the standard library's ``ThreadingHTTPServer`` rather than uvicorn: it runs on plain threads, apart
from any event loop, so it serves async tests, sync tests and worker processes alike without sharing
the test's loop; it starts and stops synchronously in milliseconds; it needs no signal handlers; and a
thread per connection gives real concurrency for ``delay_s``. HTTP/1.1 keep-alive is on, as the SDKs'
connection pools expect.

Bounds: it binds 127.0.0.1 on a free port, idle connections close after ``IDLE_TIMEOUT_S``, ``stop()``
closes every open connection and joins every thread with a deadline, and a timer stops the server by
itself after ``max_lifetime_s`` if nobody does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from ._api import ProviderApi, Route, StreamReply
from ._common import BadRequest, ChatRequest, Reply, json_reply_text, pieces, reply_text, words
from ._state import Admitted, Forced, ProviderState, RateLimited, Unauthorized
from .anthropic_api import AnthropicApi
from .gemini_api import GeminiApi
from .groq_api import GroqApi
from .openai_api import OpenAIApi

IDLE_TIMEOUT_S = 10.0
MAX_BODY_BYTES = 16 * 1024 * 1024
STOP_DEADLINE_S = 5.0


class ProviderFakes:
    """Gemini, Groq, Anthropic and an OpenAI-compatible server behind one ``http://127.0.0.1:PORT``.

    ``with ProviderFakes() as fakes:`` starts it; each provider's knobs and counters are in
    ``fakes.gemini``, ``fakes.groq``, ``fakes.anthropic`` and ``fakes.openai``; point the SDKs at
    ``fakes.gemini_base_url`` and the like.
    """

    def __init__(self, *, max_lifetime_s: float = 600.0) -> None:
        self.max_lifetime_s = max_lifetime_s
        self.gemini = ProviderState("gemini")
        self.groq = ProviderState("groq")
        self.anthropic = ProviderState("anthropic")
        self.openai = ProviderState("openai")
        self._apis: dict[str, ProviderApi] = {
            "gemini": GeminiApi(),
            "groq": GroqApi(),
            "anthropic": AnthropicApi(),
            "openai": OpenAIApi(),
        }
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._stopped: threading.Event | None = None
        self._errors: list[BaseException] = []

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> ProviderFakes:
        with self._lock:
            if self._server is not None:
                return self
            server = _Server(self)
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="provider-fakes",
                daemon=True,
            )
            timer = threading.Timer(self.max_lifetime_s, self.stop)
            timer.daemon = True
            self._server, self._thread, self._timer = server, thread, timer
            self._stopped = threading.Event()
        thread.start()
        timer.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every connection and join every thread; safe to call twice."""
        with self._lock:
            server, thread, timer, stopped = self._server, self._thread, self._timer, self._stopped
            self._server = self._thread = self._timer = None
        if stopped is None:
            return  # never started
        if server is None:
            stopped.wait(STOP_DEADLINE_S)  # another thread (the lifetime timer) is stopping it
            return
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
        deadline = time.monotonic() + STOP_DEADLINE_S
        server.stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        server.join_handlers(deadline)
        stopped.set()

    def __enter__(self) -> ProviderFakes:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- where to point the SDKs ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        server = self._server
        if server is None:
            raise RuntimeError("the provider fakes are not running")
        return int(server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gemini_base_url(self) -> str:
        """For ``HttpOptions(base_url=...)`` or ``GOOGLE_GEMINI_BASE_URL``; the SDK adds ``/v1/models/...``."""
        return self.url

    @property
    def groq_base_url(self) -> str:
        """For ``AsyncGroq(base_url=...)`` or ``GROQ_BASE_URL``; the SDK adds ``/openai/v1/...``."""
        return self.url

    @property
    def anthropic_base_url(self) -> str:
        """For ``AsyncAnthropic(base_url=...)`` or ``ANTHROPIC_BASE_URL``; the SDK adds ``/v1/messages``."""
        return self.url

    @property
    def openai_base_url(self) -> str:
        """For ``AsyncOpenAI(base_url=...)`` or ``OPENAI_BASE_URL``; the SDK adds ``/chat/completions``."""
        return self.url + "/v1"

    # -- state ---------------------------------------------------------------------------------------

    def providers(self) -> Iterator[ProviderState]:
        yield from (self.gemini, self.groq, self.anthropic, self.openai)

    def reset(self) -> None:
        """Reset all four providers."""
        for state in self.providers():
            state.reset()

    @property
    def server_errors(self) -> list[BaseException]:
        """Exceptions raised inside the fakes while answering (a bug in the fakes, not an API error)."""
        with self._lock:
            return list(self._errors)

    def _record_error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    def _route(self, method: str, path: str) -> tuple[ProviderApi, ProviderState, Route | None]:
        for name, api in self._apis.items():
            route = api.route(method, path)
            if route is not None:
                return api, getattr(self, name), route
        # Not an endpoint the fakes serve: answer in the style of the API the path looks like.
        if path.startswith("/openai/"):
            name = "groq"
        elif "/models/" in path and not path.startswith("/v1/models/"):
            name = "gemini"
        elif path.startswith("/v1/messages"):
            name = "anthropic"
        else:
            name = "openai"
        return self._apis[name], getattr(self, name), None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the default 5 drops bursts of connects, which then retry a second later

    def __init__(self, fakes: ProviderFakes) -> None:
        self.fakes = fakes
        self.stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        self._open_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the host name up; loopback needs no lookup.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

    def track(self, connection: socket.socket) -> None:
        with self._open_lock:
            self._open.add(connection)
            self._handlers.add(threading.current_thread())

    def untrack(self, connection: socket.socket) -> None:
        with self._open_lock:
            self._open.discard(connection)
            self._handlers.discard(threading.current_thread())

    def close_connections(self) -> None:
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)

    def join_handlers(self, deadline: float) -> None:
        with self._open_lock:
            handlers = list(self._handlers)
        for handler in handlers:
            handler.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if exc is None or isinstance(exc, OSError) or self.stopping.is_set():
            return  # a client that went away, or a connection closed by stop()
        self.fakes._record_error(exc)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server_header = "fake"

    @property
    def _server(self) -> _Server:
        return cast(_Server, self.server)

    def setup(self) -> None:
        super().setup()
        self._server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: request lines can carry a Gemini key in the query string, and keys are never logged."""

    def version_string(self) -> str:
        return self.server_header

    def do_POST(self) -> None:
        self._serve("POST")

    def do_GET(self) -> None:
        self._serve("GET")

    def _serve(self, method: str) -> None:
        try:
            body = self._read_body()
            reply = self._answer(method, body)
        except Exception as exc:
            self._server.fakes._record_error(exc)
            reply = Reply(500, {"error": {"message": f"provider fake failed: {type(exc).__name__}"}})
            self.close_connection = True
        if isinstance(reply, StreamReply):
            self._send_stream(reply)
        else:
            self._send(reply)

    def _answer(self, method: str, raw: bytes) -> Reply | StreamReply:
        fakes = self._server.fakes
        split = urlsplit(self.path)
        api, state, route = fakes._route(method, split.path)
        self.server_header = api.server_header
        if route is None or method != "POST":
            return api.not_found(method, split.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        key = api.api_key(headers, parse_qs(split.query))
        refusal = api.precheck(headers)
        if refusal is not None:
            state.admit_invalid(key)
            return refusal
        try:
            body = json.loads(raw or b"null")
            if not isinstance(body, dict):
                raise BadRequest("Invalid JSON payload received. Expected an object.")
            state.seen(body)
            request = api.parse(body, route)
        except (ValueError, BadRequest) as exc:
            refused = state.admit_invalid(key)
            if refused is not None:
                return api.unauthorized(None if refused.missing else key, refused.snapshot, headers)
            message = str(exc) if isinstance(exc, BadRequest) else f"Invalid JSON payload received. {exc}"
            return api.invalid(message)
        if route.stream and parse_qs(split.query).get("alt") != ["sse"]:
            return api.invalid("the fakes serve streamGenerateContent with alt=sse only")
        streamed = route.stream or body.get("stream") is True
        return self._decide(api, state, route, key, headers, request, body if streamed else None)

    def _decide(
        self,
        api: ProviderApi,
        state: ProviderState,
        route: Route,
        key: str | None,
        headers: dict[str, str],
        request: ChatRequest,
        streamed: dict[str, Any] | None = None,
    ) -> Reply | StreamReply:
        """The answer; ``streamed`` is the body of a request for a streamed answer (errors come before
        the stream all the same, as plain answers)."""
        decision = state.admit(key, request.prompt, request.model)
        if isinstance(decision, Forced):
            if decision.status == 429:
                return api.forced_rate_limit(request, decision.retry_after_s, decision.snapshot)
            return api.error(decision.status, request, route, decision.snapshot)
        if isinstance(decision, Unauthorized):
            return api.unauthorized(None if decision.missing else key, decision.snapshot, headers)
        if isinstance(decision, RateLimited):
            return api.rate_limited(request, decision)
        assert isinstance(decision, Admitted)
        delay_s = state.delay_s
        if delay_s > 0:
            self._server.stopping.wait(delay_s)
        text = state.next_reply()
        if text is None:
            text = json_reply_text(request.prompt) if request.json_mode else reply_text(request.prompt)
        cap = request.max_output_tokens
        if cap is not None and words(text) > cap:  # as a model stops at its token limit
            text = "".join(pieces(text)[:cap])
            request = dataclasses.replace(request, cut=True)
        if streamed is not None:
            return dataclasses.replace(
                api.stream(request, text, decision.snapshot, streamed), prompt=request.prompt
            )
        reply = api.success(request, text, decision.snapshot)
        state.complete(request.prompt)
        return reply

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is not None:
            size = int(length)
            if size > MAX_BODY_BYTES:
                raise ValueError("request body too large for the fakes")
            return self.rfile.read(size)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, then the blank line
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise ValueError("request body too large for the fakes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return b""

    def _send_stream(self, reply: StreamReply) -> None:
        """Each event in a chunk of its own (HTTP/1.1 chunked), spaced and held as the provider's state
        says; the prompt counts as completed once the last event went out."""
        api, state, _ = self._server.fakes._route("POST", urlsplit(self.path).path)
        gate, broken = state.stream_gate, state.stream_break
        try:
            self.send_response(200)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.flush()
            events = list(reply.events)
            if broken is not None:  # the stream fails after that many events
                events = [*events[: broken[0]], api.stream_error(broken[1])]
            for n, event in enumerate(events):
                if gate is not None and n == gate[0]:
                    while not gate[1].wait(0.05) and not self._server.stopping.is_set():
                        pass
                elif n and state.stream_gap_s > 0:
                    self._server.stopping.wait(state.stream_gap_s)
                data = event.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client went away mid-stream
            return
        if broken is None:
            state.complete(reply.prompt)

    def _send(self, reply: Reply) -> None:
        data = reply.encoded()
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client gave up, or stop() closed the connection
