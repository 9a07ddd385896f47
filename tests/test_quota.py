"""Quota intelligence: budgets across workers, key rotation, failover, priorities, dead letters, retry
policy. Real nats-server, real SDKs against the provider fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest

from hive_bus import (
    Completed,
    Failed,
    FailNow,
    FunctionProvider,
    Hive,
    ProviderKey,
    ProviderStats,
    QueueFull,
    Task,
    TaskRequest,
    TaskView,
)
from hive_bus._budget import BudgetError, Ledger, ProviderBudget, load_budgets
from hive_bus._bus import open_bus
from hive_bus._embedded import NatsServer
from hive_bus._messages import Moved, Retrying, Running, now_ms
from hive_bus._router import Router
from hive_bus.bus import Bus
from hive_bus.workers.echo import EchoProvider
from hive_bus.workers.gemini import GeminiProvider
from hive_bus.workers.groq import GroqProvider

from . import handlers
from .conftest import make_settings
from .fakes import ProviderFakes
from .helpers import events_of, eventually, running_worker

pytestmark = pytest.mark.anyio

GOOD, BAD = "gsk_good_key_0123456789", "gsk_revoked_key_9876543210"


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes() as f:
        yield f


def groq(fakes: ProviderFakes, key: str = GOOD) -> GroqProvider:
    return GroqProvider(api_key=key, base_url=fakes.groq_base_url)


def budget(text: str, provider: str) -> ProviderBudget:
    return load_budgets(None, text)[provider]


@asynccontextmanager
async def router(bus: Bus) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(Router(bus).run)
        yield
        tg.cancel_scope.cancel()


async def test_budgets_shared_by_four_workers_keep_them_under_the_limit(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    limit, window_s = 4, 1.0
    fakes.groq.limit(limit, window_s)
    plan = budget(f"groq = {{ rpm = {limit}, window_s = {window_s} }}", "groq")
    ids = [await hive.submit("groq", f"tarea {i}") for i in range(5 * limit)]
    async with AsyncExitStack() as stack:
        for _ in range(4):
            await stack.enter_async_context(
                running_worker(bus, "groq", groq(fakes), concurrency=2, budget=plan)
            )
        views = [await hive.wait(task_id, 30) for task_id in ids]
    assert [v.status for v in views] == ["completed"] * len(ids)
    assert [v.output for v in views] == [f"reply: tarea {i}" for i in range(len(ids))]
    assert fakes.groq.rate_limited == 0  # the budget held every worker back before the limit
    assert fakes.groq.requests == len(ids)


async def test_a_spent_daily_budget_survives_a_worker_restart(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    plan = budget("groq = { rpd = 2 }", "groq")
    first = [await hive.submit("groq", f"hoy {i}") for i in range(2)]
    async with running_worker(bus, "groq", groq(fakes), budget=plan):
        assert [(await hive.wait(t, 10)).status for t in first] == ["completed", "completed"]
    entry = await bus.budgets_kv.get("groq.default.llama-3_3-70b-versatile")
    assert entry.value is not None
    ledger = msgspec.json.decode(entry.value, type=Ledger)
    assert sum(n for _, n in ledger.day) == 2
    later = await hive.submit("groq", "mañana")
    async with running_worker(bus, "groq", groq(fakes), budget=plan):  # a new worker, the same budget

        async def told() -> TaskView | None:
            view = await hive.get(later)
            return view if view.status == "retrying" else None

        view = await eventually(told, 10, "the task over the daily budget to be told to wait")

        async def waiting() -> list[ProviderStats] | None:
            stats = [s for s in await hive.stats() if s.provider == "groq" and s.waiting == 1]
            return stats or None

        stats = (await eventually(waiting, 10, "the worker's wait to show in the stats"))[0]
        assert stats.waiting_until_ms is not None and stats.waiting_until_ms - now_ms() > 3_600_000
    assert fakes.groq.requests == 2  # the third call was never made
    assert view.reason == "budget" and "rpd" in (view.error or "")
    assert view.next_try_at_ms is not None and view.next_try_at_ms - view.updated_at_ms > 3_600_000


async def test_a_refused_key_is_set_aside_and_the_next_key_serves(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    fakes.groq.valid_keys = {GOOD}
    keys = [ProviderKey("revoked", groq(fakes, BAD)), ProviderKey("good", groq(fakes, GOOD))]
    ids = [await hive.submit("groq", f"rota {i}", max_attempts=1) for i in range(6)]
    async with running_worker(bus, "groq", keys, concurrency=1) as worker:
        views = [await hive.wait(t, 15) for t in ids]
        assert worker.cooldowns.records["revoked"].refused
    assert [v.status for v in views] == ["completed"] * 6
    assert fakes.groq.requests_by_key.get(BAD) == 1  # refused once, never tried again
    assert all(v.attempt == 1 for v in views)  # the refused key cost no task an attempt
    stats = {s.provider: s for s in await hive.stats()}
    assert stats["groq"].keys_refused == 1


@pytest.mark.parametrize("quota", [1, 0], ids=["daily quota spent", "zero quota"])
async def test_a_daily_or_zero_quota_moves_the_task_to_its_fallback(
    bus: Bus, hive: Hive, fakes: ProviderFakes, quota: int
) -> None:
    fakes.gemini.daily_quota(quota)
    gemini = GeminiProvider(api_key=GOOD, base_url=fakes.gemini_base_url)
    ids = [await hive.submit("gemini", f"post {i}", fallback=["groq"]) for i in range(4)]
    async with (
        router(bus),
        running_worker(bus, "gemini", gemini, concurrency=1),
        running_worker(bus, "groq", groq(fakes)),
    ):
        views = [await hive.wait(t, 20) for t in ids]
    assert [(v.status, v.output) for v in views] == [("completed", f"reply: post {i}") for i in range(4)]
    assert [v.provider for v in views].count("groq") == 4 - quota
    assert fakes.gemini.rate_limited == 1  # one 429 for the key; the rest never called it
    if quota:
        moved = next(t for t, v in zip(ids, views, strict=True) if v.provider == "groq")
        moves = [e for e in await events_of(bus, moved) if isinstance(e, Moved)]
        assert [(m.provider, m.task.provider, m.task.tried) for m in moves] == [
            ("gemini", "groq", ["gemini"])
        ]
        assert "daily" in moves[0].reason


async def test_a_key_without_quota_for_a_model_leaves_that_model_to_the_other_keys(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    """A free key with no quota for a model (Gemini's quotaValue 0) and a paid key: the model's tasks
    all go to the paid key, at the cost of one 429, and the free key goes on serving other models."""
    free, paid = "AIza_free_key_0123456789", "AIza_paid_key_0123456789"
    fakes.gemini.no_quota(free, "gemini-2.5-pro")
    keys = [
        ProviderKey(name, GeminiProvider(api_key=key, base_url=fakes.gemini_base_url))
        for name, key in (("free", free), ("paid", paid))
    ]
    models = ["gemini-2.5-pro", "gemini-2.5-flash"] * 4
    ids = [await hive.submit("gemini", f"post {i}", model=m, max_attempts=1) for i, m in enumerate(models)]
    async with running_worker(bus, "gemini", keys, concurrency=1):
        views = [await hive.wait(t, 15) for t in ids]
    assert [(v.status, v.provider, v.attempt) for v in views] == [("completed", "gemini", 1)] * 8
    assert fakes.gemini.rate_limited_by_key == {free: 1}
    # the free key's calls: the one 429, and flash tasks in turn with the paid key
    assert fakes.gemini.requests_by_key[free] >= 2


async def test_a_key_spent_before_the_worker_started_costs_one_429_not_one_per_lane(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    """The key's first call goes alone: its 429 sets the key aside before the other lanes call."""
    fakes.groq.daily_quota(0, retry_after_s=3600)
    ids = [await hive.submit("groq", f"post {i}", fallback=["echo"]) for i in range(8)]
    async with (
        router(bus),
        running_worker(bus, "groq", groq(fakes), concurrency=8),
        running_worker(bus, "echo", EchoProvider()),
    ):
        views = [await hive.wait(t, 20) for t in ids]
    assert [(v.status, v.provider) for v in views] == [("completed", "echo")] * 8
    assert fakes.groq.rate_limited == 1


async def test_a_slow_first_call_holds_the_other_lanes_only_briefly(bus: Bus, hive: Hive) -> None:
    """A first call that takes its time is a real call, not a 429: the other lanes start beside it."""
    ids = [await hive.submit("slow", f"post {i}", payload={"delay_s": 3.0}) for i in range(2)]
    async with running_worker(bus, "slow", EchoProvider(), concurrency=2):
        first, second = sorted([await hive.wait(t, 20) for t in ids], key=lambda v: v.started_at_ms or 0)
    assert first.status == second.status == "completed"
    assert second.started_at_ms is not None and second.started_at_ms < first.updated_at_ms  # they overlapped


async def test_a_task_with_nowhere_to_go_fails_at_its_deadline_into_the_dead_letters(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    fakes.groq.fail_next(500, 100)
    task_id = await hive.submit(
        "groq", "sin salida", max_attempts=100, backoff_base_s=0.2, backoff_cap_s=0.3, deadline_s=2.0
    )
    async with running_worker(bus, "groq", groq(fakes)):
        view = await hive.wait(task_id, 15)
    assert (view.status, view.reason) == ("failed", "deadline")
    retries = [e for e in await events_of(bus, task_id) if isinstance(e, Retrying)]
    assert retries and all(e.retry_in_s <= 0.3 for e in retries)  # the task's own backoff cap
    letter = await hive.dead_letter(task_id)
    assert letter.failed.reason == "deadline" and letter.failed.task is not None


async def test_dead_letters_are_listed_and_replayed_with_their_history(bus: Bus, hive: Hive) -> None:
    async def picky(task: Task) -> str:
        if task.run == 0:
            raise FailNow("the template is missing")
        return f"done on run {task.run}"

    ids = [await hive.submit("picky", f"t{i}") for i in range(3)]
    async with running_worker(bus, "picky", FunctionProvider(picky)):
        assert {(await hive.wait(t, 10)).status for t in ids} == {"failed"}
        letters = await hive.dead_letters(provider="picky")
        assert [x.failed.task_id for x in letters] == ids
        assert {(x.failed.reason, x.failed.error) for x in letters} == {
            ("permanent", "the template is missing")
        }
        done = await hive.replay(ids[1])
        assert (done.id, done.run) == (ids[1], 1)
        view = await hive.wait(ids[1], 10)
    assert (view.status, view.output) == ("completed", "done on run 1")
    kinds = [type(e).__name__ for e in await events_of(bus, ids[1])]
    assert kinds[0] == "Queued" and kinds[-1] == "Completed" and "Failed" in kinds
    assert kinds.index("Failed") < len(kinds) - 1 - kinds[::-1].index("Queued")  # queued again after failing
    assert [x.failed.task_id for x in await hive.dead_letters()] == [ids[0], ids[2]]
    assert await hive.purge_dead_letters(provider="picky") == 2
    assert await hive.dead_letters() == []


async def test_a_replay_into_a_full_queue_is_refused_as_a_submission_is(nats_server: NatsServer) -> None:
    """A dead letter replayed while the tasks stream is full (HIVE_TASKS_MAX_MSGS) was refused as if the
    bus were down: BusUnavailable, 503 bus_unavailable, 'could not replay task ...: nats:
    ServiceUnavailableError: code=503 err_code=10077 description='maximum messages exceeded''. It is a
    QueueFull now, as a submission's (503 queue_full with Retry-After), and the letter stays."""
    async with open_bus(make_settings(nats_server.url, tasks_max_msgs=2)) as bus:
        hive = Hive(bus)
        try:
            failed = await hive.submit("picky", "falla")
            async with running_worker(bus, "picky", FunctionProvider(handlers.refuse)):
                assert (await hive.wait(failed, 10)).status == "failed"
            await hive.submit("nobody", "ocupa el último sitio")
            with pytest.raises(QueueFull, match=r"_TASKS stream is full .*stays among the dead letters"):
                await hive.replay(failed)
            assert [x.failed.task_id for x in await hive.dead_letters()] == [failed]
        finally:
            await hive.close()


async def test_a_replayed_task_that_fails_again_at_once_keeps_its_new_dead_letter(
    bus: Bus, hive: Hive
) -> None:
    """A replay takes out the dead letters it replays, not the new run's: a run that fails for good
    before the replay has finished is dead-lettered, and stays so (the replay's purge of every letter
    of the task took it out, and the task was in neither the queue nor the dead letters)."""

    async def hopeless(task: Task) -> str:
        raise FailNow(f"run {task.run} fails too")

    ids = [await hive.submit("hopeless", f"t{i}") for i in range(20)]
    async with running_worker(bus, "hopeless", FunctionProvider(hopeless), concurrency=32):
        assert {(await hive.wait(t, 10)).status for t in ids} == {"failed"}
        await eventually(lambda: _letters_are(hive, ids, 0), 5, "a dead letter of each first run")
        async with anyio.create_task_group() as tg:
            for task_id in ids:
                tg.start_soon(hive.replay, task_id)
        await eventually(lambda: _letters_are(hive, ids, 1), 10, "a dead letter of each replayed run")


async def _letters_are(hive: Hive, ids: list[str], run: int) -> bool:
    letters = await hive.dead_letters(provider="hopeless")
    return sorted(
        (x.failed.task_id, x.failed.task.run if x.failed.task else None) for x in letters
    ) == sorted((t, run) for t in ids)


async def test_a_high_priority_task_overtakes_a_thousand_queued_ones(bus: Bus, hive: Hive) -> None:
    slow = [TaskRequest(provider="echo", prompt=f"n{i}", payload={"delay_s": 0.05}) for i in range(1000)]
    async with running_worker(bus, "echo", EchoProvider(), concurrency=1):
        await hive.submit_many(slow)
        await anyio.sleep(0.3)  # the worker is busy with the normal queue
        urgent = await hive.submit("echo", "urgente", priority="high")
        view = await hive.wait(urgent, 10)
    assert view.status == "completed" and view.started_at_ms is not None
    assert view.submitted_at_ms is not None
    started = [e.started_at_ms for e in await completions(bus) if e.task_id != urgent]
    # no normal task started between the urgent one's submission and its start, but the one that was
    # being fetched as it arrived; and most of the thousand were still waiting behind it
    between = [t for t in started if view.submitted_at_ms < t <= view.started_at_ms]
    assert len(between) <= 1, between
    assert sum(t < view.started_at_ms for t in started) < 100


async def completions(bus: Bus) -> list[Completed]:
    names = bus.names
    sub = await bus.js.subscribe(f"{names.prefix}.events.echo.*.completed", ordered_consumer=True)
    found: list[Completed] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                return found
            event = msgspec.json.decode(msg.data, type=Completed | Failed | Running)
            if isinstance(event, Completed):
                found.append(event)
    finally:
        await sub.unsubscribe()


async def test_cheapest_route_picks_the_cheaper_provider_with_quota(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    gemini = GeminiProvider(
        api_key=GOOD, base_url=fakes.gemini_base_url
    )  # gemini-2.5-flash: 0.30 + 2.50 $/Mtok
    async with running_worker(bus, "gemini", gemini), running_worker(bus, "groq", groq(fakes)):  # 0.59 + 0.79
        await anyio.sleep(0.3)  # heartbeats say which models the workers run
        task_id = await hive.submit("gemini", "barato", fallback=["groq"], route="cheapest")
        view = await hive.wait(task_id, 10)
        assert (view.status, view.provider) == ("completed", "groq")
        in_order = await hive.submit("gemini", "en orden", fallback=["groq"])
        assert (await hive.wait(in_order, 10)).provider == "gemini"


@pytest.mark.parametrize(
    ("inline", "says"),
    [
        ("groq = { rpm = 10", "HIVE_BUDGETS: not valid TOML"),
        ("groq = { rpmm = 10 }", "HIVE_BUDGETS: key groq: Object contains unknown field `rpmm`"),
        ("groq = { rpm = 0 }", "HIVE_BUDGETS: key groq.rpm: Expected `int` >= 1"),
        ('"a.b" = { rpm = 1 }', 'HIVE_BUDGETS: key "a.b": not a provider name'),
        (
            'groq.models."x" = { tpm = "many" }',
            "HIVE_BUDGETS: key groq.models.x.tpm: Expected `int | null`, got `str`",
        ),
        (
            "groq = { rpm = 99999999999999999999 }",
            "HIVE_BUDGETS: key groq.rpm: Expected `int` <= 9223372036854775807",
        ),
        (
            "groq = { rpm = 1, window_s = inf }",
            "HIVE_BUDGETS: key groq.window_s: Expected `float` <= 315360000.0",
        ),
    ],
)
def test_a_budget_that_cannot_be_used_is_named(inline: str, says: str) -> None:
    with pytest.raises(BudgetError) as caught:
        load_budgets(None, inline)
    assert says in str(caught.value)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[groq]\nrpm = 30\n\n[echo]\nrpd = 10\nrpm = 0\n", "line 6, key echo.rpm: Expected `int` >= 1"),
        (
            "[echo]\nrpm = 99999999999999999999\n",
            "line 2, key echo.rpm: Expected `int` <= 9223372036854775807",
        ),
        (
            '[echo.models."m-1.5"]\n# slow\ntpm = -3\n',
            'line 3, key echo.models."m-1.5".tpm: Expected `int` >= 1',
        ),
        (
            "[echo.keys.paid]\nrpm = 1\nday_s = nan\n",
            "line 3, key echo.keys.paid.day_s: Expected `float` > 0.0",
        ),
    ],
)
def test_a_budgets_file_error_names_the_file_line_and_key(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "budgets.toml"
    path.write_text(text)
    with pytest.raises(BudgetError) as caught:
        load_budgets(str(path), None)
    assert str(caught.value) == f"HIVE_BUDGETS_FILE {path}: {says}"


def test_a_budget_resolves_provider_then_model_then_key() -> None:
    plan = budget(
        'groq = { rpm = 30, rpd = 1000, models = { "big" = { rpm = 5 } }, keys = { paid = { rpm = 900 } } }',
        "groq",
    )
    assert (
        plan.limits("free", None).rpm,
        plan.limits("free", "big").rpm,
        plan.limits("paid", "big").rpm,
    ) == (
        30,
        5,
        900,
    )
    assert plan.limits("paid", "big").rpd == 1000
