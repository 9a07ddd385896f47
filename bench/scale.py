"""Cost that stays flat as work grows: one bus grown to a million queued tasks, measured on the way.

Run: ``.venv/bin/python bench/scale.py`` (or ``make bench``); ``--max-queued 20000`` for a quick look.
It starts its own nats-server on a free port of 127.0.0.1 with a temporary store, the real gateway
process (``hive gateway``) and, when one is needed, a real worker process (``hive worker echo``); it ends
every process it started by pid.

The bus is grown in stages: 0 (the empty-bus baseline), a tenth of ``--max-queued`` and ``--max-queued``
(100,000 and 1,000,000 by default) tasks waiting in the echo queue, with twice as many events stored:
each stage is reached by queueing tasks with ``Hive.submit_batch`` from this process (1,000 a call,
several calls in flight), and then, while the events stream holds fewer than twice the queue, more
tasks that the worker completes (a ``queued`` and a ``completed`` event each). The streams' limits are
raised (``HIVE_TASKS_MAX_*``, ``HIVE_EVENTS_MAX_BYTES``) so that nothing is refused. The fill's duration
is reported.

At each stage, in this order:

- start-up: the gateway is ended and started again; the seconds to a ``/healthz`` answer of 200, to its
  first store audit done (``GET /v1/audit``), and until its CPU is idle (it reads the dashboard's last
  hour back in the background: at most ``BACKFILL_MAX_EVENTS`` events); the reads come after that;
- reads, each ``READS`` times one after the other over a keep-alive connection, p50 and p95:
  ``GET /metrics``, ``GET /v1/stats``, ``GET /v1/tasks?limit=50`` and ``GET /v1/tasks/{id}`` of the
  oldest task of the run (queued before the first stage);
- submit rate: single ``POST /v1/tasks`` for ``SUBMIT_S`` seconds with ``wrk`` (as ``bench/gateway.py``
  loads it), and the gateway's CPU per accepted task;
- a worker's fetch-and-complete rate from the deep queue: ``hive worker echo`` completes as many tasks
  from the front of the queue as the submit rate queued (at least ``MIN_WORKER_TASKS``), back to the
  stage's size, measured between 5 % and 95 % of them, with the worker's CPU per task;
- RSS of the gateway (after all of the above), the worker (at its end) and nats-server.

Last, a Raspberry Pi 4 estimate: the empty bus's CPU per task of the gateway, nats-server and the
worker, times how many times slower a Pi 4 core runs the Benchmarks Game's n-body program in Python
(a published Pi 4 time against this machine's, timed in the same run; see :func:`pi_factor`).

The table puts each figure beside the empty bus's (same run). Targets: each rate within 15 % of its
empty-bus value, each read's p95 under 100 ms at the largest stage, start-up (audit included) under 5 s,
gateway RSS under 100 MB and the others flat (within 1.5x of the empty bus). With ``--out DIR``, a JSON
file of every figure and a PNG chart per figure against queue size (matplotlib: the ``bench`` extra,
``pip install -e '.[bench]'``). It always exits 0 (it is a measurement) and prints FAIL beside a missed
target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
import httpx
import nats.js.errors
import psutil  # type: ignore[import-untyped,unused-ignore]
from gateway import WRK_SCRIPT, catch_up, cpu_s, find_wrk, lua_string, spawn, task_json, wrk  # beside this
from throughput import cleaned_up, end, free_port, verdict

import hive_bus
from hive_bus._bus import event_providers
from hive_bus._embedded import NatsServer
from hive_bus._stats import queue_depths

BIN = Path(sys.executable).parent
MB = 1e6
PROVIDER = "echo"
READS = 30  # of each read route, at each stage
SUBMIT_S = 4.0  # of single POSTs with wrk, at each stage
FILL_CHUNK = 1000  # tasks a submit_batch call
FILL_IN_FLIGHT = 4  # submit_batch calls at once
WORKER_CONCURRENCY = 128
MIN_WORKER_TASKS = 20_000  # at least this many for the worker to complete at each stage
READ_TARGET_MS = 100.0
STARTUP_TARGET_S = 5.0
GATEWAY_RSS_TARGET_MB = 100.0
RATE_TOLERANCE = 0.15
READ_ROUTES = ("/metrics", "/v1/stats", "/v1/tasks?limit=50", "/v1/tasks/{old}")


@dataclass
class Stage:
    """The figures of one stage."""

    target_queued: int
    queued: int = 0  # tasks in the queue when the reads began
    events: int = 0  # events stored when the reads began
    fill_s: float = 0.0  # to reach this stage from the one before (submitting and completing)
    healthz_s: float = 0.0  # gateway start to /healthz 200
    audit_s: float = 0.0  # gateway start to its first store audit done
    audit_own_s: float = 0.0  # the audit's own seconds, as it reports them
    idle_s: float = 0.0  # gateway start until its CPU is idle (the history's backfill of the last hour)
    reads_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # route -> (p50, p95)
    submit_per_s: float = 0.0
    submit_cpu_us: float = 0.0  # gateway CPU per accepted task
    submit_nats_cpu_us: float = 0.0  # nats-server CPU per accepted task
    worker_per_s: float = 0.0
    worker_cpu_us: float = 0.0  # worker CPU per completed task
    gateway_rss_mb: float = 0.0
    worker_rss_mb: float = 0.0
    nats_rss_mb: float = 0.0


class Bench:
    def __init__(
        self, server: NatsServer, store: Path, procs: list[subprocess.Popen[bytes]], max_queued: int
    ):
        self.server = server
        self.store = store
        self.procs = procs
        self.prefix = "scale" + secrets.token_hex(3)
        headroom = 2 * max_queued + 200_000
        # every stream large enough for the run: nothing refused (each reserves its max_bytes)
        self.env = {
            "HIVE_NATS_URL": server.url,
            "HIVE_PREFIX": self.prefix,
            "HIVE_TASKS_MAX_MSGS": str(headroom),
            "HIVE_TASKS_MAX_BYTES": str(max(512 * 1024**2, headroom * 1024)),
            "HIVE_EVENTS_MAX_BYTES": str(max(1024**3, 3 * headroom * 1024)),
        }
        os.environ.update(self.env)  # this process's own client declares the same streams
        self.gateway: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.old_id = ""
        self.starts = 0
        wrk_binary = find_wrk()
        if wrk_binary is None:
            raise SystemExit(
                "wrk is not installed and this user cannot install it: apt-get install wrk (Debian)"
            )
        self.wrk = wrk_binary
        self.lua = store / "single.lua"
        body = json.dumps(task_json(0))
        self.lua.write_text(WRK_SCRIPT.format(method="POST", body=lua_string(body)))

    # processes -----------------------------------------------------------------------------------

    def start_gateway(self, stage: Stage) -> None:
        """(Re)start the gateway; the seconds to /healthz 200 and to its first audit done."""
        if self.gateway is not None:
            end(self.gateway)
            self.procs.remove(self.gateway)
        port = free_port()
        self.starts += 1
        cmd = [str(BIN / "hive"), "gateway", "--port", str(port)]
        t0 = time.perf_counter()
        self.gateway = spawn(cmd, self.store / f"gateway-{self.starts}.log", self.env)
        self.procs.append(self.gateway)
        self.url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=self.url, timeout=10) as http:
            stage.healthz_s = poll(lambda: http.get("/healthz").status_code == 200, self.gateway) - t0
            stage.audit_s = poll(lambda: http.get("/v1/audit").json()["last"] is not None, self.gateway) - t0
            stage.audit_own_s = http.get("/v1/audit").json()["last"]["seconds"]
        # the reads are measured once the gateway has done what it does on start (the dashboard's last
        # hour read back, in the background): what a user who reads later sees
        catch_up(psutil.Process(self.gateway.pid), timeout_s=600)
        stage.idle_s = time.perf_counter() - t0

    def start_worker(self, n: int) -> subprocess.Popen[bytes]:
        cmd = [str(BIN / "hive"), "worker", PROVIDER, "--concurrency", str(WORKER_CONCURRENCY)]
        proc = spawn(cmd, self.store / f"worker-{n}.log", self.env)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        end(proc)
        self.procs.remove(proc)

    # the bus -------------------------------------------------------------------------------------

    def state(self) -> tuple[int, int]:
        """Tasks in the queue, events stored."""

        async def read() -> tuple[int, int]:
            async with hive_bus.connect() as hive:
                js, names = hive.bus.js, hive.bus.names
                # the queue is what the consumers have not acked: the tasks stream keeps acked tasks too
                tasks = sum(d.pending + d.ack_pending for d in (await queue_depths(hive.bus)).values())
                events = 0  # in every provider's stream (none before the first submission)
                for provider in await event_providers(hive.bus):
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        events += (await js.stream_info(names.events_stream_of(provider))).state.messages
                return tasks, events

        return anyio.run(read)

    def fill(self, n: int) -> list[str]:
        """Queue ``n`` echo tasks; their ids."""

        async def submit() -> list[str]:
            ids: list[str] = []
            async with hive_bus.connect() as hive:
                limiter = anyio.CapacityLimiter(FILL_IN_FLIGHT)

                async def chunk(start: int, size: int) -> None:
                    async with limiter:
                        requests = [
                            hive_bus.TaskRequest(provider=PROVIDER, prompt=task_json(start + i)["prompt"])
                            for i in range(size)
                        ]
                        for outcome in await hive.submit_batch(requests):
                            if isinstance(outcome, Exception):
                                raise outcome
                            ids.append(outcome.id)

                async with anyio.create_task_group() as tg:
                    for start in range(0, n, FILL_CHUNK):
                        tg.start_soon(chunk, start, min(FILL_CHUNK, n - start))
            return ids

        return anyio.run(submit)

    def work(self, stage: Stage, down_to: int) -> None:
        """A worker completes tasks from the front of the queue until it holds ``down_to``; its rate
        between 5 % and 95 % of the way, its CPU per task there, and its RSS at the end."""
        start, _ = self.state()
        todo = start - down_to
        proc = self.start_worker(self.starts)
        worker = psutil.Process(proc.pid)
        marks: list[tuple[float, int, float]] = []  # (time, tasks left, worker CPU)
        low, high = int(0.05 * todo), int(0.95 * todo)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with status {proc.returncode}")
            left, _ = self.state()
            done = start - left
            now, cpu = time.perf_counter(), cpu_s(worker)
            if done >= low and (not marks or marks[-1][1] != left):
                marks.append((now, left, cpu))
            if done >= high:
                break
            time.sleep(0.2)
        first, last = marks[0], marks[-1]
        tasks = first[1] - last[1]
        stage.worker_per_s = tasks / (last[0] - first[0])
        stage.worker_cpu_us = (last[2] - first[2]) / tasks * 1e6
        while self.state()[0] > down_to:
            time.sleep(0.1)
        stage.worker_rss_mb = worker.memory_info().rss / MB
        self.stop(proc)

    # figures -------------------------------------------------------------------------------------

    def reads(self, stage: Stage) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            for route in READ_ROUTES:
                path = route.format(old=self.old_id)
                times = []
                for _ in range(READS):
                    t0 = time.perf_counter()
                    answer = http.get(path)
                    times.append((time.perf_counter() - t0) * 1e3)
                    answer.raise_for_status()
                stage.reads_ms[route] = (statistics.median(times), percentile(times, 0.95))

    def submit_rate(self, stage: Stage) -> None:
        assert self.gateway is not None
        gateway, server = psutil.Process(self.gateway.pid), psutil.Process(self.server.pid)
        catch_up(gateway)
        before, server_before = cpu_s(gateway), cpu_s(server)
        run = wrk(self.wrk, self.url + "/v1/tasks", SUBMIT_S, self.lua, "POST /v1/tasks", 1)
        after = catch_up(gateway)
        accepted = run.requests - run.bad_status
        if run.bad_status or run.socket_errors:
            print(f"FAIL: {run.bad_status} error answers, {run.socket_errors} socket errors to single POSTs")
        stage.submit_per_s = accepted / (run.duration_s + after)
        stage.submit_cpu_us = (cpu_s(gateway) - before) / max(1, accepted) * 1e6
        stage.submit_nats_cpu_us = (cpu_s(server) - server_before) / max(1, accepted) * 1e6

    def rss(self, stage: Stage) -> None:
        assert self.gateway is not None
        stage.gateway_rss_mb = psutil.Process(self.gateway.pid).memory_info().rss / MB
        stage.nats_rss_mb = psutil.Process(self.server.pid).memory_info().rss / MB

    # a stage -------------------------------------------------------------------------------------

    def grow(self, stage: Stage) -> None:
        """Queue and complete tasks until the queue holds ``target_queued`` and the events twice that."""
        t0 = time.perf_counter()
        queued, events = self.state()
        if stage.target_queued > queued:
            self.fill(stage.target_queued - queued)
            queued, events = self.state()
        # each extra task adds a queued and a completed event; the worker completes it (or an older one)
        extra = max(0, (2 * stage.target_queued - events + 1) // 2)
        print(f"  queued {queued:,} tasks; {extra:,} more for the worker to complete", flush=True)
        if extra:
            self.fill(extra)
            self.work(stage, down_to=queued)
        self.top_up(stage.target_queued)
        stage.fill_s = time.perf_counter() - t0

    def top_up(self, target: int) -> None:
        left, _ = self.state()
        if left < target:  # the worker took a few more before it stopped
            self.fill(target - left)

    def measure(self, stage: Stage) -> None:
        if stage.target_queued:
            self.grow(stage)
        self.start_gateway(stage)
        stage.queued, stage.events = self.state()
        print(f"  {stage.queued:,} queued, {stage.events:,} events; gateway up; reads", flush=True)
        self.reads(stage)
        self.submit_rate(stage)
        # the worker completes what the submit rate queued (at least MIN_WORKER_TASKS), from the front
        # of the queue: back to the stage's size
        queued, _ = self.state()
        if queued - stage.target_queued < MIN_WORKER_TASKS:
            self.fill(MIN_WORKER_TASKS - (queued - stage.target_queued))
        self.work(stage, down_to=stage.target_queued)
        self.top_up(stage.target_queued)
        self.rss(stage)


def poll(ok: Callable[[], bool], proc: subprocess.Popen[bytes], timeout_s: float = 600.0) -> float:
    """The time at which ``ok()`` first held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with status {proc.returncode}")
        try:
            if ok():
                return time.perf_counter()
        except (httpx.TransportError, KeyError, ValueError):
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{proc.args!r}: not there within {timeout_s:g}s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# the report ----------------------------------------------------------------------------------------


