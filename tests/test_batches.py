"""Batches (issue 15): OpenAI's Batch API on the gateway, driven by the real ``openai`` SDK; a batch is an
object of the bus (KV state, files in the Object Store, lines as tasks), so a second gateway or a
restarted one neither loses nor doubles a line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import typing
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import nats.js.errors
import openai
import pytest
from nats.js.api import KeyValueConfig
from openai.types import Batch as OpenAIBatch
from openai.types import FileObject

from hive_bus import FailNow, FunctionProvider, Hive, Queued, Settings, Task, TaskNotFound, TaskRequest
from hive_bus._batches import Batch, BatchStore, RequestCounts, create_batch, estimate, line_task_id, replace
from hive_bus._budget import load_budgets
from hive_bus._bus import ensure_events
from hive_bus._embedded import NatsServer
from hive_bus._files import FileStore, Upload
from hive_bus._messages import encoder
from hive_bus._routes import Routes
from hive_bus.bus import Bus, open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider
from hive_bus.workers.gemini import GeminiProvider
from hive_bus.workers.groq import GroqProvider

from .conftest import make_settings
from .fakes import ProviderFakes
from .faults.stack import settings_env
from .helpers import TcpRelay, eventually, hive_cli, openai_shaped, running_worker, spawn, unacked

pytestmark = pytest.mark.anyio

KEY = "gsk_batch_key_0123456789"


def line(custom_id: str, content: str, model: str = "echo", **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body, **extra}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x, ensure_ascii=False).encode() + b"\n" for x in lines)


@dataclass
class Stack:
    bus: Bus
    hive: Hive
    gateway: Gateway
    client: openai.AsyncOpenAI


@asynccontextmanager
async def serving(settings: Settings, routes: Routes | None = None) -> AsyncIterator[Stack]:
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        gateway = Gateway(hive, GatewayOptions(port=0, routes=routes or Routes()))
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            async with openai.AsyncOpenAI(
                base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0
            ) as client:
                yield Stack(bus, hive, gateway, client)
            gateway.stop()


async def ended(client: openai.AsyncOpenAI, batch_id: str, timeout_s: float = 60) -> OpenAIBatch:
    async def probe() -> OpenAIBatch | None:
        batch = await client.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "expired", "cancelled") else None

    return await eventually(probe, timeout_s, f"batch {batch_id} to end")


async def output_lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await client.files.content(file_id)
    return [json.loads(x) for x in content.read().splitlines()]


async def test_a_batch_runs_end_to_end_with_the_openai_sdk_and_its_output_is_in_input_order(
    settings: Settings,
) -> None:
    lines = [line(f"post-{i}", f"Un tuit sobre café número {i}") for i in range(40)]
    async with serving(settings) as stack, running_worker(stack.bus, "echo", EchoProvider(), concurrency=8):
        client = stack.client
        # a gateway makes no bucket for batches before the bus has one (JetStream reserves its bytes)
        assert await BatchStore.find(stack.bus) is None
        uploaded = await client.files.create(file=("posts.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"week": "49"},
        )
        assert (batch.status, batch.input_file_id, batch.metadata) == (
            "validating",
            uploaded.id,
            {"week": "49"},
        )
        done = await ended(client, batch.id)
        assert done.status == "completed"
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
            40,
            40,
            0,
        )
        assert done.error_file_id is None
        out = await output_lines(client, done.output_file_id)
        assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines]  # input order
        for o, x in zip(out, lines, strict=True):
            assert o["error"] is None
            assert o["response"]["status_code"] == 200
            body = o["response"]["body"]
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"]["content"] == x["body"]["messages"][0]["content"]
        listed = await client.batches.list(limit=10)
        assert [b.id for b in listed.data] == [batch.id]
        assert (await client.files.retrieve(done.output_file_id or "")).purpose == "batch_output"


async def test_a_bad_line_fails_the_batch_with_its_number_and_nothing_is_queued(settings: Settings) -> None:
    lines = [line("a", "one"), line("b", "two"), line("a", "three"), line("c", "four", model="nope/x")]
    lines.append({**line("d", "five"), "url": "/v1/embeddings"})
    async with serving(settings) as stack:
        client = stack.client
        uploaded = await client.files.create(file=("bad.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await ended(client, batch.id)
        assert done.status == "failed"
        assert done.errors is not None and done.errors.data is not None
        found = [(e.line, e.code) for e in done.errors.data]
        assert found == [(3, "duplicate_custom_id"), (4, "model_not_found"), (5, "invalid_request")]
        assert "used by an earlier line" in (done.errors.data[0].message or "")
        assert "/v1/embeddings" in (done.errors.data[2].message or "")
        info = await stack.bus.js.stream_info(stack.bus.names.tasks_stream)
        assert info.state.messages == 0


async def test_a_batch_request_with_a_bad_window_or_file_is_refused(settings: Settings) -> None:
    async with serving(settings) as stack:
        client = stack.client
        uploaded = await client.files.create(
            file=("x.jsonl", io.BytesIO(jsonl([line("a", "b")]))), purpose="batch"
        )
        with pytest.raises(openai.BadRequestError, match="completion_window '2d'"):
            await client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="2d",  # type: ignore[arg-type]
            )
        with pytest.raises(openai.NotFoundError, match="no file 'file-nope'"):
            await client.batches.create(
                input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
            )
        with pytest.raises(openai.NotFoundError, match="no batch"):
            await client.batches.retrieve("batch_0123456789abcdef01234567")


async def test_every_error_of_the_batch_routes_is_in_openais_shape(settings: Settings) -> None:
    async with serving(settings) as stack:
        with pytest.raises(openai.BadRequestError, match="query parameter 'limit'") as raised:
            await stack.client.batches.list(limit=0)
        error = raised.value
        assert (error.status_code, error.type, error.param, error.code) == (
            400, "invalid_request_error", "limit", "invalid_request",
        )  # fmt: skip
        async with httpx.AsyncClient(base_url=str(stack.client.base_url)) as http:
            answers = {
                "limit 0": await http.get("batches", params={"limit": 0}),
                "limit past 100": await http.get("batches", params={"limit": 101}),
                "limit not a number": await http.get("batches", params={"limit": "ten"}),
                "a path under it that is no route": await http.get("batches/batch_x/nope"),
                "a method it does not take": await http.delete("batches"),
                "a body that is not JSON": await http.post(
                    "batches", content=b"x", headers={"content-type": "text/plain"}
                ),
                "a body that is not a batch": await http.post("batches", json={"nope": 1}),
                "no such batch": await http.post("batches/batch_0123456789abcdef01234567/cancel"),
            }
    assert {case: r.status_code for case, r in answers.items()} == {
        "limit 0": 400,
        "limit past 100": 400,
        "limit not a number": 400,
        "a path under it that is no route": 404,
        "a method it does not take": 405,
        "a body that is not JSON": 415,
        "a body that is not a batch": 400,
        "no such batch": 404,
    }
    assert {case: r.text for case, r in answers.items() if not openai_shaped(r)} == {}
    assert answers["limit 0"].json()["error"]["param"] == "limit"


GROQ = "groq/llama-3.3-70b-versatile"


async def test_a_cancelled_batch_never_runs_its_queued_lines(settings: Settings) -> None:
    lines = [line(f"l{i}", f"p{i}") for i in range(20)]
    async with serving(settings) as stack:  # no echo worker yet: every line waits in the queue
        client = stack.client
        uploaded = await client.files.create(file=("c.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        store = await BatchStore.open(stack.bus)

        async def all_queued() -> bool:
            return (await store.get(batch.id)).enqueued == 20

        await eventually(all_queued, 30, "every line queued")
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling"
        done = await ended(client, batch.id)
        assert done.status == "cancelled"
        assert done.output_file_id is None
        errors = await output_lines(client, done.error_file_id)
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
            (f"l{i}", "batch_cancelled") for i in range(20)
        ]
        # their messages stay (the tasks stream is their record): the first worker drops them unrun
        async with running_worker(stack.bus, "echo", EchoProvider()) as worker:
            await eventually(lambda: _none_unacked(stack.bus), 10, "the cancelled lines dropped")
            assert worker.beat().completed == 0


async def test_past_its_window_a_batch_expires_with_the_finished_lines_in_its_output(
    settings: Settings,
) -> None:
    # echo lines run; groq lines wait for a groq worker that never comes
    lines = [line(f"e{i}", f"p{i}") if i % 2 == 0 else line(f"g{i}", f"p{i}", model=GROQ) for i in range(10)]
    async with serving(settings) as stack, running_worker(stack.bus, "echo", EchoProvider()):
        client = stack.client
        uploaded = await client.files.create(file=("w.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="3s",  # type: ignore[arg-type]  # ours: OpenAI takes only 24h
        )
        done = await ended(client, batch.id)
        assert done.status == "expired"
        assert done.expired_at is not None
        out = await output_lines(client, done.output_file_id)
        assert [o["custom_id"] for o in out] == [f"e{i}" for i in range(0, 10, 2)]
        errors = await output_lines(client, done.error_file_id)
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
            (f"g{i}", "batch_expired") for i in range(1, 10, 2)
        ]
        kept = await (await BatchStore.open(stack.bus)).get(batch.id)
        for error in errors:  # the unfinished lines were cancelled
            view = await stack.hive.get(line_task_id(kept, int(error["custom_id"][1:])))
            assert view.status == "cancelled"


async def _none_unacked(bus: Bus) -> bool:
    return await unacked(bus) == 0


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes() as f:
        yield f


@pytest.mark.slow
async def test_a_batch_over_two_providers_finishes_on_the_fallback_when_a_daily_quota_runs_out(
    settings: Settings, fakes: ProviderFakes, tmp_path: Path
) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(f'[aliases.posts]\ncandidates = ["gemini/gemini-2.5-flash", "{GROQ}"]\n')
    routes = Routes.load(path)
    fakes.gemini.daily_quota(500)  # half-way through the batch
    lines = [line(f"post-{i}", f"post {i}", model="posts") for i in range(1000)]
    async with AsyncExitStack() as stack_:
        stack = await stack_.enter_async_context(serving(settings, routes))
        gemini = GeminiProvider(api_key="gemini-key-0123456789", base_url=fakes.gemini_base_url)
        groq = GroqProvider(api_key=KEY, base_url=fakes.groq_base_url)
        await stack_.enter_async_context(running_worker(stack.bus, "gemini", gemini, concurrency=4))
        await stack_.enter_async_context(running_worker(stack.bus, "groq", groq, concurrency=4))
        client = stack.client
        uploaded = await client.files.create(file=("q.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await ended(client, batch.id, 240)
        assert done.status == "completed"
        out = await output_lines(client, done.output_file_id)
        assert [o["custom_id"] for o in out] == [f"post-{i}" for i in range(1000)]
        models = [o["response"]["body"]["model"].split("/")[0] for o in out]
        assert models.count("gemini") == 500
        assert models.count("groq") == 500
        assert all(o["response"]["body"]["choices"][0]["message"]["content"] for o in out)


async def test_two_gateways_on_one_bus_run_a_batch_once(settings: Settings) -> None:
    lines = [line(f"x{i}", f"p{i}") for i in range(300)]
    async with serving(settings) as one, serving(settings) as two:
        async with running_worker(one.bus, "echo", EchoProvider(), concurrency=8) as worker:
            uploaded = await one.client.files.create(
                file=("t.jsonl", io.BytesIO(jsonl(lines))), purpose="batch"
            )
            batch = await one.client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            done = await ended(two.client, batch.id)
            assert worker.beat().completed == 300  # each line ran once, though both gateways drive it
        assert done.status == "completed"
        # one of them ran it, under its lease; the other waited
        driver = (await (await BatchStore.open(one.bus)).get(batch.id)).driver
        assert driver in (one.gateway.batches.id, two.gateway.batches.id)
        out = await output_lines(two.client, done.output_file_id)
        assert [o["custom_id"] for o in out] == [f"x{i}" for i in range(300)]
        # one output file: the gateway that lost the race to complete the batch deleted its own
        outputs = [f for f in (await one.client.files.list()).data if f.purpose == "batch_output"]
        assert [f.id for f in outputs] == [done.output_file_id]


def _gateway_env(settings: Settings) -> dict[str, str]:
    return {
        **settings_env(settings),
        "HIVE_NATS_URL": settings.nats_url,
        "HIVE_DUPLICATE_WINDOW_S": str(settings.duplicate_window_s),
        "HIVE_BATCH_CHUNK_LINES": str(settings.batch_chunk_lines),
        "HIVE_BATCH_LEASE_S": str(settings.batch_lease_s),
    }


@pytest.mark.slow
async def test_a_gateway_killed_while_enqueueing_and_while_finalizing_leaves_each_line_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # a de-duplication window of 1s, waited out before each restart: only the batch's own record of
    # what it queued (and the lookup of the chunk it was queueing) keeps a line from running twice
    settings = make_settings(nats_server.url, duplicate_window_s=1.0, batch_chunk_lines=20, batch_lease_s=1.5)
    total = 600
    pad = "x" * 400  # outputs large enough that finalizing takes a while to write
    lines = [line(f"k{i}", f"{i} {pad}") for i in range(total)]
    env = _gateway_env(settings)
    args = ["gateway", "--port", "0"]
    async with open_bus(settings) as bus:
        files = await FileStore.open(bus)
        upload = Upload("kill.jsonl", "batch")
        upload.write(jsonl(lines))
        file = await files.put(upload)
        upload.close()
        store = await BatchStore.open(bus)
        batch = await create_batch(bus, file.id)

        first = spawn(args, env=env, log=tmp_path / "gw1.log")
        try:

            async def half_queued() -> Batch | None:
                now = await store.get(batch.id)
                return now if 0 < now.enqueued < total // 2 else None

            await eventually(half_queued, 30, "the first gateway to queue some lines")
        finally:
            first.kill()
            first.wait(10)
        cut = (await store.get(batch.id)).enqueued
        assert 0 < cut < total
        await anyio.sleep(1.5)  # past the de-duplication window

        async with running_worker(bus, "echo", EchoProvider(), concurrency=16) as worker:
            second = spawn(args, env=env, log=tmp_path / "gw2.log")
            try:

                async def finalizing() -> bool:
                    now = await store.get(batch.id)
                    assert now.status != "completed", "finalizing ended before the kill"
                    return now.status == "finalizing"

                await eventually(finalizing, 60, "the batch to be finalizing")
            finally:
                second.kill()
                second.wait(10)
            await anyio.sleep(1.5)
            third = spawn(args, env=env, log=tmp_path / "gw3.log")
            try:

                async def completed() -> Batch | None:
                    now = await store.get(batch.id)
                    return now if now.status == "completed" else None

                done = await eventually(completed, 60, "the batch to complete after the restarts")
            finally:
                third.terminate()
                third.wait(15)
            assert worker.beat().completed == total  # each line ran once
        # the second gateway was killed before it had written the files; the third wrote them
        assert f"batch {batch.id} completed" not in (tmp_path / "gw2.log").read_text()
        assert f"batch {batch.id} completed" in (tmp_path / "gw3.log").read_text()
        assert done.request_counts.completed == total
        assert done.output_file_id is not None
        _, chunks = await files.read(done.output_file_id)
        out = [json.loads(x) for x in b"".join([c async for c in chunks]).splitlines()]
        assert [o["custom_id"] for o in out] == [f"k{i}" for i in range(total)]
        assert [o["response"]["request_id"] for o in out] == [line_task_id(done, i) for i in range(total)]


def test_the_estimate_holds_the_rate_to_the_budgets_of_the_providers_a_batch_routes_to() -> None:
    budgets = load_budgets(None, "[gemini]\nrpm = 15\nrpd = 1500\n")
    # faster than gemini's budget allows so far: the budget bounds it; 3,200 lines at 1,500 a day
    # take two whole days of quota, then 200 lines at 15 a minute
    progress = estimate(3200, 40.0, ["gemini:gemini-2.5-flash"], budgets, now_s=0)
    assert progress.per_minute == 40.0
    assert progress.estimated_finish_at == 2 * 86400 + (200 // 15) * 60 + 20
    assert progress.basis == "at 15 a minute and 1,500 a day (gemini), 3,200 lines left"
    # a fallback without a budget bounds nothing: the rate seen is the estimate's
    spread = estimate(600, 120.0, ["gemini:gemini-2.5-flash", "groq"], budgets, now_s=0)
    assert spread.estimated_finish_at == 300
    assert spread.basis == "at 120 a minute (gemini), 600 lines left"
    assert estimate(10, 0.0, ["groq"], budgets, now_s=0).estimated_finish_at is None


async def test_a_running_batch_shows_its_rate_and_estimated_finish(nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url, budgets="[echo]\nrpm = 4\nwindow_s = 1\n")
    lines = [line(f"r{i}", f"p{i}") for i in range(24)]
    limits = load_budgets(None, settings.budgets)["echo"]
    async with serving(settings) as stack, running_worker(stack.bus, "echo", EchoProvider(), budget=limits):
        client = stack.client
        uploaded = await client.files.create(file=("r.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        async def estimated() -> dict[str, Any] | None:
            now = (await client.batches.retrieve(batch.id)).to_dict()
            progress: dict[str, Any] = typing.cast(dict[str, Any], now.get("progress") or {})
            return progress if progress.get("estimated_finish_at") and progress["per_minute"] > 0 else None

        progress = await eventually(estimated, 30, "a progress estimate")
        assert progress["basis"].startswith("at ") and "(echo)" in progress["basis"]
        assert progress["estimated_finish_at"] >= batch.created_at
        assert (await ended(client, batch.id)).status == "completed"


async def test_the_python_client_creates_waits_for_and_reads_a_batch_in_input_order(
    settings: Settings,
) -> None:
    # every other line on groq, which has no worker: cancelled half-way, the echo lines are done
    lines = [line(f"c{i}", f"p{i}") for i in range(6)] + [line("g", "later", model=GROQ)]
    async with serving(settings) as stack, running_worker(stack.bus, "echo", EchoProvider()):
        hive = stack.hive
        batch = await hive.create_batch(lines, metadata={"by": "client"})
        assert (await hive.batch(batch.id)).metadata == {"by": "client"}
        seen: list[str] = []

        async def echo_lines_done() -> bool:
            now = await hive.batch(batch.id)
            return now.request_counts.completed == 6

        await eventually(echo_lines_done, 30, "the echo lines to complete")
        assert (await hive.cancel_batch(batch.id)).status == "cancelling"
        done = await hive.wait_batch(batch.id, timeout_s=30, progress=lambda b: seen.append(b.status))
        assert done.status == "cancelled"
        assert seen[-1] == "cancelled"
        got = [item async for item in hive.batch_results(batch.id)]
        assert [g["custom_id"] for g in got] == [x["custom_id"] for x in lines]  # output and errors merged
        assert [g["error"]["code"] if g["error"] else 200 for g in got] == [200] * 6 + ["batch_cancelled"]
        assert [b.id for b in await hive.batches()] == [batch.id]


@pytest.mark.slow
async def test_hive_batch_create_waits_with_a_progress_bar_and_results_come_back_in_order(
    settings: Settings, tmp_path: Path
) -> None:
    lines = [line(f"s{i}", f"post {i}") for i in range(30)]
    path = tmp_path / "posts.jsonl"
    path.write_bytes(jsonl(lines))
    env = _gateway_env(settings)
    async with serving(settings) as stack, running_worker(stack.bus, "echo", EchoProvider()):
        made = await anyio.to_thread.run_sync(
            lambda: hive_cli(
                ["batch", "create", str(path), "--wait", "--timeout", "60"], env=env, timeout_s=90
            )
        )
        assert made.returncode == 0, made.stderr
        done = json.loads(made.stdout)
        assert (done["status"], done["request_counts"]["completed"]) == ("completed", 30)
        assert "30/30" in made.stderr  # the progress bar, on stderr
        out = tmp_path / "out.jsonl"
        got = await anyio.to_thread.run_sync(
            lambda: hive_cli(["batch", "results", done["id"], "-o", str(out)], env=env)
        )
        assert got.returncode == 0, got.stderr
        assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == [
            f"s{i}" for i in range(30)
        ]
        status = await anyio.to_thread.run_sync(lambda: hive_cli(["batch", "status", done["id"]], env=env))
        assert (status.returncode, status.stdout.split()[1]) == (0, "completed:")
        listed = await anyio.to_thread.run_sync(lambda: hive_cli(["batch", "list"], env=env))
        assert done["id"] in listed.stdout

        # --model sends every line to one model: these lines name none of their own
        bare = tmp_path / "bare.jsonl"
        bare.write_bytes(jsonl([{**x, "body": {"messages": x["body"]["messages"]}} for x in lines[:3]]))
        modelled = await anyio.to_thread.run_sync(
            lambda: hive_cli(
                ["batch", "create", str(bare), "--model", "echo", "--wait"], env=env, timeout_s=90
            )
        )
        assert modelled.returncode == 0, modelled.stderr
        assert json.loads(modelled.stdout)["request_counts"]["completed"] == 3

        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(jsonl([line("a", "x"), {**line("b", "y"), "method": "GET"}]))
        failed = await anyio.to_thread.run_sync(
            lambda: hive_cli(
                ["batch", "create", str(bad), "--wait", "--timeout", "60"], env=env, timeout_s=90
            )
        )
        assert failed.returncode == 1
        failed_id = json.loads(failed.stdout)["id"]
        errors = await anyio.to_thread.run_sync(lambda: hive_cli(["batch", "errors", failed_id], env=env))
        assert [json.loads(x)["line"] for x in errors.stdout.splitlines()] == [2]


async def test_hive_batch_says_so_when_no_gateway_takes_a_batch_up(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "posts.jsonl"
    path.write_bytes(jsonl([line("a", "x")]))
    env = _gateway_env(settings)  # the bus, and no gateway on it
    waited = await anyio.to_thread.run_sync(
        lambda: hive_cli(["batch", "create", str(path), "--wait", "--timeout", "1"], env=env)
    )
    assert waited.returncode == 2, waited.stderr
    assert "no gateway has taken it up" in waited.stderr and "hive up" in waited.stderr, waited.stderr
    batch_id = json.loads(waited.stdout)["id"]
    status = await anyio.to_thread.run_sync(lambda: hive_cli(["batch", "status", batch_id], env=env))
    assert status.returncode == 2 and "no gateway has taken it up" in status.stdout, status.stdout


async def refuse_some(task: Task) -> str:
    if "bad" in task.prompt:
        raise FailNow("provider said 400: the prompt is not allowed")
    return task.prompt.upper()


async def test_failed_lines_go_to_the_error_file_with_the_error_a_chat_completion_would_answer(
    settings: Settings,
) -> None:
    lines = [line("ok-1", "good one", model="picky"), line("no-2", "bad one", model="picky")]
    lines.append(line("ok-3", "good two", model="picky"))
    async with serving(settings) as stack, running_worker(stack.bus, "picky", FunctionProvider(refuse_some)):
        client = stack.client
        uploaded = await client.files.create(file=("f.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await ended(client, batch.id)
        assert done.status == "completed"
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
        out = await output_lines(client, done.output_file_id)
        assert [(o["custom_id"], o["response"]["body"]["choices"][0]["message"]["content"]) for o in out] == [
            ("ok-1", "GOOD ONE"), ("ok-3", "GOOD TWO"),
        ]  # fmt: skip
        errors = await output_lines(client, done.error_file_id)
        assert [e["custom_id"] for e in errors] == ["no-2"]
        response = errors[0]["response"]
        assert response["status_code"] == 502
        assert response["body"]["error"]["code"] == "provider_refused"
        assert "the prompt is not allowed" in response["body"]["error"]["message"]


async def test_a_line_larger_than_a_task_may_carry_fails_validation(nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url, claim_check_bytes=1024, blob_max_bytes=4096)
    lines = [line("small", "hola"), line("huge", "x" * 8000)]
    async with serving(settings) as stack:
        uploaded = await stack.client.files.create(
            file=("l.jsonl", io.BytesIO(jsonl(lines))), purpose="batch"
        )
        batch = await stack.client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await ended(stack.client, batch.id)
        assert done.status == "failed"
        assert done.errors is not None and done.errors.data is not None
        assert [(e.line, e.code) for e in done.errors.data] == [(2, "too_large")]


async def test_a_batch_that_cannot_queue_its_lines_logs_why(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch whose lines the bus refused (the tasks stream full) logged every 2 s 'batch ...: unhandled
    errors in a TaskGroup (1 sub-exception); trying again in 2s', which says neither what nor where: the
    error raised inside the step's own task group came in a group of its own. The log says the error."""
    settings = make_settings(nats_server.url, tasks_max_msgs=2)
    async with serving(settings) as stack:
        for i in range(2):
            await stack.hive.submit("nobody", f"ocupa {i}")
        caplog.set_level(logging.WARNING, logger="hive_bus.batches")
        uploaded = await stack.client.files.create(
            file=("l.jsonl", io.BytesIO(jsonl([line("a", "hola")]))), purpose="batch"
        )
        batch = await stack.client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        async def retried() -> list[str]:
            return [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]

        [said, *_] = await eventually(retried, 15, "the batch runner to try again")
        assert "_TASKS stream is full (maximum messages exceeded)" in said, said
        assert said.startswith(f"batch {batch.id}: ")
        assert (await stack.client.batches.retrieve(batch.id)).status == "in_progress"


