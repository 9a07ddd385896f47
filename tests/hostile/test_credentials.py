"""A worker credential used as an attacker would (issue 12, points 3 and 5), on the shipped hub config:
the credential of an echo worker, made by nats/worker-user.sh, against gemini's tasks.

The attacker speaks plain nats-py with exactly the rights its credential has; the hub runs the real
gateway side (client, router) under the gateway user, and gemini's tasks are run by a real worker under
a gemini credential of its own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType

from hive_bus import BusRefused, FunctionProvider, Hive, Settings, Task, Worker, WorkerOptions, load_settings
from hive_bus._bus import BUCKET_MAX_BYTES, VALUE_MAX_BYTES, ensure_consumers, ensure_events
from hive_bus._dlq import NotReplayable
from hive_bus._embedded import NatsServer
from hive_bus._messages import (
    Completed,
    Failed,
    Moved,
    WorkerBeat,
    encoder,
    new_task_id,
    now_ms,
)
from hive_bus._router import Router
from hive_bus.bus import Bus, open_bus
from tests import handlers
from tests.conftest import make_settings
from tests.helpers import running_worker, unacked
from tests.hub import Hub, WorkerUser, connect, hub_server, make_certs, render
from tests.test_gateway import serving
from tests.test_metrics import following, samples, total

pytestmark = pytest.mark.anyio

ATTACKER = WorkerUser("mallory", ("echo",))
GEMINI = WorkerUser("gem", ("gemini",))
OLD = WorkerUser(
    "old", ("gemini",)
)  # its block as worker-user.sh made it before cancels were read without a consumer
REFUSED_S = 0.5  # a request the server refuses is never answered: it times out


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hub, NatsServer]]:
    base = tmp_path_factory.mktemp("hostile-hub")
    certs = make_certs(
        base / "certs",
        servers=["localhost", "127.0.0.1"],
        clients=["gateway", ATTACKER.name, GEMINI.name, OLD.name],
    )
    rendered = render(base / "nats", certs, [ATTACKER, GEMINI, OLD])
    _without_cancels_grants(rendered.dir / "accounts.conf", OLD)
    with hub_server(rendered, base / "store") as server:
        yield rendered, server


def _without_cancels_grants(accounts: Path, user: WorkerUser) -> None:
    """``user``'s block without its rights to hear and read its providers' cancels."""
    text = accounts.read_text()
    start = text.index(f'# worker "{user.name}"')
    end = text.find("# worker ", start + 1)
    end = len(text) if end < 0 else end
    block = "".join(
        line for line in text[start:end].splitlines(keepends=True) if "$KV.hive_cancels." not in line
    )
    accounts.write_text(text[:start] + block + text[end:])


def settings_for(hub: Hub, server: NatsServer, user: str, **values: Any) -> Settings:
    return load_settings(
        environ={}, nats_url=server.url, prefix="hive", connect_timeout_s=5, nats_user=user,
        nats_password=hub.password(user), nats_tls_ca_file=str(hub.certs / "ca.pem"),
        nats_tls_cert_file=str(hub.certs / f"client-{user}.pem"),
        nats_tls_key_file=str(hub.certs / f"client-{user}-key.pem"), **values,
    )  # fmt: skip


@dataclass
class Attacker:
    nc: NATS
    errors: list[str]

    async def publish(self, subject: str, payload: bytes, msg_id: str | None = None) -> None:
        """A JetStream publish (acked when stored); no answer when the server refuses it."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        await self.nc.request(subject, payload, timeout=2, headers=headers)

    async def direct_get(self, subject: str, payload: bytes = b"") -> bytes | None:
        """A direct get's answer, or None when the server refused the request (no answer)."""
        try:
            msg = await self.nc.request(subject, payload, timeout=REFUSED_S)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return None
        return msg.data if not msg.headers or "Status" not in msg.headers else None


@asynccontextmanager
async def attacker(hub: Hub, server: NatsServer) -> AsyncIterator[Attacker]:
    errors: list[str] = []
    nc = await connect(
        server.url, hub, ATTACKER.name, cert=ATTACKER.name, errors=errors, inbox=f"_INBOX.{ATTACKER.name}"
    )
    try:
        yield Attacker(nc, errors)
    finally:
        await nc.close()


