"""Cancelling a task (issue 16, point 1): a queued or waiting task never runs, a running one is
abandoned by its worker, ``cancelled`` is a final status with its own event, and a cancel after the
end is a clear 409. Real nats-server, workers in this process, the gateway over HTTP, the CLI."""

from __future__ import annotations

import logging

import anyio
import httpx
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, KeyValueConfig, StorageType

import hive_bus._worker
from hive_bus import (
    Cancelled,
    FunctionProvider,
    Hive,
    HiveError,
    Queued,
    RetryAfter,
    Task,
    TaskEnded,
    TaskNotFound,
    _cancel,
)
from hive_bus._bus import BUCKET_MAX_BYTES, size_text
from hive_bus._counts import unfetched_cancels
from hive_bus._embedded import NatsServer
from hive_bus._expiry import Timers
from hive_bus._messages import Running, encoder, now_ms
from hive_bus._settings import Settings
from hive_bus._stats import queue_depths
from hive_bus.bus import Bus, open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider
from hive_bus.workers.groq import GroqProvider

from . import handlers
from .conftest import make_settings
from .fakes import ProviderFakes
from .helpers import events_of, eventually, hive_cli, running_worker, task_of, unacked

pytestmark = pytest.mark.anyio


async def test_a_queued_task_cancelled_never_runs(bus: Bus, hive: Hive) -> None:
    calls: list[str] = []

    async def record(task: object) -> str:
        calls.append(getattr(task, "id", ""))
        return "ran"

    task_id = await hive.submit("later", "no me ejecutes")
    kept = await hive.submit("later", "a mí sí")
    view = await hive.cancel(task_id, reason="changed my mind")
    assert (view.status, view.reason, view.error) == (
        "cancelled",
        "cancelled while queued",
        "changed my mind",
    )
    async with running_worker(bus, "later", FunctionProvider(record)):
        assert (await hive.wait(kept, 10)).status == "completed"
        await eventually(lambda: _drained(bus), 10, "the cancelled task to leave the queue")
    assert calls == [kept]
    assert (await hive.get(task_id)).status == "cancelled"
    events = await events_of(bus, task_id)
    assert [type(e) for e in events] == [Queued, Cancelled]


async def test_workers_act_on_the_cancels_the_bucket_stores_and_make_no_consumer_for_them(
    bus: Bus, hive: Hive
) -> None:
    """A worker hears cancels through a core subscription and looks a task's key up before it lets the
    task go: it needs no consumer (one worker credential that may make them may use up the account's,
    and then no worker of any provider starts), and a put the bucket refused, which subscribers hear all
    the same, changes nothing."""
    names = bus.names
    stream = f"KV_{names.cancels_bucket}"
    config = (await bus.js.stream_info(stream)).config
    config.max_consumers = 1
    await bus.js.update_stream(config)
    await bus.js.add_consumer(stream, ConsumerConfig(durable_name="squatter", ack_policy=AckPolicy.NONE))
    gate, calls = anyio.Event(), list[str]()

    async def held(task: Task) -> str:
        calls.append(task.prompt or "")
        await gate.wait()
        return "ran"

    async def refused_put(task_id: str) -> None:
        subject = f"$KV.{names.cancels_bucket}.{names.cancel_key('nocon', task_id)}"
        cancel = Cancelled(task_id=task_id, provider="nocon", at_ms=now_ms(), was="queued")
        await bus.nc.publish(
            subject, encoder.encode(cancel), headers={"Nats-Expected-Last-Subject-Sequence": "999999"}
        )

    async with running_worker(bus, "nocon", FunctionProvider(held), concurrency=1) as worker:
        first = await hive.submit("nocon", "first")
        await eventually(lambda: _true(calls == ["first"]), 10, "the first call to start")
        second = await hive.submit("nocon", "second")
        third = await hive.submit("nocon", "third")
        await refused_put(first)  # heard while its call runs
        await refused_put(second)  # heard while it is queued
        await eventually(lambda: _true(second in worker.cancels._heard), 5, "the worker to hear both")
        with pytest.raises(nats.js.errors.NotFoundError):
            await bus.js.get_last_msg(stream, f"$KV.{names.cancels_bucket}.nocon.{second}", direct=True)
        assert (await hive.cancel(third)).status == "cancelled"
        gate.set()
        assert (await hive.wait(first, 10)).status == "completed"
        assert (await hive.wait(second, 10)).status == "completed"
        await eventually(lambda: _drained(bus), 10, "the cancelled task to be let go")
    assert calls == ["first", "second"]
    assert (await bus.js.stream_info(stream)).state.consumer_count == 1  # the squatter's


