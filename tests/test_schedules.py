"""Time kept by the server (issue 16, points 2 and 4): a task's deadline holds with no worker at all,
through a JetStream message schedule that the gateway's timer reader turns into an ``expired`` failure.
Real nats-server, workers and the gateway's reader in this process."""

from __future__ import annotations

import datetime
import json
import logging

import anyio
import httpx
import msgspec
import nats.js.errors
import pytest

from hive_bus import BusUnavailable, Completed, FunctionProvider, Hive
from hive_bus._assigned import assignment
from hive_bus._bus import open_bus
from hive_bus._counts import unfetched_cancels
from hive_bus._embedded import NatsServer
from hive_bus._expiry import Timers
from hive_bus._messages import Failed, Queued, TaskRequest, encoder, new_task_id, now_ms
from hive_bus._schedules import Schedule, Schedules
from hive_bus._timers import DeadlineTimer, RecurringTimer
from hive_bus.bus import Bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider

from . import handlers
from .conftest import make_settings
from .helpers import events_of, eventually, hive_cli, running_worker
from .hostile.test_poison_input import nested
from .test_hub_cluster import cluster, open_bus_when_ready, settings_for  # noqa: F401 - the fixture

pytestmark = pytest.mark.anyio


async def _failed(hive: Hive, task_id: str) -> bool:
    return (await hive.get(task_id)).status == "failed"


async def test_a_deadline_ends_a_task_that_no_worker_ever_fetched(bus: Bus, hive: Hive) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(Timers(bus).run)
        task_id = await hive.submit("nobody", "a tiempo o nunca", deadline_s=1)
        await eventually(lambda: _failed(hive, task_id), 8, "the deadline to end the task")
        # the dead letter follows the failed event that ended the task, written by the same timers:
        # stopped the moment the task reads failed, they could be stopped between the two
        [letter] = await eventually(lambda: hive.dead_letters(provider="nobody"), 15, "its dead letter")
        tg.cancel_scope.cancel()
    view = await hive.get(task_id)
    assert (view.status, view.reason) == ("failed", "expired")
    assert "deadline" in (view.error or "")
    assert letter.failed.reason == "expired" and letter.failed.task is not None
    assert [type(e) for e in await events_of(bus, task_id)] == [Queued, Failed]


async def test_a_task_expired_while_queued_leaves_the_queue_at_once(bus: Bus, hive: Hive) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(Timers(bus).run)
        task_id = await hive.submit("depth", "a tiempo o nunca", deadline_s=2)
        kept = await hive.submit("depth", "sin prisa")
        # listed once the submission counters say tasks were queued for it (within 0.25 s)
        await eventually(lambda: _queued_is(hive, 2), 5, "both tasks in the queue's depth")
        [letter] = await eventually(lambda: hive.dead_letters(provider="depth"), 15, "the expiry")
        await eventually(lambda: _queued_is(hive, 1), 5, "the expired task to leave the queue's depth")
        tg.cancel_scope.cancel()
    assert (letter.failed.reason, letter.failed.was) == ("expired", "queued")
    # replayed before any worker fetched its expired run: that run's message, which no worker was
    # handed, leaves the queue and its count with the replay; the new run is queued
    await hive.replay(task_id)
    assert await _uncounted(bus)
    assert await _queued(hive) == 2
    async with running_worker(bus, "depth", EchoProvider()):
        for done in (kept, task_id):
            assert (await hive.wait(done, 10)).status == "completed"
        await eventually(lambda: _queued_is(hive, 0), 10, "nothing queued")


async def _queued(hive: Hive) -> int:
    return next((s.pending for s in await hive.stats() if s.provider == "depth"), 0)


async def _queued_is(hive: Hive, n: int) -> bool:
    return await _queued(hive) == n


async def _uncounted(bus: Bus) -> bool:
    return await unfetched_cancels(bus) == {"depth": 0}


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


