"""``hive submit --file`` (issue 15, point 4): the flags are defaults for every line (or an error when
they cannot apply), and ``--wait`` prints each result as it ends, in input order with ``--ordered``,
with the exit status of the whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from hive_bus import FailNow, FunctionProvider, Settings, Task
from hive_bus.bus import Bus
from hive_bus.workers.echo import EchoProvider

from .faults.stack import settings_env
from .helpers import hive_cli, running_worker

pytestmark = pytest.mark.anyio


async def picky(task: Task) -> str:
    if "bad" in task.prompt:
        raise FailNow("the prompt is not allowed")
    await anyio.sleep(0.3 if task.prompt.endswith("0") else 0)  # the first line ends last
    return task.prompt.upper()


def _env(settings: Settings) -> dict[str, str]:
    return {**settings_env(settings), "HIVE_NATS_URL": settings.nats_url}


def _write(path: Path, lines: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


async def _cli(args: list[str], settings: Settings) -> Any:
    return await anyio.to_thread.run_sync(lambda: hive_cli(args, env=_env(settings), timeout_s=60))


async def test_submit_file_wait_prints_each_result_with_its_line_and_defaults_apply_to_every_line(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    # PROVIDER and --metadata are defaults: the first lines name no provider
    tasks = _write(tmp_path / "t.jsonl", [
        {"prompt": "post 0"}, {"prompt": "post 1", "metadata": {"n": 1}}, {"prompt": "bad 2"},
        {"provider": "echo", "prompt": "echoed"},
    ])  # fmt: skip
    async with (
        running_worker(bus, "picky", FunctionProvider(picky)),
        running_worker(bus, "echo", EchoProvider()),
    ):
        done = await _cli(
            ["submit", "picky", "--file", tasks, "--wait", "30", "--ordered", "--metadata", '{"run": "x"}'],
            settings,
        )
    assert done.returncode == 1, done.stderr  # a line failed
    got = [json.loads(x) for x in done.stdout.splitlines()]
    assert [(g["line"], g["status"]) for g in got] == [
        (1, "completed"),
        (2, "completed"),
        (3, "failed"),
        (4, "completed"),
    ]
    assert [g.get("output") for g in got] == ["POST 0", "POST 1", None, "echoed"]
    assert "not allowed" in got[2]["error"]
    view = await _cli(["status", got[1]["id"]], settings)
    assert json.loads(view.stdout)["id"] == got[1]["id"]


async def test_submit_file_wait_exits_2_when_a_task_has_not_ended_and_names_flags_that_cannot_apply(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    tasks = _write(
        tmp_path / "t.jsonl", [{"provider": "echo", "prompt": "a"}, {"provider": "nobody", "prompt": "b"}]
    )
    async with running_worker(bus, "echo", EchoProvider()):
        done = await _cli(["submit", "--file", tasks, "--wait", "2"], settings)
    assert done.returncode == 2, done.stderr
    got = {json.loads(x)["line"]: json.loads(x)["status"] for x in done.stdout.splitlines()}
    assert got == {1: "completed", 2: "queued"}
    refused = await _cli(["submit", "--file", tasks, "--key", "k1"], settings)
    assert refused.returncode == 2
    assert "--key cannot apply to every line of --file" in refused.stderr
