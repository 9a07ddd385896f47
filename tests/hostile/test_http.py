"""Hostile and careless HTTP clients against the gateway (issue 12, points 2, 6, 8 and part of 10): none
of them takes the hub down, slows it for others, or reaches the bus with what it should not."""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

from hive_bus import Bus, Hive, Settings, open_bus
from services.auth import AuthConfigError, Tokens
from services.gateway import Gateway, GatewayOptions
from tests.helpers import wait_until
from tests.test_cli import Up, hive_up

pytestmark = pytest.mark.anyio


# point 2: the embedded nats-server lives as long as hive, not as long as a thread ------------------


def _nats_child(up: Up) -> psutil.Process:
    children = [p for p in psutil.Process(up.proc.pid).children() if p.name() == "nats-server"]
    assert len(children) == 1, children
    return children[0]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Up]:
    up = hive_up(tmp_path / "data", tmp_path / "up.log")
    yield up
    if up.proc.poll() is None:
        try:
            up.stop()
        except subprocess.TimeoutExpired:
            up.proc.kill()
            up.proc.wait()


@pytest.mark.slow
async def test_the_embedded_server_outlives_the_gateways_worker_threads(stack: Up) -> None:
    nats = _nats_child(stack)
    async with httpx.AsyncClient(base_url=stack.gateway, timeout=10) as http:
        # Static files are read in anyio worker threads: three at once make the pool grow, and a
        # thread idle for more than 10 s is retired at the next call.
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(http.get, "/dashboard/app.js")
        await anyio.sleep(11)
        assert (await http.get("/dashboard/app.js")).status_code == 200
        await anyio.sleep(1)
        assert nats.is_running() and nats.status() != psutil.STATUS_ZOMBIE, "nats-server died"
        r = await http.post("/v1/tasks", json={"provider": "echo", "prompt": "still here?"})
        assert r.status_code == 202, r.text
        done = await http.get(f"/v1/tasks/{r.json()['id']}", params={"wait": 10})
        assert done.json()["status"] == "completed", done.text


def test_the_embedded_server_dies_with_a_killed_hive(stack: Up) -> None:
    nats = _nats_child(stack)
    stack.proc.send_signal(signal.SIGKILL)
    stack.proc.wait(10)
    wait_until(lambda: not nats.is_running() or nats.status() == psutil.STATUS_ZOMBIE, 10, "nats to end")


# the gateway in this process, over real HTTP -------------------------------------------------------

TOKEN = "tok-0123456789abcdef-hostile"
METRICS_TOKEN = "metrics-0123456789abcdef"
NO_TASK = "01JAAAAAAAAAAAAAAAAAAAAAAA"


@dataclass
class Served:
    bus: Bus
    url: str
    port: int


@asynccontextmanager
async def serving(settings: Settings, **options: Any) -> AsyncIterator[Served]:
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0, **options))
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            yield Served(bus, gateway.url, gateway.port)
            gateway.stop()


async def _queued(bus: Bus) -> int:
    return (await bus.js.stream_info(bus.names.tasks_stream)).state.messages


# point 10: no route found without a token; the metrics token; ids checked at the edge ------------


