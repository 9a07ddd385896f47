"""hive-bus throughput, latency and memory, beside a raw nats-py loop measured in the same run.

Run: ``.venv/bin/python bench/throughput.py`` (or ``make bench``). It starts its own nats-server on a
free port of 127.0.0.1 with a temporary store, and ends it, and every process it started, by pid.

- throughput: 20,000 echo tasks submitted pipelined with ``Hive.submit_many`` to ONE ``hive worker``
  process, completions read with ``Hive.results``; the same count through a raw loop (a work-queue
  stream, a durable pull consumer, a worker process that publishes each reply to a reply stream and
  acks), publishes pipelined with the same window and the worker with the same concurrency;
- latency at low load: 1,000 tasks one at a time (submit, wait for its end), p50, p99, p99.9 and the
  slowest, both sides;
- memory: the worker's RSS after the runs, and a ``hive gateway``'s after 2,000 POSTs and some waits.

It always exits 0 (it is a measurement) and prints FAIL beside a missed target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import psutil  # type: ignore[import-untyped,unused-ignore]
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

import hive_bus
import hive_bus.bus
import nats
from hive_bus import Hive, Settings, TaskRequest, load_settings
from hive_bus._bus import ensure_consumer
from hive_bus._cancel import LIVE_AFTER_S
from hive_bus._embedded import NatsServer

TASKS, WARMUP, LATENCY_TASKS = 20_000, 1_000, 1_000
CONCURRENCY = 128  # the worker's, hive and raw: calls in flight at once
WINDOW = 256  # publishes in flight at once: Hive.submit_many's default, for both sides
MAX_ACK_PENDING = 4_096
WAIT_S = 10.0  # how long the latency run waits for one task
SLOW_S = 0.5  # a round trip this long at low load is a missed wake-up, not a slow machine
GATEWAY_POSTS, GATEWAY_WAITS, HTTP_CONCURRENCY = 2_000, 200, 16
BIN, REPO = Path(sys.executable).parent, Path(__file__).resolve().parent.parent
RAW_STREAM, RAW_SUBJECT, RAW_CONSUMER = "BENCH_RAW", "bench_raw.work", "bench_raw_worker"
REPLY_STREAM, REPLY_SUBJECT = "BENCH_RAW_REPLIES", "bench_raw.reply"
MB = 1e6  # RSS in MB of 10^6 bytes
Procs = list[subprocess.Popen[bytes]]


@dataclass
class Figures:
    tput: float = 0.0  # tasks/s, first submit to last completion seen by the submitter
    latencies: list[float] = field(default_factory=list)  # seconds
    rss_mb: float = 0.0  # the worker's
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process in the 20k run
    problems: list[str] = field(default_factory=list)  # lost, duplicated, stalled, redelivered

    def pct(self, q: float) -> float:
        return sorted(self.latencies)[round(q * (len(self.latencies) - 1))] * 1e3


def prompt(i: int) -> str:
    return f"benchmark task {i}: the quick brown fox jumps over the lazy dog"


async def pipelined(n: int, window: int, one: Callable[[int], Awaitable[object]]) -> None:
    """Run ``one(i)`` for i in range(n), ``window`` at a time."""
    indices = iter(range(n))

    async def lane() -> None:
        for i in indices:
            await one(i)

    async with anyio.create_task_group() as tg:
        for _ in range(min(window, n)):
            tg.start_soon(lane)


@contextlib.contextmanager
def cpu_seconds(into: dict[str, float], pids: dict[str, int]) -> Iterator[None]:
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    before = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
    yield
    into.update({name: sum(p.cpu_times()[:2]) - before[name] for name, p in procs.items()})


# the raw nats-py loop ----------------------------------------------------------------------------


async def raw_worker(url: str, concurrency: int) -> None:
    """The raw loop's worker (a process of its own): fetch, publish the reply (stored), ack."""
    nc = await nats.connect(url, name="bench-raw-worker")
    js = nc.jetstream(timeout=5)
    psub = await js.pull_subscribe_bind(durable=RAW_CONSUMER, stream=RAW_STREAM)
    in_flight, room, running = 0, asyncio.Event(), set[asyncio.Task[None]]()

    async def handle(msg: Msg) -> None:
        nonlocal in_flight
        try:
            await js.publish(REPLY_SUBJECT, msg.data, stream=REPLY_STREAM)
            await msg.ack()
        finally:
            in_flight -= 1
            room.set()

    while True:
        while in_flight >= concurrency:
            room.clear()
            await room.wait()
        try:
            msgs = await psub.fetch(batch=concurrency - in_flight, timeout=2.0)
        except TimeoutError:
            continue
        for msg in msgs:
            in_flight += 1
            running.add(task := asyncio.create_task(handle(msg)))
            task.add_done_callback(running.discard)


