"""One worker credential fills a bucket that every provider shares; another provider's accepted tasks
still end as they would have (issue 12, point 5, after events and dead letters).

On the shipped hub config, mallory (an echo worker's credential, made by nats/worker-user.sh) writes
keys under ``echo.`` until the bucket refuses one more byte: the cooldowns (``hive_providers``), the
budgets (``hive_budgets``). A gemini worker under its own credential then runs gemini's tasks through
the provider fakes: a 429 is still waited out, a budgeted call still made, where before the worker held
the task until its AckWait (a 429: the wait counted as an attempt) or never ran it (a budget).

The claim check's objects were in one bucket too, ``hive_blobs``: filled with echo's chunks, it refused
gemini's large submissions (503) and the large outputs of gemini's accepted tasks, which came back
after each AckWait, called again, for as long as the junk lived (a week). Each provider has a bucket of
its own now; mallory fills echo's, and gemini's large tasks and outputs go through.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from hive_bus import FunctionProvider, Hive, Task
from hive_bus._budget import ProviderBudget, load_budgets
from hive_bus._bus import ensure_consumers
from hive_bus._embedded import NatsServer
from hive_bus.bus import Bus, open_bus
from hive_bus.workers.gemini import GeminiProvider
from tests.fakes import ProviderFakes
from tests.helpers import running_worker
from tests.hub import Hub, hub_server, make_certs, render
from tests.test_metrics import following, samples, value

from .test_credentials import ATTACKER, GEMINI, Attacker, attacker, gateway, settings_for

pytestmark = pytest.mark.anyio

GEMINI_KEY = "AIza-shared-buckets-0123456789"


@pytest.fixture
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hub, NatsServer]]:
    """A hub of its own for each test: what one fills, the next does not find full."""
    base = tmp_path_factory.mktemp("shared-buckets-hub")
    certs = make_certs(
        base / "certs", servers=["localhost", "127.0.0.1"], clients=["gateway", ATTACKER.name, GEMINI.name]
    )
    rendered = render(base / "nats", certs, [ATTACKER, GEMINI])
    with hub_server(rendered, base / "store") as server:
        yield rendered, server


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes() as running:
        yield running


async def fill(mallory: Attacker, subject: str, largest: int = 60 * 1024) -> str:
    """Write distinct keys (``subject`` with ``{n}``) of shrinking sizes until not one byte more fits:
    the server's last refusal."""
    n, refusal = 0, ""
    for size in (largest, 4096, 256, 16, 1):
        while True:
            n += 1
            answer = json.loads((await mallory.nc.request(subject.format(n=n), b"x" * size, timeout=2)).data)
            if "error" in answer:
                refusal = answer["error"]["description"]
                break
    return refusal


async def operator_sees(bus: Bus, bucket: str, owner: str, caplog: pytest.LogCaptureFixture) -> None:
    """The gateway's metrics say the bucket is full and whose keys hold it, and its log says so too."""
    async with following(bus) as metrics:
        await metrics.refresh()
        found = samples(metrics)
    assert value(found, "hive_bucket_used_ratio", bucket=bucket) > 0.99
    keys = {dict(labels)["owner"]: n for (name, labels), n in found.items() if name == "hive_bucket_keys"}
    assert max(keys, key=lambda k: keys[k]) == owner, keys
    said = [r.getMessage() for r in caplog.records if r.name == "hive_bus.metrics"]
    assert any(m.startswith(f"bucket {bucket} is 100% full") and f"are {owner}'s" in m for m in said), said


@asynccontextmanager
async def gemini_worker(
    hub: Hub, server: NatsServer, fakes: ProviderFakes, budget: ProviderBudget | None = None
) -> AsyncIterator[None]:
    """A real gemini worker (google-genai against the fakes) under its own credential."""
    settings = settings_for(hub, server, GEMINI.name, worker_name=GEMINI.name, heartbeat_interval_s=0.5)
    gemini = GeminiProvider(api_key=GEMINI_KEY, base_url=fakes.gemini_base_url)
    async with (
        open_bus(settings, name="gemini-worker") as wbus,
        running_worker(wbus, "gemini", gemini, budget=budget),
    ):
        yield


async def test_a_429_is_waited_out_with_the_cooldowns_bucket_full(
    hub: tuple[Hub, NatsServer], fakes: ProviderFakes, caplog: pytest.LogCaptureFixture
) -> None:
    """The finding: the worker could not write the cooldown, so it neither recorded the wait nor handed
    the task back; the task came back after AckWait (30 s) and that delivery counted as an attempt."""
    rendered, server = hub
    async with gateway(rendered, server) as (bus, hive), attacker(rendered, server) as mallory:
        assert await fill(mallory, "$KV.hive_providers.echo.k{n}") == "maximum bytes exceeded"
        await operator_sees(bus, "hive_providers", "echo", caplog)
        fakes.gemini.fail_next(429, 1, retry_after_s=1.0)
        task_id = await hive.submit("gemini", "escribe un tuit", max_attempts=1)
        async with gemini_worker(rendered, server, fakes):
            done = await hive.wait(task_id, 15)
    assert (done.status, done.attempt) == ("completed", 1)
    assert (fakes.gemini.requests, fakes.gemini.rate_limited) == (2, 1)
    said = [r.getMessage() for r in caplog.records if r.name == "hive_bus.cooldown"]
    assert any("bucket hive_providers refused it (maximum bytes exceeded)" in m for m in said), said


