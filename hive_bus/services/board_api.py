"""The routes the dashboard's panels read beside the API v1: the last hour's figures and the problems
that need a person. Served by a gateway that follows the bus (its :class:`services.metrics.BusMetrics`).
"""

# No "from __future__ import annotations" here: Litestar reads the parameter markers at run time.
import contextlib
import logging
import time
from typing import Annotated

import anyio
import msgspec
from litestar import get
from litestar.datastructures import State
from litestar.params import FromPath, QueryParameter

from hive_bus import BusUnavailable, Hive, TaskNotFound
from hive_bus._assigned import Assignments, marker_seq, task_at
from hive_bus._events import task_events
from hive_bus._messages import Queued, TaskEvent
from hive_bus._nats import BUS_ERRORS

from .api import _errors, shown_event
from .history import HistoryView
from .metrics import SCRAPE_MAX_AGE_S, SCRAPE_REFRESH_S, BusMetrics
from .problems import Problem, WebhookTrouble, problems_of, webhook_trouble
from .webhooks import records


@get(
    "/v1/stats/history",
    summary="The last hour a minute at a time: completions, failures, 429s, latencies, queue depths",
    responses=_errors(400, 401),
)
async def stats_history(
    state: State,
    since_ms: Annotated[
        int, QueryParameter(ge=0, description="only the minutes from the one holding this time (unix ms)")
    ] = 0,
) -> HistoryView:
    """Read from the bus as ``/metrics`` is (the events stream's last hour on start, then followed), so
    every gateway of one bus answers alike. The page reads the hour once, then the last minutes."""
    metrics: BusMetrics = state.metrics
    # the queues as they are now, as a scrape reads them (the depths are worked back from them)
    with anyio.move_on_after(SCRAPE_REFRESH_S):
        await metrics.refresh(max_age_s=SCRAPE_MAX_AGE_S)
    return metrics.history_view(since_ms=since_ms)


WEBHOOKS_READ_EVERY_S = 30.0  # the delivery records are read at most this often for the strip


class WebhookWatch:
    """The strip's view of webhook deliveries: the bus's delivery records (every gateway's), read at
    most every :data:`WEBHOOKS_READ_EVERY_S` (the page asks every two seconds; the log holds up to
    10,000 records)."""

    def __init__(self) -> None:
        self._read_at = -WEBHOOKS_READ_EVERY_S
        self._trouble: WebhookTrouble | None = None

    async def trouble(self, hive: Hive) -> WebhookTrouble | None:
        if time.monotonic() - self._read_at >= WEBHOOKS_READ_EVERY_S:
            self._read_at = time.monotonic()
            try:
                found = await records.recent(hive.bus)
            except BUS_ERRORS as exc:
                log.warning("could not read the webhook deliveries for the problem strip: %s", exc)
                return self._trouble
            self._trouble = webhook_trouble(found, now_ms=int(time.time() * 1000))
        return self._trouble


@get("/v1/problems", summary="What needs a person now, the most pressing first", responses=_errors(401))
async def problems(state: State) -> list[Problem]:
    metrics: BusMetrics = state.metrics
    watch: WebhookWatch = state.webhook_watch
    return problems_of(
        metrics.snapshot, now_s=time.time(), refresh_s=metrics.refresh_s, since_s=metrics.since_ms / 1000,
        webhooks=await watch.trouble(state.hive),
    )  # fmt: skip


log = logging.getLogger("hive_bus.gateway")

MAX_TIMELINE_EVENTS = 1000  # a task's events read at most (a task retried for days has many)


@get(
    "/v1/tasks/{task_id:str}/timeline",
    summary="Every event of a task so far, oldest first: queued, each attempt, wait and move, its end",
    responses=_errors(400, 401, 404, 503),
)
async def task_timeline(task_id: FromPath[str], state: State) -> list[TaskEvent]:
    """All of a task's story, replays included (``/v1/tasks/{id}/events`` ends at the first outcome):
    only the events of the provider the task was assigned to at each step, as the other reads count
    them. At most :data:`MAX_TIMELINE_EVENTS`, the oldest; none of an ``evicted`` task."""
    hive: Hive = state.hive
    bus = hive.bus
    assigned = Assignments(bus)
    events: list[TaskEvent] = []
    view = await hive.get(task_id)  # 404 at once for a task the bus does not know
    try:
        # the stream of the provider it was first queued on, then at each move the next one's
        found = task_events(bus, task_id, assigned, live=False)
        async with contextlib.aclosing(found):
            with anyio.move_on_after(bus.settings.request_timeout_s):
                async for item in found:
                    if item is None:
                        continue  # not asked for: no quiet_s
                    msg, event = item
                    if isinstance(event, Queued) and event.task is None:  # a marker: its task
                        seq = marker_seq(msg.headers)
                        task = await task_at(bus, seq, task_id) if seq is not None else None
                        event = msgspec.structs.replace(event, task=task)
                    events.append(shown_event(event))
                    if len(events) >= MAX_TIMELINE_EVENTS:
                        break
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read task {task_id}: {exc}") from None
    if not events and view.status != "evicted":  # its events evicted: none, as its view says
        raise TaskNotFound(f"no task {task_id} on the bus")
    return events


BOARD_ROUTES = [stats_history, problems]
TASK_ROUTES = [task_timeline]

__all__ = ["BOARD_ROUTES", "TASK_ROUTES"]
