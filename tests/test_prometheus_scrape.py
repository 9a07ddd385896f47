"""A real Prometheus, with the shipped prometheus.yml and alerts.yml, scrapes a running gateway (its
metrics token read from a file, as compose gives it) while workers complete, retry and fail tasks:
every query of the Grafana dashboard then answers with numbers."""

from __future__ import annotations

import math
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from hive_bus import FunctionProvider, Hive
from hive_bus._embedded import NatsServer
from hive_bus.bus import open_bus
from hive_bus.services.auth import Tokens
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider

from . import handlers
from .conftest import make_settings
from .deploy import PROMETHEUS, dashboard_queries, needs_prometheus, prometheus_config
from .handlers import WindowLimit
from .helpers import eventually, free_port, running_worker

pytestmark = [pytest.mark.anyio, needs_prometheus]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "metrics-token"
    path.write_text(secrets.token_hex(16) + "\n")
    return path


class Prometheus:
    """A prometheus process on a free loopback port with a store of its own, ended by its pid."""

    def __init__(self, workdir: Path, token_file: Path) -> None:
        self.workdir = workdir
        self.token_file = token_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, gateway: str) -> None:
        assert PROMETHEUS is not None
        config = prometheus_config(
            self.workdir / "prometheus", token_file=self.token_file, gateway=gateway, interval="500ms"
        )
        port = free_port()
        args = [
            PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
        ]  # fmt: skip
        with open(self.workdir / "prometheus.log", "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"

    def check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            lines = (self.workdir / "prometheus.log").read_text(errors="replace").splitlines()
            raise AssertionError(f"prometheus exited: {lines[-1] if lines else 'no log'}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def prometheus(tmp_path: Path, token_file: Path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path, token_file)
    yield server
    server.stop()


async def query(http: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    answer = await http.get("/api/v1/query", params={"query": expr})
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def has_numbers(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


async def test_prometheus_scraping_the_gateway_answers_every_dashboard_query(
    nats_server: NatsServer, token_file: Path, prometheus: Prometheus
) -> None:
    settings = make_settings(nats_server.url)
    api_token = secrets.token_hex(16)
    tokens = Tokens.from_env({"HIVE_GATEWAY_TOKENS": api_token, "HIVE_METRICS_TOKEN_FILE": str(token_file)})
    limited = WindowLimit(limit=1, window_s=0.3)  # a provider that answers 429 past one call per window
    async with open_bus(settings) as bus, anyio.create_task_group() as tg:
        hive = Hive(bus)
        gateway = Gateway(hive, GatewayOptions(host="127.0.0.1", port=0, tokens=tokens))
        await tg.start(gateway.serve)
        prometheus.start(f"127.0.0.1:{gateway.port}")
        async with (
            httpx.AsyncClient(base_url=prometheus.url, timeout=5) as http,
            running_worker(bus, "echo", EchoProvider()),
            running_worker(bus, "limited", FunctionProvider(limited)),
            running_worker(bus, "refuse", FunctionProvider(handlers.refuse)),
        ):

            async def scraped() -> bool:
                prometheus.check_running()
                try:
                    answer = await http.get("/api/v1/query", params={"query": 'up{job="hive-gateway"}'})
                except httpx.TransportError:
                    return False  # not listening yet
                if answer.status_code != 200:
                    return False  # starting: "Service Unavailable" until its storage is ready
                up = await query(http, 'up{job="hive-gateway"}')
                return bool(up) and up[0]["value"][1] == "1"

            await eventually(scraped, 30, "prometheus to scrape the gateway with the token from the file")
            # work while Prometheus watches: completions, 429s and retries, failures
            ids = [await hive.submit("echo", f"tuit {n} sobre café") for n in range(6)]
            ids += [await hive.submit("limited", f"guion {n}") for n in range(3)]
            ids += [await hive.submit("refuse", "no")]
            for task_id in ids:
                await hive.wait(task_id, timeout_s=30)
            assert limited.rate_limited > 0

            queries = dashboard_queries()
            missing = dict(queries)

            async def all_answer() -> bool:
                for where, expr in list(missing.items()):
                    if has_numbers(await query(http, expr)):
                        del missing[where]
                return not missing

            await eventually(all_answer, 30, f"every dashboard query to answer; still empty: {missing}")
            providers = (
                await http.get("/api/v1/label/provider/values", params={"match[]": "hive_queue_pending"})
            ).json()
            assert {"echo", "limited", "refuse"} <= set(
                providers["data"]
            )  # the dashboard's provider variable
            rules = (await http.get("/api/v1/rules")).json()["data"]["groups"]
            assert {r["name"] for g in rules for r in g["rules"]} >= {
                "HiveNoWorkerOnline",
                "HiveStreamLostData",
            }
        gateway.stop()
