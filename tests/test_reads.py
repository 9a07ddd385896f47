"""What a user reads of a task: its content and metadata in ``GET /v1/tasks/{id}``, the list and ``hive
status``; the list's filters by metadata, batch and schedule; ``hive submit --webhook``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
import pytest

from hive_bus import Hive, Settings
from hive_bus._assigned import assignment
from hive_bus._embedded import NatsServer
from hive_bus._messages import Queued
from hive_bus.bus import Bus, open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.services.list_reads import ListReadLimits
from hive_bus.workers.echo import EchoProvider

from .conftest import make_settings
from .helpers import TcpRelay, events_of, hive_cli, running_worker

pytestmark = pytest.mark.anyio


def _cli(settings: Settings, *args: str) -> list[str]:
    return [*args, "--nats", settings.nats_url, "--prefix", settings.prefix]


# the test bus's heartbeat settings (conftest.make_settings), which a command checks its buckets against
CLI_ENV = {"HIVE_HEARTBEAT_INTERVAL_S": "0.5", "HIVE_HEARTBEAT_TTL_S": "1.5"}


async def test_submit_webhook_flag_puts_the_url_and_events_on_the_task(bus: Bus, settings: Settings) -> None:
    args = ["submit", "nobody", "un tuit", "--webhook", "https://hooks.example.com/done,task.failed"]
    done = hive_cli(_cli(settings, *args), env=CLI_ENV)
    assert done.returncode == 0, done.stderr
    [queued, *_] = await events_of(bus, done.stdout.strip())
    here = await assignment(bus, done.stdout.strip())  # the task as queued: its message
    assert isinstance(queued, Queued) and here is not None and here.task.webhook is not None
    assert (here.task.webhook.url, here.task.webhook.events) == (
        "https://hooks.example.com/done",
        ["task.failed"],
    )
    every = hive_cli(
        _cli(settings, "submit", "nobody", "x", "--webhook", "https://hooks.example.com/all"), env=CLI_ENV
    )
    here = await assignment(bus, every.stdout.strip())
    assert here is not None and here.task.webhook is not None
    assert here.task.webhook.events == ["task.completed", "task.failed", "task.cancelled"]


def test_submit_webhook_flag_names_an_unknown_event(settings: Settings) -> None:
    args = ["submit", "nobody", "x", "--webhook", "https://hooks.example.com/h,task.done"]
    done = hive_cli(_cli(settings, *args), env=CLI_ENV)
    assert done.returncode == 2
    assert "--webhook" in done.stderr and "'task.done'" in done.stderr, done.stderr
    bad_url = hive_cli(_cli(settings, "submit", "nobody", "x", "--webhook", "ftp://h/x"), env=CLI_ENV)
    assert bad_url.returncode == 1
    assert "url must be an http:// or https:// URL" in bad_url.stderr, bad_url.stderr


@dataclass
class Stack:
    settings: Settings
    bus: Bus
    http: httpx.AsyncClient


@asynccontextmanager
async def serving(settings: Settings, list_reads: ListReadLimits | None = None) -> AsyncIterator[Stack]:
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0, list_reads=list_reads or ListReadLimits()))
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=15) as http:
                yield Stack(settings, bus, http)
            gateway.stop()


@pytest.fixture
async def stack(nats_server: NatsServer) -> AsyncIterator[Stack]:
    # a claim check at 4 KiB, so that a task's content goes to the Object Store without a huge body
    async with serving(make_settings(nats_server.url, claim_check_bytes=4096)) as s:
        yield s


async def _submit(stack: Stack, body: dict[str, object]) -> str:
    r = await stack.http.post("/v1/tasks", json=body)
    assert r.status_code == 202, r.text
    task_id: str = r.json()["id"]
    return task_id


async def test_a_task_read_shows_its_prompt_and_metadata_whole_and_the_list_cut(stack: Stack) -> None:
    long_prompt = "Escribe un hilo sobre colas de mensajes. " * 20  # 820 characters
    meta = {"customer": "acme", "campaign": {"name": "otoño", "week": 48}}
    task_id = await _submit(
        stack, {"provider": "nobody", "prompt": long_prompt, "system": "breve", "metadata": meta}
    )
    one = (await stack.http.get(f"/v1/tasks/{task_id}")).json()
    assert (one["prompt"], one["system"], one["metadata"]) == (long_prompt, "breve", meta)
    assert "content_cut" not in one

    [listed] = (await stack.http.get("/v1/tasks")).json()
    assert listed["id"] == task_id
    assert (listed["prompt"], listed["content_cut"]) == (long_prompt[:200], True)
    assert (listed["system"], listed["metadata"]) == ("breve", meta)

    waited = (await stack.http.get(f"/v1/tasks/{task_id}", params={"wait": 0.2})).json()
    assert (waited["status"], waited["prompt"], waited["metadata"]) == ("queued", long_prompt, meta)


async def test_a_conversation_is_read_whole_and_listed_first_and_last_messages(stack: Stack) -> None:
    turns = [{"role": "system", "content": "Eres conciso."}] + [
        {"role": "user" if i % 2 else "assistant", "content": f"turno {i} " + "x" * (150 * i)}
        for i in range(1, 7)
    ]
    task_id = await _submit(stack, {"provider": "nobody", "messages": turns})
    one = (await stack.http.get(f"/v1/tasks/{task_id}")).json()
    assert one["messages"] == turns and "prompt" not in one

    [listed] = (await stack.http.get("/v1/tasks")).json()
    assert listed["content_cut"] is True
    kept = [turns[0], *turns[-3:]]
    assert [m["role"] for m in listed["messages"]] == [m["role"] for m in kept]
    assert [m["content"] for m in listed["messages"]] == [str(m["content"])[:200] for m in kept]


async def test_a_claim_checked_task_shows_where_its_content_is_and_its_size(stack: Stack) -> None:
    big = "Un guion de vídeo largo. " * 400  # over the 4 KiB claim check
    task_id = await _submit(stack, {"provider": "nobody", "prompt": big, "metadata": {"k": "v"}})
    one = (await stack.http.get(f"/v1/tasks/{task_id}")).json()
    assert "prompt" not in one and one["metadata"] == {"k": "v"}
    assert one["content_stored_bytes"] > len(big)
    [listed] = (await stack.http.get("/v1/tasks")).json()
    assert "prompt" not in listed and listed["content_stored_bytes"] == one["content_stored_bytes"]


async def test_a_completed_task_read_after_a_wait_keeps_its_prompt(stack: Stack) -> None:
    async with running_worker(stack.bus, "echo", EchoProvider()):
        task_id = await _submit(stack, {"provider": "echo", "prompt": "hola", "metadata": {"n": 1}})
        done = (await stack.http.get(f"/v1/tasks/{task_id}", params={"wait": 10})).json()
    assert (done["status"], done["output"], done["prompt"], done["metadata"]) == (
        "completed",
        "hola",
        "hola",
        {"n": 1},
    )
    status = hive_cli(_cli(stack.settings, "status", task_id), env=CLI_ENV)
    shown = json.loads(status.stdout)
    assert (shown["status"], shown["prompt"], shown["metadata"]) == ("completed", "hola", {"n": 1})


async def _submit_many(stack: Stack, tasks: Sequence[Mapping[str, object]]) -> list[str]:
    r = await stack.http.post("/v1/tasks/batch", json={"tasks": tasks})
    assert r.status_code == 202, r.text
    return [item["id"] for item in r.json()["tasks"]]


async def _listed(stack: Stack, **params: object) -> list[str]:
    r = await stack.http.get("/v1/tasks", params=params)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    return [view["id"] for view in r.json()]


async def test_filters_return_exactly_the_tagged_tasks_older_than_the_events_tail(stack: Stack) -> None:
    untagged = [{"provider": "nobody", "prompt": f"sin etiqueta {i}"} for i in range(150)]
    acme = [
        {"provider": "nobody", "prompt": f"acme {i}", "metadata": {"customer": "acme", "n": i}}
        for i in range(12)
    ]
    old_acme = await _submit_many(stack, acme[:9])
    await _submit_many(stack, untagged[:75])
    batch = await _submit_many(
        stack,
        [
            {"provider": "nobody", "prompt": f"línea {i}", "metadata": {"batch_id": "batch_1"}}
            for i in range(4)
        ],
    )
    await _submit_many(stack, [{"provider": "nobody", "prompt": "otro", "metadata": {"customer": "acme-2"}}])
    schedule = await _submit_many(
        stack,
        [
            {
                "provider": "other",
                "prompt": "cada día",
                "metadata": {"schedule_id": "sch_9", "customer": "acme"},
            }
        ],
    )
    await _submit_many(stack, untagged[75:])
    new_acme = await _submit_many(stack, acme[9:])
    every_acme = [*old_acme, *schedule, *new_acme]

    # the events tail read for a list of 5 (40 events) holds none of the tagged tasks but the newest
    assert not set(old_acme) & set(await _listed(stack, limit=5))
    assert await _listed(stack, meta="customer:acme", limit=50) == every_acme[::-1]
    assert await _listed(stack, meta="customer:acme", limit=5) == every_acme[::-1][:5]
    assert await _listed(stack, meta="customer:acme", limit=11) == every_acme[::-1][:11]
    assert await _listed(stack, batch="batch_1") == batch[::-1]
    assert await _listed(stack, schedule="sch_9") == schedule
    assert await _listed(stack, meta=["customer:acme", "n:3"]) == []  # n is a number: not indexed
    assert await _listed(stack, meta="customer:acme", provider="other") == schedule
    assert await _listed(stack, meta="customer:nobody") == []

    cancelled = await stack.http.post(f"/v1/tasks/{old_acme[1]}/cancel")
    assert cancelled.status_code == 200
    assert await _listed(stack, meta="customer:acme", status="cancelled") == [old_acme[1]]

    [view] = (await stack.http.get("/v1/tasks", params={"schedule": "sch_9"})).json()
    assert (view["prompt"], view["metadata"]) == ("cada día", {"schedule_id": "sch_9", "customer": "acme"})

    # untagged tasks pay nothing: one index entry per string value of a tagged task's metadata
    info = await stack.bus.js.stream_info(stack.bus.names.index_stream)
    assert info.state.messages == 12 + 4 + 1 + 2

    bad = await stack.http.get("/v1/tasks", params={"meta": "customer"})
    assert bad.status_code == 400 and "KEY:VALUE" in bad.json()["error"]["message"]

    listed = hive_cli(_cli(stack.settings, "list", "--meta", "customer:acme", "--limit", "3"), env=CLI_ENV)
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == every_acme[::-1][:3]
    # without metadata, the CLI lists the recent tasks as GET /v1/tasks does, with the same filters
    recent = hive_cli(_cli(stack.settings, "list", "--limit", "5"), env=CLI_ENV)
    assert [json.loads(line)["id"] for line in recent.stdout.splitlines()] == await _listed(stack, limit=5)
    waiting = hive_cli(_cli(stack.settings, "list", "--provider", "other", "--status", "queued"), env=CLI_ENV)
    assert [json.loads(line)["id"] for line in waiting.stdout.splitlines()] == schedule
    refused = hive_cli(_cli(stack.settings, "list", "--provider", "a.*"), env=CLI_ENV)
    assert refused.returncode == 1 and refused.stderr.strip() == (
        "Error: provider 'a.*' must be 1-64 letters, digits, '_' or '-'"
    )


async def test_a_status_filter_reaches_back_past_the_tail_a_limit_reads(stack: Stack) -> None:
    """``GET /v1/tasks?status=`` reads further back while too few tasks of the tail have the status:
    two tasks cancelled before a hundred others are listed with ``limit=3``, whose first read (24
    events) holds neither (the answer was empty)."""
    early = await _submit_many(stack, [{"provider": "nobody", "prompt": f"pronto {i}"} for i in range(2)])
    for task_id in early:
        assert (await stack.http.post(f"/v1/tasks/{task_id}/cancel")).status_code == 200
    await _submit_many(stack, [{"provider": "nobody", "prompt": f"después {i}"} for i in range(100)])
    assert not set(early) & set(await _listed(stack, limit=3))
    assert await _listed(stack, status="cancelled", limit=3) == early[::-1]
    assert len(await _listed(stack, status="queued", limit=3)) == 3  # the newest: no read further back


async def test_the_openapi_document_names_the_list_filters(stack: Stack) -> None:
    schema = (await stack.http.get("/openapi.json")).json()
    params = {p["name"] for p in schema["paths"]["/v1/tasks"]["get"]["parameters"]}
    assert {"meta", "batch", "schedule"} <= params


async def test_list_reads_beyond_the_gateways_bound_wait_then_answer_503(settings: Settings) -> None:
    """GET /v1/tasks reads a few lists at a time: one that waited its turn too long is a 503 with
    Retry-After, never a 500; eighty at once of 500 tasks each took a gateway's memory past 400 MB."""
    async with serving(settings, ListReadLimits(at_once=1, wait_s=0.05)) as stack:
        hive = Hive(stack.bus)
        for i in range(300):
            await hive.submit("nobody", prompt=f"p{i}")
        answers: list[httpx.Response] = []

        async def list_all() -> None:
            answers.append(await stack.http.get("/v1/tasks", params={"limit": 500}))

        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(list_all)
    codes = sorted({r.status_code for r in answers})
    assert codes == [200, 503], codes
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.json()["error"]["code"] == "busy" and busy.headers["Retry-After"] == "2", busy.text
    assert all(len(r.json()) == 300 for r in answers if r.status_code == 200)


