"""Case 7: poison on a task subject, put there by hand (not through the gateway): each message is
terminated with a clear reason, and the worker process keeps serving the good tasks around them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats.js.errors
import pytest

from hive_bus import Failed, Hive
from hive_bus._embedded import NatsServer
from hive_bus._messages import event_decoder, is_task_id
from hive_bus.bus import Bus, open_bus

from ..conftest import make_settings
from ..helpers import eventually, unacked
from .dead_letters import assert_dead_lettered
from .ledger import Ledger
from .stack import Child, GatewayChild, beat_of, processes, ready, submit

pytestmark = [pytest.mark.faults, pytest.mark.anyio]

CLAIMED = "01ARZ3NDEKTSV4RRFFQ69G5FAV"  # a well-formed id, in a message that is not a valid task


def _task(**fields: object) -> bytes:
    base: dict[str, object] = {"type": "task.v1", "provider": "echo", "prompt": "hola", "submitted_at_ms": 1}
    return json.dumps({**base, **fields}).encode()


# messages that do not decode as a task
UNDECODABLE = {
    "empty": b"",
    "not JSON": b"not json at all",
    "not UTF-8": b"\xff\xfe\xfd\x00\x81",
    "a JSON array": b"[1, 2, 3]",
    "an empty object": b"{}",
    "truncated JSON": _task(id="01ARZ3NDEKTSV4RRFFQ69G5FAX")[:-9],
    "a wrong type, claiming an id": _task(id=CLAIMED, prompt=5),
    "an unknown version tag": _task(id="01ARZ3NDEKTSV4RRFFQ69G5FAW", type="task.v9"),
}
# messages that decode, but whose id is not a task id: it becomes a subject token in the task's events
MALFORMED_IDS = {
    "an id with a dot": _task(id="not.an.id"),
    "an id that is a wildcard": _task(id="*"),
    "an id with white space": _task(id="has space"),
}


@dataclass
class Poisoned:
    what: str
    seq: int
    claimed: str | None


async def put_poison(bus: Bus, messages: dict[str, bytes]) -> list[Poisoned]:
    out = []
    for what, data in messages.items():
        ack = await bus.js.publish(
            bus.names.task_subject("echo", "normal", "poison"), data, stream=bus.names.tasks_stream
        )
        out.append(Poisoned(what, ack.seq, _claimed(data)))
    return out


def _claimed(data: bytes) -> str | None:
    """The well-formed task id a message carries, if any: its failed event is recorded under it."""
    try:
        fields = json.loads(data)
    except ValueError:
        return None
    task_id = fields.get("id") if isinstance(fields, dict) else None
    return task_id if isinstance(task_id, str) and is_task_id(task_id) else None


async def terminated_as_undecodable(bus: Bus, poison: Poisoned) -> Failed | None:
    """The failed event recorded for a poison message: under the id it claims, else under
    ``undecodable-<its stream sequence>``."""
    task_id = poison.claimed or f"undecodable-{poison.seq}"
    try:
        raw = await bus.js.get_last_msg(
            bus.names.events_stream_of("echo"),
            bus.names.event_subject("echo", task_id, "failed"),
            direct=True,
        )
    except nats.js.errors.NotFoundError:
        return None
    event = event_decoder.decode(raw.data or b"")
    return event if isinstance(event, Failed) else None


async def poison_scenario(
    bus: Bus,
    http: httpx.AsyncClient,
    gateway: GatewayChild,
    worker: Child,
    ledger: Ledger,
    poison: dict[str, bytes],
    *,
    timeout_s: float = 20.0,
) -> list[tuple[Poisoned, Failed]]:
    """Good tasks over HTTP, then the poison by hand, then good tasks again: every poison message is
    terminated as undecodable, every good task completes, the worker is still serving."""
    hive = Hive(bus)
    for i in range(3):
        await submit(http, gateway, ledger, "echo", f"before {i}")
    placed = await put_poison(bus, poison)
    for i in range(3):
        await submit(http, gateway, ledger, "echo", f"after {i}")
    # the good tasks behind the poison are done: the worker has had every poison message by now
    assert await ledger.wait_final(hive, 30) == 0
    terminated = []
    for p in placed:

        async def probe(p: Poisoned = p) -> Failed | None:
            return await terminated_as_undecodable(bus, p)

        failed = await eventually(probe, timeout_s, f"the poison message ({p.what}) to be terminated")
        terminated.append((p, failed))
    await beat_of(hive, worker, timeout_s=10)  # still beating, so still serving
    assert worker.alive
    return terminated


async def test_undecodable_messages_are_terminated_and_the_worker_keeps_serving(
    nats_server: NatsServer, tmp_path: Path, http: httpx.AsyncClient, new_ledger: Callable[[str], Ledger]
) -> None:
    settings = make_settings(nats_server.url, ack_wait_s=2.0)
    ledger = new_ledger("7 poison on a task subject")
    async with open_bus(settings) as bus, processes(settings, tmp_path) as procs:
        gateway = procs.gateway()
        worker = procs.worker("echo")
        await ready(gateway, http)
        await beat_of(Hive(bus), worker)
        terminated = await poison_scenario(bus, http, gateway, worker, ledger, UNDECODABLE)
        left = await unacked(bus)
        figures, _ = await ledger.check(
            bus, notes=f"{len(terminated)} poison messages terminated as undecodable"
        )
    assert figures.completed == figures.accepted == 6
    for poison, failed in terminated:
        assert failed.reason == "undecodable", poison.what
        assert (
            f"task message {poison.seq} on {settings.names.task_subject('echo', 'normal', 'poison')}"
            in failed.error
        ), poison.what
        assert failed.task_id == (poison.claimed or f"undecodable-{poison.seq}")
    assert left == 0  # terminated messages are done with: no consumer holds or offers them again


async def test_a_task_whose_id_is_not_a_task_id_is_terminated_as_undecodable(
    nats_server: NatsServer, tmp_path: Path, http: httpx.AsyncClient, new_ledger: Callable[[str], Ledger]
) -> None:
    settings = make_settings(nats_server.url, ack_wait_s=2.0)
    ledger = new_ledger("7b poison: task ids that are not task ids")
    async with open_bus(settings) as bus, processes(settings, tmp_path) as procs:
        gateway = procs.gateway()
        worker = procs.worker("echo")
        await ready(gateway, http)
        await beat_of(Hive(bus), worker)
        terminated = await poison_scenario(bus, http, gateway, worker, ledger, MALFORMED_IDS, timeout_s=5)
        await ledger.check(bus)
    assert [failed.reason for _, failed in terminated] == ["undecodable"] * len(MALFORMED_IDS)


async def test_poison_is_dead_lettered(
    nats_server: NatsServer, tmp_path: Path, http: httpx.AsyncClient, new_ledger: Callable[[str], Ledger]
) -> None:
    settings = make_settings(nats_server.url, ack_wait_s=2.0)
    ledger = new_ledger("7c poison: dead-lettered")
    poison = {k: UNDECODABLE[k] for k in ("not JSON", "a wrong type, claiming an id")}
    async with open_bus(settings) as bus, processes(settings, tmp_path) as procs:
        gateway = procs.gateway()
        worker = procs.worker("echo")
        await ready(gateway, http)
        await beat_of(Hive(bus), worker)
        terminated = await poison_scenario(bus, http, gateway, worker, ledger, poison, timeout_s=5)
        for _, failed in terminated:
            await assert_dead_lettered(bus, "echo", failed.task_id, "undecodable")
        await ledger.check(bus)
