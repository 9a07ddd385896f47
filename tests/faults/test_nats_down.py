"""Case 6: nats-server down under a running gateway process: every submission is refused with 503 (never a
202), /readyz fails, and service resumes by itself once the server is back."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest

from hive_bus import Hive
from hive_bus._embedded import NatsServer
from hive_bus.bus import open_bus

from ..conftest import make_settings
from ..helpers import eventually
from .ledger import Ledger
from .servers import reconnected, start
from .stack import beat_of, processes, ready, submit

pytestmark = [pytest.mark.faults, pytest.mark.anyio]

DOWN_S = 4.0


async def test_with_nats_down_the_gateway_refuses_then_resumes_by_itself(
    own_server: NatsServer, tmp_path: Path, http: httpx.AsyncClient, new_ledger: Callable[[str], Ledger]
) -> None:
    settings = make_settings(own_server.url)
    ledger = new_ledger("6 NATS down under the gateway")
    async with open_bus(settings) as bus, processes(settings, tmp_path) as procs:
        hive = Hive(bus)
        gateway = procs.gateway()
        worker = procs.worker("echo")
        await ready(gateway, http)
        await beat_of(hive, worker)
        for i in range(5):
            await submit(http, gateway, ledger, "echo", f"before {i}")
        known = ledger.accepted[0]
        assert ledger.answers[202] == 5

        own_server.kill()
        down: Counter[str] = Counter()
        retry_after: set[str | None] = set()
        slowest_scrape_s = 0.0
        deadline = anyio.current_time() + DOWN_S
        while anyio.current_time() < deadline:
            r = await submit(http, gateway, ledger, "echo", f"while down {down['submit']}")
            down["submit"] += 1
            down[f"submit {r.status_code} {r.json().get('error', {}).get('code')}"] += 1
            retry_after.add(r.headers.get("Retry-After"))
            batch = await http.post(
                f"{gateway.url}/v1/tasks/batch", json={"tasks": [{"provider": "echo", "prompt": "b"}] * 2}
            )
            down[f"batch {batch.status_code} accepted={batch.json().get('accepted')}"] += 1
            down[f"readyz {(await http.get(f'{gateway.url}/readyz')).status_code}"] += 1
            down[f"get {(await http.get(f'{gateway.url}/v1/tasks/{known}')).status_code}"] += 1
            asked_at = anyio.current_time()
            down[f"metrics {(await http.get(f'{gateway.url}/metrics')).status_code}"] += 1
            slowest_scrape_s = max(slowest_scrape_s, anyio.current_time() - asked_at)
        healthz = (await http.get(f"{gateway.url}/healthz")).status_code

        await start(own_server)  # same port, same store
        restarted_at = anyio.current_time()

        async def accepting_again() -> bool:
            r = await submit(http, gateway, ledger, "echo", f"after {ledger.answers[202]}")
            return r.status_code == 202

        await eventually(accepting_again, 60, "the gateway to accept again")
        resumed_s = anyio.current_time() - restarted_at
        ready_again = (await http.get(f"{gateway.url}/readyz")).status_code
        for i in range(5):
            await submit(http, gateway, ledger, "echo", f"later {i}")
        await reconnected(bus)
        left = await ledger.wait_final(hive, 60)
        strays, stray_done = await ledger.unaccepted(bus)
        notes = (
            f"resumed {resumed_s:.1f}s after the restart; while down: {dict(down)}; {left} not final; "
            f"refused but queued on the bus: {strays} ({stray_done} completed)"
        )
        figures, _ = await ledger.check(bus, notes=notes)
    n = down["submit"]
    assert n > 0
    assert down["submit 503 bus_unavailable"] == n  # never a 202, never another error
    assert down["batch 503 accepted=0"] == n
    assert down["readyz 503"] == n
    assert down["get 503"] == n  # a task's state is unavailable, not unknown
    # the last figures, at once: a scrape that timed out would read as the gateway down
    assert down["metrics 200"] == n and slowest_scrape_s < 3.0, slowest_scrape_s
    assert retry_after == {"5"}
    assert healthz == 200  # the process is up; it is the bus that is not
    assert ready_again == 200
    assert figures.completed == figures.accepted >= 11


async def test_after_a_nats_restart_the_live_workers_are_listed_again(
    own_server: NatsServer, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    settings = make_settings(own_server.url)
    async with open_bus(settings) as bus, processes(settings, tmp_path) as procs:
        gateway = procs.gateway()
        worker = procs.worker("echo")
        await ready(gateway, http)
        beat = await beat_of(Hive(bus), worker)
        own_server.kill()
        await start(own_server)
        await reconnected(bus)

        async def listed() -> bool:
            r = await http.get(f"{gateway.url}/v1/workers")
            return r.status_code == 200 and beat.worker_id in [b["worker_id"] for b in r.json()]

        await eventually(listed, 10, "the gateway to list the worker again")
        assert (await http.get(f"{gateway.url}/v1/stats")).status_code == 200
