"""Cost that stays flat as work grows (issue 18, point 3; figures in bench/scale.py and bench/README.md).

The store audit compares counts first: a bus whose tasks stream holds every task the record says is
open is audited without reading the record or the queue task by task; only a shortfall makes it compare
ids, and that finds the lost task as before. The counts (the audit's and ``/v1/stats``' completed and
failed) are tallies that nats-server keeps as events are stored and age out, not counted anew at each
read."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from hive_bus import Hive, Task, TaskRequest
from hive_bus._audit import StoreAudit
from hive_bus._stats import ProviderStats
from hive_bus.bus import Bus
from hive_bus.workers.echo import EchoProvider

from .helpers import running_worker

pytestmark = pytest.mark.anyio

GRACE_S = 0.3


async def test_an_audit_with_nothing_missing_compares_counts_and_a_shortfall_compares_ids(
    bus: Bus, hive: Hive
) -> None:
    ids = await hive.submit_many([TaskRequest(provider="later", prompt=f"post {i}") for i in range(40)])
    done = await hive.submit_many([TaskRequest(provider="echo", prompt=f"done {i}") for i in range(10)])

    async with running_worker(bus, "echo", EchoProvider()):
        assert all([(await hive.wait(task_id, timeout_s=10)).status == "completed" for task_id in done])
    await anyio.sleep(GRACE_S + 0.1)
    audit = StoreAudit(bus, grace_s=GRACE_S, every_s=600)

    report = await audit.audit()
    # 50 queued, 10 completed: 40 open, and the stream holds all 40
    assert (report.compared, report.open, report.held, report.lost) == ("counts", 40, 40, 0)

    names = bus.names
    first = (await bus.js.stream_info(names.tasks_stream)).state.first_seq
    raw = await bus.js.get_msg(names.tasks_stream, first)
    gone = msgspec.json.decode(raw.data or b"", type=Task).id
    await bus.js.delete_msg(names.tasks_stream, first)  # what a damaged block does
    report = await audit.audit()
    assert (report.compared, report.open, report.held, report.lost, report.lost_ids) == (
        "ids",
        39,
        39,
        1,
        [gone],
    )
    assert gone in ids

    again = await audit.audit()  # the lost task's failed event closes it: the counts agree again
    assert (again.compared, again.open, again.held, again.lost, again.lost_total) == ("counts", 39, 39, 0, 1)


async def _echo_stats(hive: Hive) -> ProviderStats:
    [echo] = [s for s in await hive.stats() if s.provider == "echo"]
    return echo


async def test_stats_counts_are_tallies_that_follow_new_outcomes_and_removed_events(
    bus: Bus, hive: Hive
) -> None:
    names = bus.names
    async with running_worker(bus, "echo", EchoProvider()):
        for n in (3, 2):
            ids = await hive.submit_many([TaskRequest(provider="echo", prompt="p") for _ in range(n)])
            assert all([(await hive.wait(task_id, timeout_s=10)).status == "completed" for task_id in ids])
            if n == 3:
                assert (await _echo_stats(hive)).completed == 3
                # the count is kept by the server in a durable consumer that delivers nothing
                tally = await bus.js.consumer_info(
                    names.events_stream_of("echo"), names.tally("completed", "echo")
                )
                assert (tally.num_pending, tally.delivered.stream_seq if tally.delivered else 0) == (3, 0)
    assert (await _echo_stats(hive)).completed == 5  # outcomes stored after the tally was made count

    # an event leaving the stream (aged out of its window, or removed) leaves the count
    stream = names.events_stream_of("echo")
    last = await bus.js.get_last_msg(stream, names.event_subject("echo", ids[0], "completed"))
    assert last.seq is not None
    await bus.js.delete_msg(stream, last.seq)
    assert (await _echo_stats(hive)).completed == 4
