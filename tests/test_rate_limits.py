"""Rate limits are waited out together: a shared cooldown, and waits that never use up attempts."""

from __future__ import annotations

import math

import anyio
import pytest

from hive_bus import FunctionProvider, Hive, Retrying, TaskRequest, TaskView
from hive_bus.bus import Bus

from .handlers import WindowLimit
from .helpers import events_of, eventually, running_worker

pytestmark = pytest.mark.anyio


async def test_waiting_out_a_rate_limit_does_not_use_up_attempts(bus: Bus, hive: Hive) -> None:
    limit = WindowLimit(limit=1, window_s=0.5)
    async with running_worker(bus, "tight", FunctionProvider(limit), concurrency=4):
        ids = await hive.submit_many(
            [TaskRequest(provider="tight", prompt=f"p{i}", max_attempts=1) for i in range(4)]
        )
        views = {}
        with anyio.fail_after(20):
            async for view in hive.results(ids):
                views[view.id] = view
    assert [views[i].status for i in ids] == ["completed"] * 4
    assert all(views[i].attempt == 1 for i in ids)  # every wait was a wait, not an attempt
    waited = [e for i in ids for e in await events_of(bus, i) if isinstance(e, Retrying)]
    assert waited and all(e.reason == "rate_limit" for e in waited)
    assert max(e.waits for e in waited) >= 1


async def test_a_rate_limited_task_says_why_and_when(bus: Bus, hive: Hive) -> None:
    limit = WindowLimit(limit=1, window_s=30)
    async with running_worker(bus, "tight", FunctionProvider(limit)):
        first = await hive.submit("tight", "goes through")
        second = await hive.submit("tight", "waits")
        assert (await hive.wait(first, 10)).status == "completed"

        async def retrying() -> TaskView | None:
            view = await hive.get(second)
            return view if view.status == "retrying" else None

        view = await eventually(retrying, 10, "the second task to wait")
    assert view.reason == "rate_limit"
    assert "per-minute" in (view.error or "") or "limit of 1 per 30" in (view.error or "")
    assert view.next_try_at_ms is not None and view.next_try_at_ms - view.updated_at_ms > 20_000


async def test_the_cooldown_is_shared_by_every_worker_of_a_provider(bus: Bus, hive: Hive) -> None:
    limit = WindowLimit(limit=4, window_s=1.0)
    provider = FunctionProvider(limit)
    ids = await hive.submit_many([TaskRequest(provider="shared", prompt=f"p{i}") for i in range(20)])
    outputs: dict[str, str] = {}
    started = anyio.current_time()
    async with (
        running_worker(bus, "shared", provider, concurrency=1),
        running_worker(bus, "shared", provider, concurrency=1),
        running_worker(bus, "shared", provider, concurrency=1),
    ):
        with anyio.fail_after(30):
            async for view in hive.results(ids):
                outputs[view.id] = view.output
    assert outputs == {task_id: f"done: p{i}" for i, task_id in enumerate(ids)}
    windows = math.ceil(anyio.current_time() - started)  # 1 s windows
    # Without the shared cooldown every worker keeps calling through each window (dozens of 429s);
    # with it, the calls already in flight when the limit is hit are all that can run into it.
    assert limit.rate_limited <= 3 * windows, f"{limit.rate_limited} 429s over {windows} windows"
    # the record tells real 429s from hand-backs that a holding cooldown spared a call
    waits = [e for task_id in ids for e in await events_of(bus, task_id) if isinstance(e, Retrying)]
    assert sum(1 for e in waits if e.called) == limit.rate_limited
