"""A batch through OpenAI's Batch API against the same tasks through ``POST /v1/tasks/batch``, and the
gateway's memory while it validates and finalizes a large input file, in one run.

Run: ``.venv/bin/python bench/batches.py [--lines 10000] [--large-mb 100]``. It starts its own
nats-server on a free port of 127.0.0.1 with a temporary store, a ``hive gateway`` process and a
``hive worker echo`` process; it ends every process it started by pid.

1. ``batch``: ``--lines`` chat completion lines for echo uploaded (``files.create``), then the time from
   ``batches.create`` to ``completed`` (``batches.retrieve`` every 0.1 s; the output file written);
2. ``tasks``: the same prompts as tasks through ``POST /v1/tasks/batch`` (500 a request, 4 requests in
   flight), then the time until every task has ended (``Hive.results``, the client's follow of final
   events); both in turn, the ratio taken within a round, the median of the rounds the figure.
   Target: the batch within 20 % of the tasks (<= 1.2x).
3. ``memory``: an input file of about ``--large-mb`` MB (lines of ~2 KB, at most 50,000 as OpenAI's
   limit), run as a batch; the gateway's resident memory sampled (``/proc/<pid>/status``, every 50 ms)
   while the batch is ``validating`` and ``finalizing``, and its peak (``VmHWM``) over the whole run.
   Target: under 150 MB.

It always exits 0 (it is a measurement) and prints FAIL beside a missed target.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import httpx
import openai
from chat import wait_ready  # beside this script
from gateway import spawn
from throughput import cleaned_up, free_port, verdict

from hive_bus import Settings
from hive_bus._client import connect
from hive_bus._embedded import NatsServer

BIN = Path(sys.executable).parent
PROMPT = "Un tuit sobre el lanzamiento, con dos hashtags"
PREFIX = "benchbatch"


def batch_lines(n: int, pad: str = "") -> bytes:
    out = io.BytesIO()
    for i in range(n):
        body = {"model": "echo", "messages": [{"role": "user", "content": f"{PROMPT} {i} {pad}"}]}
        line = {"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        out.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
    return out.getvalue()


def run_batch(client: openai.OpenAI, data: bytes, sample: RssSampler | None = None) -> tuple[float, str]:
    """Seconds from batches.create to completed, and the batch id."""
    uploaded = client.files.create(file=("bench.jsonl", data), purpose="batch")
    started = time.perf_counter()
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
        if sample is not None:
            sample.phase = batch.status
    elapsed = time.perf_counter() - started
    if batch.status != "completed" or batch.request_counts is None or batch.request_counts.failed:
        raise RuntimeError(f"batch {batch.id} ended {batch.status}: {batch.model_dump_json()}")
    client.files.delete(uploaded.id)
    return elapsed, batch.id


def run_tasks(url: str, settings: Settings, n: int) -> float:
    async def main() -> float:
        async with connect(settings=settings) as hive, httpx.AsyncClient(base_url=url, timeout=60) as http:
            started = time.perf_counter()
            ids: list[str] = []
            chunks = [list(range(s, min(s + 500, n))) for s in range(0, n, 500)]
            limit = anyio.Semaphore(4)

            async def post(part: list[int]) -> None:
                async with limit:
                    body = {"tasks": [{"provider": "echo", "prompt": f"{PROMPT} {i}"} for i in part]}
                    r = await http.post("/v1/tasks/batch", json=body)
                    r.raise_for_status()
                    ids.extend(t["id"] for t in r.json()["tasks"])

            async with anyio.create_task_group() as tg:
                for part in chunks:
                    tg.start_soon(post, part)
            async for view in hive.results(ids):
                if view.status != "completed":
                    raise RuntimeError(f"task {view.id} ended {view.status}")
            return time.perf_counter() - started

    return anyio.run(main)


class RssSampler:
    """The gateway's resident memory, sampled every 50 ms on a thread, the peak kept per batch status."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.phase = "-"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def field_mb(self, name: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rss = self.field_mb("VmRSS")
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description="a batch against the same tasks through /v1/tasks/batch")
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large-mb", type=int, default=100)
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp(prefix="hive-bench-batch-"))
    server = NatsServer(store / "nats", host="127.0.0.1", port=0)
    procs: list[subprocess.Popen[bytes]] = []
    server.start()
    with cleaned_up(server, store, procs):
        port = free_port()
        env = {**os.environ, "HIVE_LOG_LEVEL": "WARNING", "HIVE_NATS_URL": server.url, "HIVE_PREFIX": PREFIX}
        env["HIVE_FILES_MAX_BYTES"] = str(4 * 1024**3)
        settings = Settings(nats_url=server.url, prefix=PREFIX, files_max_bytes=4 * 1024**3)
        procs.append(
            spawn([str(BIN / "hive"), "worker", "echo", "--concurrency", "64"], store / "worker.log", env)
        )
        gateway = spawn([str(BIN / "hive"), "gateway", "--port", str(port)], store / "gateway.log", env)
        procs.append(gateway)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, gateway)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        data = batch_lines(args.lines)
        run_batch(client, batch_lines(500))  # warm up both paths
        run_tasks(url, settings, 500)
        ratios = []
        for r in range(args.rounds):
            if r % 2 == 0:
                batch_s, _ = run_batch(client, data)
                tasks_s = run_tasks(url, settings, args.lines)
            else:
                tasks_s = run_tasks(url, settings, args.lines)
                batch_s, _ = run_batch(client, data)
            ratios.append(batch_s / tasks_s)
            print(
                f"round {r + 1}: batch {batch_s:.1f} s ({args.lines / batch_s:,.0f} lines/s), "
                f"tasks/batch {tasks_s:.1f} s ({args.lines / tasks_s:,.0f} tasks/s), ratio {ratios[-1]:.2f}x"
            )
        ratio = statistics.median(ratios)
        print(f"\n{args.lines} lines, median of {args.rounds} rounds:")
        print(
            f"  batch / tasks through /v1/tasks/batch, time: {ratio:.2f}x  (target <= 1.20x) {verdict(ratio <= 1.2)}"
        )

        line_bytes = 2048
        count = min(50_000, args.large_mb * 1024 * 1024 // line_bytes)
        large = batch_lines(count, pad="x" * (line_bytes - 180))
        print(f"\nlarge input: {count:,} lines, {len(large) / 1024**2:.0f} MB")
        with RssSampler(gateway.pid) as sampler:
            base = sampler.field_mb("VmRSS")
            large_s, _ = run_batch(client, large, sampler)
            hwm = sampler.field_mb("VmHWM")
        del large
        peaks = ", ".join(f"{phase} {mb:.0f} MB" for phase, mb in sampler.peaks.items())
        print(f"  gateway RSS before {base:.0f} MB; peak by status: {peaks}; {large_s:.0f} s end to end")
        worst = max(sampler.peaks.get("validating", 0), sampler.peaks.get("finalizing", 0))
        print(f"  peak while validating/finalizing: {worst:.0f} MB  (target < 150 MB) {verdict(worst < 150)}")
        print(f"  peak over the whole run (VmHWM, uploads and the earlier rounds too): {hwm:.0f} MB")


if __name__ == "__main__":
    main()
