"""Submitting through the Python client and completing through workers, with a real nats-server."""

from __future__ import annotations

import os

import anyio
import msgspec
import pytest

from hive_bus import (
    Completed,
    FunctionProvider,
    Hive,
    PartialSubmit,
    Queued,
    Retrying,
    Running,
    Task,
    TaskNotFound,
    TaskRequest,
    TaskView,
    TooLarge,
    Worker,
)
from hive_bus._embedded import NatsServer
from hive_bus._messages import is_task_id
from hive_bus._providers import load_handler
from hive_bus.bus import Bus, open_bus
from hive_bus.workers.echo import EchoProvider

from . import handlers
from .conftest import make_settings
from .helpers import events_of, eventually, running_worker, stream_messages, unacked

pytestmark = pytest.mark.anyio


async def test_submit_and_complete_through_the_client(bus: Bus, hive: Hive) -> None:
    async with running_worker(bus, "echo", EchoProvider()):
        task_id = await hive.submit("echo", "Escribe un tuit sobre el café", metadata={"batch": "b1"})
        view = await hive.wait(task_id, timeout_s=10)
    assert is_task_id(task_id)
    assert view.status == "completed"
    assert view.output == "Escribe un tuit sobre el café"
    assert view.attempt == 1
    assert view.usage is not None and view.usage.input_tokens == 6  # words
    assert view.submitted_at_ms is not None and view.started_at_ms is not None and view.call_s is not None
    assert view.submitted_at_ms <= view.started_at_ms <= view.updated_at_ms
    assert 0 <= view.call_s < 1
    kinds = [type(e) for e in await events_of(bus, task_id)]
    assert kinds == [Queued, Completed]  # too quick for a running event; the completed one says when it ran
    assert await unacked(bus) == 0  # acked: the stream keeps it as history


