"""The webhook part of the HTTP API: a task's webhook checked on submission, and the deliveries listed."""

# No "from __future__ import annotations" here: Litestar reads the parameter markers at run time.
from typing import Annotated, Literal

import msgspec
from litestar import get
from litestar.datastructures import State
from litestar.params import QueryParameter

from hive_bus import BusUnavailable, TaskRequest
from hive_bus._nats import BUS_ERRORS
from hive_bus.bus import Bus

from . import records, urls
from .config import WebhookSettings
from .records import DeliveryRecord

MAX_LIST = 1000


async def refusal(settings: WebhookSettings, request: TaskRequest) -> tuple[str, str] | None:
    """Why the gateway will not take ``request``'s webhook, as (field, message); None when it will
    (or the task has none). The address is checked again at each delivery."""
    if request.webhook is None:
        return None
    if not settings.enabled:
        return "webhook", (
            "webhook: this gateway sends no webhooks (HIVE_WEBHOOK_SECRET is not set; ask its operator)"
        )
    try:
        await urls.check(request.webhook.url, settings.allow_networks)
    except urls.Refused as exc:
        return "webhook.url", f"webhook.url: {exc}"
    return None


class Deliveries(msgspec.Struct, frozen=True, kw_only=True):
    deliveries: list[DeliveryRecord]


@get("/v1/webhooks/deliveries", summary="Recent webhook deliveries: status, attempts, last error")
async def list_deliveries(
    state: State,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_LIST, description="at most this many")] = 100,
    status: Annotated[
        list[Literal["pending", "retrying", "delivered", "failed", "refused"]] | None,
        QueryParameter(description="only deliveries in this state (given more than once: in any of them)"),
    ] = None,
    task_id: Annotated[str | None, QueryParameter(description="only this task's")] = None,
) -> Deliveries:
    """The most recently updated first, from the bus (every gateway's attempts). ``failed``: given up
    after the last retry; ``refused``: the address is not one webhooks may go to."""
    bus: Bus = state.hive.bus
    try:
        found = await records.recent(bus)
    except BUS_ERRORS as exc:
        raise BusUnavailable(f"could not read the webhook deliveries: {exc}") from None
    kept = [
        r
        for r in found
        if (status is None or r.status in status) and (task_id is None or r.task_id == task_id)
    ]
    return Deliveries(deliveries=kept[:limit])


ROUTES = [list_deliveries]
