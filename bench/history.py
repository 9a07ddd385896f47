"""What the dashboard's last hour costs the gateway (hive_bus/services/history.py).

Run: ``.venv/bin/python bench/history.py [--tasks 10000]``. It starts its own nats-server (a temporary
store, a free port), writes ``--tasks`` tasks' ``queued`` and ``completed`` events into the events
stream (a 200-character prompt, a 300-character output: a tweet-sized task), then measures, in this
process:

1. the backfill a gateway runs on start: reading those events back into minute buckets (events/s);
2. the metrics follower's CPU per 1,000 tasks, following the outcome events only (before: what
   ``/metrics`` needs) and with the ``queued`` and ``moved`` subjects too (now: the history's queue
   depths), against a same-run baseline that publishes with no follower at all.

It prints figures and exits 0; nothing is asserted (speed is not a test).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import psutil  # type: ignore[import-untyped,unused-ignore]
from ulid import ULID

from hive_bus import load_settings
from hive_bus._bus import ensure_events
from hive_bus._embedded import NatsServer
from hive_bus._messages import Completed, Queued, Task, Usage, encoder, now_ms
from hive_bus.bus import Bus, open_bus
from hive_bus.services.follower import EventFollower
from hive_bus.services.history import History, backfill
from hive_bus.services.metrics import BusMetrics

PROMPT = "Escribe un tuit sobre colas de mensajes y límites de cuota. " * 4  # ~240 characters
OUTPUT = "Las colas no pierden nada: JetStream guarda cada tarea hasta que un worker la termina. " * 4
IN_FLIGHT = 256


def events(count: int, provider: str = "echo") -> list[tuple[str, bytes]]:
    """``count`` tasks' queued and completed events: (subject, body), in order."""
    out: list[tuple[str, bytes]] = []
    for _ in range(count):
        at = now_ms()
        task = Task(id=str(ULID()), provider=provider, prompt=PROMPT[:200], submitted_at_ms=at)
        queued = Queued(task_id=task.id, provider=provider, at_ms=at, task=task)
        done = Completed(
            task_id=task.id, provider=provider, at_ms=at + 900, attempt=1, worker="w1", output=OUTPUT[:300],
            model="m", usage=Usage(input_tokens=50, output_tokens=70), submitted_at_ms=at,
            started_at_ms=at + 100, call_s=0.8, cost_usd=0.0,
        )  # fmt: skip
        out.append((f"{PREFIX}.events.{provider}.{task.id}.queued", encoder.encode(queued)))
        out.append((f"{PREFIX}.events.{provider}.{task.id}.completed", encoder.encode(done)))
    return out


PREFIX = "benchh"


async def publish(bus: Bus, messages: Sequence[tuple[str, bytes]]) -> None:
    stream = bus.names.events_stream_of("echo")
    await ensure_events(bus, "echo")

    async def one(subject: str, data: bytes) -> None:
        await bus.js.publish(subject, data, stream=stream)

    for start in range(0, len(messages), IN_FLIGHT):
        async with anyio.create_task_group() as tg:
            for subject, data in messages[start : start + IN_FLIGHT]:
                tg.start_soon(one, subject, data)


async def follower_cpu(
    bus: Bus,
    subjects: list[str] | None,
    count: int,
    apply: Callable[[str, bytes, dict[str, str] | None], None],
) -> float:
    """CPU seconds of this process to publish ``count`` tasks' events while following ``subjects``
    (None: not following) until every followed one has been applied."""
    seen = 0
    want = 0 if subjects is None else (2 if len(subjects) > 4 else 1) * count
    all_seen = anyio.Event()

    def counting(subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        nonlocal seen
        seen += 1
        apply(subject, data, headers)
        if seen >= want:
            all_seen.set()

    batch = events(count)
    async with anyio.create_task_group() as tg:
        if subjects is not None:
            await tg.start(EventFollower(bus, bus.names.events_stream_of("echo"), subjects, counting).run)
        cpu = time.process_time()
        await publish(bus, batch)
        if want:
            with anyio.fail_after(120):
                await all_seen.wait()
        used = time.process_time() - cpu
        tg.cancel_scope.cancel()
    return used


async def bench(url: str, tasks: int) -> None:
    settings = load_settings({}, nats_url=url, prefix=PREFIX)
    async with open_bus(settings) as bus:
        names = bus.names
        metrics = BusMetrics(bus)
        observe = metrics._observe  # the metrics' own handler: what the gateway runs per event
        before = [s.replace(".events.*.", ".events.echo.", 1) for s in names.outcome_events]
        now = metrics._followed("echo")
        rounds = 3
        figures: dict[str, list[float]] = {
            "no follower": [],
            "outcome events (before)": [],
            "+ queued, moved (now)": [],
        }
        for _ in range(rounds):
            figures["no follower"].append(await follower_cpu(bus, None, tasks, observe))
            figures["outcome events (before)"].append(await follower_cpu(bus, before, tasks, observe))
            figures["+ queued, moved (now)"].append(await follower_cpu(bus, now, tasks, observe))
        base = min(figures["no follower"])
        print(
            f"\nfollowing {tasks:,} tasks (queued + completed events), CPU of this process, best of {rounds}:"
        )
        for name, runs in figures.items():
            best = min(runs)
            extra = (
                ""
                if name == "no follower"
                else f"   following: {(best - base) * 1000 / tasks * 1000:,.0f} ms per 1,000 tasks"
            )
            print(f"  {name:28s} {best:6.2f} s{extra}")

        info = await bus.js.stream_info(names.events_stream_of("echo"))
        stored = info.state.messages
        rss = psutil.Process().memory_info().rss
        history = History()
        started = time.perf_counter()
        await backfill(history, bus, before={"echo": info.state.last_seq + 1}, provider_label=str)
        took = time.perf_counter() - started
        grown = (psutil.Process().memory_info().rss - rss) / 1e6
        view = history.view({})
        print(
            f"\nbackfill on start: {stored:,} events in {took:.2f} s = {stored / took:,.0f} events/s "
            f"({sum(view.completed):,} completions in the buckets; RSS +{grown:.1f} MB)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as store:
        server = NatsServer(Path(store) / "nats", host="127.0.0.1", port=0)
        server.start()
        try:
            print(f"nats-server {server.url} (pid {server.pid})")
            anyio.run(bench, server.url, args.tasks, backend="asyncio")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
