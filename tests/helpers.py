"""Helpers shared by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio

from hive_bus import Bus, Provider, ProviderKey, TaskEvent, Worker, WorkerOptions
from hive_bus._messages import event_decoder

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
    """Every event recorded for a task, in stream order."""
    names = bus.names
    sub = await bus.js.subscribe(names.events_of(task_id), ordered_consumer=True)
    events: list[TaskEvent] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                return events
            events.append(event_decoder.decode(msg.data))
    finally:
        await sub.unsubscribe()


async def stream_messages(bus: Bus, stream: str) -> int:
    info = await bus.js.stream_info(stream)
    return info.state.messages


def spawn(
    args: Sequence[str], *, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``hive ARGS`` as a child process (ended by its pid in the test)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if log is None:
        return subprocess.Popen(
            [HIVE, *args], cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([HIVE, *args], cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)


def hive_cli(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
