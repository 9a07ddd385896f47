"""Time kept by the server (issue 16, points 2 and 4): a task's deadline holds with no worker at all,
through a JetStream message schedule that the gateway's timer reader turns into an ``expired`` failure.
Real nats-server, workers and the gateway's reader in this process."""

from __future__ import annotations

import datetime

import anyio
import httpx
import pytest

from hive_bus import Completed, FunctionProvider, Hive
from hive_bus._expiry import Timers
from hive_bus._messages import Failed, Queued, encoder, now_ms
from hive_bus._timers import DeadlineTimer
from hive_bus.bus import Bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider

from . import handlers
from .helpers import events_of, eventually, hive_cli, running_worker

pytestmark = pytest.mark.anyio


async def _failed(hive: Hive, task_id: str) -> bool:
    return (await hive.get(task_id)).status == "failed"


async def test_a_deadline_ends_a_task_that_no_worker_ever_fetched(bus: Bus, hive: Hive) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(Timers(bus).run)
        task_id = await hive.submit("nobody", "a tiempo o nunca", deadline_s=1)
        await eventually(lambda: _failed(hive, task_id), 8, "the deadline to end the task")
        tg.cancel_scope.cancel()
    view = await hive.get(task_id)
    assert (view.status, view.reason) == ("failed", "expired")
    assert "deadline" in (view.error or "")
    [letter] = await hive.dead_letters(provider="nobody")
    assert letter.failed.reason == "expired" and letter.failed.task is not None
    assert [type(e) for e in await events_of(bus, task_id)] == [Queued, Failed]


async def test_a_deadline_that_fired_while_no_gateway_ran_is_kept(bus: Bus, hive: Hive) -> None:
    """The timer lives in the server: a gateway that starts only after the deadline still ends the
    task; a worker that starts after that drops the task without a call."""
    calls: list[str] = []

    async def record(task: object) -> str:
        calls.append(getattr(task, "id", ""))
        return "ran"

    task_id = await hive.submit("late", "llegué tarde", deadline_s=1)
    kept = await hive.submit("late", "sin prisa")
    await anyio.sleep(1.5)  # past the deadline, with nothing running but the server
    assert (await hive.get(task_id)).status == "queued"
    async with anyio.create_task_group() as tg:
        await tg.start(Timers(bus).run)
        await eventually(lambda: _failed(hive, task_id), 8, "the fired deadline to be read")
        tg.cancel_scope.cancel()
    assert (await hive.get(task_id)).reason == "expired"
    async with running_worker(bus, "late", FunctionProvider(record)):
        assert (await hive.wait(kept, 10)).status == "completed"
        assert calls == [kept]
        # replayed from the dead letters, its new run is the workers' to run again
        await hive.replay(task_id)
        assert (await hive.wait(task_id, 10)).status == "completed"
    assert calls == [kept, task_id]


async def test_a_running_call_past_its_deadline_is_abandoned(bus: Bus, hive: Hive) -> None:
    async with (
        running_worker(bus, "slow", FunctionProvider(handlers.until_cancelled), concurrency=1),
        anyio.create_task_group() as tg,
    ):
        await tg.start(Timers(bus).run)
        task_id = await hive.submit("slow", "no termina nunca", deadline_s=1.5)
        await eventually(lambda: _failed(hive, task_id), 10, "the deadline to end the running task")
        await eventually(lambda: _abandoned(task_id), 10, "the worker to abandon the call")
        tg.cancel_scope.cancel()
    assert (await hive.get(task_id)).reason == "expired"


async def _abandoned(task_id: str) -> bool:
    return task_id in handlers.ABANDONED