class Replies:
    """The raw loop's replies, counted by the index of the request they answer."""

    def __init__(self) -> None:
        self.expect(0)
        self.waiting: dict[int, anyio.Event] = {}

    def expect(self, n: int) -> None:
        self.seen: set[int] = set()
        self.duplicates, self.expected, self.last_at, self.all_in = 0, n, 0.0, anyio.Event()

    async def on_reply(self, msg: Msg) -> None:
        i = int(msg.data.split(b":", 1)[0].rsplit(b" ", 1)[1])
        self.duplicates += i in self.seen
        self.seen.add(i)
        self.last_at = time.perf_counter()
        if i in self.waiting:
            self.waiting.pop(i).set()
        if self.expected and len(self.seen) >= self.expected:
            self.all_in.set()


async def declare_raw(js: JetStreamContext) -> None:
    queue = RetentionPolicy.WORK_QUEUE
    await js.add_stream(
        StreamConfig(name=RAW_STREAM, subjects=[RAW_SUBJECT], retention=queue, storage=StorageType.FILE)
    )
    await js.add_stream(StreamConfig(name=REPLY_STREAM, subjects=[REPLY_SUBJECT], storage=StorageType.FILE))
    consumer = ConsumerConfig(
        durable_name=RAW_CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=30,
        max_ack_pending=MAX_ACK_PENDING, filter_subject=RAW_SUBJECT,
    )  # fmt: skip
    await js.add_consumer(RAW_STREAM, consumer)


async def raw_throughput(js: JetStreamContext, replies: Replies, n: int, first: int) -> float:
    replies.expect(n)
    t0 = time.perf_counter()
    await pipelined(
        n, WINDOW, lambda i: js.publish(RAW_SUBJECT, prompt(first + i).encode(), stream=RAW_STREAM)
    )
    await replies.all_in.wait()
    return n / (replies.last_at - t0)


async def raw_latency(js: JetStreamContext, replies: Replies, n: int) -> list[float]:
    replies.expect(0)
    times: list[float] = []
    for i in range(10**6, 10**6 + n):
        done = replies.waiting[i] = anyio.Event()
        t0 = time.perf_counter()
        await js.publish(RAW_SUBJECT, prompt(i).encode(), stream=RAW_STREAM)
        with anyio.fail_after(WAIT_S):
            await done.wait()
        times.append(time.perf_counter() - t0)
    return times


