"""A soak: the embedded stack under a steady mixed load for a long time. Does anything grow, slow or break?

Run: ``.venv/bin/python bench/soak.py --minutes 40 [--rate 30] [--out soak.jsonl]``. It starts what a user
starts, on free ports of 127.0.0.1 with a temporary data directory: ``hive up`` (nats-server, the gateway
and the echo worker) with webhooks on, a custom job worker (``hive worker --handler``, provider ``jobs``)
and a webhook receiver (a threaded HTTP server in this process); it ends every process it started by pid.

The load, about ``--rate`` tasks a second (the mix scales with it): single ``POST /v1/tasks`` (one in
five with a webhook, one in four read back with ``?wait=``), ``POST /v1/tasks/batch``, jobs (one in ten
fails for good on its first run, so that it is dead-lettered; ``hive dlq replay --all`` every five
minutes runs it again, and it completes), slow jobs of which some are cancelled while queued, tasks
with ``not_before`` (a third cancelled before their time), the ``openai`` SDK's chat completions
(streamed and not) and a small OpenAI batch every four minutes; reads of ``GET /v1/tasks``, ``?meta=``,
``/v1/stats``, ``/metrics``, ``/v1/workers``, the webhook deliveries and the dead letters; two
``/v1/events`` feeds held open and reconnecting with ``Last-Event-ID``, and a task's event stream read
to its end every few seconds.

Every minute it records the RSS, CPU and open file descriptors of nats-server, ``hive up`` (the
gateway and the echo worker) and the job worker (from /proc), the streams, consumers and messages on the
server (``$JS.API.INFO`` and each stream's info), the p50 / p95 of each request, and the errors seen.
At the end it waits for the bus to go quiet and checks that every accepted task ended once a run
(every final event of each provider's events stream read back) and that every webhook was delivered
once. It prints a table and always exits 0: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
from throughput import free_port  # beside this script

import nats

BIN = Path(sys.executable).parent
SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
FINAL = ("completed", "failed", "cancelled")
JOBS = """\
import anyio

from hive_bus import FailNow, Task


async def run(task: Task) -> dict:
    job = task.payload or {}
    if job.get("fail") and task.run == 0:
        raise FailNow("this job fails on its first run (the soak replays it)")
    await anyio.sleep(job.get("sleep", 0))
    return {"done": task.id}
"""


@dataclasses.dataclass
class Ledger:
    """What the load did: accepted ids by kind, the tasks meant to fail first, those with webhooks,
    request latencies by read and minute, errors by minute."""

    started: float = dataclasses.field(default_factory=time.monotonic)
    accepted: dict[str, str] = dataclasses.field(default_factory=dict)
    failing: set[str] = dataclasses.field(default_factory=set)
    cancelled: set[str] = dataclasses.field(default_factory=set)
    hooked: set[str] = dataclasses.field(default_factory=set)
    replayed: Counter[str] = dataclasses.field(default_factory=Counter)
    batches: list[str] = dataclasses.field(default_factory=list)
    latencies: dict[int, dict[str, list[float]]] = dataclasses.field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    errors: dict[int, list[str]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    feed_events: Counter[str] = dataclasses.field(default_factory=Counter)

    def minute(self) -> int:
        return int((time.monotonic() - self.started) // 60)

    def error(self, what: str) -> None:
        self.errors[self.minute()].append(what)

    @contextlib.asynccontextmanager
    async def timed(self, read: str) -> AsyncIterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.error(f"{read}: {type(exc).__name__}: {str(exc)[:200]}")
        else:
            self.latencies[self.minute()][read].append(time.perf_counter() - t0)


class Hooks:
    """The webhook receiver's record: each delivery's webhook-id and task, as they came."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_id: Counter[str] = Counter()
        self.by_task: dict[str, set[str]] = defaultdict(set)

    def serve(self) -> ThreadingHTTPServer:
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
                with hooks.lock:
                    hooks.by_id[self.headers["webhook-id"]] += 1
                    hooks.by_task[body["data"]["id"]].add(self.headers["webhook-id"])
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.request_queue_size = 128
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


