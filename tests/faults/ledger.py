"""The ledger: every task id the gateway answered 202 for, and at the end, each one's fate on the bus.

The promise under test: a task the gateway accepted is completed, failed with a reason, or
dead-lettered; never lost, never completed twice in the record. The fates are read from the bus
alone, as a user would read them:

- the final events in the events stream (``<prefix>.events.<provider>.<id>.completed|failed``): how
  many each task has (more than one is a duplicate in the record);
- the dead-letter streams ``<PREFIX>_DLQ_<provider>`` (see :mod:`.dead_letters`);
- the tasks stream: a task still held there (queued, running or waiting for a retry) is pending;
- anything else is lost.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import msgspec
import nats.js.errors

from hive_bus import Completed, Failed, Hive
from hive_bus._bus import event_providers
from hive_bus._messages import event_decoder, task_decoder
from hive_bus.bus import Bus

from .dead_letters import dead_lettered_ids

log = logging.getLogger("tests.faults.ledger")

FateKind = Literal["completed", "failed", "dead_lettered", "pending", "lost"]


@dataclass(slots=True)
class Fate:
    task_id: str
    completed: int = 0  # completed events in the record
    failed: int = 0  # failed events in the record
    dead_lettered: bool = False
    pending: bool = False  # still in the tasks stream
    outputs: list[Any] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)  # who recorded each final event
    attempts: list[int] = field(default_factory=list)  # the attempt of each final event
    reasons: list[str] = field(default_factory=list)  # of failed events

    @property
    def kind(self) -> FateKind:
        if self.completed:
            return "completed"
        if self.failed:
            return "failed"
        if self.dead_lettered:
            return "dead_lettered"
        return "pending" if self.pending else "lost"

    @property
    def recorded_twice(self) -> bool:
        return self.completed + self.failed > 1


@dataclass(frozen=True, slots=True)
class Figures:
    """One case's figures, as docs/reliability.md reports them."""

    case: str
    accepted: int
    completed: int
    failed: int
    dead_lettered: int
    pending: int
    lost: int
    duplicates: int  # tasks with more than one final event in the record
    refused: int  # submissions answered 503 (never accepted, so not in the ledger)
    later_attempt: int = 0  # tasks whose final event came from a second or later attempt
    notes: str = ""

    def line(self) -> str:
        text = (
            f"{self.case}: accepted={self.accepted} completed={self.completed} failed={self.failed} "
            f"dead-lettered={self.dead_lettered} pending={self.pending} lost={self.lost} "
            f"duplicates={self.duplicates} refused(503)={self.refused} later-attempt={self.later_attempt}"
        )
        return f"{text} [{self.notes}]" if self.notes else text