async def test_a_replayed_run_is_run_by_a_worker_that_still_holds_the_expiry(bus: Bus, hive: Hive) -> None:
    """A replay deletes the expired run's key from the cancels bucket, but a worker hears of that
    through its own consumer and may fetch the new run first: the expiry it holds is of the old run
    only, so the new run is called, not dropped as expired (it was lost so in a CI run)."""
    task_id = await hive.submit("replayed", "otra vez", deadline_s=1)
    async with anyio.create_task_group() as tg:
        await tg.start(Timers(bus).run)
        await eventually(lambda: _failed(hive, task_id), 8, "the deadline to end the task")
        await eventually(lambda: hive.dead_letters(provider="replayed"), 15, "its dead letter")
        tg.cancel_scope.cancel()
    key = bus.names.cancel_key("replayed", task_id)
    expiry = (await bus.cancels_kv.get(key)).value or b""
    await hive.replay(task_id)
    # the worker's view before the deletion reaches it: the old run's expiry under the task's key
    await bus.cancels_kv.put(key, expiry)
    async with running_worker(bus, "replayed", EchoProvider()):
        assert (await hive.wait(task_id, 10)).status == "completed"


async def test_two_replays_of_one_dead_letter_at_once_run_it_once(bus: Bus, hive: Hive) -> None:
    """Both replays answer (the second found the expired run's message deleted by the first, which
    JetStream answers with a 500, not a 404), and the task runs once, for its new run."""
    calls: list[str] = []

    async def record(task: object) -> str:
        calls.append(getattr(task, "id", ""))
        return "ran"

    task_id = await hive.submit("twice", "dos veces", deadline_s=1)
    async with anyio.create_task_group() as tg:
        await tg.start(Timers(bus).run)
        await eventually(lambda: hive.dead_letters(provider="twice"), 15, "its dead letter")
        tg.cancel_scope.cancel()
    replayed: list[int] = []

    async def replay() -> None:
        replayed.append((await hive.replay(task_id)).run)

    async with anyio.create_task_group() as tg:
        tg.start_soon(replay)
        tg.start_soon(replay)
    assert replayed == [1, 1]
    async with running_worker(bus, "twice", FunctionProvider(record)):
        assert (await hive.wait(task_id, 10)).status == "completed"
        await anyio.sleep(1.0)  # time for a second message of the task, were there one
    assert calls == [task_id]


async def test_a_running_call_past_its_deadline_is_abandoned(bus: Bus, hive: Hive) -> None:
    async with (
        running_worker(bus, "slow", FunctionProvider(handlers.until_cancelled), concurrency=1),
        anyio.create_task_group() as tg,
    ):
        await tg.start(Timers(bus).run)
        task_id = await hive.submit("slow", "no termina nunca", deadline_s=1)
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
        # the dead letter follows the failed event that ended the task (the timers write both)
        [letter] = await eventually(lambda: hive.dead_letters(provider="nobody"), 15, "its dead letter")
        tg.cancel_scope.cancel()
    assert (await hive.get(task_id)).status == "queued"
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
        # year 10000 in UTC: was a 500 (the timer's time could not be written)
        late = await http.post("/v1/tasks", json={**body, "not_before": "9999-12-31T23:59:59-23:59"})
        assert late.status_code == 400 and "`not_before` is out of range" in late.text, late.text
        assert late.json()["error"]["field"] == "not_before"  # the field, as every other 400 names it
        batch = await http.post(
            "/v1/tasks/batch", json={"tasks": [body, {**body, "not_before": "9999-12-31T23:59:59-23:59"}]}
        )
        assert (batch.status_code, batch.json()["error"]["field"]) == (400, "tasks[1].not_before"), batch.text
        async with running_worker(bus, "echo", EchoProvider()):
            done = (await http.get(f"/v1/tasks/{task_id}", params={"wait": 10})).json()
        assert done["status"] == "completed"
        gateway.stop()
    events = await events_of(bus, task_id)
    [completed] = [e for e in events if isinstance(e, Completed)]
    assert completed.started_at_ms >= int(at.timestamp() * 1000)  # not run before its time
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["Queued", "Queued"] and kinds[-1] == "Completed"  # scheduled, queued, ran