async def run_raw(url: str, logs: Path, procs: Procs, server_pid: int) -> Figures:
    fig = Figures()
    nc = await nats.connect(url, name="bench-raw-producer")
    js = nc.jetstream(timeout=10)
    await declare_raw(js)
    procs.append(
        worker := spawn([sys.executable, __file__, "--raw-worker", url, str(CONCURRENCY)], logs / "raw")
    )
    replies = Replies()
    await nc.subscribe(REPLY_SUBJECT, cb=replies.on_reply, pending_msgs_limit=10 * TASKS)
    with anyio.fail_after(120):
        await raw_throughput(js, replies, WARMUP, -WARMUP)
        with cpu_seconds(
            fig.cpu_s, {"nats-server": server_pid, "worker": worker.pid, "submitter": os.getpid()}
        ):
            fig.tput = await raw_throughput(js, replies, TASKS, 0)
        if len(replies.seen) != TASKS or replies.duplicates:
            fig.problems.append(f"{len(replies.seen)} of {TASKS} replies, {replies.duplicates} twice")
        fig.latencies = await raw_latency(js, replies, LATENCY_TASKS)
    fig.problems += await settled(js, RAW_STREAM, RAW_CONSUMER)
    fig.rss_mb = rss_mb(worker)
    end(worker)
    await nc.drain()
    return fig


# the hive side -----------------------------------------------------------------------------------


async def hive_throughput(hive: Hive, n: int) -> tuple[float, float, int]:
    """Tasks/s (submitter's view), tasks/s (to the last completion's own timestamp), tasks completed."""
    requests = [TaskRequest(provider="echo", prompt=prompt(i)) for i in range(n)]
    t0, wall0_ms = time.perf_counter(), time.time() * 1000
    ids = await hive.submit_many(requests, window=WINDOW)
    completed, last_ms = 0, 0
    async for view in hive.results(ids):  # each id once; ends after the last
        completed += view.status == "completed"
        last_ms = max(last_ms, view.updated_at_ms)
    return n / (time.perf_counter() - t0), n / ((last_ms - wall0_ms) / 1000), completed


async def hive_latency(hive: Hive, n: int) -> tuple[list[float], list[str]]:
    """Per-task latencies, and a line for each ``Hive.wait`` that returned before its task's end."""
    times: list[float] = []
    stalls: list[str] = []
    for i in range(n):
        t0, wall0_ms = time.perf_counter(), time.time() * 1000
        accepted = await hive.submit_request(TaskRequest(provider="echo", prompt=prompt(i)))
        view = await hive.wait(accepted.id, WAIT_S)
        times.append(time.perf_counter() - t0)
        if view.status != "completed":
            now = await hive.get(accepted.id)
            stalls.append(
                f"Hive.wait({accepted.id}) gave {view.status!r} after {times[-1]:.2f}s, but the task was "
                f"{now.status} {now.updated_at_ms - wall0_ms:.0f} ms after its submission"
            )
    return times, stalls


async def run_hive(settings: Settings, logs: Path, procs: Procs, server_pid: int) -> Figures:
    fig = Figures()
    async with hive_bus.bus.open_bus(settings, name="bench-setup") as bus:  # the consumer, with our limit
        await ensure_consumer(bus.js, bus.settings, "echo")
    cmd = [str(BIN / "hive"), "worker", "echo", "--nats", settings.nats_url, "--prefix", settings.prefix]
    procs.append(worker := spawn([*cmd, "--concurrency", str(CONCURRENCY)], logs / "worker"))
    async with hive_bus.connect(settings=settings) as hive:
        with anyio.fail_after(30):
            while not any(b.pid == worker.pid for b in await hive.workers()):  # noqa: ASYNC110
                await anyio.sleep(0.1)
        # a worker looks up the cancels key of every task it fetches until it has listed its provider's
        # keys, LIVE_AFTER_S after it subscribed (hive_bus._cancel): a cost of its start, paid once,
        # which a run this short would otherwise count against the steady rate it measures
        await anyio.sleep(LIVE_AFTER_S + 0.5)
        with anyio.fail_after(180):
            await hive_throughput(hive, WARMUP)
            with cpu_seconds(
                fig.cpu_s, {"nats-server": server_pid, "worker": worker.pid, "submitter": os.getpid()}
            ):
                fig.tput, by_worker, completed = await hive_throughput(hive, TASKS)
            if completed != TASKS:
                fig.problems.append(f"{TASKS - completed} of {TASKS} tasks did not complete")
            fig.latencies, stalls = await hive_latency(hive, LATENCY_TASKS)
        print(f"hive, to the completion timestamp of the last task: {by_worker:,.0f} tasks/s")
        names = settings.names
        fig.problems += stalls + await settled(hive.bus.js, names.tasks_stream, names.consumer("echo"))
    fig.rss_mb = rss_mb(worker)
    return fig


