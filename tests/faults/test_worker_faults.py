"""Cases 2 to 4: a worker killed mid-call, a zombie worker (stopped past AckWait, then resumed), and a
call three times as long as AckWait. Real worker processes, a real gateway over HTTP."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hive_bus import Completed, Hive, Running
from hive_bus._embedded import NatsServer
from hive_bus._messages import now_ms
from hive_bus.bus import Bus, open_bus

from ..conftest import make_settings
from ..fakes import ProviderFakes
from ..helpers import events_of, eventually
from .ledger import Ledger
from .stack import Child, GatewayChild, beat_of, processes, ready, submit

pytestmark = [pytest.mark.faults, pytest.mark.anyio]

SLOW = "tests.handlers:slow"


async def running_on(hive: Hive, task_ids: list[str]) -> dict[str, str]:
    """The tasks whose latest state is ``running``, with the worker running each."""
    found = {}
    for task_id in task_ids:
        view = await hive.get(task_id)
        if view.status == "running" and view.worker:
            found[task_id] = view.worker
    return found


async def metric(http: httpx.AsyncClient, gateway: GatewayChild, name: str, **labels: str) -> float:
    """One sample of the gateway's ``/metrics``, 0 when the series does not exist yet."""
    body = (await http.get(f"{gateway.url}/metrics")).text
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_a_worker_killed_mid_call_has_its_tasks_redelivered_within_ack_wait(
    nats_server: NatsServer, tmp_path: Path, http: httpx.AsyncClient, new_ledger: Callable[[str], Ledger]
) -> None:
    settings = make_settings(nats_server.url, ack_wait_s=3.0)
    ledger = new_ledger("2 worker SIGKILL mid-call")
    async with open_bus(settings) as bus, processes(settings, tmp_path) as procs:
        hive = Hive(bus)
        gateway = procs.gateway()
        workers = [procs.worker("slow", handler=SLOW), procs.worker("slow", handler=SLOW)]
        await ready(gateway, http)
        ids = {(await beat_of(hive, w)).worker_id: w for w in workers}
        for i in range(4):
            await submit(http, gateway, ledger, "slow", f"call {i}", payload={"delay_s": 5.0})

        running = await eventually(lambda: running_on(hive, ledger.accepted), 30, "a call to be running")
        victim_id = next(iter(running.values()))
        victim: Child = ids[victim_id]
        (survivor_id,) = set(ids) - {victim_id}
        victim.signal(signal.SIGKILL)
        killed_at_ms = now_ms()
        await anyio.to_thread.run_sync(victim.proc.wait, 10)

        left = await ledger.wait_final(hive, 60)
        # every task the dead worker was running: completed by the survivor, once, soon after AckWait
        held = [t for t in ledger.accepted if victim_id in [e.worker for e in await _running(bus, t)]]
        restarts_s = {}
        for task_id in held:
            (done,) = [e for e in await events_of(bus, task_id) if isinstance(e, Completed)]
            assert (done.worker, done.attempt) == (survivor_id, 2)
            restarts_s[task_id] = (done.started_at_ms - killed_at_ms) / 1000
        slowest = max(restarts_s.values(), default=0.0)
        notes = f"{len(held)} held by the killed worker, restarted {slowest:.2f}s after the kill at most (AckWait 3s)"
        figures, _ = await ledger.check(bus, notes=f"{notes}; {left} not final after the drain")
    assert figures.completed == figures.accepted == 4
    assert held, "the killed worker was running a task"
    late = {t: s for t, s in restarts_s.items() if s > settings.ack_wait_s + 1.0}
    assert not late, f"redelivered later than AckWait ({settings.ack_wait_s}s) plus a second: {late}"


async def _running(bus: Bus, task_id: str) -> list[Running]:
    return [e for e in await events_of(bus, task_id) if isinstance(e, Running)]


