"""The shipped three-node cluster config (nats/cluster.conf) on loopback ports, with the bus's streams
and buckets at three replicas (HIVE_REPLICAS=3): whichever node is SIGKILLed, every task accepted
before, during and after is kept and run, and the bus serves on with two nodes."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import pytest

from hive_bus import BusUnavailable, Hive, Settings
from hive_bus._embedded import NatsServer
from hive_bus.bus import Bus, open_bus
from hive_bus.workers.echo import EchoProvider

from .conftest import make_settings
from .helpers import free_port, running_worker
from .hub import Hub, make_certs, render

pytestmark = pytest.mark.anyio
NODES = ("nats-1", "nats-2", "nats-3")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Hub, dict[str, NatsServer]]]:
    certs = make_certs(tmp_path / "certs", servers=["127.0.0.1", "localhost"], clients=["admin"])
    hub = render(tmp_path / "nats", certs)
    route_ports = {name: free_port() for name in NODES}
    routes = ",".join(f"nats-route://127.0.0.1:{p}" for p in route_ports.values())
    servers: dict[str, NatsServer] = {}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in NODES:
                mp.setenv("NATS_SERVER_NAME", name)  # cluster.conf takes the node's name from it
                args = ["--cluster", f"nats://127.0.0.1:{route_ports[name]}", "--routes", routes]
                server = NatsServer(
                    tmp_path / name, config=hub.dir / "cluster.conf", extra_args=args,
                    log_path=tmp_path / f"{name}.log",
                )  # fmt: skip
                servers[name] = server
                server.start()
        yield hub, servers
    finally:
        for server in servers.values():
            server.stop()


def settings_for(hub: Hub, servers: dict[str, NatsServer]) -> Settings:
    return make_settings(
        ",".join(s.url for s in servers.values()),
        replicas=3, nats_user="admin", nats_password=hub.password("admin"),
        nats_tls_ca_file=str(hub.certs / "ca.pem"), nats_tls_cert_file=str(hub.certs / "client-admin.pem"),
        nats_tls_key_file=str(hub.certs / "client-admin-key.pem"),
        connect_timeout_s=10, request_timeout_s=2, ack_wait_s=5,
    )  # fmt: skip


@asynccontextmanager
async def open_bus_when_ready(settings: Settings, name: str) -> AsyncIterator[Bus]:
    """The bus, once the cluster answers JetStream requests: at start-up, and after a node's death,
    until the nodes left have elected their leaders (a supervisor such as systemd does this retry)."""
    with anyio.fail_after(30, reason="the cluster's JetStream did not answer within 30 s"):
        while True:
            try:
                bus_cm = open_bus(settings, name=name)
                bus = await bus_cm.__aenter__()
                break
            except BusUnavailable:
                await anyio.sleep(0.5)
    try:
        yield bus
    finally:
        await bus_cm.__aexit__(None, None, None)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["tasks stream leader", "tasks stream follower"])
async def test_every_accepted_task_survives_the_sigkill_of_one_node(
    cluster: tuple[Hub, dict[str, NatsServer]], victim: str
) -> None:
    hub, servers = cluster
    settings = settings_for(hub, servers)
    accepted: list[str] = []
    async with open_bus_when_ready(settings, name="submitter") as bus:
        hive = Hive(bus)
        info = await bus.js.stream_info(bus.names.tasks_stream)
        assert info.config.num_replicas == 3 and info.cluster is not None
        leader = info.cluster.leader
        followers = [r.name for r in info.cluster.replicas or []]
        target = leader if victim == "tasks stream leader" else followers[0]
        assert target in servers

        async def submit(n: int) -> None:
            with suppress(BusUnavailable):  # not accepted: the client was told so, and owns the retry
                accepted.append(await hive.submit("echo", f"tarea {n} {secrets.token_hex(2)}"))

        for n in range(20):
            await submit(n)
        servers[target].kill()  # SIGKILL: no goodbye to the other nodes
        before_kill = len(accepted)
        with anyio.fail_after(45, reason="the two remaining nodes did not take tasks again within 45 s"):
            n = 20
            while len(accepted) < before_kill + 20:  # serves on
                await submit(n)
                n += 1
    assert before_kill == 20

    # every accepted task is run, from the two remaining nodes
    async with open_bus_when_ready(settings, name="worker") as bus:
        hive = Hive(bus)
        async with running_worker(bus, "echo", EchoProvider(), concurrency=8):
            with anyio.fail_after(60, reason="accepted tasks were not all completed within 60 s"):
                for task_id in accepted:
                    view = await hive.wait(task_id, timeout_s=60)
                    assert view.status == "completed", (task_id, view)
