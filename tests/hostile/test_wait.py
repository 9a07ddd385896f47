"""Issue 12, point 11: ``Hive.wait`` sees a task's end at once, however the end's publish and storage
fall around the wait's start.

nats-server hands a message to the subjects' subscribers before the stream has stored it. A wait that
subscribed to the task's events and then read its last stored event missed an end published just before
its subscription and stored just after its read, and only found it on its re-read a second later (about
one round trip in a thousand in ``bench/throughput.py``). The test makes that window wide instead of
waiting for luck: a backlog of events in front of the end keeps the stream storing for tens of
milliseconds after every publish has reached the server, and each wait starts only once they all have.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

import nats
from hive_bus import Hive, TaskRequest
from hive_bus._embedded import NatsServer
from hive_bus._messages import Completed, Running, encoder, new_task_id, now_ms
from hive_bus.bus import Bus, open_bus

from ..conftest import make_settings
from ..helpers import eventually

BACKLOG = 20_000  # events stored in front of the end: several tens of ms of the server's work
TRIALS = 3
SLOW_S = 0.5  # a wait this long missed the end and found it by reading again


@pytest.fixture
async def roomy_bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    async with open_bus(make_settings(nats_server.url, events_max_bytes=64 * 1024**2)) as bus:
        yield bus


@pytest.mark.anyio
async def test_a_wait_sees_an_end_published_before_it_started_and_stored_after(roomy_bus: Bus) -> None:
    bus, hive = roomy_bus, Hive(roomy_bus)
    names = bus.names
    other = new_task_id()  # the backlog's events are another task's
    filler = encoder.encode(Running(task_id=other, provider="echo", at_ms=now_ms(), attempt=1, worker="w"))
    worker = await nats.connect(bus.settings.nats_url, name="a worker")
    slow: list[str] = []
    try:
        for trial in range(TRIALS):
            task_id = (await hive.submit_request(TaskRequest(provider="echo", prompt=f"trial {trial}"))).id
            for _ in range(BACKLOG):
                await worker.publish(names.event_subject("echo", other, "running"), filler)
            end = Completed(
                task_id=task_id, provider="echo", at_ms=now_ms(), attempt=1, worker="w", output="done"
            )
            await worker.publish(
                names.event_subject("echo", task_id, "completed"), encoder.encode(end),
                headers={"Nats-Msg-Id": f"{task_id}:final"},
            )  # fmt: skip
            await worker.flush()  # the server has every publish: the wait below starts after them all
            started = anyio.current_time()
            view = await hive.wait(task_id, timeout_s=5)
            took_s = anyio.current_time() - started
            assert view.status == "completed", f"trial {trial}: the wait gave {view.status!r}"
            if took_s >= SLOW_S:
                slow.append(f"trial {trial}: {took_s:.3f} s")
    finally:
        await worker.close()
    assert not slow, f"waits that missed the end and found it only by reading again: {slow}"

    # the waits share one consumer, the client's, and it goes with the client: many waits leave
    # nothing behind on the server
    async def consumers() -> int:
        return (await bus.js.stream_info(names.events_stream_of("echo"))).state.consumer_count

    assert await consumers() == 1
    await hive.close()

    async def no_consumer() -> bool:
        return await consumers() == 0

    await eventually(no_consumer, 5, "the waits' consumer to be deleted")
