"""Real processes for the fault cases: the gateway (``hive gateway``) and workers (``hive worker``), each a
child of the test, started with the test's settings and ended by its pid; and an HTTP load generator
that feeds a :class:`~.ledger.Ledger`."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import nats.js.errors

from hive_bus import Hive, Settings, WorkerBeat

from ..helpers import eventually, free_port, spawn
from .ledger import Ledger

# Generous: two cores are shared by several test runs at once.
START_TIMEOUT_S = 45.0
STOP_TIMEOUT_S = 15.0


def settings_env(settings: Settings) -> dict[str, str]:
    """The test's settings for a child process (``HIVE_*``), so that every process declares the bus
    objects alike."""
    return {
        "HIVE_PREFIX": settings.prefix,
        "HIVE_ACK_WAIT_S": str(settings.ack_wait_s),
        "HIVE_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
        "HIVE_HEARTBEAT_TTL_S": str(settings.heartbeat_ttl_s),
        "HIVE_REQUEST_TIMEOUT_S": str(settings.request_timeout_s),
        "HIVE_TASKS_MAX_BYTES": str(settings.tasks_max_bytes),
        "HIVE_EVENTS_MAX_BYTES": str(settings.events_max_bytes),
        "HIVE_INDEX_MAX_BYTES": str(settings.index_max_bytes),
        "HIVE_DLQ_MAX_BYTES": str(settings.dlq_max_bytes),
        "HIVE_CANCELS_MAX_BYTES": str(settings.cancels_max_bytes),
        "HIVE_BLOBS_MAX_BYTES": str(settings.blobs_max_bytes),
        "HIVE_AUDIT_EVERY_S": str(settings.audit_every_s),
        "HIVE_AUDIT_GRACE_S": str(settings.audit_grace_s),
        "HIVE_LOG_LEVEL": "INFO",
    }


@dataclass
class Child:
    role: str
    proc: subprocess.Popen[bytes]
    log: Path
    stopped: bool = False  # SIGSTOPped by the test

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            self.proc.send_signal(sig)
            if sig == signal.SIGSTOP:
                self.stopped = True
            elif sig == signal.SIGCONT:
                self.stopped = False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class GatewayChild(Child):
    url: str = ""


@dataclass
class Processes:
    """The child processes of one test; :meth:`close` ends each by its pid."""

    settings: Settings
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)  # extra variables for every child
    children: list[Child] = field(default_factory=list)

    def worker(
        self,
        provider: str,
        *,
        handler: str | None = None,
        concurrency: int = 4,
        nats_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        args = ["worker", provider, "--concurrency", str(concurrency), "--drain-timeout", "5"]
        args += ["--nats", nats_url or self.settings.nats_url]
        if handler is not None:
            args += ["--handler", handler]
        log = self.tmp / f"worker-{provider}-{len(self.children)}.log"
        full_env = {**settings_env(self.settings), **self.env, **(env or {})}
        child = Child(f"worker {provider}", spawn(args, env=full_env, log=log), log)
        self.children.append(child)
        return child

    def gateway(self, *, env: dict[str, str] | None = None) -> GatewayChild:
        port = free_port()
        args = ["gateway", "--port", str(port), "--nats", self.settings.nats_url]
        log = self.tmp / f"gateway-{len(self.children)}.log"
        full_env = {**settings_env(self.settings), **self.env, **(env or {})}
        child = GatewayChild(
            "gateway", spawn(args, env=full_env, log=log), log, url=f"http://127.0.0.1:{port}"
        )
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            if child.stopped:
                child.signal(signal.SIGCONT)
            child.signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


@asynccontextmanager
async def processes(settings: Settings, tmp: Path, **env: str) -> AsyncIterator[Processes]:
    procs = Processes(settings, tmp, env=dict(env))
    try:
        yield procs
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(procs.close)


async def ready(gateway: GatewayChild, http: httpx.AsyncClient) -> None:
    """Wait until the gateway process answers ``/readyz`` with 200."""

    async def probe() -> bool:
        if not gateway.alive:
            raise AssertionError(f"the gateway exited ({gateway.proc.returncode}):\n{gateway.log_tail()}")
        try:
            return (await http.get(f"{gateway.url}/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await eventually(probe, START_TIMEOUT_S, "the gateway to be ready")


async def beat_of(hive: Hive, child: Child, timeout_s: float = START_TIMEOUT_S) -> WorkerBeat:
    """The worker process's heartbeat (found by its pid): it is connected and serving."""

    async def probe() -> WorkerBeat | None:
        if not child.alive:
            raise AssertionError(f"{child.role} exited ({child.proc.returncode}):\n{child.log_tail()}")
        try:
            beats = await hive.workers()
        except nats.js.errors.NotFoundError:
            return None  # the heartbeat bucket (memory) is gone after a server restart until declared again
        return next((b for b in beats if b.pid == child.pid), None)

    return await eventually(probe, timeout_s, f"the heartbeat of {child.role} (pid {child.pid})")


async def workers_online(hive: Hive) -> set[str]:
    return {b.worker_id for b in await hive.workers()}


async def submit(
    http: httpx.AsyncClient, gateway: GatewayChild, ledger: Ledger, provider: str, prompt: str, **fields: Any
) -> httpx.Response:
    """``POST /v1/tasks``, its answer recorded in the ledger."""
    r = await http.post(f"{gateway.url}/v1/tasks", json={"provider": provider, "prompt": prompt, **fields})
    ledger.answer(r.status_code, r.json(), prompt)
    return r


@dataclass
class Load:
    """What a load generator sent: how many requests got an answer and how many got none."""

    sent: int = 0
    unanswered: int = 0


async def generate_load(
    http: httpx.AsyncClient,
    gateway: GatewayChild,
    ledger: Ledger,
    provider: str,
    stop: anyio.Event,
    *,
    lanes: int = 6,
    pause_s: float = 0.02,
    payload: Any = None,
) -> Load:
    """Submit from ``lanes`` concurrent clients until ``stop`` is set; every answer goes to the ledger."""
    load = Load()
    counter = iter(range(10**9))

    async def lane(n: int) -> None:
        while not stop.is_set():
            prompt = f"load {n}-{next(counter)}"
            body: dict[str, Any] = {"provider": provider, "prompt": prompt}
            if payload is not None:
                body["payload"] = payload
            load.sent += 1
            try:
                r = await http.post(f"{gateway.url}/v1/tasks", json=body)
            except httpx.TransportError:
                load.unanswered += 1  # no answer: not accepted, whatever the bus did
                ledger.transport_errors += 1
            else:
                ledger.answer(r.status_code, r.json(), prompt)
            await anyio.sleep(pause_s)

    async with anyio.create_task_group() as tg:
        for n in range(lanes):
            tg.start_soon(lane, n)
    return load
