"""Case 8: the tasks stream's last message block damaged (truncated, or a byte flipped) while nats-server
is stopped. The server starts again and the rest is served. nats-server 2.15 does not report the loss
in the stream state; the gateway's store audit finds the tasks that went with the block, records them
as failed with reason ``lost`` and dead-letters them (replayable), counts them in
``hive_tasks_lost_total`` (the HiveTasksLost alert) and shows them at ``GET /v1/audit``."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from hive_bus import Hive, Settings
from hive_bus._embedded import NatsServer
from hive_bus.bus import Bus, open_bus

from ..conftest import make_settings
from ..helpers import eventually
from .ledger import Ledger, tasks_by_sequence
from .servers import reconnected, start
from .stack import beat_of, processes, ready, submit

pytestmark = [pytest.mark.faults, pytest.mark.anyio]

Damage = Literal["truncate", "flip"]
TASKS = 30
DAMAGED_FROM_END = 3  # the record damaged is the third from the end of the block
_HEADER = struct.Struct("<IQqH")  # record length (high bit: has headers), sequence, timestamp, subject length
_HAS_HEADERS = 1 << 31


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    length: int
    seq: int


def records(block: bytes) -> list[Record]:
    """The message records of a nats-server file-store block (each: a 22-byte header, the subject,
    optional headers, the payload, an 8-byte checksum; the length in the header covers it all)."""
    found, offset = [], 0
    while offset + _HEADER.size <= len(block):
        length, seq, _, _ = _HEADER.unpack_from(block, offset)
        length &= ~_HAS_HEADERS
        found.append(Record(offset, length, seq))
        offset += length
    return found


def last_block(server: NatsServer, settings: Settings) -> Path:
    msgs = server.store_dir / "jetstream" / "$G" / "streams" / settings.names.tasks_stream / "msgs"
    return max(msgs.glob("*.blk"), key=lambda p: int(p.stem))


def damage(block_path: Path, how: Damage) -> list[int]:
    """Damage the block; returns the sequences whose records were hit (that one and any after it)."""
    block = bytearray(block_path.read_bytes())
    recs = records(bytes(block))
    hit = recs[-DAMAGED_FROM_END]
    middle = hit.offset + hit.length // 2
    if how == "truncate":
        block_path.write_bytes(bytes(block[:middle]))
        return [r.seq for r in recs[-DAMAGED_FROM_END:]]
    block[middle] ^= 0xFF
    block_path.write_bytes(bytes(block))
    return [hit.seq]


async def drained(bus: Bus, provider: str) -> bool:
    info = await bus.js.consumer_info(bus.names.tasks_stream, bus.names.consumer(provider))
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


def lost_total(metrics: str) -> float:
    [line] = [x for x in metrics.splitlines() if x.startswith("hive_tasks_lost_total ")]
    return float(line.split()[1])


@pytest.mark.parametrize("how", ["truncate", "flip"])
async def test_a_damaged_last_block_is_reported_and_its_tasks_dead_lettered_as_lost(
    own_server: NatsServer,
    tmp_path: Path,
    http: httpx.AsyncClient,
    new_ledger: Callable[[str], Ledger],
    how: Damage,
) -> None:
    settings = make_settings(own_server.url, audit_grace_s=4.0, audit_every_s=1.0)
    ledger = new_ledger(f"8 tasks stream's last block damaged ({how}, server stopped)")
    async with open_bus(settings) as bus, processes(settings, tmp_path) as procs:
        hive = Hive(bus)
        gateway = procs.gateway()
        await ready(gateway, http)
        for i in range(TASKS):
            await submit(http, gateway, ledger, "echo", f"stored {i}")
        by_seq = await tasks_by_sequence(bus)
        assert set(by_seq.values()) == set(ledger.accepted)

        own_server.stop()
        block = last_block(own_server, settings)
        assert [r.seq for r in records(block.read_bytes())] == sorted(by_seq)  # the parser reads it right
        hit = damage(block, how)
        await start(own_server)  # the server starts on the damaged store
        await reconnected(bus)
        await ready(gateway, http)

        worker = procs.worker("echo")
        await beat_of(hive, worker)
        await eventually(lambda: drained(bus, "echo"), 60, "the worker to take every task it is given")

        async def audited() -> dict[str, Any] | None:
            answer = (await http.get(f"{gateway.url}/v1/audit")).json()
            last = answer["last"]
            return answer if last and last["lost_total"] >= len(hit) and last["open"] == 0 else None

        audit = await eventually(audited, 30, "the gateway's store audit to find the damaged tasks")
        metrics = (await http.get(f"{gateway.url}/metrics")).text
        state = (await bus.js.stream_info(settings.names.tasks_stream)).state
        figures, fates = await ledger.figures(
            bus,
            notes=f"records hit: {len(hit)}; server state after: {state}; "
            f"audit: {audit['last']['lost_total']} dead-lettered as lost",
        )
    hit_ids = {by_seq[s] for s in hit}
    after_hit = {task_id for seq, task_id in by_seq.items() if seq >= min(hit)}
    lost = {t for t, f in fates.items() if f.reasons == ["lost"]}
    assert hit_ids <= lost <= after_hit  # the damaged tasks are found, and nothing before them
    assert all(fates[t].kind == "failed" and fates[t].dead_lettered for t in lost)
    assert figures.lost == 0 and figures.duplicates == 0 and figures.pending == 0
    assert audit["last"]["lost_total"] == len(lost) == lost_total(metrics)
    assert set(audit["last"]["lost_ids"]) <= lost
    intact = set(ledger.accepted) - lost
    assert all(fates[t].kind == "completed" and fates[t].outputs == [ledger.prompt_of(t)] for t in intact)
    assert figures.completed == len(intact) >= TASKS - DAMAGED_FROM_END
