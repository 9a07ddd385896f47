"""The gateway over real HTTP (uvicorn on a free loopback port) in front of a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from hive_bus import FailNow, FunctionProvider, Hive, Settings, Task
from hive_bus._bus import event_providers
from hive_bus._embedded import NatsServer
from hive_bus.bus import Bus, open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider

from . import handlers
from .conftest import make_settings
from .helpers import TcpRelay, eventually, hive_cli, running_worker, stream_messages

pytestmark = pytest.mark.anyio


@dataclass
class Stack:
    bus: Bus
    http: httpx.AsyncClient


@asynccontextmanager
async def serving(settings: Settings, max_body_bytes: int = 4096) -> AsyncIterator[Stack]:
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0, max_body_bytes=max_body_bytes))
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=15) as http:
                yield Stack(bus, http)
            gateway.stop()


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    async with serving(settings) as s:
        yield s


async def test_submit_then_wait_for_the_result(stack: Stack) -> None:
    async with running_worker(stack.bus, "echo", EchoProvider()):
        r = await stack.http.post("/v1/tasks", json={"provider": "echo", "prompt": "Un tuit sobre NATS"})
        assert r.status_code == 202
        body = r.json()
        assert body["status"] == "queued"
        done = await stack.http.get(f"/v1/tasks/{body['id']}", params={"wait": 10})
    assert done.status_code == 200
    view = done.json()
    assert (view["status"], view["output"], view["attempt"]) == ("completed", "Un tuit sobre NATS", 1)


async def test_get_without_wait_answers_at_once(stack: Stack) -> None:
    r = await stack.http.post("/v1/tasks", json={"provider": "nobody", "prompt": "x"})
    task_id = r.json()["id"]
    got = await stack.http.get(f"/v1/tasks/{task_id}")
    assert got.status_code == 200
    assert got.json()["status"] == "queued"
    waited = await stack.http.get(f"/v1/tasks/{task_id}", params={"wait": 0.3})
    assert waited.json()["status"] == "queued"


async def test_idempotency_key_over_http(stack: Stack) -> None:
    body = {"provider": "nobody", "prompt": "x", "idempotency_key": "order-7"}
    first = await stack.http.post("/v1/tasks", json=body)
    again = await stack.http.post("/v1/tasks", json=body)
    assert first.status_code == 202
    assert again.status_code == 200
    unserved = ["no worker serves provider 'nobody' now or in the last day; served: none"]
    assert again.json() == {
        "id": first.json()["id"],
        "status": "queued",
        "duplicate": True,
        "warnings": unserved,
    }
    assert await stream_messages(stack.bus, stack.bus.names.tasks_stream) == 1


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "route"])
async def test_an_idempotency_key_header_makes_one_task_of_two_submissions(
    settings: Settings, fast_path: bool
) -> None:
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0, fast_path=fast_path))
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=15) as http:
                body = {"provider": "nobody", "prompt": "una vez"}
                keyed = {"Idempotency-Key": "pedido-42"}
                first = await http.post("/v1/tasks", json=body, headers=keyed)
                again = await http.post("/v1/tasks", json=body, headers=keyed)
                # the same key in the body too: the same task
                both = await http.post(
                    "/v1/tasks", json={**body, "idempotency_key": "pedido-42"}, headers=keyed
                )
                differ = await http.post("/v1/tasks", json={**body, "idempotency_key": "otro"}, headers=keyed)
                empty = await http.post("/v1/tasks", json=body, headers={"Idempotency-Key": ""})
            gateway.stop()
        assert (first.status_code, again.status_code, both.status_code) == (202, 200, 200), first.text
        assert first.json()["id"] == again.json()["id"] == both.json()["id"]
        assert again.json()["duplicate"] is True
        assert await stream_messages(bus, bus.names.tasks_stream) == 1
        assert differ.status_code == 400
        assert differ.json()["error"] == {
            "code": "invalid_request",
            "message": "header Idempotency-Key and body field idempotency_key differ: give one of them, "
            "or the same key in both",
            "field": "idempotency_key",
        }
        assert empty.status_code == 400
        assert "header Idempotency-Key must be 1 to 256 characters" in empty.json()["error"]["message"]


async def test_workers_and_healthz(stack: Stack) -> None:
    assert (await stack.http.get("/healthz")).json() == {"status": "ok"}
    async with running_worker(stack.bus, "echo", EchoProvider()) as worker:

        async def listed_workers() -> list[dict[str, object]]:
            listed: list[dict[str, object]] = (await stack.http.get("/v1/workers")).json()
            return listed

        listed = await eventually(listed_workers, 5, "a worker in the list")
    assert [w["worker_id"] for w in listed] == [worker.id]
    assert listed[0]["provider"] == "echo"


async def test_unknown_task_is_404_and_a_malformed_id_400(stack: Stack) -> None:
    r = await stack.http.get("/v1/tasks/01JAAAAAAAAAAAAAAAAAAAAAAA")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "task_not_found"
    r = await stack.http.get("/v1/tasks/not-an-id")
    assert r.status_code == 400
    assert "not a task id" in r.json()["error"]["message"]
    assert r.json()["error"]["field"] == "task_id"
    r = await stack.http.get("/v1/tasks/01JAAAAAAAAAAAAAAAAAAAAAAA", params={"wait": "soon"})
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "wait"


BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("malformed JSON", b'{"provider": "echo", "prompt": ', "not valid JSON"),
    ("empty body", b"", "body is empty"),
    ("not an object", b'["echo", "hi"]', "Expected `object`, got `array`"),
    ("missing prompt", b'{"provider": "echo"}', "give exactly one of `prompt` and `messages`"),
    ("missing provider", b'{"prompt": "hi"}', "missing required field `provider`"),
    (
        "empty prompt",
        b'{"provider": "echo", "prompt": ""}',
        "prompt must be a string with at least one non-blank character",
    ),
    (
        "blank prompt",
        b'{"provider": "echo", "prompt": "  \\n "}',
        "prompt must be a string with at least one non-blank character",
    ),
    ("provider with a dot", b'{"provider": "echo.x", "prompt": "hi"}', "provider must be 1-64 letters"),
    ("provider wildcard", b'{"provider": ">", "prompt": "hi"}', "provider must be 1-64 letters"),
    ("provider with a space", b'{"provider": "my echo", "prompt": "hi"}', "provider must be 1-64 letters"),
    ("unknown field", b'{"provider": "echo", "prompt": "hi", "urgency": 1}', "unknown field `urgency`"),
    ("prompt of the wrong type", b'{"provider": "echo", "prompt": 42}', "Expected `str`, got `int`"),
    (
        "params of the wrong type",
        b'{"provider": "echo", "prompt": "hi", "params": []}',
        "Expected `object | null`, got `array`",
    ),
    ("unknown param", b'{"provider": "echo", "prompt": "hi", "params": {"temp": 1}}', "unknown field `temp`"),
    (
        "temperature out of range",
        b'{"provider": "echo", "prompt": "hi", "params": {"temperature": 9}}',
        "<= 2",
    ),
    ("max_attempts zero", b'{"provider": "echo", "prompt": "hi", "max_attempts": 0}', ">= 1"),
]


@pytest.mark.parametrize(("case", "body", "says"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_input_is_400_and_nothing_is_published(
    stack: Stack, case: str, body: bytes, says: str
) -> None:
    r = await stack.http.post("/v1/tasks", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] in ("invalid_request", "bad_request")
    assert says in error["message"]
    names = stack.bus.names
    assert await stream_messages(stack.bus, names.tasks_stream) == 0
    for provider in await event_providers(stack.bus):  # nor any event, under any provider
        assert await stream_messages(stack.bus, names.events_stream_of(provider)) == 0, provider


async def test_oversize_body_is_413_and_nothing_is_published(stack: Stack) -> None:
    r = await stack.http.post("/v1/tasks", json={"provider": "echo", "prompt": "x" * 5000})
    assert r.status_code == 413
    assert "larger than the gateway's limit of 4096 bytes" in r.json()["error"]["message"]
    assert await stream_messages(stack.bus, stack.bus.names.tasks_stream) == 0


async def test_unknown_route_is_a_json_404(stack: Stack) -> None:
    r = await stack.http.get("/v2/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


async def test_full_queue_is_503_with_retry_after(nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url, tasks_max_msgs=2)
    async with serving(settings) as stack:
        codes = [
            (await stack.http.post("/v1/tasks", json={"provider": "nobody", "prompt": f"p{i}"})).status_code
            for i in range(3)
        ]
        assert codes == [202, 202, 503]
        r = await stack.http.post("/v1/tasks", json={"provider": "nobody", "prompt": "again"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) > 0
        assert await stream_messages(stack.bus, stack.bus.names.tasks_stream) == 2


async def test_nats_down_gives_503_never_202_and_service_resumes(own_server: NatsServer) -> None:
    settings = make_settings(own_server.url, request_timeout_s=1.0)
    async with serving(settings) as stack:
        ok = await stack.http.post("/v1/tasks", json={"provider": "nobody", "prompt": "before"})
        assert ok.status_code == 202
        own_server.stop()
        for _ in range(3):
            r = await stack.http.post("/v1/tasks", json={"provider": "nobody", "prompt": "during"})
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "bus_unavailable"
            assert r.headers["retry-after"] == "5"
        assert (await stack.http.get(f"/v1/tasks/{ok.json()['id']}")).status_code == 503
        own_server.start()

        async def accepted() -> bool:
            r = await stack.http.post("/v1/tasks", json={"provider": "nobody", "prompt": "after"})
            assert r.status_code in (202, 503)
            return r.status_code == 202

        await eventually(accepted, 15, "the gateway to accept work again")
        assert (await stack.http.get(f"/v1/tasks/{ok.json()['id']}")).json()["status"] == "queued"
        assert await stream_messages(stack.bus, stack.bus.names.tasks_stream) == 2


async def test_a_batch_is_accepted_in_order(stack: Stack) -> None:
    tasks = [{"provider": "echo", "prompt": f"post {i}"} for i in range(5)]
    async with running_worker(stack.bus, "echo", EchoProvider()):
        r = await stack.http.post("/v1/tasks/batch", json={"tasks": tasks})
        assert r.status_code == 202
        body = r.json()
        assert (body["accepted"], body["rejected"]) == (5, 0)
        assert [t["index"] for t in body["tasks"]] == [0, 1, 2, 3, 4]
        outputs = [
            (await stack.http.get(f"/v1/tasks/{t['id']}", params={"wait": 10})).json()["output"]
            for t in body["tasks"]
        ]
    assert outputs == [f"post {i}" for i in range(5)]


async def test_a_key_repeated_in_a_batch_or_across_batches_queues_its_task_once(stack: Stack) -> None:
    keyed = {"provider": "nobody", "prompt": "once", "idempotency_key": "campaign-9"}
    r = await stack.http.post(
        "/v1/tasks/batch", json={"tasks": [keyed, {"provider": "nobody", "prompt": "x"}, keyed]}
    )
    assert r.status_code == 202
    first, other, again = r.json()["tasks"]
    assert (first["status"], other["status"], again["status"]) == ("queued", "queued", "duplicate")
    assert again["id"] == first["id"] != other["id"]
    r = await stack.http.post("/v1/tasks/batch", json={"tasks": [keyed]})
    assert r.json()["tasks"] == [{"index": 0, "id": first["id"], "status": "duplicate"}]
    assert await stream_messages(stack.bus, stack.bus.names.tasks_stream) == 2

    # a key with a line break, in a batch and then alone: one task (its header is the same one line)
    two_lines = {"provider": "nobody", "prompt": "once more", "idempotency_key": "spring\ncampaign"}
    r = await stack.http.post("/v1/tasks/batch", json={"tasks": [two_lines]})
    [batched] = r.json()["tasks"]
    single = (await stack.http.post("/v1/tasks", json=two_lines)).json()
    assert (batched["status"], single["id"], single["duplicate"]) == ("queued", batched["id"], True)
    assert await stream_messages(stack.bus, stack.bus.names.tasks_stream) == 3


async def test_a_batch_with_an_invalid_task_names_it_and_queues_nothing(stack: Stack) -> None:
    tasks = [{"provider": "echo", "prompt": "fine"}, {"provider": "echo", "prompt": " "}]
    r = await stack.http.post("/v1/tasks/batch", json={"tasks": tasks})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("tasks[1]: prompt must be a string")
    assert await stream_messages(stack.bus, stack.bus.names.tasks_stream) == 0
    r = await stack.http.post("/v1/tasks/batch", json={"tasks": []})
    assert r.status_code == 400
    assert "at least one task" in r.json()["error"]["message"]


async def test_a_batch_that_cannot_be_fully_accepted_says_which_were(nats_server: NatsServer) -> None:
    async with serving(make_settings(nats_server.url, tasks_max_msgs=3)) as stack:
        tasks = [{"provider": "nobody", "prompt": f"p{i}"} for i in range(5)]
        r = await stack.http.post("/v1/tasks/batch", json={"tasks": tasks})
        assert r.status_code == 503
        body = r.json()
        assert (body["accepted"], body["rejected"]) == (3, 2)
        accepted = [t for t in body["tasks"] if "id" in t]
        refused = [t for t in body["tasks"] if "error" in t]
        assert len(accepted) == 3 and all("full" in t["error"] for t in refused)
        for t in accepted:  # each one said accepted really is queued
            assert (await stack.http.get(f"/v1/tasks/{t['id']}")).json()["status"] == "queued"
        assert await stream_messages(stack.bus, stack.bus.names.tasks_stream) == 3


async def test_task_events_stream_until_the_task_ends(stack: Stack) -> None:
    r = await stack.http.post(
        "/v1/tasks", json={"provider": "slow", "prompt": "x", "payload": {"delay_s": 0.6}}
    )
    task_id = r.json()["id"]
    seen: list[str] = []
    async with (
        running_worker(stack.bus, "slow", FunctionProvider(handlers.slow)),
        stack.http.stream("GET", f"/v1/tasks/{task_id}/events") as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                seen.append(line.removeprefix("event: "))
    assert seen == ["queued", "running", "completed"]  # and the stream ended by itself


async def test_recent_tasks_can_be_filtered(stack: Stack) -> None:
    async with running_worker(stack.bus, "echo", EchoProvider()):
        done = [
            (await stack.http.post("/v1/tasks", json={"provider": "echo", "prompt": f"e{i}"})).json()["id"]
            for i in range(3)
        ]
        for task_id in done:
            await stack.http.get(f"/v1/tasks/{task_id}", params={"wait": 10})
    waiting = (await stack.http.post("/v1/tasks", json={"provider": "nobody", "prompt": "w"})).json()["id"]
    listed = (await stack.http.get("/v1/tasks", params={"limit": 10})).json()
    assert [t["id"] for t in listed] == [waiting, *reversed(done)]  # newest first
    completed = (await stack.http.get("/v1/tasks", params={"status": "completed"})).json()
    assert {t["id"] for t in completed} == set(done)
    nobody = (await stack.http.get("/v1/tasks", params={"provider": "nobody"})).json()
    assert [(t["id"], t["status"]) for t in nobody] == [(waiting, "queued")]
    assert (await stack.http.get("/v1/tasks", params={"status": "lost"})).status_code == 400
    r = await stack.http.get("/v1/tasks", params={"provider": "a.>"})  # never a wildcard in a subject
    assert (r.status_code, r.json()["error"]["field"]) == (400, "provider")


async def test_readyz_follows_nats(own_server: NatsServer) -> None:
    async with serving(make_settings(own_server.url, request_timeout_s=1.0)) as stack:
        assert (await stack.http.get("/readyz")).json() == {"status": "ready"}
        own_server.stop()
        r = await stack.http.get("/readyz")
        assert r.status_code == 503
        assert (await stack.http.get("/healthz")).status_code == 200  # the process itself is fine
        own_server.start()

        async def ready() -> bool:
            return (await stack.http.get("/readyz")).status_code == 200

        await eventually(ready, 15, "readyz to recover")


async def test_the_openapi_document_is_generated_from_the_types(stack: Stack) -> None:
    doc = (await stack.http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/tasks", "/v1/tasks/batch", "/v1/tasks/{task_id}", "/v1/tasks/{task_id}/events"} <= set(
        doc["paths"]
    )
    schemas = doc["components"]["schemas"]
    request = next(v for k, v in schemas.items() if k.endswith("TaskRequest"))
    assert request["required"] == ["provider"]  # and exactly one of prompt and messages, which it says
    for field in ("prompt", "messages"):
        assert "exactly one of prompt and messages" in request["properties"][field]["description"]
    [header] = [p for p in doc["paths"]["/v1/tasks"]["post"]["parameters"] if p["in"] == "header"]
    assert header["name"] == "idempotency-key" and "idempotency_key" in header["description"]


async def test_stats_per_provider(stack: Stack) -> None:
    async with running_worker(stack.bus, "echo", EchoProvider()):
        for i in range(3):
            r = await stack.http.post("/v1/tasks", json={"provider": "echo", "prompt": f"e{i}"})
            await stack.http.get(f"/v1/tasks/{r.json()['id']}", params={"wait": 10})
        for _ in range(2):
            await stack.http.post("/v1/tasks", json={"provider": "nobody", "prompt": "waits"})

        async def both() -> dict[str, Any] | None:
            # a provider no consumer serves is known by its submission counter (flushed within 0.25 s)
            rows = {row["provider"]: row for row in (await stack.http.get("/v1/stats")).json()}
            return rows if "nobody" in rows else None

        rows = await eventually(both, 5, "the stats to name nobody")
    assert rows["echo"] | {"workers": 1} == {
        "provider": "echo", "pending": 0, "in_flight": 0, "retrying": 0, "completed": 3, "failed": 0, "workers": 1,
        "cooldown_until_ms": None, "cooldown_reason": None, "waiting": 0, "waiting_until_ms": None, "keys_refused": 0,
    }  # fmt: skip
    assert (rows["nobody"]["pending"], rows["nobody"]["workers"], rows["nobody"]["completed"]) == (2, 0, 0)


async def _bucket_consumers(bus: Bus) -> dict[str, int]:
    streams = [f"KV_{bus.names.workers_bucket}", f"KV_{bus.names.providers_bucket}"]
    return {s: (await bus.js.stream_info(s)).state.consumer_count for s in streams}


async def test_concurrent_stats_reads_leave_no_consumer_on_the_buckets(stack: Stack) -> None:
    """GET /v1/stats and Hive.stats read the heartbeats and cooldowns by direct gets: a consumer made
    per read lingered for a minute, and a dashboard polled by many clients took the account to its
    consumer limit, after which the stats (and all else that needs a consumer) answered 503."""
    async with running_worker(stack.bus, "echo", EchoProvider()):
        await eventually(lambda: _named(stack, "echo"), 5, "the stats to name echo")
        before = await _bucket_consumers(stack.bus)
        codes: list[int] = []
        hive = Hive(stack.bus)

        async def over_http() -> None:
            codes.append((await stack.http.get("/v1/stats")).status_code)

        async def by_library() -> None:
            assert [row.provider for row in await hive.stats()] == ["echo"]

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(over_http)
                tg.start_soon(by_library)
        after = await _bucket_consumers(stack.bus)
    assert codes == [200] * 40
    assert after == before


async def _named(stack: Stack, provider: str) -> bool | None:
    rows = (await stack.http.get("/v1/stats")).json()
    return True if any(row["provider"] == provider for row in rows) else None


async def test_metrics_are_served_in_prometheus_format(stack: Stack) -> None:
    async with running_worker(stack.bus, "echo", EchoProvider()):
        for i in range(2):
            r = await stack.http.post("/v1/tasks", json={"provider": "echo", "prompt": f"m{i}"})
            await stack.http.get(f"/v1/tasks/{r.json()['id']}", params={"wait": 10})

        async def counted() -> str | None:
            # completions come from the events as they are stored, submissions from the counters as
            # a scrape reads them (at most a second old)
            text = (await stack.http.get("/metrics")).text
            done = 'hive_tasks_completed_total{model="echo",provider="echo"} 2.0' in text
            return text if done and 'hive_tasks_submitted_total{provider="echo"} 2.0' in text else None

        text = await eventually(counted, 10, "the submissions and completions in /metrics")
    assert 'hive_tasks_failed_total{provider="echo"' not in text
    r = await stack.http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")


async def test_a_scrape_gets_the_last_figures_at_once_when_the_bus_stops_answering(
    nats_server: NatsServer,
) -> None:
    """A link to NATS that silently went away: a scrape must not wait out the bus's timeouts (Prometheus
    would give up and report the gateway down), it is answered with the last figures."""
    relay = TcpRelay(int(nats_server.url.rsplit(":", 1)[1]))
    async with serving(make_settings(relay.url, request_timeout_s=4.0)) as stack:
        try:
            await stack.http.post("/v1/tasks", json={"provider": "nobody", "prompt": "waits"})

            async def counted() -> str | None:
                text = (await stack.http.get("/metrics")).text
                return text if 'hive_queue_pending{provider="nobody"} 1.0' in text else None

            before = await eventually(counted, 5, "the task in /metrics")
            relay.stall()
            await anyio.sleep(1.5)  # the figures are now old enough for a scrape to read the bus again
            asked_at = anyio.current_time()
            r = await stack.http.get("/metrics")
            waited_s = anyio.current_time() - asked_at
        finally:
            relay.cut()
    assert r.status_code == 200 and waited_s < 2.5, waited_s  # well under one bus timeout (4 s)
    assert 'hive_queue_pending{provider="nobody"} 1.0' in r.text
    stamp = "hive_metrics_last_refresh_timestamp_seconds "
    assert r.text.split(stamp)[1].split()[0] == before.split(stamp)[1].split()[0]  # the same read


async def test_dead_letters_over_http_and_the_cli(stack: Stack, settings: Settings) -> None:
    async def refuse(task: Task) -> str:
        if task.run == 0:
            raise FailNow("bad template")
        return "fixed"

    async with running_worker(stack.bus, "tpl", FunctionProvider(refuse)):
        ids = []
        for i in range(3):
            r = await stack.http.post("/v1/tasks", json={"provider": "tpl", "prompt": f"t{i}"})
            ids.append(r.json()["id"])
        for task_id in ids:
            assert (await stack.http.get(f"/v1/tasks/{task_id}", params={"wait": 10})).json()[
                "status"
            ] == "failed"
        listed = (await stack.http.get("/v1/dlq", params={"provider": "tpl"})).json()
        assert [x["failed"]["task_id"] for x in listed] == ids
        assert {x["failed"]["error"] for x in listed} == {"bad template"}
        shown = (await stack.http.get(f"/v1/dlq/{ids[0]}")).json()
        assert (shown["failed"]["reason"], shown["failed"]["task"]["prompt"]) == ("permanent", "t0")
        replayed = await stack.http.post(f"/v1/dlq/{ids[0]}/replay")
        assert (replayed.status_code, replayed.json()["run"]) == (202, 1)
        done = (await stack.http.get(f"/v1/tasks/{ids[0]}", params={"wait": 10})).json()
        assert (done["status"], done["output"]) == ("completed", "fixed")
        assert (await stack.http.get(f"/v1/dlq/{ids[0]}")).status_code == 404
        assert (await stack.http.get("/v1/dlq", params={"provider": "a.>"})).status_code == 400
        env = {
            "HIVE_NATS_URL": settings.nats_url, "HIVE_PREFIX": settings.prefix,
            "HIVE_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
            "HIVE_HEARTBEAT_TTL_S": str(settings.heartbeat_ttl_s),
        }  # fmt: skip
        listing = await anyio.to_thread.run_sync(
            lambda: hive_cli(["dlq", "list", "--provider", "tpl"], env=env)
        )
        assert listing.returncode == 0 and ids[1] in listing.stdout and ids[0] not in listing.stdout
        again = await anyio.to_thread.run_sync(lambda: hive_cli(["dlq", "replay", ids[1]], env=env))
        assert again.returncode == 0 and f"{ids[1]} queued again on tpl (run 1)" in again.stdout
        missing = await anyio.to_thread.run_sync(lambda: hive_cli(["dlq", "show", ids[1]], env=env))
        assert missing.returncode != 0 and "not among the dead letters" in missing.stderr
        none = await anyio.to_thread.run_sync(
            lambda: hive_cli(["dlq", "replay", "--all", "--provider", "nadie"], env=env)
        )  # once silent
        assert none.returncode == 0 and none.stdout.strip() == "no dead letters of nadie: nothing replayed"
        purged = await stack.http.delete(f"/v1/dlq/{ids[2]}")
        assert purged.json() == {"purged": 1}
    assert (await stack.http.get("/v1/dlq")).json() == []
