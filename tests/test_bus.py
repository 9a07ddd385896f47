"""Bus objects are declared idempotently, and an incompatible existing object is refused by name."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import anyio
import pytest
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue
from ulid import ULID

from hive_bus import BusConfigError, NoRoom, Settings
from hive_bus._bus import (
    Bus,
    consumer_config,
    ensure_cache_stream,
    ensure_consumer,
    ensure_consumers,
    ensure_counters_stream,
    kv_entries,
)
from hive_bus._embedded import NatsServer
from hive_bus._messages import is_task_id, new_task_id
from hive_bus.bus import open_bus

from .conftest import make_settings
from .helpers import hive_cli

pytestmark = pytest.mark.anyio


async def test_declaring_twice_is_harmless_and_keeps_the_work(settings: Settings) -> None:
    async with open_bus(settings) as bus:
        await bus.js.publish(bus.names.task_subject("echo", "normal", "t1"), b"{}")
        await ensure_consumer(bus.js, settings, "echo")
    async with open_bus(settings) as bus:  # a second process finds everything in place
        info = await ensure_consumer(bus.js, settings, "echo")
        assert info.num_pending == 1
        assert (await bus.js.stream_info(bus.names.tasks_stream)).state.messages == 1


async def test_objects_have_the_designed_shape(settings: Settings) -> None:
    async with open_bus(settings) as bus:
        tasks = (await bus.js.stream_info(bus.names.tasks_stream)).config
        # the record of acceptance: kept as long as the events, each task republished as its queued event
        assert tasks.retention == RetentionPolicy.LIMITS
        assert (tasks.discard, tasks.storage) == (DiscardPolicy.NEW, StorageType.FILE)
        assert tasks.subjects == [f"{settings.prefix}.tasks.*.*.*"]  # <provider>.<priority>.<task id>
        assert tasks.duplicate_window == settings.duplicate_window_s
        assert tasks.max_age == settings.events_max_age_s and tasks.allow_direct
        assert tasks.republish is not None and tasks.republish.headers_only
        assert (
            tasks.republish.dest == f"{settings.prefix}.events.{{{{wildcard(1)}}}}.{{{{wildcard(3)}}}}.queued"
        )
        consumers = [info.config for info in await ensure_consumers(bus.js, settings, "groq")]
        events = (await bus.js.stream_info(bus.names.events_stream_of("groq"))).config  # made with them
        assert events.retention == RetentionPolicy.LIMITS and events.discard == DiscardPolicy.OLD
        assert events.subjects == [f"{settings.prefix}.events.groq.>"]  # its own provider's alone
        assert events.max_age == settings.events_max_age_s and events.max_bytes == settings.events_max_bytes
        assert [c.durable_name for c in consumers] == [
            f"{settings.prefix}_groq_{p}" for p in ("high", "normal", "low")
        ]
        assert [c.filter_subject for c in consumers] == [
            f"{settings.prefix}.tasks.groq.{p}.*" for p in ("high", "normal", "low")
        ]
        assert all(c.ack_wait == settings.ack_wait_s for c in consumers)
        dlq = (await bus.js.stream_info(bus.names.dlq_stream("groq"))).config  # made with the consumers
        assert dlq.subjects == [f"{settings.prefix}.dlq.groq.*"] and dlq.discard == DiscardPolicy.NEW
        assert dlq.max_bytes == settings.dlq_max_bytes  # each provider's own bound
        assert dlq.max_age == 0  # dead letters stay until replayed or purged
        budgets = (await bus.budgets_kv.status()).stream_info.config
        assert budgets.storage == StorageType.FILE  # budgets survive a restart of the hub
        status = await bus.workers_kv.status()
        assert status.ttl == settings.heartbeat_ttl_s


async def test_a_stream_with_other_retention_is_refused_by_name(nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url)
    names = settings.names
    async with open_bus(make_settings(nats_server.url)) as other:
        await other.js.add_stream(
            StreamConfig(
                name=names.tasks_stream,
                subjects=[names.all_tasks],
                retention=RetentionPolicy.INTEREST,
                max_bytes=1024 * 1024,
            )
        )
    with pytest.raises(BusConfigError) as caught:
        async with open_bus(settings):
            pass
    message = str(caught.value)
    assert f"stream {names.tasks_stream} exists with an incompatible configuration" in message
    assert "retention is" in message and "expected" in message


async def test_a_consumer_with_another_filter_is_refused_by_name(settings: Settings) -> None:
    async with open_bus(settings) as bus:
        wrong = consumer_config(settings, "echo")
        wrong.filter_subject = bus.names.task_filter("other")
        await bus.js.add_consumer(bus.names.tasks_stream, wrong)
        with pytest.raises(BusConfigError, match=f"consumer {bus.names.consumer('echo')} on stream"):
            await ensure_consumer(bus.js, settings, "echo")


async def test_a_heartbeat_bucket_too_short_for_the_interval_is_refused(nats_server: NatsServer) -> None:
    settings = make_settings(nats_server.url, heartbeat_interval_s=0.5, heartbeat_ttl_s=1.5)
    async with open_bus(settings):
        pass
    slower = make_settings(
        nats_server.url, prefix=settings.prefix, heartbeat_interval_s=5, heartbeat_ttl_s=15
    )
    with pytest.raises(BusConfigError, match="less than two heartbeat intervals"):
        async with open_bus(slower):
            pass


def test_task_ids_are_ulids_that_sort_by_creation() -> None:
    before_ms = time.time_ns() // 1_000_000
    ids = [new_task_id() for _ in range(2000)]  # many share a millisecond
    after_ms = time.time_ns() // 1_000_000
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(is_task_id(i) for i in ids)
    for i in (ids[0], ids[-1]):
        parsed = ULID.from_str(i)
        assert str(parsed) == i
        assert before_ms <= parsed.milliseconds <= after_ms


def test_a_forked_child_makes_task_ids_of_its_own() -> None:
    new_task_id()  # the parent has random bytes in hand
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one id to the parent, then gone
        os.write(write_end, new_task_id().encode())
        os._exit(0)
    os.close(write_end)
    mine = new_task_id()
    with os.fdopen(read_end, "rb") as pipe:
        childs = pipe.read().decode()
    os.waitpid(pid, 0)
    assert is_task_id(childs)
    assert childs[10:] != mine[10:]  # the 80 random bits differ


async def test_a_submission_another_stream_would_take_is_refused(settings: Settings) -> None:
    """The tasks stream deleted and another one taking its subjects: the ack names the stream that
    stored the task, and the submission is refused (a task message carries no Nats-Expected-Stream: the
    tasks stream's RePublish would carry it to the events stream, which would refuse the marker). The
    stray stream keeps the message, and no worker reads it: it was never accepted."""
    from hive_bus import BusUnavailable, Hive

    async with open_bus(settings) as bus:
        names = bus.names
        await bus.js.delete_stream(names.tasks_stream)
        await bus.js.add_stream(StreamConfig(name="STRAY", subjects=[f"{names.prefix}.tasks.>"]))
        with pytest.raises(BusUnavailable, match=f"meant for {names.tasks_stream} was stored in STRAY"):
            await Hive(bus).submit("echo", "meant for the tasks stream")
        await bus.js.delete_stream("STRAY")


async def test_a_bucket_is_read_whole_without_leaving_a_consumer(bus: Bus, settings: Settings) -> None:
    """kv_entries reads a bucket by batched direct gets (a bucket of more keys than one such get
    answers for, too), or, for a bucket without direct gets, through a consumer deleted when the read
    ends: the consumer each read left for a minute piled up under polling, to the account's limit."""
    for direct in (True, False):
        kv = await bus.js.create_key_value(
            KeyValueConfig(
                bucket=f"{settings.prefix}_read_{direct}",
                history=1,
                storage=StorageType.MEMORY,
                direct=direct,
            )
        )
        keys = 1100 if direct else 20  # nats-server's batched get answers for at most 1024 keys

        async with anyio.create_task_group() as tg:
            for first in range(50):
                tg.start_soon(_put_every, kv, first, 50, keys)
        await kv.delete("k.3")
        await kv.put("other.1", b"o")
        want = {f"k.{i}": b"v%d" % i for i in range(keys) if i != 3}
        assert await kv_entries(kv, "k.>") == want, f"direct={direct}"
        assert await kv_entries(kv) == want | {"other.1": b"o"}, f"direct={direct}"
        assert (await bus.js.stream_info(f"KV_{settings.prefix}_read_{direct}")).state.consumer_count == 0


async def _put_every(kv: KeyValue, first: int, step: int, end: int) -> None:
    for i in range(first, end, step):
        await kv.put(f"k.{i}", b"v%d" % i)


async def test_a_second_process_finds_every_object_as_it_would_declare_it(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Every object is declared as the server then keeps it, so the next process has nothing to say of
    it: the response cache's stream named no duplicate window, and every gateway and worker start logged
    'stream KV_..._cache keeps its own duplicate_window=120.0 (this process would have set 0)'."""

    async def declare() -> None:
        async with open_bus(settings) as bus:
            await ensure_cache_stream(bus.js, settings)
            await ensure_counters_stream(bus.js, settings)
            await ensure_consumers(bus.js, settings, "echo")

    await declare()
    caplog.set_level(logging.INFO, logger="hive_bus.bus")
    caplog.clear()
    await declare()
    assert [r.getMessage() for r in caplog.records if "keeps its own" in r.getMessage()] == []


async def test_a_stream_the_account_has_no_room_for_says_why(tmp_path: Path) -> None:
    """A provider's first stream refused by the account's max_streams ('maximum number of streams
    reached', a 400 as a lost race is) was read back as if another process had made it: hive worker
    logged 'the echo consumers are not there yet (... stream not found)' and waited for them for ever,
    and each submission logged 'the events stream of provider ... is not there'. The stream and
    JetStream's reason are named now, and the worker exits 1."""
    conf = tmp_path / "account.conf"
    conf.write_text("accounts { A { jetstream { max_streams: 12 }, users: [ {user: u, password: p} ] } }\n")
    server = NatsServer(tmp_path / "store", config=conf)
    server.start()
    try:
        settings = make_settings(server.url, nats_user="u", nats_password="p")
        async with open_bus(settings) as bus:
            while (await bus.js.account_info()).streams < 12:  # the rest of the account's room, taken
                n = (await bus.js.account_info()).streams
                await bus.js.add_stream(StreamConfig(name=f"OTHER_{n}", subjects=[f"other.{n}"]))
            with pytest.raises(
                NoRoom, match=r"_EVENTS_echo: maximum number of streams reached \(the account"
            ):
                await ensure_consumers(bus.js, settings, "echo")
        env = {
            "HIVE_NATS_URL": server.url, "HIVE_PREFIX": settings.prefix, "HIVE_NATS_USER": "u",
            "HIVE_NATS_PASSWORD": "p", "HIVE_HEARTBEAT_INTERVAL_S": "0.5", "HIVE_HEARTBEAT_TTL_S": "1.5",
        }  # fmt: skip
        worker = hive_cli(["worker", "echo"], env=env, timeout_s=20)
    finally:
        server.stop()
    assert worker.returncode == 1, worker.stderr
    assert "_EVENTS_echo: maximum number of streams reached" in worker.stderr, worker.stderr
    assert "each provider has three (its events, its dead letters, its claim check bucket)" in worker.stderr
