"""``hive schedule``: recurring schedules (``add``, ``list``, ``show``, ``pause``, ``resume``,
``delete``), read and written on the bus. A gateway on the bus turns their firings into tasks
(:mod:`hive_bus._schedules`)."""

from __future__ import annotations

import json
from typing import Any

import click
import msgspec

from ._cli import _run, bus_options
from ._client import connect
from ._schedules import Schedule
from ._settings import Settings


def _line(schedule: Schedule) -> str:
    state = "paused" if schedule.paused else f"next {schedule.next_at or 'after its first firing'}"
    zone = f" ({schedule.time_zone})" if schedule.time_zone else ""
    name = f" {schedule.name!r}" if schedule.name else ""
    return f"{schedule.id}{name} {schedule.rule}{zone} -> {schedule.task.provider}: {state}, fired {schedule.fired}"


def _print(value: Any) -> None:
    click.echo(json.dumps(msgspec.to_builtins(value), ensure_ascii=False, indent=2))


@click.group()
def schedule() -> None:
    """Recurring schedules: a task template fired by cron or an interval, kept by the server."""


@schedule.command()
@click.argument("provider")
@click.argument("prompt")
@click.option("--cron", help='cron rule: five fields ("0 9 * * 1-5"), or six with seconds first, or @daily')
@click.option("--time-zone", help="IANA time zone of --cron (UTC by default), e.g. Europe/Madrid")
@click.option("--every", help='an interval: "90s", "15m", "1h", "1d" (at least 1s)')
@click.option("--name", default="", help="a label for lists")
@click.option("--model")
@click.option("--metadata", help="JSON object kept with each task (schedule_id is added)")
@bus_options
def add(
    provider: str,
    prompt: str,
    cron: str | None,
    time_zone: str | None,
    every: str | None,
    name: str,
    model: str | None,
    metadata: str | None,
    settings: Settings,
) -> None:
    """Add a schedule that submits PROVIDER PROMPT at each firing; prints it as JSON."""
    if (cron is None) == (every is None):  # the API's words (cron, every_s, every) are not this command's
        raise click.UsageError("give one rule: --cron RULE or --every INTERVAL")
    if time_zone is not None and cron is None:
        raise click.UsageError("--time-zone goes with --cron (an interval has no time zone)")
    task: dict[str, Any] = {"provider": provider, "prompt": prompt}
    if model:
        task["model"] = model
    if metadata:
        try:
            task["metadata"] = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--metadata") from None

    async def main() -> None:
        async with connect(settings=settings) as hive:
            made = await hive.create_schedule(task, cron=cron, time_zone=time_zone, every=every, name=name)
        _print(made)

    _run(main)


@schedule.command("list")
@bus_options
def list_(settings: Settings) -> None:
    """Every schedule, one line each: id, rule, next firing or paused, firings so far."""

    async def main() -> None:
        async with connect(settings=settings) as hive:
            found = await hive.schedules()
        if not found:
            click.echo("no schedules (hive schedule add makes one)", err=True)
        for each in found:
            click.echo(_line(each))

    _run(main)


@schedule.command()
@click.argument("schedule_id", metavar="ID")
@bus_options
def show(schedule_id: str, settings: Settings) -> None:
    """One schedule as JSON, with its recent runs (task ids, newest last)."""

    async def main() -> None:
        async with connect(settings=settings) as hive:
            _print(await hive.schedule(schedule_id))

    _run(main)


def _action(verb: str) -> click.Command:
    @click.argument("schedule_id", metavar="ID")
    @bus_options
    def command(schedule_id: str, settings: Settings) -> None:
        async def main() -> None:
            async with connect(settings=settings) as hive:
                if verb == "delete":
                    await hive.delete_schedule(schedule_id)
                    click.echo(f"{schedule_id} deleted")
                    return
                changed = await (hive.pause_schedule if verb == "pause" else hive.resume_schedule)(
                    schedule_id
                )
                click.echo(_line(changed))

        _run(main)

    helps = {
        "pause": "Pause a schedule: the server drops its timer, its record stays.",
        "resume": "Resume a paused schedule.",
        "delete": "Delete a schedule (the tasks it submitted stay).",
    }
    return click.command(verb, help=helps[verb])(command)


for _verb in ("pause", "resume", "delete"):
    schedule.add_command(_action(_verb))