async def settled(js: JetStreamContext, stream: str, consumer: str) -> list[str]:
    """Once the last acks are in: what is left on the queue, and what was delivered more than once."""
    with anyio.move_on_after(5):
        while (info := await js.consumer_info(stream, consumer)).num_ack_pending or info.num_pending:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    left, again = info.num_ack_pending + info.num_pending, info.num_redelivered
    return [f"{n} {what}" for n, what in ((left, "left on the queue"), (again, "redelivered")) if n]


async def run_gateway(settings: Settings, logs: Path, procs: Procs) -> tuple[float, list[str]]:
    """The gateway's RSS after POSTs and long-poll GETs, and what went wrong."""
    port = free_port()
    cmd = [str(BIN / "hive"), "gateway", "--nats", settings.nats_url, "--prefix", settings.prefix]
    procs.append(gateway := spawn([*cmd, "--port", str(port)], logs / "gateway"))
    ids: list[str] = []
    problems: list[str] = []

    async def post(i: int) -> None:
        r = await http.post("/v1/tasks", json={"provider": "echo", "prompt": prompt(i)})
        if r.status_code == 202:
            ids.append(r.json()["id"])
        else:
            problems.append(f"POST: {r.status_code} {r.text[:80]}")

    async def get(i: int) -> None:
        r = await http.get(f"/v1/tasks/{ids[i]}", params={"wait": 5})
        if r.status_code != 200 or r.json()["status"] != "completed":
            problems.append(f"GET ?wait=5: {r.status_code} {r.text[:80]}")

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
        with anyio.fail_after(30):
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        break
                await anyio.sleep(0.1)
        with anyio.fail_after(120):
            await pipelined(GATEWAY_POSTS, HTTP_CONCURRENCY, post)
            await pipelined(min(GATEWAY_WAITS, len(ids)), HTTP_CONCURRENCY, get)
    return rss_mb(gateway), problems


