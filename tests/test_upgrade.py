"""A bus made before one stored write per submission (a work-queue tasks stream on
``<prefix>.tasks.<provider>.<priority>``, a ``queued`` event carrying each task) is upgraded by the first
process that declares it, its queued tasks kept; an upgrade cut short goes on at the next start; a
worker is refused with a message that names what upgrades it."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import secrets
from collections.abc import Iterator

import anyio
import msgspec
import nats.js.errors
import pytest
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from hive_bus import BusConfigError, FunctionProvider, Hive, Settings, _blobs
from hive_bus._bus import blobs_stream_config, ensure_consumers, shared_events_stream_config
from hive_bus._embedded import NatsServer
from hive_bus._messages import BlobRef, Queued, Task, encoder, new_task_id, now_ms
from hive_bus.bus import Bus, open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider

from .conftest import make_settings
from .helpers import events_of, hive_cli, running_worker, unacked
from .hostile.test_credentials import GEMINI, settings_for
from .hub import Hub, hub_server, make_certs, render

pytestmark = pytest.mark.anyio

OLD_TASKS = 25


async def _old_bus(settings: Settings) -> list[str]:
    """What an older hive-bus left: a work-queue tasks stream holding queued tasks (one undecodable),
    each with its ``queued`` event carrying it. The ids of the tasks."""
    names = settings.names
    async with open_bus(make_settings(settings.nats_url)) as other:  # any connection will do
        js = other.js
        await js.add_stream(shared_events_stream_config(settings))
        await js.add_stream(
            StreamConfig(
                name=names.tasks_stream,
                subjects=[f"{names.prefix}.tasks.*.*"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                discard=DiscardPolicy.NEW,
                max_bytes=8 * 1024**2,
                duplicate_window=settings.duplicate_window_s,
            )
        )
        ids = []
        for i in range(OLD_TASKS):
            task = Task(id=new_task_id(), provider="echo", prompt=f"tarea {i}", submitted_at_ms=now_ms())
            queued = Queued(task_id=task.id, provider="echo", at_ms=task.submitted_at_ms, task=task)
            await js.publish(names.event_subject("echo", task.id, "queued"), encoder.encode(queued))
            await js.publish(
                f"{names.prefix}.tasks.echo.normal", encoder.encode(task), stream=names.tasks_stream
            )
            ids.append(task.id)
        await js.publish(f"{names.prefix}.tasks.echo.normal", b"\xff not a task", stream=names.tasks_stream)
    return ids


async def test_an_old_work_queue_bus_is_upgraded_and_its_queued_tasks_run(settings: Settings) -> None:
    ids = await _old_bus(settings)
    names = settings.names
    async with open_bus(settings) as bus:
        info = await bus.js.stream_info(names.tasks_stream)
        assert info.config.retention == RetentionPolicy.LIMITS and info.config.republish is not None
        assert info.state.messages == OLD_TASKS + 1  # every task put back, the poison too
        with pytest.raises(nats.js.errors.NotFoundError):  # the copy is gone
            await bus.js.stream_info(names.upgrade_stream)
        hive = Hive(bus)
        try:
            assert (await hive.get(ids[0])).status == "queued"  # read from its old queued event
            async with running_worker(bus, "echo", EchoProvider()):
                views = [await hive.wait(task_id, 10) for task_id in ids]
            assert [v.status for v in views] == ["completed"] * OLD_TASKS
            assert [v.output for v in views] == [f"tarea {i}" for i in range(OLD_TASKS)]
            # put back without a second queued event: each task has its old one only
            assert [type(e).__name__ for e in await events_of(bus, ids[0])] == ["Queued", "Completed"]
            assert await unacked(bus) == 0
            # a new submission on the upgraded bus: one write, its queued event the stream's marker
            fresh = await hive.submit("echo", "nueva")
            assert [type(e).__name__ for e in await events_of(bus, fresh)] == ["Queued"]
        finally:
            await hive.close()


async def test_an_upgrade_cut_short_goes_on_at_the_next_start(settings: Settings) -> None:
    """Cut short after the old stream was deleted: only the copy holds the tasks."""
    ids = await _old_bus(settings)
    names = settings.names
    async with open_bus(make_settings(settings.nats_url)) as other:
        js = other.js
        await js.add_stream(
            StreamConfig(
                name=names.upgrade_stream, subjects=[names.upgrade_subjects], storage=StorageType.FILE
            )
        )
        for seq in range(1, OLD_TASKS + 2):  # a work-queue stream takes no second consumer
            raw = await js.get_msg(names.tasks_stream, seq)
            await js.publish(
                f"{names.prefix}.tasks_upgrade.echo.normal", raw.data or b"", stream=names.upgrade_stream
            )
        await js.delete_stream(names.tasks_stream)
    async with open_bus(settings) as bus:
        info = await bus.js.stream_info(names.tasks_stream)
        assert info.config.republish is not None and info.state.messages == OLD_TASKS + 1
        hive = Hive(bus)
        try:
            async with running_worker(bus, "echo", EchoProvider()):
                assert (await hive.wait(ids[-1], 10)).output == f"tarea {OLD_TASKS - 1}"
        finally:
            await hive.close()
    async with open_bus(settings) as bus:  # and once done, a later start changes nothing
        assert (await bus.js.stream_info(names.tasks_stream)).state.messages == OLD_TASKS + 1


async def test_a_worker_is_told_to_start_the_gateway_first(settings: Settings) -> None:
    await _old_bus(settings)
    worker = make_settings(settings.nats_url, prefix=settings.prefix, worker_name="w1")
    with pytest.raises(BusConfigError, match="start the gateway") as caught:
        async with open_bus(worker):
            pass
    assert settings.names.tasks_stream in str(caught.value)


async def test_hive_upgrade_upgrades_the_bus(settings: Settings) -> None:
    ids = await _old_bus(settings)
    args = ["upgrade", "--nats", settings.nats_url, "--prefix", settings.prefix]
    env = {"HIVE_HEARTBEAT_INTERVAL_S": "0.5", "HIVE_HEARTBEAT_TTL_S": "1.5"}  # the test bus's (conftest)
    done = hive_cli(args, env=env)
    assert done.returncode == 0, done.stderr
    assert f"limits retention, {OLD_TASKS + 1} tasks held" in done.stdout
    # the one events stream of every provider, split: echo's events in a stream of their own
    assert f"{settings.names.events_stream_of('echo')}: {OLD_TASKS} events of echo" in done.stdout
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        try:
            assert (await hive.get(ids[3])).prompt == "tarea 3"
        finally:
            await hive.close()


async def test_an_object_stored_before_chunks_were_kept_apart_is_still_read(bus: Bus) -> None:
    """A large task's content is now stored a chunk a subject, read by direct gets (a worker credential
    may make no consumer); an object of several chunks on one subject, as older buses stored them, is
    still read back whole, through a consumer."""
    data = secrets.token_bytes(300_000)
    new = await _blobs.put(bus, provider="echo", task_id=new_task_id(), kind="task", data=data)
    assert (new.apart, new.chunks) == (True, 3)
    assert await _blobs.get(bus, new) == data

    names = bus.names
    nuid = f"echo.{new_task_id()}.task.0ld0"
    with contextlib.suppress(nats.js.errors.BadRequestError):  # the session's bus may have it already
        await bus.js.add_stream(blobs_stream_config(bus.settings, None))  # every provider's, as older buses
    for i in range(0, len(data), 128 * 1024):
        await bus.js.publish(
            names.blob_chunks(names.blobs_bucket, nuid), data[i : i + 128 * 1024], stream=names.blobs_stream
        )
    old = msgspec.structs.replace(new, name="echo/old", nuid=nuid, apart=False, own_bucket=False)
    assert await _blobs.get(bus, old) == data
    echo = names.blobs_bucket_of("echo")
    await bus.js.purge_stream(f"OBJ_{echo}", subject=f"{names.blob_chunks(echo, new.nuid)}.*")
    with pytest.raises(_blobs.BlobMissing, match="no longer in"):
        await _blobs.get(bus, new)


async def test_a_large_task_in_the_claim_check_bucket_of_every_provider_still_runs(
    settings: Settings,
) -> None:
    """A bus made before one claim check bucket a provider kept every provider's objects in
    ``<prefix>_blobs``: a large task queued then still runs, its content read there; once nothing is
    left in that bucket, a start deletes it (JetStream reserves its bytes for it)."""
    names = settings.names
    prompt = "una tarea larga " * 10_000  # 160 KB: over the claim check, in two chunks kept apart
    async with open_bus(settings) as bus:
        # what the older client stored and queued
        await bus.js.add_stream(blobs_stream_config(settings, None))
        task = Task(id=new_task_id(), provider="echo", prompt=prompt, submitted_at_ms=now_ms())
        data = _blobs.content_bytes(task)
        nuid = f"echo.{task.id}.task.0ld0"
        for i, at in enumerate(range(0, len(data), 128 * 1024)):
            chunk = names.blob_chunks(names.blobs_bucket, f"{nuid}.{i}")
            await bus.js.publish(chunk, data[at : at + 128 * 1024], stream=names.blobs_stream)
        digest = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        ref = BlobRef(name="echo/old", nuid=nuid, size_bytes=len(data), chunks=2, digest=digest, apart=True)
        queued = msgspec.structs.replace(task, prompt="(in the object store)", content=ref)
        await bus.js.publish(
            names.task_subject("echo", "normal", task.id), encoder.encode(queued), stream=names.tasks_stream
        )
        hive = Hive(bus)
        try:
            async with running_worker(bus, "echo", EchoProvider()):
                assert (await hive.wait(task.id, 10)).output == prompt
        finally:
            await hive.close()
    async with open_bus(settings) as bus:  # kept while an object is in it
        await _start_a_gateway(bus)
        assert (await bus.js.stream_info(names.blobs_stream)).state.messages == 2
        await bus.js.purge_stream(names.blobs_stream)  # as its objects age out
        await _start_a_gateway(bus)
        with pytest.raises(nats.js.errors.NotFoundError):
            await bus.js.stream_info(names.blobs_stream)


async def _start_a_gateway(bus: Bus) -> None:
    hive = Hive(bus)
    gateway = Gateway(hive, GatewayOptions(port=0))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            gateway.stop()
    finally:
        await hive.close()


async def test_an_empty_claim_check_bucket_of_every_provider_is_left_to_a_gateway_start(
    settings: Settings,
) -> None:
    """A client's or a worker's start leaves the empty ``<prefix>_blobs`` of an older hub alone: an
    older gateway still running stores its large tasks there, and deleted under it, answered each
    with a 503 'could not store a ...-byte object in hive_blobs: no response from stream' until it was
    restarted (a worker of this version upgraded before its hub, a client's ``hive submit``)."""
    names = settings.names
    async with open_bus(settings) as bus:
        await bus.js.add_stream(blobs_stream_config(settings, None))  # as an older gateway made it
    unnamed_worker = make_settings(settings.nats_url, prefix=settings.prefix)
    async with open_bus(unnamed_worker) as bus:
        hive = Hive(bus)
        try:
            await hive.submit("echo", "una tarea")
        finally:
            await hive.close()
        assert (await bus.js.stream_info(names.blobs_stream)).state.messages == 0  # still there
        await _start_a_gateway(bus)
        with pytest.raises(nats.js.errors.NotFoundError):
            await bus.js.stream_info(names.blobs_stream)


async def test_an_upgrade_cut_short_by_the_tasks_streams_limits_goes_on_once_they_are_raised(
    settings: Settings,
) -> None:
    """An old queue larger than HIVE_TASKS_MAX_MSGS stopped the put-back at the limit, and the tasks
    stream made for it kept that limit: every later start, with the limit raised too, stopped again
    ('maximum messages exceeded ... start the gateway again to go on'), so the gateway never started.
    The stream takes the limits of the start that goes on, and the refusal says which settings."""
    ids = await _old_bus(settings)
    names = settings.names
    small = make_settings(settings.nats_url, prefix=settings.prefix, tasks_max_msgs=10)
    with pytest.raises(BusConfigError, match="maximum messages exceeded") as caught:
        async with open_bus(small):
            pass
    assert "HIVE_TASKS_MAX_MSGS" in str(caught.value)
    async with open_bus(settings) as bus:
        info = await bus.js.stream_info(names.tasks_stream)
        assert info.config.republish is not None and info.state.messages == OLD_TASKS + 1
        assert info.config.max_msgs == settings.tasks_max_msgs
        hive = Hive(bus)
        try:
            async with running_worker(bus, "echo", EchoProvider()):
                views = [await hive.wait(task_id, 10) for task_id in ids]
            assert [v.output for v in views] == [f"tarea {i}" for i in range(OLD_TASKS)]
        finally:
            await hive.close()


@pytest.fixture
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hub, NatsServer]]:
    base = tmp_path_factory.mktemp("upgraded-hub")
    certs = make_certs(base / "certs", servers=["localhost", "127.0.0.1"], clients=["gateway", GEMINI.name])
    rendered = render(base / "nats", certs, [GEMINI])
    with hub_server(rendered, base / "store") as server:
        yield rendered, server