async def test_a_line_cut_off_between_its_queued_event_and_its_task_is_queued_again_on_resume(
    settings: Settings, tmp_path: Path
) -> None:
    """A gateway of an older hive-bus killed between a line's two publishes (its queued event stored,
    its task not) leaves a line the bus has heard of but will never run: the next gateway queues it
    again. (A submission now stores its task alone, so no such gap is left any more.)"""
    lines = [line(f"q{i}", f"p{i}") for i in range(3)]
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        made = await hive.create_batch(lines)
        store = await BatchStore.open(bus)
        # as a gateway left it: validated, no line recorded as queued, line 0's queued event stored alone
        await store.change(
            made.id,
            lambda b: replace(
                b,
                status="in_progress",
                request_counts=RequestCounts(total=3),
                driver="gone",
                driver_until_ms=1,
            ),
        )
        batch = await store.get(made.id)
        request = TaskRequest(
            provider="echo", prompt="p0", idempotency_key=f"batch:{batch.id}:0",
            metadata={"batch_id": batch.id, "custom_id": "q0", "line": 0},
        )  # fmt: skip
        task = msgspec.structs.replace(Task.from_request(request), id=line_task_id(batch, 0))
        # as a gateway before one write per submission left it: a queued event carrying the task
        queued = Queued(task_id=task.id, provider=task.provider, at_ms=task.submitted_at_ms, task=task)
        await ensure_events(hive.bus, task.provider)  # where the upgrade puts such an event
        await hive.bus.js.publish(
            hive.bus.names.event_subject(task.provider, task.id, "queued"), encoder.encode(queued)
        )
        assert (await hive.get(task.id)).status == "queued"
    async with serving(settings) as stack, running_worker(stack.bus, "echo", EchoProvider()):
        done = await ended(stack.client, batch.id)
        assert done.status == "completed"
        out = await output_lines(stack.client, done.output_file_id)
        assert [(o["custom_id"], o["response"]["status_code"]) for o in out] == [
            ("q0", 200),
            ("q1", 200),
            ("q2", 200),
        ]


