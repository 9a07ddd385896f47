"""No silent dead ends (issue 16, point 2): a submission for a provider that no worker serves now, and
none served in the last day, is accepted with a warning naming it and the providers served, or refused
with 400 when the bus is set to (``HIVE_REJECT_UNSERVED``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import nats.js.errors
import pytest

from hive_bus import Hive, PartialSubmit, Settings, Unserved
from hive_bus._embedded import NatsServer
from hive_bus._messages import TaskRequest
from hive_bus.bus import Bus, open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider

from .conftest import make_settings
from .helpers import eventually, hive_cli, running_worker, stream_messages

pytestmark = pytest.mark.anyio

CLI_ENV = {"HIVE_HEARTBEAT_INTERVAL_S": "0.5", "HIVE_HEARTBEAT_TTL_S": "1.5"}
WARNING = "no worker serves provider 'gemnii' now or in the last day; served: echo"


@dataclass
class Stack:
    settings: Settings
    bus: Bus
    http: httpx.AsyncClient


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Stack]:
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0))
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=15) as http:
                yield Stack(settings, bus, http)
            gateway.stop()


async def _recorded(bus: Bus, provider: str) -> bool:
    try:
        await (await bus.js.key_value(bus.names.served_bucket)).get(provider)
    except nats.js.errors.KeyNotFoundError:
        return False
    return True


async def _no_worker(hive: Hive) -> bool:
    return not await hive.workers()


async def test_a_typod_provider_is_accepted_with_a_warning_naming_the_served_ones(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with serving(make_settings(nats_server.url)) as stack:
        async with running_worker(stack.bus, "echo", EchoProvider()):
            await eventually(lambda: _recorded(stack.bus, "echo"), 10, "the gateway to record echo as served")
            typo = await stack.http.post("/v1/tasks", json={"provider": "gemnii", "prompt": "un tuit"})
            assert typo.status_code == 202
            assert typo.json()["warnings"] == [WARNING]
            served = await stack.http.post("/v1/tasks", json={"provider": "echo", "prompt": "un tuit"})
            assert served.status_code == 202 and "warnings" not in served.json()
            batch = await stack.http.post(
                "/v1/tasks/batch",
                json={"tasks": [{"provider": "gemnii", "prompt": "a"}, {"provider": "echo", "prompt": "b"}]},
            )
            assert batch.status_code == 202 and batch.json()["warnings"] == [WARNING]

        # once no worker is left, echo was still served within the day: no word for it, from the
        # gateway, from a client that starts now (it reads the gateway's record), nor from hive submit
        async with open_bus(stack.settings) as bus:
            client = Hive(bus)
            await eventually(lambda: _no_worker(client), 10, "the worker's heartbeat to go")
            later = await stack.http.post("/v1/tasks", json={"provider": "echo", "prompt": "x"})
            assert later.status_code == 202 and "warnings" not in later.json()
            served_lately = await client.submit_request(TaskRequest(provider="echo", prompt="hola"))
            assert served_lately.warnings == ()
            accepted = await client.submit_request(TaskRequest(provider="gemnii", prompt="hola"))
            assert accepted.warnings == (WARNING,)
            await client.close()
        where = ["--nats", stack.settings.nats_url, "--prefix", stack.settings.prefix]
        args = ["submit", "gemnii", "hola", *where]
        done = hive_cli(args, env=CLI_ENV)
        assert done.returncode == 0, done.stderr
        assert len(done.stdout.strip()) == 26 and WARNING in done.stderr, done
        # the warning is part of hive submit's answer: no log level hides it, and a file says it once
        quiet = hive_cli(["--log-level", "ERROR", *args], env=CLI_ENV)
        assert quiet.returncode == 0 and quiet.stderr.count(WARNING) == 1, quiet
        lines = tmp_path / "tasks.jsonl"
        lines.write_text("".join(f'{{"prompt": "p{i}"}}\n' for i in range(3)))
        many = hive_cli(
            ["--log-level", "ERROR", "submit", "gemnii", "--file", str(lines), *where], env=CLI_ENV
        )
        assert many.returncode == 0 and many.stderr.count(WARNING) == 1, many
        assert len(many.stdout.splitlines()) == 3
        # hive chat says it too, at once, rather than waiting out its timeout without a word
        chat = hive_cli(
            ["--log-level", "ERROR", "chat", "gemnii", "hola", "--timeout", "1", *where], env=CLI_ENV
        )
        assert chat.returncode == 1 and chat.stderr.startswith(f"warning: {WARNING}\n"), chat


async def test_the_opt_in_setting_refuses_a_provider_no_worker_serves(nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url, reject_unserved=True)
    async with serving(settings) as stack, running_worker(stack.bus, "echo", EchoProvider()):
        await eventually(lambda: _recorded(stack.bus, "echo"), 10, "the gateway to record echo as served")
        refused = await stack.http.post("/v1/tasks", json={"provider": "gemnii", "prompt": "un tuit"})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "unserved_provider"
        assert refused.json()["error"]["field"] == "provider"
        assert WARNING in refused.json()["error"]["message"]
        batch = await stack.http.post(
            "/v1/tasks/batch",
            json={"tasks": [{"provider": "echo", "prompt": "a"}, {"provider": "gemnii", "prompt": "b"}]},
        )
        assert batch.status_code == 400 and batch.json()["error"]["field"] == "tasks[1].provider"
        schedule = await stack.http.post(
            "/v1/schedules", json={"every": "1h", "task": {"provider": "gemnii", "prompt": "c"}}
        )
        assert schedule.status_code == 400 and schedule.json()["error"]["field"] == "task.provider"
        assert (await stack.http.get("/v1/schedules")).json()["schedules"] == []
        assert await stream_messages(stack.bus, stack.bus.names.tasks_stream) == 0
        ok = await stack.http.post("/v1/tasks", json={"provider": "echo", "prompt": "vale"})
        assert ok.status_code == 202
        # the Python client's many at once: each refused task named, the served ones queued
        client = Hive(stack.bus)
        requests = [
            TaskRequest(provider="gemnii" if i % 40 == 3 else "echo", prompt=f"p{i}") for i in range(80)
        ]
        with pytest.raises(PartialSubmit) as caught:
            await client.submit_many(requests)
        with pytest.raises(Unserved):  # a streamed task too (hive chat, stream=true)
            async with client.stream(TaskRequest(provider="gemnii", prompt="p")):
                pass
        await client.close()
        assert sorted(caught.value.errors) == [3, 43]
        assert all(isinstance(e, Unserved) and WARNING in str(e) for e in caught.value.errors.values())
        assert [i for i, task_id in enumerate(caught.value.ids) if task_id is None] == [3, 43]
        assert await stream_messages(stack.bus, stack.bus.names.tasks_stream) == 1 + 78
