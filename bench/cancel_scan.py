"""What a bulk cancel's scan of the queue costs (``hive_bus._cancel.queued``: ``Hive.cancel_where``,
``POST /v1/tasks/cancel`` with metadata, a batch's cancel and its expiry).

Run: ``.venv/bin/python bench/cancel_scan.py [--queued 60000]``. It starts its own nats-server (a
temporary store, a free port), queues ``--queued`` tasks on a provider no worker serves (so its
consumer's ack floor stays at the start) and 50 tagged tasks after them, and times, in this process,
the scan that finds the tagged ones: by batched direct gets (what ``queued`` does) against a same-run
baseline that reads one message a round trip (``get_msg`` with ``next``, what it did before).

It prints figures and exits 0; nothing is asserted (speed is not a test).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anyio
import nats.js.errors

from hive_bus import Hive, TaskRequest, load_settings
from hive_bus._bus import ensure_consumer
from hive_bus._cancel import queued
from hive_bus._embedded import NatsServer
from hive_bus._messages import task_decoder
from hive_bus.bus import Bus, open_bus

TAGGED = 50
BATCH = 1_000


async def one_at_a_time(bus: Bus, metadata: dict[str, str]) -> dict[str, int]:
    """The baseline: the same scan from sequence 1, one message get a round trip."""
    names, seq = bus.names, 1
    found: dict[str, int] = {}
    while True:
        try:
            raw = await bus.js.get_msg(names.tasks_stream, seq=seq, subject=names.all_tasks, next=True)
        except nats.js.errors.NotFoundError:
            return found
        seq = (raw.seq or seq) + 1
        task = task_decoder.decode(raw.data or b"")
        if all(task.metadata.get(k) == v for k, v in metadata.items()):
            found[task.id] = seq - 1


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as store:
        server = NatsServer(Path(store))
        server.start()
        try:
            settings = load_settings(environ={}, nats_url=server.url, prefix="benchcancel")
            async with open_bus(settings) as bus:
                hive = Hive(bus)
                await ensure_consumer(bus.js, settings, "nadie")  # its ack floor: the start
                start = time.perf_counter()
                for first in range(0, count, BATCH):
                    n = min(BATCH, count - first)
                    await hive.submit_batch([TaskRequest(provider="nadie", prompt=f"t{i}") for i in range(n)])
                tagged = [
                    TaskRequest(provider="nadie", prompt="tagged", metadata={"batch_id": "b1"})
                    for _ in range(TAGGED)
                ]
                await hive.submit_batch(tagged)
                print(f"{count + TAGGED:,} tasks queued in {time.perf_counter() - start:.1f} s")
                wanted = {"batch_id": "b1"}

                async def batched() -> dict[str, int]:
                    return await queued(bus, metadata=wanted)

                async def baseline() -> dict[str, int]:
                    return await one_at_a_time(bus, wanted)

                for name, scan in (("batched direct gets", batched), ("one get a round trip", baseline)):
                    times = []
                    for _ in range(3):
                        start = time.perf_counter()
                        found = await scan()
                        times.append(time.perf_counter() - start)
                        assert len(found) == TAGGED, len(found)
                    print(f"{name:>22}: {sorted(times)[1]:.2f} s (median of 3; found {len(found)})")
                await hive.close()
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=60_000)
    anyio.run(main, parser.parse_args().queued)
