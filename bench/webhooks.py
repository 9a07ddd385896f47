"""What webhooks cost a gateway, beside the same tasks without them, in one run.

Run: ``.venv/bin/python bench/webhooks.py [--tasks N]``. It starts its own nats-server (temporary store,
free port), a gateway, an echo worker and a webhook receiver (a threaded HTTP server on loopback) in
this process, and prints:

- baseline: N echo tasks submitted with ``Hive.submit_many`` to a gateway without webhooks, the time
  until all are completed (tasks/s);
- webhooks: N more, each with its own webhook, to a gateway that delivers them: the time until all are
  completed (does announcing them slow the tasks?) and until the receiver has every one (deliveries/s);
- a stalled receiver: N more, one in ten of whose webhooks goes to a receiver that accepts connections
  and never answers (attempts time out after 2 s): the time until the good receiver has all of its own.

It always exits 0: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import secrets
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio

from hive_bus import Hive, TaskRequest, Worker, WorkerOptions, load_settings
from hive_bus._embedded import NatsServer
from hive_bus._messages import WebhookSpec
from hive_bus.bus import open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.services.webhooks import WebhookSettings, load_webhook_settings
from hive_bus.workers.echo import EchoProvider

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Received:
    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()


def receiver(received: Received) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            with received.lock:
                received.count += 1
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    ThreadingHTTPServer.request_queue_size = 128  # its default backlog of 5 drops concurrent connects
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def run(
    server_url: str,
    tasks: int,
    webhooks: WebhookSettings,
    hook_url: str | None,
    received: Received,
    stalled_url: str | None = None,
) -> tuple[float, float]:
    """Seconds until every task completed, and until the receiver had every webhook meant for it (0
    without); with ``stalled_url``, one task in ten has its webhook go there instead."""
    settings = load_settings({}, nats_url=server_url, prefix="b" + secrets.token_hex(4))
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        gateway = Gateway(hive, GatewayOptions(port=0, webhooks=webhooks))
        worker = Worker(bus, EchoProvider(), WorkerOptions(provider="echo", concurrency=64))

        def spec(i: int) -> WebhookSpec | None:
            if stalled_url and i % 10 == 0:
                return WebhookSpec(url=stalled_url)
            return WebhookSpec(url=hook_url) if hook_url else None

        requests = [TaskRequest(provider="echo", prompt=f"t{i}", webhook=spec(i)) for i in range(tasks)]
        expected = received.count + sum(1 for r in requests if r.webhook and r.webhook.url == hook_url)
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            await tg.start(worker.run)
            start = time.perf_counter()
            ids = await hive.submit_many(requests)
            async for _ in hive.results(ids):
                pass
            completed_s = time.perf_counter() - start
            delivered_s = 0.0
            if hook_url:
                while received.count < expected:  # noqa: ASYNC110 - a thread counts; no event to wait on
                    await anyio.sleep(0.05)
                delivered_s = time.perf_counter() - start
            worker.stop()
            gateway.stop()
        await hive.close()
    return completed_s, delivered_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    args = parser.parse_args()
    received = Received()
    hook = receiver(received)
    hook_url = f"http://127.0.0.1:{hook.server_address[1]}/hook"
    webhooks = load_webhook_settings(
        {"HIVE_WEBHOOK_SECRET": SECRET, "HIVE_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8"}
    )
    stalled = socket.create_server(("127.0.0.1", 0), backlog=1024)  # accepts, never answers
    stalled_url = f"http://127.0.0.1:{stalled.getsockname()[1]}/hook"
    slow = dataclasses.replace(webhooks, timeout_s=2.0)
    with tempfile.TemporaryDirectory() as store, stalled:
        server = NatsServer(Path(store))
        server.start()
        try:
            base_s, _ = anyio.run(run, server.url, args.tasks, WebhookSettings(), None, received)
            done_s, delivered_s = anyio.run(run, server.url, args.tasks, webhooks, hook_url, received)
            _, stalled_s = anyio.run(run, server.url, args.tasks, slow, hook_url, received, stalled_url)
        finally:
            server.stop()
            hook.shutdown()
    n = args.tasks
    print(f"baseline, no webhooks: {n} tasks completed in {base_s:.2f} s ({n / base_s:,.0f} tasks/s)")
    print(f"with a webhook each:   {n} tasks completed in {done_s:.2f} s ({n / done_s:,.0f} tasks/s)")
    print(
        f"                       {n} deliveries made, the last {delivered_s:.2f} s after the "
        f"first submission ({n / delivered_s:,.0f} deliveries/s)"
    )
    good = n - len(range(0, n, 10))
    print(
        f"one in ten stalled:    the other {good} delivered, the last {stalled_s:.2f} s after the first "
        f"submission ({good / stalled_s:,.0f} deliveries/s)"
    )


if __name__ == "__main__":
    main()