async def test_a_not_before_past_what_the_bus_keeps_is_refused(nats_server: NatsServer) -> None:
    """A task waits for its not_before as its ``queued`` event, which the events stream drops at
    HIVE_EVENTS_MAX_AGE_S: one scheduled further ahead was accepted (202, scheduled) and, at its time,
    'a start for task ... is refused: the bus knows no such task', never run and no longer on the bus
    (the README's own 2026-12-24 example, submitted more than a week before). It is refused now, naming
    the field, from the client, the HTTP API and a batch; one within the wait is scheduled as before."""
    # a task may wait 60 s less a tenth, at least two audits, at most half: 30 s
    settings = make_settings(nats_server.url, events_max_age_s=60, duplicate_window_s=30)
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        gateway = Gateway(hive, GatewayOptions(port=0))
        try:
            with pytest.raises(
                msgspec.ValidationError, match=r"`not_before` is 4\ds away, past the 30s a task may wait"
            ):
                await hive.submit("later", "dentro de un minuto", not_before=_in(45))
            lines = [TaskRequest(provider="later", prompt="x", not_before=_in(s)) for s in (20, 45)]
            with pytest.raises(msgspec.ValidationError, match="task 1: `not_before` is"):  # submit --file
                await hive.submit_many(lines)
            async with (
                anyio.create_task_group() as tg,
                httpx.AsyncClient(base_url=gateway.url, timeout=10) as http,
            ):
                await tg.start(gateway.serve)
                far = {"provider": "later", "prompt": "luego", "not_before": _in(45).isoformat()}
                r = await http.post("/v1/tasks", json=far)
                assert (r.status_code, r.json()["error"]["field"]) == (400, "not_before"), r.text
                assert "HIVE_EVENTS_MAX_AGE_S" in r.json()["error"]["message"]
                near = {**far, "not_before": _in(20).isoformat()}
                batch = await http.post("/v1/tasks/batch", json={"tasks": [near, far]})
                assert (batch.status_code, batch.json()["error"]["field"]) == (400, "tasks[1].not_before")
                ok = await http.post("/v1/tasks", json=near)
                assert (ok.status_code, ok.json()["status"]) == (202, "scheduled"), ok.text
                gateway.stop()
        finally:
            await hive.close()


async def test_a_scheduled_task_cancelled_never_runs(bus: Bus, hive: Hive) -> None:
    calls: list[str] = []

    async def record(task: object) -> str:
        calls.append(getattr(task, "id", ""))
        return "ran"

    dropped = await hive.submit("later", "no hace falta", not_before=_in(1))
    # a deadline counts from submission: this one ends before its time comes
    expired = await hive.submit("later", "demasiado tarde", not_before=_in(1.2), deadline_s=0.5)
    kept = await hive.submit("later", "este sí", not_before=_in(1.5))
    assert (await hive.get(dropped)).status == "scheduled"
    assert (await hive.cancel(dropped)).status == "cancelled"
    async with running_worker(bus, "later", FunctionProvider(record)), anyio.create_task_group() as tg:
        await tg.start(Timers(bus).run)
        assert (await hive.wait(kept, 10)).status == "completed"  # its timer fired after the others'
        tg.cancel_scope.cancel()
    assert calls == [kept]
    assert (await hive.get(dropped)).status == "cancelled"
    view = await hive.get(expired)
    assert (view.status, view.reason) == ("failed", "expired")


