"""What a user reads of a task: its content and metadata in ``GET /v1/tasks/{id}``, the list and ``hive
status``; the list's filters by metadata, batch and schedule; ``hive submit --webhook``."""

from __future__ import annotations

import pytest

from hive_bus import Settings
from hive_bus._messages import Queued
from hive_bus.bus import Bus

from .helpers import events_of, hive_cli

pytestmark = pytest.mark.anyio


def _cli(settings: Settings, *args: str) -> list[str]:
    return [*args, "--nats", settings.nats_url, "--prefix", settings.prefix]


# the test bus's heartbeat settings (conftest.make_settings), which a command checks its buckets against
CLI_ENV = {"HIVE_HEARTBEAT_INTERVAL_S": "0.5", "HIVE_HEARTBEAT_TTL_S": "1.5"}


async def test_submit_webhook_flag_puts_the_url_and_events_on_the_task(bus: Bus, settings: Settings) -> None:
    args = ["submit", "nobody", "un tuit", "--webhook", "https://hooks.example.com/done,task.failed"]
    done = hive_cli(_cli(settings, *args), env=CLI_ENV)
    assert done.returncode == 0, done.stderr
    [queued, *_] = await events_of(bus, done.stdout.strip())
    assert isinstance(queued, Queued) and queued.task.webhook is not None
    assert (queued.task.webhook.url, queued.task.webhook.events) == (
        "https://hooks.example.com/done",
        ["task.failed"],
    )
    every = hive_cli(
        _cli(settings, "submit", "nobody", "x", "--webhook", "https://hooks.example.com/all"), env=CLI_ENV
    )
    [queued, *_] = await events_of(bus, every.stdout.strip())
    assert isinstance(queued, Queued) and queued.task.webhook is not None
    assert queued.task.webhook.events == ["task.completed", "task.failed", "task.cancelled"]


def test_submit_webhook_flag_names_an_unknown_event(settings: Settings) -> None:
    args = ["submit", "nobody", "x", "--webhook", "https://hooks.example.com/h,task.done"]
    done = hive_cli(_cli(settings, *args), env=CLI_ENV)
    assert done.returncode == 2
    assert "--webhook" in done.stderr and "'task.done'" in done.stderr, done.stderr
    bad_url = hive_cli(_cli(settings, "submit", "nobody", "x", "--webhook", "ftp://h/x"), env=CLI_ENV)
    assert bad_url.returncode == 1
    assert "url must be an http:// or https:// URL" in bad_url.stderr, bad_url.stderr
