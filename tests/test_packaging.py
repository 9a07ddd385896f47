"""What each role installs (issue 13, points 1 and 2): the base install runs the client and workers,
a missing extra is one line naming the command that installs it, and a handler's directory does not
take the place of installed packages.

A base install is stood for here by a child interpreter in which the extras' modules cannot be
imported (``sys.modules[name] = None``, as Python documents for blocking an import); the wheel test
at the end installs the real wheel into a clean virtualenv."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import zipfile
from importlib.machinery import PathFinder
from pathlib import Path

import httpx
import pytest

from hive_bus import connect
from hive_bus._embedded import NatsServer
from hive_bus._providers import load_handler

from .conftest import make_settings
from .helpers import HIVE, REPO, SMALL_BUS_ENV, eventually, free_port, wait_until

pytestmark = pytest.mark.anyio

EXTRAS_MODULES = (
    "litestar", "uvicorn", "prometheus_client", "httptools", "uvloop", "google.genai", "groq", "openai",
    "anthropic",
)  # fmt: skip
BASE_ONLY = f"import sys\nfor name in {EXTRAS_MODULES!r}:\n    sys.modules[name] = None\n"


# Vendored JavaScript and its licences (hive_bus/services/dashboard/vendor/README.md)
VENDORED = (
    "uplot/uPlot.iife.min.js",
    "uplot/uPlot.min.css",
    "uplot/LICENSE",
    "swagger-ui/swagger-ui-bundle.js",
    "swagger-ui/swagger-ui-standalone-preset.js",
    "swagger-ui/swagger-ui.css",
    "swagger-ui/LICENSE",
)


@pytest.fixture
def base_only(tmp_path: Path) -> dict[str, str]:
    """The environment of a child whose Python has hive-bus without any extra."""
    site = tmp_path / "base-only"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BASE_ONLY)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}


def run_hive(
    args: list[str], *, env: dict[str, str] | None = None, cwd: Path = REPO, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HIVE, *args], cwd=cwd, env={**SMALL_BUS_ENV, **os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=timeout_s, check=False,
    )  # fmt: skip


def start_hive(args: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [HIVE, *args], cwd=cwd, env={**SMALL_BUS_ENV, **os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_without_extras_the_client_commands_run_and_the_gateway_names_its_extra(
    base_only: dict[str, str],
) -> None:
    down = f"nats://127.0.0.1:{free_port()}"
    # an error on the way names what is wrong, without reaching for the gateway's modules
    assert f"cannot reach NATS at {down}" in one_line(
        run_hive(["submit", "echo", "hola", "--nats", down], env=base_only)
    )
    for command in (["gateway", "--port", "0"], ["up", "--port", "0", "--nats-port", "0"]):
        line = one_line(run_hive(command, env=base_only))
        assert line.startswith(f"Error: hive {command[0]} needs the 'gateway' extra"), line
        assert line.endswith("pip install 'hive-bus[gateway]'"), line
    for provider, key in (
        ("gemini", "GEMINI_API_KEY"),
        ("groq", "GROQ_API_KEY"),
        ("openai", "OPENAI_BASE_URL"),
    ):
        line = one_line(run_hive(["worker", provider, "--nats", down], env={**base_only, key: "x"}))
        assert line.startswith(f"Error: {provider}: its SDK is not installed"), line
        assert line.endswith(f"pip install 'hive-bus[{provider}]'"), line
    # with or without its key, as `hive up` says it for every provider it does not start
    for key_env in ({"ANTHROPIC_API_KEY": "x"}, {}):
        line = one_line(run_hive(["worker", "anthropic", "--nats", down], env={**base_only, **key_env}))
        assert line == "Error: anthropic: its SDK is not installed: pip install 'hive-bus[anthropic]'", line


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """A user's project: a handler module beside a ``services`` package of the user's own."""
    project = tmp_path / "project"
    (project / "services").mkdir(parents=True)
    (project / "services" / "__init__.py").write_text(
        'raise ImportError("the user\'s own services package")\n'
    )
    (project / "jobs.py").write_text("async def reverse(task):\n    return task.prompt[::-1]\n")
    return project


def test_a_handler_loads_after_installed_packages(user_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(user_dir)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "jobs", raising=False)
    try:
        load_handler("jobs:reverse")
        ours = PathFinder.find_spec("hive_bus", sys.path)  # by the path alone, whatever is imported
        theirs = PathFinder.find_spec("services", sys.path)
    finally:
        sys.modules.pop("jobs", None)
    # the handler's directory comes after ours, and we hold no top-level name of the user's
    assert ours is not None and ours.origin == str(REPO / "hive_bus" / "__init__.py")
    assert theirs is not None and theirs.origin == str(user_dir / "services" / "__init__.py")


@pytest.mark.slow
async def test_a_worker_started_beside_a_services_package_serves_and_fails_cleanly(
    user_dir: Path, base_only: dict[str, str], nats_server: NatsServer
) -> None:
    down = f"nats://127.0.0.1:{free_port()}"
    failed = run_hive(["worker", "mine", "--handler", "jobs:reverse", "--nats", down], cwd=user_dir)
    assert f"cannot reach NATS at {down}" in one_line(failed)

    settings = make_settings(nats_server.url, heartbeat_interval_s=5.0, heartbeat_ttl_s=15.0)
    log = user_dir.parent / "worker.log"
    args = [
        "worker",
        "mine",
        "--handler",
        "jobs:reverse",
        "--nats",
        settings.nats_url,
        "--prefix",
        settings.prefix,
    ]
    proc = start_hive(args, cwd=user_dir, env=base_only, log=log)  # a base install serves handlers too
    try:
        wait_until(lambda: "serving mine" in log.read_text() or proc.poll() is not None, 30, "the worker")
        assert proc.poll() is None, log.read_text()
        async with connect(settings=settings) as hive:
            task_id = await hive.submit("mine", "café con leche")

            async def completed() -> str | None:
                view = await hive.get(task_id)
                return str(view.output) if view.status == "completed" else None

            assert await eventually(completed, 15, "the task to complete") == "ehcel noc éfac"
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in log.read_text()


def _banner(log: Path) -> str | None:
    found = re.search(r"hive is up: gateway (http://\S+),", log.read_text())
    return found.group(1) if found else None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_wheel_installs_in_a_clean_virtualenv_and_runs_hive_up(tmp_path: Path) -> None:
    def run(*args: str | Path, cwd: Path = tmp_path) -> str:
        done = subprocess.run(
            [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
        return done.stdout

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run(sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", REPO)
    (wheel,) = (tmp_path / "dist").glob("hive_bus-*.whl")
    run(sys.executable, "-m", "venv", tmp_path / "venv")
    bin_dir = tmp_path / "venv" / "bin"
    pip: list[str | Path] = [bin_dir / "python", "-m", "pip", "install", "--quiet"]

    # the base install: the client and the workers, and one clear line for what needs an extra
    run(*pip, wheel)
    where = run(
        bin_dir / "python", "-c",
        "import hive_bus.workers, hive_bus.services; print(hive_bus.workers.__file__, hive_bus.services.__file__)",
    )  # fmt: skip
    assert all(Path(p).is_relative_to(tmp_path / "venv") for p in where.split()), where
    # the wheel puts one name into site-packages: no `services` or `workers` of ours to shadow a user's
    with zipfile.ZipFile(wheel) as whl:
        top = {name.split("/")[0] for name in whl.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"hive_bus"}, top
    # the web assets the dashboard and the API reference load from the gateway itself (no CDN)
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    vendor = "hive_bus/services/dashboard/vendor"
    for asset in VENDORED:
        assert f"{vendor}/{asset}" in names, asset
    hive = str(bin_dir / "hive")
    gateway = subprocess.run(
        [hive, "gateway", "--port", "0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert one_line(gateway).endswith("pip install 'hive-bus[gateway]'")
    worker = subprocess.run(
        [hive, "worker", "gemini"], cwd=tmp_path, env={**env, "GEMINI_API_KEY": "x"}, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert one_line(worker) == "Error: gemini: its SDK is not installed: pip install 'hive-bus[gemini]'"

    # with the gateway's extra: hive up serves a task, and names the extra of a provider it cannot start
    run(*pip, f"{wheel}[gateway]")
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [hive, "up", "--port", "0", "--nats-port", "0", "--data", str(tmp_path / "data")],
            cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1", "GEMINI_API_KEY": "x"},
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: _banner(log) is not None or proc.poll() is not None, 60, "hive up to start")
        url = _banner(log)
        assert url is not None, log.read_text()
        accepted = httpx.post(f"{url}/v1/tasks", json={"provider": "echo", "prompt": "desde la rueda"})
        assert accepted.status_code == 202, accepted.text
        done = httpx.get(f"{url}/v1/tasks/{accepted.json()['id']}", params={"wait": 15}, timeout=20).json()
        assert (done["status"], done["output"]) == ("completed", "desde la rueda")
        for asset in VENDORED:
            assert httpx.get(f"{url}/dashboard/vendor/{asset}").status_code == 200, asset
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert (
        "not started: gemini: its SDK is not installed" in text and "pip install 'hive-bus[gemini]'" in text
    )
    assert "(uvicorn, httptools, uvloop)" in text, text  # the extra brings the serving stack
    assert "Traceback" not in text