async def test_hive_submit_not_before_and_hive_schedule_on_the_command_line(bus: Bus, hive: Hive) -> None:
    env = {
        "HIVE_NATS_URL": bus.settings.nats_url, "HIVE_PREFIX": bus.names.prefix,
        "HIVE_HEARTBEAT_INTERVAL_S": "0.5", "HIVE_HEARTBEAT_TTL_S": "1.5",
    }  # fmt: skip
    done = hive_cli(["submit", "later", "mañana", "--not-before", _in(3600).isoformat()], env=env)
    assert done.returncode == 0, done.stderr
    assert (await hive.get(done.stdout.strip())).status == "scheduled"
    bad = hive_cli(["submit", "later", "mañana", "--not-before", "mañana"], env=env)
    assert bad.returncode == 2 and "--not-before" in bad.stderr and "ISO 8601" in bad.stderr, bad.stderr
    naive = hive_cli(["submit", "later", "mañana", "--not-before", "2026-12-24T09:00:00"], env=env)
    assert naive.returncode == 2 and "has no offset" in naive.stderr, naive.stderr  # and how to add it
    assert "2026-12-24T09:00:00+01:00" in naive.stderr, naive.stderr

    none = hive_cli(["schedule", "list"], env={**env, "HIVE_PREFIX": f"{bus.names.prefix}empty"})
    assert (none.returncode, none.stdout) == (0, "") and "no schedules" in none.stderr, none.stderr
    made = hive_cli(["schedule", "add", "later", "cada hora", "--every", "1h", "--name", "horaria"], env=env)
    assert made.returncode == 0, made.stderr
    schedule_id = json.loads(made.stdout)["id"]
    paused = hive_cli(["schedule", "pause", schedule_id], env=env)
    assert paused.returncode == 0 and "paused" in paused.stdout
    listed = hive_cli(["schedule", "list"], env=env)
    assert listed.stdout.startswith(f"{schedule_id} 'horaria' @every 3600s -> later: paused"), listed.stdout
    wrong = hive_cli(["schedule", "add", "later", "x", "--cron", "99 * * * *"], env=env)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "'99 * * * *' is not a cron rule" in wrong.stderr, wrong.stderr  # the rule as typed
    for rules in (
        [],
        ["--cron", "@daily", "--every", "1h"],
        ["--every", "1h", "--time-zone", "Europe/Madrid"],
    ):
        unclear = hive_cli(["schedule", "add", "later", "x", *rules], env=env)
        assert unclear.returncode == 2 and "Traceback" not in unclear.stderr, unclear.stderr
        assert "--cron" in unclear.stderr and "every_s" not in unclear.stderr, unclear.stderr


async def test_a_recurring_schedule_fires_tasks_that_complete_and_pause_stops_it(
    bus: Bus, hive: Hive
) -> None:
    gateway = Gateway(hive, GatewayOptions(port=0))
    async with (
        anyio.create_task_group() as tg,
        httpx.AsyncClient(base_url=gateway.url, timeout=10) as http,
        running_worker(bus, "echo", EchoProvider()),
    ):
        await tg.start(gateway.serve)
        body = {"every_s": 1, "name": "cada segundo", "task": {"provider": "echo", "prompt": "tic"}}
        made = await http.post("/v1/schedules", json=body)
        assert made.status_code == 201, made.text
        schedule_id = made.json()["id"]
        assert made.json()["rule"] == "@every 1s" and made.json()["next_at"]

        async def two_runs_done() -> list[dict[str, str]] | None:
            runs = (await http.get(f"/v1/schedules/{schedule_id}")).json()["runs"]
            done = [run for run in runs if run["status"] == "completed"]
            return done if len(done) >= 2 else None

        runs = await eventually(two_runs_done, 10, "two firings to complete")
        for run in runs:
            view = await hive.get(run["task_id"])
            assert view.status == "completed"
        here = await assignment(bus, runs[0]["task_id"])  # the task as queued: its message
        assert here is not None and next(type(e) for e in await events_of(bus, here.task.id)) is Queued
        task = here.task
        assert task.metadata == {"schedule_id": schedule_id} and task.prompt == "tic"
        assert len({run["task_id"] for run in runs}) == len(runs)  # each firing its own task

        paused = await http.post(f"/v1/schedules/{schedule_id}/pause")
        assert paused.status_code == 200 and paused.json()["paused"] is True
        # the server holds no timer for it any more: nothing can fire it
        with pytest.raises(nats.js.errors.NotFoundError):
            await bus.js.get_last_msg(
                bus.names.schedules_stream, bus.names.schedule_subject("recurring", schedule_id)
            )
        fired = (await http.get(f"/v1/schedules/{schedule_id}")).json()["fired"]
        await anyio.sleep(1.5)  # paused past its next firing: once resumed, the next is counted anew
        resumed = await http.post(f"/v1/schedules/{schedule_id}/resume")
        assert resumed.status_code == 200 and resumed.json()["paused"] is False
        next_at = datetime.datetime.fromisoformat(resumed.json()["next_at"].replace("Z", "+00:00"))
        assert next_at.timestamp() >= now_ms() / 1000 - 0.5, resumed.json()  # not in the past

        async def fired_again() -> bool:
            return bool((await http.get(f"/v1/schedules/{schedule_id}")).json()["fired"] > fired + 1)

        await eventually(fired_again, 10, "the resumed schedule to fire")
        metrics = (await http.get("/metrics")).text
        assert f'hive_schedule_firings_total{{schedule="{schedule_id}"}}' in metrics
        listed = (await http.get("/v1/schedules")).json()["schedules"]
        assert [s["id"] for s in listed] == [schedule_id]
        assert (await http.delete(f"/v1/schedules/{schedule_id}")).status_code == 200
        gone = await http.get(f"/v1/schedules/{schedule_id}")
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "schedule_not_found")
        gateway.stop()