@asynccontextmanager
async def gateway(hub: Hub, server: NatsServer) -> AsyncIterator[tuple[Bus, Hive]]:
    """The hub's side: the bus under the gateway user, with the router running."""
    async with open_bus(settings_for(hub, server, "gateway"), name="gateway") as bus:
        await bus.js.purge_stream(bus.names.tasks_stream)  # each test starts with no task queued
        for provider in ("echo", "gemini"):  # as a hub that has served them before has them
            await ensure_consumers(bus.js, bus.settings, provider)
        async with anyio.create_task_group() as tg:
            await tg.start(Router(bus).run)
            yield bus, Hive(bus)
            tg.cancel_scope.cancel()


@asynccontextmanager
async def gemini_worker(hub: Hub, server: NatsServer) -> AsyncIterator[None]:
    """A real gemini worker under its own credential, answering "real: <prompt>"."""

    async def real(task: Task) -> str:
        return f"real: {task.prompt}"

    settings = settings_for(hub, server, GEMINI.name, worker_name=GEMINI.name, heartbeat_interval_s=0.5)
    async with (
        open_bus(settings, name="gemini-worker") as wbus,
        running_worker(wbus, "gemini", FunctionProvider(real)),
    ):
        yield


async def queued_providers(bus: Bus) -> set[str]:
    """The providers the tasks stream holds tasks of (queued, or kept as history once done)."""
    info = await bus.js.stream_info(bus.names.tasks_stream, subjects_filter=bus.names.all_tasks)
    return {subject.split(".")[2] for subject in info.state.subjects or {}}


