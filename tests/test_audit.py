"""The store audit: an accepted task whose message went missing from the tasks stream (a damaged or
purged store) is found, recorded as failed with reason ``lost`` and dead-lettered. Its ``queued`` event
is the tasks stream's headers-only marker: what the task asked was in the message, so its dead letter
names it and cannot replay it (a task of an older bus, whose queued event carried it, replays). Tasks
in flight, still within the grace period or in the router's hands are left alone."""

from __future__ import annotations

from collections.abc import Iterable

import anyio
import msgspec
import pytest

from hive_bus import Failed, FunctionProvider, Hive, Task, TaskRequest
from hive_bus._audit import StoreAudit
from hive_bus._bus import ensure_events
from hive_bus._counts import unfetched_cancels
from hive_bus._dlq import NotReplayable
from hive_bus._embedded import NatsServer
from hive_bus._expiry import Timers
from hive_bus._messages import Moved, Queued, encoder, now_ms
from hive_bus._names import PRIORITIES
from hive_bus._router import Router
from hive_bus.bus import Bus, open_bus
from hive_bus.workers.echo import EchoProvider

from .conftest import make_settings
from .helpers import events_of, eventually, running_worker

pytestmark = pytest.mark.anyio

GRACE_S = 0.5


async def _sequences(bus: Bus) -> dict[str, int]:
    """Task id -> its message's sequence in the tasks stream."""
    names = bus.names
    state = (await bus.js.stream_info(names.tasks_stream)).state
    found = {}
    for seq in range(state.first_seq, state.last_seq + 1):
        raw = await bus.js.get_msg(names.tasks_stream, seq)
        found[msgspec.json.decode(raw.data or b"", type=Task).id] = seq
    return found


async def _last_failed(bus: Bus, task_id: str) -> Failed | None:
    events = await events_of(bus, task_id)
    return events[-1] if events and isinstance(events[-1], Failed) else None


async def _queued_as_before(bus: Bus, prompt: str) -> Task:
    """A "later" task's queued event with the task in it, as buses before one write per submission
    stored it, and no task message."""
    task = Task.from_request(TaskRequest(provider="later", prompt=prompt))
    queued = Queued(task_id=task.id, provider=task.provider, at_ms=task.submitted_at_ms, task=task)
    await ensure_events(bus, "later")
    await bus.js.publish(bus.names.event_subject("later", task.id, "queued"), encoder.encode(queued))
    return task


async def test_a_task_missing_from_the_stream_is_dead_lettered_as_lost(bus: Bus, hive: Hive) -> None:
    ids = await hive.submit_many([TaskRequest(provider="later", prompt=f"post {i}") for i in range(5)])
    seqs = await _sequences(bus)
    gone = ids[1], ids[3]
    for task_id in gone:  # what a damaged block does: the message is gone, nobody acked it
        await bus.js.delete_msg(bus.names.tasks_stream, seqs[task_id])

    # within the grace period: not yet (a long one here, however slow the machine makes the audit)
    audit = StoreAudit(bus, grace_s=60, every_s=600)
    early = await audit.audit()
    assert (early.open, early.held, early.lost) == (5, 0, 0), early
    audit.grace_s = GRACE_S
    await anyio.sleep(GRACE_S + 0.1)
    report = await audit.audit()
    assert (report.open, report.held, report.lost, report.lost_total) == (3, 3, 2, 2)
    assert sorted(report.lost_ids) == sorted(gone)

    for task_id in gone:
        failed = await _last_failed(bus, task_id)
        assert failed is not None and failed.reason == "lost"
        assert bus.names.tasks_stream in failed.error and "submit it again" in failed.error
        assert failed.task is None  # its content was in the message lost
        letter = await hive.dead_letter(task_id)
        assert letter.failed.reason == "lost"
        assert (await hive.get(task_id)).status == "failed"
    for task_id in set(ids) - set(gone):
        assert (await hive.get(task_id)).status == "queued"

    again = await audit.audit()
    assert (again.lost, again.lost_total) == (0, 2)  # recorded once
    assert [type(e) for e in await events_of(bus, gone[0])] == [Queued, Failed]

    with pytest.raises(NotReplayable, match="holds no task"):
        await hive.replay(gone[0])
    async with running_worker(bus, "later", EchoProvider()):
        done = [await hive.wait(task_id, timeout_s=10) for task_id in set(ids) - set(gone)]
    assert all(view.status == "completed" for view in done)
    assert (await hive.get(gone[1])).status == "failed"