def rows(stages: list[Stage]) -> list[tuple[str, str, list[float], str, bool | None]]:
    """(figure, unit, value at each stage, target, met) for the table and the charts."""
    base, top = stages[0], stages[-1]
    out: list[tuple[str, str, list[float], str, bool | None]] = []

    def rate(name: str, values: list[float]) -> None:
        ok = all(v >= (1 - RATE_TOLERANCE) * values[0] for v in values[1:])
        out.append((name, "/s", values, f">= {1 - RATE_TOLERANCE:.2f}x empty", ok))

    rate("submit, single POSTs", [s.submit_per_s for s in stages])
    rate("worker fetch-and-complete", [s.worker_per_s for s in stages])
    out.append(("gateway CPU per submit", "us", [s.submit_cpu_us for s in stages], "", None))
    out.append(("nats-server CPU per submit", "us", [s.submit_nats_cpu_us for s in stages], "", None))
    out.append(("worker CPU per task", "us", [s.worker_cpu_us for s in stages], "", None))
    for route in READ_ROUTES:
        p95 = top.reads_ms[route][1]
        out.append((f"GET {route} p50", "ms", [s.reads_ms[route][0] for s in stages], "", None))
        out.append(
            (
                f"GET {route} p95",
                "ms",
                [s.reads_ms[route][1] for s in stages],
                f"< {READ_TARGET_MS:g} ms",
                p95 < READ_TARGET_MS,
            )
        )
    out.append(("start-up to /healthz", "s", [s.healthz_s for s in stages], "", None))
    out.append(
        (
            "start-up to audit done",
            "s",
            [s.audit_s for s in stages],
            f"< {STARTUP_TARGET_S:g} s",
            top.audit_s < STARTUP_TARGET_S,
        )
    )
    out.append(("start-up to idle", "s", [s.idle_s for s in stages], "", None))
    rss_gw = [s.gateway_rss_mb for s in stages]
    out.append(
        ("gateway RSS", "MB", rss_gw, f"< {GATEWAY_RSS_TARGET_MB:g} MB", max(rss_gw) < GATEWAY_RSS_TARGET_MB)
    )
    worker_rss = [s.worker_rss_mb for s in stages]
    out.append(("worker RSS", "MB", worker_rss, "<= 1.5x empty", max(worker_rss) <= 1.5 * base.worker_rss_mb))
    out.append(("nats-server RSS", "MB", [s.nats_rss_mb for s in stages], "", None))
    return out


