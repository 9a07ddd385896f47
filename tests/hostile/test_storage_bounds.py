"""Issue 12, point 5: what one provider's worker credential can store is bounded per provider, so that
it cannot crowd out another provider's records. Events and dead letters: each provider has a stream of
its own of each, with its own limit. An echo worker's credential (made by nats/worker-user.sh) floods
echo's events with junk many times their limit, and fills echo's dead letters with junk up to theirs;
gemini's history and results stay, and its dead letters still land, on the shipped hub config.

And a bus made before events or dead letters were kept per provider (one shared ``<PREFIX>_EVENTS``, one
``<PREFIX>_DLQ``) is split into per-provider streams when the gateway starts, losing nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from hive_bus import FunctionProvider, Hive, Settings, Task
from hive_bus._bus import ensure_consumers, shared_events_stream_config
from hive_bus._embedded import NatsServer
from hive_bus._errors import FailNow
from hive_bus._messages import Failed, TaskEvent, encoder, new_task_id, now_ms
from hive_bus.bus import Bus, open_bus
from hive_bus.workers.echo import EchoProvider
from tests.conftest import make_settings
from tests.helpers import events_of, running_worker
from tests.hub import Hub, hub_server, make_certs, render

from .test_credentials import ATTACKER, GEMINI, attacker, settings_for

pytestmark = pytest.mark.anyio

DLQ_MAX_BYTES = 1024**2  # each provider's, in this test
EVENTS_MAX_BYTES = 2 * 1024**2  # each provider's, in this test
JUNK_BYTES = 60 * 1024  # the largest dead letter of junk sent


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hub, NatsServer]]:
    base = tmp_path_factory.mktemp("storage-bounds-hub")
    certs = make_certs(
        base / "certs", servers=["localhost", "127.0.0.1"], clients=["gateway", ATTACKER.name, GEMINI.name]
    )
    rendered = render(base / "nats", certs, [ATTACKER, GEMINI])
    with hub_server(rendered, base / "store") as server:
        yield rendered, server


@asynccontextmanager
async def failing_gemini_worker(hub: Hub, server: NatsServer) -> AsyncIterator[None]:
    """A real gemini worker under its own credential, whose every call fails for good."""

    async def refuse(task: Task) -> str:
        raise FailNow("gemini said 400: the prompt is not allowed")

    settings = settings_for(
        hub,
        server,
        GEMINI.name,
        worker_name=GEMINI.name,
        heartbeat_interval_s=0.5,
        dlq_max_bytes=DLQ_MAX_BYTES,
    )
    async with (
        open_bus(settings, name="gemini-worker") as wbus,
        running_worker(wbus, "gemini", FunctionProvider(refuse)),
    ):
        yield


async def test_a_worker_filling_its_dead_letters_leaves_another_providers_room(
    hub: tuple[Hub, NatsServer],
) -> None:
    rendered, server = hub
    settings = settings_for(rendered, server, "gateway", dlq_max_bytes=DLQ_MAX_BYTES)
    async with open_bus(settings, name="gateway") as bus, attacker(rendered, server) as mallory:
        for provider in ("echo", "gemini"):  # as the gateway makes them for a provider it serves
            await ensure_consumers(bus.js, bus.settings, provider)
        hive = Hive(bus)
        # junk dead letters under echo's own subjects, large then small, until not one more fits
        stored_bytes, refused = 0, []
        for size in (JUNK_BYTES, 4096, 256, 16):
            while True:
                junk = Failed(
                    task_id=new_task_id(), provider="echo", at_ms=now_ms(), attempt=1, worker="m",
                    reason="permanent", error="x" * size,
                )  # fmt: skip
                data = encoder.encode(junk)
                answer = await mallory.nc.request(f"hive.dlq.echo.{junk.task_id}", data, timeout=2)
                if "error" in json.loads(answer.data):
                    refused.append(json.loads(answer.data)["error"]["description"])
                    break
                stored_bytes += len(data)
        assert len(refused) == 4, refused  # echo's dead letters are full
        assert stored_bytes <= DLQ_MAX_BYTES

        # a gemini task that fails for good is dead-lettered all the same
        task_id = await hive.submit("gemini", "escribe un tuit", max_attempts=1)
        async with failing_gemini_worker(rendered, server):
            done = await hive.wait(task_id, 30)
        assert (done.status, done.reason) == ("failed", "permanent")
        letter = await hive.dead_letter(task_id)
        assert (letter.failed.provider, letter.failed.error) == (
            "gemini",
            "gemini said 400: the prompt is not allowed",
        )
        assert task_id in {d.failed.task_id for d in await hive.dead_letters(provider="gemini")}


async def test_a_worker_flooding_its_events_leaves_another_providers_history(
    hub: tuple[Hub, NatsServer],
) -> None:
    """The finding: 40 junk events of 1 MB each under echo pushed gemini's history out of the one
    events stream, and gemini's tasks answered 404. Now each provider's events are a stream of their
    own: the junk pushes out echo's oldest events at most."""
    rendered, server = hub
    settings = settings_for(rendered, server, "gateway", events_max_bytes=EVENTS_MAX_BYTES)
    async with open_bus(settings, name="gateway") as bus, attacker(rendered, server) as mallory:
        await bus.js.purge_stream(bus.names.tasks_stream)
        for provider in ("echo", "gemini"):  # as the gateway makes them for a provider it serves
            await ensure_consumers(bus.js, bus.settings, provider)
        for provider in ("echo", "gemini"):  # this test's limit (the module's hub has others' streams)
            info = await bus.js.stream_info(bus.names.events_stream_of(provider))
            info.config.max_bytes = EVENTS_MAX_BYTES
            await bus.js.update_stream(info.config)
        hive = Hive(bus)
        task_id = await hive.submit("gemini", "escribe un tuit", max_attempts=1)
        async with failing_gemini_worker(rendered, server):
            done = await hive.wait(task_id, 30)
        assert (done.status, done.reason) == ("failed", "permanent")

        flood = 0
        while flood < 8 * EVENTS_MAX_BYTES:  # four times as much as the whole stream holds
            junk = Failed(
                task_id=new_task_id(), provider="echo", at_ms=now_ms(), attempt=1, worker="m",
                reason="permanent", error="x" * (900 * 1024),
            )  # fmt: skip
            await mallory.publish(f"hive.events.echo.{junk.task_id}.failed", encoder.encode(junk))
            flood += 900 * 1024
        echo = await bus.js.stream_info(bus.names.events_stream_of("echo"))
        assert echo.state.bytes <= EVENTS_MAX_BYTES  # the junk went in, within echo's own limit
        assert not mallory.errors, mallory.errors

        again = await hive.get(task_id)  # gemini's history is all there
        assert (again.status, again.reason, again.error) == (
            "failed",
            "permanent",
            "gemini said 400: the prompt is not allowed",
        )
        assert [type(e).__name__ for e in await events_of(bus, task_id)][-1] == "Failed"


