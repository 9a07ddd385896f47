"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx

from hive_bus import Provider, ProviderKey, Task, TaskEvent, Worker, WorkerOptions
from hive_bus._assigned import assignment
from hive_bus._bus import event_providers
from hive_bus._messages import decode_event
from hive_bus._stats import queue_depths
from hive_bus.bus import Bus

REPO = Path(__file__).resolve().parent.parent
HIVE = str(Path(sys.executable).with_name("hive"))
T = TypeVar("T")


@asynccontextmanager
async def running_worker(
    bus: Bus, name: str, provider: Provider | list[ProviderKey], **options: Any
) -> AsyncIterator[Worker]:
    """A worker in this process, stopped (drained) on the way out."""
    options.setdefault("fetch_wait_s", 0.5)
    worker = Worker(bus, provider, WorkerOptions(provider=name, **options))
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        try:
            yield worker
        finally:
            worker.stop()


async def events_of(bus: Bus, task_id: str) -> list[TaskEvent]:
    """Every event recorded for a task, under every provider, in the order they were stored."""
    names = bus.names
    found: list[tuple[float, TaskEvent]] = []
    for provider in await event_providers(bus):
        sub = await bus.js.subscribe(
            names.events_of(task_id, provider), stream=names.events_stream_of(provider), ordered_consumer=True
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except TimeoutError:
                    break
                at = msg.metadata.timestamp.timestamp()
                found.append((at, decode_event(msg.subject, msg.data, msg.headers)))
        finally:
            await sub.unsubscribe()
    return [event for _, event in sorted(found, key=lambda f: f[0])]


async def stream_messages(bus: Bus, stream: str) -> int:
    info = await bus.js.stream_info(stream)
    return info.state.messages


# JetStream reserves each stream's and bucket's max_bytes up front on the session's one server, and a
# child process left to the defaults (gigabytes) soon runs it out of storage: children get test sizes.
SMALL_BUS_ENV = {
    "HIVE_TASKS_MAX_BYTES": str(8 * 1024**2),
    "HIVE_EVENTS_MAX_BYTES": str(8 * 1024**2),
    "HIVE_INDEX_MAX_BYTES": str(2 * 1024**2),
    "HIVE_DLQ_MAX_BYTES": str(8 * 1024**2),
    "HIVE_CANCELS_MAX_BYTES": str(1024**2),
    "HIVE_SCHEDULES_MAX_BYTES": str(4 * 1024**2),
    "HIVE_BLOBS_MAX_BYTES": str(32 * 1024**2),
    "HIVE_FILES_MAX_BYTES": str(64 * 1024**2),
}


def spawn(
    args: Sequence[str], *, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``hive ARGS`` as a child process (ended by its pid in the test)."""
    full_env = {**SMALL_BUS_ENV, **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if log is None:
        return subprocess.Popen(
            [HIVE, *args], cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([HIVE, *args], cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)


def hive_cli(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    full_env = {**SMALL_BUS_ENV, **os.environ, **(env or {})}
    return subprocess.run(
        [HIVE, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout_s, check=False
    )


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout_s: float, what: str) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    with anyio.fail_after(timeout_s, reason=f"timed out after {timeout_s}s waiting for {what}"):
        while not (value := await probe()):  # noqa: ASYNC110 - the state lives on the server
            await anyio.sleep(0.03)
    return value


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, below Linux's ephemeral range (32768-60999) so that no outgoing
    connection of this machine takes it before the server meant for it binds it, and never the same
    one twice in a session (a port asked of the kernel with ``bind(0)`` can be both)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32768)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port between 20000 and 32767")


class TcpRelay:
    """A TCP relay on loopback to ``target_port``, standing for a network link a test can break:
    :meth:`cut` closes every connection and refuses new ones until :meth:`restore`; :meth:`stall`
    keeps the connections open but drops whatever goes through them, as a link that silently went away
    does (what crosses it then is lost: end with :meth:`cut`). It moves bytes only (TLS runs end to end
    through it)."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stalled = threading.Event()
        self._clients: set[socket.socket] = set()
        self.restore()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def restore(self) -> None:
        self._stalled.clear()
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stall(self) -> None:
        self._stalled.set()

    def say_to_clients(self, data: bytes) -> int:
        """Send ``data`` to every client as though the server had said it (a protocol line such as
        ``-ERR``); returns how many clients it reached."""
        with self._lock:
            clients = list(self._clients)
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.sendall(data)
        return len(clients)

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
            self._clients.clear()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
                self._clients.add(client)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._stalled.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


async def unacked(bus: Bus) -> int:
    """The tasks the providers' consumers have not acked (queued, waiting or running): the tasks stream
    keeps acked tasks as history, so its message count no longer says what is queued."""
    return sum(d.pending + d.ack_pending for d in (await queue_depths(bus)).values())


async def task_of(bus: Bus, task_id: str) -> Task:
    """The task as the bus has it queued: its message in the tasks stream (its ``queued`` event is the
    stream's headers-only marker of it)."""
    here = await assignment(bus, task_id)
    assert here is not None, f"no task {task_id} on the bus"
    return here.task


def openai_shaped(r: httpx.Response) -> bool:
    """Whether ``r`` is an error in OpenAI's shape, with a message."""
    body = r.json()
    error = body.get("error") if isinstance(body, dict) else None
    return (
        r.status_code >= 400
        and list(body) == ["error"]
        and isinstance(error, dict)
        and sorted(error) == ["code", "message", "param", "type"]
        and bool(error["message"])
        and error["type"] in ("invalid_request_error", "server_error")
    )