async def test_a_poisoned_schedule_record_fires_nothing_and_the_other_timers_go_on(
    bus: Bus, hive: Hive, caplog: pytest.LogCaptureFixture
) -> None:
    """A schedule whose template no submission takes (written straight into its bucket, past the
    checks: a payload nested too deep) once took the timers reader down, and ``hive up`` with it, at
    each restart again. Its record is now left out when read (logged), so its firing submits
    nothing and is not read again; every other timer keeps firing."""
    names = bus.names
    store = await Schedules.open(bus)  # makes the bucket and the timers' stream
    template = TaskRequest(provider="echo", prompt="hondo", payload=nested(100))  # unchecked
    poisoned = Schedule(id=new_task_id(), rule="@every 3600s", task=template, created_at_ms=now_ms())
    await (await bus.js.key_value(names.schedules_bucket)).create(poisoned.id, encoder.encode(poisoned))
    await bus.js.publish(
        names.fired_subject("recurring", poisoned.id), encoder.encode(RecurringTimer(schedule_id=poisoned.id))
    )
    with caplog.at_level(logging.WARNING):
        async with running_worker(bus, "echo", EchoProvider()), anyio.create_task_group() as tg:
            await tg.start(Timers(bus, hive).run)
            good = await hive.create_schedule({"provider": "echo", "prompt": "sigue"}, every="1s")
            due = await hive.submit("nobody", "a tiempo", deadline_s=1)
            await eventually(lambda: _runs_completed(hive, store, good.id, 2), 15, "the good schedule's runs")
            await eventually(lambda: _failed(hive, due), 10, "the deadline")
            tg.cancel_scope.cancel()
    left_out = [r.getMessage() for r in caplog.records if "does not decode" in r.getMessage()]
    assert len(left_out) == 1, left_out  # its firing settled: not read again and again
    assert poisoned.id in left_out[0] and "nested deeper" in left_out[0] and "hondo" not in left_out[0]
    assert not [r for r in caplog.records if "failed for good" in r.getMessage()]
    assert [s.id for s in await store.listed()] == [good.id]  # left out, the timers going on


BAD_SCHEDULES: list[tuple[dict[str, object], str, str]] = [
    ({"cron": "0 61 * * *"}, "cron", "'0 61 * * *' is not a cron rule"),  # as typed, not '0 0 61 * * *'
    ({"cron": "0 0 61 * * *"}, "cron", "'0 0 61 * * *' is not a cron rule"),
    ({"cron": "0 9 * * *", "time_zone": "Mars/Olympus"}, "time_zone", "not a time zone"),
    ({"every_s": 0.5}, "every_s", "at least 1 second"),
    ({"every": "soon"}, "every", '"90s"'),
    ({"every_s": 1e300}, "every_s", "at most 365 days"),  # these three were a 500
    ({"every_s": 10**30}, "every_s", "at most 365 days"),
    ({"every": "99999999999d"}, "every", "at most 365 days"),
    ({"every_s": 5, "cron": "@daily"}, "every_s", "exactly one of"),
    ({"every_s": 5, "time_zone": "Europe/Madrid"}, "time_zone", "goes with cron"),
    ({"every_s": 5, "task": {"provider": "echo"}}, "task", "prompt"),
    ({"every_s": 5, "task": {"provider": "echo", "prompt": "x", "colour": 1}}, "task", "colour"),
    ({"every_s": 5, "task": {"provider": "echo", "prompt": "x", "not_before": "2030-01-01T00:00:00Z"}},
     "task.not_before", "not_before"),
    ({"every_s": 5, "task": {"provider": "echo", "prompt": "x", "not_before": "9999-12-31T23:59:59-23:59"}},
     "task.not_before", "out of range"),  # its field named, as a type's or a range's error names it
    # what POST /v1/tasks refuses (once a 201, then the first firing took the timers reader down)
    ({"every": "1s", "task": {"provider": "echo", "prompt": "deep", "payload": nested(100)}},
     "task.payload", "nested deeper than 32 levels"),
    ({"every": "1s", "task": {"provider": "echo", "prompt": "x", "metadata": {"a": nested(40)}}},
     "task.metadata", "nested deeper than 32 levels"),
    ({"every": "1s", "task": {"provider": "echo", "prompt": "x", "webhook": {"url": "https://example.com/h"}}},
     "task.webhook", "sends no webhooks"),
]  # fmt: skip