async def test_a_bus_that_does_not_answer_is_a_503_with_retry_after_on_the_batch_routes(
    nats_server: NatsServer,
) -> None:
    """The batch routes' 503 says when to try again, as every other 503 of the gateway does, and why: it
    had no ``Retry-After`` (the SDK retried at once), and a read timed out said "could not list the
    batches: " with nothing after."""
    relay = TcpRelay(int(nats_server.url.rsplit(":", 1)[1]))
    async with serving(make_settings(relay.url, request_timeout_s=1.0)) as stack:
        uploaded = await stack.client.files.create(
            file=("a.jsonl", io.BytesIO(jsonl([line("a", "x")]))), purpose="batch"
        )
        batch = await stack.client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert [b.id for b in (await stack.client.batches.list()).data] == [batch.id]  # the store opened
        async with httpx.AsyncClient(base_url=f"{stack.gateway.url}/v1", timeout=30) as http:
            try:
                relay.stall()
                answers = {
                    "list": await http.get("/batches"),
                    "retrieve": await http.get(f"/batches/{batch.id}"),
                    "cancel": await http.post(f"/batches/{batch.id}/cancel"),
                }
            finally:
                relay.cut()
    assert {name: (r.status_code, r.headers.get("retry-after")) for name, r in answers.items()} == {
        name: (503, "5") for name in answers
    }
    for name, r in answers.items():
        error = r.json()["error"]
        assert error["code"] == "bus_unavailable" and not error["message"].endswith(": "), (name, error)
    assert answers["list"].json()["error"]["message"].startswith("could not list the batches: ")


