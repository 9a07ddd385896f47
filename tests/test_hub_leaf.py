"""A remote site on a leaf node: the shipped hub config with nats/leafnodes.conf included, and a site
server run from nats/leaf.conf (no JetStream of its own), with only the machine-specific values
swapped. A worker that connects to the site's server with ``HIVE_JS_DOMAIN`` serves the hub's tasks,
beats into the hub's heartbeat bucket, and shares key cooldowns with the hub both ways."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import pytest

from hive_bus import Hive, Settings, load_settings
from hive_bus._cooldown import CooldownRecord
from hive_bus._embedded import NatsServer, nats_server_path
from hive_bus._messages import encoder, now_ms
from hive_bus._stats import QueueDepth, queue_depths
from hive_bus._stats import _count as count
from hive_bus.bus import open_bus
from hive_bus.workers.echo import EchoProvider
from hive_bus.workers.groq import GroqProvider

from .fakes import ProviderFakes
from .helpers import TcpRelay, eventually, free_port, running_worker
from .hub import Hub, hub_server, make_certs, render

pytestmark = pytest.mark.anyio

DOMAIN = "hive"  # as nats/hub.conf names it


@dataclass(frozen=True, slots=True)
class Site:
    hub: Hub
    server: NatsServer  # the hub
    site_url: str  # the site's own server, where its workers connect
    link: TcpRelay  # between the site's server and the hub


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("leaf")
    certs = make_certs(base / "certs", servers=["localhost", "127.0.0.1"], clients=["gateway", "site"])
    rendered = render(base / "nats", certs)
    leaf_port, site_port = free_port(), free_port()
    _edit(rendered.dir / "hub.conf", {"# include leafnodes.conf": "include leafnodes.conf"})
    _edit(rendered.dir / "leafnodes.conf", {"0.0.0.0:7422": f"127.0.0.1:{leaf_port}"})
    _edit(
        rendered.dir / "leaf.conf",
        {
            "SITE_PASSWORD_HERE": rendered.password("site"),
            "HUB_HOST:7422": f"127.0.0.1:{leaf_port}",
            "127.0.0.1:4222": f"127.0.0.1:{site_port}",
        },
    )
    link = TcpRelay(leaf_port)
    _edit(
        rendered.dir / "leaf.conf",
        {f"127.0.0.1:{leaf_port}": f"127.0.0.1:{link.port}"},  # the site reaches the hub through the relay
    )
    with hub_server(rendered, base / "store") as hub:
        log = (base / "site.log").open("wb")
        site_server = subprocess.Popen(
            [nats_server_path(), "-c", str(rendered.dir / "leaf.conf")], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _wait_for_leaf_link(base / "site.log", site_server)
            yield Site(rendered, hub, f"nats://127.0.0.1:{site_port}", link)
        finally:
            site_server.terminate()
            site_server.wait(10)
            log.close()
            link.cut()


def _edit(conf: Path, values: dict[str, str]) -> None:
    text = conf.read_text()
    for was, now in values.items():
        assert was in text, f"{conf.name} no longer has {was!r}"
        text = text.replace(was, now)
    conf.write_text(text)


def _wait_for_leaf_link(log: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the site's nats-server stopped: {log.read_text()[-2000:]}"
        if "Leafnode connection created" in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"the site never linked to the hub: {log.read_text()[-2000:]}")


def gateway_settings(site: Site, prefix: str) -> Settings:
    hub = site.hub
    return load_settings(
        environ={}, nats_url=site.server.url.replace("nats://", "tls://"), prefix=prefix, nats_user="gateway",
        nats_password=hub.password("gateway"), nats_tls_ca_file=str(hub.certs / "ca.pem"),
        nats_tls_cert_file=str(hub.certs / "client-gateway.pem"),
        nats_tls_key_file=str(hub.certs / "client-gateway-key.pem"),
        heartbeat_interval_s=0.5, heartbeat_ttl_s=1.5,
    )  # fmt: skip


def site_settings(site: Site, prefix: str) -> Settings:
    return load_settings(
        environ={}, nats_url=site.site_url, prefix=prefix, js_domain=DOMAIN, heartbeat_interval_s=0.5,
        heartbeat_ttl_s=1.5,
    )  # fmt: skip


async def test_a_worker_behind_a_leaf_node_serves_the_hubs_tasks(site: Site) -> None:
    prefix = "hive"  # the prefix the shipped accounts allow
    async with open_bus(gateway_settings(site, prefix)) as hub_bus:
        hive = Hive(hub_bus)
        ids = [await hive.submit("echo", f"post {i} from the hub") for i in range(5)]
        async with (
            open_bus(site_settings(site, prefix)) as site_bus,
            running_worker(site_bus, "echo", EchoProvider(), concurrency=2) as worker,
        ):
            views = [await hive.wait(task_id, 15) for task_id in ids]
            beats = await hive.workers()
        assert [(v.status, v.output) for v in views] == [
            ("completed", f"post {i} from the hub") for i in range(5)
        ]
        assert {v.worker for v in views} == {worker.id}
        assert [b.worker_id for b in beats] == [worker.id]  # its heartbeat, written through the link


async def test_cooldowns_cross_the_leaf_link_both_ways(site: Site) -> None:
    prefix = "hive"
    with ProviderFakes() as fakes:
        fakes.groq.fail_next(429, 1, retry_after_s=2.0)
        groq = GroqProvider(api_key="gsk_site_key_0123456789", base_url=fakes.groq_base_url)
        async with open_bus(gateway_settings(site, prefix)) as hub_bus:
            hive = Hive(hub_bus)
            async with (
                open_bus(site_settings(site, prefix)) as site_bus,
                running_worker(site_bus, "groq", groq) as worker,
            ):
                [key] = worker.cooldowns.keys
                # the site's 429 is written to the hub's bucket
                task_id = await hive.submit("groq", "a post")
                assert (await hive.wait(task_id, 20)).status == "completed"
                entry = await hub_bus.providers_kv.get(f"groq.{key}")
                written = msgspec.json.decode(entry.value or b"", type=CooldownRecord)
                assert (written.set_by, written.key, fakes.groq.rate_limited) == (worker.id, key, 1)

                # a cooldown the hub's side writes reaches the site's worker, which waits it out
                record = CooldownRecord(
                    provider="groq",
                    until_ms=now_ms() + 60_000,
                    reason="set at the hub",
                    key=key,
                    set_by="hub",
                )
                await hub_bus.providers_kv.put(f"groq.{key}", encoder.encode(record))

                async def cooling() -> bool:
                    return worker.cooldowns.left_s(key) > 30

                await eventually(cooling, 10, "the hub's cooldown to reach the site's worker")
                calls = fakes.groq.requests
                waiting = await hive.submit("groq", "waits out the hub's cooldown")
                await anyio.sleep(1.0)
                assert (await hive.get(waiting)).status in ("queued", "retrying")
                assert fakes.groq.requests == calls


async def test_the_site_works_on_once_its_link_to_the_hub_is_back(site: Site) -> None:
    """The site's link drops while its worker runs: tasks submitted at the hub meanwhile wait there,
    and the worker serves them once the link is back, each once, with nothing lost or failed."""
    prefix = "hive"
    async with open_bus(gateway_settings(site, prefix)) as hub_bus:
        hive = Hive(hub_bus)
        async with (
            open_bus(site_settings(site, prefix)) as site_bus,
            running_worker(site_bus, "echo", EchoProvider(), concurrency=2) as worker,
        ):
            first = await hive.submit("echo", "before the outage")
            assert (await hive.wait(first, 15)).status == "completed"
            site.link.cut()
            try:
                during = [await hive.submit("echo", f"during the outage {i}") for i in range(3)]
                await anyio.sleep(3.0)  # longer than the worker's heartbeat TTL and its pull requests
                assert [(await hive.get(t)).status for t in during] == ["queued"] * 3
            finally:
                site.link.restore()
            views = [await hive.wait(t, 30) for t in during]
            beats = await eventually(hive.workers, 10, "the site's worker to beat at the hub again")
            echo_events = hub_bus.names.events_stream_of("echo")
            completions = [
                await count(hub_bus, hub_bus.names.event_subject("echo", t, "*"), stream=echo_events)
                for t in during
            ]
        assert [(v.status, v.output, v.worker) for v in views] == [
            ("completed", f"during the outage {i}", worker.id) for i in range(3)
        ]
        # A task handed to the site as the link went down is lost on the way and delivered again (a
        # second attempt); one whose outcome was on its way is run again, and JetStream keeps its first
        # outcome. Either way each task ends once: queued, running (calls over 0.25 s only), completed.
        assert all(v.attempt in (1, 2) for v in views)
        assert completions == [2, 2, 2]  # queued, completed: no retry, no second final event
        assert [(b.worker_id, b.failed, b.retried) for b in beats] == [(worker.id, 0, 0)]


async def test_a_worker_behind_a_leaf_node_hears_the_hubs_cancels(site: Site) -> None:
    """Workers hear cancels through a core subscription (no consumer), which crosses the leaf link: a
    call the hub cancels is abandoned, and a task cancelled while queued behind it is never called
    (each takes 30 s when called)."""
    prefix = "hive"
    async with open_bus(gateway_settings(site, prefix)) as hub_bus:
        hive = Hive(hub_bus)
        async with (
            open_bus(site_settings(site, prefix)) as site_bus,
            running_worker(site_bus, "farcancel", EchoProvider(), concurrency=1),
        ):
            running = await hive.submit("farcancel", "larga", payload={"delay_s": 30})

            async def runs() -> bool:
                return (await hive.get(running)).status == "running"

            await eventually(runs, 10, "the call to run behind the leaf node")
            await anyio.sleep(1.5)  # the worker's subscription surely live: a later task's cancel is heard
            waiting = await hive.submit("farcancel", "en cola", payload={"delay_s": 30})
            await hive.cancel(waiting)
            await hive.cancel(running)

            async def drained() -> bool:
                return (await queue_depths(hub_bus))["farcancel"] == QueueDepth(0, 0)

            await eventually(drained, 10, "both tasks let go")
        assert [(await hive.get(t)).status for t in (running, waiting)] == ["cancelled", "cancelled"]
