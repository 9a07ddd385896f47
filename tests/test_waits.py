"""``Hive.wait`` on the client's one follower of the events stream (``hive_bus/_waits.py``): many waits,
one consumer; a task this client queued is waited on without a read when nothing has ended it yet,
and an end stored before the wait started is still seen at once."""

from __future__ import annotations

import anyio
import pytest

from hive_bus import Hive, TaskRequest
from hive_bus._messages import Completed, encoder, now_ms
from hive_bus.bus import Bus

pytestmark = pytest.mark.anyio

SOON_S = 2.0  # well under the wait's re-read (5 s) and its timeout: an end seen from the follower


async def _complete(bus: Bus, task_id: str, provider: str, output: str) -> None:
    """What a worker of ``provider`` records for the task (or forges, under another provider)."""
    done = Completed(task_id=task_id, provider=provider, at_ms=now_ms(), attempt=1, worker="w", output=output)
    await bus.js.publish(bus.names.event_subject(provider, task_id, "completed"), encoder.encode(done))


async def _followed(bus: Bus, hive: Hive) -> None:
    """Start the client's follower: a wait on a task ended while it waits."""
    first = (await hive.submit_request(TaskRequest(provider="echo", prompt="first"))).id
    async with anyio.create_task_group() as tg:
        tg.start_soon(hive.wait, first, 10.0)
        await anyio.sleep(0.2)
        await _complete(bus, first, "echo", "one")


async def test_many_waits_share_one_consumer_and_see_ends_stored_before_them(bus: Bus, hive: Hive) -> None:
    await _followed(bus, hive)
    ids = [(await hive.submit_request(TaskRequest(provider="echo", prompt=f"p{i}"))).id for i in range(20)]
    for task_id in ids[:10]:  # ended before anyone waits: the follower has them before the waits
        await _complete(bus, task_id, "echo", f"out {task_id}")
    await anyio.sleep(0.3)
    views = {}

    async def wait(task_id: str) -> None:
        views[task_id] = await hive.wait(task_id, 30.0)

    with anyio.fail_after(SOON_S * 3):
        async with anyio.create_task_group() as tg:
            for task_id in ids:
                tg.start_soon(wait, task_id)
            await anyio.sleep(0.3)
            assert (await bus.js.stream_info(bus.names.events_stream_of("echo"))).state.consumer_count == 1
            for task_id in ids[10:]:  # ended while waited on
                await _complete(bus, task_id, "echo", f"out {task_id}")
    assert {t: (v.status, v.output) for t, v in views.items()} == {t: ("completed", f"out {t}") for t in ids}


async def test_a_forged_end_stored_before_the_wait_does_not_end_it(bus: Bus, hive: Hive) -> None:
    await _followed(bus, hive)
    task_id = (await hive.submit_request(TaskRequest(provider="gemini", prompt="real"))).id
    await _complete(bus, task_id, "echo", "forged")  # another provider's credential, before the wait
    await anyio.sleep(0.3)  # the follower has it
    view = await hive.wait(task_id, 0.5)
    assert (view.status, view.provider) == ("queued", "gemini")
    async with anyio.create_task_group() as tg:
        tg.start_soon(_complete, bus, task_id, "gemini", "real")
        with anyio.fail_after(SOON_S):
            view = await hive.wait(task_id, 10.0)
    assert (view.status, view.output) == ("completed", "real")


async def test_an_outcome_whose_body_names_another_task_counts_for_neither(bus: Bus, hive: Hive) -> None:
    own = await hive.submit("echo", "echo's own task")
    other = await hive.submit("gemini", "gemini's task")
    # echo's credential, under its own task's subject, with a body naming gemini's task
    forged = Completed(task_id=other, provider="echo", at_ms=now_ms(), attempt=1, worker="m", output="forged")
    await bus.js.publish(bus.names.event_subject("echo", own, "completed"), encoder.encode(forged))
    await _complete(bus, other, "gemini", "real")
    await _complete(bus, own, "echo", "own")
    with anyio.fail_after(SOON_S * 3):
        seen = [(v.id, v.output) async for v in hive.results([own, other])]
    assert sorted(seen) == sorted([(own, "own"), (other, "real")])
    assert (await hive.wait(other, 1.0)).output == "real"
