"""The dead-letter routes of the HTTP API v1: list, show, replay and purge, as ``hive dlq`` does."""

# No "from __future__ import annotations" here: Litestar reads the parameter markers at run time.
from typing import Annotated

import msgspec
from litestar import delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, QueryParameter

from hive_bus import Hive
from hive_bus._dlq import DeadLetter
from hive_bus._messages import ProviderName

from .api import _errors, checked_provider


class Replayed(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    provider: str
    run: int
    status: str = "queued"


class Purged(msgspec.Struct, frozen=True, kw_only=True):
    purged: int


@get("/v1/dlq", responses=_errors(400, 401, 503), summary="Dead letters, oldest first")
async def list_dead_letters(
    state: State,
    provider: Annotated[ProviderName | None, QueryParameter(description="only this provider's")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> list[DeadLetter]:
    hive: Hive = state.hive
    return await hive.dead_letters(provider=checked_provider(provider), limit=limit)


@get("/v1/dlq/{task_id:str}", responses=_errors(400, 401, 404, 503), summary="One task's dead letter")
async def show_dead_letter(state: State, task_id: FromPath[str]) -> DeadLetter:
    hive: Hive = state.hive
    return await hive.dead_letter(task_id)


@post(
    "/v1/dlq/{task_id:str}/replay",
    status_code=202,
    responses=_errors(400, 401, 404, 409, 503),
    summary="Queue a dead-lettered task again (same id, its next run)",
)
async def replay_dead_letter(state: State, task_id: FromPath[str]) -> Replayed:
    hive: Hive = state.hive
    done = await hive.replay(task_id)
    return Replayed(id=done.id, provider=done.provider, run=done.run)


@delete(
    "/v1/dlq/{task_id:str}",
    status_code=200,
    responses=_errors(400, 401, 404, 503),
    summary="Drop one dead letter",
)
async def purge_dead_letter(state: State, task_id: FromPath[str]) -> Purged:
    hive: Hive = state.hive
    return Purged(purged=await hive.purge_dead_letters(task_id=task_id))


@delete(
    "/v1/dlq",
    status_code=200,
    responses=_errors(400, 401, 503),
    summary="Drop dead letters (of one provider)",
)
async def purge_dead_letters(
    state: State,
    provider: Annotated[ProviderName | None, QueryParameter(description="only this provider's")] = None,
) -> Purged:
    hive: Hive = state.hive
    return Purged(purged=await hive.purge_dead_letters(provider=checked_provider(provider)))


DLQ_ROUTES = [list_dead_letters, show_dead_letter, replay_dead_letter, purge_dead_letter, purge_dead_letters]
