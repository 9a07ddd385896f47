"""Rate limits waited out: M tasks against a provider fake that allows L requests per window.

Run: ``.venv/bin/python bench/rate_limits.py`` (or ``make bench``). It starts its own nats-server on a free
port of 127.0.0.1 with a temporary store and the provider fakes on another loopback port, runs ``hive
worker groq`` processes against the Groq fake (the real groq SDK, its retries off), and ends everything it
started by pid.

Two runs with the same total concurrency: one worker with 4 calls at a time, then four workers with one
each. For each: the completion time against the ideal M/L windows (target <= 1.2x), the 429s counted at
the fake (target: four workers cost no more than one), and that every task completed exactly once.
It always exits 0 (it is a measurement) and prints FAIL beside a missed target.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for the provider fakes, which live with the tests

from hive_bus import Completed, Hive, TaskRequest, load_settings  # noqa: E402
from hive_bus._embedded import NatsServer  # noqa: E402
from hive_bus.bus import open_bus  # noqa: E402
from tests.fakes import ProviderFakes  # noqa: E402

TASKS, LIMIT, WINDOW_S = 120, 10, 2.0  # M, L, and the fake's window
HIVE = str(Path(sys.executable).with_name("hive"))


@dataclass
class Run:
    label: str
    seconds: float
    rate_limited: int
    calls: int
    completed: int
    duplicates: int

    @property
    def ideal_s(self) -> float:
        return TASKS / LIMIT * WINDOW_S


def start_workers(
    url: str, prefix: str, fakes: ProviderFakes, count: int, concurrency: int
) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "GROQ_API_KEY": "gsk_bench_key",
        "GROQ_BASE_URL": fakes.groq_base_url,
        "HIVE_LOG_LEVEL": "WARNING",
    }
    args = [HIVE, "worker", "groq", "--nats", url, "--prefix", prefix, "--concurrency", str(concurrency)]
    return [
        subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(count)
    ]


async def one_run(
    server: NatsServer, fakes: ProviderFakes, label: str, workers: int, concurrency: int
) -> Run:
    fakes.groq.reset()
    fakes.groq.limit(LIMIT, WINDOW_S)
    settings = load_settings(environ={}, nats_url=server.url, prefix="b" + secrets.token_hex(6))
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        procs = start_workers(server.url, settings.prefix, fakes, workers, concurrency)
        try:
            with anyio.fail_after(30):
                while len(await hive.workers()) < workers:  # noqa: ASYNC110 - heartbeats live on the server
                    await anyio.sleep(0.1)
            requests = [TaskRequest(provider="groq", prompt=f"post {i} about autumn") for i in range(TASKS)]
            t0 = time.perf_counter()
            ids = await hive.submit_many(requests)
            outputs: dict[str, str] = {}
            with anyio.fail_after(TASKS / LIMIT * WINDOW_S * 4 + 30):
                async for view in hive.results(ids):
                    outputs[view.id] = view.output
            seconds = time.perf_counter() - t0
            completed = sum(outputs[t] == f"reply: {r.prompt}" for t, r in zip(ids, requests, strict=True))
            duplicates = await count_duplicate_completions(hive, "groq")
        finally:
            stop(procs)
    return Run(label, seconds, fakes.groq.rate_limited, fakes.groq.requests, completed, duplicates)


async def count_duplicate_completions(hive: Hive, provider: str = "*") -> int:
    """Completed events recorded more than once for a task (the record must hold one each)."""
    names = hive.bus.names
    sub = await hive.bus.js.subscribe(f"{names.prefix}.events.{provider}.*.completed", ordered_consumer=True)
    seen: dict[str, int] = {}
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                break
            if b'"completed.v1"' in msg.data:
                event = msgspec.json.decode(msg.data, type=Completed)
                seen[event.task_id] = seen.get(event.task_id, 0) + 1
    finally:
        await sub.unsubscribe()
    return sum(n - 1 for n in seen.values() if n > 1)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """End the processes this script started, by their pid: SIGTERM (they drain), then SIGKILL."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


async def main() -> None:
    store = Path(tempfile.mkdtemp(prefix="hive-bench-"))
    server = NatsServer(store)
    server.start()
    try:
        with ProviderFakes() as fakes:
            one = await one_run(server, fakes, "1 worker x 4", workers=1, concurrency=4)
            four = await one_run(server, fakes, "4 workers x 1", workers=4, concurrency=1)
    finally:
        server.stop()
    print(
        f"\n{TASKS} tasks, fake limit {LIMIT} requests per {WINDOW_S:g}s window (ideal {one.ideal_s:.1f}s)\n"
    )
    print(
        f"{'run':<16}{'time s':>9}{'x ideal':>9}{'429s':>7}{'calls':>7}{'completed':>11}{'lost':>6}{'dup':>5}"
    )
    for run in (one, four):
        lost = TASKS - run.completed
        print(
            f"{run.label:<16}{run.seconds:>9.1f}{run.seconds / run.ideal_s:>9.2f}{run.rate_limited:>7}"
            f"{run.calls:>7}{run.completed:>11}{lost:>6}{run.duplicates:>5}"
        )
    print()
    for run in (one, four):
        ratio = run.seconds / run.ideal_s
        print(f"{verdict(ratio <= 1.2)}  {run.label}: completion {ratio:.2f}x the ideal (target <= 1.2x)")
        ok = run.completed == TASKS and run.duplicates == 0
        print(f"{verdict(ok)}  {run.label}: nothing lost, none recorded twice")
    print(
        f"{verdict(four.rate_limited <= one.rate_limited)}  4 workers cost {four.rate_limited} 429s, 1 worker {one.rate_limited} (target: no more)"
    )


if __name__ == "__main__":
    anyio.run(main)