def report(stages: list[Stage]) -> None:
    print()
    head = "".join(f"{f'{s.queued:,} queued':>18}" for s in stages)
    print(f"{'figure':<34}{head}   {'x empty':>8}  target")
    print(f"{'events stored':<34}" + "".join(f"{s.events:>18,}" for s in stages))
    print(f"{'fill from the stage before (s)':<34}" + "".join(f"{s.fill_s:>18.1f}" for s in stages))
    for name, unit, values, target, ok in rows(stages):
        shown = "".join(f"{v:>15,.1f} {unit:<2}" if unit != "/s" else f"{v:>15,.0f} /s" for v in values)
        ratio = f"{values[-1] / values[0]:>7.2f}x" if values[0] else f"{'':>8}"
        mark = "" if ok is None else f"  {target:<18}{verdict(ok)}"
        print(f"{name:<34}{shown}   {ratio}{mark}")


def charts(stages: list[Stage], out: Path) -> None:
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print("no charts: matplotlib is not installed (pip install -e '.[bench]')")
        return
    queued = [s.queued for s in stages]
    # one chart a figure; a read's p50 and p95 share one
    charted: dict[str, list[tuple[str, str, list[float], str]]] = {}
    for name, unit, values, target, _ok in rows(stages):
        figure, _, pct = name.rpartition(" ")
        key = figure if pct in ("p50", "p95") else name
        charted.setdefault(key, []).append((pct if key != name else "", unit, values, target))
    for name, lines in charted.items():
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for label, _, values, _ in lines:
            ax.plot(queued, values, marker="o", label=label or None)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        target = next((t for *_, t in lines if t), "")
        top = max(v for line in lines for v in line[2])
        ax.set_xscale("symlog", linthresh=max(1, queued[1] if len(queued) > 1 else 1))
        ax.set_xlabel("tasks queued")
        ax.set_ylabel(lines[0][1])
        ax.set_ylim(bottom=0, top=top * 1.25 or 1)
        ax.set_title(name + (f" (target {target})" if target else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{slug(name)}.png")
        plt.close(fig)
    print(f"charts in {out}")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


# A Raspberry Pi 4 against this machine ---------------------------------------------------------
#
# The Pi figures are this machine's CPU per task times how much slower a Pi 4 core runs single-threaded
# Python. That factor is measured: the n-body program of the Computer Language Benchmarks Game (the
# classic Python version below), 5,000,000 steps, took 158.3 s on a Raspberry Pi 4 Model B (Cortex-A72
# at 1.5 GHz, performance governor; https://chaitanyamehta.github.io/projects/performance-analysis-of-
# programming-languages); this run times the same program here, for a tenth of the steps.
PI4_NBODY_S = 158.3
PI4_NBODY_STEPS = 5_000_000
NBODY_STEPS = 500_000

NBODY = """
import sys, time
PI = 3.14159265358979323
SOLAR_MASS = 4 * PI * PI
DAYS_PER_YEAR = 365.24
BODIES = {
    "sun": ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], SOLAR_MASS),
    "jupiter": ([4.84143144246472090e+00, -1.16032004402742839e+00, -1.03622044471123109e-01],
                [1.66007664274403694e-03 * DAYS_PER_YEAR, 7.69901118419740425e-03 * DAYS_PER_YEAR,
                 -6.90460016972063023e-05 * DAYS_PER_YEAR], 9.54791938424326609e-04 * SOLAR_MASS),
    "saturn": ([8.34336671824457987e+00, 4.12479856412430479e+00, -4.03523417114321381e-01],
               [-2.76742510726862411e-03 * DAYS_PER_YEAR, 4.99852801234917238e-03 * DAYS_PER_YEAR,
                2.30417297573763929e-05 * DAYS_PER_YEAR], 2.85885980666130812e-04 * SOLAR_MASS),
    "uranus": ([1.28943695621391310e+01, -1.51111514016986312e+01, -2.23307578892655734e-01],
               [2.96460137564761618e-03 * DAYS_PER_YEAR, 2.37847173959480950e-03 * DAYS_PER_YEAR,
                -2.96589568540237556e-05 * DAYS_PER_YEAR], 4.36624404335156298e-05 * SOLAR_MASS),
    "neptune": ([1.53796971148509165e+01, -2.59193146099879641e+01, 1.79258772950371181e-01],
                [2.68067772490389322e-03 * DAYS_PER_YEAR, 1.62824170038242295e-03 * DAYS_PER_YEAR,
                 -9.51592254519715870e-05 * DAYS_PER_YEAR], 5.15138902046611451e-05 * SOLAR_MASS),
}
SYSTEM = list(BODIES.values())
PAIRS = [(SYSTEM[i], SYSTEM[j]) for i in range(len(SYSTEM) - 1) for j in range(i + 1, len(SYSTEM))]

def advance(dt, n, bodies=SYSTEM, pairs=PAIRS):
    for _ in range(n):
        for (([x1, y1, z1], v1, m1), ([x2, y2, z2], v2, m2)) in pairs:
            dx = x1 - x2
            dy = y1 - y2
            dz = z1 - z2
            mag = dt * ((dx * dx + dy * dy + dz * dz) ** (-1.5))
            b1m = m1 * mag
            b2m = m2 * mag
            v1[0] -= dx * b2m
            v1[1] -= dy * b2m
            v1[2] -= dz * b2m
            v2[0] += dx * b1m
            v2[1] += dy * b1m
            v2[2] += dz * b1m
        for (r, [vx, vy, vz], m) in bodies:
            r[0] += dt * vx
            r[1] += dt * vy
            r[2] += dt * vz

def offset_momentum(ref, bodies=SYSTEM, px=0.0, py=0.0, pz=0.0):
    for (r, [vx, vy, vz], m) in bodies:
        px -= vx * m
        py -= vy * m
        pz -= vz * m
    (r, v, m) = ref
    v[0] = px / m
    v[1] = py / m
    v[2] = pz / m

offset_momentum(BODIES["sun"])
t0 = time.process_time()
advance(0.01, int(sys.argv[1]))
print(time.process_time() - t0)
"""


def pi_factor() -> tuple[float, str]:
    """How many times longer the n-body steps take on a Pi 4 core than on a core of this machine, and
    the Python that ran them here: 3.7 where there is one (the page does not name its Python; Raspberry
    Pi OS of 2020, Buster, shipped 3.7), else this one (3.11 runs the program about 1.5x faster than
    3.7, which would make the factor that much too large)."""
    found = [shutil.which("python3.7"), *sorted(Path.home().glob(".pyenv/versions/3.7*/bin/python3.7"))]
    python = next((str(p) for p in found if p and runs(str(p))), sys.executable)
    out = subprocess.run(
        [python, "-c", NBODY, str(NBODY_STEPS)], capture_output=True, text=True, check=True, timeout=600
    ).stdout
    here_s = float(out.strip()) * PI4_NBODY_STEPS / NBODY_STEPS
    version = subprocess.run([python, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    return PI4_NBODY_S / here_s, version


def runs(python: str) -> bool:
    """Whether ``python`` starts (a pyenv shim of a version not selected does not)."""
    return subprocess.run([python, "--version"], capture_output=True, check=False).returncode == 0


def report_pi(stages: list[Stage], factor: float, python: str) -> None:
    base = stages[0]
    print(
        f"\na Raspberry Pi 4 core (Cortex-A72, 1.5 GHz) runs the n-body program {factor:.1f}x slower than a core "
        f"here ({python} here); the empty bus's CPU per task times that:"
    )
    for name, cpu_us in (
        ("gateway, a single POST", base.submit_cpu_us),
        ("nats-server, a single POST (Go: the factor is a guess)", base.submit_nats_cpu_us),
        ("worker (echo), a task fetched and completed", base.worker_cpu_us),
    ):
        pi_us = cpu_us * factor
        print(f"  {name:<58}{cpu_us:8.0f} us here  {pi_us:8.0f} us on a Pi  ~{1e6 / pi_us:,.0f} /s a core")


def main() -> None:
    parser = argparse.ArgumentParser(description="one bus grown to --max-queued tasks, measured on the way")
    parser.add_argument(
        "--max-queued", type=int, default=1_000_000, help="tasks in the queue at the last stage"
    )
    parser.add_argument("--out", type=Path, help="write scale.json and a PNG chart per figure here")
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp(prefix="hive-bench-scale-"))
    server = NatsServer(store / "nats", host="127.0.0.1", port=0)
    procs: list[subprocess.Popen[bytes]] = []
    server.start()
    stages = [Stage(0), Stage(args.max_queued // 10), Stage(args.max_queued)]
    t0 = time.perf_counter()
    with cleaned_up(server, store, procs):
        bench = Bench(server, store, procs, args.max_queued)
        bench.old_id = bench.fill(1)[0]
        print(f"nats-server {server.url} (pid {server.pid}), bus prefix {bench.prefix}", flush=True)
        for stage in stages:
            print(f"stage {stage.target_queued:,} queued", flush=True)
            bench.measure(stage)
    print(f"\nthe whole run took {time.perf_counter() - t0:,.0f} s")
    factor, python = pi_factor()
    report(stages)
    report_pi(stages, factor, python)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        figures = {"pi4_factor": factor, "pi4_factor_python": python, "stages": [asdict(s) for s in stages]}
        (args.out / "scale.json").write_text(json.dumps(figures, indent=1))
        charts(stages, args.out)


if __name__ == "__main__":
    main()
