"""GET /metrics figures, read from the bus: counters and histograms from the events stream, gauges from
the consumers and the KV buckets, with a real nats-server and in-process workers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hive_bus import BusUnavailable, FunctionProvider, Hive, Output, Task, TaskRequest, Usage
from hive_bus._bus import ensure_events
from hive_bus._duplicates import report_duplicate
from hive_bus._embedded import NatsServer
from hive_bus._messages import Completed, encoder
from hive_bus.bus import Bus, open_bus
from hive_bus.services.metrics import BusMetrics
from hive_bus.workers.echo import EchoProvider

from . import handlers
from .conftest import make_settings
from .handlers import WindowLimit
from .helpers import eventually, running_worker

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: BusMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    found: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (a counter that never moved)."""
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)


@asynccontextmanager
async def following(bus: Bus, refresh_s: float = 60.0) -> AsyncIterator[BusMetrics]:
    """Metrics following the bus; the periodic refresh is slow so that the tests call refresh() alone."""
    metrics = BusMetrics(bus, refresh_s=refresh_s)
    async with anyio.create_task_group() as tg:
        await tg.start(metrics.run)
        try:
            yield metrics
        finally:
            tg.cancel_scope.cancel()


async def counted(metrics: BusMetrics, name: str, want: float, **labels: str) -> Samples:
    """The samples once the follower and the counters have caught up to ``want`` (events arrive a moment
    after results; submitters add to the counters within a quarter of a second)."""

    async def probe() -> Samples | None:
        await metrics.refresh()  # the submission counters are read with the gauges
        found = samples(metrics)
        return found if value(found, name, **labels) >= want else None

    return await eventually(probe, 5, f"{name}{labels} to reach {want}")