async def test_a_hub_upgraded_has_the_claim_check_bucket_of_each_provider_it_served_before_a_worker(
    hub: tuple[Hub, NatsServer],
) -> None:
    """A hub made before one claim check bucket a provider had its providers' consumers and no such
    bucket; the gateway made one only once it saw a worker's heartbeat, some seconds after that worker
    (whose credential may not make it) had fetched the queued tasks: each large output was refused
    ('the claim check bucket of provider gemini is not there'), and the task called again after
    AckWait. A gateway's start makes the bucket of every provider that has consumers."""
    rendered, server = hub

    async def long_answer(task: Task) -> str:
        return f"{task.prompt}: " + "y" * 100_000  # over the claim check's 64 KiB

    gateway_settings = settings_for(rendered, server, "gateway", ack_wait_s=60)
    async with open_bus(gateway_settings, name="gateway") as bus:
        hive = Hive(bus)
        try:
            task_id = await hive.submit("gemini", "escribe un tuit", max_attempts=1)
        finally:
            await hive.close()
        await ensure_consumers(bus.js, bus.settings, "gemini")  # made for a worker it saw
        await bus.js.delete_stream(f"OBJ_{bus.names.blobs_bucket_of('gemini')}")  # as the older hub had it
    worker = settings_for(rendered, server, GEMINI.name, worker_name=GEMINI.name, heartbeat_interval_s=0.5)
    async with open_bus(gateway_settings, name="gateway") as bus:
        hive = Hive(bus)
        gateway = Gateway(hive, GatewayOptions(port=0))
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(gateway.serve)
                async with (
                    open_bus(worker, name="gemini-worker") as wbus,
                    running_worker(wbus, "gemini", FunctionProvider(long_answer)),
                ):
                    done = await hive.wait(task_id, 20)
                gateway.stop()
        finally:
            await hive.close()
    assert (done.status, done.attempt, done.output) == ("completed", 1, "escribe un tuit: " + "y" * 100_000)