async def test_ids_sort_by_submission_time(hive: Hive) -> None:
    ids = [await hive.submit("nobody", f"p{i}") for i in range(5)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5


async def test_queued_task_waits_for_a_worker(bus: Bus, hive: Hive) -> None:
    task_id = await hive.submit("later", "hello")
    view = await hive.wait(task_id, timeout_s=0.5)
    assert view.status == "queued"
    async with running_worker(bus, "later", EchoProvider()):
        view = await hive.wait(task_id, timeout_s=10)
    assert view.status == "completed"


async def test_get_of_unknown_or_malformed_id(hive: Hive) -> None:
    with pytest.raises(TaskNotFound, match="no task"):
        await hive.get("01JAAAAAAAAAAAAAAAAAAAAAAA")
    with pytest.raises(TaskNotFound, match="not a task id"):
        await hive.get("hive.events.>")
    for bad in (">", "*", "a b", "x\r"):  # never a wildcard or a broken subject
        with pytest.raises(TaskNotFound, match="not a task id"):
            await hive.wait(bad, 1)


async def test_idempotent_resubmission_returns_the_first_id_and_runs_once(bus: Bus, hive: Hive) -> None:
    first = await hive.submit("echo", "one post", idempotency_key="post-42")
    again = await hive.submit("echo", "one post", idempotency_key="post-42")
    other = await hive.submit("echo", "one post", idempotency_key="post-43")
    assert again == first
    assert other != first
    assert await stream_messages(bus, bus.names.tasks_stream) == 2
    async with running_worker(bus, "echo", EchoProvider()):
        assert (await hive.wait(first, 10)).status == "completed"
        assert (await hive.wait(other, 10)).status == "completed"
    # resubmitted after it completed, still inside the window: same id, and not run again
    assert await hive.submit("echo", "one post", idempotency_key="post-42") == first
    assert await unacked(bus) == 0
    completed = [e for e in await events_of(bus, first) if isinstance(e, Completed)]
    assert len(completed) == 1


async def test_submit_many_and_results_in_completion_order(bus: Bus, hive: Hive) -> None:
    requests = [TaskRequest(provider="echo", prompt=f"post {i}") for i in range(50)]
    ids = await hive.submit_many(requests)
    assert len(ids) == 50
    seen: dict[str, str] = {}
    async with running_worker(bus, "echo", EchoProvider(), concurrency=8):
        with anyio.fail_after(20):
            async for view in hive.results(ids):
                seen[view.id] = view.output
    assert seen == {task_id: f"post {i}" for i, task_id in enumerate(ids)}


async def test_submit_many_checks_every_request_before_queueing_any(bus: Bus, hive: Hive) -> None:
    requests = [TaskRequest(provider="echo", prompt="fine"), TaskRequest(provider="echo", prompt="   ")]
    with pytest.raises(msgspec.ValidationError, match=r"task 1: .*\$\.prompt"):
        await hive.submit_many(requests)
    with pytest.raises(msgspec.ValidationError, match="provider"):
        await hive.submit("bad.name", "hi")
    assert await unacked(bus) == 0


async def test_submit_many_queues_the_rest_and_names_each_task_it_could_not(nats_server: NatsServer) -> None:
    requests = [TaskRequest(provider="echo", prompt=f"post {i}") for i in range(100)]
    requests[37] = TaskRequest(provider="echo", prompt="x" * 5000)  # over the bus's 4 KB limit
    requests[80] = requests[81] = TaskRequest(provider="echo", prompt="same", idempotency_key="k")
    settings = make_settings(nats_server.url, claim_check_bytes=1024, blob_max_bytes=4096)
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        with pytest.raises(PartialSubmit) as caught:
            await hive.submit_many(requests, window=16)
        ids = caught.value.ids
        assert list(caught.value.errors) == [37]
        assert isinstance(caught.value.errors[37], TooLarge)
        assert "over the bus's limit of 4096 bytes" in str(caught.value)
        assert ids[37] is None and ids[81] == ids[80]  # the key's first task
        accepted = [task_id for task_id in ids if task_id is not None]
        assert len(accepted) == 99 and len(set(accepted)) == 98
        assert await stream_messages(bus, bus.names.tasks_stream) == 98
        async with running_worker(bus, "echo", EchoProvider(), concurrency=8):
            with anyio.fail_after(20):
                done = {view.id: view.output async for view in hive.results(accepted)}
        await hive.close()
    assert done == {ids[i]: r.prompt for i, r in enumerate(requests) if i != 37}


async def test_a_client_that_remembers_none_of_its_tasks_still_reads_their_ends(bus: Bus, hive: Hive) -> None:
    hive.remember_own(0)  # every read goes the way another client's would: markers, look-ups
    ids = await hive.submit_many([TaskRequest(provider="echo", prompt=f"post {i}") for i in range(20)])
    async with running_worker(bus, "echo", EchoProvider(), concurrency=4):
        with anyio.fail_after(20):
            done = {view.id: view.output async for view in hive.results(ids)}
            assert (await hive.wait(ids[0], 10)).output == "post 0"
    assert done == {task_id: f"post {i}" for i, task_id in enumerate(ids)}


async def test_results_without_ids_follows_new_tasks(bus: Bus, hive: Hive) -> None:
    got: list[str] = []

    async def follow() -> None:
        async for view in hive.results(provider="echo"):
            got.append(view.output)
            if len(got) == 3:
                return

    async with running_worker(bus, "echo", EchoProvider()), anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await anyio.sleep(0.3)
        for i in range(3):
            await hive.submit("echo", f"live {i}")
        await eventually(lambda: _true(len(got) == 3), 10, "three results")
    assert sorted(got) == ["live 0", "live 1", "live 2"]


async def test_custom_handler_runs_a_list_of_actions(bus: Bus, hive: Hive) -> None:
    provider = load_handler("tests.handlers:actions")
    async with running_worker(bus, "wallet", provider):
        task_id = await hive.submit(
            "wallet", "run the payout", payload=["check_balance", "send_coins", "verify_tx"]
        )
        view = await hive.wait(task_id, 10)
    assert view.status == "completed"
    assert [r["action"] for r in view.output["results"]] == ["check_balance", "send_coins", "verify_tx"]


async def test_transient_error_is_retried_then_completes(bus: Bus, hive: Hive) -> None:
    async with running_worker(bus, "flaky", FunctionProvider(handlers.flaky), backoff_base_s=0.2):
        task_id = await hive.submit("flaky", "retry me")
        view = await hive.wait(task_id, 10)
    assert view.status == "completed"
    assert view.output == "RETRY ME"
    assert view.attempt == 2
    events = await events_of(bus, task_id)
    retrying = [e for e in events if isinstance(e, Retrying)]
    assert len(retrying) == 1
    assert retrying[0].reason == "transient"
    assert retrying[0].error == "upstream answered 503"
    assert retrying[0].next_try_at_ms > retrying[0].at_ms


async def test_retrying_status_says_why_and_when(bus: Bus, hive: Hive) -> None:
    async with running_worker(bus, "down", FunctionProvider(handlers.always_down), backoff_base_s=30):
        task_id = await hive.submit("down", "x")

        async def retrying() -> TaskView | None:
            view = await hive.get(task_id)
            return view if view.status == "retrying" else None

        view = await eventually(retrying, 10, "the retrying status")
    assert view.error == "upstream answered 503"
    assert view.reason == "transient"
    assert view.next_try_at_ms is not None and view.next_try_at_ms > view.updated_at_ms + 10_000


async def test_permanent_error_fails_at_once_with_its_message(bus: Bus, hive: Hive) -> None:
    async with running_worker(bus, "strict", FunctionProvider(handlers.refuse)):
        task_id = await hive.submit("strict", "x", max_attempts=5)
        view = await hive.wait(task_id, 10)
    assert view.status == "failed"
    assert view.reason == "permanent"
    assert view.error == "provider said 400: the prompt is not allowed"
    assert view.attempt == 1
    assert await unacked(bus) == 0  # terminated, not redelivered


async def test_out_of_attempts_fails_with_the_last_error(bus: Bus, hive: Hive) -> None:
    async with running_worker(bus, "down", FunctionProvider(handlers.always_down), backoff_base_s=0.05):
        task_id = await hive.submit("down", "x", max_attempts=3)
        view = await hive.wait(task_id, 10)
    assert view.status == "failed"
    assert view.reason == "out_of_attempts"
    assert view.attempt == 3
    assert "upstream answered 503" in (view.error or "")


async def test_output_that_is_not_json_fails_clearly(bus: Bus, hive: Hive) -> None:
    async with running_worker(bus, "odd", FunctionProvider(handlers.not_json)):
        view = await hive.wait(await hive.submit("odd", "x"), 10)
    assert view.status == "failed"
    assert "not JSON-serializable" in (view.error or "")


async def test_output_with_a_string_that_is_not_unicode_fails_clearly_once(bus: Bus, hive: Hive) -> None:
    calls: list[str] = []

    async def lists_files(task: Task) -> dict[str, list[str]]:
        calls.append(task.id)
        return {"files": [os.fsdecode(b"informe-\xff.txt")]}  # a lone surrogate, as os.listdir gives it

    async with running_worker(bus, "files", FunctionProvider(lists_files)):
        view = await hive.wait(await hive.submit("files", "x"), 10)
    assert (view.status, view.reason, view.attempt) == ("failed", "permanent", 1)
    assert view.error == (
        "the output of files is not JSON-serializable: 'utf-8' codec can't encode character '\\udcff' in "
        "position 8: surrogates not allowed"
    )
    assert len(calls) == 1


async def test_an_error_with_a_string_that_is_not_unicode_is_recorded_with_its_escape(
    bus: Bus, hive: Hive
) -> None:
    async def reads_report(task: Task) -> str:
        raise FileNotFoundError(os.fsdecode(b"no informe-\xff.txt"))

    async with running_worker(bus, "reports", FunctionProvider(reads_report)):
        view = await hive.wait(await hive.submit("reports", "x", max_attempts=1), 10)
    assert (view.status, view.reason) == ("failed", "out_of_attempts")
    assert view.error == "out of attempts (1); last error: FileNotFoundError: no informe-\\udcff.txt"


async def test_undecodable_task_message_is_terminated_and_the_worker_goes_on(bus: Bus, hive: Hive) -> None:
    names = bus.names
    async with running_worker(bus, "echo", EchoProvider()):
        await bus.js.publish(names.task_subject("echo", "normal", "poison"), b"\xff not json")
        await bus.js.publish(
            names.task_subject("echo", "normal", "poison2"), msgspec.json.encode({"type": "task.v1", "id": 7})
        )
        task_id = await hive.submit("echo", "still working")
        assert (await hive.wait(task_id, 10)).output == "still working"
        await eventually(lambda: _all_acked(bus), 5, "every task acked")
    failed = []
    sub = await bus.js.subscribe(f"{names.prefix}.events.echo.*.failed", ordered_consumer=True)
    while True:
        try:
            msg = await sub.next_msg(timeout=0.5)
        except TimeoutError:
            break
        event = msgspec.json.decode(msg.data)
        if event["type"] == "failed.v1":
            failed.append(event)
    await sub.unsubscribe()
    assert len(failed) == 2
    assert all(f["reason"] == "undecodable" for f in failed)
    assert "is not a valid task" in failed[0]["error"]


async def test_long_call_is_kept_alive_and_delivered_once(
    nats_server_settings_short_ack: tuple[Bus, Hive],
) -> None:
    bus, hive = nats_server_settings_short_ack
    async with running_worker(bus, "slow", FunctionProvider(handlers.slow)):
        task_id = await hive.submit("slow", "x", payload={"delay_s": 3.5})  # 3.5x AckWait
        view = await hive.wait(task_id, 15)
    assert view.status == "completed"
    running = [e for e in await events_of(bus, task_id) if isinstance(e, Running)]
    assert len(running) == 1, "redelivered although in-progress acks were sent"


async def test_a_call_that_lasts_is_seen_running(bus: Bus, hive: Hive) -> None:
    async with running_worker(bus, "slow", FunctionProvider(handlers.slow)) as worker:
        task_id = await hive.submit("slow", "x", payload={"delay_s": 1.5})

        async def running() -> TaskView | None:
            view = await hive.get(task_id)
            return view if view.status == "running" else None

        view = await eventually(running, 1.2, "the running status")
        assert (view.worker, view.attempt) == (worker.id, 1)
        assert (await hive.wait(task_id, 5)).status == "completed"
    assert [type(e) for e in await events_of(bus, task_id)] == [Queued, Running, Completed]


async def test_drain_finishes_in_flight_work(bus: Bus, hive: Hive) -> None:
    async with running_worker(bus, "slow", FunctionProvider(handlers.slow)) as worker:
        task_id = await hive.submit("slow", "x", payload={"delay_s": 1.0})
        await eventually(lambda: _in_flight(worker), 5, "the task to start")
    # leaving the block stopped the worker; it finished the call before returning
    view = await hive.get(task_id)
    assert view.status == "completed"


async def test_drain_timeout_hands_the_task_back_at_once(bus: Bus, hive: Hive) -> None:
    slow = FunctionProvider(handlers.slow)
    async with running_worker(bus, "slow", slow, drain_timeout_s=0.2) as worker:
        task_id = await hive.submit("slow", "x", payload={"delay_s": 60})
        await eventually(lambda: _in_flight(worker), 5, "the task to start")
    # NAKed without delay: another worker has it long before AckWait (30 s) would have passed
    assert bus.settings.ack_wait_s >= 30
    async with running_worker(bus, "slow", FunctionProvider(handlers.quick)):
        with anyio.fail_after(5):
            view = await hive.wait(task_id, 5)
    assert view.status == "completed"
    assert view.attempt == 2


async def test_heartbeat_appears_and_leaves_with_the_worker(bus: Bus, hive: Hive) -> None:
    async with running_worker(bus, "echo", EchoProvider(), concurrency=3) as worker:
        beats = await eventually(hive.workers, 5, "a heartbeat")
        assert [b.worker_id for b in beats] == [worker.id]
        beat = beats[0]
        assert (beat.provider, beat.concurrency, beat.state) == ("echo", 3, "running")
        assert beat.pid > 0 and beat.host and beat.version
    assert await hive.workers() == []  # a clean stop removes its key at once


async def test_a_worker_given_an_id_is_listed_under_its_provider(bus: Bus, hive: Hive) -> None:
    # a heartbeat counts only for the provider its key names: an id given is its key's last part
    async with running_worker(bus, "echo", EchoProvider(), worker_id="pi 4/kitchen") as worker:
        beats = await eventually(hive.workers, 5, "a heartbeat")
    assert worker.id == "echo.pi-4-kitchen"
    assert [b.worker_id for b in beats] == [worker.id]


async def test_a_heartbeat_that_does_not_decode_hides_no_other_worker(bus: Bus, hive: Hive) -> None:
    await bus.workers_kv.put("stranger", b"{}")
    async with running_worker(bus, "echo", EchoProvider()) as worker:
        beats = await eventually(hive.workers, 5, "a heartbeat")
    assert [b.worker_id for b in beats] == [worker.id]


@pytest.fixture
async def nats_server_settings_short_ack(nats_server: object) -> object:
    from hive_bus.bus import open_bus

    from .conftest import make_settings

    settings = make_settings(nats_server.url, ack_wait_s=1.0)  # type: ignore[attr-defined]
    async with open_bus(settings) as bus:
        yield bus, Hive(bus)


async def _true(value: bool) -> bool:
    return value


async def _in_flight(worker: Worker) -> bool:
    return worker.in_flight > 0


async def _all_acked(bus: Bus) -> bool:
    return await unacked(bus) == 0