async def all_done(hive: Hive, ids: Iterable[str], timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        async for _ in hive.results(list(ids)):
            pass


async def priced(task: Task) -> Output:
    """A provider whose model is in the built-in price table (0.30 / 2.50 USD per million tokens)."""
    return Output(
        value=task.prompt, model="gemini-2.5-flash", usage=Usage(input_tokens=1000, output_tokens=2000)
    )


async def test_a_workload_is_counted_as_it_happened(bus: Bus, hive: Hive) -> None:
    prompts = ["uno", "dos tres", "cuatro cinco seis", "siete", "ocho nueve"]
    async with (
        following(bus) as metrics,
        running_worker(bus, "echo", EchoProvider(), concurrency=2),
        running_worker(bus, "flaky", FunctionProvider(handlers.flaky), backoff_base_s=0.05),
        running_worker(bus, "refuse", FunctionProvider(handlers.refuse)),
        running_worker(bus, "priced", FunctionProvider(priced)),
    ):
        ids = await hive.submit_many(
            [TaskRequest(provider="echo", prompt=p, payload={"delay_s": 0.01}) for p in prompts]
            + [
                TaskRequest(provider="flaky", prompt="again"),
                TaskRequest(provider="refuse", prompt="no"),
                TaskRequest(provider="priced", prompt="a"),
                TaskRequest(provider="priced", prompt="b"),
            ]
        )
        await all_done(hive, ids)
        await counted(metrics, "hive_tasks_completed_total", 2, provider="priced", model="gemini-2.5-flash")
        await counted(metrics, "hive_tasks_completed_total", 5, provider="echo", model="echo")
        await counted(metrics, "hive_tasks_failed_total", 1, provider="refuse", reason="permanent")
        await counted(metrics, "hive_tasks_completed_total", 1, provider="flaky", model="unknown")

        async def settled() -> Samples | None:
            # A worker acks just after its final event is stored: the consumer's figures follow a moment later.
            await metrics.refresh()
            found = samples(metrics)
            return found if total(found, "hive_queue_ack_pending") == 0 else None

        await eventually(settled, 5, "every task to be acked")

        async def all_submitted() -> Samples | None:
            await metrics.refresh()
            found = samples(metrics)
            return found if total(found, "hive_tasks_submitted_total") >= len(ids) else None

        found = await eventually(all_submitted, 5, "every submission to be counted")

    submitted = {
        p: value(found, "hive_tasks_submitted_total", provider=p)
        for p in ("echo", "flaky", "refuse", "priced")
    }
    assert submitted == {"echo": 5, "flaky": 1, "refuse": 1, "priced": 2}
    assert total(found, "hive_tasks_completed_total") == 8
    assert total(found, "hive_tasks_failed_total") == 1
    assert value(found, "hive_task_retries_total", provider="flaky", reason="transient") == 1
    assert total(found, "hive_task_retries_total") == 1
    assert total(found, "hive_rate_limited_total") == 0

    words = sum(len(p.split()) for p in prompts)  # echo's usage: a token per word, each way
    assert value(found, "hive_tokens_total", provider="echo", model="echo", direction="input") == words
    assert value(found, "hive_tokens_total", provider="echo", model="echo", direction="output") == words
    assert (
        value(found, "hive_tokens_total", provider="priced", model="gemini-2.5-flash", direction="input")
        == 2000
    )
    assert (
        value(found, "hive_tokens_total", provider="priced", model="gemini-2.5-flash", direction="output")
        == 4000
    )
    assert total(found, "hive_tokens_total", provider="flaky") == 0  # no usage, no tokens
    assert value(found, "hive_cost_usd_total", provider="echo", model="echo") == 0.0  # priced at 0
    assert value(found, "hive_cost_usd_total", provider="priced", model="gemini-2.5-flash") == pytest.approx(
        2 * (1000 * 0.30 + 2000 * 2.50) / 1e6
    )
    assert ("hive_cost_usd_total", frozenset({("provider", "flaky"), ("model", "unknown")})) not in found

    for name in ("hive_task_queue_wait_seconds", "hive_provider_call_seconds", "hive_task_duration_seconds"):
        assert value(found, f"{name}_count", provider="echo") == 5, name
        assert value(found, f"{name}_count", provider="priced") == 2, name
        assert value(found, f"{name}_count", provider="refuse") == 0, name  # failed: not a completion
        assert value(found, f"{name}_bucket", provider="echo", le="+Inf") == 5, name
    assert value(found, "hive_provider_call_seconds_sum", provider="echo") >= 5 * 0.01
    assert value(found, "hive_task_duration_seconds_sum", provider="echo") >= value(
        found, "hive_provider_call_seconds_sum", provider="echo"
    )

    # gauges, read while the four workers ran and nothing was left to do
    for provider in ("echo", "flaky", "refuse", "priced"):
        assert value(found, "hive_workers_online", provider=provider) == 1, provider
        assert value(found, "hive_queue_pending", provider=provider) == 0, provider
        assert value(found, "hive_queue_ack_pending", provider=provider) == 0, provider
        assert value(found, "hive_provider_cooldown_seconds", provider=provider) == 0, provider
    assert value(found, "hive_metrics_last_refresh_timestamp_seconds") > 0


async def test_queues_and_workers_are_read_from_the_bus(bus: Bus, hive: Hive) -> None:
    metrics = BusMetrics(bus)
    # "later" has had a worker (its durable consumer exists); "nobody" never had one
    async with running_worker(bus, "later", EchoProvider()):
        pass
    await bus.workers_kv.put("junk", b"{}")  # a heartbeat that does not decode hides nothing else
    for i in range(3):
        await hive.submit("nobody", f"n{i}")
    for i in range(2):
        await hive.submit("later", f"l{i}")
    await hive._submitted.flush()  # a provider no consumer serves is known by its submission counter
    await metrics.refresh()
    found = samples(metrics)
    assert value(found, "hive_queue_pending", provider="nobody") == 3
    assert value(found, "hive_queue_pending", provider="later") == 2
    assert value(found, "hive_queue_ack_pending", provider="later") == 0
    assert value(found, "hive_workers_online", provider="later") == 0
    streams = [bus.names.tasks_stream, *(bus.names.events_stream_of(p) for p in ("nobody", "later"))]
    for stream in streams:  # a sound store has lost nothing
        assert found[("hive_stream_lost_messages", frozenset({("stream", stream)}))] == 0

    async with (
        running_worker(bus, "echo", EchoProvider()),
        running_worker(bus, "echo", EchoProvider()),
        running_worker(bus, "other", EchoProvider()),
    ):

        async def three_online() -> Samples | None:
            await metrics.refresh()
            found = samples(metrics)
            return found if total(found, "hive_workers_online") == 3 else None

        found = await eventually(three_online, 5, "three heartbeats")
        assert value(found, "hive_workers_online", provider="echo") == 2
        assert value(found, "hive_workers_online", provider="other") == 1
    await metrics.refresh()
    found = samples(metrics)
    assert value(found, "hive_workers_online", provider="echo") == 0  # a clean stop removes its heartbeat
    assert ("hive_workers_online", frozenset({("provider", "echo")})) in found  # still listed, at 0


async def test_a_rate_limit_is_counted_and_its_cooldown_shown(bus: Bus, hive: Hive) -> None:
    limit = WindowLimit(limit=1, window_s=30)
    async with (
        following(bus) as metrics,
        running_worker(bus, "tight", FunctionProvider(limit), concurrency=1),
    ):
        first = await hive.submit("tight", "goes through")
        await hive.submit("tight", "waits")
        assert (await hive.wait(first, 5)).status == "completed"
        found = await counted(metrics, "hive_rate_limited_total", 1, provider="tight")
        await metrics.refresh()
        found = samples(metrics)
    assert value(found, "hive_rate_limited_total", provider="tight") == 1
    assert value(found, "hive_task_retries_total", provider="tight", reason="rate_limit") == 1
    assert value(found, "hive_tasks_completed_total", provider="tight", model="unknown") == 1
    assert 20 < value(found, "hive_provider_cooldown_seconds", provider="tight") <= 30
    assert value(found, "hive_queue_ack_pending", provider="tight") == 1  # handed back with a delay


async def test_a_redelivered_task_is_counted_once(bus: Bus, hive: Hive) -> None:
    names = bus.names
    async with following(bus) as metrics:
        async with running_worker(
            bus, "slow", FunctionProvider(handlers.slow), drain_timeout_s=0.1
        ) as worker:
            task_id = await hive.submit("slow", "x", payload={"delay_s": 60})

            async def holding() -> bool:
                return worker.in_flight > 0

            await eventually(holding, 5, "the task to start")
        # NAKed at the stop; another worker completes it
        async with running_worker(bus, "slow", FunctionProvider(handlers.quick)):
            view = await hive.wait(task_id, 5)
        assert (view.status, view.attempt) == ("completed", 2)
        await counted(metrics, "hive_tasks_completed_total", 1, provider="slow", model="unknown")

        # The same final event stored twice (as a zombie worker could outside the de-duplication
        # window), and an event that does not decode: neither counts. A later task shows the follower
        # has read past them.
        raw = await bus.js.get_last_msg(
            names.events_stream_of("slow"), names.event_subject("slow", task_id, "completed")
        )
        assert raw.data is not None
        await bus.js.publish(names.event_subject("slow", task_id, "completed"), raw.data)
        await bus.js.publish(names.event_subject("slow", task_id, "completed"), b"not an event")
        await hive.submit("marker", "after the duplicate")
        found = await counted(metrics, "hive_tasks_submitted_total", 1, provider="marker")
    assert value(found, "hive_tasks_completed_total", provider="slow", model="unknown") == 1
    assert value(found, "hive_tasks_submitted_total", provider="slow") == 1
    assert value(found, "hive_task_duration_seconds_count", provider="slow") == 1
    assert total(found, "hive_tasks_failed_total") == 0
    assert total(found, "hive_task_retries_total") == 0  # a drained task is handed back, not retried


async def test_a_run_replayed_from_the_dead_letters_counts_its_own_outcome(bus: Bus, hive: Hive) -> None:
    # A task failed out of attempts, replayed, and completed on its second run: /metrics and the charts
    # counted a task's first final only, so every replayed run's completion (its tokens and cost too)
    # was left out, of a gateway that followed the first end and of one started later alike.
    async with following(bus) as metrics, running_worker(bus, "flaky", FunctionProvider(handlers.flaky)):
        task_id = await hive.submit("flaky", "x", max_attempts=1)
        assert (await hive.wait(task_id, 10)).status == "failed"
        await hive.replay(task_id)

        async def completed() -> bool:
            return (await hive.get(task_id)).status == "completed"

        await eventually(completed, 10, "the replayed run to complete")
        found = await counted(metrics, "hive_tasks_completed_total", 1, provider="flaky", model="unknown")
        assert value(found, "hive_tasks_failed_total", provider="flaky", reason="out_of_attempts") == 1
        live = metrics.history_view()
        assert (sum(live.completed), sum(live.failed)) == (1, 1)
    async with following(bus) as later:  # its last hour read from the bus

        async def backfilled() -> bool:
            return later.history_view().backfilled

        await eventually(backfilled, 10, "the history backfilled")
        read = later.history_view()
        assert (sum(read.completed), sum(read.failed)) == (1, 1)


async def test_duplicate_results_are_counted_apart(bus: Bus, hive: Hive) -> None:
    """A worker whose final event JetStream refused as a duplicate reports it; the gateway counts the
    report by provider, never as a completion (the zombie worker case runs end to end in tests/faults)."""
    async with following(bus) as metrics, running_worker(bus, "echo", EchoProvider()):
        task_id = await hive.submit("echo", "once")
        assert (await hive.wait(task_id, 5)).status == "completed"
        task = Task(id=task_id, provider="echo", prompt="once", submitted_at_ms=0)
        await report_duplicate(bus, task, "completed", "zombie-1")
        await report_duplicate(bus, task, "failed", "zombie-2")
        found = await counted(metrics, "hive_duplicate_results_total", 2, provider="echo")
    assert value(found, "hive_tasks_completed_total", provider="echo", model="echo") == 1
    assert total(found, "hive_tasks_failed_total") == 0
    assert (await hive.get(task_id)).status == "completed"  # a report is never a task's latest state


async def test_model_labels_are_capped(bus: Bus, hive: Hive) -> None:
    names = bus.names
    async with following(bus) as metrics:
        await ensure_events(bus, "many")  # a provider's stream made while following: read from its start
        for i in range(103):
            task_id = f"01K{i:023d}"
            event = Completed(
                task_id=task_id, provider="many", at_ms=2000, attempt=1, worker="w", output="",
                model=f"model-{i}", usage=Usage(input_tokens=1, output_tokens=1),
                submitted_at_ms=1000, started_at_ms=1500, call_s=0.5,
            )  # fmt: skip
            await bus.js.publish(names.event_subject("many", task_id, "completed"), encoder.encode(event))
        found = await counted(metrics, "hive_tasks_completed_total", 3, provider="many", model="other")
    models = {dict(ls)["model"] for (n, ls), _ in found.items() if n == "hive_tasks_completed_total"}
    assert len(models) == 101 and "other" in models
    assert total(found, "hive_tasks_completed_total", provider="many") == 103
    assert value(found, "hive_task_queue_wait_seconds_sum", provider="many") == pytest.approx(103 * 0.5)
    assert value(found, "hive_task_duration_seconds_sum", provider="many") == pytest.approx(103 * 1.0)


async def test_a_failed_refresh_keeps_the_last_figures(
    bus: Bus, hive: Hive, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = BusMetrics(bus)
    await hive.submit("nobody", "waits")
    await hive._submitted.flush()  # a provider no consumer serves is known by its submission counter
    await metrics.refresh()
    before = samples(metrics)
    assert value(before, "hive_queue_pending", provider="nobody") == 1
    await bus.js.delete_stream(bus.names.tasks_stream)  # the bus no longer answers as it should
    with caplog.at_level(logging.WARNING, logger="hive_bus.metrics"):
        await metrics.refresh()
    assert "could not read" in caplog.text
    assert samples(metrics) == before


async def test_each_instance_has_its_own_registry(bus: Bus, hive: Hive) -> None:
    async with following(bus) as first, following(bus) as second:
        await hive.submit("nobody", "one")
        await counted(first, "hive_tasks_submitted_total", 1, provider="nobody")
        await counted(second, "hive_tasks_submitted_total", 1, provider="nobody")
    assert first.registry is not second.registry


async def test_counting_goes_on_across_a_server_restart_each_task_once(own_server: NatsServer) -> None:
    settings = make_settings(own_server.url, request_timeout_s=1.0)
    async with open_bus(settings) as bus, following(bus) as metrics:
        hive = Hive(bus)
        ids = [await hive.submit("nobody", f"before {i}") for i in range(3)]
        await completed_by_hand(bus, ids[0])
        await counted(metrics, "hive_tasks_submitted_total", 3, provider="nobody")
        await counted(metrics, "hive_tasks_completed_total", 1, provider="nobody", model="m")
        own_server.restart()  # the follower's consumer lives in the server's memory: it is gone

        async def submitted() -> bool:
            try:
                ids.append(await hive.submit("nobody", "after"))
            except BusUnavailable:
                return False
            return True

        await eventually(submitted, 20, "the bus to accept work again")
        ids.append(await hive.submit("nobody", "after, again"))
        for task_id in ids[1:]:
            await completed_by_hand(bus, task_id)
        found = await counted(metrics, "hive_tasks_completed_total", len(ids), provider="nobody", model="m")
        found = await counted(metrics, "hive_tasks_submitted_total", len(ids), provider="nobody")
        await anyio.sleep(0.5)  # nothing more may come: each task counts once
        await metrics.refresh()
        again = samples(metrics)
    assert len(ids) == 5
    for figures in (found, again):
        assert value(figures, "hive_tasks_submitted_total", provider="nobody") == 5
        assert value(figures, "hive_tasks_completed_total", provider="nobody", model="m") == 5


async def completed_by_hand(bus: Bus, task_id: str) -> None:
    """A completed event for a task no worker serves, as a worker would record it."""
    event = Completed(
        task_id=task_id, provider="nobody", at_ms=2000, attempt=1, worker="w", output="", model="m",
        submitted_at_ms=1000, started_at_ms=1500, call_s=0.5,
    )  # fmt: skip
    subject = bus.names.event_subject("nobody", task_id, "completed")
    await bus.js.publish(subject, encoder.encode(event), headers={"Nats-Msg-Id": f"{task_id}:final"})
