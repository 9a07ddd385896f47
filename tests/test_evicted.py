"""A task whose events the events stream evicted (its byte limit, ``HIVE_EVENTS_MAX_BYTES``) while its
task message is still in the tasks stream: its worker acked it, so it has ended with its record gone.
Every reader says so (status ``evicted``) instead of ``queued``, and a wait on it ends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import pytest

from hive_bus import FunctionProvider, Hive, HiveError, RetryLater, Task
from hive_bus._embedded import NatsServer
from hive_bus.bus import Bus
from hive_bus.workers.echo import EchoProvider

from .conftest import make_settings
from .helpers import events_of, eventually, hive_cli, running_worker
from .test_reads import CLI_ENV, Stack, _cli, serving

pytestmark = pytest.mark.anyio

EVENTS_MAX_BYTES = 48 * 1024
PROMPT = "x" * 2000  # echo's output is its input: a completed event of about 2 KB
LATER = 40  # tasks after the first, whose events push the first's out


async def _push_out(hive: Hive) -> None:
    """Enough completed tasks to evict every event of the tasks before them; each waited for before the
    next, so that its own events are there until it has ended."""
    for _ in range(LATER):
        assert (await hive.wait(await hive.submit("echo", PROMPT), 10)).status == "completed"


async def test_a_completed_task_whose_events_were_evicted_reads_evicted_everywhere(
    nats_server: NatsServer,
) -> None:
    settings = make_settings(nats_server.url, events_max_bytes=EVENTS_MAX_BYTES)
    async with serving(settings) as stack, running_worker(stack.bus, "echo", EchoProvider()):
        http = stack.http
        r = await http.post(
            "/v1/tasks", json={"provider": "echo", "prompt": PROMPT, "metadata": {"c": "acme"}}
        )
        first = r.json()["id"]
        assert (await http.get(f"/v1/tasks/{first}", params={"wait": 10})).json()["status"] == "completed"
        chat = {"model": "echo", "messages": [{"role": "user", "content": "hola"}]}
        asked = await http.post("/v1/chat/completions", json=chat, headers={"Idempotency-Key": "pedido-7"})
        assert asked.status_code == 200, asked.text
        hive = Hive(stack.bus)
        await _push_out(hive)
        await hive.close()
        assert await events_of(stack.bus, first) == []  # evicted; its task message is kept

        read = (await http.get(f"/v1/tasks/{first}")).json()
        assert (read["status"], read["prompt"], read["metadata"]) == ("evicted", PROMPT, {"c": "acme"})
        assert "HIVE_EVENTS_MAX_BYTES" in read["error"]
        with anyio.fail_after(5):  # a wait ends on it
            waited = (await http.get(f"/v1/tasks/{first}", params={"wait": 60})).json()
            async with http.stream("GET", f"/v1/tasks/{first}/events") as feed:
                lines = [line async for line in feed.aiter_lines() if line.startswith("event:")]
            again = await http.post(
                "/v1/chat/completions", json=chat, headers={"Idempotency-Key": "pedido-7"}
            )
        assert waited["status"] == "evicted" and lines == ["event: evicted"]
        assert again.status_code == 410 and again.json()["error"]["code"] == "task_evicted", again.text
        assert again.headers["x-hive-task-id"] == asked.headers["x-hive-task-id"]
        streamed = {**chat, "stream": True}
        with anyio.fail_after(15):  # a stream reads the task's state again after 5 s without news
            async with http.stream(
                "POST", "/v1/chat/completions", json=streamed, headers={"Idempotency-Key": "pedido-7"}
            ) as answer:
                data = [line async for line in answer.aiter_lines() if line.startswith("data:")]
        assert [json.loads(d[5:])["error"]["code"] for d in data] == ["task_evicted"]

        listed = (await http.get("/v1/tasks", params={"meta": "c:acme"})).json()
        assert [(v["id"], v["status"]) for v in listed] == [(first, "evicted")]
        by_status = await http.get("/v1/tasks", params={"meta": "c:acme", "status": "evicted"})
        assert [v["id"] for v in by_status.json()] == [first]
        tail = await http.get("/v1/tasks", params={"status": "evicted"})  # was [], as if none were
        assert tail.status_code == 400 and tail.json()["error"]["field"] == "status", tail.text
        assert "only with meta, batch or schedule" in tail.json()["error"]["message"]
        tail_cli = hive_cli(_cli(stack.settings, "list", "--status", "evicted"), env=CLI_ENV)
        assert tail_cli.returncode == 2 and "only with --meta" in tail_cli.stderr, tail_cli.stderr
        by_meta = hive_cli(
            _cli(stack.settings, "list", "--meta", "c:acme", "--status", "evicted"), env=CLI_ENV
        )
        assert [json.loads(line)["id"] for line in by_meta.stdout.splitlines()] == [first], by_meta.stderr
        [echo] = [s for s in (await http.get("/v1/stats")).json() if s["provider"] == "echo"]
        assert echo["pending"] == 0  # not counted as queued (nor completed: its event is gone)

        other = Hive(stack.bus)  # another client's wait: none of its followers saw the task
        with pytest.raises(HiveError, match="status evicted is not read from the recent events"):
            await other.recent(status="evicted")  # was [], as if none were
        with anyio.fail_after(10):
            assert (await other.wait(first, 60)).status == "evicted"
            assert [v.status async for v in other.results([first])] == ["evicted"]
        await other.close()
        status = hive_cli(_cli(stack.settings, "status", first), env=CLI_ENV)
        assert status.returncode == 1, status.stderr
        assert json.loads(status.stdout)["status"] == "evicted"


async def test_a_task_no_worker_took_yet_reads_queued_or_cancelled_with_its_events_evicted(
    stack: Stack,
) -> None:
    hive = Hive(stack.bus)
    never = await hive.submit("nobody", "sin trabajador")  # its queue has no consumer
    async with running_worker(stack.bus, "echo", EchoProvider()):
        assert (await hive.wait(await hive.submit("echo", "uno"), 10)).status == "completed"
    later = await hive.submit("echo", "después")  # its consumer has not handed it out
    for provider, task_id in (("nobody", never), ("echo", later)):
        await _evicted_from(stack.bus, provider, task_id)
        assert (await hive.get(task_id)).status == "queued"
    dropped = await hive.submit("nobody", "cancelada")  # its cancel is kept in the cancels bucket too
    await hive.cancel(dropped, reason="ya no")
    await _evicted_from(stack.bus, "nobody", dropped)
    view = await hive.get(dropped)
    assert (view.status, view.error) == ("cancelled", "ya no")
    async with running_worker(stack.bus, "echo", EchoProvider()):
        assert (await hive.wait(later, 10)).status == "completed"
    await hive.close()


async def test_a_task_acked_behind_one_still_handed_out_reads_running_until_that_one_ends(
    stack: Stack,
) -> None:
    """Whether a task above its queue's ack floor was acked takes a read per message to tell: one handed
    out, with an older task of its queue still handed out (waiting out a backoff), reads running; once
    that older one ends, the floor passes it and it reads evicted."""

    async def answer(task: Task) -> str:
        if task.prompt == "luego":
            raise RetryLater("not yet")
        return task.prompt or ""

    hive = Hive(stack.bus)
    async with running_worker(stack.bus, "fn", FunctionProvider(answer)):
        held = await hive.submit("fn", "luego", backoff_base_s=120, backoff_cap_s=120)
        await eventually(lambda: _in(hive, held, "retrying"), 10, "the first task waiting out its backoff")
        done = await hive.submit("fn", "ahora")
        assert (await hive.wait(done, 10)).status == "completed"
        await _evicted_from(stack.bus, "fn", done)
        view = await hive.get(done)
        assert (view.status, view.reason) == ("running", "record evicted")
        await hive.cancel(held)  # its worker acks it once it hears
        await eventually(lambda: _in(hive, done, "evicted"), 10, "the floor past the evicted task")
    await hive.close()


async def _in(hive: Hive, task_id: str, status: str) -> bool | None:
    return True if (await hive.get(task_id)).status == status else None


async def _evicted_from(bus: Bus, provider: str, task_id: str) -> None:
    """Drop every event of the task, as the events stream's byte limit would."""
    names = bus.names
    await bus.js.purge_stream(names.events_stream_of(provider), subject=names.events_of(task_id, provider))
    assert await events_of(bus, task_id) == []


async def test_a_task_whose_message_went_first_reads_its_events(stack: Stack) -> None:
    """The other way round: the tasks stream dropped the task message (its age), its events are kept."""
    async with running_worker(stack.bus, "echo", EchoProvider()):
        hive = Hive(stack.bus)
        task_id = await hive.submit("echo", "hola")
        assert (await hive.wait(task_id, 10)).status == "completed"
        names = stack.bus.names
        await stack.bus.js.purge_stream(names.tasks_stream, subject=names.tasks_of(task_id))
        view = await hive.get(task_id)
        assert (view.status, view.output) == ("completed", "hola")
        await hive.close()


@pytest.fixture
async def stack(nats_server: NatsServer) -> AsyncIterator[Stack]:
    async with serving(make_settings(nats_server.url)) as s:
        yield s
