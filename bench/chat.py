"""Chat completions through the bus against the native way to ask and wait, in one run.

Run: ``.venv/bin/python bench/chat.py``. It starts its own nats-server on a free port of 127.0.0.1 with a
temporary store, a ``hive gateway`` process and a ``hive worker echo`` process; it ends every process it
started by pid.

Each request asks echo for a short reply, 16 requests in flight at once (16 clients), in two ways:

- ``tasks+wait``: ``POST /v1/tasks`` then ``GET /v1/tasks/{id}?wait=30`` (two requests, one task);
- ``chat``: ``POST /v1/chat/completions`` with ``model: "echo"`` (one request that waits for its task).

Both run in turn, several rounds, and each ratio is taken within a round, then the median of the rounds
is the figure (this machine's speed drifts by more than the differences measured). The client is Python
(httpx) and shares the two cores with the gateway, the worker and nats-server: it spends more CPU on the
two requests of ``tasks+wait`` than on the one of ``chat``, which favours ``chat`` a little.

Target: chat completions' requests/s within 15 % of tasks+wait's (>= 0.85x). It always exits 0 (it is a
measurement) and prints FAIL beside a missed target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx
from gateway import spawn  # beside this script
from throughput import cleaned_up, free_port, verdict

from hive_bus._embedded import NatsServer

CLIENTS = 16
BIN, REPO = Path(sys.executable).parent, Path(__file__).resolve().parent.parent
PROMPT = "Un tuit sobre el lanzamiento, con dos hashtags"


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with status {proc.returncode}")
        try:
            models = httpx.get(f"{url}/v1/models", timeout=2)
            if models.status_code == 200 and any(m["id"] == "echo" for m in models.json()["data"]):
                return  # the gateway answers and sees the echo worker's heartbeat
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway and its echo worker were not ready within {timeout_s:g}s")


async def tasks_and_wait(http: httpx.AsyncClient, i: int) -> None:
    r = await http.post("/v1/tasks", json={"provider": "echo", "prompt": f"{PROMPT} {i}"})
    r.raise_for_status()
    done = await http.get(f"/v1/tasks/{r.json()['id']}", params={"wait": 30})
    if done.json()["status"] != "completed":
        raise RuntimeError(f"task {r.json()['id']} did not complete: {done.text}")


async def chat(http: httpx.AsyncClient, i: int) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": f"{PROMPT} {i}"}]}
    r = await http.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"chat completion answered {r.status_code}: {r.text}")


async def run(url: str, how: str, requests: int) -> tuple[float, float]:
    """``requests`` asks by ``how``, 16 at a time: (asks per second, p50 in ms)."""
    ask = chat if how == "chat" else tasks_and_wait
    latencies: list[float] = []
    cursor = iter(range(requests))
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def lane() -> None:
            for i in cursor:
                t0 = time.perf_counter()
                await ask(http, i)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(CLIENTS):
                tg.start_soon(lane)
        elapsed = time.perf_counter() - started
    return requests / elapsed, statistics.median(latencies) * 1000


def bench(url: str, rounds: int, requests: int) -> None:
    anyio.run(run, url, "chat", 200)  # warm up both paths
    anyio.run(run, url, "tasks", 200)
    figures: list[dict[str, tuple[float, float]]] = []
    for r in range(rounds):
        order = ("tasks", "chat") if r % 2 == 0 else ("chat", "tasks")
        figures.append({how: anyio.run(run, url, how, requests) for how in order})
        print(
            f"round {r + 1}: tasks+wait {figures[-1]['tasks'][0]:,.0f}/s p50 {figures[-1]['tasks'][1]:.1f} ms; "
            f"chat {figures[-1]['chat'][0]:,.0f}/s p50 {figures[-1]['chat'][1]:.1f} ms"
        )
    rate = statistics.median(f["chat"][0] / f["tasks"][0] for f in figures)
    p50 = statistics.median(f["chat"][1] / f["tasks"][1] for f in figures)
    print(f"\n{CLIENTS} clients, {requests} asks a run, median of {rounds} rounds:")
    print(
        f"  chat completions / tasks+wait, asks per second: {rate:.2f}x  (target >= 0.85x) {verdict(rate >= 0.85)}"
    )
    print(f"  chat completions / tasks+wait, p50 latency:     {p50:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="chat completions against POST /v1/tasks + ?wait, through echo"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000, help="asks in each measured run")
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp(prefix="hive-bench-chat-"))
    server = NatsServer(store / "nats", host="127.0.0.1", port=0)
    procs: list[subprocess.Popen[bytes]] = []
    server.start()
    with cleaned_up(server, store, procs):
        port = free_port()
        env = {
            **os.environ,
            "HIVE_LOG_LEVEL": "WARNING",
            "HIVE_NATS_URL": server.url,
            "HIVE_PREFIX": "benchchat",
        }
        procs.append(
            spawn([str(BIN / "hive"), "worker", "echo", "--concurrency", "64"], store / "worker.log", env)
        )
        procs.append(spawn([str(BIN / "hive"), "gateway", "--port", str(port)], store / "gateway.log", env))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, procs[-1])
        bench(url, args.rounds, args.requests)


if __name__ == "__main__":
    main()
