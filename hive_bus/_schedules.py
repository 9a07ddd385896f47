"""Recurring schedules: a task template that the server fires by a cron rule or an interval.

A schedule is two things on the bus. Its record (rule, time zone, template, paused or not, recent runs)
is a key of the KV bucket ``<prefix>_schedules``, changed by compare-and-set. While it is active, its
timer is a JetStream message schedule in ``<PREFIX>_SCHEDULES`` (nats-server 2.14+: ``@every``, cron with
``Nats-Schedule-Time-Zone``) on ``<prefix>.schedule.recurring.<id>``, firing into
``<prefix>.fired.recurring.<id>``: it lives in the server, survives restarts, and a replicated stream
fires it once in a cluster. Pausing removes the timer (the record stays), resuming sets it again,
deleting removes both. The server checks the rule itself: a rule or a zone it refuses is a
:class:`BadSchedule` naming the field, and nothing is stored.

Each firing becomes a task (``Timers`` in ``hive_bus._expiry`` reads the firings): the template, with
``metadata["schedule_id"]``, an id made from the schedule and the firing's place in the stream, and an
idempotency key made the same way, so a firing read twice is one task.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import re
from typing import Annotated, Any

import msgspec
import nats.js.errors
from msgspec import Meta, Struct
from nats.js.api import Header, KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from ulid import ULID

from ._bus import Bus, kv_entries
from ._errors import BusUnavailable, HiveError, TaskNotFound
from ._messages import TaskRequest, error_field, explain_error, is_task_id, new_task_id, now_ms
from ._nats import BUS_ERRORS
from ._nesting import Guarded, NestedTooDeep, check_json, check_value
from ._size import check_fits, js_publish
from ._timers import FIRED_TTL, RecurringTimer, ensure_schedules_stream

log = logging.getLogger("hive_bus.schedules")

# runs listed with a schedule, newest last
RECENT_RUNS = 20
SCHEDULES_MAX_BYTES = 8 * 1024**2
_EVERY_RE = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
# The longest interval: a year (a longer wait is a cron rule's, @yearly); its next firing stays a date.
MAX_INTERVAL_S = 365 * 86400
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# JetStream's answers to a schedule it cannot take (nats-server's errors.json)
_BAD_PATTERN, _BAD_TIME_ZONE = 10189, 10223


class BadSchedule(HiveError):
    """A schedule request that cannot be taken; ``field`` names where."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class ScheduleNotFound(TaskNotFound):
    """No schedule of that id."""


class ScheduleRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What ``POST /v1/schedules`` takes: one rule (``cron``, with ``time_zone``; ``every_s``; or
    ``every``, as ``"90s"``, ``"15m"``, ``"1h"``, ``"1d"``) and the ``task`` each firing submits."""

    task: TaskRequest
    cron: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    time_zone: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    every_s: float | None = None
    every: str | None = None
    name: Annotated[str, Meta(max_length=200)] = ""


class Run(Struct, frozen=True, kw_only=True):
    task_id: str
    at_ms: int


class Schedule(Struct, frozen=True, kw_only=True):
    """A schedule as the bus keeps it, and as the API shows it."""

    id: str
    name: str = ""
    rule: str  # the server's Nats-Schedule: "@every 3600s", or six-field cron (seconds first)
    time_zone: str | None = None
    task: TaskRequest
    paused: bool = False
    created_at_ms: int
    fired: int = 0
    # the server's next firing (RFC 3339), as its last firing said; before the first, for an interval,
    # its creation plus the interval
    next_at: str | None = None
    runs: list[Run] = []


def rule_of(request: ScheduleRequest) -> tuple[str, str | None]:
    """The server's schedule and time zone for a request; :class:`BadSchedule` naming what is wrong."""
    given = [name for name in ("cron", "every_s", "every") if getattr(request, name) is not None]
    if len(given) != 1:
        raise BadSchedule("give exactly one of cron, every_s and every", "cron" if not given else given[1])
    if request.time_zone is not None and request.cron is None:
        raise BadSchedule("time_zone goes with cron (an interval has none)", "time_zone")
    if request.task.not_before is not None:
        raise BadSchedule("a schedule's task takes no not_before: the schedule says when", "task.not_before")
    for name in ("payload", "metadata"):  # what a submission refuses, refused before it is kept
        try:
            check_value(getattr(request.task, name), f"task.{name}")
        except NestedTooDeep as exc:
            raise BadSchedule(explain_error(exc), exc.field) from None
    if request.cron is not None:
        fields = request.cron.split()
        # five fields as crontab writes them; the server's cron has seconds first
        return (" ".join(["0", *fields]) if len(fields) == 5 else request.cron.strip()), request.time_zone
    if request.every is not None:
        match = _EVERY_RE.fullmatch(request.every.strip())
        if match is None:
            raise BadSchedule('every must be a number and a unit: "90s", "15m", "1h" or "1d"', "every")
        seconds, field = float(match[1]) * _UNIT_S[match[2]], "every"
    else:
        seconds, field = float(request.every_s or 0), "every_s"
    if not 1 <= seconds <= MAX_INTERVAL_S:
        raise BadSchedule(f"{field}: an interval is at least 1 second and at most 365 days", field)
    # in plain digits: the server reads "1.0368e+06s" as no rule at all
    return f"@every {seconds:.3f}".rstrip("0").rstrip(".") + "s", None