def every(
    period_s: float,
) -> Callable[[Callable[[int], Coroutine[Any, Any, None]]], Callable[[float], Coroutine[Any, Any, None]]]:
    """A loop that starts its step every ``period_s`` (not after the last one ended) until ``until``."""

    def wrap(
        step: Callable[[int], Coroutine[Any, Any, None]],
    ) -> Callable[[float], Coroutine[Any, Any, None]]:
        async def loop(until: float) -> None:
            async with anyio.create_task_group() as tg:
                i, next_at = 0, time.monotonic()
                while next_at < until:
                    tg.start_soon(step, i)
                    i, next_at = i + 1, next_at + period_s
                    await anyio.sleep(max(0.0, next_at - time.monotonic()))

        return loop

    return wrap


class Load:
    def __init__(self, url: str, nats_url: str, hook_url: str, ledger: Ledger, rate: float) -> None:
        self.url, self.nats_url, self.hook_url, self.ledger = url, nats_url, hook_url, ledger
        self.scale = rate / 30  # the mix below is about 30 tasks a second
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        self.http = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30, read=320), limits=limits)
        self.ai = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="soak", max_retries=0, timeout=120)
        self.slow_ids: list[str] = []

    def period(self, seconds: float) -> float:
        return seconds / self.scale

    async def post(self, read: str, path: str, body: Any, kind: str) -> list[str]:
        async with self.ledger.timed(read):
            r = await self.http.post(path, json=body)
            if r.status_code not in (200, 202):
                raise RuntimeError(f"{r.status_code} {r.text[:200]}")
            answer = r.json()
            ids = [answer["id"]] if "id" in answer else [t["id"] for t in answer["tasks"]]
            for task_id in ids:
                self.ledger.accepted[task_id] = kind
            return ids
        return []

    async def get(self, read: str, path: str, **params: Any) -> Any:
        async with self.ledger.timed(read):
            r = await self.http.get(path, params=params)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.text[:200]}")
            return r.json() if "json" in r.headers.get("content-type", "") else r.text
        return None

    def task(self, i: int, kind: str, **extra: Any) -> dict[str, Any]:
        body = {"provider": "echo", "prompt": f"soak {kind} {i}: un tuit sobre café", **extra}
        body.setdefault("metadata", {"soak": kind})
        return body

    async def run(self, minutes: float) -> None:
        until = time.monotonic() + minutes * 60

        @every(self.period(1 / 8))
        async def singles(i: int) -> None:
            hook = {"webhook": {"url": self.hook_url}} if i % 5 == 0 else {}
            ids = await self.post("POST /v1/tasks", "/v1/tasks", self.task(i, "single", **hook), "single")
            if hook:
                self.ledger.hooked.update(ids)
            if ids and i % 4 == 0:
                view = await self.get("GET /v1/tasks/{id}?wait=10", f"/v1/tasks/{ids[0]}", wait=10)
                if view is not None and view.get("status") != "completed":
                    self.ledger.error(f"task {ids[0]} not completed after ?wait=10: {view.get('status')}")
            elif ids and i % 4 == 2:
                await self.get("GET /v1/tasks/{id}", f"/v1/tasks/{ids[0]}")

        @every(self.period(5))
        async def batches(i: int) -> None:
            tasks = [
                self.task(i * 25 + j, "batch", **({"webhook": {"url": self.hook_url}} if j < 2 else {}))
                for j in range(25)
            ]
            ids = await self.post("POST /v1/tasks/batch", "/v1/tasks/batch", {"tasks": tasks}, "batch")
            self.ledger.hooked.update(ids[:2])

        @every(self.period(1))
        async def jobs(i: int) -> None:
            fail = i % 10 == 0
            body = {"provider": "jobs", "prompt": f"job {i}", "payload": {"fail": fail, "sleep": 0.02}}
            if i % 7 == 0:
                body["webhook"] = {"url": self.hook_url}
            ids = await self.post("POST /v1/tasks", "/v1/tasks", body, "job")
            if fail:
                self.ledger.failing.update(ids)
            if "webhook" in body:
                self.ledger.hooked.update(ids)

        @every(self.period(20))
        async def slow_and_cancelled(i: int) -> None:
            tasks = [
                {"provider": "jobs", "prompt": f"slow {i}.{j}", "payload": {"sleep": 2}, "priority": "low"}
                for j in range(8)
            ]
            ids = await self.post("POST /v1/tasks/batch", "/v1/tasks/batch", {"tasks": tasks}, "slow")
            for task_id in ids[5:]:  # four lanes: these wait in the queue
                await self.cancel(task_id)

        @every(self.period(15))
        async def scheduled(i: int) -> None:
            at = datetime.now(UTC) + timedelta(seconds=random.uniform(20, 90))
            ids = await self.post(
                "POST /v1/tasks",
                "/v1/tasks",
                self.task(i, "scheduled", not_before=at.isoformat()),
                "scheduled",
            )
            if ids and i % 3 == 0:
                await anyio.sleep(5)
                await self.cancel(ids[0])

        @every(self.period(1))
        async def chat(i: int) -> None:
            messages: Any = [{"role": "user", "content": f"soak chat {i}"}]
            if i % 3 == 0:
                async with self.ledger.timed("chat stream"):
                    stream = await self.ai.chat.completions.create(
                        model="echo", messages=messages, stream=True
                    )
                    async for chunk in stream:
                        self.ledger.accepted.setdefault(chunk.id.removeprefix("chatcmpl-"), "chat")
            else:
                async with self.ledger.timed("chat"):
                    reply = await self.ai.chat.completions.create(model="echo", messages=messages)
                    self.ledger.accepted[reply.id.removeprefix("chatcmpl-")] = "chat"

        @every(240)
        async def openai_batch(i: int) -> None:
            lines = "".join(
                json.dumps(
                    {
                        "custom_id": f"b{i}-{n}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {"model": "echo", "messages": [{"role": "user", "content": f"line {n}"}]},
                    }
                )
                + "\n"
                for n in range(20)
            )
            async with self.ledger.timed("openai batch create"):
                f = await self.ai.files.create(file=("soak.jsonl", lines.encode()), purpose="batch")
                batch = await self.ai.batches.create(
                    input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                self.ledger.batches.append(batch.id)

        @every(5)
        async def reads(i: int) -> None:
            await self.get("GET /v1/tasks?limit=50", "/v1/tasks", limit=50)
            await self.get("GET /v1/stats", "/v1/stats")
            await self.get("GET /metrics", "/metrics")
            if i % 2 == 0:
                await self.get("GET /v1/tasks?meta=", "/v1/tasks", meta="soak:batch", limit=20)
                await self.get("GET /v1/workers", "/v1/workers")
                await self.get("GET /v1/webhooks/deliveries", "/v1/webhooks/deliveries", limit=20)
                await self.get("GET /v1/dlq", "/v1/dlq", provider="jobs")
                await self.get("GET /v1/tasks?status=failed", "/v1/tasks", status="failed", limit=20)

        @every(5)
        async def task_events(i: int) -> None:
            ids = await self.post("POST /v1/tasks", "/v1/tasks", {"provider": "jobs", "prompt": f"watched {i}",
                                                                 "payload": {"sleep": 1}}, "job")  # fmt: skip
            if ids:
                async with self.ledger.timed("GET /v1/tasks/{id}/events (to its end)"):
                    with anyio.fail_after(60):
                        async with self.http.stream("GET", f"/v1/tasks/{ids[0]}/events") as r:
                            r.raise_for_status()
                            async for _ in r.aiter_lines():
                                pass

        @every(300)
        async def replay(i: int) -> None:
            if i:
                await self.replay_dead_letters()

        loops = [singles, batches, jobs, slow_and_cancelled, scheduled, chat, openai_batch, reads, task_events,
                 replay]  # fmt: skip
        async with anyio.create_task_group() as tg:
            for loop in loops:
                tg.start_soon(loop, until)
            tg.start_soon(self.feed, "all", {}, until)
            tg.start_soon(self.feed, "jobs", {"provider": "jobs"}, until)

    async def cancel(self, task_id: str) -> None:
        async with self.ledger.timed("POST /v1/tasks/{id}/cancel"):
            r = await self.http.post(f"/v1/tasks/{task_id}/cancel")
            if r.status_code == 200:
                self.ledger.cancelled.add(task_id)
            elif r.status_code != 409:  # 409: it ended first
                raise RuntimeError(f"{r.status_code} {r.text[:200]}")

    async def feed(self, name: str, params: dict[str, str], until: float) -> None:
        """A ``/v1/events`` feed held open, and opened again with ``Last-Event-ID`` every two minutes or so."""
        last_id: str | None = None
        while time.monotonic() < until:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            held_s = min(random.uniform(90, 150), max(0.0, until - time.monotonic()))
            with anyio.move_on_after(held_s):
                async with (
                    self.ledger.timed(f"feed {name}: opened"),
                    self.http.stream("GET", "/v1/events", params=params, headers=headers) as r,
                ):
                    if r.status_code != 200:
                        raise RuntimeError(f"{r.status_code} {(await r.aread())[:200]!r}")
                    async for line in r.aiter_lines():
                        if line.startswith("id:"):
                            last_id = line[3:].strip()
                            self.ledger.feed_events[name] += 1
            await anyio.sleep(1)

    async def replay_dead_letters(self) -> None:
        env = {**os.environ, "HIVE_NATS_URL": self.nats_url}
        async with self.ledger.timed("hive dlq replay --all"):
            done = await anyio.run_process(
                [str(BIN / "hive"), "dlq", "replay", "--all"], env=env, check=False
            )
            if done.returncode:
                raise RuntimeError(f"exit {done.returncode}: {done.stderr.decode()[-300:]}")
            for line in done.stdout.decode().splitlines():
                if m := re.match(r"(\S+) queued again", line):
                    self.ledger.replayed[m.group(1)] += 1


@dataclasses.dataclass
class Proc:
    name: str
    pid: int
    ticks: int = 0

    def sample(self, interval_s: float) -> dict[str, float]:
        """RSS (MB), CPU (% of one core since the last sample) and open file descriptors."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except (FileNotFoundError, ProcessLookupError):
            return {"rss_mb": -1, "cpu_pct": -1, "fds": -1}
        rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        ticks = int(stat[11]) + int(stat[12])
        cpu = (ticks - self.ticks) / os.sysconf("SC_CLK_TCK") / interval_s * 100 if self.ticks else 0.0
        self.ticks = ticks
        return {"rss_mb": rss_kb * 1024 / 1e6, "cpu_pct": cpu, "fds": fds}


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


async def server_figures(nc: Any) -> dict[str, Any]:
    js = nc.jetstream()
    info = await js.account_info()
    streams = {s.config.name: s.state.messages for s in await js.streams_info()}
    return {
        "streams": info.streams,
        "consumers": info.consumers,
        "store_mb": info.storage / 1e6,
        "kv_keys": sum(n for name, n in streams.items() if name.startswith("KV_")),
        "stream_msgs": streams,
    }


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def log_problems(logs: list[Path], seen: dict[Path, int]) -> list[str]:
    """New WARNING / ERROR / Traceback lines of the processes' logs since the last look."""
    found: list[str] = []
    for log in logs:
        lines = log.read_text(errors="replace").splitlines()
        found += [f"{log.stem}: {line[:200]}" for line in lines[seen.get(log, 0) :] if re.search(r"WARNING|ERROR|Traceback|CRITICAL", line)]  # fmt: skip
        seen[log] = len(lines)
    return found


async def sample_every_minute(
    procs: list[Proc],
    nats_url: str,
    ledger: Ledger,
    until: float,
    out: list[dict[str, Any]],
    logs: list[Path],
    series: str | None,
) -> None:
    seen: dict[Path, int] = {}
    nc = await nats.connect(nats_url)
    try:
        last = time.monotonic()
        for p in procs:
            p.sample(1)
        while True:
            now = time.monotonic()
            minute = ledger.minute() - 1
            row: dict[str, Any] = {"minute": minute + 1, "t_s": round(now - ledger.started)}
            for p in procs:
                row[p.name] = p.sample(now - last)
            last = now
            try:
                row["server"] = await server_figures(nc)
            except Exception as exc:
                ledger.error(f"$JS.API.INFO: {exc!r}")
            reads = ledger.latencies.get(minute, {})
            row["reads"] = {k: (len(v), percentile(v, 0.5), percentile(v, 0.95)) for k, v in reads.items()}
            row["errors"] = ledger.errors.get(minute, []) + log_problems(logs, seen)
            row["accepted"] = len(ledger.accepted)
            out.append(row)
            print(one_line(row), flush=True)
            if series is not None:  # as it goes: a run cut short keeps its figures
                async with await anyio.open_file(series, "a") as f:
                    await f.write(json.dumps(row) + "\n")
            if now >= until:
                return
            await anyio.sleep(min(60.0, max(0.0, until - time.monotonic())) or 0.01)
    finally:
        await nc.close()


def one_line(row: dict[str, Any]) -> str:
    procs = " ".join(
        f"{name} {row[name]['rss_mb']:.0f}MB {row[name]['cpu_pct']:.0f}% {row[name]['fds']}fd"
        for name in ("nats", "hive-up", "jobs")
    )
    server = row.get("server", {})
    return (
        f"[{row['t_s']:>5}s] {procs} | streams {server.get('streams')} consumers {server.get('consumers')} "
        f"store {server.get('store_mb', 0):.1f}MB kv {server.get('kv_keys')} | accepted {row['accepted']} "
        f"errors {len(row['errors'])}"
    )


async def quiet(http: httpx.AsyncClient, timeout_s: float) -> bool:
    """Whether every provider's queue, in-flight and retrying figures went to 0 within ``timeout_s``."""
    with anyio.move_on_after(timeout_s):
        while True:
            stats = (await http.get("/v1/stats")).json()
            if sum(p["pending"] + p["in_flight"] + p["retrying"] for p in stats) == 0:
                return True
            await anyio.sleep(2)
    return False


QUIET_READS: dict[str, tuple[str, dict[str, Any]]] = {
    "GET /v1/tasks?limit=50": ("/v1/tasks", {"limit": 50}),
    "GET /v1/tasks?meta=": ("/v1/tasks", {"meta": "soak:batch", "limit": 20}),
    "GET /v1/tasks?status=failed": ("/v1/tasks", {"status": "failed", "limit": 20}),
    "GET /v1/stats": ("/v1/stats", {}),
    "GET /metrics": ("/metrics", {}),
    "GET /v1/workers": ("/v1/workers", {}),
    "GET /v1/dlq": ("/v1/dlq", {"provider": "jobs"}),
    "GET /v1/webhooks/deliveries": ("/v1/webhooks/deliveries", {"limit": 20}),
}


async def quiet_reads(http: httpx.AsyncClient) -> dict[str, float]:
    """Each read of the load, one at a time on the quiet bus: the median of 11, in ms."""
    medians: dict[str, float] = {}
    for read, (path, params) in QUIET_READS.items():
        took = []
        for _ in range(11):
            t0 = time.perf_counter()
            (await http.get(path, params=params)).raise_for_status()
            took.append(time.perf_counter() - t0)
        medians[read] = sorted(took)[5] * 1000
    return medians


async def finals(nats_url: str, providers: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Every final event of each provider's events stream: per task, (status, Nats-Msg-Id) in order."""
    ends: dict[str, list[tuple[str, str]]] = defaultdict(list)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        for provider in providers:
            stream = f"HIVE_EVENTS_{provider}"
            if not (await js.stream_info(stream)).state.messages:
                continue
            sub = await js.subscribe(
                f"hive.events.{provider}.>", stream=stream, ordered_consumer=True, headers_only=True
            )
            async for msg in sub.messages:
                parts = msg.subject.split(".")
                if len(parts) == 5 and parts[4] in FINAL:
                    ends[parts[3]].append((parts[4], (msg.headers or {}).get("Nats-Msg-Id", "")))
                if msg.metadata.num_pending == 0:
                    break
            await sub.unsubscribe()
    finally:
        await nc.close()
    return ends


def check_end(ledger: Ledger, hooks: Hooks, ends: dict[str, list[tuple[str, str]]]) -> list[str]:
    """What did not end once a run: never ended, ended twice in a run, webhooks missing or twice."""
    problems: list[str] = []
    for task_id, kind in ledger.accepted.items():
        runs = 1 + ledger.replayed[task_id]
        got = ends.get(task_id, [])
        ids = [msg_id for _, msg_id in got]
        if not got:
            problems.append(f"{kind} task {task_id} never ended")
        elif len(got) != runs or len(set(ids)) != len(ids):
            problems.append(f"{kind} task {task_id}: {len(got)} final events for {runs} run(s): {got}")
    with hooks.lock:
        for task_id in ledger.hooked:
            want, got_hooks = len(ends.get(task_id, [])), len(hooks.by_task.get(task_id, ()))
            if want != got_hooks:
                problems.append(f"task {task_id}: {got_hooks} webhook deliveries for {want} end(s)")
        twice = [hook_id for hook_id, n in hooks.by_id.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} webhook-ids delivered more than once, e.g. {twice[:3]}")
    return problems


async def check_batches(url: str, ledger: Ledger) -> list[str]:
    problems: list[str] = []
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="soak") as ai:
        for batch_id in ledger.batches:
            with anyio.move_on_after(120):
                ended = ("completed", "failed", "expired", "cancelled")
                while (batch := await ai.batches.retrieve(batch_id)).status not in ended:  # noqa: ASYNC110
                    await anyio.sleep(2)
            counts = batch.request_counts
            if batch.status != "completed" or counts is None or counts.completed != 20:
                problems.append(f"batch {batch_id}: {batch.status}, {counts}")
                continue
            output = (await ai.files.content(batch.output_file_id or "")).text.splitlines()
            if len(output) != 20:
                problems.append(f"batch {batch_id}: {len(output)} output lines of 20")
    return problems


def table(rows: list[dict[str, Any]]) -> None:
    """Start, middle and end of each series; each read's p50 / p95 at each."""
    if len(rows) < 3:
        return
    picks = {"start": rows[1], "middle": rows[len(rows) // 2], "end": rows[-1]}
    print(f"\n{'series':<44}" + "".join(f"{k + ' (' + str(r['t_s']) + 's)':>22}" for k, r in picks.items()))
    for name in ("nats", "hive-up", "jobs"):
        for field in ("rss_mb", "cpu_pct", "fds"):
            print(f"{name + ' ' + field:<44}" + "".join(f"{r[name][field]:>22.1f}" for r in picks.values()))
    for field in ("streams", "consumers", "store_mb", "kv_keys"):
        print(f"{'server ' + field:<44}" + "".join(f"{r.get('server', {}).get(field, float('nan')):>22.1f}" for r in picks.values()))  # fmt: skip
    streams = sorted(rows[-1].get("server", {}).get("stream_msgs", {}))
    for stream in streams:
        print(f"{'msgs ' + stream:<44}" + "".join(f"{r.get('server', {}).get('stream_msgs', {}).get(stream, 0):>22}" for r in picks.values()))  # fmt: skip
    reads = sorted({k for r in rows for k in r["reads"]})
    for read in reads:
        cells = []
        for r in picks.values():
            n, p50, p95 = r["reads"].get(read, (0, float("nan"), float("nan")))
            cells.append(f"{p50:.1f}/{p95:.1f} ms ({n})")
        print(f"{read[:43]:<44}" + "".join(f"{c:>22}" for c in cells))
    print(f"{'errors':<44}" + "".join(f"{len(r['errors']):>22}" for r in picks.values()))


@contextlib.contextmanager
def stack(data: Path) -> Iterator[tuple[str, str, list[subprocess.Popen[bytes]], list[Path]]]:
    """``hive up`` with webhooks to loopback, and a job worker: (gateway URL, NATS URL, processes, logs)."""
    port, nats_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_") and not k.endswith("_API_KEY")}
    env |= {
        "HIVE_WEBHOOK_SECRET": SECRET,
        "HIVE_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
        "HIVE_LOG_LEVEL": "WARNING",
    }
    (data / "soak_jobs.py").write_text(JOBS)
    url, nats_url = f"http://127.0.0.1:{port}", f"nats://127.0.0.1:{nats_port}"
    procs: list[subprocess.Popen[bytes]] = []
    logs = [data / "hive-up.log", data / "jobs.log"]
    try:
        with open(logs[0], "wb") as out:
            up = [str(BIN / "hive"), "up", "--port", str(port), "--nats-port", str(nats_port), "--data", str(data / "hive")]  # fmt: skip
            procs.append(subprocess.Popen(up, cwd=data, env=env, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while True:
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hive up did not start: {logs[0].read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        with open(logs[1], "wb") as out:
            worker = [str(BIN / "hive"), "worker", "--handler", "soak_jobs:run", "--provider", "jobs", "--nats", nats_url]  # fmt: skip
            procs.append(subprocess.Popen(worker, cwd=data, env=env, stdout=out, stderr=subprocess.STDOUT))
        while not any(w.get("provider") == "jobs" for w in httpx.get(f"{url}/v1/workers").json()):
            if procs[1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the job worker did not start: {logs[1].read_text()[-2000:]}")
            time.sleep(0.2)
        yield url, nats_url, procs, logs
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()  # by its pid; hive up stops its nats-server
                try:
                    proc.wait(40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def soak(args: argparse.Namespace, data: Path) -> list[dict[str, Any]]:
    """The run: each minute's figures (the last row: after the load), the table and the checks printed."""
    hooks = Hooks()
    receiver = hooks.serve()
    ledger = Ledger()
    rows: list[dict[str, Any]] = []
    with stack(data) as (url, nats_url, procs, logs):
        nats_pid = children(procs[0].pid)[0]
        watched = [Proc("nats", nats_pid), Proc("hive-up", procs[0].pid), Proc("jobs", procs[1].pid)]
        load = Load(url, nats_url, f"http://127.0.0.1:{receiver.server_address[1]}/hook", ledger, args.rate)
        print(f"hive up at {url} (nats {nats_url}, pids {[p.pid for p in watched]}), {args.minutes} minutes")
        until = time.monotonic() + args.minutes * 60
        async with anyio.create_task_group() as tg:
            tg.start_soon(sample_every_minute, watched, nats_url, ledger, until + 1, rows, logs, args.out)
            await load.run(args.minutes)
        print("load stopped; the last dead letters replayed, then waiting for the bus to go quiet")
        await anyio.sleep(95)  # the last scheduled tasks' time
        await load.replay_dead_letters()
        went_quiet = await quiet(load.http, 300)
        await anyio.sleep(15)  # the last webhooks
        problems = [] if went_quiet else ["the bus was not quiet 5 minutes after the load"]
        ends = await finals(nats_url, ["echo", "jobs"])
        problems += check_end(ledger, hooks, ends)
        problems += await check_batches(url, ledger)
        metrics = (await load.http.get("/metrics")).text
        reads_after = await quiet_reads(load.http)
        await load.http.aclose()
        nc = await nats.connect(nats_url)
        after = {"t_s": round(time.monotonic() - ledger.started), "errors": [], "reads": {}}
        after |= {"server": await server_figures(nc), "quiet_reads_ms": reads_after}
        await nc.close()
        for p in watched:
            after[p.name] = p.sample(time.monotonic() - ledger.started - rows[-1]["t_s"])
        rows.append(after)
    receiver.shutdown()
    table(rows[:-1])
    kinds = Counter(ledger.accepted.values())
    print(f"\naccepted: {len(ledger.accepted)} tasks ({dict(kinds)}); cancelled {len(ledger.cancelled)}; "
          f"meant to fail first {len(ledger.failing)}, replayed {sum(ledger.replayed.values())}; "
          f"webhooks {sum(hooks.by_id.values())} deliveries for {len(ledger.hooked)} tasks; "
          f"feeds {dict(ledger.feed_events)}; OpenAI batches {len(ledger.batches)}")  # fmt: skip
    dup = sum(
        float(v) for v in re.findall(r"^hive_duplicate_results_total(?:\{[^}]*\})? (\S+)", metrics, re.M)
    )
    print(
        f"hive_duplicate_results_total {dup:g}; after the load: nats {rows[-1]['nats']}, "
        f"hive up {rows[-1]['hive-up']}, jobs {rows[-1]['jobs']}"
    )
    print(
        "reads one at a time on the quiet bus after the load, median of 11: "
        + ", ".join(f"{read} {ms:.1f} ms" for read, ms in rows[-1]["quiet_reads_ms"].items())
    )
    print(f"after the load: streams {rows[-1]['server']['streams']}, consumers {rows[-1]['server']['consumers']}, "
          f"KV keys {rows[-1]['server']['kv_keys']}, store {rows[-1]['server']['store_mb']:.1f} MB")  # fmt: skip
    every_error = Counter(re.sub(r"\d+", "N", e)[:160] for r in rows for e in r["errors"])
    print(f"errors: {sum(every_error.values())}")
    for e, n in every_error.most_common(20):
        print(f"  {n:>5} x {e}")
    print(f"end checks: {len(problems)} problems")
    for problem in problems[:30]:
        print("  " + problem)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=40)
    parser.add_argument("--rate", type=float, default=30, help="tasks a second, about")
    parser.add_argument("--out", help="write each minute's figures here, one JSON document a line")
    parser.add_argument("--keep", action="store_true", help="keep the data directory (logs, store)")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="hive-soak-"))
    try:
        rows = anyio.run(soak, args, data)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")  # after the load
    finally:
        if args.keep:
            print(f"data and logs kept in {data}")
        else:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
