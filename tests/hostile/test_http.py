"""Hostile and careless HTTP clients against the gateway (issue 12, points 2, 6, 8 and part of 10): none
of them takes the hub down, slows it for others, or reaches the bus with what it should not."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import msgspec
import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

from hive_bus import Hive, Settings
from hive_bus._messages import Task, is_task_id, new_task_id
from hive_bus.bus import Bus, open_bus
from hive_bus.services.auth import AuthConfigError, Tokens
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.services.limits import OTHER_FILES, ConnectionLimits
from tests.helpers import REPO, wait_until
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


# point 8: a client that goes away, or takes its time ----------------------------------------------


def _subscriptions(bus: Bus) -> int:
    # every wait, task event stream and feed holds one subscription on the gateway's connection
    return len(bus.nc._subs)


async def _open_and_drop(port: int, request: bytes, count: int) -> None:
    """Send ``count`` requests at once, then close their connections without reading an answer."""
    streams = []
    for _ in range(count):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        await stream.send(request)
        streams.append(stream)
    await anyio.sleep(1)  # the handlers are all waiting now
    for stream in streams:
        await stream.aclose()


async def _p50_s(http: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> float:
    times = []
    for _ in range(20):
        start = anyio.current_time()
        r = await http.request(method, path, **kwargs)
        assert r.status_code < 300, r.text
        times.append(anyio.current_time() - start)
    return sorted(times)[len(times) // 2]


@pytest.mark.slow
async def test_abandoned_waits_streams_and_feeds_end_with_their_connection(settings: Settings) -> None:
    async with serving(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        task_id = (await http.post("/v1/tasks", json={"provider": "nobody", "prompt": "x"})).json()["id"]
        # the gateway's one follower of the events stream for all its waits, made by the first wait, stays
        assert (await http.get(f"/v1/tasks/{task_id}", params={"wait": 0.1})).status_code == 200
        baseline = _subscriptions(gw.bus)
        post_s = await _p50_s(http, "POST", "/v1/tasks", json={"provider": "nobody", "prompt": "y"})
        for path, count in [
            (f"/v1/tasks/{task_id}?wait=300", 400),
            (f"/v1/tasks/{task_id}/events", 50),
            ("/v1/events", 50),
        ]:
            await _open_and_drop(gw.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(), count)
            with anyio.fail_after(5):
                while _subscriptions(gw.bus) > baseline:  # noqa: ASYNC110 - nothing to wait on
                    await anyio.sleep(0.05)
        # nothing left running: submissions and stats answer as fast as before
        post_after_s = await _p50_s(http, "POST", "/v1/tasks", json={"provider": "nobody", "prompt": "z"})
        stats_s = await _p50_s(http, "GET", "/v1/stats")
        figures = f"POST p50 {post_s * 1e3:.1f} ms before, {post_after_s * 1e3:.1f} ms after; stats {stats_s * 1e3:.1f} ms"
        logging.getLogger(__name__).warning(figures)
        assert post_after_s < max(0.1, 3 * post_s)
        assert stats_s < 0.5


async def _closed_within(stream: anyio.abc.SocketStream, timeout_s: float) -> bytes:
    """Everything the gateway sends until it closes the connection (fails if it does not in time)."""
    received = b""
    with anyio.fail_after(timeout_s):
        try:
            while True:
                received += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return received


@pytest.mark.parametrize("http", ["httptools", "h11"])  # the default, and the fallback without httptools
async def test_slow_heads_and_bodies_are_cut_off(settings: Settings, http: str) -> None:
    limits = ConnectionLimits(header_timeout_s=1.0, body_timeout_s=1.0)
    async with serving(settings, limits=limits, http=http) as gw:
        # nothing at all
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as silent:
            assert b" 408 " in await _closed_within(silent, 3)
        # a head one piece at a time, each in time for a per-read timeout, never ending
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as slow_head:
            await slow_head.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            with pytest.raises(anyio.BrokenResourceError):
                for i in range(30):
                    await slow_head.send(b"X-%d: 1\r\n" % i)
                    await anyio.sleep(0.2)
        # a body that does not come
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as slow_body:
            head = b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            await slow_body.send(head + b'Content-Length: 100\r\n\r\n{"provider": ')
            answer = await _closed_within(slow_body, 3)
            assert b" 408 " in answer or answer == b"", answer
        assert await _queued(gw.bus) == 0
        # a whole request, then a next one that stalls: the first is answered, the second cut off
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as kept:
            await kept.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /healthz HTTP/1.1\r\n")
            answer = await _closed_within(kept, 3)
            assert answer.startswith(b"HTTP/1.1 200 ") and b" 408 " in answer


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_connections_beyond_the_cap_are_refused_at_once(settings: Settings, http: str) -> None:
    limits = ConnectionLimits(max_connections=5, header_timeout_s=30)
    async with serving(settings, limits=limits, http=http) as gw:
        held = [await anyio.connect_tcp("127.0.0.1", gw.port) for _ in range(5)]
        await anyio.sleep(0.2)
        async with await anyio.connect_tcp("127.0.0.1", gw.port) as extra:
            assert (await _closed_within(extra, 2)).startswith(b"HTTP/1.1 503 ")
        await held.pop().aclose()
        await anyio.sleep(0.2)
        async with httpx.AsyncClient(base_url=gw.url) as client:
            assert (await client.get("/healthz")).status_code == 200
        for stream in held:
            await stream.aclose()


def test_the_gateway_unit_allows_the_open_files_its_connection_cap_needs() -> None:
    unit = (REPO / "deploy" / "systemd" / "hive-gateway.service").read_text()
    cap = re.search(r"^ExecStart=.* --max-connections (\d+)", unit, re.MULTILINE)
    files = re.search(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert cap is not None and files is not None, "the unit names its cap and its file limit"
    assert int(files.group(1)) >= int(cap.group(1)) + OTHER_FILES


def test_a_task_id_with_a_trailing_newline_is_not_a_task_id_anywhere() -> None:
    good = new_task_id()
    assert is_task_id(good) and not is_task_id(good + "\n")
    task = {"type": "task.v1", "id": good, "provider": "echo", "prompt": "x", "submitted_at_ms": 1}
    assert msgspec.json.decode(msgspec.json.encode(task), type=Task).id == good
    with pytest.raises(msgspec.ValidationError, match=r"\$\.id"):
        msgspec.json.decode(msgspec.json.encode({**task, "id": good + "\n"}), type=Task)