async def test_a_lost_task_of_an_older_bus_replays(bus: Bus, hive: Hive) -> None:
    """A task whose queued event carries it (written before one write per submission): its dead letter
    holds it, and a replay queues it again."""
    task = await _queued_as_before(bus, "from before")
    audit = StoreAudit(bus, grace_s=0.2, every_s=600)
    await anyio.sleep(0.3)
    assert (await audit.audit()).lost_ids == [task.id]
    failed = await _last_failed(bus, task.id)
    assert failed is not None and failed.task is not None and f"hive dlq replay {task.id}" in failed.error
    await hive.replay(task.id)
    async with running_worker(bus, "later", EchoProvider()):
        assert (await hive.wait(task.id, timeout_s=10)).output == "from before"


async def test_tasks_in_flight_are_not_lost(bus: Bus, hive: Hive) -> None:
    """A task held by a worker (running, its message still in the stream until the ack) stays open."""
    ids = await hive.submit_many(
        [TaskRequest(provider="slow", prompt="slow", payload={"delay_s": 3}) for _ in range(2)]
    )
    async with running_worker(bus, "slow", EchoProvider(), concurrency=2):
        await anyio.sleep(GRACE_S + 0.5)
        report = await StoreAudit(bus, grace_s=GRACE_S, every_s=600).audit()
        assert (report.open, report.held, report.lost) == (2, 2, 0)
        views = [await hive.wait(task_id, timeout_s=10) for task_id in ids]
    assert [v.status for v in views] == ["completed", "completed"]


async def test_a_cut_off_submission_is_lost_only_after_the_grace_period(bus: Bus, hive: Hive) -> None:
    """A queued event whose task is not (yet) in the tasks stream is lost only once the grace period is
    over."""
    task = await _queued_as_before(bus, "cut off")

    audit = StoreAudit(bus, grace_s=1.0, every_s=600)
    assert (await audit.audit()).lost == 0
    await anyio.sleep(1.1)
    assert (await audit.audit()).lost_ids == [task.id]


async def _route_for(bus: Bus, seconds: float) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(Router(bus).run)
        await anyio.sleep(seconds)
        tg.cancel_scope.cancel()


async def test_a_moved_task_waits_for_the_router(bus: Bus, hive: Hive) -> None:
    names = bus.names
    await _route_for(bus, 0)  # the router's durable consumer exists, and keeps its place while it is down
    first = Task.from_request(TaskRequest(provider="spent", prompt="move me", fallback=["later"]))
    queued = Queued(task_id=first.id, provider=first.provider, at_ms=first.submitted_at_ms, task=first)
    await ensure_events(bus, "spent")
    await bus.js.publish(names.event_subject("spent", first.id, "queued"), encoder.encode(queued))
    moved = first.next_hop()
    assert moved is not None
    event = Moved(task_id=first.id, provider="spent", at_ms=now_ms(), worker="w", reason="quota", task=moved)
    await bus.js.publish(names.event_subject("spent", first.id, "moved"), encoder.encode(event))

    audit = StoreAudit(bus, grace_s=GRACE_S, every_s=600)
    await anyio.sleep(GRACE_S + 0.1)
    assert (await audit.audit()).lost == 0  # no router yet: the move is still to be queued

    await _route_for(bus, 1.0)
    report = await audit.audit()
    assert (report.held, report.lost) == (1, 0)  # queued on its next provider by the router