async def _true(value: bool) -> bool:
    return value


async def _drained(bus: Bus) -> bool:
    return await unacked(bus) == 0


async def test_a_task_cancelled_while_queued_leaves_the_queue_at_once(
    bus: Bus, hive: Hive, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no worker yet: the cancelled tasks wait in the tasks stream until one fetches them, and the
    # figures (stats, metrics, the problem strip) must not count them as work waiting
    ids = [await hive.submit("depth", f"tarea {i}") for i in range(3)]
    # listed once the submission counters say tasks were queued for it (within 0.25 s)
    await eventually(lambda: _queued_is(hive, 3), 5, "the tasks in the queue's depth")
    await hive.cancel(ids[0])
    await hive.cancel(ids[0])  # again: counted once
    await hive.cancel(ids[1])
    assert await _queued(hive, "depth") == 1
    assert await unfetched_cancels(bus) == {"depth": 2}
    async with running_worker(bus, "depth", EchoProvider()):
        # its consumers now count the queue: the two cancelled tasks are still theirs until fetched
        assert (await hive.wait(ids[2], 10)).status == "completed"
        await eventually(lambda: _uncounted(bus), 10, "the cancelled tasks to be fetched and let go")
        await eventually(lambda: _drained(bus), 10, "nothing left unacked")
        assert await unfetched_cancels(bus) == {"depth": 0}  # each fetch took its task off, once
        assert await _queued(hive, "depth") == 0
        # a task the worker holds, cancelled while its view still says queued (a call's running event
        # comes after RUNNING_AFTER_S, here never): counted, then off the count once the worker lets it go
        monkeypatch.setattr(hive_bus._worker, "RUNNING_AFTER_S", 600.0)
        running = await hive.submit("depth", "larga", payload={"delay_s": 30})
        await eventually(lambda: _held(bus), 10, "the worker to hold the task")
        assert (await hive.cancel(running)).reason == "cancelled while queued"
        await eventually(lambda: _drained(bus), 10, "the cancelled call to be let go")
        await eventually(lambda: _uncounted(bus), 10, "the count to come back to 0")
        assert await _queued(hive, "depth") == 0
        assert (await hive.get(running)).status == "cancelled"


async def test_a_task_cancelled_or_expired_while_it_waits_out_a_rate_limit_leaves_the_figures(
    bus: Bus, hive: Hive
) -> None:
    # The worker hands a task back with the provider's delay and stops fetching while the provider
    # cools down: the message stayed pending on the consumer, so the stats said "retrying" (and
    # hive_queue_ack_pending counted it) after the task read "cancelled" (for the rest of the delay: an
    # hour here), or "failed" past its deadline (until the cooldown ended: a minute here).
    def limited(retry_after_s: float) -> FunctionProvider:
        async def call(task: Task) -> str:
            raise RetryAfter("the quota is spent", retry_after_s=retry_after_s, quota="minute")

        return FunctionProvider(call)

    async def waiting(provider: str, n: int) -> bool:
        stats = {s.provider: s for s in await hive.stats()}
        return stats[provider].retrying == n and (await queue_depths(bus))[provider].ack_pending == n

    async with (
        anyio.create_task_group() as tg,
        running_worker(bus, "waits", limited(3600)),
        running_worker(bus, "waits2", limited(60)),
    ):
        await tg.start(Timers(bus).run)  # a gateway's: it fires the deadline
        cancelled = await hive.submit("waits", "cancélame")
        expiring = await hive.submit("waits2", "caduco", deadline_s=3)
        await eventually(lambda: _status_is(hive, cancelled, "retrying"), 10, "the first task to wait")
        await eventually(lambda: waiting("waits", 1), 5, "the first task waiting in the stats")
        assert (await hive.cancel(cancelled)).reason == "cancelled while retrying"
        await eventually(lambda: waiting("waits", 0), 5, "the cancelled task to leave the figures")
        await eventually(lambda: _status_is(hive, expiring, "retrying"), 10, "the second task to wait")
        await eventually(lambda: _status_is(hive, expiring, "failed"), 10, "its deadline to pass")
        await eventually(lambda: waiting("waits2", 0), 5, "the expired task to leave the figures")
        tg.cancel_scope.cancel()
    assert (await hive.get(cancelled)).status == "cancelled"
    assert (await hive.get(expiring)).reason == "expired"


async def _status_is(hive: Hive, task_id: str, status: str) -> bool:
    return (await hive.get(task_id)).status == status


async def test_an_outcome_refused_after_a_cancel_while_queued_takes_the_task_off_the_count(
    bus: Bus, hive: Hive
) -> None:
    # A worker that fetched the task just before the cancel, and finished its call before the cancel
    # reached it, sees its outcome refused as a duplicate: it reads the cancel recorded first.
    task_id = await hive.submit("late", "x")
    await hive.cancel(task_id)
    assert await unfetched_cancels(bus) == {"late": 1}
    task = await task_of(bus, task_id)
    await _cancel.fetched_if_ended_while_queued(bus, task)
    await _cancel.fetched_if_ended_while_queued(bus, task)  # a second path to the same end: once
    assert await unfetched_cancels(bus) == {"late": 0}
    # an outcome refused for another reason (another worker's) counts nothing
    other = await task_of(bus, await hive.submit("late", "y"))
    await _cancel.fetched_if_ended_while_queued(bus, other)
    assert await unfetched_cancels(bus) == {"late": 0}


async def _queued(hive: Hive, provider: str) -> int:
    return next((s.pending for s in await hive.stats() if s.provider == provider), 0)


async def _queued_is(hive: Hive, n: int) -> bool:
    return await _queued(hive, "depth") == n


async def _uncounted(bus: Bus) -> bool:
    return await unfetched_cancels(bus) == {"depth": 0}


async def _held(bus: Bus) -> bool:
    return (await queue_depths(bus))["depth"].ack_pending == 1


async def test_a_running_call_is_abandoned_and_the_worker_goes_on(bus: Bus, hive: Hive) -> None:
    async with running_worker(bus, "long", FunctionProvider(handlers.until_cancelled), concurrency=1):
        task_id = await hive.submit("long", "sigue y sigue")
        await eventually(lambda: _started(task_id), 10, "the call to start")
        view = await hive.cancel(task_id)
        assert view.status == "cancelled"
        await eventually(lambda: _abandoned(task_id), 10, "the worker to abandon the call")
        # the one lane is free again: the next task runs (and is cancelled in turn)
        second = await hive.submit("long", "otra")
        await eventually(lambda: _started(second), 10, "the next call")
        await hive.cancel(second)
    assert (await hive.wait(task_id, 1)).status == "cancelled"
    assert await unacked(bus) == 0  # acked, not redelivered


async def test_a_worker_that_lived_through_a_nats_restart_still_hears_of_cancels(
    own_server: NatsServer,
) -> None:
    # Its cancels consumer lived in the server's memory: after the restart it heard of no cancel again,
    # so a cancelled call ran to its end, and a task cancelled while queued was called all the same.
    settings = make_settings(own_server.url)
    async with (
        open_bus(settings) as bus,
        running_worker(bus, "long", FunctionProvider(handlers.until_cancelled), concurrency=1),
    ):
        hive = Hive(bus)
        own_server.stop()
        await anyio.to_thread.run_sync(own_server.start)  # same port, same store
        await eventually(lambda: _connected(bus), 15, "the client to reconnect")
        running = await hive.submit("long", "sigue y sigue")
        await eventually(lambda: _started(running), 15, "the call to start")
        queued = await hive.submit("long", "no me ejecutes")  # behind it: the one lane is taken
        assert (await hive.cancel(queued)).reason == "cancelled while queued"
        await hive.cancel(running)
        await eventually(lambda: _abandoned(running), 10, "the worker to abandon the call")
        # the lane is free again: the queued task is let go unrun, and the next one runs
        last = await hive.submit("long", "otra")
        await eventually(lambda: _started(last), 10, "the next call")
        await hive.cancel(last)
        assert queued not in handlers.STARTED


async def _connected(bus: Bus) -> bool:
    return bus.nc.is_connected


async def _started(task_id: str) -> bool:
    return task_id in handlers.STARTED


async def _abandoned(task_id: str) -> bool:
    return task_id in handlers.ABANDONED


async def test_a_call_to_a_real_sdk_is_abandoned(bus: Bus, hive: Hive) -> None:
    with ProviderFakes() as fakes:
        fakes.groq.delay_s = 30.0  # the provider takes its time
        groq = GroqProvider(api_key="gsk_cancel_test_0123456789", base_url=fakes.groq_base_url)
        async with running_worker(bus, "groq", groq, concurrency=1):
            task_id = await hive.submit("groq", "lento")
            await eventually(lambda: _requested(fakes), 10, "the call to reach the provider")
            with anyio.fail_after(5):  # the worker lets the call go at once, not after 30 s
                await hive.cancel(task_id)
                fakes.groq.delay_s = 0.0
                done = await hive.wait(await hive.submit("groq", "rápido"), 5)
        assert done.status == "completed"
        assert (await hive.get(task_id)).status == "cancelled"


async def _requested(fakes: ProviderFakes) -> bool:
    return fakes.groq.requests >= 1


async def test_a_running_event_after_the_cancel_leaves_the_task_cancelled_in_the_list(
    bus: Bus, hive: Hive
) -> None:
    # A worker that fetched the task as the cancel came (or one that did not hear of it) says
    # "running" after the cancel: GET /v1/tasks/{id} read "cancelled", while GET /v1/tasks (and
    # hive list, --status running too) read "running" for ever.
    task_id = await hive.submit("late2", "x")
    await hive.cancel(task_id)
    running = Running(task_id=task_id, provider="late2", at_ms=now_ms(), attempt=1, worker="w1")
    names = bus.names
    await bus.js.publish(
        names.event_subject("late2", task_id, "running"),
        encoder.encode(running),
        stream=names.events_stream_of("late2"),
    )
    assert (await hive.get(task_id)).status == "cancelled"
    (listed,) = [v for v in await hive.recent(provider="late2") if v.id == task_id]
    assert listed.status == "cancelled"
    assert [v.id for v in await hive.recent(status="running", provider="late2")] == []


async def test_cancelling_twice_is_harmless_and_after_the_end_is_refused(bus: Bus, hive: Hive) -> None:
    task_id = await hive.submit("later", "x")
    first = await hive.cancel(task_id)
    assert await hive.cancel(task_id) == first
    async with running_worker(bus, "echo", EchoProvider()):
        done = await hive.submit("echo", "hecho")
        assert (await hive.wait(done, 10)).status == "completed"
    with pytest.raises(TaskEnded, match=f"task {done} has already ended \\(completed\\)"):
        await hive.cancel(done)
    with pytest.raises(TaskNotFound):
        await hive.cancel("01JAAAAAAAAAAAAAAAAAAAAAAA")


async def test_bulk_cancel_by_provider_and_by_metadata(bus: Bus, hive: Hive) -> None:
    mine = [await hive.submit("bulk", f"p{i}", metadata={"batch": "b1"}) for i in range(3)]
    other = await hive.submit("bulk", "other", metadata={"batch": "b2"})
    elsewhere = await hive.submit("bulk2", "elsewhere", metadata={"batch": "b1"})
    cancelled = await hive.cancel_where(provider="bulk", metadata={"batch": "b1"})
    assert sorted(v.id for v in cancelled) == sorted(mine)
    assert (await hive.get(other)).status == "queued"
    assert (await hive.get(elsewhere)).status == "queued"
    assert [v.id for v in await hive.cancel_where(metadata={"batch": "b1"})] == [elsewhere]
    assert [v.id for v in await hive.cancel_where(provider="bulk")] == [other]
    assert await hive.cancel_where(provider="nobody-at-all") == []


@pytest.mark.parametrize("provider", ["*", ">", "a b", "a.b", ""])
async def test_bulk_cancel_of_a_provider_that_is_not_a_name_cancels_nothing(
    bus: Bus, hive: Hive, provider: str
) -> None:
    # "*" went into the subject filter as a wildcard, and "" named no provider: each cancelled every
    # provider's queued tasks ("hive cancel --provider '*'"); "a b" cancelled nothing, with exit status 0
    kept = [await hive.submit(name, "no me canceles") for name in ("wild1", "wild2")]
    with pytest.raises(HiveError, match="must be 1-64 letters, digits, '_' or '-'"):
        await hive.cancel_where(provider=provider)
    assert [(await hive.get(task_id)).status for task_id in kept] == ["queued", "queued"]
    if not provider:
        return  # hive cancel --provider '' names no tasks: a usage error of its own
    settings = bus.settings
    env = {"HIVE_PREFIX": settings.prefix, "HIVE_HEARTBEAT_INTERVAL_S": "0.5", "HIVE_HEARTBEAT_TTL_S": "1.5"}
    command = ["cancel", "--provider", provider, "--nats", settings.nats_url]
    done = await anyio.to_thread.run_sync(lambda: hive_cli(command, env=env))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == f"Error: provider {provider!r} must be 1-64 letters, digits, '_' or '-'"
    assert [(await hive.get(task_id)).status for task_id in kept] == ["queued", "queued"]


async def test_cancel_through_http_and_the_metrics_count_it(bus: Bus, hive: Hive) -> None:
    gateway = Gateway(hive, GatewayOptions(port=0))
    async with anyio.create_task_group() as tg:
        await tg.start(gateway.serve)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            task_id = (await http.post("/v1/tasks", json={"provider": "later", "prompt": "x"})).json()["id"]
            r = await http.post(f"/v1/tasks/{task_id}/cancel")
            assert (r.status_code, r.json()["status"]) == (200, "cancelled")
            assert (await http.post(f"/v1/tasks/{task_id}/cancel")).status_code == 200
            bad = await http.post("/v1/tasks/not-an-id/cancel")
            assert (bad.status_code, bad.json()["error"]["field"]) == (400, "task_id")
            async with running_worker(bus, "echo", EchoProvider()):
                done = (await http.post("/v1/tasks", json={"provider": "echo", "prompt": "y"})).json()["id"]
                await http.get(f"/v1/tasks/{done}", params={"wait": 10})
            ended = await http.post(f"/v1/tasks/{done}/cancel")
            assert (ended.status_code, ended.json()["error"]["code"]) == (409, "task_ended")

            await http.post("/v1/tasks", json={"provider": "later", "prompt": "z", "metadata": {"k": "v"}})
            bulk = await http.post("/v1/tasks/cancel", json={"metadata": {"k": "v"}})
            assert (bulk.status_code, len(bulk.json()["cancelled"])) == (200, 1)
            nothing = await http.post("/v1/tasks/cancel", json={})
            assert nothing.status_code == 400 and "give provider, metadata or both" in nothing.text

            async def counted() -> bool:
                text = (await http.get("/metrics")).text
                return 'hive_tasks_cancelled_total{provider="later",was="queued"} 2.0' in text

            await eventually(counted, 10, "the metrics to count the cancels")
        gateway.stop()


async def test_hive_cancel_on_the_command_line(bus: Bus, hive: Hive) -> None:
    settings = bus.settings
    env = {"HIVE_PREFIX": settings.prefix, "HIVE_HEARTBEAT_INTERVAL_S": "0.5", "HIVE_HEARTBEAT_TTL_S": "1.5"}
    task_id = await hive.submit("later", "x")
    done = hive_cli(["cancel", task_id, "--reason", "por CLI", "--nats", settings.nats_url], env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{task_id} cancelled (cancelled while queued)"
    again = hive_cli(["cancel", task_id, "--nats", settings.nats_url], env=env)
    assert again.returncode == 0
    await hive.submit("later", "y", metadata={"campaign": 7})
    bulk = hive_cli(["cancel", "--where", "campaign=7", "--nats", settings.nats_url], env=env)
    assert bulk.returncode == 0 and bulk.stderr.strip() == "1 cancelled", bulk.stderr
    status = hive_cli(["status", task_id, "--nats", settings.nats_url], env=env)
    assert status.returncode == 1  # cancelled is not completed


async def test_a_worker_lists_its_providers_cancels_and_looks_up_only_those_tasks(
    bus: Bus, hive: Hive
) -> None:
    """Once its subscription is surely live a worker lists its provider's keys in the cancels bucket: a
    task fetched after that is looked up only when its key was listed or heard since (a fresh worker on
    a deep queue looked up every task), and a task cancelled before the worker started still never
    runs though fetched after the listing."""
    calls: list[str] = []

    async def record(task: Task) -> str:
        calls.append(task.prompt or "")
        await anyio.sleep(float((task.payload or {}).get("delay_s", 0)))
        return "ran"

    slow = await hive.submit("listed", "slow", payload={"delay_s": 2.0})
    dropped = await hive.submit("listed", "dropped")
    kept = await hive.submit("listed", "kept")
    await hive.cancel(dropped)
    async with running_worker(bus, "listed", FunctionProvider(record), concurrency=1) as worker:
        await eventually(lambda: _true(worker.cancels._keys is not None), 5, "the keys listed")
        assert worker.cancels._keys == {dropped}
        assert (await hive.wait(kept, 10)).status == "completed"
    assert calls == ["slow", "kept"]
    assert (await hive.get(slow)).status == "completed"


async def test_cancels_go_on_when_the_cancels_bucket_is_full(bus: Bus, hive: Hive) -> None:
    """The cancels bucket keeps a word for each task cancelled, expired or replayed within the history's
    window (a week): a bus that ran long enough to fill it (about 44,000 such words in 8 MiB) refused
    every cancel after that with a 503, and every replay. It lets its oldest words go instead."""
    stream = f"KV_{bus.names.cancels_bucket}"
    config = (await bus.js.stream_info(stream)).config
    config.max_bytes = 4096  # about fifteen words: a bucket as full as a week of cancels leaves it
    await bus.js.update_stream(config)
    ids = [await hive.submit("full", f"tarea {i}") for i in range(40)]
    for task_id in ids:
        assert (await hive.cancel(task_id)).status == "cancelled"
    newest = await bus.cancels_kv.get(bus.names.cancel_key("full", ids[-1]))
    assert newest.value is not None and ids[-1].encode() in newest.value


async def test_a_cancels_bucket_made_before_is_given_room_and_lets_its_oldest_words_go(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A hub made before (its cancels bucket 8 MiB, refusing new words when full) gets the bucket's
    room and policy at its next start, so that it stops refusing cancels after a busy week; its log
    says so (it said the bucket 'keeps its own max_bytes=8388608', then changed it)."""
    before = KeyValueConfig(
        bucket=settings.names.cancels_bucket, history=1, ttl=settings.events_max_age_s,
        storage=StorageType.FILE, direct=True, max_bytes=BUCKET_MAX_BYTES, max_value_size=64 * 1024,
    )  # fmt: skip
    nc = await nats.connect(settings.nats_url)
    try:
        await nc.jetstream().create_key_value(before)
    finally:
        await nc.close()
    with caplog.at_level(logging.INFO, logger="hive_bus.bus"):
        async with open_bus(settings) as bus:
            config = (await bus.js.stream_info(f"KV_{bus.names.cancels_bucket}")).config
    assert (config.discard, config.max_bytes) == (DiscardPolicy.OLD, settings.cancels_max_bytes)
    said = [r.getMessage() for r in caplog.records if settings.names.cancels_bucket in r.getMessage()]
    room = size_text(settings.cancels_max_bytes)
    assert said == [f"bucket {settings.names.cancels_bucket} now lets its oldest words go, in {room}"]