async def test_a_worker_cannot_read_another_providers_prompts(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    async with gateway(rendered, server) as (_, hive), attacker(rendered, server) as mallory:
        secret = await hive.submit("gemini", "el plan secreto", metadata={"client": "acme"})
        own = await hive.submit("echo", "mine")
        events = "$JS.API.DIRECT.GET.HIVE_EVENTS_gemini"  # gemini's events, in a stream of their own
        for subject in (
            f"{events}.hive.events.gemini.*.queued",  # every gemini task as it arrives
            f"{events}.hive.events.gemini.{secret}.queued",
            f"{events}.hive.events.*.{secret}.*",
            f"{events}.hive.events.>",
            f"$JS.API.DIRECT.GET.HIVE_EVENTS_echo.hive.events.gemini.{secret}.queued",  # not in echo's
        ):
            assert await mallory.direct_get(subject) is None, subject
        body = json.dumps({"last_by_subj": f"hive.events.gemini.{secret}.queued"}).encode()
        assert await mallory.direct_get(events, body) is None
        assert await mallory.direct_get("$JS.API.STREAM.MSG.GET.HIVE_EVENTS_gemini", b'{"seq": 1}') is None
        assert await mallory.direct_get("$JS.API.STREAM.INFO.HIVE_EVENTS_gemini") is None
        # the tasks stream (whose direct gets readers of a task's content use) is the hub's alone
        tasks = "$JS.API.DIRECT.GET.HIVE_TASKS"
        for subject in (f"{tasks}.hive.tasks.gemini.normal.{secret}", f"{tasks}.hive.tasks.*.*.{secret}"):
            assert await mallory.direct_get(subject) is None, subject
        assert await mallory.direct_get("$JS.API.STREAM.MSG.GET.HIVE_TASKS", b'{"seq": 1}') is None
        # what its own tasks need it still reads: an echo task's last event (its queued event, the tasks
        # stream's headers-only marker: no content, which the worker gets with the task itself)
        mine = "$JS.API.DIRECT.GET.HIVE_EVENTS_echo"
        assert await mallory.direct_get(f"{mine}.hive.events.echo.{own}.*") is not None


async def test_a_forged_outcome_neither_counts_nor_blocks_the_real_one(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    async with (
        gateway(rendered, server) as (bus, hive),
        following(bus) as metrics,
        attacker(rendered, server) as mallory,
    ):
        task_id = await hive.submit("gemini", "escribe un tuit")
        forged = Completed(
            task_id=task_id, provider="echo", at_ms=now_ms(), attempt=1, worker="mallory", output="forged"
        )
        # the final event's de-duplication id as the old code made it, and one per run
        for msg_id in (f"{task_id}:final", f"{task_id}:final:1"):
            await mallory.publish(f"hive.events.echo.{task_id}.completed", encoder.encode(forged), msg_id)
        failed = Failed(
            task_id=task_id,
            provider="echo",
            at_ms=now_ms(),
            attempt=1,
            worker="m",
            reason="permanent",
            error="x",
        )
        await mallory.publish(f"hive.events.echo.{task_id}.failed", encoder.encode(failed))
        # completions of tasks that never were, in gemini's name, under the attacker's subjects
        made_up_ids = [new_task_id(), new_task_id()]
        for made_up_id in made_up_ids:
            made_up = msgspec.structs.replace(forged, task_id=made_up_id, provider="gemini")
            await mallory.publish(f"hive.events.echo.{made_up.task_id}.completed", encoder.encode(made_up))

        view = await hive.get(task_id)
        assert (view.status, view.provider) == ("queued", "gemini")  # the forgery does not count
        listed = {v.id: v for v in await hive.recent()}
        assert listed[task_id].status == "queued"
        assert not set(made_up_ids) & set(listed)  # tasks the bus never knew are not listed
        async with gemini_worker(rendered, server):
            done = await hive.wait(task_id, 30)
        assert (done.status, done.output, done.provider) == ("completed", "real: escribe un tuit", "gemini")
        async for result in hive.results([task_id]):
            assert (result.status, result.output) == ("completed", "real: escribe un tuit")
        completed = {v.id: v for v in await hive.recent(status="completed")}
        assert (completed[task_id].provider, completed[task_id].output) == ("gemini", "real: escribe un tuit")
        await anyio.sleep(0.5)  # the metrics follower has read the events
        found = samples(metrics)
        assert total(found, "hive_tasks_completed_total", provider="gemini") == 1


async def test_the_router_takes_no_planted_move(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    async with gateway(rendered, server) as (bus, hive), attacker(rendered, server) as mallory:
        task_id = await hive.submit("gemini", "real prompt", fallback=["groq"])
        known = Task(id=task_id, provider="gemini", prompt="real prompt", submitted_at_ms=now_ms())
        planted = Task(id=new_task_id(), provider="gemini", prompt="planted", submitted_at_ms=now_ms())
        moves = [
            # a gemini task, moved by echo's credential to echo, and to the task's own fallback
            (task_id, Task(**{**_fields(known), "provider": "echo", "prompt": "planted"})),
            (task_id, Task(**{**_fields(known), "provider": "groq", "prompt": "planted"})),
            # a task the bus never saw, made to run on gemini
            (planted.id, planted),
        ]
        for moved_id, task in moves:
            event = Moved(
                task_id=moved_id, provider="echo", at_ms=now_ms(), worker="m", reason="x", task=task
            )
            await mallory.publish(f"hive.events.echo.{moved_id}.moved", encoder.encode(event))
        await anyio.sleep(1.5)  # the router has read the moves
        assert await queued_providers(bus) == {"gemini"}
        assert (await hive.get(task_id)).provider == "gemini"


async def test_heartbeats_claiming_other_providers_count_for_nothing(hub: tuple[Hub, NatsServer]) -> None:
    """A worker credential writes heartbeat keys under its providers alone, and a heartbeat counts only
    for the provider its key names: one under its own provider's key that claims another (made up, or
    gemini, which the hub serves) makes no consumer and lists no worker."""
    rendered, server = hub
    async with gateway(rendered, server):
        pass  # a hub that has run once: its buckets are there (alone, this test was the first to run)
    async with attacker(rendered, server) as mallory:
        for i, provider in enumerate(["gemini", *(f"madeup{i}" for i in range(4))]):
            key = f"mallory.echo.x{i}"
            beat = WorkerBeat(worker_id=key, provider=provider, host="h", pid=1, version="0")
            await mallory.publish(f"$KV.hive_workers.{key}", encoder.encode(beat))
        with pytest.raises(nats.errors.TimeoutError):  # refused: no answer
            beat = WorkerBeat(worker_id="mallory.gemini.x", provider="gemini", host="h", pid=1, version="0")
            await mallory.publish("$KV.hive_workers.mallory.gemini.x", encoder.encode(beat))
        async with gateway(rendered, server) as (bus, hive):
            await anyio.sleep(1.0)  # the router's first look at the heartbeats
            consumers = [c.name for c in await bus.js.consumers_info(bus.names.tasks_stream)]
            assert await hive.workers() == []
    assert not [c for c in consumers if "madeup" in c], consumers


async def test_a_forged_dead_letter_is_not_replayed(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    async with gateway(rendered, server) as (bus, hive), attacker(rendered, server) as mallory:
        task_id = await hive.submit("gemini", "real prompt")
        stranger = new_task_id()
        for letter_id, provider in ((task_id, "gemini"), (task_id, "echo"), (stranger, "echo")):
            planted = Task(id=letter_id, provider=provider, prompt="planted", submitted_at_ms=now_ms())
            letter = Failed(
                task_id=letter_id, provider=provider, at_ms=now_ms(), attempt=1, worker="m",
                reason="permanent", error="x", task=planted,
            )  # fmt: skip
            await mallory.publish(f"hive.dlq.echo.{letter_id}", encoder.encode(letter))
            with pytest.raises(NotReplayable):
                await hive.replay(letter_id)
        async with gemini_worker(rendered, server):
            done = await hive.wait(task_id, 30)
        assert done.output == "real: real prompt"
        # nothing planted anywhere: the stream holds the real task alone (done, kept as history)
        assert await queued_providers(bus) == {"gemini"} and await unacked(bus) == 0


def _fields(task: Task) -> dict[str, Any]:
    return msgspec.structs.asdict(task)


async def test_what_a_worker_writes_to_a_bucket_is_bounded(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    async with gateway(rendered, server) as (bus, _), attacker(rendered, server) as mallory:
        for bucket in (bus.providers_kv, bus.budgets_kv, bus.workers_kv):
            config = (await bucket.status()).stream_info.config
            assert 0 < (config.max_bytes or -1) <= BUCKET_MAX_BYTES, config.name
            assert 0 < (config.max_msg_size or -1) <= VALUE_MAX_BYTES, config.name
        junk = b"x" * (VALUE_MAX_BYTES + 1)
        for subject in (
            "$KV.hive_providers.echo.junk",
            "$KV.hive_budgets.echo.k.m",
            "$KV.hive_workers.mallory.echo.x",
        ):
            answer = await mallory.nc.request(subject, junk, timeout=2)
            assert b"message size exceeds maximum allowed" in answer.data, subject


async def test_a_bucket_made_unbounded_is_bounded_when_the_gateway_starts(nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url)
    names = settings.names
    async with open_bus(settings) as bus:
        for bucket in (names.providers_bucket, names.budgets_bucket):
            await bus.js.delete_key_value(bucket)
            await bus.js.create_key_value(
                KeyValueConfig(bucket=bucket, storage=StorageType.FILE, direct=True)
            )
    async with open_bus(settings) as bus:
        for kv in (bus.providers_kv, bus.budgets_kv):
            config = (await kv.status()).stream_info.config
            assert (config.max_bytes, config.max_msg_size) == (BUCKET_MAX_BYTES, VALUE_MAX_BYTES)


async def test_a_tasks_event_feed_leaves_out_forged_events(nats_server: NatsServer) -> None:
    async with serving(make_settings(nats_server.url)) as stack:
        task_id = (
            await stack.http.post(
                "/v1/tasks", json={"provider": "slow", "prompt": "x", "payload": {"delay_s": 0.6}}
            )
        ).json()["id"]
        names = stack.bus.names
        forged = Completed(
            task_id=task_id, provider="echo", at_ms=now_ms(), attempt=1, worker="m", output="forged"
        )
        await ensure_events(stack.bus, "echo")  # echo has a stream of its own: the forgery is stored
        await stack.bus.js.publish(names.event_subject("echo", task_id, "completed"), encoder.encode(forged))
        seen: list[str] = []
        async with (
            running_worker(stack.bus, "slow", FunctionProvider(handlers.slow)),
            stack.http.stream("GET", f"/v1/tasks/{task_id}/events") as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith(("event: ", "data: ")):
                    seen.append(line)
    assert [line for line in seen if line.startswith("event: ")] == [
        "event: queued",
        "event: running",
        "event: completed",
    ]
    assert not [line for line in seen if "forged" in line]


async def test_a_worker_under_a_block_made_before_it_read_cancels_without_a_consumer_says_so(
    hub: tuple[Hub, NatsServer],
) -> None:
    """A worker whose credential may not hear or read its provider's cancels (a block worker-user.sh
    made before) would call tasks cancelled while queued: it stops at its start, saying what to do."""
    rendered, server = hub
    async with gateway(rendered, server):
        settings = settings_for(rendered, server, OLD.name, worker_name=OLD.name, request_timeout_s=1.0)
        async with open_bus(settings, name="old-worker") as wbus:
            worker = Worker(wbus, FunctionProvider(handlers.quick), WorkerOptions(provider="gemini"))
            with pytest.raises(BusRefused, match="no answer to a read of the gemini cancels") as refused:
                await worker.run()
    assert "nats/worker-user.sh" in str(refused.value)