async def test_a_timeout_reading_the_events_tails_is_a_503(nats_server: NatsServer) -> None:
    """A tail read that the bus does not answer in time is a 503 naming the stream and the wait, not
    an ExceptionGroup out of the read's task group (a 500)."""
    relay = TcpRelay(int(nats_server.url.rsplit(":", 1)[1]))
    settings = make_settings(relay.url, request_timeout_s=1.0)
    async with serving(settings) as stack:
        try:
            await Hive(stack.bus).submit("nobody", prompt="x")
            assert (await stack.http.get("/v1/tasks", params={"provider": "nobody"})).status_code == 200
            relay.stall()
            r = await stack.http.get("/v1/tasks", params={"provider": "nobody"})
        finally:
            relay.cut()
    assert r.status_code == 503 and r.headers["Retry-After"] == "5", r.text
    error = r.json()["error"]
    assert error["code"] == "bus_unavailable", error
    stream = settings.names.events_stream_of("nobody")
    assert f"events of {stream} timed out after 1 s" in error["message"], error


async def test_tagged_submissions_at_once_declare_the_metadata_index_once(
    bus: Bus, hive: Hive, caplog: pytest.LogCaptureFixture
) -> None:
    # each of a burst's first tagged submissions declared the index stream (and its provider's events
    # stream) itself: "created stream ..._INDEX" up to fifty times a gateway, and as many requests
    caplog.set_level(logging.INFO, logger="hive_bus.bus")

    async def tagged(i: int) -> None:
        await hive.submit("once", f"etiqueta {i}", metadata={"lote": "a"})

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(tagged, i)
    created = [r.getMessage() for r in caplog.records if r.getMessage().startswith("created stream")]
    for stream in (bus.names.index_stream, bus.names.events_stream_of("once")):
        assert created.count(f"created stream {stream}") == 1, created


async def test_listing_the_tasks_leaves_no_consumer_on_the_bus(stack: Stack) -> None:
    """Each list read the tail of each provider's events through an ordered consumer and only
    unsubscribed, leaving the consumer to the server for 5 s more: a soak listing tasks and reading
    filtered lists every few seconds kept dozens, and a client listing them ten times a second would
    keep some fifty per provider. The read now deletes its consumer when it ends."""
    task_id = await _submit(stack, {"provider": "echo", "prompt": "hola"})
    lists: list[dict[str, str | int]] = [
        {"limit": 50},
        {"status": "queued"},
        {"status": "failed", "limit": 5},
    ]
    for params in lists:
        listed = await stack.http.get("/v1/tasks", params=params)
        assert listed.status_code == 200, listed.text
    assert [t["id"] for t in (await stack.http.get("/v1/tasks")).json()] == [task_id]
    names = stack.bus.names
    left = [
        c.name
        for c in await stack.bus.js.consumers_info(names.events_stream_of("echo"))
        if c.config.filter_subject == names.events("echo")  # the lists' (the gateway's own filter less)
    ]
    assert left == []
