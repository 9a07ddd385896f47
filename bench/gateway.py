"""The gateway's HTTP rates, measured in one run against one ``hive gateway`` process.

Run: ``.venv/bin/python bench/gateway.py`` (or ``make bench``). It starts its own nats-server on a free
port of 127.0.0.1 with a temporary store and a ``hive gateway`` process, loads the gateway with ``wrk``,
then starts an echo worker to drain what was accepted; it ends every process it started by pid.

- the rate of a trivial route of the same server, ``GET /healthz``: what the HTTP stack alone allows;
- ``POST /v1/tasks``, one task a request: each answer a 202, given once JetStream stored the task;
- ``POST /v1/tasks/batch`` with 100 tasks a request, in tasks per second;
- the gateway's RSS after the runs, and its CPU time per task (per request for /healthz) in each run;
- then every accepted task is completed by the worker: nothing accepted was lost.

The three runs are made in turn, several rounds of them, and each ratio is taken within a round, then
the median of the rounds is the figure: this machine's speed drifts over a minute by more than the
differences measured, and a drift between a run and the one it is compared with would count as one.
A run lasts until the gateway has done all of its work, not just until wrk stops: what the gateway does
after the last answer (the metrics follower catching up with the events of the run) is time the run
took, and is added to its duration (the gateway's CPU time from wrk's end until it is idle again).

The load generator is Debian's ``wrk``: written in C, one thread with keep-alive connections and a fixed
concurrency, in a process of its own. It needs a small fraction of a core for these rates, so on a
machine of two cores the gateway, not the load generator, is what is measured (a Python client spends
as much CPU per request as the server, and would measure itself). When ``wrk`` is missing it is
installed with apt-get where this user may; otherwise the script says how to get it.

Targets: single POSTs >= 60 % of the /healthz rate; a batch of 100 moves >= 5x the tasks/s of single
POSTs; gateway RSS <= 80 MB. It always exits 0 (it is a measurement) and prints FAIL beside a missed
target.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from throughput import end, free_port, verdict  # beside this script

import hive_bus
from hive_bus._embedded import NatsServer
from hive_bus._stats import _count as count
from hive_bus._stats import provider_stats

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


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HIVE_LOG_LEVEL": "WARNING"}
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway was not ready within {timeout_s:g}s")


async def drained(nats_url: str, prefix: str) -> tuple[int, int, int, int]:
    """Once the worker has emptied the queue: accepted (queued events), completed, failed and still
    queued echo tasks."""
    async with hive_bus.connect(nats_url, prefix=prefix) as hive:
        with anyio.move_on_after(DRAIN_S):
            while True:
                rows = {r.provider: r for r in await provider_stats(hive.bus, [])}
                echo = rows.get("echo")
                if echo is not None and echo.pending == 0 and echo.retrying == 0:
                    break
                await anyio.sleep(0.5)
        echo = {r.provider: r for r in await provider_stats(hive.bus, [])}["echo"]
        accepted = await count(hive.bus, hive.bus.names.event_subject("echo", "*", "queued"))
        return accepted, echo.completed, echo.failed, echo.pending + echo.retrying


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


def report(rounds: list[dict[str, Run]], rss_mb: float, outcome: tuple[int, int, int, int]) -> None:
    print(f"\nwrk, 1 thread, {CONNECTIONS} keep-alive connections; RSS in MB of 10^6 bytes")
    print(
        f"{'round':<7}{'/healthz req/s':>16}{'POST req/s':>12}{'batch tasks/s':>15}{'catch-up s':>18}"
        f"{'POST/healthz':>14}{'batch/single':>14}"
    )
    single_ratios, batch_ratios = [], []
    for i, runs in enumerate(rounds, 1):
        health, single, batch = runs["healthz"], runs["single"], runs["batch"]
        single_ratios.append(single.per_s / health.per_s)
        batch_ratios.append(batch.tasks_per_s / single.tasks_per_s)
        catch_up = " ".join(f"{r.catch_up_s:.2f}" for r in runs.values())
        print(
            f"{i:<7}{health.per_s:>16,.0f}{single.per_s:>12,.0f}{batch.tasks_per_s:>15,.0f}{catch_up:>18}"
            f"{single_ratios[-1]:>14.2f}{batch_ratios[-1]:>13.2f}x"
        )
    print()
    print(
        f"{'all rounds':<28}{'requests/s':>12}{'tasks/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'catch-up s':>12}{'gateway CPU/task':>18}"
    )
    totals = [combined([runs[key] for runs in rounds]) for key in ("healthz", "single", "batch")]
    for run in totals:
        tasks = f"{run.tasks_per_s:,.0f}" if run.tasks_per_request else ""
        errors = run.bad_status + run.socket_errors
        print(
            f"{run.name:<28}{run.per_s:>12,.0f}{tasks:>10}{run.p50_ms:>9.2f}{run.p99_ms:>9.2f}{errors:>8}"
            f"{run.catch_up_s:>12.2f}{run.cpu_us_per_task:>15.0f} us"
        )
    single_ratio = statistics.median(single_ratios)
    batch_ratio = statistics.median(batch_ratios)
    print(f"\nmedians of {len(rounds)} rounds")
    print(
        f"single POST / GET /healthz      {single_ratio:6.2f}   target >= 0.60   {verdict(single_ratio >= 0.6)}"
    )
    print(
        f"batch tasks/s / single tasks/s  {batch_ratio:6.2f}x  target >= 5x     {verdict(batch_ratio >= 5)}"
    )
    print(f"gateway RSS after the runs      {rss_mb:6.1f}   target <= 80 MB  {verdict(rss_mb <= 80)}")
    errors = sum(r.bad_status + r.socket_errors for r in totals)
    print(f"error answers or socket errors  {errors:6d}   target 0         {verdict(errors == 0)}")
    accepted, completed, failed, left = outcome
    whole = completed == accepted and not failed and not left
    print(
        f"accepted {accepted:,} tasks (queued events); the worker completed {completed:,}, "
        f"failed {failed}, left {left}   {verdict(whole)}"
    )


def cpu_s(process: psutil.Process) -> float:
    return float(sum(process.cpu_times()[:2]))


def catch_up(process: psutil.Process, timeout_s: float = 60.0) -> float:
    """The gateway's CPU seconds from now until it is idle (under 5 % of a core over 0.2 s)."""
    start = cpu_s(process)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = cpu_s(process)
        time.sleep(0.2)
        if cpu_s(process) - before < 0.01:
            return before - start
    return cpu_s(process) - start