def decode_request(body: bytes) -> ScheduleRequest:
    """A request body as a :class:`ScheduleRequest`; :class:`BadSchedule` naming the field."""
    try:
        check_json(body, enclosing=2, named=2)  # before the decoder recurses: the task's fields sit two in
        return msgspec.json.decode(body, type=ScheduleRequest)
    except msgspec.ValidationError as exc:
        raise BadSchedule(explain_error(exc), error_field(exc) or "") from None
    except msgspec.DecodeError as exc:
        raise BadSchedule(f"the body is not JSON: {exc}", "") from None


def run_task_id(schedule_id: str, fired_seq: int, fired_ms: int) -> str:
    """The id of the task a firing submits: its time, and 80 bits of the schedule and the firing's
    place in the stream, so the same firing read again is the same task."""
    digest = hashlib.sha256(f"{schedule_id}:{fired_seq}".encode()).digest()
    return str(ULID.from_int(fired_ms << 80 | int.from_bytes(digest[:10])))


def _next_at(rule: str, from_ms: int) -> str | None:
    if not rule.startswith("@every "):
        return None
    seconds = float(rule.removeprefix("@every ").removesuffix("s"))
    at = datetime.datetime.fromtimestamp(from_ms / 1000 + seconds, tz=datetime.UTC)
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


# a record's template sits one in, its fields two: checked for nesting before the decoder recurses
_decoder = Guarded(msgspec.json.Decoder(Schedule), enclosing=2)
_encoder = msgspec.json.Encoder()


