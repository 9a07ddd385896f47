"""The submission counters (hive_bus._counts): every submitter adds the tasks JetStream accepted to
counters on the bus, each task once, and nothing it counted is lost to a failed publish."""

from __future__ import annotations

import anyio
import pytest

import hive_bus
from hive_bus import Hive, QueueFull, Settings, TaskRequest
from hive_bus._counts import SubmissionCounts, submitted_counts
from hive_bus._embedded import NatsServer
from hive_bus.bus import Bus, open_bus

from .conftest import make_settings
from .helpers import eventually

pytestmark = pytest.mark.anyio


async def counts_reach(bus: Bus, want: dict[str, int]) -> dict[str, int]:
    async def probe() -> dict[str, int] | None:
        counts = await submitted_counts(bus)
        return counts if counts == want else None

    return await eventually(probe, 5, f"the submission counters to read {want}")


async def test_every_submitter_adds_to_the_same_counters(bus: Bus, hive: Hive, settings: Settings) -> None:
    async with hive_bus.connect(settings=settings) as other:
        await hive.submit("echo", "one")
        requests = [TaskRequest(provider="echo", prompt=f"b{i}") for i in range(10)]
        outcomes = await other.submit_batch([*requests, TaskRequest(provider="groq", prompt="c")])
        assert all(isinstance(o, hive_bus.Accepted) for o in outcomes)
        await other.submit_many([TaskRequest(provider="groq", prompt=f"m{i}") for i in range(3)])
    await counts_reach(bus, {"echo": 11, "groq": 4})


async def test_a_task_counts_once_and_only_once_accepted(nats_server: NatsServer) -> None:
    async with open_bus(make_settings(nats_server.url, tasks_max_msgs=3)) as bus:
        hive = Hive(bus)
        await hive.submit("echo", "keyed", idempotency_key="k1")
        again = await hive.submit_request(TaskRequest(provider="echo", prompt="keyed", idempotency_key="k1"))
        assert again.duplicate
        outcomes = await hive.submit_batch([TaskRequest(provider="echo", prompt=f"b{i}") for i in range(4)])
        accepted = [o for o in outcomes if isinstance(o, hive_bus.Accepted)]
        assert len(accepted) == 2 and sum(isinstance(o, QueueFull) for o in outcomes) == 2
        with pytest.raises(QueueFull):
            await hive.submit("echo", "no room")
        await hive.close()
        await counts_reach(bus, {"echo": 3})


async def test_counts_wait_out_an_outage(own_server: NatsServer) -> None:
    async with open_bus(make_settings(own_server.url)) as bus:
        counts = SubmissionCounts(bus, flush_s=0.05)
        counts.add("echo", 1)
        await eventually(lambda: _flushed(counts), 5, "the first count to be published")
        own_server.stop()
        counts.add("echo", 2)
        counts.add("groq", 1)
        await anyio.sleep(0.5)  # tries made meanwhile fail: the counts stay
        assert counts.pending == 3
        own_server.start()  # same port and store: the client reconnects
        await eventually(lambda: _flushed(counts), 15, "the counts to be published after the outage")
        assert await submitted_counts(bus) == {"echo": 3, "groq": 1}
        await counts.close()


async def test_a_removed_counters_stream_is_made_again(bus: Bus, hive: Hive) -> None:
    await hive.submit("echo", "first")
    await counts_reach(bus, {"echo": 1})
    await bus.js.delete_stream(bus.names.counters_stream)  # an operator removed it
    counts = SubmissionCounts(bus, flush_s=0.05)
    counts.add("echo", 2)
    # the next publish finds no stream: the stream is declared again and the count goes into it
    await eventually(lambda: _flushed(counts), 5, "the pending counts to be published")
    assert await submitted_counts(bus) == {"echo": 2}
    await counts.close()


async def test_a_client_publishes_what_is_left_when_it_closes(bus: Bus, settings: Settings) -> None:
    async with hive_bus.connect(settings=settings) as client:
        for i in range(5):  # after the first, they wait for the next flush
            await client.submit("echo", f"t{i}")
    assert await submitted_counts(bus) == {"echo": 5}  # no wait: close() published them


async def _flushed(counts: SubmissionCounts) -> bool:
    return counts.pending == 0
