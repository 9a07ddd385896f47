"""Hostile and careless HTTP clients against the gateway (issue 12, points 2, 6, 8 and part of 10): none
of them takes the hub down, slows it for others, or reaches the bus with what it should not."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

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
