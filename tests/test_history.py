"""The last hour's figures behind the dashboard's charts (GET /v1/stats/history): read from the bus,
so a gateway started later shows what one that watched it all shows; queue depths worked back from
the depth now; memory bounded to the hour. And a task's timeline (GET /v1/tasks/{id}/timeline), which
the dashboard's task story reads."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from hive_bus import FailNow, FunctionProvider, Hive, Settings, Task
from hive_bus._messages import now_ms
from hive_bus.bus import Bus, open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.services.history import MINUTE_MS, History
from hive_bus.workers.echo import EchoProvider

from .helpers import eventually, running_worker

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def serving(bus: Bus) -> AsyncIterator[httpx.AsyncClient]:
    gw = Gateway(Hive(bus), GatewayOptions(port=0))
    async with anyio.create_task_group() as tg:
        await tg.start(gw.serve)
        async with httpx.AsyncClient(base_url=gw.url, timeout=40) as http:
            yield http
        gw.stop()


async def history(http: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    r = await http.get("/v1/stats/history", params=params)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def test_a_gateway_started_later_shows_the_hour_the_first_one_watched(settings: Settings) -> None:
    async def sometimes(task: Task) -> str:
        if task.prompt.startswith("mal"):
            raise FailNow("no template")
        return task.prompt

    async with (
        open_bus(settings) as bus,
        running_worker(bus, "echo", EchoProvider()),
        running_worker(bus, "sometimes", FunctionProvider(sometimes)),
        serving(bus) as first,
    ):
        ids = [
            (await first.post("/v1/tasks", json={"provider": "echo", "prompt": f"p{i}"})).json()["id"]
            for i in range(5)
        ]
        ids += [(await first.post("/v1/tasks", json={"provider": "sometimes", "prompt": "mal"})).json()["id"]]
        for task_id in ids:
            await first.get(f"/v1/tasks/{task_id}", params={"wait": 20})
        for _ in range(3):
            r = await first.post("/v1/tasks", json={"provider": "nobody", "prompt": "waits"})
            assert r.status_code == 202, r.text

        async def counted() -> dict[str, Any] | None:
            seen = await history(first)
            return seen if sum(seen["completed"]) == 5 and sum(seen["failed"]) == 1 else None

        watched = await eventually(counted, 20, "the first gateway to count the run")
        async with serving(bus) as later:

            async def read_back() -> dict[str, Any] | None:
                seen = await history(later)
                return (
                    seen if seen["backfilled"] and seen["queue_depth"].get("nobody", [0])[-1] == 3 else None
                )

            shown = await eventually(read_back, 20, "the later gateway to read the hour and the queues")
            assert shown["backfilled"] is True

        async def queues_read() -> dict[str, Any] | None:
            seen = await history(first)
            return seen if seen["queue_depth"].get("nobody", [0])[-1] == 3 else None

        watched = await eventually(queues_read, 20, "the first gateway to read the queues again")
    # minute by minute alike (the minutes both answers hold: a new one may have begun between them)
    for series in ("completed", "failed", "rate_limited", "e2e_p50_s", "e2e_p95_s", "wait_p50_s"):
        by_minute = dict(zip(watched["start_ms"], watched[series], strict=True))
        both = [(at, v) for at, v in zip(shown["start_ms"], shown[series], strict=True) if at in by_minute]
        assert len(both) >= 59 and all(by_minute[at] == v for at, v in both), series
    assert len(shown["start_ms"]) == 60 and shown["minute_ms"] == MINUTE_MS
    assert sum(shown["completed"]) == 5 and sum(shown["failed"]) == 1
    assert max(p for p in shown["e2e_p95_s"] if p is not None) > 0
    # three tasks wait for a provider with no worker: there now, and none of them an hour ago
    assert shown["queue_depth"]["nobody"][-1] == 3 and shown["queue_depth"]["nobody"][0] == 0
    assert watched["queue_depth"]["nobody"][-1] == 3


async def test_a_gateway_reads_the_hour_of_many_providers_at_once(settings: Settings) -> None:
    """Each provider's part of the hour was read until its pull expired, a second a provider: a gateway
    on a bus of eight providers showed '(still reading the hour ...)' for eight seconds, and a dashboard
    opened then kept the charts without the hour (it reads the hour once)."""
    providers = [f"p{i}" for i in range(8)]
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        for provider in providers:
            await hive.submit(provider, "waits")
        started = anyio.current_time()
        async with serving(bus) as http:

            async def read() -> dict[str, Any] | None:
                seen = await history(http)
                return seen if seen["backfilled"] else None

            await eventually(read, 20, "the gateway to read the hour")
            assert anyio.current_time() - started < 4.0
        await hive.close()


def test_queue_depths_are_worked_back_from_now_and_memory_stays_within_the_hour() -> None:
    history = History()
    now = now_ms()
    minute = now // MINUTE_MS * MINUTE_MS
    for _ in range(4):
        history.record_arrival("gemini", minute - 10 * MINUTE_MS)  # four queued ten minutes ago
    history.record_completed(
        "gemini", minute - 5 * MINUTE_MS, minute - 10 * MINUTE_MS, minute - 6 * MINUTE_MS
    )
    history.record_failed("gemini", minute - 2 * MINUTE_MS)
    view = history.view({"gemini": 2})
    depth = view.queue_depth["gemini"]
    assert depth[-1] == 2 and depth[-3] == 2 and depth[-4] == 3  # one failed two minutes ago
    assert depth[-6] == 3 and depth[-7] == 4  # one completed five minutes ago
    assert depth[-11] == 4 and depth[-12] == 0  # none before the four arrived
    assert view.e2e_p50_s[-6] == pytest.approx(300, rel=0.09)  # ten minutes to five ago
    assert view.wait_p50_s[-6] == pytest.approx(240, rel=0.09)
    assert view.completed[-6] == 1 and view.failed[-3] == 1
    # the last minutes only, as the page asks once it has the hour
    assert history.view({"gemini": 2}, since_ms=minute - MINUTE_MS).start_ms == [minute - MINUTE_MS, minute]
    for back in range(500):  # what is older than the hour is not kept
        history.record_arrival("gemini", now - back * MINUTE_MS)
    assert len(history._buckets) <= 61


def test_queue_depths_since_the_first_read_are_the_reads_and_before_it_are_worked_back() -> None:
    history = History()
    minute = now_ms() // MINUTE_MS * MINUTE_MS
    for _ in range(5):  # the backfill: five queued eight minutes ago, one completed six minutes ago
        history.record_arrival("groq", minute - 8 * MINUTE_MS)
    history.record_completed("groq", minute - 6 * MINUTE_MS, minute - 8 * MINUTE_MS, 0)
    history.record_arrival("groq", minute - 5 * MINUTE_MS + 1)  # one more, before the first read
    history.record_depths({"groq": 5}, minute - 5 * MINUTE_MS + 2)  # the first read, then what came live
    history.record_completed("groq", minute - 5 * MINUTE_MS + 3, 0, 0, live=True)
    history.record_depths({"groq": 4}, minute - 5 * MINUTE_MS + 4)
    history.record_depths({"groq": 9}, minute - 3 * MINUTE_MS)  # four more, which nothing followed
    history.record_depths({"groq": 7}, minute - 2 * MINUTE_MS)
    history.record_depths({"groq": 8, "gemini": 1}, minute - 2 * MINUTE_MS + 1)  # the minute's last read
    view = history.view({"groq": 6, "gemini": 2})
    groq, gemini = view.queue_depth["groq"], view.queue_depth["gemini"]
    assert groq[-1] == 6 and groq[-3] == 8 and groq[-4] == 9  # read (now: the depth passed in)
    assert groq[-2] == 6 and groq[-5] == 9  # a minute without a read: the next read's
    assert groq[-6] == 4  # the minute of the first read ends at its last
    assert groq[-7] == 4 and groq[-8] == 5 and groq[-9] == 5 and groq[-10] == 0  # worked back from the first
    assert gemini[-1] == 2 and gemini[-3] == 1 and gemini[-4] == 0 and gemini[0] == 0
    assert sum(view.completed) == 2


async def test_a_tasks_timeline_holds_every_event_and_a_wrong_id_is_named(settings: Settings) -> None:
    async def once_wrong(task: Task) -> str:
        if task.run == 0:
            raise FailNow("no template")
        return "bien"

    async with (
        open_bus(settings) as bus,
        running_worker(bus, "picky", FunctionProvider(once_wrong)),
        serving(bus) as http,
    ):
        task_id = (await http.post("/v1/tasks", json={"provider": "picky", "prompt": "p"})).json()["id"]
        assert (await http.get(f"/v1/tasks/{task_id}", params={"wait": 20})).json()["status"] == "failed"
        assert (await http.post(f"/v1/dlq/{task_id}/replay")).status_code == 202
        assert (await http.get(f"/v1/tasks/{task_id}", params={"wait": 20})).json()["status"] == "completed"
        events = (await http.get(f"/v1/tasks/{task_id}/timeline")).json()
        assert [e["type"] for e in events] == ["queued.v1", "failed.v1", "queued.v1", "completed.v1"]
        assert events[1]["error"] == "no template" and events[3]["output"] == "bien"
        wrong = await http.get("/v1/tasks/not-an-id/timeline")
        assert (wrong.status_code, wrong.json()["error"]["field"]) == (400, "task_id")
        unknown = await http.get(f"/v1/tasks/{'0' * 26}/timeline")
        assert unknown.status_code == 404


async def test_a_moved_tasks_timeline_and_events_follow_it_to_its_next_provider(settings: Settings) -> None:
    async def refuse(task: Task) -> str:
        raise FailNow("not here")

    async with (
        open_bus(settings) as bus,
        running_worker(bus, "refuses", FunctionProvider(refuse)),
        running_worker(bus, "echo", EchoProvider()),
        serving(bus) as http,
    ):
        body = {"provider": "refuses", "prompt": "p", "fallback": ["echo"], "fallback_on": "failed"}
        task_id = (await http.post("/v1/tasks", json=body)).json()["id"]
        done = (await http.get(f"/v1/tasks/{task_id}", params={"wait": 20})).json()
        assert (done["status"], done["provider"]) == ("completed", "echo")
        # each provider's events are a stream of their own: read in the order of the task's moves
        steps = [
            ("queued.v1", "refuses"),
            ("moved.v1", "refuses"),
            ("queued.v1", "echo"),
            ("completed.v1", "echo"),
        ]
        events = (await http.get(f"/v1/tasks/{task_id}/timeline")).json()
        got = [(e["type"], e["provider"]) for e in events if e["type"] != "running.v1"]
        assert got == steps, got
        seen: list[tuple[str, str]] = []
        fields: dict[str, str] = {}
        async with http.stream("GET", f"/v1/tasks/{task_id}/events") as r:
            async for line in r.aiter_lines():  # the feed ends with the task
                if line:
                    name, _, value = line.partition(": ")
                    fields[name] = value
                elif fields:
                    kind = json.loads(fields["data"])["type"]
                    if kind != "running.v1":  # its place: in the stream of the provider it is under
                        seen.append((kind, fields["id"].partition("=")[0]))
                    fields = {}
        assert seen == steps, seen
        # in the list of recent tasks once (it is in two providers' tails), as it ended, with its prompt
        listed = [t for t in (await http.get("/v1/tasks")).json() if t["id"] == task_id]
        assert [(t["status"], t["provider"], t["prompt"]) for t in listed] == [("completed", "echo", "p")]