async def test_a_task_waiting_nearly_as_long_as_the_bus_keeps_tasks_expires_and_replays(
    nats_server: NatsServer,
) -> None:
    """The tasks stream keeps a task as long as the events (``max_age``): one that no worker takes in
    that time is failed ``expired`` and dead-lettered with its task before it would age out unseen; one
    that completed, and one submitted later, are left alone; a replay runs it."""
    settings = make_settings(nats_server.url, events_max_age_s=8.0, duplicate_window_s=4.0)
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        audit = StoreAudit(bus, grace_s=60, every_s=1.0)
        assert audit.ageing.limit_s == 6.0  # 8 s less two sweeps
        waiting = await hive.submit("nobody", "wait for me")
        done = await hive.submit("quick", "done at once")
        async with running_worker(bus, "quick", EchoProvider()):
            assert (await hive.wait(done, timeout_s=5)).status == "completed"
        await anyio.sleep(3.5)
        younger = await hive.submit("nobody", "younger")
        assert (await audit.audit()).expired == 0  # nothing has waited 6 s yet
        await anyio.sleep(3.0)
        report = await audit.audit()
        assert report.expired == 1
        view = await hive.get(waiting)
        assert (view.status, view.reason) == ("failed", "expired")
        assert "waited in the queue longer than 6s" in (view.error or ""), view.error
        assert (await hive.get(younger)).status == "queued"
        assert (await hive.get(done)).status == "completed"
        assert (await audit.audit()).expired == 0  # once
        # no worker was handed it: its message is out of the queue (its expiry keeps the task for a
        # replay), and out of the queue's depth at once (it stayed there until its age took it)
        assert not await _messages_of(bus, waiting)
        await eventually(lambda: _depth_is(hive, "nobody", 1), 5, "the younger task alone in the depth")
        await hive.replay(waiting)
        calls: list[str] = []

        async def echo(task: Task) -> str:
            calls.append(task.id)
            return task.prompt or ""

        async with running_worker(bus, "nobody", FunctionProvider(echo)):
            assert (await hive.wait(waiting, timeout_s=5)).output == "wait for me"
            assert (await hive.wait(younger, timeout_s=5)).output == "younger"
            # the expired run's message left the queue with the replay: the task was called for its
            # new run only (it was called for both, its expiry's key gone from the cancels bucket)
            await eventually(lambda: _queue_is_empty(bus, "nobody"), 5, "the queue to be empty")
        assert sorted(calls) == sorted([waiting, younger])
        await hive.close()


async def _depth_is(hive: Hive, provider: str, n: int) -> bool:
    return [s.pending for s in await hive.stats() if s.provider == provider] == [n]


async def _queue_is_empty(bus: Bus, provider: str) -> bool:
    names = bus.names
    infos = [await bus.js.consumer_info(names.tasks_stream, names.consumer(provider, p)) for p in PRIORITIES]
    return not any(i.num_pending or i.num_ack_pending for i in infos)


async def test_a_task_cancelled_while_queued_that_no_worker_fetches_leaves_the_queues_depth_right(
    nats_server: NatsServer,
) -> None:
    """A task cancelled while queued is taken off its queue's depth until a worker fetches it; one that
    no worker fetches is taken out by the sweep before it would age out, so that the depth does not
    hide a task queued later (it did: the count kept the aged-out task for good). Both for a provider
    whose workers have come and gone (its consumers exist) and one that never had a worker."""
    settings = make_settings(nats_server.url, events_max_age_s=8.0, duplicate_window_s=4.0)
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        audit = StoreAudit(bus, grace_s=60, every_s=1.0)
        first = await hive.submit("gone", "a worker was here")
        async with running_worker(bus, "gone", EchoProvider()):
            assert (await hive.wait(first, timeout_s=5)).status == "completed"
        cancelled = {p: await hive.submit(p, "cancelled unseen") for p in ("gone", "never")}
        for task_id in cancelled.values():
            await hive.cancel(task_id)
        assert await _depths(hive) == {"gone": 0, "never": 0}
        await anyio.sleep(6.5)  # past the sweep's limit (6 s), not yet the stream's age (8 s)
        await audit.audit()
        assert await unfetched_cancels(bus) == {"gone": 0, "never": 0}
        for task_id in cancelled.values():  # their messages are out of the tasks stream
            assert not await _messages_of(bus, task_id)
        assert {(await hive.get(t)).status for t in cancelled.values()} == {"cancelled"}
        await anyio.sleep(2.0)  # past the stream's age: nothing is left for the count to miss
        later = {p: await hive.submit(p, "queued later") for p in ("gone", "never")}
        # read once the submission counters say tasks were queued for them (within 0.25 s)
        await eventually(lambda: _depths_are(hive, {"gone": 1, "never": 1}), 5, "both later tasks queued")
        async with running_worker(bus, "gone", EchoProvider()):
            assert (await hive.wait(later["gone"], timeout_s=5)).status == "completed"
        assert await _depths(hive) == {"gone": 0, "never": 1}
        await hive.close()


