"""OpenAI's Batch API on the gateway: ``POST /v1/batches``, ``GET /v1/batches``,
``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``, in OpenAI's shapes (see
:mod:`hive_bus._batches` for the batch object, :mod:`services.batch_runner` for what runs it).

``completion_window`` takes ``"24h"`` as OpenAI's API does, and any ``<n>s``, ``<n>m`` or ``<n>h`` from
1s to 168h. Errors are OpenAI's shape, so that the openai SDK raises the right exception: those of
these handlers, and those the gateway gives on their paths (:mod:`services.openai_errors`).
"""

# No "from __future__ import annotations" here: Litestar reads the parameter markers at run time.
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, QueryParameter

from hive_bus import BusUnavailable
from hive_bus._batches import (
    ENDPOINT,
    BadBatch,
    Batch,
    BatchList,
    BatchNotFound,
    BatchStore,
    cancelling,
    create_batch,
)
from hive_bus._files import FileNotFound

from .answers import BUS_RETRY_AFTER_S
from .openai_errors import OpenAIError, param_of


class BatchRequest(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /v1/batches``: the uploaded input file, the endpoint its lines call, the window."""

    input_file_id: str
    endpoint: str = ENDPOINT
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


async def batches(state: State) -> BatchStore:
    """The bus's batch store, opened on first use and kept in the app's state."""
    store: BatchStore | None = state.get("batches")
    if store is None:
        store = state["batches"] = await BatchStore.open(state.hive.bus)
    return store


def _answer(value: Any) -> Response[Any]:
    return Response(msgspec.json.encode(value), media_type="application/json")


def _error(exc: Exception) -> Response[Any]:
    if isinstance(exc, BadBatch):
        return OpenAIError(400, str(exc), param=exc.param, final=True).response()
    if isinstance(exc, FileNotFound):
        return OpenAIError(404, str(exc), param="input_file_id", code="file_not_found", final=True).response()
    if isinstance(exc, BatchNotFound):
        return OpenAIError(404, str(exc), code="batch_not_found", final=True).response()
    retry = {"Retry-After": str(BUS_RETRY_AFTER_S)}
    return OpenAIError(503, str(exc), type="server_error", code="bus_unavailable", headers=retry).response()


_ERRORS = (BadBatch, FileNotFound, BatchNotFound, BusUnavailable)


@post("/v1/batches", status_code=200, summary="Create a batch of an uploaded JSON Lines file")
async def create(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    try:
        body = msgspec.json.decode(await request.body(), type=BatchRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        message = f"the request body is not a batch request: {exc}"
        return OpenAIError(400, message, param=param_of(exc), final=True).response()
    try:
        return _answer(
            await create_batch(
                state.hive.bus,
                body.input_file_id,
                endpoint=body.endpoint,
                completion_window=body.completion_window,
                metadata=body.metadata,
            )
        )
    except _ERRORS as exc:
        return _error(exc)


@get("/v1/batches", summary="Batches, newest first")
async def list_batches(
    state: State,
    limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
    after: Annotated[str | None, QueryParameter(description="the id the last page ended with")] = None,
) -> Response[Any]:
    try:
        found = await (await batches(state)).list()
    except _ERRORS as exc:
        return _error(exc)
    if after is not None:
        found = [b for b in found if b.id < after]  # ids sort by creation
    page = found[:limit]
    return _answer(
        BatchList(
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=len(found) > limit,
        )
    )


@get("/v1/batches/{batch_id:str}", summary="One batch")
async def show(state: State, batch_id: FromPath[str]) -> Response[Any]:
    try:
        return _answer(await (await batches(state)).get(batch_id))
    except _ERRORS as exc:
        return _error(exc)


@post(
    "/v1/batches/{batch_id:str}/cancel", status_code=200, summary="Cancel a batch: its queued lines never run"
)
async def cancel(state: State, batch_id: FromPath[str]) -> Response[Any]:
    try:
        batch, _ = await (await batches(state)).change(batch_id, cancelling)
    except _ERRORS as exc:
        return _error(exc)
    return _answer(batch)


BATCH_ROUTES = [create, list_batches, show, cancel]

__all__ = ["BATCH_ROUTES", "Batch", "BatchRequest"]
