"""What a filtered list and a submission's served check cost (hive_bus/_index.py, hive_bus/_served.py).

Run: ``.venv/bin/python bench/reads.py [--entries 200000]``. It starts its own nats-server (a temporary
store, a free port) and measures, in this process:

1. the metadata index's read of the newest 50 tasks of one key and value (``_index.newest``), as the
   index grows to ``--entries`` entries of which 1 in 20 match, against a same-run baseline that reads
   every match with a filtered ordered consumer (what a read that follows the matches, not the returned
   tasks, costs);
2. a submission's served check (``Hive.unserved``) per call, for a served provider and for one no worker
   serves, against a same-run baseline of one dict look-up in the same loop.

It prints figures and exits 0; nothing is asserted (speed is not a test).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anyio
from nats.js.api import ConsumerConfig, DeliverPolicy

from hive_bus import Hive, load_settings
from hive_bus._bus import ensure_index_stream
from hive_bus._embedded import NatsServer
from hive_bus._index import key_token, newest, value_hash
from hive_bus._messages import new_task_id
from hive_bus._nats import following
from hive_bus.bus import Bus, open_bus

IN_FLIGHT = 512
ROUNDS = 20


async def fill(bus: Bus, count: int) -> None:
    """``count`` index entries, one in 20 of customer=acme, the rest spread over 1,000 other customers."""
    names = bus.names
    sent = 0
    while sent < count:
        batch = min(IN_FLIGHT, count - sent)
        futures = []
        for i in range(sent, sent + batch):
            value = "acme" if i % 20 == 0 else f"c{i % 1000}"
            subject = names.index_subject("customer", value_hash(value), new_task_id())
            futures.append(await bus.js.publish_async(subject, b""))
        for future in futures:
            await future
        sent += batch


async def read_all_matches(bus: Bus) -> int:
    """The baseline: every match, read in order by a filtered ordered consumer."""
    subject = bus.names.index_filter(key_token("customer"), value_hash("acme"))
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    seen = 0
    async with following(bus.js, subject, stream=bus.names.index_stream, config=config) as sub:
        async for msg in sub.messages:
            seen += 1
            if msg.metadata.num_pending == 0:
                break
    return seen


async def timed_ms(call: object, rounds: int = ROUNDS) -> float:
    """The median time of ``rounds`` awaits of ``call()``, in milliseconds."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await call()  # type: ignore[operator]
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


async def main(entries: int) -> None:
    with tempfile.TemporaryDirectory() as store:
        server = NatsServer(Path(store))
        server.start()
        try:
            settings = load_settings(environ={}, nats_url=server.url, prefix="benchreads")
            async with open_bus(settings) as bus:
                await ensure_index_stream(bus.js, settings)
                print(f"{'index entries':>14} {'matches':>8} {'newest 50 (ms)':>15} {'all matches (ms)':>17}")
                have = 0
                for size in sorted({1_000, 10_000, 100_000, entries}):
                    if size > entries:
                        continue
                    start = time.perf_counter()
                    await fill(bus, size - have)
                    fill_s = time.perf_counter() - start
                    have = size

                    async def read_newest() -> None:
                        await newest(bus, "customer", "acme", limit=50)

                    async def read_all() -> None:
                        await read_all_matches(bus)

                    indexed = await timed_ms(read_newest)
                    baseline = await timed_ms(read_all, rounds=5)
                    print(
                        f"{size:>14,} {size // 20:>8,} {indexed:>15.2f} {baseline:>17.2f}"
                        f"   (filled in {fill_s:.1f} s)"
                    )

                hive = Hive(bus)
                await hive.follow_served()
                lookups = {"echo": 1}
                calls = 100_000

                async def served() -> None:
                    for _ in range(calls):
                        await hive.unserved("echo")

                async def unserved() -> None:
                    for _ in range(calls):
                        await hive.unserved("gemnii")

                async def baseline_lookup() -> None:
                    for _ in range(calls):
                        await anyio.lowlevel.checkpoint_if_cancelled()
                        lookups.get("echo")

                base_us = await timed_ms(baseline_lookup, rounds=3) * 1000 / calls
                served_us = await timed_ms(served, rounds=3) * 1000 / calls
                unserved_us = await timed_ms(unserved, rounds=3) * 1000 / calls
                print(
                    f"served check per submission: {served_us:.2f} µs (a provider no worker serves: "
                    f"{unserved_us:.2f} µs; baseline, a dict look-up in the same loop: {base_us:.2f} µs)"
                )
                await hive.close()
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    anyio.run(main, parser.parse_args().entries)