class Ledger:
    """Tasks accepted over HTTP (202), and their fates read back from the bus."""

    def __init__(self, case: str, *, on_figures: Callable[[Figures], None] | None = None) -> None:
        self.case = case
        self._prompts: dict[str, str | None] = {}  # accepted id -> its prompt, in order of acceptance
        self.answers: Counter[int] = Counter()  # HTTP status -> how many
        self.transport_errors = 0  # submissions that got no HTTP answer at all
        self._on_figures = on_figures

    # recording -------------------------------------------------------------------------------------

    def accept(self, task_id: str, prompt: str | None = None) -> None:
        if task_id in self._prompts:
            raise AssertionError(f"the gateway answered 202 twice with task id {task_id}")
        self._prompts[task_id] = prompt

    def answer(self, status: int, body: Any, prompt: str | None = None) -> str | None:
        """Record one HTTP answer to ``POST /v1/tasks``; returns the id when it was a 202."""
        self.answers[status] += 1
        if status != 202:
            return None
        task_id = body["id"]
        assert isinstance(task_id, str)
        self.accept(task_id, prompt)
        return task_id

    @property
    def accepted(self) -> list[str]:
        return list(self._prompts)

    def prompt_of(self, task_id: str) -> str | None:
        return self._prompts[task_id]

    # reading the bus -------------------------------------------------------------------------------

    async def wait_final(self, hive: Hive, timeout_s: float) -> int:
        """Wait until every accepted task has a final event, or ``timeout_s``; returns how many lack one."""
        waiting = set(self._prompts)
        if not waiting:
            return 0
        with anyio.move_on_after(timeout_s):
            async for view in hive.results(list(waiting)):
                waiting.discard(view.id)
        return len(waiting)

    async def unaccepted(self, bus: Bus) -> tuple[int, int]:
        """Tasks the bus has a ``queued`` event for that the gateway never answered 202 for (a submission
        answered 503 after its first publish was stored), and how many of those completed anyway (the
        task was stored too, but its ack was lost). Meaningful when the ledger saw every submission."""
        names = bus.names
        ids: dict[str, set[str]] = {}
        for provider in await event_providers(bus):
            stream, subjects = names.events_stream_of(provider), names.event_subject(provider, "*", "*")
            info = await bus.js.stream_info(stream, subjects_filter=subjects)
            for subject in info.state.subjects or {}:
                _, _, _, task_id, status = subject.split(".")
                ids.setdefault(status, set()).add(task_id)
        strays = ids.get("queued", set()) - set(self._prompts)
        return len(strays), len(strays & ids.get("completed", set()))

    async def fates(self, bus: Bus) -> dict[str, Fate]:
        fates = {task_id: Fate(task_id) for task_id in self._prompts}
        await _read_final_events(bus, fates)
        for task_id in await dead_lettered_ids(bus):
            if task_id in fates:
                fates[task_id].dead_lettered = True
        if any(f.kind == "lost" for f in fates.values()):
            held = await task_ids_in_stream(bus)
            for task_id in held & set(fates):
                fates[task_id].pending = True
        return fates

    async def figures(self, bus: Bus, *, notes: str = "") -> tuple[Figures, dict[str, Fate]]:
        fates = await self.fates(bus)
        kinds = Counter(f.kind for f in fates.values())
        figures = Figures(
            case=self.case,
            accepted=len(fates),
            completed=kinds["completed"],
            failed=kinds["failed"],
            dead_lettered=kinds["dead_lettered"],
            pending=kinds["pending"],
            lost=kinds["lost"],
            duplicates=sum(1 for f in fates.values() if f.recorded_twice),
            refused=self.answers[503],
            later_attempt=sum(1 for f in fates.values() if any(a > 1 for a in f.attempts)),
            notes=notes,
        )
        log.info("ledger %s", figures.line())
        if self._on_figures is not None:
            self._on_figures(figures)
        return figures, fates

    async def check(
        self, bus: Bus, *, notes: str = "", allow_pending: bool = False
    ) -> tuple[Figures, dict[str, Fate]]:
        """The promise: nothing lost, nothing recorded twice, every answer a 202 or a 503 (and, unless
        ``allow_pending``, nothing still waiting)."""
        figures, fates = await self.figures(bus, notes=notes)
        unexpected = {status: n for status, n in self.answers.items() if status not in (202, 503)}
        assert not unexpected, f"{self.case}: answers other than 202 or 503: {unexpected}"
        lost = [f.task_id for f in fates.values() if f.kind == "lost"]
        assert not lost, f"{self.case}: {len(lost)} accepted task(s) lost, e.g. {lost[:5]}; {figures.line()}"
        twice = [f.task_id for f in fates.values() if f.recorded_twice]
        assert not twice, f"{self.case}: recorded twice: {twice[:5]}; {figures.line()}"
        if not allow_pending:
            pending = [f.task_id for f in fates.values() if f.kind == "pending"]
            assert not pending, f"{self.case}: still pending after the drain: {pending[:5]}; {figures.line()}"
        return figures, fates


async def _read_final_events(bus: Bus, fates: dict[str, Fate]) -> None:
    """Every completed and failed event of the bus (each provider's stream), counted for the tasks of
    the ledger."""
    for provider in await event_providers(bus):
        await _read_final_events_of(bus, provider, fates)


async def _read_final_events_of(bus: Bus, provider: str, fates: dict[str, Fate]) -> None:
    """Read by direct gets, message after message on each final subject: a read that ends when the
    subject has no more, where a consumer waiting for its pending count to reach 0 could wait for good
    (it did, once, after nats-server had been killed and restarted)."""
    names = bus.names
    stream = names.events_stream_of(provider)
    for subject in names.final_events(provider):
        seq = 1
        while True:
            try:
                msg = await bus.js.get_msg(stream, seq=seq, subject=subject, next=True, direct=True)
            except nats.js.errors.NotFoundError:
                break
            assert msg.seq is not None
            seq = msg.seq + 1
            try:
                event = event_decoder.decode(msg.data or b"")
            except msgspec.DecodeError:  # junk on a final subject (the hostile suite's): no task's end
                continue
            fate = fates.get(event.task_id)
            if fate is not None and isinstance(event, Completed):
                fate.completed += 1
                fate.outputs.append(event.output)
                fate.workers.append(event.worker)
                fate.attempts.append(event.attempt)
            elif fate is not None and isinstance(event, Failed):
                fate.failed += 1
                fate.reasons.append(event.reason)
                fate.workers.append(event.worker or "")
                fate.attempts.append(event.attempt)


async def task_ids_in_stream(bus: Bus) -> set[str]:
    """The ids of the tasks the tasks stream still holds (read by sequence: a work-queue stream allows
    no second consumer beside the workers')."""
    return {task_id for task_id in (await tasks_by_sequence(bus)).values() if task_id is not None}


async def tasks_by_sequence(bus: Bus) -> dict[int, str | None]:
    """Every message of the tasks stream by its sequence: the task id, or None where it does not decode."""
    names = bus.names
    info = await bus.js.stream_info(names.tasks_stream)
    found: dict[int, str | None] = {}
    if not info.state.messages:
        return found
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            raw = await bus.js.get_msg(names.tasks_stream, seq)
        except nats.js.errors.APIError:
            continue  # acked (removed), never there, or unreadable (a damaged store)
        try:
            found[seq] = task_decoder.decode(raw.data or b"").id
        except msgspec.DecodeError:
            found[seq] = None
    return found
