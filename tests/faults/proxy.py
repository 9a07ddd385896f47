"""A fault-injecting TCP proxy for the link between a worker and nats-server.

It runs asyncio in a thread of its own, so that nothing the test does on its own event loop (or a
blocking call) disturbs the link it is supposed to model. Modes:

- ``pass_through()``: bytes flow both ways as they arrive;
- ``latency(delay_s)``: each chunk is held ``delay_s`` before it goes on, both ways;
- ``blackhole()``: nothing flows and nothing is refused: bytes wait (TCP backpressure, as with a
  partition whose packets are dropped and retransmitted), new connections are accepted and hang;
- ``reset()``: every open connection is reset (RST, as when a NAT or the peer lost its state), and
  new ones are reset as they come, until another mode is chosen.

It binds 127.0.0.1 only; :meth:`stop` closes everything and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

Mode = Literal["pass", "latency", "blackhole", "reset"]
T = TypeVar("T")
CHUNK_BYTES = 64 * 1024
CALL_TIMEOUT_S = 10.0


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None


class FaultProxy:
    """``with FaultProxy(port) as proxy:`` then point a client at ``proxy.url``."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.accepted = 0  # connections accepted, over the proxy's life
        self.reset_count = 0  # connections reset
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing: asyncio.Event | None = None
        self.port = 0

    # lifecycle (from the test's thread) ------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self.port = self._call(self._start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(TimeoutError, RuntimeError):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    # modes -----------------------------------------------------------------------------------------

    def pass_through(self) -> None:
        self._call(self._set_mode("pass", 0.0))

    def latency(self, delay_s: float) -> None:
        self._call(self._set_mode("latency", delay_s))

    def blackhole(self) -> None:
        self._call(self._set_mode("blackhole", 0.0))

    def reset(self) -> None:
        self._call(self._set_mode("reset", 0.0))

    @property
    def open_links(self) -> int:
        return self._call(self._count())

    # on the proxy's loop ---------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT_S)

    async def _count(self) -> int:
        return len(self._links)

    async def _start(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            _abort(link.client)
            if link.upstream is not None:
                _abort(link.upstream)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _set_mode(self, mode: Mode, delay_s: float) -> None:
        assert self._flowing is not None
        self.mode, self.delay_s = mode, delay_s
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode == "reset":
            for link in list(self._links):
                self._reset(link)

    def _reset(self, link: _Link) -> None:
        self.reset_count += 1
        _abort(link.client)
        if link.upstream is not None:
            _abort(link.upstream)
        self._links.discard(link)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.accepted += 1
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)
            me.add_done_callback(self._tasks.discard)
        link = _Link(writer)
        if self.mode == "reset":
            self._reset(link)
            return
        self._links.add(link)
        try:
            await self._flowing.wait()  # a blackhole holds new connections too
            if link not in self._links:  # reset meanwhile
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            link.upstream = up_writer
            if link not in self._links:
                _abort(up_writer)
                return
            pumps = [
                asyncio.ensure_future(self._pump(reader, up_writer)),
                asyncio.ensure_future(self._pump(up_reader, writer)),
            ]
            for task in pumps:
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            # when either direction ends, the link ends
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pumps:
                task.cancel()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if link in self._links:
                self._links.discard(link)
                _close(link.client)
                if link.upstream is not None:
                    _close(link.upstream)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK_BYTES):
                await self._flowing.wait()  # a blackhole: hold the bytes, read no more
                if self.mode == "latency" and self.delay_s > 0:
                    await asyncio.sleep(self.delay_s)
                    await self._flowing.wait()
                writer.write(data)
                await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST: SO_LINGER on, zero seconds."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        writer.close()
