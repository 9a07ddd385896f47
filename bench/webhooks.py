"""What webhooks cost a gateway, beside the same tasks without them, in one run.

Run: ``.venv/bin/python bench/webhooks.py [--tasks N]``. It starts its own nats-server (temporary store,
free port), a gateway, an echo worker and a webhook receiver (a threaded HTTP server on loopback) in
this process, and prints:

- baseline: N echo tasks submitted with ``Hive.submit_many`` to a gateway without webhooks, the time
  until all are completed (tasks/s);
- webhooks: N more, each with its own webhook, to a gateway that delivers them: the time until all are
  completed (does announcing them slow the tasks?) and until the receiver has every one (deliveries/s).

It always exits 0: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import base64
import secrets
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
    server_url: str, tasks: int, webhooks: WebhookSettings, hook_url: str | None, received: Received
) -> tuple[float, float]:
    """Seconds until every task completed, and until every webhook was delivered (0 without)."""
    settings = load_settings({}, nats_url=server_url, prefix="b" + secrets.token_hex(4))
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        gateway = Gateway(hive, GatewayOptions(port=0, webhooks=webhooks))
        worker = Worker(bus, EchoProvider(), WorkerOptions(provider="echo", concurrency=64))
        spec = WebhookSpec(url=hook_url) if hook_url else None
        requests = [TaskRequest(provider="echo", prompt=f"t{i}", webhook=spec) for i in range(tasks)]
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
                while received.count < tasks:  # noqa: ASYNC110 - a thread counts; no event to wait on
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
    with tempfile.TemporaryDirectory() as store:
        server = NatsServer(Path(store))
        server.start()
        try:
            base_s, _ = anyio.run(run, server.url, args.tasks, WebhookSettings(), None, received)
            done_s, delivered_s = anyio.run(run, server.url, args.tasks, webhooks, hook_url, received)
        finally:
            server.stop()
            hook.shutdown()
    n = args.tasks
    print(f"baseline, no webhooks: {n} tasks completed in {base_s:.2f} s ({n / base_s:,.0f} tasks/s)")
    print(f"with a webhook each:   {n} tasks completed in {done_s:.2f} s ({n / done_s:,.0f} tasks/s)")
    print(
        f"                       {received.count} deliveries made, the last {delivered_s:.2f} s after the "
        f"first submission ({n / delivered_s:,.0f} deliveries/s)"
    )


if __name__ == "__main__":
    main()