async def test_unknown_routes_answer_401_before_404_or_405(settings: Settings) -> None:
    async with serving(settings, tokens=Tokens(api=frozenset({TOKEN}))) as gw, httpx.AsyncClient() as http:
        for method, path in [
            ("GET", "/nope"),
            ("GET", "/v1/nope"),
            ("PUT", "/v1/tasks"),
            ("DELETE", "/v1/stats"),
        ]:
            r = await http.request(method, gw.url + path)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["error"]["code"] == "unauthorized"
        r = await http.get(gw.url + "/nope", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 404


async def test_a_metrics_token_set_alone_guards_the_metrics(settings: Settings) -> None:
    with pytest.raises(AuthConfigError, match=r"metrics token .* shorter than 16 characters"):
        Tokens.from_env({"HIVE_METRICS_TOKEN": "short"})
    tokens = Tokens.from_env({"HIVE_METRICS_TOKEN": METRICS_TOKEN})
    assert not tokens.enabled  # the API stays tokenless (so loopback only)
    async with serving(settings, tokens=tokens) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        assert (await http.get("/metrics")).status_code == 401
        r = await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert r.status_code == 200 and METRICS_TOKEN not in r.text
        assert (await http.get("/v1/stats")).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/v1/dlq/{NO_TASK}%0A"),
        ("GET", "/v1/dlq/undecodable-1%0A"),
        ("DELETE", f"/v1/dlq/{NO_TASK}%0A"),
        ("POST", f"/v1/dlq/{NO_TASK}%0A/replay"),
        ("GET", f"/v1/tasks/{NO_TASK}%0A"),
        ("GET", f"/v1/tasks/{NO_TASK}%0A/events"),
        ("GET", f"/v1/tasks/{NO_TASK}%0D%0APUB%20x%201%0D%0Ay"),
    ],
)
async def test_an_id_in_a_path_is_checked_before_the_bus_or_a_log_line(
    settings: Settings, method: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hive_bus")
    async with serving(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        r = await http.request(method, path)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["field"] == "task_id" and "is not a task id" in error["message"]
    assert not [rec for rec in caplog.records if "\n" in rec.getMessage()]


# point 6: a tokenless gateway is not a web page's to use -----------------------------------------


async def test_a_tokenless_gateway_serves_loopback_names_only(settings: Settings) -> None:
    async with serving(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        for host in (
            f"127.0.0.1:{gw.port}",
            f"localhost:{gw.port}",
            f"[::1]:{gw.port}",
            "LOCALHOST",
            "127.0.0.2",
        ):
            assert (await http.get("/v1/stats", headers={"Host": host})).status_code == 200, host
        for host in (
            f"evil.example:{gw.port}",
            "evil.example",
            "localhost.evil.example",
            "[::2]:80",
            "0.0.0.0",
        ):
            r = await http.post("/v1/tasks", json={"provider": "echo", "prompt": "x"}, headers={"Host": host})
            assert r.status_code == 421, host
            assert "loopback" in r.json()["error"]["message"]
        assert await _queued(gw.bus) == 0
    tokens = Tokens(api=frozenset({TOKEN}))
    async with serving(settings, tokens=tokens) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        headers = {"Host": "hub.example:443", "Authorization": f"Bearer {TOKEN}"}
        assert (await http.get("/v1/stats", headers=headers)).status_code == 200


async def test_json_routes_take_json_bodies_only(settings: Settings) -> None:
    task = b'{"provider": "echo", "prompt": "x"}'
    batch = b'{"tasks": [{"provider": "echo", "prompt": "x"}]}'
    async with serving(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        for path, body in (("/v1/tasks", task), ("/v1/tasks/batch", batch)):
            for content_type in (
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data",
                None,
            ):
                headers = {} if content_type is None else {"Content-Type": content_type}
                r = await http.post(path, content=body, headers=headers)
                assert r.status_code == 415, (path, content_type)
                assert "Content-Type: application/json" in r.json()["error"]["message"]
        assert await _queued(gw.bus) == 0
        for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
            r = await http.post("/v1/tasks", content=task, headers={"Content-Type": content_type})
            assert r.status_code == 202, content_type


async def test_a_page_of_another_origin_cannot_act_on_a_tokenless_gateway(settings: Settings) -> None:
    async with serving(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        for origin in ("http://evil.example", "null", f"http://localhost:{gw.port + 1}"):
            r = await http.post(f"/v1/dlq/{NO_TASK}/replay", headers={"Origin": origin})
            assert r.status_code == 403, origin
            assert r.json()["error"]["code"] == "cross_origin"
        # the dashboard, served by the gateway itself, is of the same origin
        r = await http.post(f"/v1/dlq/{NO_TASK}/replay", headers={"Origin": gw.url})
        assert r.status_code == 404