async def _old_events_bus(
    settings: Settings, *, webhooks: bool
) -> tuple[str, str, dict[str, list[TaskEvent]], int]:
    """A bus whose every provider's events are in one ``<PREFIX>_EVENTS``, as before this version: a
    completed echo task and a queued groq one; with ``webhooks``, their durable consumer of the shared
    stream, which has announced nothing yet. The two tasks' ids, their events, how many events."""
    names = settings.names
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        done = await hive.submit("echo", "hecho")
        waiting = await hive.submit("groq", "espera")
        async with running_worker(bus, "echo", EchoProvider()):
            assert (await hive.wait(done, 10)).status == "completed"
        before = {task_id: await events_of(bus, task_id) for task_id in (done, waiting)}
        kept = []
        for provider in ("echo", "groq"):
            stream = names.events_stream_of(provider)
            state = (await bus.js.stream_info(stream)).state
            for seq in range(state.first_seq, state.last_seq + 1):
                raw = await bus.js.get_msg(stream, seq)  # as stored: a marker's headers name its task
                kept.append((raw.subject or "", raw.data or b"", dict(raw.headers or {})))
            await bus.js.delete_stream(stream)
        await bus.js.add_stream(shared_events_stream_config(settings))
        for subject, data, headers in kept:  # in the order they were stored: echo's, then groq's
            await bus.js.publish(subject, data, headers=headers or None, stream=names.events_stream)
        if webhooks:
            config = ConsumerConfig(
                durable_name=names.webhook_events_consumer, filter_subjects=names.final_events(),
                ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            )  # fmt: skip
            await bus.js.add_consumer(names.events_stream, config)
        await hive.close()
    return done, waiting, before, len(kept)


