"""A worker credential made by nats/worker-user.sh, on the shipped hub config (TLS, accounts): it can do
a worker's whole job and nothing else.

Written with plain nats-py calls against the bus's names (tasks on ``hive.tasks.<provider>.<priority>.<task id>``,
three consumers per provider, events, dead letters, three buckets), which the gateway user declares
here, so that what is proven is the permission set, whatever the runtime does with it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    KeyValueConfig,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from hive_bus._embedded import NatsServer

from .helpers import eventually
from .hub import Hub, WorkerUser, connect, hub_server, make_certs, render

pytestmark = pytest.mark.anyio

PROVIDERS = ("alpha", "beta", "gamma")
W1 = WorkerUser("w1", PROVIDERS)
W2 = WorkerUser("w2", PROVIDERS)
PRIORITIES = ("high", "normal", "low")
TIMEOUT_S = 0.5  # a refused request is never answered: it times out


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hub, NatsServer]]:
    base = tmp_path_factory.mktemp("hub")
    certs = make_certs(base / "certs", servers=["localhost", "127.0.0.1"], clients=["gateway", "w1", "w2"])
    rendered = render(base / "nats", certs, [W1, W2])
    with hub_server(rendered, base / "store") as server:
        yield rendered, server


@dataclass
class Client:
    nc: NATS
    js: JetStreamContext
    errors: list[str]

    def violations(self) -> list[str]:
        # nats-server 2.15 sends them lower-cased: 'permissions violation for publish to "<subject>"'
        return [e.lower() for e in self.errors if "permissions violation" in e.lower()]

    def refused(self, what: str) -> Callable[[], Awaitable[bool]]:
        async def probe() -> bool:
            return any(what.lower() in v for v in self.violations())

        return probe


@asynccontextmanager
async def client(
    hub: Hub, server: NatsServer, user: str, cert: str, inbox: str | None = None
) -> AsyncIterator[Client]:
    errors: list[str] = []
    nc = await connect(server.url, hub, user, cert=cert, errors=errors, inbox=inbox)
    try:
        yield Client(nc, nc.jetstream(timeout=2), errors)
    finally:
        await nc.close()


async def declare(js: JetStreamContext, *providers: str) -> None:
    """The bus objects, as the gateway declares them."""
    await js.add_stream(
        StreamConfig(
            name="HIVE_TASKS",
            subjects=["hive.tasks.*.*.*"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            allow_direct=True,
            republish=RePublish(
                src="hive.tasks.*.*.*",
                dest="hive.events.{{wildcard(1)}}.{{wildcard(3)}}.queued",
                headers_only=True,
            ),
        )
    )
    for provider in providers:  # each provider's events in a stream of their own
        await js.add_stream(
            StreamConfig(
                name=f"HIVE_EVENTS_{provider}", subjects=[f"hive.events.{provider}.>"],
                storage=StorageType.FILE, allow_direct=True,
            )
        )  # fmt: skip
    for provider in providers:
        await js.add_stream(
            StreamConfig(
                name=f"HIVE_DLQ_{provider}", subjects=[f"hive.dlq.{provider}.*"], storage=StorageType.FILE
            )
        )
    await js.add_stream(  # JetStream counters: tasks accepted, and cancelled while queued, per provider
        StreamConfig(
            name="HIVE_COUNTERS", subjects=["hive.counters.>"], storage=StorageType.FILE,
            max_msgs_per_subject=1, allow_msg_counter=True, allow_direct=True,
        )
    )  # fmt: skip
    await js.create_key_value(
        KeyValueConfig(bucket="hive_workers", ttl=15, storage=StorageType.MEMORY, direct=True)
    )
    await js.create_key_value(KeyValueConfig(bucket="hive_providers", storage=StorageType.FILE, direct=True))
    await js.create_key_value(KeyValueConfig(bucket="hive_budgets", storage=StorageType.FILE, direct=True))
    await js.create_key_value(KeyValueConfig(bucket="hive_cancels", storage=StorageType.FILE, direct=True))
    for bucket in ("hive_blobs", *(f"hive_blobs_{p}" for p in providers)):
        await js.add_stream(  # the claim check's Object Store buckets: one a provider, and an older hub's
            StreamConfig(
                name=f"OBJ_{bucket}", subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
                storage=StorageType.FILE, allow_direct=True, allow_rollup_hdrs=True,
            )
        )  # fmt: skip
    await js.add_stream(  # the response cache: a KV bucket whose keys carry their own TTL
        StreamConfig(
            name="KV_hive_cache", subjects=["$KV.hive_cache.>"], storage=StorageType.FILE,
            max_msgs_per_subject=1, allow_direct=True, allow_msg_ttl=True,
        )
    )  # fmt: skip
    for provider in providers:
        for priority in PRIORITIES:
            await js.add_consumer(
                "HIVE_TASKS",
                ConsumerConfig(
                    durable_name=f"hive_{provider}_{priority}",
                    filter_subject=f"hive.tasks.{provider}.{priority}.*",
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=30,
                    max_deliver=-1,
                ),
            )  # fmt: skip


async def server_has_subscriptions(nc: NATS) -> None:
    """Return once the server holds every subscription made so far on ``nc``. One ``flush()`` is not
    enough: nats-py 2.16 writes its PING straight to the socket, ahead of a SUB still queued for the
    client's flusher task, so the PONG can come back before the server has the SUB. The flusher runs
    while the first PING is out; the second PING follows the SUB."""
    await nc.flush()
    await nc.flush()


async def pending(gw: Client, consumer: str) -> tuple[int, int]:
    """(waiting, handed out and not acked) of a consumer, as the gateway reads it."""
    info = await gw.js.consumer_info("HIVE_TASKS", consumer)
    return info.num_pending or 0, info.num_ack_pending or 0


async def test_a_worker_credential_does_a_workers_whole_job(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    async with (
        client(rendered, server, "gateway", "gateway") as gw,
        client(rendered, server, "w1", "w1", "_INBOX.w1") as w1,
    ):
        await declare(gw.js, *PROVIDERS)
        wake = await w1.nc.subscribe("hive.tasks.alpha.high.*")
        await server_has_subscriptions(w1.nc)  # before the first task
        for n in range(2):
            await gw.js.publish(f"hive.tasks.alpha.high.t{n}", f"task {n}".encode())
        assert (await wake.next_msg(timeout=2)).data == b"task 0"  # the core wake-up

        # start-up checks, then bind to the existing consumer and pull
        for stream in (
            "HIVE_TASKS",
            "HIVE_EVENTS_alpha",
            "HIVE_DLQ_alpha",
            "KV_hive_workers",
            "KV_hive_providers",
            "KV_hive_budgets",
            "KV_hive_cache",
        ):
            await w1.js.stream_info(stream)
        await w1.js.consumer_info("HIVE_TASKS", "hive_alpha_high")
        psub = await w1.js.pull_subscribe_bind(durable="hive_alpha_high", stream="HIVE_TASKS")

        # a long call: several in-progress acks to the same reply subject, then the final ack
        [first] = await psub.fetch(1, timeout=2)
        for _ in range(12):
            await first.in_progress()
        await first.ack_sync(timeout=2)
        # a retry: NAK with a delay, delivered again, then settled
        [second] = await psub.fetch(1, timeout=2)
        await second.nak(delay=0.1)
        [again] = await psub.fetch(1, timeout=5)
        assert (again.data, again.metadata.num_delivered) == (b"task 1", 2)
        await again.in_progress()
        await again.ack_sync(timeout=2)
        assert await pending(gw, "hive_alpha_high") == (0, 0)

        # its tasks' events, dead letters, and a task's last event on its provider read back by id
        task_id = "01J" + secrets.token_hex(8).upper()
        for status in ("running", "retrying", "moved", "completed"):
            await w1.js.publish(
                f"hive.events.alpha.{task_id}.{status}", status.encode(), stream="HIVE_EVENTS_alpha"
            )
        await w1.js.publish(f"hive.dlq.alpha.{task_id}", b"dead", stream="HIVE_DLQ_alpha")
        last = await w1.js.get_last_msg("HIVE_EVENTS_alpha", f"hive.events.alpha.{task_id}.*", direct=True)
        assert last.data == b"completed"

        # its own heartbeat key, written and removed
        beats = await w1.js.key_value("hive_workers")
        await beats.put("w1.alpha.host-1-ab12", b"beat")
        assert (await (await gw.js.key_value("hive_workers")).get("w1.alpha.host-1-ab12")).value == b"beat"
        await beats.delete("w1.alpha.host-1-ab12")

        # cooldowns and budgets of its provider: compare-and-set, direct reads, a watch by core subscription
        watch = await w1.nc.subscribe("$KV.hive_providers.alpha.>")
        await w1.nc.flush()
        for bucket, key in (
            ("hive_providers", "alpha.key1"),
            ("hive_budgets", "alpha.key1.gemini-2_5-flash"),
        ):
            kv = await w1.js.key_value(bucket)
            revision = await kv.create(key, b"one")
            await kv.update(key, b"two", last=revision)
            with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
                await kv.update(key, b"stale", last=revision)
            assert (await kv.get(key)).value == b"two"
        assert [(await watch.next_msg(timeout=2)).data for _ in range(2)] == [b"one", b"two"]

        # its provider's cached answers: written with a TTL, read back by key
        await w1.js.publish("$KV.hive_cache.alpha.abc123", b"answer", stream="KV_hive_cache", msg_ttl=60)
        cached = await w1.js.get_last_msg("KV_hive_cache", "$KV.hive_cache.alpha.abc123", direct=True)
        assert cached.data == b"answer"

        # its provider's cancels: heard as the hub puts them, and one task's key read back
        heard = await w1.nc.subscribe("$KV.hive_cancels.alpha.*")
        await w1.nc.flush()
        await (await gw.js.key_value("hive_cancels")).put(f"alpha.{task_id}", b"cancelled")
        assert (await heard.next_msg(timeout=2)).data == b"cancelled"
        cancel = await w1.js.get_last_msg("KV_hive_cancels", f"$KV.hive_cancels.alpha.{task_id}", direct=True)
        assert cancel.data == b"cancelled"

        # a chunk of a large task of its provider read back (from its provider's bucket, and from the
        # bucket of every provider an older hub wrote), and one of its outputs written
        await w1.js.stream_info("OBJ_hive_blobs_alpha")
        for bucket in ("hive_blobs_alpha", "hive_blobs"):
            chunk = f"$O.{bucket}.C.alpha.{task_id}.task.ab12.0"
            await gw.js.publish(chunk, b"a large prompt", stream=f"OBJ_{bucket}")
            assert (await w1.js.get_last_msg(f"OBJ_{bucket}", chunk, direct=True)).data == b"a large prompt"
        await w1.js.publish(
            f"$O.hive_blobs_alpha.C.alpha.{task_id}.output.cd34.0", b"out", stream="OBJ_hive_blobs_alpha"
        )

        # a task it fetched that was cancelled while queued, taken off its provider's count
        await w1.js.publish("hive.counters.unfetched_cancels.alpha", b"", headers={"Nats-Incr": "-1"})
        count = await gw.js.get_msg(
            "HIVE_COUNTERS", subject="hive.counters.unfetched_cancels.alpha", direct=True
        )
        assert json.loads(count.data or b"") == {"val": "-1"}

        await w1.nc.flush()
        assert not w1.violations()


async def test_a_worker_cannot_settle_a_task_another_worker_holds(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    async with (
        client(rendered, server, "gateway", "gateway") as gw,
        client(rendered, server, "w1", "w1", "_INBOX.w1") as w1,
        client(rendered, server, "w2", "w2", "_INBOX.w2") as w2,
    ):
        await declare(gw.js, *PROVIDERS)
        await gw.js.publish("hive.tasks.gamma.normal.t1", b"held by w1")
        psub = await w1.js.pull_subscribe_bind(durable="hive_gamma_normal", stream="HIVE_TASKS")
        [msg] = await psub.fetch(1, timeout=2)
        assert msg.reply

        for forged in (b"+ACK", b"+TERM", b"-NAK"):
            await w2.nc.publish(msg.reply, forged)
        await eventually(w2.refused(f'Publish to "{msg.reply}"'), 5, "the server refusing w2's forged ack")
        await w2.nc.flush()
        assert await pending(gw, "hive_gamma_normal") == (0, 1)  # still held by w1

        await msg.ack_sync(timeout=2)  # the holder can
        assert await pending(gw, "hive_gamma_normal") == (0, 0)


@dataclass(frozen=True)
class Forbidden:
    what: str  # the refused subject, as the server names it in its violation
    act: Callable[[Client], Awaitable[object]]
    intact: Callable[[Client], Awaitable[bool]]  # read by the gateway: nothing happened


async def _ignore_timeout(call: Awaitable[object]) -> None:
    with suppress(TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
        await call


async def _stream_exists(gw: Client) -> bool:
    info = await gw.js.stream_info("HIVE_TASKS")
    return info.config.name == "HIVE_TASKS"


def _consumer_on(stream: str, subject: str) -> Forbidden:
    """A consumer of ``stream`` filtered on the worker's own provider's ``subject``, refused."""
    config = ConsumerConfig(name="mine", filter_subject=subject, ack_policy=AckPolicy.NONE)

    async def no_consumer(gw: Client) -> bool:
        return (await gw.js.stream_info(stream)).state.consumer_count == 0

    return Forbidden(
        f"$JS.API.CONSUMER.CREATE.{stream}.", lambda w: w.js.add_consumer(stream, config), no_consumer
    )


async def _no_chunk(gw: Client, bucket: str, subject: str) -> bool:
    try:
        await gw.js.get_last_msg(f"OBJ_{bucket}", subject)
    except nats.js.errors.NotFoundError:
        return True
    return False


async def _no_consumer(gw: Client) -> bool:
    try:
        await gw.js.consumer_info("HIVE_TASKS", "hive_beta_mine")
    except nats.js.errors.NotFoundError:
        return True
    return False


async def _no_key(gw: Client, bucket: str, key: str) -> bool:
    try:
        await (await gw.js.key_value(bucket)).get(key)
    except nats.js.errors.KeyNotFoundError:
        return True
    return False


async def _no_event(gw: Client) -> bool:
    try:
        await gw.js.get_last_msg("HIVE_EVENTS_beta", "hive.events.beta.forged.queued", direct=True)
    except nats.js.errors.NotFoundError:
        return True
    return False


async def _no_index(gw: Client) -> bool:
    try:
        await gw.js.get_last_msg("HIVE_INDEX", "hive.index.>", direct=True)
    except nats.js.errors.NotFoundError:
        return True
    return False


async def _no_timer(gw: Client) -> bool:
    try:
        await gw.js.get_last_msg("HIVE_SCHEDULES", "hive.*.*.01J0FORGED")
    except nats.js.errors.NotFoundError:  # no such message (or no timers' stream yet)
        return True
    return False


async def _publish(w: Client, subject: str) -> None:
    await w.nc.publish(subject, b"{}")
    await w.nc.flush()


FORBIDDEN = {
    "delete the tasks stream": Forbidden(
        "$JS.API.STREAM.DELETE.HIVE_TASKS", lambda w: w.js.delete_stream("HIVE_TASKS"), _stream_exists
    ),
    "purge the tasks stream": Forbidden(
        "$JS.API.STREAM.PURGE.HIVE_TASKS", lambda w: w.js.purge_stream("HIVE_TASKS"), _stream_exists
    ),
    "create a consumer": Forbidden(
        "$JS.API.CONSUMER.",
        lambda w: w.js.add_consumer(
            "HIVE_TASKS",
            ConsumerConfig(durable_name="hive_beta_mine", filter_subject="hive.tasks.beta.high.*"),
        ),
        _no_consumer,
    ),
    # its provider's cancels are heard and looked up, never read through a consumer: one credential
    # that may make consumers may make them until the account has none left for anyone
    "make a consumer on its provider's cancels": _consumer_on("KV_hive_cancels", "$KV.hive_cancels.beta.*"),
    # nor on the claim check's store: a large task's content is read a chunk at a time by direct gets
    "make a consumer on its provider's chunks": _consumer_on(
        "OBJ_hive_blobs_beta", "$O.hive_blobs_beta.C.beta.>"
    ),
    # chunks go to its provider's bucket alone, of its own limit: filling it fills no other provider's
    "write a chunk to another provider's bucket": Forbidden(
        "$O.hive_blobs_delta.C.",
        lambda w: _publish(w, "$O.hive_blobs_delta.C.delta.x.output.1"),
        lambda gw: _no_chunk(gw, "hive_blobs_delta", "$O.hive_blobs_delta.C.delta.x.output.1"),
    ),
    "write a chunk to the bucket of every provider": Forbidden(
        "$O.hive_blobs.C.beta.",
        lambda w: _publish(w, "$O.hive_blobs.C.beta.x.output.1"),
        lambda gw: _no_chunk(gw, "hive_blobs", "$O.hive_blobs.C.beta.x.output.1"),
    ),
    "delete its provider's consumer": Forbidden(
        "$JS.API.CONSUMER.DELETE.HIVE_TASKS.hive_beta_high",
        lambda w: w.js.delete_consumer("HIVE_TASKS", "hive_beta_high"),
        lambda gw: _consumer_exists(gw, "hive_beta_high"),
    ),
    "publish a task": Forbidden(
        "hive.tasks.beta.normal.t1",
        lambda w: _publish(w, "hive.tasks.beta.normal.t1"),
        lambda gw: _consumer_is_empty(gw, "hive_beta_normal"),
    ),
    "forge a queued event": Forbidden(
        "hive.events.beta.forged.queued", lambda w: _publish(w, "hive.events.beta.forged.queued"), _no_event
    ),
    "write another worker's heartbeat": Forbidden(
        "$KV.hive_workers.w2.beta.host-1",
        lambda w: _kv_put(w, "hive_workers", "w2.beta.host-1"),
        lambda gw: _no_key(gw, "hive_workers", "w2.beta.host-1"),
    ),
    "write a heartbeat of another provider": Forbidden(
        "$KV.hive_workers.w1.delta.host-1",
        lambda w: _kv_put(w, "hive_workers", "w1.delta.host-1"),
        lambda gw: _no_key(gw, "hive_workers", "w1.delta.host-1"),
    ),
    "write another provider's cooldown": Forbidden(
        "$KV.hive_providers.delta.key1",
        lambda w: _kv_put(w, "hive_providers", "delta.key1"),
        lambda gw: _no_key(gw, "hive_providers", "delta.key1"),
    ),
    "read another provider's cached answers": Forbidden(
        "$JS.API.DIRECT.GET.KV_hive_cache.$KV.hive_cache.delta.abc123",
        lambda w: w.js.get_last_msg("KV_hive_cache", "$KV.hive_cache.delta.abc123", direct=True),
        _stream_exists,
    ),
    "pull another provider's tasks": Forbidden(
        "$JS.API.CONSUMER.MSG.NEXT.HIVE_TASKS.hive_delta_high",
        lambda w: _fetch(w, "hive_delta_high"),
        lambda gw: _consumer_holds_none(gw, "hive_delta_high"),
    ),
    "read another provider's events": Forbidden(
        "$JS.API.DIRECT.GET.HIVE_EVENTS_delta.hive.events.delta.*.queued",
        lambda w: w.js.get_last_msg("HIVE_EVENTS_delta", "hive.events.delta.*.queued", direct=True),
        _stream_exists,
    ),
    "read any task's events": Forbidden(
        "$JS.API.DIRECT.GET.HIVE_EVENTS_alpha.hive.events.*.",
        lambda w: w.js.get_last_msg("HIVE_EVENTS_alpha", "hive.events.*.01J0.*", direct=True),
        _stream_exists,
    ),
    "write the metadata index": Forbidden(
        "hive.index.customer.",
        lambda w: _publish(w, "hive.index.customer.abc.01J0"),
        lambda gw: _no_index(gw),
    ),
    # the server's timers (hive_bus._timers): no worker may fire or delay a deadline, nor start a task
    "forge a fired deadline": Forbidden(
        "hive.fired.deadline.", lambda w: _publish(w, "hive.fired.deadline.01J0FORGED"), _no_timer
    ),
    "set a timer": Forbidden(
        "hive.schedule.start.", lambda w: _publish(w, "hive.schedule.start.01J0FORGED"), _no_timer
    ),
    "read the timers": Forbidden(
        "$JS.API.DIRECT.GET.HIVE_SCHEDULES",
        lambda w: w.js.get_last_msg("HIVE_SCHEDULES", "hive.fired.>", direct=True),
        _no_timer,
    ),
    "change another provider's queue count": Forbidden(
        "hive.counters.unfetched_cancels.delta",
        lambda w: w.js.publish("hive.counters.unfetched_cancels.delta", b"", headers={"Nats-Incr": "+5"}),
        lambda gw: _no_counter(gw, "hive.counters.unfetched_cancels.delta"),
    ),
    "change the submission counts": Forbidden(
        "hive.counters.submitted.alpha",
        lambda w: w.js.publish("hive.counters.submitted.alpha", b"", headers={"Nats-Incr": "+5"}),
        lambda gw: _no_counter(gw, "hive.counters.submitted.alpha"),
    ),
    "read any stream message": Forbidden(
        "$JS.API.STREAM.MSG.GET.HIVE_EVENTS_alpha",
        lambda w: w.js.get_msg("HIVE_EVENTS_alpha", seq=1),
        _stream_exists,
    ),
}


async def _no_counter(gw: Client, subject: str) -> bool:
    try:
        await gw.js.get_msg("HIVE_COUNTERS", subject=subject, direct=True)
    except nats.js.errors.NotFoundError:
        return True
    return False


async def _kv_put(w: Client, bucket: str, key: str) -> None:
    await (await w.js.key_value(bucket)).put(key, b"forged")


async def _fetch(w: Client, consumer: str) -> None:
    psub = await w.js.pull_subscribe_bind(durable=consumer, stream="HIVE_TASKS")
    try:
        await psub.fetch(1, timeout=TIMEOUT_S)
    finally:
        await psub.unsubscribe()


async def _consumer_exists(gw: Client, consumer: str) -> bool:
    info = await gw.js.consumer_info("HIVE_TASKS", consumer)
    return bool(info.name == consumer)


async def _consumer_is_empty(gw: Client, consumer: str) -> bool:
    return await pending(gw, consumer) == (0, 0)


async def _consumer_holds_none(gw: Client, consumer: str) -> bool:
    waiting, held = await pending(gw, consumer)
    return waiting == 1 and held == 0


@pytest.mark.parametrize("case", list(FORBIDDEN), ids=list(FORBIDDEN))
async def test_a_worker_is_refused(hub: tuple[Hub, NatsServer], case: str) -> None:
    rendered, server = hub
    forbidden = FORBIDDEN[case]
    async with (
        client(rendered, server, "gateway", "gateway") as gw,
        client(rendered, server, "w1", "w1", "_INBOX.w1") as w1,
    ):
        await declare(gw.js, *PROVIDERS, "delta")
        if case == "write the metadata index":  # made by the first tagged submission
            index = StreamConfig(name="HIVE_INDEX", subjects=["hive.index.>"], allow_direct=True)
            await gw.js.add_stream(index)
        if case == "pull another provider's tasks":
            await gw.js.purge_stream("HIVE_TASKS", subject="hive.tasks.delta.high.*")
            await gw.js.publish("hive.tasks.delta.high.t1", b"not for w1")
        w1.js = w1.nc.jetstream(timeout=TIMEOUT_S)
        await _ignore_timeout(forbidden.act(w1))
        await eventually(w1.refused(f'Publish to "{forbidden.what}'), 5, f"the server refusing: {case}")
        assert await forbidden.intact(gw)


async def test_a_worker_cannot_hear_another_providers_cancels(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    async with client(rendered, server, "w1", "w1", "_INBOX.w1") as w1:
        await w1.nc.subscribe("$KV.hive_cancels.delta.*")
        await eventually(
            w1.refused('Subscription to "$KV.hive_cancels.delta.*"'), 5, "the server refusing it"
        )


async def test_a_worker_cannot_read_another_workers_inbox(hub: tuple[Hub, NatsServer]) -> None:
    rendered, server = hub
    async with client(rendered, server, "w1", "w1", "_INBOX.w1") as w1:
        await w1.nc.subscribe("_INBOX.w2.>")
        await eventually(w1.refused('Subscription to "_INBOX.w2.>"'), 5, "the server refusing w1 w2's inbox")


async def test_without_its_name_a_worker_gets_no_answers(hub: tuple[Hub, NatsServer], tmp_path: Path) -> None:
    """The default inbox is refused: a worker started without HIVE_WORKER_NAME is told so."""
    from hive_bus import BusRefused
    from hive_bus.bus import open_bus

    from .conftest import make_settings

    rendered, server = hub
    settings = make_settings(
        server.url, prefix="hive", request_timeout_s=TIMEOUT_S, nats_user="w1",
        nats_password=rendered.password("w1"), nats_tls_ca_file=str(rendered.certs / "ca.pem"),
        nats_tls_cert_file=str(rendered.certs / "client-w1.pem"),
        nats_tls_key_file=str(rendered.certs / "client-w1-key.pem"),
    )  # fmt: skip
    with pytest.raises(BusRefused, match="HIVE_WORKER_NAME") as refused:
        async with open_bus(settings):
            pass
    assert rendered.password("w1") not in str(refused.value)


async def test_the_gateway_credential_keeps_recurring_schedules(hub: tuple[Hub, NatsServer]) -> None:
    """The gateway writes each schedule's record in the bucket hive_schedules (hive_bus._schedules)."""
    rendered, server = hub
    async with client(rendered, server, "gateway", "gateway") as gw:
        kv = await gw.js.create_key_value(
            KeyValueConfig(bucket="hive_schedules", max_bytes=1024**2, storage=StorageType.FILE)
        )
        await kv.put("01J0SCHEDULE", b"{}")
        assert (await kv.get("01J0SCHEDULE")).value == b"{}"