async def test_a_forged_or_early_expiry_is_refused(bus: Bus, hive: Hive) -> None:
    """A fired deadline counts only as the bus records the task: an unknown task, or one whose
    deadline is still ahead, is left as it is."""
    names = bus.names
    task_id = await hive.submit("nobody", "todavía no", deadline_s=600)
    await bus.js.publish(
        names.fired_subject("deadline", task_id),
        encoder.encode(DeadlineTimer(task_id=task_id, run=0, at_ms=now_ms())),
    )
    unknown = "0" * 26
    await bus.js.publish(
        names.fired_subject("deadline", unknown),
        encoder.encode(DeadlineTimer(task_id=unknown, run=0, at_ms=now_ms())),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(Timers(bus).run)
        # a real deadline fires after both forgeries were read: the reader takes them in order
        due = await hive.submit("nobody", "ahora sí", deadline_s=1)
        await eventually(lambda: _failed(hive, due), 8, "the real deadline")
        tg.cancel_scope.cancel()
    assert (await hive.get(task_id)).status == "queued"
    [letter] = await hive.dead_letters(provider="nobody")
    assert letter.failed.task_id == due


def _in(seconds: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)


async def test_not_before_over_http_is_scheduled_then_queued_by_the_server(bus: Bus, hive: Hive) -> None:
    gateway = Gateway(hive, GatewayOptions(port=0))
    async with (
        anyio.create_task_group() as tg,
        httpx.AsyncClient(base_url=gateway.url, timeout=10) as http,
    ):
        await tg.start(gateway.serve)
        at = _in(1.5)
        body = {"provider": "echo", "prompt": "a las nueve", "not_before": at.isoformat(), "deadline_s": 60}
        r = await http.post("/v1/tasks", json=body)
        assert (r.status_code, r.json()["status"]) == (202, "scheduled")
        task_id = r.json()["id"]
        assert (await http.get(f"/v1/tasks/{task_id}")).json()["status"] == "scheduled"
        naive = await http.post("/v1/tasks", json={**body, "not_before": "2030-01-01T09:00:00"})
        assert naive.status_code == 400 and "not_before" in naive.text and "timezone" in naive.text
        async with running_worker(bus, "echo", EchoProvider()):
            done = (await http.get(f"/v1/tasks/{task_id}", params={"wait": 10})).json()
        assert done["status"] == "completed"
        gateway.stop()
    events = await events_of(bus, task_id)
    [completed] = [e for e in events if isinstance(e, Completed)]
    assert completed.started_at_ms >= int(at.timestamp() * 1000)  # not run before its time
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["Queued", "Queued"] and kinds[-1] == "Completed"  # scheduled, queued, ran


async def test_a_scheduled_task_cancelled_never_runs(bus: Bus, hive: Hive) -> None:
    calls: list[str] = []

    async def record(task: object) -> str:
        calls.append(getattr(task, "id", ""))
        return "ran"

    dropped = await hive.submit("later", "no hace falta", not_before=_in(1))
    kept = await hive.submit("later", "este sí", not_before=_in(1.5))
    assert (await hive.get(dropped)).status == "scheduled"
    assert (await hive.cancel(dropped)).status == "cancelled"
    async with running_worker(bus, "later", FunctionProvider(record)), anyio.create_task_group() as tg:
        await tg.start(Timers(bus).run)
        assert (await hive.wait(kept, 10)).status == "completed"  # its timer fired after the other's
        tg.cancel_scope.cancel()
    assert calls == [kept]
    assert (await hive.get(dropped)).status == "cancelled"


async def test_hive_submit_not_before_on_the_command_line(bus: Bus, hive: Hive) -> None:
    env = {
        "HIVE_NATS_URL": bus.settings.nats_url, "HIVE_PREFIX": bus.names.prefix,
        "HIVE_HEARTBEAT_INTERVAL_S": "0.5", "HIVE_HEARTBEAT_TTL_S": "1.5",
    }  # fmt: skip
    done = hive_cli(["submit", "later", "mañana", "--not-before", _in(3600).isoformat()], env=env)
    assert done.returncode == 0, done.stderr
    assert (await hive.get(done.stdout.strip())).status == "scheduled"
    bad = hive_cli(["submit", "later", "mañana", "--not-before", "mañana"], env=env)
    assert bad.returncode != 0 and "not_before" in bad.stderr
