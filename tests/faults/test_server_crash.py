"""Case 1: nats-server killed (SIGKILL) while clients submit over HTTP to a running gateway, then started
again on the same port with the same store; and, with the Pi hub's config, an fsync before every ack."""

from __future__ import annotations

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
from .fsync_trace import TraceUnavailable, acks, traced
from .ledger import Ledger
from .servers import hub_syncs_always, pi_config, reconnected, start
from .stack import Load, beat_of, generate_load, processes, ready

pytestmark = [pytest.mark.faults, pytest.mark.anyio]


async def test_sigkill_of_nats_under_http_load_loses_no_accepted_task(
    tmp_path: Path, http: httpx.AsyncClient, new_ledger: Callable[[str], Ledger]
) -> None:
    server = NatsServer(tmp_path / "store", config=pi_config(tmp_path))
    await start(server)
    ledger = new_ledger("1 nats-server SIGKILL under HTTP load (Pi config)")
    settings = make_settings(server.url, ack_wait_s=3.0)
    try:
        async with open_bus(settings) as bus, processes(settings, tmp_path) as procs:
            hive = Hive(bus)
            gateway = procs.gateway()
            workers = [procs.worker("echo"), procs.worker("echo")]
            await ready(gateway, http)
            for worker in workers:
                await beat_of(hive, worker)

            stop = anyio.Event()
            load = Load()

            async def run_load() -> None:
                nonlocal load
                load = await generate_load(http, gateway, ledger, "echo", stop, payload={"delay_s": 0.02})

            async def accepted_at_least(n: int) -> bool:
                return ledger.answers[202] >= n

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_load)
                await eventually(lambda: accepted_at_least(100), 60, "100 tasks accepted before the crash")
                server.kill()  # SIGKILL, mid-load
                at_kill = ledger.answers[202]
                await anyio.sleep(2.0)
                await start(server)  # same port, same store
                restarted = ledger.answers[202]
                await eventually(
                    lambda: accepted_at_least(restarted + 100), 60, "100 tasks accepted after the restart"
                )
                stop.set()
            await reconnected(bus)
            left = await ledger.wait_final(hive, 90)
            strays, stray_done = await ledger.unaccepted(bus)
            notes = (
                f"202s: {at_kill} before the kill, {restarted - at_kill} answered after it (stored before), "
                f"{ledger.answers[202] - restarted} after the restart; {load.unanswered} requests unanswered; "
                f"{left} not final after the drain; refused but queued on the bus: {strays} "
                f"({stray_done} of them completed)"
            )
            figures, fates = await ledger.check(bus, notes=notes)
    finally:
        server.stop()
    assert ledger.answers[503] > 0  # the outage was seen: refused, not accepted
    assert figures.completed == figures.accepted
    wrong = [f.task_id for f in fates.values() if f.outputs != [ledger.prompt_of(f.task_id)]]
    assert wrong == []  # each completed with its own prompt echoed, once


@pytest.mark.parametrize("config", ["pi", "default"])
async def test_each_publish_ack_follows_an_fsync_only_with_the_pi_config(
    tmp_path: Path, config: str, request: pytest.FixtureRequest
) -> None:
    """With ``sync_interval: always`` (nats/hub.conf) every ack of a submission's one publish (its task
    message; the tasks stream's RePublish stores its queued event, which no client waits for) follows
    an fsync of the stream's block; with nats-server's default (sync every 2 minutes) none does, which
    shows what the trace tells apart."""
    if config == "pi":
        assert hub_syncs_always(), "nats/hub.conf should sync every write: sync_interval: always"
    server = NatsServer(tmp_path / "store", config=pi_config(tmp_path) if config == "pi" else None)
    await start(server)
    settings = make_settings(server.url)
    names = settings.names
    submissions = 10
    try:
        async with open_bus(settings) as bus:
            hive = Hive(bus)
            await hive.submit("echo", "warm-up")  # the streams' first blocks exist before tracing
            assert server.pid is not None
            try:
                with traced(server.pid, tmp_path / "strace.txt") as out:
                    for i in range(submissions):
                        await hive.submit("echo", f"task {i}")
            except TraceUnavailable as exc:
                pytest.skip(str(exc))
        seen = acks(out.read_text())
    finally:
        server.stop()
    events = names.events_stream_of("echo")
    ours = [a for a in seen if a.stream in (names.tasks_stream, events)]
    assert len([a for a in ours if a.stream == names.tasks_stream]) == submissions
    assert len([a for a in ours if a.stream == events]) == 0  # one write per submission
    unsynced = [a for a in ours if not a.synced]
    request.node.user_properties.append(
        (
            "ledger",
            f"1 fsync before ack ({config} config): {len(ours) - len(unsynced)} of {len(ours)} publish acks",
        )
    )
    if config == "pi":
        assert unsynced == []
    else:
        assert unsynced == ours
