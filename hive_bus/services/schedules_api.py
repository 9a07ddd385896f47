"""The recurring schedules of the HTTP API v1 (see :mod:`hive_bus._schedules`): ``POST /v1/schedules``,
``GET /v1/schedules``, ``GET /v1/schedules/{id}`` (with its next firing and its recent runs and their
status), ``POST /v1/schedules/{id}/pause`` and ``/resume``, ``DELETE /v1/schedules/{id}``."""

# No "from __future__ import annotations" here: Litestar reads the parameter markers at run time.
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath

from hive_bus import Hive, HiveError, TaskNotFound, Unserved
from hive_bus._schedules import BadSchedule, Schedule, ScheduleNotFound, Schedules, decode_request

from . import answers
from .api import _errors, as_response
from .webhooks.api import refusal as webhook_refusal


async def schedules(state: State) -> Schedules:
    """The bus's schedules, opened on first use and kept in the app's state."""
    store: Schedules | None = state.get("schedules")
    if store is None:
        hive: Hive = state.hive
        store = state["schedules"] = await Schedules.open(hive.bus)
    return store


def _json(value: Any, status: int = 200) -> Response[Any]:
    return Response(msgspec.json.encode(value), status_code=status, media_type="application/json")


def _refused(exc: BadSchedule | ScheduleNotFound) -> Response[Any]:
    if isinstance(exc, BadSchedule):
        return as_response(answers.invalid(str(exc), field=exc.field or None))
    return as_response(answers.error(404, "schedule_not_found", str(exc)))


async def _with_runs(hive: Hive, schedule: Schedule) -> dict[str, Any]:
    """A schedule as shown alone: each recent run with its task's status now."""
    shown: dict[str, Any] = msgspec.to_builtins(schedule)
    runs = []
    for run in reversed(schedule.runs):  # newest first
        status: str
        try:
            status = (await hive.get(run.task_id)).status
        except TaskNotFound:
            status = "unknown"  # aged out of the events
        runs.append({"task_id": run.task_id, "at_ms": run.at_ms, "status": status})
    shown["runs"] = runs
    return shown


@post(
    "/v1/schedules",
    status_code=201,
    responses=_errors(400, 401, 413, 503),
    summary="Create a recurring schedule",
)
async def create_schedule(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    """A template is refused as ``POST /v1/tasks`` would refuse it (its webhook, its provider, its
    nesting), naming the field under ``task``; one too large to keep is a 413."""
    hive: Hive = state.hive
    try:
        body = decode_request(await request.body())
        refused = await webhook_refusal(state.webhooks, body.task)
        if refused is not None:
            return as_response(answers.invalid(f"task.{refused[1]}", field=f"task.{refused[0]}"))
        made = await hive.create_schedule(
            body.task, cron=body.cron, time_zone=body.time_zone, every_s=body.every_s, every=body.every,
            name=body.name,
        )  # fmt: skip
        return _json(made, 201)
    except BadSchedule as exc:
        return _refused(exc)
    except Unserved as exc:
        return as_response(answers.error(400, "unserved_provider", f"task: {exc}", field="task.provider"))


@get("/v1/schedules", responses=_errors(401, 503), summary="Every recurring schedule")
async def list_schedules(state: State) -> Response[Any]:
    return _json({"schedules": await (await schedules(state)).listed()})


@get("/v1/schedules/{schedule_id:str}", responses=_errors(401, 404, 503), summary="One schedule and its runs")
async def show_schedule(state: State, schedule_id: FromPath[str]) -> Response[Any]:
    try:
        schedule = await (await schedules(state)).get(schedule_id)
    except ScheduleNotFound as exc:
        return _refused(exc)
    return _json(await _with_runs(state.hive, schedule))


async def _act(state: State, schedule_id: str, action: str) -> Response[Any]:
    store = await schedules(state)
    try:
        if action == "delete":
            await store.delete(schedule_id)
            return _json({"id": schedule_id, "deleted": True})
        changed = await (store.pause(schedule_id) if action == "pause" else store.resume(schedule_id))
    except (ScheduleNotFound, BadSchedule) as exc:
        return _refused(exc)
    except HiveError:
        raise
    return _json(changed)


@post(
    "/v1/schedules/{schedule_id:str}/pause",
    status_code=200,
    responses=_errors(401, 404, 503),
    summary="Pause a schedule (its timer is removed; it keeps its record)",
)
async def pause_schedule(state: State, schedule_id: FromPath[str]) -> Response[Any]:
    return await _act(state, schedule_id, "pause")


@post(
    "/v1/schedules/{schedule_id:str}/resume",
    status_code=200,
    responses=_errors(401, 404, 503),
    summary="Resume a paused schedule",
)
async def resume_schedule(state: State, schedule_id: FromPath[str]) -> Response[Any]:
    return await _act(state, schedule_id, "resume")


@delete(
    "/v1/schedules/{schedule_id:str}",
    status_code=200,
    responses=_errors(401, 404, 503),
    summary="Delete a schedule (its tasks stay)",
)
async def delete_schedule(state: State, schedule_id: FromPath[str]) -> Response[Any]:
    return await _act(state, schedule_id, "delete")


SCHEDULE_ROUTES = [
    create_schedule,
    list_schedules,
    show_schedule,
    pause_schedule,
    resume_schedule,
    delete_schedule,
]
