"""Cost that stays flat as work grows (issue 18, point 3; figures in bench/scale.py and bench/README.md).

The store audit compares counts first: a bus whose tasks stream holds every task the record says is
open is audited without reading the record or the queue task by task; only a shortfall makes it compare
ids, and that finds the lost task as before."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from hive_bus import Hive, Task, TaskRequest
from hive_bus._audit import StoreAudit
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
