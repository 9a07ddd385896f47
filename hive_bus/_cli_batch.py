"""``hive batch``: batches of OpenAI batch lines (JSON Lines of ``{custom_id, method, url, body}``),
created, followed and read back from the bus. A gateway on the bus runs them
(:mod:`hive_bus.services.batch_runner`); these commands only read and write the bus's objects.

Exit statuses (``create --wait`` and ``status``): 0 the batch completed with every line completed, 1
it ended otherwise (a line failed; the batch failed, expired or was cancelled), 2 it has not ended (the
wait ran out).
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

import click
import msgspec

from ._batches import Batch
from ._cli import EXIT_FAILED, EXIT_NOT_ENDED, _run, _Seconds, bus_options
from ._client import connect
from ._settings import Settings

BAR_WIDTH = 30
# a batch no gateway has taken up waits forever, silently: say where batches run
UNATTENDED = "no gateway has taken it up: batches run in a gateway on this bus (hive gateway, or hive up)"


def _exit_for_batch(batch: Batch) -> None:
    counts = batch.request_counts
    if not batch.done:
        raise click.exceptions.Exit(EXIT_NOT_ENDED)
    if batch.status != "completed" or counts.failed or counts.completed < counts.total:
        raise click.exceptions.Exit(EXIT_FAILED)


def _unattended(batch: Batch) -> bool:
    """Not ended, and no gateway ever leased it (a gateway's lease is never cleared, only taken over)."""
    return not batch.done and batch.driver is None


def _when(epoch_s: int | None) -> str:
    return datetime.fromtimestamp(epoch_s).strftime("%Y-%m-%d %H:%M") if epoch_s else "-"


def summary(batch: Batch) -> str:
    """One line: status, counts, rate and estimated finish."""
    counts = batch.request_counts
    text = (
        f"{batch.id} {batch.status}: {counts.completed} completed, {counts.failed} failed of {counts.total}"
    )
    progress = batch.progress
    if progress is not None and not batch.done:
        text += f", {progress.per_minute:.0f}/min"
        if progress.estimated_finish_at:
            text += f", finishes about {_when(progress.estimated_finish_at)}"
        if progress.basis:
            text += f" ({progress.basis})"
    if batch.errors is not None and batch.errors.data:
        text += "; " + "; ".join(e.message for e in batch.errors.data[:5])
    if _unattended(batch):
        text += f"; {UNATTENDED}"
    return text


def _bar(batch: Batch) -> None:
    counts = batch.request_counts
    ended = counts.completed + counts.failed
    filled = int(BAR_WIDTH * ended / counts.total) if counts.total else 0
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    rate = f" {batch.progress.per_minute:.0f}/min" if batch.progress else ""
    eta = batch.progress.estimated_finish_at if batch.progress else None
    click.echo(
        f"\r[{bar}] {ended}/{counts.total} {batch.status}{rate}{f' ~{_when(eta)}' if eta else ''}   ",
        err=True,
        nl=False,
    )


def _print(batch: Batch) -> None:
    click.echo(msgspec.json.encode(batch).decode())


@click.group()
def batch() -> None:
    """Batches of OpenAI batch lines: create, status, list, cancel, results, errors."""


@batch.command()
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@click.option("--model", help="send every line to this model or alias instead of its own")
@click.option(
    "--window", default="24h", show_default=True, help="completion window: <n>s, <n>m or <n>h, up to 168h"
)
@click.option("--wait", "wait", is_flag=True, help="wait for the end, with a progress bar on stderr")
@click.option(
    "--timeout",
    "timeout_s",
    type=_Seconds(zero=False),
    help="with --wait: give up after this many seconds (exit 2)",
)
@bus_options
def create(
    file: str, model: str | None, window: str, wait: bool, timeout_s: float | None, settings: Settings
) -> None:
    """Upload FILE and create its batch; print the batch as JSON (at its end with --wait)."""
    if timeout_s is not None and not wait:
        raise click.UsageError("--timeout goes with --wait")

    async def main() -> None:
        async with connect(settings=settings) as hive:
            made = await hive.create_batch(file, window=window, model=model)
            if not wait:
                _print(made)
                return
            click.echo(f"batch {made.id}", err=True)
            done = await hive.wait_batch(made.id, timeout_s=timeout_s, progress=_bar)
            click.echo("", err=True)
            if _unattended(done):
                click.echo(f"batch {done.id}: {UNATTENDED}", err=True)
        _print(done)
        _exit_for_batch(done)

    _run(main)


@batch.command()
@click.argument("batch_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="the batch object as JSON instead of a line")
@bus_options
def status(batch_id: str, as_json: bool, settings: Settings) -> None:
    """A batch's status, counts, rate over the last minute and estimated finish."""

    async def main() -> None:
        async with connect(settings=settings) as hive:
            found = await hive.batch(batch_id)
        if as_json:
            _print(found)
        else:
            click.echo(summary(found))
        _exit_for_batch(found)

    _run(main)


@batch.command("list")
@bus_options
def list_(settings: Settings) -> None:
    """Every batch, newest first: one line each."""

    async def main() -> None:
        async with connect(settings=settings) as hive:
            for found in await hive.batches():
                click.echo(f"{_when(found.created_at)}  {summary(found)}")

    _run(main)


@batch.command()
@click.argument("batch_id", metavar="ID")
@bus_options
def cancel(batch_id: str, settings: Settings) -> None:
    """Stop a batch: its queued lines never run; the finished ones stay in its output."""

    async def main() -> None:
        async with connect(settings=settings) as hive:
            click.echo(summary(await hive.cancel_batch(batch_id)))

    _run(main)


@batch.command()
@click.argument("batch_id", metavar="ID")
@click.option(
    "-o", "--output", "output", type=click.File("wb"), default="-", help="write here (default stdout)"
)
@bus_options
def results(batch_id: str, output: Any, settings: Settings) -> None:
    """Every line's result in input order, as JSON Lines (OpenAI's output and error lines merged)."""

    async def main() -> None:
        async with connect(settings=settings) as hive:
            found = await hive.batch(batch_id)
            if not found.done:
                raise click.ClickException(f"batch {batch_id} is {found.status}: results come once it ends")
            async for item in hive.batch_results(batch_id):
                output.write(msgspec.json.encode(item) + b"\n")

    _run(main)


@batch.command()
@click.argument("batch_id", metavar="ID")
@bus_options
def errors(batch_id: str, settings: Settings) -> None:
    """The batch's errors: the lines that failed (the error file), or why the batch failed validation."""

    async def main() -> None:
        async with connect(settings=settings) as hive:
            found = await hive.batch(batch_id)
            out = sys.stdout.buffer
            if found.errors is not None:
                for error in found.errors.data:
                    out.write(msgspec.json.encode(error) + b"\n")
            async for item in hive.batch_results(batch_id):
                if item.get("error") is not None or (item.get("response") or {}).get("status_code") != 200:
                    out.write(msgspec.json.encode(item) + b"\n")
            out.flush()

    _run(main)
