"""The fast path (``services.fastpath``) and the routes (``services.api``) answer every submission alike.

Two gateways on one bus, one with the fast path and one without (``GatewayOptions.fast_path=False``),
get the same requests; their status, ``Content-Type``, ``Retry-After`` and bodies must be the same (task
ids aside, which each submission draws anew).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from hive_bus import Hive, Settings
from hive_bus._embedded import NatsServer
from hive_bus.bus import open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions

from .conftest import make_settings

pytestmark = pytest.mark.anyio

MB = 1024 * 1024
MAX_BODY_BYTES = 4 * MB
JSON = {"content-type": "application/json"}


@dataclass
class Paths:
    fast: httpx.AsyncClient
    route: httpx.AsyncClient

    async def both(self, path: str, body: bytes) -> tuple[httpx.Response, httpx.Response]:
        fast = await self.fast.post(path, content=body, headers=JSON)
        route = await self.route.post(path, content=body, headers=JSON)
        return fast, route


@asynccontextmanager
async def two_paths(settings: Settings, **options: Any) -> AsyncIterator[Paths]:
    async with open_bus(settings) as bus, anyio.create_task_group() as tg:
        hive = Hive(bus)
        gateways = [
            Gateway(hive, GatewayOptions(port=0, fast_path=fast, **options)) for fast in (True, False)
        ]
        for gateway in gateways:
            await tg.start(gateway.serve)
        async with (
            httpx.AsyncClient(base_url=gateways[0].url, timeout=30) as fast,
            httpx.AsyncClient(base_url=gateways[1].url, timeout=30) as route,
        ):
            yield Paths(fast, route)
        for gateway in gateways:
            gateway.stop()


def _ids_hidden(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "<id>" if k == "id" else _ids_hidden(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ids_hidden(v) for v in value]
    return value


def answer(r: httpx.Response) -> tuple[int, str | None, str | None, Any]:
    return r.status_code, r.headers.get("content-type"), r.headers.get("retry-after"), _ids_hidden(r.json())


def task(prompt: str = "hola", **fields: Any) -> dict[str, Any]:
    return {"provider": "echo", "prompt": prompt, **fields}


def encoded(value: Any) -> bytes:
    return json.dumps(value).encode()


DEEP = b"[" * 5000 + b"]" * 5000

SINGLE = [
    ("accepted", encoded(task())),
    ("invalid field", encoded(task(provider="no such provider!"))),
    ("unknown field", encoded(task(urgency=1))),
    ("wrong type", encoded(task(priority=3))),
    ("malformed JSON", b'{"provider": "echo", "prompt": '),
    ("not an object", b"[1, 2]"),
    ("too deep", b'{"provider": "echo", "prompt": "x", "payload": ' + DEEP + b"}"),
    ("body too large", encoded(task("x" * (MAX_BODY_BYTES + 1)))),
    ("task too large for the bus", encoded(task("x" * (3 * MB)))),
]

BATCH = [
    ("accepted", encoded({"tasks": [task("a"), task("b")]})),
    ("empty", encoded({"tasks": []})),
    ("too many", encoded({"tasks": [task(str(i)) for i in range(4)]})),
    ("one task invalid", encoded({"tasks": [task(), task(priority="urgent")]})),
    ("unknown field", encoded({"tasks": [task()], "when": "now"})),
    ("malformed JSON", b'{"tasks": [}'),
    ("too deep", b'{"tasks": [{"provider": "echo", "prompt": "x", "metadata": {"a": ' + DEEP + b"}}]}"),
    ("one task too large for the bus", encoded({"tasks": [task(), task("x" * (3 * MB))]})),
]


CASES = [pytest.param("/v1/tasks", b, id=f"task: {w}") for w, b in SINGLE] + [
    pytest.param("/v1/tasks/batch", b, id=f"batch: {w}") for w, b in BATCH
]


@pytest.mark.parametrize(("path", "body"), CASES)
async def test_both_paths_answer_a_submission_alike(nats_server: NatsServer, path: str, body: bytes) -> None:
    settings = make_settings(nats_server.url, blob_max_bytes=2 * MB)
    async with two_paths(settings, max_body_bytes=MAX_BODY_BYTES, max_batch=3) as paths:
        fast, route = await paths.both(path, body)
    assert answer(fast) == answer(route)
    assert fast.status_code != 500, fast.text


async def test_a_duplicate_is_answered_alike(settings: Settings) -> None:
    async with two_paths(settings) as paths:
        first = await paths.fast.post("/v1/tasks", json=task(idempotency_key="k1"))
        assert first.status_code == 202
        fast, route = await paths.both("/v1/tasks", encoded(task(idempotency_key="k1")))
        assert (fast.json()["id"], route.json()["id"]) == (first.json()["id"], first.json()["id"])
        assert answer(fast) == answer(route)
        assert fast.status_code == 200
        fast, route = await paths.both("/v1/tasks/batch", encoded({"tasks": [task(idempotency_key="k1")]}))
        assert answer(fast) == answer(route)
        assert fast.json()["tasks"][0] == {"index": 0, "id": first.json()["id"], "status": "duplicate"}


async def test_a_full_queue_is_answered_alike(nats_server: NatsServer) -> None:
    async with two_paths(make_settings(nats_server.url, tasks_max_msgs=1)) as paths:
        assert (await paths.fast.post("/v1/tasks", json=task())).status_code == 202
        fast, route = await paths.both("/v1/tasks", encoded(task("more")))
        assert answer(fast) == answer(route)
        assert (fast.status_code, fast.json()["error"]["code"]) == (503, "queue_full")
        fast, route = await paths.both("/v1/tasks/batch", encoded({"tasks": [task("b1"), task("b2")]}))
        assert answer(fast) == answer(route)
        assert (fast.status_code, fast.headers["retry-after"]) == (503, "5")


@pytest.mark.slow
async def test_a_bus_that_does_not_answer_is_answered_alike(own_server: NatsServer) -> None:
    async with two_paths(make_settings(own_server.url, request_timeout_s=1.0)) as paths:
        own_server.stop()
        try:
            fast, route = await paths.both("/v1/tasks", encoded(task()))
            assert answer(fast) == answer(route)
            assert (fast.status_code, fast.json()["error"]["code"]) == (503, "bus_unavailable")
        finally:
            own_server.start()
