"""Case 5: a fault-injecting TCP proxy between one worker process and nats-server (latency, then a
blackhole, then a reset), while another worker reaches the server directly."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest

from hive_bus import Completed, Hive, Running
from hive_bus._embedded import NatsServer
from hive_bus.bus import open_bus

from ..conftest import make_settings
from ..helpers import events_of, eventually
from .ledger import Ledger
from .proxy import FaultProxy
from .stack import beat_of, processes, ready, submit, workers_online

pytestmark = [pytest.mark.faults, pytest.mark.anyio]

SLOW = "tests.handlers:slow"


@pytest.mark.timeout(240)
async def test_a_worker_cut_off_from_nats_loses_nothing_and_comes_back(
    nats_server: NatsServer, tmp_path: Path, http: httpx.AsyncClient, new_ledger: Callable[[str], Ledger]
) -> None:
    settings = make_settings(nats_server.url, ack_wait_s=2.0)
    ledger = new_ledger("5 network faults worker<->nats (latency, blackhole, reset)")
    with FaultProxy(nats_server.port) as proxy:
        async with open_bus(settings) as bus, processes(settings, tmp_path) as procs:
            hive = Hive(bus)
            gateway = procs.gateway()
            cut = procs.worker("slow", handler=SLOW, nats_url=proxy.url)
            direct = procs.worker("slow", handler=SLOW)
            await ready(gateway, http)
            cut_id = (await beat_of(hive, cut)).worker_id
            direct_id = (await beat_of(hive, direct)).worker_id

            # 1. latency: 200 ms each way; slower, and nothing else changes
            proxy.latency(0.2)
            for i in range(6):
                await submit(http, gateway, ledger, "slow", f"latency {i}", payload={"delay_s": 0.3})
            assert await ledger.wait_final(hive, 60) == 0

            # 2. blackhole while the cut-off worker runs tasks: they go to the other worker after AckWait,
            # and the cut-off worker's heartbeat expires
            proxy.pass_through()
            for i in range(8):
                await submit(http, gateway, ledger, "slow", f"blackhole {i}", payload={"delay_s": 4.0})

            async def cut_is_running() -> bool:
                views = [await hive.get(t) for t in ledger.accepted[-8:]]
                return any(v.status == "running" and v.worker == cut_id for v in views)

            await eventually(cut_is_running, 30, "the worker behind the proxy to run a task")
            proxy.blackhole()

            async def cut_gone() -> bool:
                return cut_id not in await workers_online(hive)

            await eventually(
                cut_gone, settings.heartbeat_ttl_s + 15, "the cut-off worker's heartbeat to expire"
            )
            assert await ledger.wait_final(hive, 60) == 0
            held = [t for t in ledger.accepted[-8:] if await _ran_on(hive, t, cut_id)]

            # 3. the link comes back broken (reset), then whole: the worker reconnects by itself
            proxy.reset()
            await anyio.sleep(1.0)
            proxy.pass_through()

            async def cut_back() -> bool:
                return cut_id in await workers_online(hive)

            await eventually(cut_back, 45, "the cut-off worker to reconnect and beat again")
            direct.signal(signal.SIGTERM)  # from now on only the worker that was cut off serves
            await anyio.to_thread.run_sync(direct.proc.wait, 20)
            for i in range(3):
                await submit(http, gateway, ledger, "slow", f"after {i}", payload={"delay_s": 0.1})
            left = await ledger.wait_final(hive, 60)
            notes = (
                f"{len(held)} held by the cut-off worker at the blackhole; proxy: {proxy.accepted} "
                f"connections, {proxy.reset_count} reset; {left} not final after the drain"
            )
            figures, fates = await ledger.check(bus, notes=notes)
            finished_by = {
                t: [e.worker for e in await events_of(bus, t) if isinstance(e, Completed)] for t in held
            }
    assert figures.completed == figures.accepted == 17
    assert held, "the cut-off worker was running tasks when the link went dark"
    assert all(workers == [direct_id] for workers in finished_by.values()), finished_by
    assert [fates[t].workers for t in ledger.accepted[-3:]] == [[cut_id]] * 3


async def _ran_on(hive: Hive, task_id: str, worker_id: str) -> bool:
    return any(isinstance(e, Running) and e.worker == worker_id for e in await events_of(hive.bus, task_id))
