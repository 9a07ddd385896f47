"""The gateway's HTTP rates on each serving stack, and a worker and a client on each event loop, in one run.

Run: ``.venv/bin/python bench/gateway.py`` (or ``make bench``). It starts its own nats-server on a free
port of 127.0.0.1 with a temporary store, one gateway process for each stack below (each on a bus prefix
of its own), loads each in turn with ``wrk``, then runs an echo worker and a client on each event loop;
it ends every process it started by pid.

The stacks, each a process of its own, all started before the first run:

- ``h11, asyncio``: uvicorn parsing HTTP with h11 on asyncio's own loop (``hive --loop asyncio gateway
  --http h11``): the stack before this benchmark chose one, and the baseline of every ratio;
- ``httptools, asyncio`` and ``h11, uvloop``: one half of the change each, to show what each is worth;
- ``default``: ``hive gateway`` as it starts by itself (httptools and uvloop where installed);
- ``granian, uvloop``: granian (a Rust HTTP server) serving the very same app, embedded in the loop
  (``bench/granian_gateway.py``); measured only where granian is installed (``pip install granian``).

Each stack's routes, run in turn:

- the rate of a trivial route of the same server, ``GET /healthz``: what the HTTP stack alone allows;
- ``POST /v1/tasks``, one task a request: each answer a 202, given once JetStream stored the task;
- ``POST /v1/tasks/batch`` with 100 tasks a request, in tasks per second;
- for each, the p50 and the gateway process's CPU time per request (per task for a batch).

Rounds: in each round every stack runs every route once; each ratio against the baseline is taken within
a round, and the median of the rounds is the figure: this machine's speed drifts over a minute by more
than the differences measured. A run lasts until the gateway has done all of its work, not just until
wrk stops: what the gateway does after the last answer (the metrics follower catching up with the
events of the run) is time the run took, and is added to its duration (the gateway's CPU time from
wrk's end until it is idle again). Nothing accepted is lost: each stack's queued events, its tasks in
the queue and the tasks wrk saw accepted are the same count.

The worker and the client: ``hive --loop L worker echo --concurrency 128`` and a client process
(``Hive.submit_many`` of 5,000 echo tasks, 256 in flight, then ``Hive.results`` until the last is
complete), for L in asyncio and uvloop, in alternating rounds: tasks/s and each process's CPU per task.

The load generator is Debian's ``wrk``: written in C, one thread with keep-alive connections and a fixed
concurrency, in a process of its own. It needs a small fraction of a core for these rates, so on a
machine of two cores the gateway, not the load generator, is what is measured (a Python client spends
as much CPU per request as the server, and would measure itself). When ``wrk`` is missing it is
installed with apt-get where this user may; otherwise the script says how to get it.

Targets (the default stack, against the baseline in the same run): ``/healthz`` and single POSTs each
>= 1.5x the baseline's rate; single POSTs >= 0.75x the default's own ``/healthz``; a batch of 100 moves
>= 5x the tasks/s of single POSTs; gateway RSS <= 80 MB; no error answer; nothing lost. It always exits 0
(it is a measurement) and prints FAIL beside a missed target.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import psutil  # type: ignore[import-untyped,unused-ignore]
from throughput import cleaned_up, free_port, verdict  # beside this script

import hive_bus
from hive_bus._embedded import NatsServer
from hive_bus._loop import backend_options
from hive_bus._stats import _count as count

CONNECTIONS = 16  # requests in flight at once, over keep-alive connections
BATCH = 100  # tasks per batch request
BIN, REPO = Path(sys.executable).parent, Path(__file__).resolve().parent.parent
MB = 1e6  # RSS in MB of 10^6 bytes
DRAIN_S = 300.0  # at most, for the worker to complete what was accepted

# wrk runs this in each of its threads: the request (method, body, headers) and, at the end, a summary
# as one line of JSON on stdout.
WRK_SCRIPT = """
wrk.method = "{method}"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{{"requests": %d, "duration_us": %d, "bad_status": %d, "socket_errors": %d, "p50_us": %d, "p99_us": %d}}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Run:
    name: str
    requests: int
    duration_s: float
    bad_status: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    tasks_per_request: int = 0
    gateway_cpu_s: float = 0.0  # CPU time the gateway process spent during the run, catch-up included
    catch_up_s: float = 0.0  # the gateway's CPU time after wrk's end, until it was idle

    @property
    def cpu_us_per_task(self) -> float:
        """Gateway CPU per task (per request for a route that takes none)."""
        return self.gateway_cpu_s / (self.requests * max(1, self.tasks_per_request)) * 1e6

    @property
    def per_s(self) -> float:
        return self.requests / (self.duration_s + self.catch_up_s)

    @property
    def tasks_per_s(self) -> float:
        return self.per_s * self.tasks_per_request