def bench(
    server: NatsServer, store: Path, procs: list[subprocess.Popen[bytes]], rounds: int, duration_s: float
) -> None:
    binary = find_wrk()
    if binary is None:
        print("FAIL: wrk is not installed and this user cannot install it: apt-get install wrk (Debian)")
        return
    prefix = "bench" + secrets.token_hex(4)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bus = ["--nats", server.url, "--prefix", prefix]
    gateway = spawn([str(BIN / "hive"), "gateway", "--port", str(port), *bus], store / "gateway.log")
    procs.append(gateway)
    wait_ready(url, gateway)
    print(f"nats-server {server.url} (pid {server.pid}), gateway {url} (pid {gateway.pid}), {binary}")
    lua = scripts(store)
    paths = {"healthz": "/healthz", "single": "/v1/tasks", "batch": "/v1/tasks/batch"}
    names = {
        "healthz": "GET /healthz",
        "single": "POST /v1/tasks",
        "batch": f"POST /v1/tasks/batch ({BATCH})",
    }
    tasks = {"healthz": 0, "single": 1, "batch": BATCH}
    process = psutil.Process(gateway.pid)
    for key in paths:  # warm-up
        wrk(binary, url + paths[key], 2.0, lua[key], names[key], tasks[key])
        catch_up(process)
    measured: list[dict[str, Run]] = []
    for i in range(rounds):
        runs: dict[str, Run] = {}
        for key in paths:
            before = cpu_s(process)
            run = wrk(binary, url + paths[key], duration_s, lua[key], names[key], tasks[key])
            during = cpu_s(process) - before
            after = catch_up(process)
            runs[key] = dataclasses.replace(run, gateway_cpu_s=during + after, catch_up_s=after)
        measured.append(runs)
        print(f"round {i + 1} of {rounds} done", flush=True)
    rss_mb = float(process.memory_info().rss) / MB
    worker = [str(BIN / "hive"), "worker", "echo", "--concurrency", "128", *bus]
    procs.append(spawn(worker, store / "worker.log"))
    outcome = anyio.run(drained, server.url, prefix)
    report(measured, rss_mb, outcome)


def main() -> None:
    parser = argparse.ArgumentParser(description="the gateway's HTTP rates: /healthz, single and batch POSTs")
    parser.add_argument("--rounds", type=int, default=3, help="of the three runs, one after the other")
    parser.add_argument("--duration-s", type=float, default=4.0, help="of each measured run")
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp(prefix="hive-bench-gateway-"))
    server = NatsServer(store / "nats", host="127.0.0.1", port=0)
    procs: list[subprocess.Popen[bytes]] = []
    finished = False
    server.start()
    try:
        bench(server, store, procs, args.rounds, args.duration_s)
        finished = True
    finally:
        for proc in reversed(procs):
            end(proc)
        server.stop()
        if finished:
            shutil.rmtree(store, ignore_errors=True)
        else:
            print(f"the benchmark did not finish; the logs of its processes are in {store}", file=sys.stderr)


if __name__ == "__main__":
    main()