async def _one_line_waiting(client: openai.AsyncOpenAI) -> tuple[FileObject, OpenAIBatch]:
    """A batch of one line for a provider no worker serves, once its line waits in the queue."""
    lines = jsonl([line("only", "x", model="gemini")])
    uploaded = await client.files.create(file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def running() -> bool:
        return (await client.batches.retrieve(batch.id)).status == "in_progress"

    await eventually(running, 30, "the batch to queue its line")
    return uploaded, batch


async def test_the_input_file_of_a_batch_not_ended_cannot_be_deleted(settings: Settings) -> None:
    """A batch reads its input again to write its output (each line's ``custom_id``, in input order):
    deleted under it, the batch stayed ``cancelling`` (or ``finalizing``) for ever, a warning every 2 s,
    its lines' results never written. Now the delete is a 409 naming the batch, until it has ended."""
    async with serving(settings) as stack:  # no gemini worker: the line waits in the queue
        client = stack.client
        uploaded, batch = await _one_line_waiting(client)
        with pytest.raises(openai.ConflictError) as caught:
            await client.files.delete(uploaded.id)
        assert caught.value.code == "file_in_use" and batch.id in caught.value.message
        assert caught.value.response.headers["x-should-retry"] == "false"  # the SDK retries a 409
        assert (await client.files.retrieve(uploaded.id)).id == uploaded.id
        await client.batches.cancel(batch.id)
        done = await ended(client, batch.id)
        [cancelled] = await output_lines(client, done.error_file_id)
        assert (done.status, cancelled["custom_id"]) == ("cancelled", "only")
        assert (await client.files.delete(uploaded.id)).deleted


async def test_a_batch_whose_input_file_is_gone_fails_saying_so(settings: Settings) -> None:
    """An input file gone before its batch ended (deleted by a gateway that let it be, or in a race with
    the refusal's check): the batch fails naming it, its line cancelled. It tried again every 2 s, for
    ever, ``cancelling`` or ``finalizing`` never ending."""
    async with serving(settings) as stack:  # no gemini worker: the line waits in the queue
        client = stack.client
        uploaded, batch = await _one_line_waiting(client)
        stored = await (await BatchStore.open(stack.bus)).get(batch.id)

        async def queued() -> bool:  # in_progress comes as the batch starts queuing its lines
            with contextlib.suppress(TaskNotFound):
                return (await stack.hive.get(line_task_id(stored, 0))).status == "queued"
            return False

        await eventually(queued, 10, "the line's task to be queued")
        await (await FileStore.open(stack.bus)).delete(uploaded.id)
        await client.batches.cancel(batch.id)
        done = await ended(client, batch.id, timeout_s=30)
        stored = await (await BatchStore.open(stack.bus)).get(batch.id)
        line_task = await stack.hive.get(line_task_id(stored, 0))
    assert done.status == "failed" and done.errors is not None and done.errors.data is not None
    [error] = done.errors.data
    assert error.code == "input_file_missing" and uploaded.id in (error.message or ""), error
    assert line_task.status == "cancelled"


async def test_a_line_whose_own_task_was_cancelled_says_so_in_the_error_file(settings: Settings) -> None:
    """A line's task cancelled on its own (``POST /v1/tasks/{id}/cancel``) in a batch that completes: its
    error line says ``request_cancelled`` with the reason. It said ``batch_expired``, "the batch was
    expired before this request ended", of a batch that never expired."""
    lines = [line("fine", "x"), line("dropped", "y", model="gemini")]  # no gemini worker: it waits
    async with serving(settings) as stack, running_worker(stack.bus, "echo", EchoProvider()):
        client = stack.client
        uploaded = await client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        async def first_done() -> bool:
            counts = (await client.batches.retrieve(batch.id)).request_counts
            return counts is not None and counts.completed == 1

        await eventually(first_done, 30, "the echo line to complete")
        stored = await (await BatchStore.open(stack.bus)).get(batch.id)
        await stack.hive.cancel(line_task_id(stored, 1), reason="not needed after all")
        done = await ended(client, batch.id)
        [dropped] = await output_lines(client, done.error_file_id)
    assert (done.status, dropped["custom_id"], dropped["response"]) == ("completed", "dropped", None)
    assert dropped["error"]["code"] == "request_cancelled", dropped
    assert "not needed after all" in dropped["error"]["message"], dropped


async def test_a_batch_whose_lines_history_was_evicted_while_no_gateway_ran_ends(
    nats_server: NatsServer,
) -> None:
    """A batch's lines ended while no gateway ran, and HIVE_EVENTS_MAX_BYTES pushed their events out
    before one came back: the batch ends, each line in the error file as ``task_evicted``. It stayed
    ``in_progress`` until its window closed, waiting for ends no stream held any more."""
    settings = make_settings(nats_server.url, events_max_bytes=48 * 1024, batch_lease_s=1.5)
    lines = [line(f"l{i}", f"línea {i}") for i in range(3)]
    async with serving(settings) as stack:
        client = stack.client
        uploaded = await client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        store = await BatchStore.open(stack.bus)

        async def queued() -> Batch | None:
            now = await store.get(created.id)
            return now if now.enqueued == len(lines) else None

        batch = await eventually(queued, 30, "the lines to be queued")
    async with open_bus(settings) as bus:  # no gateway: a worker ends the lines, later tasks evict them
        hive = Hive(bus)
        async with running_worker(bus, "echo", EchoProvider()):
            for i in range(len(lines)):
                assert (await hive.wait(line_task_id(batch, i), 10)).status == "completed"
            for _ in range(40):
                assert (await hive.wait(await hive.submit("echo", "x" * 2000), 10)).status == "completed"
        assert (await hive.get(line_task_id(batch, 0))).status == "evicted"
        await hive.close()
    async with serving(settings) as stack:
        done = await ended(stack.client, batch.id, timeout_s=30)
        errors = await output_lines(stack.client, done.error_file_id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (0, len(lines))
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        (f"l{i}", "task_evicted") for i in range(len(lines))
    ]
    assert "HIVE_EVENTS_MAX_BYTES" in errors[0]["error"]["message"]


async def test_an_output_line_holding_a_line_separator_stays_one_line(settings: Settings) -> None:
    """U+2028, U+2029 and U+0085 in a custom id or an answer are written as escapes: raw, as JSON allows,
    Python's ``str.splitlines()`` (the usual way to read ``files.content(...).text``) cut the line in two,
    and the line no longer parsed."""
    ids = ["a\u2028b", "c\u2029d", "e\x85f"]
    lines = [line(custom_id, f"answer {custom_id}") for custom_id in ids]
    async with serving(settings) as stack, running_worker(stack.bus, "echo", EchoProvider()):
        client = stack.client
        uploaded = await client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await ended(client, batch.id)
        assert done.output_file_id is not None
        text = (await client.files.content(done.output_file_id)).text
    answers = [json.loads(x) for x in text.splitlines()]
    assert [a["custom_id"] for a in answers] == ids
    assert [a["response"]["body"]["choices"][0]["message"]["content"] for a in answers] == [
        f"answer {custom_id}" for custom_id in ids
    ]


async def test_a_batch_request_of_a_wrong_type_is_a_400_whose_param_names_the_field(
    settings: Settings,
) -> None:
    """``param`` names the field of a batch request that does not decode, as the chat route's errors
    do; it was null (the field only in the message)."""
    async with serving(settings) as stack, httpx.AsyncClient(base_url=f"{stack.gateway.url}/v1") as http:
        wrong = {"input_file_id": 5, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        r = await http.post("/batches", json=wrong)
        window = await http.post(
            "/batches", json=wrong | {"input_file_id": "file-x", "completion_window": 24}
        )
    assert r.status_code == window.status_code == 400
    assert r.json()["error"]["param"] == "input_file_id", r.text
    assert window.json()["error"]["param"] == "completion_window", window.text


@pytest.mark.parametrize("made_before", [False, True], ids=["made now", "made before"])
async def test_new_batches_are_taken_once_the_batches_bucket_is_full(
    settings: Settings, made_before: bool
) -> None:
    """A batch's record stays after it ended, and nothing removes it (OpenAI has no batch delete): a
    gateway that had run some thousands of batches (8 MiB of records) answered every new one with a
    503 for good, and a running batch could not record its progress. The bucket now lets the oldest
    records go (a running batch's is renewed with its lease, so it is never the oldest); a bucket made
    before is changed when a gateway starts."""
    small = 4096  # a few records: a bucket as full as thousands of batches leave it
    if made_before:  # as nats-py makes a bucket: full, it refuses new records
        nc = await nats.connect(settings.nats_url)
        await nc.jetstream().create_key_value(
            KeyValueConfig(bucket=settings.names.batches_bucket, history=1, max_bytes=small)
        )
        await nc.close()
    async with serving(settings) as stack, running_worker(stack.bus, "echo", EchoProvider()):
        store = await BatchStore.open(stack.bus)
        if not made_before:
            stream = f"KV_{stack.bus.names.batches_bucket}"
            config = (await stack.bus.js.stream_info(stream)).config
            config.max_bytes = small
            await stack.bus.js.update_stream(config)
        lines = io.BytesIO(jsonl([line("a", "hola")]))
        uploaded = await stack.client.files.create(file=("f.jsonl", lines), purpose="batch")
        for _ in range(8):
            batch = await stack.client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            assert (await ended(stack.client, batch.id)).status == "completed"
        assert (await store.get(batch.id)).status == "completed"