def task_json(i: int) -> dict[str, str]:
    return {"provider": "echo", "prompt": f"benchmark task {i}: the quick brown fox jumps over the lazy dog"}


def lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def find_wrk() -> str | None:
    found = shutil.which("wrk")
    if found or not shutil.which("apt-get"):
        return found
    if os.geteuid() == 0:
        sudo: list[str] = []
    elif (
        shutil.which("sudo")
        and subprocess.run(["sudo", "-n", "true"], capture_output=True, timeout=10, check=False).returncode
        == 0
    ):
        sudo = ["sudo", "-n"]
    else:
        return None
    print("installing Debian's wrk (apt-get install wrk)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = [*sudo, "apt-get", "-q", "-o", "DPkg::Lock::Timeout=120"]
    for args in (["update"], ["install", "-y", "--no-install-recommends", "wrk"]):
        subprocess.run([*apt, *args], env=env, capture_output=True, timeout=300, check=False)
    return shutil.which("wrk")


def wrk(binary: str, url: str, duration_s: float, script: Path, name: str, tasks: int = 0) -> Run:
    cmd = [
        binary,
        "-t1",
        f"-c{CONNECTIONS}",
        f"-d{duration_s:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60, check=True).stdout
    summary = json.loads(next(line for line in out.splitlines() if line.startswith('{"requests"')))
    return Run(
        name=name,
        requests=summary["requests"],
        duration_s=summary["duration_us"] / 1e6,
        bad_status=summary["bad_status"],
        socket_errors=summary["socket_errors"],
        p50_ms=summary["p50_us"] / 1e3,
        p99_ms=summary["p99_us"] / 1e3,
        tasks_per_request=tasks,
    )


def scripts(into: Path) -> dict[str, Path]:
    bodies = {
        "healthz": ("GET", ""),
        "single": ("POST", json.dumps(task_json(0))),
        "batch": ("POST", json.dumps({"tasks": [task_json(i) for i in range(BATCH)]})),
    }
    paths = {}
    for name, (method, body) in bodies.items():
        path = into / f"{name}.lua"
        path.write_text(WRK_SCRIPT.format(method=method, body=lua_string(body) if body else "nil"))
        paths[name] = path
    return paths


# processes ---------------------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
BASELINE = "before"  # the ratios' baseline; "code-before" with --before REV
ADOPTED = "default"
# (key, name): the order in which each round runs them
STACKS = (
    ("before", "uvicorn h11, asyncio"),
    ("httptools", "uvicorn httptools, asyncio"),
    ("uvloop", "uvicorn h11, uvloop"),
    ("default", "hive gateway (default)"),
    ("granian", "granian, uvloop"),
)
ROUTES = ("healthz", "single", "batch")
PATHS = {"healthz": "/healthz", "single": "/v1/tasks", "batch": "/v1/tasks/batch"}
ROUTE_NAMES = {"healthz": "GET /healthz", "single": "POST /v1/tasks", "batch": f"POST batch ({BATCH})"}
TASKS_PER_REQUEST = {"healthz": 0, "single": 1, "batch": BATCH}
LOOPS = ("asyncio", "uvloop")
CLIENT_TASKS, CLIENT_WARMUP, CLIENT_WINDOW, WORKER_CONCURRENCY = 5_000, 500, 256, 128


def spawn(
    args: list[str], log: Path, extra_env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HIVE_LOG_LEVEL": "WARNING", **(extra_env or {})}
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway {proc.args!r} exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway {proc.args!r} was not ready within {timeout_s:g}s")


def stack_command(key: str, port: int, nats_url: str, prefix: str) -> list[str] | None:
    """How to start a stack's gateway; None where it is not installed."""
    hive, bus = str(BIN / "hive"), ["--port", str(port), "--nats", nats_url, "--prefix", prefix]
    if key == "code-before":  # hive_bus as it was at --before REV (on PYTHONPATH), with its defaults
        return [sys.executable, "-m", "hive_bus", "gateway", *bus]
    if key == "granian":
        if importlib.util.find_spec("granian") is None:
            return None
        return [sys.executable, str(HERE / "granian_gateway.py"), nats_url, prefix, str(port)]
    flags = {
        "before": (["--loop", "asyncio"], ["--http", "h11"]),
        "httptools": (["--loop", "asyncio"], ["--http", "httptools"]),
        "uvloop": (["--loop", "uvloop"], ["--http", "h11"]),
        "default": ([], []),
    }
    loop, http = flags[key]
    return [hive, *loop, "gateway", *http, *bus]


@dataclass
class Served:
    key: str
    name: str
    prefix: str
    url: str
    process: psutil.Process
    accepted_by_wrk: int = 0  # tasks in 2xx answers that wrk counted, warm-ups included


async def counted(nats_url: str, prefix: str) -> tuple[int, int]:
    """A stack's accepted tasks (queued events) and the tasks in its queue."""
    async with hive_bus.connect(nats_url, prefix=prefix) as hive:
        names = hive.bus.names
        accepted = await count(
            hive.bus, names.event_subject("echo", "*", "queued"), stream=names.events_stream_of("echo")
        )
        queued = (await hive.bus.js.stream_info(hive.bus.names.tasks_stream)).state.messages
        return accepted, queued


# the worker and the client on each loop ----------------------------------------------------------


@dataclass(frozen=True)
class LoopRun:
    loop: str
    tasks: int
    seconds: float
    client_cpu_s: float
    worker_cpu_s: float
    completed: int

    @property
    def per_s(self) -> float:
        return self.tasks / self.seconds


async def client(nats_url: str, prefix: str, n: int) -> None:
    """In a process of its own (``--client``): once the worker is there, a warm-up, then ``n`` echo tasks
    submitted and read back; prints one line of JSON with the wall time and this process's CPU time."""
    async with hive_bus.connect(nats_url, prefix=prefix) as hive:
        with anyio.fail_after(30):
            while not await hive.workers():  # noqa: ASYNC110 - nothing to wait on
                await anyio.sleep(0.1)

        async def run(count: int) -> int:
            requests = [
                hive_bus.TaskRequest(provider="echo", prompt=task_json(i)["prompt"]) for i in range(count)
            ]
            ids = await hive.submit_many(requests, window=CLIENT_WINDOW)
            return sum([view.status == "completed" async for view in hive.results(ids)])

        await run(CLIENT_WARMUP)
        t0, cpu0 = time.perf_counter(), time.process_time()
        completed = await run(n)
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        print(json.dumps({"seconds": seconds, "cpu_s": cpu_s, "completed": completed}), flush=True)


def loop_run(loop: str, nats_url: str, prefix: str, worker: psutil.Process) -> LoopRun:
    cmd = [sys.executable, __file__, "--client", loop, nats_url, prefix, str(CLIENT_TASKS)]
    before = cpu_s(worker)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=True).stdout
    catch_up(worker)
    figures = json.loads(out.strip().splitlines()[-1])
    return LoopRun(
        loop=loop,
        tasks=CLIENT_TASKS,
        seconds=figures["seconds"],
        client_cpu_s=figures["cpu_s"],
        worker_cpu_s=cpu_s(worker) - before,
        completed=figures["completed"],
    )


def loops_bench(
    server: NatsServer, store: Path, procs: list[subprocess.Popen[bytes]], rounds: int
) -> list[dict[str, LoopRun]]:
    prefixes = {loop: f"benchloop{loop}" + secrets.token_hex(3) for loop in LOOPS}
    workers = {}
    for loop in LOOPS:
        cmd = [str(BIN / "hive"), "--loop", loop, "worker", "echo", "--concurrency", str(WORKER_CONCURRENCY)]
        proc = spawn([*cmd, "--nats", server.url, "--prefix", prefixes[loop]], store / f"worker-{loop}.log")
        procs.append(proc)
        workers[loop] = psutil.Process(proc.pid)
    measured = []
    for i in range(rounds):
        measured.append({loop: loop_run(loop, server.url, prefixes[loop], workers[loop]) for loop in LOOPS})
        print(f"worker and client: round {i + 1} of {rounds} done", flush=True)
    return measured


# the report --------------------------------------------------------------------------------------


def combined(runs: list[Run]) -> Run:
    """The runs of one route over every round, as one run (p50 and p99: the median of the rounds')."""
    return Run(
        name=runs[0].name,
        requests=sum(r.requests for r in runs),
        duration_s=sum(r.duration_s for r in runs),
        bad_status=sum(r.bad_status for r in runs),
        socket_errors=sum(r.socket_errors for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        tasks_per_request=runs[0].tasks_per_request,
        gateway_cpu_s=sum(r.gateway_cpu_s for r in runs),
        catch_up_s=sum(r.catch_up_s for r in runs),
    )


Rounds = list[dict[tuple[str, str], Run]]  # (stack, route) -> run, one dict a round


def ratio(rounds: Rounds, stack: str, route: str, over: tuple[str, str]) -> float:
    """Median over the rounds of the stack's rate on the route, over another run's rate in that round."""
    return statistics.median(r[stack, route].per_s / r[over].per_s for r in rounds)


def report_stacks(served: list[Served], rounds: Rounds, baseline: str) -> list[str]:
    """The table of every stack and route; returns the errors and losses it found."""
    print(
        f"\nwrk, 1 thread, {CONNECTIONS} keep-alive connections, {len(rounds)} rounds; CPU: the gateway process's"
    )
    print(
        f"{'stack':<36}{'route':<20}{'req/s':>9}{'tasks/s':>10}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'CPU/req':>11}{'CPU/task':>10}{'x base':>10}{'catch-up s':>11}"
    )
    problems = []
    for gw in served:
        for route in ROUTES:
            run = combined([r[gw.key, route] for r in rounds])
            tasks = f"{run.tasks_per_s:,.0f}" if run.tasks_per_request else ""
            per_request_us = run.gateway_cpu_s / run.requests * 1e6
            per_task = f"{run.cpu_us_per_task:.0f} us" if run.tasks_per_request else ""
            x = ratio(rounds, gw.key, route, (baseline, route))
            print(
                f"{gw.name:<36}{ROUTE_NAMES[route]:<20}{run.per_s:>9,.0f}{tasks:>10}{run.p50_ms:>8.2f}"
                f"{run.p99_ms:>8.2f}{per_request_us:>8.0f} us{per_task:>10}{x:>9.2f}x{run.catch_up_s:>11.2f}"
            )
            if run.bad_status or run.socket_errors:
                problems.append(
                    f"{gw.name} {ROUTE_NAMES[route]}: {run.bad_status} error answers, {run.socket_errors} socket errors"
                )
        post_over_health = statistics.median(
            r[gw.key, "single"].per_s / r[gw.key, "healthz"].per_s for r in rounds
        )
        print(f"{'':<36}{'POST / healthz':<20}{post_over_health:>9.2f}")
    return problems


def report_targets(rounds: Rounds, rss_mb: float, problems: list[str], baseline: str) -> None:
    health_x = ratio(rounds, ADOPTED, "healthz", (baseline, "healthz"))
    single_x = ratio(rounds, ADOPTED, "single", (baseline, "single"))
    post_over = ratio(rounds, ADOPTED, "single", (ADOPTED, "healthz"))
    batch_over = statistics.median(
        r[ADOPTED, "batch"].tasks_per_s / r[ADOPTED, "single"].tasks_per_s for r in rounds
    )
    print(f"\nthe default stack, medians of {len(rounds)} rounds")
    print(
        f"GET /healthz, x the baseline         {health_x:6.2f}x  target >= 1.5x    {verdict(health_x >= 1.5)}"
    )
    print(
        f"single POST, x the baseline          {single_x:6.2f}x  target >= 1.5x    {verdict(single_x >= 1.5)}"
    )
    print(
        f"single POST / its own GET /healthz    {post_over:6.2f}   target >= 0.75   {verdict(post_over >= 0.75)}"
    )
    print(
        f"batch tasks/s / single tasks/s        {batch_over:6.2f}x  target >= 5x     {verdict(batch_over >= 5)}"
    )
    print(f"gateway RSS after the runs            {rss_mb:6.1f}   target <= 80 MB  {verdict(rss_mb <= 80)}")
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print("no error answer, no socket error; every stack stored what it accepted   PASS")


def report_loops(rounds: list[dict[str, LoopRun]]) -> None:
    print(
        f"\nhive worker echo (concurrency {WORKER_CONCURRENCY}) and a client (submit_many, window "
        f"{CLIENT_WINDOW}, then results), {CLIENT_TASKS:,} tasks a run, {len(rounds)} rounds"
    )
    print(
        f"{'loop':<10}{'tasks/s':>10}{'worker CPU/task':>17}{'client CPU/task':>17}{'x asyncio':>11}{'completed':>11}"
    )
    for loop in LOOPS:
        runs = [r[loop] for r in rounds]
        per_s = sum(r.tasks for r in runs) / sum(r.seconds for r in runs)
        tasks = sum(r.tasks for r in runs)
        worker_us = sum(r.worker_cpu_s for r in runs) / tasks * 1e6
        client_us = sum(r.client_cpu_s for r in runs) / tasks * 1e6
        x = statistics.median(r[loop].per_s / r["asyncio"].per_s for r in rounds)
        completed = sum(r.completed for r in runs)
        print(
            f"{loop:<10}{per_s:>10,.0f}{worker_us:>14.0f} us{client_us:>14.0f} us{x:>10.2f}x"
            f"{completed:>8,}/{tasks:,} {verdict(completed == tasks)}"
        )


def cpu_s(process: psutil.Process) -> float:
    return float(sum(process.cpu_times()[:2]))


def catch_up(process: psutil.Process, timeout_s: float = 60.0) -> float:
    """The process's CPU seconds from now until it is idle (under 5 % of a core over 0.2 s)."""
    start = cpu_s(process)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = cpu_s(process)
        time.sleep(0.2)
        if cpu_s(process) - before < 0.01:
            return before - start
    return cpu_s(process) - start


def measured_run(binary: str, gw: Served, route: str, lua: dict[str, Path], duration_s: float) -> Run:
    before = cpu_s(gw.process)
    run = wrk(
        binary, gw.url + PATHS[route], duration_s, lua[route], ROUTE_NAMES[route], TASKS_PER_REQUEST[route]
    )
    during = cpu_s(gw.process) - before
    after = catch_up(gw.process)
    gw.accepted_by_wrk += (run.requests - run.bad_status) * TASKS_PER_REQUEST[route]
    return dataclasses.replace(run, gateway_cpu_s=during + after, catch_up_s=after)


def shown(cmd: list[str]) -> str:
    """A stack's command, without its bus and port arguments."""
    words = [Path(cmd[0]).name, *cmd[1:]]
    return " ".join(words[: words.index("--port")] if "--port" in words else words[:2])


def code_at(rev: str, into: Path) -> Path:
    """hive_bus as it was at ``rev``, extracted from git into ``into`` (for PYTHONPATH)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "hive_bus"], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def start_stacks(
    server: NatsServer, store: Path, procs: list[subprocess.Popen[bytes]], before: str | None
) -> list[Served]:
    served = []
    stacks = [("code-before", f"hive gateway at {before} (before)")] if before else []
    for key, name in [*stacks, *STACKS]:
        prefix, port = f"bench{key.replace('-', '')}" + secrets.token_hex(3), free_port()
        cmd = stack_command(key, port, server.url, prefix)
        if cmd is None:
            print(f"{name}: not installed, not measured")
            continue
        if before and key == "code-before":
            # python -m puts its working directory first on sys.path: the old code's, not this checkout's
            old = code_at(before, store / "code-before")
            proc = spawn(cmd, store / f"gateway-{key}.log", {"PYTHONPATH": str(old)}, cwd=old)
        else:
            proc = spawn(cmd, store / f"gateway-{key}.log")
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        served.append(Served(key, name, prefix, url, psutil.Process(proc.pid)))
        print(f"{name}: {url} (pid {proc.pid}): {shown(cmd)}")
    return served


def bench(
    server: NatsServer,
    store: Path,
    procs: list[subprocess.Popen[bytes]],
    rounds: int,
    duration_s: float,
    before: str | None,
) -> None:
    binary = find_wrk()
    if binary is None:
        print("FAIL: wrk is not installed and this user cannot install it: apt-get install wrk (Debian)")
        return
    print(f"nats-server {server.url} (pid {server.pid}), {binary}")
    served = start_stacks(server, store, procs, before)
    baseline = "code-before" if before else BASELINE
    print(f"baseline of the ratios (x base): {next(gw.name for gw in served if gw.key == baseline)}")
    lua = scripts(store)
    for gw in served:  # warm-up
        for route in ROUTES:
            measured_run(binary, gw, route, lua, 2.0)
    measured: Rounds = []
    for i in range(rounds):
        measured.append(
            {
                (gw.key, route): measured_run(binary, gw, route, lua, duration_s)
                for gw in served
                for route in ROUTES
            }
        )
        print(f"round {i + 1} of {rounds} done", flush=True)
    adopted = next(gw for gw in served if gw.key == ADOPTED)
    rss_mb = float(adopted.process.memory_info().rss) / MB
    problems = report_stacks(served, measured, baseline)
    for gw in served:
        accepted, queued = anyio.run(counted, server.url, gw.prefix)
        if not accepted == queued >= gw.accepted_by_wrk:
            problems.append(
                f"{gw.name}: {accepted:,} queued events, {queued:,} tasks in the queue, {gw.accepted_by_wrk:,} accepted as wrk counted"
            )
    report_targets(measured, rss_mb, problems, baseline)
    report_loops(loops_bench(server, store, procs, rounds))


def main() -> None:
    parser = argparse.ArgumentParser(
        description="the gateway's HTTP rates on each stack; worker and client on each loop"
    )
    parser.add_argument("--rounds", type=int, default=3, help="of every stack's runs, one after the other")
    parser.add_argument("--duration-s", type=float, default=4.0, help="of each measured run")
    parser.add_argument(
        "--before",
        metavar="REV",
        help="also run hive_bus as it was at this git revision (its defaults), as the ratios' baseline",
    )
    parser.add_argument(
        "--client", nargs=4, metavar=("LOOP", "URL", "PREFIX", "TASKS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.client:
        loop, url, prefix, tasks = args.client
        anyio.run(client, url, prefix, int(tasks), backend_options=backend_options(loop))
        return
    store = Path(tempfile.mkdtemp(prefix="hive-bench-gateway-"))
    server = NatsServer(store / "nats", host="127.0.0.1", port=0)
    procs: list[subprocess.Popen[bytes]] = []
    server.start()
    with cleaned_up(server, store, procs):
        bench(server, store, procs, args.rounds, args.duration_s, args.before)


if __name__ == "__main__":
    main()
