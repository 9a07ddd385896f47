"""Budgets and failover: M tasks against a provider fake that allows L requests per window.

Run: ``.venv/bin/python bench/quota.py`` (or ``make bench``). It starts its own nats-server on a free port
of 127.0.0.1 with a temporary store and the provider fakes on another loopback port, runs ``hive worker``
processes (the real SDKs, their retries off) and ends everything it started by pid.

1. Budgets: four ``hive worker groq`` processes with a budget that matches the fake's limit
   (``HIVE_BUDGETS='groq = {rpm = L, window_s = W}'``), M >= 10 L tasks. Targets: 429s <= 2 % of the
   calls the fake saw; completion <= 1.1x the ideal M/L windows; nothing lost, nothing recorded twice.
2. Failover: the groq worker has two keys whose daily quota is gone; every task names gemini as its
   fallback. Targets: every task completes on gemini, with no more than one 429 per groq key.

It always exits 0 (it is a measurement) and prints FAIL beside a missed target.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for the provider fakes, which live with the tests

from rate_limits import count_duplicate_completions, stop, verdict  # noqa: E402  (beside this script)

from hive_bus import Hive, TaskRequest, load_settings  # noqa: E402
from hive_bus._embedded import NatsServer  # noqa: E402
from hive_bus._router import Router  # noqa: E402
from hive_bus.bus import open_bus  # noqa: E402
from tests.fakes import ProviderFakes  # noqa: E402

TASKS, LIMIT, WINDOW_S = 100, 10, 2.0  # M, L, and the fake's window
WORKERS, CONCURRENCY = 4, 2
FAILOVER_TASKS = 40
HIVE = str(Path(sys.executable).with_name("hive"))
KEYS = "one=gsk_bench_key_one_0001,two=gsk_bench_key_two_0002"


def start(
    url: str, prefix: str, provider: str, env: dict[str, str], count: int
) -> list[subprocess.Popen[bytes]]:
    args = [HIVE, "worker", provider, "--nats", url, "--prefix", prefix, "--concurrency", str(CONCURRENCY)]
    full = {**os.environ, "HIVE_LOG_LEVEL": "WARNING", **env}
    return [
        subprocess.Popen(args, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(count)
    ]


async def wait_for_workers(hive: Hive, count: int) -> None:
    with anyio.fail_after(30):
        while len(await hive.workers()) < count:  # noqa: ASYNC110 - heartbeats live on the server
            await anyio.sleep(0.1)


async def finish(
    hive: Hive, requests: list[TaskRequest], timeout_s: float
) -> tuple[float, dict[str, tuple[str, str]]]:
    t0 = time.perf_counter()
    ids = await hive.submit_many(requests)
    done: dict[str, tuple[str, str]] = {}
    with anyio.move_on_after(timeout_s):
        async for view in hive.results(ids):
            done[view.id] = (
                view.provider,
                view.output if view.status == "completed" else f"failed: {view.error}",
            )
    return time.perf_counter() - t0, {i: done.get(i, ("", "lost")) for i in ids}


async def budgets(server: NatsServer, fakes: ProviderFakes) -> bool:
    fakes.groq.reset()
    fakes.groq.limit(LIMIT, WINDOW_S)
    settings = load_settings(environ={}, nats_url=server.url, prefix="q" + secrets.token_hex(6))
    env = {
        "GROQ_API_KEY": "gsk_bench_key_0000",
        "GROQ_BASE_URL": fakes.groq_base_url,
        "HIVE_BUDGETS": f"groq = {{ rpm = {LIMIT}, window_s = {WINDOW_S} }}",
    }
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        procs = start(server.url, settings.prefix, "groq", env, WORKERS)
        try:
            await wait_for_workers(hive, WORKERS)
            requests = [TaskRequest(provider="groq", prompt=f"post {i} about autumn") for i in range(TASKS)]
            seconds, done = await finish(hive, requests, TASKS / LIMIT * WINDOW_S * 3 + 30)
            dup = await count_duplicate_completions(hive)
        finally:
            stop(procs)
    ideal_s = TASKS / LIMIT * WINDOW_S
    right = sum(done[i] == ("groq", f"reply: {r.prompt}") for i, r in zip(done, requests, strict=True))
    calls, limited = fakes.groq.requests, fakes.groq.rate_limited
    print(
        f"\nBudgets: {TASKS} tasks, {WORKERS} workers x {CONCURRENCY}, fake limit {LIMIT} per {WINDOW_S:g}s"
    )
    print(
        f"  time {seconds:.1f}s, ideal {ideal_s:.1f}s ({seconds / ideal_s:.2f}x); calls {calls}, 429s {limited}"
    )
    print(f"  completed {right}, lost {TASKS - right}, recorded twice {dup}")
    checks = [
        (limited <= 0.02 * calls, f"429s are {100 * limited / max(1, calls):.1f}% of calls (target <= 2%)"),
        (seconds / ideal_s <= 1.1, f"completion {seconds / ideal_s:.2f}x the ideal (target <= 1.1x)"),
        (right == TASKS and dup == 0, "nothing lost, none recorded twice"),
    ]
    for ok, text in checks:
        print(f"{verdict(ok)}  {text}")
    return all(ok for ok, _ in checks)


async def failover(server: NatsServer, fakes: ProviderFakes) -> bool:
    fakes.groq.reset()
    fakes.gemini.reset()
    fakes.groq.daily_quota(0)  # the day's quota of both keys is gone
    settings = load_settings(environ={}, nats_url=server.url, prefix="f" + secrets.token_hex(6))
    groq_env = {"GROQ_API_KEYS": KEYS, "GROQ_BASE_URL": fakes.groq_base_url}
    gemini_env = {"GEMINI_API_KEY": "gemini_bench_key_0001", "GOOGLE_GEMINI_BASE_URL": fakes.gemini_base_url}
    async with open_bus(settings) as bus, anyio.create_task_group() as tg:
        hive = Hive(bus)
        await tg.start(Router(bus).run)  # the gateway's part: queues moved tasks on their new provider
        procs = start(server.url, settings.prefix, "groq", groq_env, 1)
        procs += start(server.url, settings.prefix, "gemini", gemini_env, 1)
        try:
            await wait_for_workers(hive, 2)
            requests = [
                TaskRequest(provider="groq", prompt=f"reel {i}", fallback=["gemini"])
                for i in range(FAILOVER_TASKS)
            ]
            seconds, done = await finish(hive, requests, 120)
        finally:
            stop(procs)
            tg.cancel_scope.cancel()
    on_gemini = sum(done[i] == ("gemini", f"reply: {r.prompt}") for i, r in zip(done, requests, strict=True))
    by_key = fakes.groq.rate_limited_by_key
    print(f"\nFailover: {FAILOVER_TASKS} tasks for groq (2 keys, daily quota gone) with gemini as fallback")
    print(
        f"  time {seconds:.1f}s; completed on gemini {on_gemini}; groq 429s by key {sorted(by_key.values())}"
    )
    checks = [
        (on_gemini == FAILOVER_TASKS, f"{on_gemini} of {FAILOVER_TASKS} completed on the fallback"),
        (len(by_key) <= 2 and all(n <= 1 for n in by_key.values()), "no more than one 429 per key"),
    ]
    for ok, text in checks:
        print(f"{verdict(ok)}  {text}")
    return all(ok for ok, _ in checks)


async def main() -> None:
    store = Path(tempfile.mkdtemp(prefix="hive-bench-"))
    server = NatsServer(store)
    server.start()
    try:
        with ProviderFakes() as fakes:
            await budgets(server, fakes)
            await failover(server, fakes)
    finally:
        server.stop()


if __name__ == "__main__":
    anyio.run(main)
