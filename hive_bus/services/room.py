"""Whether JetStream still stores what the gateway accepts: read every few seconds for ``GET /readyz``
and the ``hive_bus_writable`` gauge, never per request.

JetStream refuses writes for want of room in three ways, and a read of the streams shows only the
first two:

- the account's file storage is used up to its ``max_file`` (its account info: storage against limits,
  less left than a task stored whole may take): JetStream then refuses writes to every stream of the
  account, those that reserved room too (a stream without ``max_bytes``, an operator's, can use it up);
- the tasks stream is at its limits (discard new: every submission answers 503 ``queue_full`` until
  tasks age out);
- the server's disk is full. nats-server (2.15) then answers no write at all, so that a publish times
  out, and says why only in its log (``no space left on device``); and a stream that failed a write
  that way keeps failing until nats-server restarts, even once there is room again (seen on a 20 MB
  tmpfs: the tasks stream took nothing after the room came back, and every task after a restart).
  Only a write shows it: each reading adds 0 to a counter of the bus (``<prefix>.counters.room``) and
  waits for the acknowledgement, as a submission does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from hive_bus._bus import ensure_counters_stream, size_text
from hive_bus._errors import HiveError
from hive_bus._nats import BUS_ERRORS, account_info, why
from hive_bus.bus import Bus

log = logging.getLogger("hive_bus.room")

ROOM_EVERY_S = 5.0
# a reason older than this is read again when asked for: a bus back from an outage is ready at once
READ_AGAIN_S = 1.0


class Room:
    """``await tg.start(room.run)``: :attr:`reason` is why JetStream does not store writes now, or None."""

    def __init__(self, bus: Bus, registry: CollectorRegistry | None = None) -> None:
        self._bus = bus
        self.reason: str | None = "JetStream's room has not been read yet"
        self.read_at_s: float | None = None
        self._reading = anyio.Lock()
        if registry is not None:
            registry.register(self)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Read now, then every :data:`ROOM_EVERY_S`, until cancelled."""
        await self.read()
        task_status.started()
        while True:
            await anyio.sleep(ROOM_EVERY_S)
            await self.read()

    async def why_not(self) -> str | None:
        """:attr:`reason`, read again first when it is older than :data:`READ_AGAIN_S`: while all is
        well an ask costs nothing, and only while it is not does each ask read the bus."""
        if self.reason is not None and (self.read_at_s or 0.0) < time.time() - READ_AGAIN_S:
            await self.read(max_age_s=READ_AGAIN_S)
        return self.reason

    async def read(self, *, max_age_s: float = 0.0) -> None:
        """Read the room now (unless another read within ``max_age_s`` did: asks at once make one
        read); a reason that changes is logged."""
        async with self._reading:
            if max_age_s and (self.read_at_s or 0.0) >= time.time() - max_age_s:
                return
            await self._read()

    async def _read(self) -> None:
        started_s = time.time()  # what it says is as old as its start: a read begun while NATS was away
        try:
            with anyio.fail_after(3 * self._bus.settings.request_timeout_s):
                reason = await self._why_not_writable()
        except (*BUS_ERRORS, HiveError) as exc:
            reason = f"JetStream: {why(exc)}"
        if reason != self.reason:
            if reason is None:
                log.info("JetStream stores writes again")
            else:
                log.warning("not ready: %s", reason)
        self.reason, self.read_at_s = reason, started_s

    async def _why_not_writable(self) -> str | None:
        bus = self._bus
        account = await account_info(bus.js)
        used, most = account.get("storage", 0), (account.get("limits") or {}).get("max_storage", -1)
        if isinstance(most, int) and most > 0 and most - used < bus.settings.claim_check_bytes:
            return (
                f"the account's JetStream file storage is used up ({size_text(used)} of its max_file "
                f"{size_text(most)}): JetStream refuses writes to every stream of the account, whatever "
                "each reserved; submissions answer 503"
            )
        if (full := await self._tasks_full()) is not None:
            return full
        await ensure_counters_stream(bus.js, bus.settings)  # the probe's stream (once made, a look-up)
        timeout_s = bus.settings.request_timeout_s
        try:
            await bus.js.publish(bus.names.room_probe, b"", headers={"Nats-Incr": "+0"}, timeout=timeout_s)
        except nats.js.errors.APIError as exc:
            return f"JetStream refused a write to {bus.names.counters_stream}: {exc.description}"
        except nats.errors.TimeoutError:
            return (
                f"JetStream did not store a write within {timeout_s:g} s (HIVE_REQUEST_TIMEOUT_S): a "
                "server whose disk is full answers none (its log says 'no space left on device'); "
                "once there is room again, restart nats-server: a stream that failed a write for want "
                "of room keeps failing until then"
            )
        return None

    async def _tasks_full(self) -> str | None:
        """Why the tasks stream takes no more tasks (at its max_msgs, or with less room left under its
        max_bytes than a task the bus stores whole may take), or None."""
        bus = self._bus
        info = await bus.js.stream_info(bus.names.tasks_stream)
        config, state = info.config, info.state
        most_msgs, most_bytes = config.max_msgs or -1, config.max_bytes or -1
        if most_msgs > 0 and state.messages >= most_msgs:
            what = f"{state.messages} tasks, its max_msgs (HIVE_TASKS_MAX_MSGS)"
        elif most_bytes > 0 and most_bytes - state.bytes < bus.settings.claim_check_bytes:
            what = f"{size_text(state.bytes)} of its max_bytes {size_text(most_bytes)} (HIVE_TASKS_MAX_BYTES)"
        else:
            return None
        return (
            f"the tasks stream {config.name} is full ({what}): submissions answer 503 queue_full until "
            "tasks age out (HIVE_EVENTS_MAX_AGE_S) or its limits are raised"
        )

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(
            "hive_bus_writable",
            "1 when JetStream stores the gateway's writes (room in the account, the tasks stream not full, "
            "a probe write acknowledged); 0 otherwise, and GET /readyz says why.",
        )
        if self.read_at_s is not None:
            gauge.add_metric([], 0.0 if self.reason else 1.0)
        yield gauge