async def test_a_budgeted_call_is_made_with_the_budgets_bucket_full(
    hub: tuple[Hub, NatsServer], fakes: ProviderFakes, caplog: pytest.LogCaptureFixture
) -> None:
    """The finding: the worker could not write the budget's ledger and dropped the task ("could not
    process a task message"), every delivery, for as long as the bucket stayed full."""
    rendered, server = hub
    budget = load_budgets(None, "gemini = { rpm = 100 }")["gemini"]
    async with gateway(rendered, server) as (bus, hive), attacker(rendered, server) as mallory:
        assert await fill(mallory, "$KV.hive_budgets.echo.k{n}.m") == "maximum bytes exceeded"
        await operator_sees(bus, "hive_budgets", "echo", caplog)
        task_id = await hive.submit("gemini", "escribe un tuit", max_attempts=1)
        async with gemini_worker(rendered, server, fakes, budget):
            done = await hive.wait(task_id, 15)
    assert (done.status, done.attempt) == ("completed", 1)
    said = [r.getMessage() for r in caplog.records if r.name == "hive_bus.budget"]
    assert any("the budgets bucket refused its ledger (maximum bytes exceeded)" in m for m in said), said


@asynccontextmanager
async def small_blobs_gateway(hub: Hub, server: NatsServer) -> AsyncIterator[Hive]:
    """The hub's side, as :func:`gateway`, with claim check buckets of 2 MiB each."""
    settings = settings_for(hub, server, "gateway", blob_max_bytes=1024**2, blobs_max_bytes=2 * 1024**2)
    async with open_bus(settings, name="gateway") as bus:
        for provider in ("echo", "gemini"):
            await ensure_consumers(bus.js, bus.settings, provider)
        yield Hive(bus)


async def test_a_worker_filling_its_claim_check_bucket_leaves_another_providers_large_tasks(
    hub: tuple[Hub, NatsServer],
) -> None:
    rendered, server = hub

    async def long_answer(task: Task) -> str:
        return f"{task.prompt[:20]}: " + "y" * 100_000  # over the claim check's 64 KiB: stored apart

    settings = settings_for(rendered, server, GEMINI.name, worker_name=GEMINI.name, heartbeat_interval_s=0.5)
    async with small_blobs_gateway(rendered, server) as hive, attacker(rendered, server) as mallory:
        refusal = await fill(mallory, "$O.hive_blobs_echo.C.echo.junk.output.{n}", largest=120 * 1024)
        assert refusal == "maximum bytes exceeded"  # echo's own bucket, full
        small_output = await hive.submit("gemini", "escribe un tuit", max_attempts=1)
        large_prompt = await hive.submit("gemini", "z" * 200_000, max_attempts=1)  # accepted: not a 503
        async with (
            open_bus(settings, name="gemini-worker") as wbus,
            running_worker(wbus, "gemini", FunctionProvider(long_answer)),
        ):
            views = [await hive.wait(task_id, 15) for task_id in (small_output, large_prompt)]
        await hive.close()
    assert [(v.status, v.attempt) for v in views] == [("completed", 1), ("completed", 1)]
    assert [v.output for v in views] == [
        "escribe un tuit: " + "y" * 100_000,
        "z" * 20 + ": " + "y" * 100_000,
    ]


async def test_heartbeats_refused_by_a_full_bucket_are_named_with_the_credential_that_filled_it(
    hub: tuple[Hub, NatsServer], fakes: ProviderFakes, caplog: pytest.LogCaptureFixture
) -> None:
    """Heartbeats: the bucket is filled with mallory's own keys (its name, its provider); a gemini worker
    whose beats are refused still runs gemini's tasks, and the operator is told whose keys they are."""
    rendered, server = hub
    async with gateway(rendered, server) as (bus, hive), attacker(rendered, server) as mallory:
        assert await fill(mallory, "$KV.hive_workers.mallory.echo.w{n}") == "maximum bytes exceeded"
        await operator_sees(bus, "hive_workers", "mallory", caplog)
        task_id = await hive.submit("gemini", "escribe un tuit", max_attempts=1)
        async with gemini_worker(rendered, server, fakes):
            done = await hive.wait(task_id, 15)
    assert (done.status, done.attempt) == ("completed", 1)
