"""A bus at the limits of its JetStream account says so, and accepts nothing it could not run: a
server whose account has little file storage (as nats/accounts.conf caps the hub's), over real HTTP."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import nats.js.errors
import pytest

from hive_bus import Hive, Settings
from hive_bus._embedded import NatsServer
from hive_bus.bus import Bus, open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions

from .conftest import make_settings
from .helpers import eventually, hive_cli

pytestmark = pytest.mark.anyio

MIB = 1024**2
# An account of the shipped kind (file storage capped), small enough that a few providers fill it.
ACCOUNT = """
accounts {
  HIVE {
    jetstream { max_file: %dMB, max_mem: 64MB, max_streams: 64, max_consumers: 1000 }
    users: [ { user: gateway, password: pw } ]
  }
}
"""


@pytest.fixture
def small_account(tmp_path: Path) -> Iterator[NatsServer]:
    config = tmp_path / "account.conf"
    config.write_text(ACCOUNT % 200)
    server = NatsServer(tmp_path / "store", config=config)
    server.start()
    yield server
    server.stop()


@dataclass
class Stack:
    bus: Bus
    http: httpx.AsyncClient


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Stack]:
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0))
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=15) as http:
                yield Stack(bus, http)
            gateway.stop()


def _settings(server: NatsServer) -> Settings:
    # each provider reserves 16 MiB (its events 12, its dead letters 4)
    return make_settings(
        server.url, nats_user="gateway", nats_password="pw", events_max_bytes=12 * MIB, dlq_max_bytes=4 * MIB
    )


async def _tasks_of(bus: Bus, provider: str) -> int:
    info = await bus.js.stream_info(
        bus.names.tasks_stream, subjects_filter=bus.names.task_filter(provider, "*")
    )
    return sum((info.state.subjects or {}).values())


async def test_a_provider_the_account_has_no_room_for_is_refused_and_nothing_stored(
    small_account: NatsServer,
) -> None:
    settings = _settings(small_account)
    async with serving(settings) as stack:
        answers: list[httpx.Response] = []
        for i in range(20):  # far more than 200 MB holds at 16 MiB a provider
            r = await stack.http.post("/v1/tasks", json={"provider": f"p{i}", "prompt": "hi"})
            answers.append(r)
            if r.status_code != 202:
                break
        refused = answers[-1]
        full = f"p{len(answers) - 1}"
        assert len(answers) > 1, "the account should hold the bus and some providers"
        assert refused.status_code == 507, refused.text
        error = refused.json()["error"]
        assert error["code"] == "storage_reserved"
        message = error["message"]
        assert f"no room for stream {settings.names.events_stream_of(full)}" in message
        assert "max_file of the account" in message and "accounts.conf" in message
        assert "max_file_store of the server with it" in message  # raised alone, a reload keeps the old
        assert "HIVE_EVENTS_MAX_BYTES + HIVE_DLQ_MAX_BYTES + HIVE_BLOBS_MAX_BYTES" in message  # all three
        assert await _tasks_of(stack.bus, full) == 0  # nothing stored that no worker could ever run

        # a batch: that provider's task refused with the same words, another provider's accepted
        r = await stack.http.post(
            "/v1/tasks/batch",
            json={"tasks": [{"provider": "p0", "prompt": "a"}, {"provider": full, "prompt": "b"}]},
        )
        items = r.json()["tasks"]
        assert "id" in items[0] and items[0].get("error") is None
        assert "no room for stream" in items[1]["error"]
        assert await _tasks_of(stack.bus, full) == 0

        # its worker exits with one line that says what to raise, no traceback
        env = {
            "HIVE_NATS_URL": small_account.url,
            "HIVE_PREFIX": settings.prefix,
            "HIVE_NATS_USER": "gateway",
            "HIVE_NATS_PASSWORD": "pw",
            "HIVE_EVENTS_MAX_BYTES": str(12 * MIB),
            "HIVE_DLQ_MAX_BYTES": str(4 * MIB),
            "HIVE_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
            "HIVE_HEARTBEAT_TTL_S": str(settings.heartbeat_ttl_s),
        }
        done = await anyio.to_thread.run_sync(
            lambda: hive_cli(["worker", full, "--handler", "tests.handlers:actions"], env=env)
        )
        assert done.returncode == 1
        assert "no room for stream" in done.stderr and "max_file of the account" in done.stderr, done.stderr[
            -3000:
        ]
        assert "Traceback" not in done.stderr


def _sample(text: str, name: str, labels: str = "") -> float | None:
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} "):
            return float(line.split()[-1])
    return None


async def test_readyz_and_the_metrics_say_when_the_tasks_stream_is_full(nats_server: NatsServer) -> None:
    # A full tasks stream made every submission a 503 queue_full while /readyz answered ready and no
    # metric showed how full any stream was.
    settings = make_settings(nats_server.url, tasks_max_msgs=2)
    async with serving(settings) as stack:
        assert (await stack.http.get("/readyz")).json() == {"status": "ready"}
        stream = settings.names.tasks_stream
        for i in range(3):
            await stack.http.post("/v1/tasks", json={"provider": "nobody", "prompt": f"p{i}"})

        async def not_ready() -> httpx.Response | None:
            r = await stack.http.get("/readyz")
            return r if r.status_code == 503 else None

        r = await eventually(not_ready, 15, "/readyz to say not ready")
        reason = r.json()["reason"]
        assert reason.startswith(f"the tasks stream {stream} is full (2 tasks, its max_msgs")
        assert "submissions answer 503 queue_full" in reason
        text = (await stack.http.get("/metrics")).text
        assert _sample(text, "hive_stream_fill_ratio", f'{{stream="{stream}"}}') == 1.0
        assert _sample(text, "hive_bus_writable") == 0.0
        assert (await stack.http.get("/healthz")).status_code == 200  # the process itself is fine

        await stack.bus.js.purge_stream(stream)  # room again: ready again at the next look

        async def ready() -> bool:
            return (await stack.http.get("/readyz")).status_code == 200

        await eventually(ready, 15, "/readyz to say ready again")
        assert _sample((await stack.http.get("/metrics")).text, "hive_bus_writable") == 1.0


async def test_readyz_says_not_ready_when_the_accounts_storage_is_used_up(small_account: NatsServer) -> None:
    # A stream without max_bytes (an operator's own, in the same account) can use the account's
    # max_file up; JetStream then refuses writes to every stream of it, the bus's too (their reserved
    # room notwithstanding), and /readyz answered ready.
    async with serving(_settings(small_account)) as stack:
        js = stack.bus.js
        await js.add_stream(name="FILLER", subjects=["filler.>"])
        for size in (1_000_000, 8_000, 100, 1):  # to the last few bytes
            with contextlib.suppress(nats.js.errors.APIError):
                while True:
                    await js.publish("filler.x", b"x" * size)

        async def not_ready() -> httpx.Response | None:
            r = await stack.http.get("/readyz")
            return r if r.status_code == 503 else None

        reason = (await eventually(not_ready, 15, "/readyz to say not ready")).json()["reason"]
        assert reason.startswith(
            "the account's JetStream file storage is used up (200 MiB of its max_file 200 MiB"
        )
        r = await stack.http.post("/v1/tasks", json={"provider": "p0", "prompt": "hi"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["message"].startswith("the account's JetStream storage is used up")