class Schedules:
    """The bus's schedules: :meth:`open` it (the bucket is made on first use), then create, list
    (:meth:`listed`), show (:meth:`get`), pause, resume, delete; :meth:`fired` records a firing's task."""

    def __init__(self, bus: Bus, kv: KeyValue) -> None:
        self._bus = bus
        self._kv = kv

    @classmethod
    async def open(cls, bus: Bus) -> Schedules:
        names = bus.names
        try:
            await ensure_schedules_stream(bus.js, bus.settings)
            try:
                kv = await bus.js.key_value(names.schedules_bucket)
            except nats.js.errors.BucketNotFoundError:
                kv = await bus.js.create_key_value(
                    KeyValueConfig(
                        bucket=names.schedules_bucket,
                        description="hive-bus recurring schedules",
                        history=1,
                        max_bytes=SCHEDULES_MAX_BYTES,
                        storage=StorageType.FILE,
                        replicas=bus.settings.replicas,
                    )
                )
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not open the schedules: {exc}") from None
        return cls(bus, kv)

    async def create(self, request: ScheduleRequest) -> Schedule:
        rule, zone = rule_of(request)
        created = now_ms()
        schedule = Schedule(
            id=new_task_id(), name=request.name, rule=rule, time_zone=zone, task=request.task,
            created_at_ms=created, next_at=_next_at(rule, created),
        )  # fmt: skip
        self._check_fits(schedule)
        # the server checks the rule first: nothing is kept if it refuses it
        await self._arm(schedule, typed=request.cron)
        try:
            await self._kv.create(schedule.id, _encoder.encode(schedule))
        except BUS_ERRORS as exc:
            await self._disarm(schedule.id)
            raise BusUnavailable(f"could not keep schedule {schedule.id}: {exc}") from None
        log.info("schedule %s created: %s %s", schedule.id, rule, zone or "")
        return schedule

    def _check_fits(self, schedule: Schedule) -> None:
        """Raise :class:`TooLarge` when the schedule's record, at its largest (its runs listed in full),
        is over the server's ``max_payload``: kept, it could not record its runs (the template is not
        moved to the Object Store as a task's content is)."""
        runs = [Run(task_id=schedule.id, at_ms=schedule.created_at_ms)] * RECENT_RUNS
        largest = msgspec.structs.replace(
            schedule, runs=runs, fired=2**63 - 1, next_at="9999-12-31T23:59:59Z"
        )
        revision = {"Nats-Expected-Last-Subject-Sequence": str(2**63)}  # what a change of it sends
        check_fits(self._bus.nc, _encoder.encode(largest), revision, what="schedule with its template")

    async def listed(self) -> list[Schedule]:
        """Every schedule, by id: one read of the bucket's last values (nats-py's ``keys()`` can come
        back short under load, see :func:`hive_bus._bus.kv_entries`)."""
        try:
            values = await kv_entries(self._kv)
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not list the schedules: {exc}") from None
        found = [_decoded(key, values[key]) for key in sorted(values)]
        return [schedule for schedule in found if schedule is not None]

    async def get(self, schedule_id: str) -> Schedule:
        found = await self._read(schedule_id)
        if found is None:
            raise ScheduleNotFound(f"no schedule {schedule_id}")
        return found[0]

    async def pause(self, schedule_id: str) -> Schedule:
        schedule = await self._change(schedule_id, paused=True)
        await self._disarm(schedule_id)
        return schedule

    async def resume(self, schedule_id: str) -> Schedule:
        schedule = await self._change(schedule_id, paused=False)
        await self._arm(schedule)
        return schedule

    async def delete(self, schedule_id: str) -> None:
        if await self._entry(schedule_id) is None:  # a record that does not decode can be deleted
            raise ScheduleNotFound(f"no schedule {schedule_id}")
        await self._disarm(schedule_id)
        try:
            await self._kv.purge(schedule_id)
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not delete schedule {schedule_id}: {exc}") from None

    async def fired(self, schedule_id: str, task_id: str, at_ms: int, next_at: str | None) -> None:
        """Record a firing's task among the schedule's recent runs (once per task)."""
        for _ in range(10):
            found = await self._read(schedule_id)  # a record that does not decode never fires (current)
            if found is None:
                return
            schedule, revision = found
            if any(run.task_id == task_id for run in schedule.runs):
                return
            runs = [*schedule.runs, Run(task_id=task_id, at_ms=at_ms)][-RECENT_RUNS:]
            changed = msgspec.structs.replace(
                schedule, runs=runs, fired=schedule.fired + 1, next_at=next_at or schedule.next_at
            )
            try:
                await self._kv.update(schedule_id, _encoder.encode(changed), last=revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # changed meanwhile (paused, another firing): read again

    async def current(self, schedule_id: str) -> Schedule | None:
        """The schedule, or None when there is none, or its record does not decode (it fires nothing)."""
        try:
            found = await self._read(schedule_id)
        except ScheduleNotFound:
            return None
        return None if found is None else found[0]

    async def _change(self, schedule_id: str, *, paused: bool) -> Schedule:
        for _ in range(10):
            found = await self._read(schedule_id)
            if found is None:
                raise ScheduleNotFound(f"no schedule {schedule_id}")
            schedule, revision = found
            changed = msgspec.structs.replace(schedule, paused=paused)
            if not paused:  # the server's timer is set anew: the next firing is counted from now
                changed = msgspec.structs.replace(changed, next_at=_next_at(schedule.rule, now_ms()))
            try:
                await self._kv.update(schedule_id, _encoder.encode(changed), last=revision)
                return changed
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            except BUS_ERRORS as exc:
                raise BusUnavailable(f"could not change schedule {schedule_id}: {exc}") from None
        raise BusUnavailable(f"schedule {schedule_id} kept changing; try again")

    async def _read(self, schedule_id: str) -> tuple[Schedule, int] | None:
        """The schedule and its revision; None when there is none. A record that does not decode is
        refused as :class:`ScheduleNotFound`, saying so."""
        entry = await self._entry(schedule_id)
        if entry is None:
            return None
        schedule = _decoded(schedule_id, entry.value or b"")
        if schedule is None:
            raise ScheduleNotFound(
                f"schedule {schedule_id}'s record does not decode (written by hand?): it can only be deleted"
            )
        return schedule, entry.revision or 0

    async def _entry(self, schedule_id: str) -> KeyValue.Entry | None:
        if not is_task_id(schedule_id):
            raise ScheduleNotFound(
                f"{schedule_id!r} is not a schedule id (26 characters of Crockford base32)"
            )
        try:
            entry = await self._kv.get(schedule_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"could not read schedule {schedule_id}: {exc}") from None
        return entry if entry.value else None

    async def _arm(self, schedule: Schedule, *, typed: str | None = None) -> None:
        """The server's timer of the schedule, set (or set again: one per subject). ``typed``: the cron
        rule as the user wrote it, which a refusal quotes (five fields, not the server's six)."""
        names = self._bus.names
        headers = {
            Header.SCHEDULE.value: schedule.rule,
            Header.SCHEDULE_TARGET.value: names.fired_subject("recurring", schedule.id),
            Header.SCHEDULE_TTL.value: FIRED_TTL,
        }
        if schedule.time_zone:
            headers[Header.SCHEDULE_TIME_ZONE.value] = schedule.time_zone
        try:
            await js_publish(
                self._bus.js, self._bus.nc, names.schedule_subject("recurring", schedule.id),
                _encoder.encode(RecurringTimer(schedule_id=schedule.id)), headers=headers,
                stream=names.schedules_stream, what="schedule",
            )  # fmt: skip
        except nats.js.errors.APIError as exc:
            if exc.err_code == _BAD_TIME_ZONE:
                raise BadSchedule(
                    f"time_zone: {schedule.time_zone!r} is not a time zone", "time_zone"
                ) from None
            if exc.err_code == _BAD_PATTERN:
                raise BadSchedule(
                    f"cron: {typed or schedule.rule!r} is not a cron rule: five or six fields (seconds first), "
                    "or @hourly, @daily, @weekly, @monthly, @yearly",
                    "cron",
                ) from None
            raise BusUnavailable(f"the schedule was not stored: {exc.description}") from None
        except BUS_ERRORS as exc:
            raise BusUnavailable(f"the schedule was not stored: {exc}") from None

    async def _disarm(self, schedule_id: str) -> None:
        names = self._bus.names
        with contextlib.suppress(*BUS_ERRORS):
            await self._bus.js.purge_stream(
                names.schedules_stream, subject=names.schedule_subject("recurring", schedule_id)
            )


def _decoded(schedule_id: str, value: bytes) -> Schedule | None:
    """A schedule's record, or None (logged) when it does not decode: only the hub writes the bucket,
    so one that does not was written by hand, and it must not take the listing or the timers down."""
    try:
        return _decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("schedule %s's record does not decode, left out: %s", schedule_id, exc)
        return None


def template_for(schedule: Schedule, task_id: str, fired_seq: int) -> TaskRequest:
    """The task a firing submits: the template, linked to its schedule, keyed by the firing."""
    metadata: dict[str, Any] = {**schedule.task.metadata, "schedule_id": schedule.id}
    return msgspec.structs.replace(
        schedule.task, metadata=metadata, idempotency_key=f"schedule:{schedule.id}:{fired_seq}"
    )
