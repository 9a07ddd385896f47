"""Nothing accepted is lost: worker crashes, graceful stops and nats-server restarts, with real processes."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import anyio
import pytest

from hive_bus import Completed, Failed, FunctionProvider, Hive, Queued, Running, Settings, Task, TaskRequest
from hive_bus._bus import ensure_consumer
from hive_bus._embedded import NatsServer
from hive_bus._messages import encoder, now_ms, task_decoder
from hive_bus.bus import Bus, open_bus

from . import handlers
from .conftest import make_settings
from .helpers import events_of, eventually, running_worker, spawn

pytestmark = pytest.mark.anyio


def worker_process(settings: Settings, provider: str, handler: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        "HIVE_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
        "HIVE_HEARTBEAT_TTL_S": str(settings.heartbeat_ttl_s),
        "HIVE_LOG_LEVEL": "INFO",
    }
    args = [
        "worker",
        provider,
        "--handler",
        handler,
        "--nats",
        settings.nats_url,
        "--prefix",
        settings.prefix,
    ]
    return spawn(args, env=env, log=log)


async def _running_on_other_process(hive: Hive, task_id: str) -> bool:
    return (await hive.get(task_id)).status == "running"


async def test_a_killed_workers_task_is_completed_by_another(nats_server: NatsServer, tmp_path: Path) -> None:
    settings = make_settings(nats_server.url, ack_wait_s=2.0)
    async with open_bus(settings) as bus:
        await ensure_consumer(bus.js, settings, "slow")  # AckWait 2 s for the worker processes too
        hive = Hive(bus)
        proc = worker_process(settings, "slow", "tests.handlers:slow", tmp_path / "w1.log")
        try:
            task_id = await hive.submit("slow", "x", payload={"delay_s": 60})
            await eventually(
                lambda: _running_on_other_process(hive, task_id), 15, "the worker process to start it"
            )
            beats = await eventually(hive.workers, 5, "the worker's heartbeat")
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
        finally:
            proc.kill()
        started = anyio.current_time()
        async with running_worker(bus, "slow", FunctionProvider(handlers.quick)) as survivor:
            view = await hive.wait(task_id, 10)
        assert view.status == "completed"
        assert view.worker == survivor.id
        assert anyio.current_time() - started < settings.ack_wait_s + 1.5
        running = [e for e in await events_of(bus, task_id) if isinstance(e, Running)]
        assert [e.worker for e in running] == [beats[0].worker_id]  # the survivor was too quick to show one
        # the dead worker's heartbeat expires by itself
        assert [b.worker_id for b in beats] == [beats[0].worker_id]

        async def gone() -> bool:
            return beats[0].worker_id not in [b.worker_id for b in await hive.workers()]

        await eventually(gone, settings.heartbeat_ttl_s + 3, "the dead worker's heartbeat to expire")


async def test_sigterm_drains_the_worker_process(nats_server: NatsServer, tmp_path: Path) -> None:
    settings = make_settings(nats_server.url)
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        proc = worker_process(settings, "slow", "tests.handlers:slow", tmp_path / "w.log")
        try:
            task_id = await hive.submit("slow", "x", payload={"delay_s": 1.5})
            await eventually(lambda: _running_on_other_process(hive, task_id), 15, "the worker to start it")
            proc.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(proc.wait, 15)
        finally:
            proc.kill()
        assert code == 0
        view = await hive.get(task_id)
        assert (view.status, view.attempt) == ("completed", 1)
        assert await hive.workers() == []  # it removed its heartbeat on the way out


async def test_a_task_delivered_again_after_its_outcome_was_stored_is_not_called_again(
    bus: Bus, hive: Hive
) -> None:
    """A worker that stored a task's outcome and lost its ack (NATS went away between the two, or the
    worker died) leaves the message to come back. The worker it comes back to lets it go without a
    call: it was called again (paid twice), its ``running`` event came after the outcome, and the task
    read ``running`` for good (a probe stopping NATS under load found three such tasks)."""
    names = bus.names
    task_id = await hive.submit("twice", "una vez")
    await ensure_consumer(bus.js, bus.settings, "twice")
    pulled = await bus.js.pull_subscribe_bind(
        durable=names.consumer("twice", "normal"), stream=names.tasks_stream
    )
    [msg] = await pulled.fetch(1, timeout=5)
    task = task_decoder.decode(msg.data)
    done = Completed(
        task_id=task_id, provider="twice", at_ms=now_ms(), attempt=1, worker="twice-gone", output="la primera"
    )
    await bus.js.publish(
        names.event_subject("twice", task_id, "completed"), encoder.encode(done),
        headers={"Nats-Msg-Id": task.final_msg_id}, stream=names.events_stream_of("twice"),
    )  # fmt: skip
    await msg.nak()  # no ack: back at once, as a lost ack's message comes back after AckWait
    await pulled.unsubscribe()
    calls: list[str] = []

    async def again(task: Task) -> str:
        calls.append(task.id)
        return "la segunda"

    async with running_worker(bus, "twice", FunctionProvider(again)):
        await eventually(lambda: _acked(bus, "twice"), 10, "the message to be let go")
    assert calls == []
    view = await hive.get(task_id)
    assert (view.status, view.output) == ("completed", "la primera")
    assert [type(e) for e in await events_of(bus, task_id)] == [Queued, Completed]


@pytest.mark.parametrize("end", ["completed", "failed"])
async def test_a_running_event_stored_after_the_end_does_not_undo_it(bus: Bus, hive: Hive, end: str) -> None:
    """A worker's ``running`` event may be stored after the task's end: a twin delivery (AckWait passed
    while the first call ran) whose run another worker completed, or a call the hub expired at its
    deadline meanwhile. The run is recorded as ended once, so the task reads its end, not ``running``
    for good, by id and in the list (before, only a ``cancelled`` end was read past such an event)."""
    names = bus.names
    task_id = await hive.submit("twin", "dos veces")
    ended: Completed | Failed
    if end == "completed":
        ended = Completed(
            task_id=task_id, provider="twin", at_ms=now_ms(), attempt=1, worker="w1", output="hecho"
        )
    else:
        ended = Failed(
            task_id=task_id, provider="twin", at_ms=now_ms(), attempt=0, worker=None, reason="deadline",
            error="past its deadline", was="running",
        )  # fmt: skip
    await bus.js.publish(names.event_subject("twin", task_id, end), encoder.encode(ended))
    late = Running(task_id=task_id, provider="twin", at_ms=now_ms(), attempt=1, worker="w2")
    await bus.js.publish(names.event_subject("twin", task_id, "running"), encoder.encode(late))
    view = await hive.get(task_id)
    assert (view.status, view.output, view.worker) == (
        end,
        "hecho" if end == "completed" else None,
        ended.worker,
    )
    [listed] = await hive.recent(provider="twin", limit=1)  # the list reads the tail: the same end
    assert (listed.id, listed.status) == (task_id, end)


async def _acked(bus: Bus, provider: str) -> bool:
    info = await bus.js.consumer_info(bus.names.tasks_stream, bus.names.consumer(provider, "normal"))
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_nats_server_restart_between_submit_and_consume_loses_nothing(
    own_server: NatsServer, how: str
) -> None:
    settings = make_settings(own_server.url)
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        ids = await hive.submit_many([TaskRequest(provider="echo", prompt=f"post {i}") for i in range(200)])
        own_server.kill() if how == "kill" else own_server.stop()
        own_server.start()  # same port, same store
        await eventually(lambda: _connected(bus), 15, "the client to reconnect")
        from hive_bus.workers.echo import EchoProvider

        async with running_worker(bus, "echo", EchoProvider(), concurrency=16):
            outputs = {}
            with anyio.fail_after(30):
                async for view in hive.results(ids):
                    outputs[view.id] = view.output
        assert outputs == {task_id: f"post {i}" for i, task_id in enumerate(ids)}
        for task_id in ids[:20]:
            assert len([e for e in await events_of(bus, task_id) if isinstance(e, Completed)]) == 1


async def _connected(bus: Bus) -> bool:
    return bus.nc.is_connected
