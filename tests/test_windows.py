"""Workers on Windows (issue 13, point 7), tested here by running ``hive worker`` end to end with the
POSIX-only facilities that Windows lacks taken away: ``os.fork`` and ``os.register_at_fork``, and the event loop's
``add_signal_handler`` (which anyio's ``open_signal_receiver`` rests on). What Windows does have,
``signal.signal`` for SIGINT, is left as it is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hive_bus import connect
from hive_bus._embedded import NatsServer

from .conftest import make_settings
from .helpers import eventually, hive_cli, spawn, wait_until

pytestmark = pytest.mark.anyio

# Imported by the child's interpreter at start-up (sitecustomize), before hive_bus is.
WINDOWS_LIKE = """
import asyncio.unix_events
import os
import sys

del os.fork, os.register_at_fork  # the standard library checks for fork before it registers
sys.modules["uvloop"] = None  # not installed on Windows (the gateway extra's marker): asyncio's loop


def add_signal_handler(self, sig, callback, *args):
    sys.stderr.write("windows-like: add_signal_handler is not supported\\n")
    raise NotImplementedError


asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler = add_signal_handler
"""


@pytest.fixture
def windows_like(tmp_path: Path) -> dict[str, str]:
    """The environment of a child process whose Python looks like Windows' in what hive-bus uses."""
    site = tmp_path / "windows-like"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WINDOWS_LIKE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path}
    probe = subprocess.run(
        [sys.executable, "-c", "import os, hive_bus; print(hasattr(os, 'register_at_fork'))"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (probe.returncode, probe.stdout.strip()) == (0, "False"), probe.stderr  # import hive_bus works
    return env


@pytest.mark.slow
async def test_ctrl_c_drains_a_worker_where_the_loop_has_no_signal_handlers(
    windows_like: dict[str, str], nats_server: NatsServer, tmp_path: Path
) -> None:
    # the worker's own heartbeat settings (the defaults), so that it and this client agree on the bucket
    settings = make_settings(nats_server.url, heartbeat_interval_s=5.0, heartbeat_ttl_s=15.0)
    log = tmp_path / "worker.log"
    args = ["worker", "win", "--handler", "tests.handlers:slow", "--nats", settings.nats_url]
    proc = spawn([*args, "--prefix", settings.prefix], env=windows_like, log=log)
    try:
        wait_until(lambda: "serving win" in log.read_text() or proc.poll() is not None, 30, "the worker")
        assert proc.poll() is None, log.read_text()
        async with connect(settings=settings) as hive:
            bus = ["--nats", settings.nats_url, "--prefix", settings.prefix]
            submitted = hive_cli(
                ["submit", "win", "una tarea larga", "--payload", '{"delay_s": 4}', *bus], env=windows_like
            )
            assert submitted.returncode == 0, submitted.stderr  # the client, too, runs without fork
            task_id = submitted.stdout.strip()

            async def running() -> bool:
                return (await hive.get(task_id)).status == "running"

            await eventually(running, 15, "the task to be running")
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            assert proc.wait(30) == 0, log.read_text()
            done = await hive.get(task_id)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (done.status, done.output) == ("completed", "slept 4s")  # the task in flight was finished
    text = log.read_text()
    assert "windows-like: add_signal_handler is not supported" in text  # the simulation was in force
    assert "SIGINT received; stopping" in text
    assert "draining 1 task(s)" in text  # the signal came while the task ran
    assert "Traceback" not in text