async def test_a_bad_schedule_is_a_400_saying_where(hive: Hive) -> None:
    gateway = Gateway(hive, GatewayOptions(port=0))
    async with anyio.create_task_group() as tg, httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        await tg.start(gateway.serve)
        for body, field, words in BAD_SCHEDULES:
            r = await http.post("/v1/schedules", json={"task": {"provider": "echo", "prompt": "x"}, **body})
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert (error.get("field") or "").startswith(field) and words in error["message"], (body, error)
        assert (await http.get("/v1/schedules")).json()["schedules"] == []
        gateway.stop()


async def test_a_template_too_large_to_keep_is_a_413_naming_the_limit(bus: Bus, hive: Hive) -> None:
    """Once a 503 with Retry-After ("maximum payload exceeded"), which a client retries forever."""
    gateway = Gateway(hive, GatewayOptions(port=0))
    async with anyio.create_task_group() as tg, httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        await tg.start(gateway.serve)
        body = {"every": "1h", "task": {"provider": "echo", "prompt": "x" * 2_000_000}}
        r = await http.post("/v1/schedules", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (413, "too_large"), r.text
        assert f"max_payload of {bus.nc.max_payload} bytes" in r.json()["error"]["message"]
        assert "Retry-After" not in r.headers
        assert (await http.get("/v1/schedules")).json()["schedules"] == []
        state = (await bus.js.stream_info(bus.names.schedules_stream)).state
        assert state.messages == 0  # no timer was set
        gateway.stop()


async def test_a_long_interval_goes_to_the_server_in_plain_seconds(hive: Hive) -> None:
    """ "12d" was refused as "'@every 1.0368e+06s' is not a cron rule"."""
    for every, rule in [("12d", "@every 1036800s"), ("365d", "@every 31536000s"), ("1.5s", "@every 1.5s")]:
        schedule = await hive.create_schedule({"provider": "echo", "prompt": "x"}, every=every)
        assert schedule.rule == rule
        await hive.delete_schedule(schedule.id)


async def _connected(bus: Bus) -> bool:
    return bus.nc.is_connected


async def _runs_completed(hive: Hive, store: Schedules, schedule_id: str, at_least: int) -> list[str] | None:
    try:
        runs = (await store.get(schedule_id)).runs
        done = [run.task_id for run in runs if (await hive.get(run.task_id)).status == "completed"]
    except BusUnavailable:
        return None  # the server is on its way back
    return done if len(done) >= at_least else None


@pytest.mark.slow
async def test_a_schedule_and_a_not_before_task_hold_across_a_nats_server_restart(
    own_server: NatsServer,
) -> None:
    settings = make_settings(own_server.url)
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        store = await Schedules.open(bus)
        schedule = await hive.create_schedule({"provider": "echo", "prompt": "sigue"}, every="1s")
        async with running_worker(bus, "echo", EchoProvider()), anyio.create_task_group() as tg:
            await tg.start(Timers(bus, hive).run)
            before = await eventually(lambda: _runs_completed(hive, store, schedule.id, 1), 10, "a first run")
            later = await hive.submit("echo", "después del reinicio", not_before=_in(2))
            own_server.stop()
            own_server.start()  # same port, same store: the schedule is in it
            await eventually(lambda: _connected(bus), 15, "the client to reconnect")
            after = await eventually(
                lambda: _runs_completed(hive, store, schedule.id, len(before) + 2),
                20,
                "runs after the restart",
            )
            assert (await hive.wait(later, 20)).status == "completed"  # its timer was in the store
            tg.cancel_scope.cancel()
        assert len(set(after)) == len(after)
        await hive.close()


@pytest.mark.slow
async def test_a_schedule_fires_once_per_time_on_a_three_node_cluster(request: pytest.FixtureRequest) -> None:
    """Every stream at three replicas, two gateways' timer readers on connections of their own: each
    firing is stored once and becomes one task."""
    hub, servers = request.getfixturevalue("cluster")  # test_hub_cluster's three nodes
    settings = settings_for(hub, servers)
    async with (
        open_bus_when_ready(settings, "one") as one,
        open_bus_when_ready(settings, "two") as two,
        running_worker(one, "echo", EchoProvider()),
        anyio.create_task_group() as tg,
    ):
        hive_one, hive_two = Hive(one), Hive(two)
        info = await one.js.stream_info(one.names.tasks_stream)
        assert info.config.num_replicas == 3
        schedule = await hive_one.create_schedule({"provider": "echo", "prompt": "una vez"}, every="1s")
        await tg.start(Timers(one, hive_one).run)
        await tg.start(Timers(two, hive_two).run)
        store = await Schedules.open(one)
        await eventually(lambda: _runs_completed(hive_one, store, schedule.id, 2), 30, "two runs")
        await hive_one.pause_schedule(schedule.id)
        names = one.names
        fired = names.fired_subject("recurring", schedule.id)

        async def all_read() -> int | None:
            state = (await one.js.stream_info(names.schedules_stream, subjects_filter=fired)).state
            stored = sum((state.subjects or {}).values())
            record = await store.get(schedule.id)
            return stored if record.fired == stored else None

        firings = await eventually(all_read, 20, "every firing to be read")
        queued = names.event_subject("echo", "*", "queued")
        state = (await one.js.stream_info(names.events_stream_of("echo"), subjects_filter=queued)).state
        assert sum((state.subjects or {}).values()) == firings  # one task per firing, however many readers
        runs = (await store.get(schedule.id)).runs
        assert len({run.task_id for run in runs}) == len(runs) == firings
        tg.cancel_scope.cancel()
        await hive_one.close()
        await hive_two.close()


async def test_a_record_that_does_not_decode_is_left_out_and_can_be_deleted(bus: Bus, hive: Hive) -> None:
    """Only the hub writes the schedules bucket, but a record written there by hand (garbage, or a
    template nested thousands deep) made ``GET /v1/schedules`` a 500 for every schedule."""
    gateway = Gateway(hive, GatewayOptions(port=0))
    async with anyio.create_task_group() as tg, httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        await tg.start(gateway.serve)
        made = await http.post(
            "/v1/schedules", json={"every": "1h", "task": {"provider": "echo", "prompt": "x"}}
        )
        assert made.status_code == 201, made.text
        kv = await bus.js.key_value(bus.names.schedules_bucket)
        deep, garbage = new_task_id(), new_task_id()
        payload = "[" * 5000 + "]" * 5000
        await kv.put(
            deep, f'{{"id": "{deep}", "task": {{"provider": "echo", "payload": {payload}}}}}'.encode()
        )
        await kv.put(garbage, b"not a schedule")
        listed = await http.get("/v1/schedules")
        assert listed.status_code == 200, listed.text
        assert [s["id"] for s in listed.json()["schedules"]] == [made.json()["id"]]
        for bad in (deep, garbage):
            shown = await http.get(f"/v1/schedules/{bad}")
            assert shown.status_code == 404 and "does not decode" in shown.json()["error"]["message"], (
                shown.text
            )
            paused = await http.post(f"/v1/schedules/{bad}/pause")
            assert paused.status_code == 404, paused.text
            assert (await http.delete(f"/v1/schedules/{bad}")).status_code == 200
            assert (await http.delete(f"/v1/schedules/{bad}")).status_code == 404  # gone
        gateway.stop()