# processes and the report ------------------------------------------------------------------------


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HIVE_LOG_LEVEL": "WARNING", "HIVE_MAX_ACK_PENDING": str(MAX_ACK_PENDING)}
    with open(log.with_suffix(".log"), "wb") as out:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def cleaned_up(server: NatsServer, store: Path, procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """Every process a benchmark started ended (last started, first ended), then its nats-server; the
    store removed when the block finished, kept (and named) for its logs when it did not."""
    finished = False
    try:
        yield
        finished = True
    finally:
        for proc in reversed(procs):
            end(proc)
        server.stop()
        if finished:
            shutil.rmtree(store, ignore_errors=True)
        else:
            print(f"the benchmark did not finish; the logs of its processes are in {store}", file=sys.stderr)


def end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # by its pid
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mb(proc: subprocess.Popen[bytes]) -> float:
    if proc.poll() is not None:
        raise RuntimeError(f"{proc.args!r} exited with status {proc.returncode}")
    return float(psutil.Process(proc.pid).memory_info().rss) / MB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(raw: Figures, hive: Figures, gateway_rss: float, gateway_problems: list[str]) -> None:
    t, p50, p99 = hive.tput / raw.tput, hive.pct(0.5) / raw.pct(0.5), hive.pct(0.99) / raw.pct(0.99)
    p999 = hive.pct(0.999) / raw.pct(0.999)
    rows: list[tuple[str, str, str, str, str, bool | None]] = [
        ("", "raw nats-py", "hive", "hive/raw", "target", None),
        # issue 18, point 1: the targets once a submission is one stored write
        ("throughput (tasks/s)", f"{raw.tput:,.0f}", f"{hive.tput:,.0f}", f"{t:.2f}x", ">= 0.80x raw", t >= 0.8),
        ("latency p50 (ms)", f"{raw.pct(0.5):.2f}", f"{hive.pct(0.5):.2f}", f"{p50:.2f}x", "<= 1.30x raw", p50 <= 1.3),
        ("latency p99 (ms)", f"{raw.pct(0.99):.2f}", f"{hive.pct(0.99):.2f}", f"{p99:.2f}x", "", None),
        ("latency p99.9 (ms)", f"{raw.pct(0.999):.2f}", f"{hive.pct(0.999):.2f}", f"{p999:.2f}x", "", None),
        ("latency max (ms)", f"{raw.pct(1):.2f}", f"{hive.pct(1):.2f}", "", "", None),
        ("worker RSS (MB)", f"{raw.rss_mb:.1f}", f"{hive.rss_mb:.1f}", "", "<= 60 MB", hive.rss_mb <= 60),
        ("gateway RSS (MB)", "", f"{gateway_rss:.1f}", "", "<= 80 MB", gateway_rss <= 80),
    ]  # fmt: skip
    print(f"\n{TASKS:,} echo tasks, 1 worker process (concurrency {CONCURRENCY}), publish window {WINDOW}; "
          f"latency: {LATENCY_TASKS} tasks one at a time; RSS in MB of 10^6 bytes")  # fmt: skip
    for name, r, h, ratio, target, ok in rows:
        print(f"{name:<22}{r:>12}{h:>11}{ratio:>10}  {target:<14}{'' if ok is None else verdict(ok)}")
    slow = {side: sum(t >= SLOW_S for t in fig.latencies) for side, fig in (("raw", raw), ("hive", hive))}
    print(
        f"round trips of {SLOW_S} s or more: raw {slow['raw']}, hive {slow['hive']} -> {verdict(not slow['hive'])}"
    )
    for side, fig in (("raw", raw), ("hive", hive)):
        cpu = ", ".join(f"{name} {s:.1f}" for name, s in fig.cpu_s.items())
        print(
            f"{side}: CPU seconds in the {TASKS:,}-task run: {cpu} (of {2 * TASKS / fig.tput:.1f} on 2 cores)"
        )
    for name, problems in (
        ("raw loop", raw.problems),
        ("hive", hive.problems),
        ("gateway", gateway_problems),
    ):
        said = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        print(f"{name}: {said or 'nothing lost, nothing twice'} -> {verdict(not problems)}")


async def bench(server: NatsServer, logs: Path, procs: Procs) -> None:
    assert server.pid is not None
    prefix = "bench" + secrets.token_hex(4)
    settings = load_settings(environ={}, nats_url=server.url, prefix=prefix, max_ack_pending=MAX_ACK_PENDING)
    with anyio.fail_after(540):
        raw = await run_raw(server.url, logs, procs, server.pid)
        hive = await run_hive(settings, logs, procs, server.pid)
        gateway_rss, gateway_problems = await run_gateway(settings, logs, procs)
    report(raw, hive, gateway_rss, gateway_problems)


def main() -> None:
    parser = argparse.ArgumentParser(description="hive-bus throughput, latency and memory vs raw nats-py")
    parser.add_argument("--raw-worker", nargs=2, metavar=("URL", "CONCURRENCY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_worker:
        asyncio.run(raw_worker(args.raw_worker[0], int(args.raw_worker[1])))
        return
    store = Path(tempfile.mkdtemp(prefix="hive-bench-"))
    server = NatsServer(store / "nats", host="127.0.0.1", port=0)
    procs: Procs = []
    server.start()
    with cleaned_up(server, store, procs):
        print(f"nats-server {server.url} (pid {server.pid})")
        anyio.run(bench, server, store, procs, backend="asyncio")


if __name__ == "__main__":
    main()