async def test_a_shared_events_stream_is_split_per_provider(nats_server: NatsServer) -> None:
    """A bus whose every provider's events are in one ``<PREFIX>_EVENTS`` (before this version): the
    start of two processes at once moves them into one stream per provider, in order, headers and
    bodies as they were, each once, and the tasks they record read as before."""
    settings = make_settings(nats_server.url)
    names = settings.names
    done, waiting, before, moved = await _old_events_bus(settings, webhooks=False)
    async with AsyncExitStack() as stack:  # two gateways (or a gateway and a client) starting on it
        bus, _ = await _both(stack, settings)
        with pytest.raises(nats.js.errors.NotFoundError):  # gone (a listing shows the first 256 alone)
            await bus.js.stream_info(names.events_stream)
        total = 0
        for provider in ("echo", "groq"):
            info = await bus.js.stream_info(names.events_stream_of(provider))
            assert info.config.subjects == [names.events_under(provider)]
            total += info.state.messages
        assert total == moved
        hive = Hive(bus)
        after = {task_id: await events_of(bus, task_id) for task_id in (done, waiting)}
        assert after == before
        assert (await hive.get(done)).output == "hecho"
        assert (await hive.get(waiting)).status == "queued"
        async with running_worker(bus, "groq", EchoProvider()):
            assert (await hive.wait(waiting, 10)).output == "espera"
        await hive.close()


async def test_the_split_keeps_the_webhooks_place(nats_server: NatsServer) -> None:
    """Webhooks ran on the old bus: what they had not announced before the split they announce after
    it (each provider's stream gets their consumer from its first final event not announced)."""
    settings = make_settings(nats_server.url)
    await _old_events_bus(settings, webhooks=True)
    async with open_bus(settings) as bus:
        for provider, unannounced in (("echo", 1), ("groq", 0)):  # echo's one completion; groq none
            stream = bus.names.events_stream_of(provider)
            info = await bus.js.consumer_info(stream, bus.names.webhook_events_consumer)
            assert info.num_pending == unannounced, provider


async def test_a_shared_dead_letter_stream_is_split_per_provider(nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url)
    names = settings.names
    letters = {new_task_id(): provider for provider in ("echo", "groq") for _ in range(3)}
    async with open_bus(settings) as bus:
        # the bus as the version before kept it: every provider's dead letters in one stream
        await bus.js.add_stream(
            StreamConfig(
                name=names.shared_dlq_stream, subjects=[names.all_dlq], storage=StorageType.FILE,
                max_bytes=settings.dlq_max_bytes, allow_direct=True,
            )
        )  # fmt: skip
        for task_id, provider in letters.items():
            failed = Failed(
                task_id=task_id, provider=provider, at_ms=now_ms(), attempt=1, worker="w",
                reason="permanent", error="no",
            )  # fmt: skip
            await bus.js.publish(
                names.dlq_subject(provider, task_id), encoder.encode(failed),
                headers={"Nats-Msg-Id": f"{task_id}:dlq"}, stream=names.shared_dlq_stream,
            )  # fmt: skip
    async with AsyncExitStack() as stack:  # two gateways (or a gateway and a client) starting on it
        bus, _ = await _both(stack, settings)
        hive = Hive(bus)
        listed = {d.failed.task_id: d.failed.provider for d in await hive.dead_letters()}
        assert listed == letters
        for provider in ("echo", "groq"):
            info = await bus.js.stream_info(names.dlq_stream(provider))
            assert (info.state.messages, info.config.subjects) == (3, [names.dlq_subject(provider, "*")])
        with pytest.raises(nats.js.errors.NotFoundError):  # gone (a listing shows the first 256 alone)
            await bus.js.stream_info(names.shared_dlq_stream)
        some = next(iter(letters))
        assert (await hive.dead_letter(some)).failed.task_id == some


async def _both(stack: AsyncExitStack, settings: Settings) -> tuple[Bus, Bus]:
    """Two processes' buses opened at once on the same bus."""
    opened: list[Bus] = []

    async def one() -> None:
        opened.append(await stack.enter_async_context(open_bus(settings)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
    return opened[0], opened[1]


async def test_a_shared_stream_with_a_letter_naming_no_provider_is_kept(nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url)
    names = settings.names
    async with open_bus(settings) as bus:
        await bus.js.add_stream(
            StreamConfig(name=names.shared_dlq_stream, subjects=[names.all_dlq], storage=StorageType.FILE)
        )
        await bus.js.publish(
            f"{names.prefix}.dlq.echo.{new_task_id()}", b"a letter", stream=names.shared_dlq_stream
        )
        await bus.js.publish(f"{names.prefix}.dlq.a.b.c", b"no provider", stream=names.shared_dlq_stream)
    async with open_bus(settings) as bus:
        kept = await bus.js.stream_info(names.shared_dlq_stream)  # not deleted with a letter in it
        assert kept.state.messages == 1 and kept.config.subjects == [names.shared_dlq_parked]
        assert (await bus.js.stream_info(names.dlq_stream("echo"))).state.messages == 1
    async with open_bus(settings) as bus:  # and the next start moves nothing twice
        assert (await bus.js.stream_info(names.dlq_stream("echo"))).state.messages == 1