async def test_a_task_expired_while_queued_that_no_worker_fetches_leaves_the_depth_right_and_replays(
    nats_server: NatsServer,
) -> None:
    """A task expired at its deadline while queued is taken off its queue's depth until a worker
    fetches it; one that no worker fetches is taken out by the sweep before it would age out (the count
    kept it for good, and the depth hid a task queued later), and a replay still queues what it asked,
    read from its expiry in the cancels bucket."""
    settings = make_settings(nats_server.url, events_max_age_s=10.0, duplicate_window_s=4.0)
    async with open_bus(settings) as bus, anyio.create_task_group() as tg:
        await tg.start(Timers(bus).run)
        hive = Hive(bus)
        audit = StoreAudit(bus, grace_s=60, every_s=2.0)
        assert audit.ageing.limit_s == 6.0  # 10 s less two sweeps
        first = await hive.submit("gone", "a worker was here")
        async with running_worker(bus, "gone", EchoProvider()):
            assert (await hive.wait(first, timeout_s=5)).status == "completed"
        expired = {p: await hive.submit(p, f"too late for {p}", deadline_s=1) for p in ("gone", "never")}
        submitted_s = anyio.current_time()
        await eventually(lambda: _all_failed(hive, expired.values()), 8, "the deadlines to end both tasks")
        await eventually(lambda: _depths_are(hive, {"gone": 0, "never": 0}), 5, "both off the depth")
        await anyio.sleep(submitted_s + 6.5 - anyio.current_time())  # past the sweep's limit, not the age
        await audit.audit()
        assert await unfetched_cancels(bus) == {"gone": 0, "never": 0}
        for task_id in expired.values():  # their messages are out of the tasks stream
            assert not await _messages_of(bus, task_id)
            view = await hive.get(task_id)
            assert (view.status, view.reason) == ("failed", "expired")
        calls: list[str] = []

        async def echo(task: Task) -> str:
            calls.append(task.id)
            return task.prompt or ""

        async with running_worker(bus, "never", FunctionProvider(echo)):
            await hive.replay(expired["never"])  # its message is gone: the task is its expiry's copy
            assert (await hive.wait(expired["never"], timeout_s=5)).output == "too late for never"
        assert calls == [expired["never"]]
        await anyio.sleep(submitted_s + 10.5 - anyio.current_time())  # past the stream's age
        for provider in ("gone", "never"):
            await hive.submit(provider, "queued later")
        await eventually(lambda: _depths_are(hive, {"gone": 1, "never": 1}), 5, "both later tasks queued")
        tg.cancel_scope.cancel()
        await hive.close()


async def _all_failed(hive: Hive, task_ids: Iterable[str]) -> bool:
    return {(await hive.get(t)).status for t in task_ids} == {"failed"}


async def _messages_of(bus: Bus, task_id: str) -> int:
    names = bus.names
    info = await bus.js.stream_info(names.tasks_stream, subjects_filter=names.task_subject("*", "*", task_id))
    return sum((info.state.subjects or {}).values())


async def _depths(hive: Hive) -> dict[str, int]:
    pending = {s.provider: s.pending for s in await hive.stats()}
    return {p: pending.get(p, 0) for p in ("gone", "never")}


async def _depths_are(hive: Hive, depths: dict[str, int]) -> bool:
    return await _depths(hive) == depths


async def test_finished_tasks_make_room_for_new_ones_once_the_tasks_stream_is_nearly_full(
    nats_server: NatsServer,
) -> None:
    """The tasks stream keeps finished tasks as history within its limits, and refuses new ones when
    full (nothing accepted may be dropped): a bus that finished a million tasks in a week (a soak at 25
    tasks a second got there in 11 hours) answered every submission with 503 queue_full while nothing
    waited. The store audit now lets the oldest finished tasks go past three quarters of a limit; they
    still read as they ended."""
    async with open_bus(make_settings(nats_server.url, tasks_max_msgs=20)) as bus:
        hive = Hive(bus)
        audit = StoreAudit(bus, grace_s=60, every_s=600)
        ids: list[str] = []
        async with running_worker(bus, "echo", EchoProvider()):
            for _ in range(4):  # 32 tasks through a stream of 20, an audit after each 8
                ids += [await hive.submit("echo", f"tarea {len(ids) + i}") for i in range(8)]
                for task_id in ids[-8:]:
                    assert (await hive.wait(task_id, 10)).status == "completed"
                await audit.audit()
        first = await hive.get(ids[0])
        assert (first.status, first.output) == ("completed", "tarea 0")
        await hive.close()