async def test_a_zombie_worker_finishing_late_is_recorded_once_and_counted(
    nats_server: NatsServer,
    tmp_path: Path,
    http: httpx.AsyncClient,
    fakes: ProviderFakes,
    new_ledger: Callable[[str], Ledger],
) -> None:
    """A worker frozen (SIGSTOP) mid-call past AckWait: another worker runs the task again and records
    it; the frozen one, resumed, finishes its call too. One completed record; the wasted call shows as
    ``hive_duplicate_results_total`` on the gateway."""
    settings = make_settings(nats_server.url, ack_wait_s=2.0)
    ledger = new_ledger("3 zombie worker (SIGSTOP past AckWait, SIGCONT)")
    fakes.groq.delay_s = 4.0  # each call lasts twice AckWait
    env = {"GROQ_API_KEY": "gsk_zombie_test_key_0001", "GROQ_BASE_URL": fakes.groq_base_url}
    async with open_bus(settings) as bus, processes(settings, tmp_path, **env) as procs:
        hive = Hive(bus)
        gateway = procs.gateway()
        # one call at a time each, so that a frozen worker holds no pull request the task could go to
        workers = [procs.worker("groq", concurrency=1), procs.worker("groq", concurrency=1)]
        await ready(gateway, http)
        ids = {(await beat_of(hive, w)).worker_id: w for w in workers}
        prompt = "Escribe un tuit sobre zombis"
        await submit(http, gateway, ledger, "groq", prompt)
        (task_id,) = ledger.accepted

        running = await eventually(lambda: running_on(hive, [task_id]), 30, "the call to be running")
        zombie = ids[running[task_id]]
        zombie.signal(signal.SIGSTOP)
        try:
            done = await hive.wait(task_id, 60)
            assert done.status == "completed"
            assert done.worker != running[task_id]

            async def zombie_answered() -> bool:  # the fake has answered the frozen worker's call too
                return fakes.groq.prompts_completed.count(prompt) == 2

            await eventually(zombie_answered, 30, "the provider to answer both calls")
        finally:
            zombie.signal(signal.SIGCONT)

        async def duplicate_counted() -> float:
            return await metric(http, gateway, "hive_duplicate_results_total", provider="groq")

        duplicates = await eventually(duplicate_counted, 30, "the duplicate result on /metrics")
        figures, fates = await ledger.check(bus, notes=f"{fakes.groq.requests} provider calls")
        completed_metric = await metric(
            http, gateway, "hive_tasks_completed_total", provider="groq", model="llama-3.3-70b-versatile"
        )
    assert figures.completed == 1
    assert fates[task_id].workers == [done.worker]
    assert fakes.groq.prompts_seen.count(prompt) == 2  # the provider was called twice...
    assert duplicates == 1  # ...and the one wasted call is counted
    assert completed_metric == 1


async def test_a_call_three_times_ack_wait_is_delivered_once(
    nats_server: NatsServer, tmp_path: Path, http: httpx.AsyncClient, new_ledger: Callable[[str], Ledger]
) -> None:
    settings = make_settings(nats_server.url, ack_wait_s=2.0)
    ledger = new_ledger("4 call 3x AckWait, kept alive")
    call_s = 3 * settings.ack_wait_s + 0.5
    async with open_bus(settings) as bus, processes(settings, tmp_path) as procs:
        hive = Hive(bus)
        gateway = procs.gateway()
        # a second worker that would get the task if the server thought the first one dead
        workers = [procs.worker("slow", handler=SLOW), procs.worker("slow", handler=SLOW)]
        await ready(gateway, http)
        for w in workers:
            await beat_of(hive, w)
        await submit(http, gateway, ledger, "slow", "long", payload={"delay_s": call_s})
        (task_id,) = ledger.accepted
        left = await ledger.wait_final(hive, 60)
        figures, _ = await ledger.check(bus, notes=f"call {call_s:g}s, AckWait {settings.ack_wait_s:g}s")
        events = await events_of(bus, task_id)
        consumer = await bus.js.consumer_info(settings.names.tasks_stream, settings.names.consumer("slow"))
    assert left == 0
    assert [type(e).__name__ for e in events] == ["Queued", "Running", "Completed"]
    running, completed = events[1], events[2]
    assert isinstance(running, Running) and isinstance(completed, Completed)
    assert (running.attempt, completed.attempt) == (1, 1)
    assert running.worker == completed.worker
    # the whole call ran (uvloop's timers keep milliseconds: a sleep may end a fraction of one early)
    assert completed.call_s >= call_s - 0.005
    assert consumer.num_redelivered == 0
    assert figures.completed == 1
