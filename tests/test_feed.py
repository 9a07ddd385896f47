"""The gateway's live routes over real HTTP: GET /v1/events (every task event as Server-Sent Events),
GET /v1/usage (tokens and cost since the gateway started), and the dashboard's page."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest

from hive_bus import Hive, Settings, TaskRequest
from hive_bus._embedded import NatsServer
from hive_bus._messages import WebhookSpec
from hive_bus.bus import Bus, open_bus
from hive_bus.services import api
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider

from .conftest import make_settings
from .helpers import eventually, running_worker

pytestmark = pytest.mark.anyio


@dataclass
class Stack:
    bus: Bus
    gateway: Gateway
    http: httpx.AsyncClient


@asynccontextmanager
async def serving(settings: Settings, **options: float) -> AsyncIterator[Stack]:
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0, **options))  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=15) as http:
                yield Stack(bus, gateway, http)
            gateway.stop()


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    async with serving(settings) as s:
        yield s


@dataclass
class Message:
    event: str
    id: str  # where the feed is in each provider's events: ``echo=12,nobody=3``
    data: dict[str, object]

    @property
    def places(self) -> dict[str, int]:
        return {p: int(seq) for p, _, seq in (part.partition("=") for part in self.id.split(","))}


@dataclass
class Feed:
    """The messages of one GET /v1/events, read in the background."""

    messages: list[Message] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    ended: anyio.Event = field(default_factory=anyio.Event)

    async def read(self, response: httpx.Response) -> None:
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line.startswith(":"):
                self.comments.append(line)
            elif line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif "data" in fields:
                self.messages.append(Message(fields["event"], fields["id"], json.loads(fields["data"])))
                fields = {}
        self.ended.set()

    def of(self, task_id: str) -> list[str]:
        return [m.event for m in self.messages if m.data["task_id"] == task_id]

    async def until(self, what: str, done: Callable[[], bool], timeout_s: float = 10) -> None:
        async def probe() -> bool:
            return done()

        await eventually(probe, timeout_s, f"{what} in the feed")


@asynccontextmanager
async def feed(http: httpx.AsyncClient, path: str = "/v1/events", **headers: str) -> AsyncIterator[Feed]:
    got = Feed()
    async with http.stream("GET", path, headers=headers) as response, anyio.create_task_group() as tg:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        tg.start_soon(got.read, response)
        yield got
        tg.cancel_scope.cancel()


async def submit(http: httpx.AsyncClient, provider: str, prompt: str) -> str:
    r = await http.post("/v1/tasks", json={"provider": provider, "prompt": prompt})
    assert r.status_code == 202, r.text
    task_id: str = r.json()["id"]
    return task_id


async def test_every_task_event_is_fed_as_it_happens(stack: Stack) -> None:
    async with running_worker(stack.bus, "echo", EchoProvider()), feed(stack.http) as got:
        echoed = await submit(stack.http, "echo", "Un tuit sobre <b>NATS</b>")
        waiting = await submit(stack.http, "nobody", "sin trabajador")
        await got.until("the echo task's completion", lambda: "completed" in got.of(echoed))
        await got.until("the other task's queued event", lambda: got.of(waiting) == ["queued"])
    seen = got.of(echoed)
    # a "running" event comes only when a call lasts a quarter second: an echo call does not, unless
    # the machine stalls
    assert seen[0] == "queued" and seen[-1] == "completed" and set(seen) <= {"queued", "running", "completed"}
    completed = next(m for m in got.messages if m.data["task_id"] == echoed and m.event == "completed")
    assert completed.data["output"] == "Un tuit sobre <b>NATS</b>"
    assert completed.data["provider"] == "echo"
    queued = next(m for m in got.messages if m.data["task_id"] == waiting)
    assert queued.data["task"]["prompt"] == "sin trabajador"  # type: ignore[index]
    # each provider's events in the record's order, each event once: its place moves on at each
    for provider in ("echo", "nobody"):
        mine = [m.places[provider] for m in got.messages if m.data["provider"] == provider]
        assert mine == sorted(mine) and len(set(mine)) == len(mine), provider
    for before, after in itertools.pairwise(got.messages):  # no place goes back
        assert all(after.places.get(p, 0) >= seq for p, seq in before.places.items())


async def test_a_scheduled_task_reads_scheduled_in_the_feeds_as_everywhere(stack: Stack) -> None:
    # its first event named it "queued" in both feeds, while GET /v1/tasks/{id}, the list and hive
    # watch read "scheduled"
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    async with feed(stack.http) as got:
        r = await stack.http.post(
            "/v1/tasks", json={"provider": "echo", "prompt": "luego", "not_before": later}
        )
        assert (r.status_code, r.json()["status"]) == (202, "scheduled"), r.text
        task_id = r.json()["id"]
        await got.until("the scheduled task's first event", lambda: bool(got.of(task_id)))
        assert (await stack.http.post(f"/v1/tasks/{task_id}/cancel")).status_code == 200
        await got.until("its cancel", lambda: "cancelled" in got.of(task_id))
    assert got.of(task_id) == ["scheduled", "cancelled"]
    own = Feed()
    async with stack.http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
        await own.read(response)  # every event so far: the task has ended, so the stream ends
    assert own.of(task_id) == ["scheduled", "cancelled"]


async def test_a_feed_of_one_provider_and_a_bad_provider_name(stack: Stack) -> None:
    async with (
        running_worker(stack.bus, "echo", EchoProvider()),
        feed(stack.http, "/v1/events?provider=echo") as got,
    ):
        other = await submit(stack.http, "nobody", "not for this feed")
        echoed = await submit(stack.http, "echo", "for this feed")
        await got.until("the echo task's completion", lambda: "completed" in got.of(echoed))
    assert got.of(other) == []
    assert {m.data["provider"] for m in got.messages} == {"echo"}
    for bad in ("echo.x", ">", "a b", ""):
        r = await stack.http.get("/v1/events", params={"provider": bad})
        assert r.status_code == 400, bad
        assert r.json()["error"]["field"] == "provider"


async def test_the_feeds_and_the_timeline_show_no_seal_and_no_webhook_token(stack: Stack) -> None:
    # a task's webhook URL, query and all (where a receiver's token lives), and its seal (known only to
    # the gateway and its provider's workers) went to every client of the feeds and the timeline, where
    # the delivery records and GET /v1/tasks/{id} show neither
    hook = WebhookSpec(url="https://user:pw@hooks.example.com/hive?token=s3cret-hook-token")
    later = datetime.now(UTC) + timedelta(hours=1)
    hive = Hive(stack.bus)
    async with feed(stack.http) as got:
        # queued now (its event a marker, the task read from the tasks stream), and scheduled (its
        # event holds the task as stored)
        now = await hive.submit_request(TaskRequest(provider="nobody", prompt="x", webhook=hook))
        then = await hive.submit_request(
            TaskRequest(provider="nobody", prompt="x", webhook=hook, not_before=later)
        )
        await got.until("both tasks", lambda: bool(got.of(now.id)) and bool(got.of(then.id)))
    for task_id in (now.id, then.id):
        async with stack.http.stream("GET", f"/v1/tasks/{task_id}/events") as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    own = json.loads(line.removeprefix("data: "))
                    break
        timeline = (await stack.http.get(f"/v1/tasks/{task_id}/timeline")).json()
        (fed,) = [m.data for m in got.messages if m.data["task_id"] == task_id]
        for shown in (fed, own, timeline[0]):
            task: Any = shown["task"]
            assert "seal" not in task
            assert task["webhook"]["url"] == "https://hooks.example.com/hive?…"
            assert "s3cret" not in json.dumps(shown)
            assert task["prompt"] == "x"


async def test_a_feed_resumed_with_last_event_id_misses_nothing(stack: Stack) -> None:
    async with feed(stack.http) as got:
        first = await submit(stack.http, "nobody", "one")
        await got.until("the first task", lambda: got.of(first) == ["queued"])
    resume_after = got.messages[-1].id
    # while no feed is open
    missed = [await submit(stack.http, "nobody", f"missed {i}") for i in range(3)]
    async with feed(stack.http, **{"Last-Event-ID": str(resume_after)}) as again:
        later = await submit(stack.http, "nobody", "after")
        await again.until("the task submitted after reconnecting", lambda: again.of(later) == ["queued"])
    assert [m.data["task_id"] for m in again.messages] == [*missed, later]
    for bad in ("yesterday", "12", "nobody=", "nobody=x", "no body=3"):
        r = await stack.http.get("/v1/events", headers={"Last-Event-ID": bad})
        assert r.status_code == 400, bad
    # a byte that reads as a digit in Latin-1 (b"\xb2" is "²"), but is no number
    for path, bad_id in (("/v1/events", b"nobody=\xb2"), ("/v1/events?provider=nobody", b"\xb2")):
        r = await stack.http.get(path, headers={b"Last-Event-ID": bad_id})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["field"] == "last-event-id"


async def test_a_feed_resumes_each_provider_where_it_was(stack: Stack) -> None:
    async with feed(stack.http) as got:
        first = await submit(stack.http, "nobody", "one")
        other = await submit(stack.http, "elsewhere", "two")
        await got.until("both tasks", lambda: got.of(first) == ["queued"] and got.of(other) == ["queued"])
    resume_after = got.messages[-1].id
    assert set(got.messages[-1].places) >= {"nobody", "elsewhere"}
    missed = [await submit(stack.http, provider, "missed") for provider in ("nobody", "elsewhere", "new")]
    async with feed(stack.http, **{"Last-Event-ID": resume_after}) as again:
        await again.until("the missed tasks", lambda: all(again.of(t) == ["queued"] for t in missed))
    # each provider from just after its place, a provider's stream made since from its start
    assert sorted(str(m.data["task_id"]) for m in again.messages) == sorted(missed)
    # with ?provider=, a plain sequence is taken as that provider's (the ids of before)
    nobody = got.messages[-1].places["nobody"]
    async with feed(stack.http, "/v1/events?provider=nobody", **{"Last-Event-ID": str(nobody)}) as one:
        await one.until("the missed task of nobody", lambda: one.of(missed[0]) == ["queued"])
    assert [m.data["task_id"] for m in one.messages] == [missed[0]]
    assert one.messages[0].id == f"nobody={nobody + 1}"


async def test_a_feed_from_now_on_is_from_now_on_after_a_server_restart(own_server: NatsServer) -> None:
    # nats-py recreates an ordered consumer whose heartbeats stop from just after the last message it
    # delivered: with none delivered yet, from the stream's first. A feed (every open dashboard) that
    # had seen nothing when nats-server restarted replayed every event the streams held.
    async with (
        serving(make_settings(own_server.url)) as stack,
        httpx.AsyncClient(base_url=stack.gateway.url, timeout=60) as patient,  # quiet while the bus is away
    ):
        before = [await submit(stack.http, "nobody", f"before {i}") for i in range(3)]
        async with feed(patient) as got:
            # the feed follows every stream once it has an event (of another provider's)
            ready = await submit(stack.http, "elsewhere", "ready")
            await got.until("the feed's first event", lambda: bool(got.of(ready)))
            own_server.stop()
            await anyio.to_thread.run_sync(own_server.start)  # same port, same store

            async def accepted() -> str | None:
                with contextlib.suppress(httpx.HTTPError):
                    r = await stack.http.post("/v1/tasks", json={"provider": "nobody", "prompt": "after"})
                    if r.status_code == 202:
                        task_id: str = r.json()["id"]
                        return task_id
                return None

            after = await eventually(accepted, 20, "a submission once the gateway is back on the bus")
            await got.until("the task submitted after the restart", lambda: bool(got.of(after)), timeout_s=40)
    assert not any(got.of(task_id) for task_id in before)
    assert [m.data["task_id"] for m in got.messages] == [ready, after]


async def test_a_feed_ends_after_its_time_and_when_the_gateway_stops(settings: Settings) -> None:
    async with serving(settings, feed_max_s=0.5) as stack, feed(stack.http) as got:
        with anyio.fail_after(10):
            await got.ended.wait()  # the client reconnects from there with Last-Event-ID
    async with serving(settings) as stack, feed(stack.http) as got:
        stack.gateway.stop()
        with anyio.fail_after(10):
            await got.ended.wait()


async def test_usage_counts_tokens_and_cost_since_the_gateway_started(stack: Stack) -> None:
    before = (await stack.http.get("/v1/usage")).json()
    assert before["models"] == []
    async with running_worker(stack.bus, "echo", EchoProvider()):
        for prompt in ("uno dos tres", "cuatro cinco"):
            task_id = await submit(stack.http, "echo", prompt)
            view = (await stack.http.get(f"/v1/tasks/{task_id}", params={"wait": 10})).json()
            assert view["status"] == "completed"

        async def counted() -> dict[str, Any] | None:
            usage: dict[str, Any] = (await stack.http.get("/v1/usage")).json()
            return usage if sum(m["completed"] for m in usage["models"]) >= 2 else None

        usage = await eventually(counted, 10, "both completions counted")
    assert usage["models"] == [
        {"provider": "echo", "model": "echo", "completed": 2, "input_tokens": 5, "output_tokens": 5,
         "cost_usd": 0.0, "unpriced": 0},
    ]  # fmt: skip
    assert usage["since_ms"] == before["since_ms"] > 0


async def test_the_dashboard_page_and_its_files(stack: Stack) -> None:
    page = await stack.http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/dashboard/app.js">' in page.text
    script = await stack.http.get("/dashboard/app.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert "innerHTML" not in script.text  # data reaches the page as text only
    assert (await stack.http.get("/dashboard/style.css")).headers["content-type"].startswith("text/css")
    assert (await stack.http.get("/dashboard/nothing.js")).status_code == 404
    doc = (await stack.http.get("/openapi.json")).json()
    assert "/v1/events" in doc["paths"] and "/" not in doc["paths"]
    assert "text/event-stream" in doc["paths"]["/v1/events"]["get"]["responses"]["200"]["content"]


async def test_a_gateway_serves_so_many_feeds_at_once_and_answers_one_more_busy(settings: Settings) -> None:
    # each feed holds consumers and the events its client has yet to read: 150 open at once took a
    # gateway past a gigabyte and its NATS connection down (services.feeds)
    async with serving(settings, feeds_at_once=2) as s:
        http = s.http
        task_id = await submit(http, "echo", "hola")
        async with feed(http) as first, feed(http, f"/v1/tasks/{task_id}/events"):
            busy = await http.get("/v1/events")
            assert busy.status_code == 503 and busy.headers["retry-after"] == "2", busy.text
            problem = busy.json()["error"]
            assert problem["code"] == "busy" and "2 event feeds" in problem["message"], busy.text
            assert (await http.get(f"/v1/tasks/{task_id}/events")).status_code == 503
            await submit(http, "echo", "the open feeds go on")
            await first.until("the task", lambda: len(first.messages) >= 1)
        # closed (the gateway hears of it a moment later): their slots are free again

        async def served() -> bool:
            async with http.stream("GET", "/v1/events") as response:
                return response.status_code == 200

        await eventually(served, 10, "a feed served again")


async def test_a_tasks_event_stream_sends_keep_alives_while_the_task_waits(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # it sent nothing after the task's queued event until its next event: a proxy's idle timeout (60 s
    # is common) cut a stream of a task that waited longer, and the route takes no Last-Event-ID
    monkeypatch.setattr(api, "FEED_KEEPALIVE_S", 0.3)
    task_id = await submit(stack.http, "nobody-serves-this", "espera")
    async with feed(stack.http, f"/v1/tasks/{task_id}/events") as got:
        await got.until("two keep-alives after the queued event", lambda: len(got.comments) >= 2)
        assert [m.event for m in got.messages] == ["queued"]
