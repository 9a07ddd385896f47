"""Time to first token through the bus: a streamed echo reply against the same reply unstreamed.

Run: ``.venv/bin/python bench/streaming.py``. It starts its own nats-server on a free port of 127.0.0.1
with a temporary store and one ``hive worker echo`` process, and ends both by pid.

Each round submits the same 48-word prompt twice, alternating which goes first: once with
``Hive.stream`` (the worker forwards each word over core NATS as echo produces it) and once with
``Hive.submit`` + ``Hive.wait`` (the whole reply in the completed event). Two paces: ``chunk_delay_s``
0 (the bus alone: what streaming costs or saves when the model is instant) and 20 ms per word (a model
at 50 tokens/s; echo's unstreamed reply takes the same 0.96 s in all). Time to first token is from
the submit call to the first text the client holds; the last token, to the whole reply.

It always exits 0 (it is a measurement).
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from hive_bus import Hive, StreamEnded, StreamText, TaskRequest, connect, load_settings
from hive_bus._embedded import NatsServer

ROUNDS = {0.0: 200, 0.02: 30}  # per chunk_delay_s
PROMPT = " ".join(f"palabra{i}" for i in range(48))
BIN, REPO = Path(sys.executable).parent, Path(__file__).resolve().parent.parent


@dataclass
class Timings:
    first_s: list[float] = field(default_factory=list)
    last_s: list[float] = field(default_factory=list)

    def line(self, name: str) -> str:
        def ms(values: list[float], q: float) -> float:
            return sorted(values)[round(q * (len(values) - 1))] * 1e3

        return (
            f"{name:<12} first token p50 {ms(self.first_s, 0.5):7.1f} ms  p95 {ms(self.first_s, 0.95):7.1f} ms"
            f"   whole reply p50 {ms(self.last_s, 0.5):7.1f} ms  p95 {ms(self.last_s, 0.95):7.1f} ms"
        )


async def streamed(hive: Hive, request: TaskRequest, into: Timings) -> None:
    t0 = time.perf_counter()
    first = None
    async with hive.stream(request) as stream:
        async for item in stream:
            if isinstance(item, StreamText) and first is None:
                first = time.perf_counter() - t0
            if isinstance(item, StreamEnded):
                assert item.view.output == PROMPT, item.view
    assert first is not None
    into.first_s.append(first)
    into.last_s.append(time.perf_counter() - t0)


async def unstreamed(hive: Hive, request: TaskRequest, into: Timings) -> None:
    t0 = time.perf_counter()
    task_id = (await hive.submit_request(request)).id
    view = await hive.wait(task_id, timeout_s=30)
    assert view.output == PROMPT, view
    elapsed = time.perf_counter() - t0
    into.first_s.append(elapsed)  # the first text the client holds is the whole reply
    into.last_s.append(elapsed)


async def bench(url: str, prefix: str) -> None:
    async with connect(url, prefix=prefix) as hive:
        for chunk_delay_s, rounds in ROUNDS.items():
            request = TaskRequest(provider="echo", prompt=PROMPT, payload={"chunk_delay_s": chunk_delay_s})
            for _warm in range(5):  # connections, consumers, the worker's first fetch
                await unstreamed(hive, request, Timings())
                await streamed(hive, request, Timings())
            s, u = Timings(), Timings()
            for i in range(rounds):
                order = [(streamed, s), (unstreamed, u)]
                for run, into in order if i % 2 else reversed(order):
                    await run(hive, request, into)
            pace = "instant" if not chunk_delay_s else f"{chunk_delay_s * 1e3:g} ms/word"
            print(f"\necho, 48 words, {pace}, {rounds} rounds each, alternating:")
            print(s.line("streamed"))
            print(u.line("unstreamed"))
            print(
                f"first token streamed / unstreamed (p50): {statistics.median(s.first_s) / statistics.median(u.first_s):.2f}"
            )


def main() -> None:
    store = Path(tempfile.mkdtemp(prefix="hive-bench-"))
    server = NatsServer(store / "nats", host="127.0.0.1", port=0)
    server.start()
    prefix = "bench" + secrets.token_hex(4)
    env = {**os.environ, "HIVE_PREFIX": prefix, "HIVE_LOG_LEVEL": "WARNING"}
    worker = None
    try:
        print(f"nats-server {server.url} (pid {server.pid})")
        with open(store / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [str(BIN / "hive"), "worker", "echo", "--nats", server.url], cwd=REPO, env=env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        settings = load_settings(environ={}, nats_url=server.url, prefix=prefix)
        anyio.run(bench, settings.nats_url, prefix, backend="asyncio")
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()  # by its pid
            worker.wait(15)
        server.stop()
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
