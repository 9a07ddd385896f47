"""The ``hive`` command as users run it: ``hive up`` end to end, and errors as one clear line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

from hive_bus import Settings
from hive_bus._client import Hive
from hive_bus._embedded import EmbeddedServerError, NatsServer, memory_limit
from hive_bus._messages import Queued, now_ms
from hive_bus._settings import load_settings
from hive_bus.bus import open_bus

from .helpers import HIVE, REPO, SMALL_BUS_ENV, events_of, free_port, hive_cli, spawn, task_of, wait_until


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    gateway: str
    nats: str
    log: Path

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(20)


def _banner(log: Path) -> re.Match[str] | None:
    return re.search(r"gateway (http://\S+), nats (nats://\S+),", log.read_text())


def hive_up(data: Path, log: Path) -> Up:
    proc = spawn(["up", "--port", "0", "--nats-port", "0", "--data", str(data)], log=log)
    try:
        wait_until(lambda: _banner(log) is not None or proc.poll() is not None, 30, "hive up to start")
    except AssertionError:
        proc.kill()
        raise
    match = _banner(log)
    assert match is not None, log.read_text()
    return Up(proc, match.group(1), match.group(2), log)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    stack = hive_up(tmp_path / "data", tmp_path / "up.log")
    yield stack
    if stack.proc.poll() is None:
        try:
            stack.stop()
        except subprocess.TimeoutExpired:
            stack.proc.kill()
            stack.proc.wait()


def test_hive_up_serves_http_and_the_cli_and_stops_cleanly(up: Up) -> None:
    r = httpx.post(f"{up.gateway}/v1/tasks", json={"provider": "echo", "prompt": "Un guion de vídeo"})
    assert r.status_code == 202
    done = httpx.get(f"{up.gateway}/v1/tasks/{r.json()['id']}", params={"wait": 10}, timeout=15).json()
    assert (done["status"], done["output"]) == ("completed", "Un guion de vídeo")

    submitted = hive_cli(["submit", "echo", "hashtags para café", "--wait", "10", "--nats", up.nats])
    assert submitted.returncode == 0, submitted.stderr
    assert '"status": "completed"' in submitted.stdout
    assert '"output": "hashtags para café"' in submitted.stdout

    task_id = hive_cli(["submit", "echo", "otro", "--nats", up.nats]).stdout.strip()
    status = hive_cli(["status", task_id, "--wait", "10", "--nats", up.nats])
    assert '"status": "completed"' in status.stdout

    listed = hive_cli(["workers", "--nats", up.nats])
    assert listed.returncode == 0
    assert re.search(r"^echo\.\S+\s+echo\s", listed.stdout, re.MULTILINE), listed.stdout

    assert up.stop() == 0
    assert "Traceback" not in up.log.read_text()


def test_a_second_hive_up_on_the_same_data_finds_queued_tasks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = hive_up(data, tmp_path / "up1.log")
    try:
        r = httpx.post(f"{first.gateway}/v1/tasks", json={"provider": "nobody", "prompt": "keep me"})
        task_id = r.json()["id"]
    finally:
        assert first.stop() == 0
    second = hive_up(data, tmp_path / "up2.log")
    try:
        assert httpx.get(f"{second.gateway}/v1/tasks/{task_id}").json()["status"] == "queued"
        worker = spawn(["worker", "nobody", "--handler", "tests.handlers:quick", "--nats", second.nats])
        try:
            done = httpx.get(f"{second.gateway}/v1/tasks/{task_id}", params={"wait": 15}, timeout=20).json()
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(15)
        assert (done["status"], done["output"]) == ("completed", "keep me")
    finally:
        second.stop()


def test_a_killed_hive_up_takes_its_nats_server_with_it(tmp_path: Path) -> None:
    stack = hive_up(tmp_path / "data", tmp_path / "up.log")
    found = re.search(r"nats-server (\d+) listening", stack.log.read_text())
    assert found is not None
    server = psutil.Process(int(found.group(1)))
    stack.proc.kill()
    stack.proc.wait(10)
    gone, _ = psutil.wait_procs([server], timeout=10)
    assert gone, "the embedded nats-server outlived the hive up that started it"


def test_hive_up_gives_its_nats_server_half_the_machines_memory_as_a_soft_limit(up: Up) -> None:
    found = re.search(r"nats-server (\d+) listening", up.log.read_text())
    assert found is not None
    meminfo = Path("/proc/meminfo").read_text()
    total_kib = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1))  # type: ignore[union-attr]
    half = os.environ.get("GOMEMLIMIT") or f"{total_kib * 1024 // 2 // 2**20}MiB"
    assert psutil.Process(int(found.group(1))).environ().get("GOMEMLIMIT") == half


@pytest.mark.parametrize("value", ["1GiB", "768MiB", "1073741824", "1073741824B", "off"])
def test_a_gomemlimit_of_the_environment_is_passed_on(value: str) -> None:
    assert memory_limit({"GOMEMLIMIT": value}) == value


@pytest.mark.parametrize("value", ["1.5GiB", "1 GiB", "1GB", "-1", "lots"])
def test_a_gomemlimit_the_go_runtime_would_not_read_is_refused(value: str) -> None:
    with pytest.raises(EmbeddedServerError, match=f"GOMEMLIMIT='{re.escape(value)}' is not a memory limit"):
        memory_limit({"GOMEMLIMIT": value})


def test_a_bad_gomemlimit_stops_hive_up_with_one_clear_line(tmp_path: Path) -> None:
    args = ["up", "--port", "0", "--nats-port", "0", "--data", str(tmp_path)]
    line = _one_clear_line(hive_cli(args, env={"GOMEMLIMIT": "1.5GiB"}))
    assert "GOMEMLIMIT='1.5GiB' is not a memory limit nats-server reads" in line


def _one_clear_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_nats_down_is_one_clear_line() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    line = _one_clear_line(hive_cli(["submit", "echo", "hi", "--nats", url]))
    assert f"cannot reach NATS at {url}" in line


def test_password_in_the_url_is_never_printed() -> None:
    url = f"nats://alice:s3cr3t-pw@127.0.0.1:{free_port()}"
    result = hive_cli(["workers", "--nats", url])
    line = _one_clear_line(result)
    assert "s3cr3t-pw" not in result.stderr + result.stdout
    assert "***@127.0.0.1" in line


def test_port_taken_is_one_clear_line(nats_server: NatsServer) -> None:
    line = _one_clear_line(hive_cli(["gateway", "--port", str(nats_server.port), "--nats", nats_server.url]))
    assert f"port {nats_server.port} on 127.0.0.1 is taken" in line


def test_nats_port_taken_for_hive_up_is_one_clear_line(nats_server: NatsServer, tmp_path: Path) -> None:
    args = ["up", "--port", "0", "--nats-port", str(nats_server.port), "--data", str(tmp_path)]
    line = _one_clear_line(hive_cli(args))
    assert f"port {nats_server.port} on 127.0.0.1 is taken" in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["worker", "x", "--handler", "no_such_module:fn"], "cannot import module 'no_such_module'"),
        (["worker", "x", "--handler", "tests.handlers:missing"], "has no attribute 'missing'"),
        (["worker", "x", "--handler", "tests.handlers:not_async"], "must be an async function"),
        (["worker", "x", "--handler", "tests.handlers"], "is not of the form package.module:function"),
        (["worker", "gemini-pro"], "no built-in provider 'gemini-pro'"),
        (["submit", "echo", "   "], "invalid task: prompt must be a string with at least one non-blank"),
        (["submit", "a.b", "hi"], "invalid task: provider must be 1-64 letters, digits, '_' or '-'"),
    ],
)
def test_bad_arguments_are_one_clear_line(nats_server: NatsServer, args: list[str], says: str) -> None:
    line = _one_clear_line(hive_cli([*args, "--nats", nats_server.url]))
    assert says in line


@pytest.mark.parametrize(
    ("source", "says"),
    [
        (
            'raise RuntimeError("set MYJOB_TOKEN")\n',
            "cannot import module 'myjob' for handler 'myjob:run': {path}:1: RuntimeError: set MYJOB_TOKEN",
        ),
        (
            "async def run(task) return 1\n",
            "cannot import module 'myjob' for handler 'myjob:run': {path}:1: SyntaxError: expected ':'",
        ),
        (
            "async def run():\n    return 1\n",
            "handler 'myjob:run' must take the task as its one argument (async def run(task): ...): "
            "too many positional arguments",
        ),
        (
            "async def run(task, extra):\n    return 1\n",
            "handler 'myjob:run' must take the task as its one argument (async def run(task): ...): "
            "missing a required argument: 'extra'",
        ),
    ],
)
def test_a_handler_that_cannot_run_is_one_clear_line_naming_it(
    nats_server: NatsServer, tmp_path: Path, source: str, says: str
) -> None:
    module = tmp_path / "myjob.py"
    module.write_text(source)
    args = ["worker", "x", "--handler", "myjob:run", "--nats", nats_server.url]
    line = _one_clear_line(hive_cli(args, env={"PYTHONPATH": str(tmp_path)}, timeout_s=15))
    assert line == "Error: " + says.format(path=module)


@pytest.mark.parametrize("url", ["", " ", ",", "nats://", "nats://:0", "nats://127.0.0.1:99999"])
@pytest.mark.parametrize("command", [["stats"], ["worker", "echo"]])
def test_a_bad_nats_url_is_one_clear_line(command: list[str], url: str) -> None:
    line = _one_clear_line(hive_cli([*command, "--nats", url], timeout_s=10))
    assert line.startswith("Error: invalid setting: HIVE_NATS_URL (--nats)")


def test_an_empty_nats_url_variable_is_one_clear_line() -> None:
    line = _one_clear_line(hive_cli(["stats"], env={"HIVE_NATS_URL": ""}, timeout_s=10))
    assert "HIVE_NATS_URL (--nats) is empty" in line


def test_an_unknown_log_level_is_one_clear_line_listing_the_levels(nats_server: NatsServer) -> None:
    result = hive_cli(["stats", "--nats", nats_server.url], env={"HIVE_LOG_LEVEL": "LOUD"})
    assert result.returncode == 1
    line = _one_clear_line(result)
    assert (
        line
        == "Error: invalid setting HIVE_LOG_LEVEL: 'LOUD' is not a level: give DEBUG, INFO, WARNING, ERROR or CRITICAL"
    )
    result = hive_cli(["--log-level", "LOUD", "stats", "--nats", nats_server.url])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("Error: Invalid value for --log-level: 'LOUD' is not a level")
    )
    assert hive_cli(["--log-level", "warning", "stats", "--nats", nats_server.url]).returncode == 0


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["worker", "echo", "--drain-timeout", "nan"], "--drain-timeout"),
        (["worker", "echo", "--drain-timeout", "-5"], "--drain-timeout"),
        (["worker", "echo", "--drain-timeout", "inf"], "--drain-timeout"),
        (["status", "x", "--wait", "nan"], "--wait"),
        (["submit", "echo", "hi", "--wait", "-1"], "--wait"),
        (["chat", "echo", "hi", "--timeout", "1e300"], "--timeout"),
        (["batch", "create", __file__, "--wait", "--timeout", "nan"], "--timeout"),  # once taken as given
        (["batch", "create", __file__, "--wait", "--timeout", "-1"], "--timeout"),
    ],
)
def test_a_number_of_seconds_out_of_range_is_a_usage_error(args: list[str], option: str) -> None:
    result = hive_cli([*args, "--nats", "nats://127.0.0.1:4222"], timeout_s=10)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: Invalid value for '{option}'")


@pytest.mark.parametrize(
    ("setting", "command"),
    [
        ("HIVE_PRICES_FILE", ["worker", "echo"]),
        ("HIVE_BUDGETS_FILE", ["worker", "echo"]),
        ("HIVE_WEBHOOKS_FILE", ["gateway", "--port", "0"]),
        ("HIVE_WEBHOOK_SECRET_FILE", ["gateway", "--port", "0"]),
        ("HIVE_GATEWAY_TOKENS_FILE", ["gateway", "--port", "0"]),
        ("HIVE_METRICS_TOKEN_FILE", ["gateway", "--port", "0"]),
        ("HIVE_NATS_NKEY_SEED_FILE", ["stats"]),
    ],
)
def test_a_file_that_is_not_text_is_one_clear_line(
    nats_server: NatsServer, tmp_path: Path, setting: str, command: list[str]
) -> None:
    secret = b"s3cr3t-\xff\xfe-content"
    path = tmp_path / "not-text"
    path.write_bytes(secret)
    result = hive_cli([*command, "--nats", nats_server.url], env={setting: str(path)}, timeout_s=20)
    line = _one_clear_line(result)
    assert f"{setting} {path}" in line
    assert "s3cr3t" not in result.stderr + result.stdout


def test_a_seed_file_that_holds_no_seed_is_one_clear_line(nats_server: NatsServer, tmp_path: Path) -> None:
    path = tmp_path / "seed"
    path.write_text("SU" + "A" * 54 + "1\n")  # a seed's length, not its alphabet
    result = hive_cli(["stats", "--nats", nats_server.url], env={"HIVE_NATS_NKEY_SEED_FILE": str(path)})
    assert (
        _one_clear_line(result)
        == f"Error: HIVE_NATS_NKEY_SEED_FILE {path}: not an nkey seed (the file holds one line, the seed, starting SU)"
    )
    assert "AAAA" not in result.stderr


def test_a_token_list_without_a_token_stops_the_gateway(nats_server: NatsServer) -> None:
    result = hive_cli(
        ["gateway", "--port", "0", "--nats", nats_server.url], env={"HIVE_GATEWAY_TOKENS": ","}, timeout_s=15
    )
    assert _one_clear_line(result).startswith("Error: HIVE_GATEWAY_TOKENS holds no token")


@pytest.mark.parametrize(
    ("provider", "env", "says"),
    [
        (
            "gemini",
            {"GEMINI_API_KEYS": "free1=,=AIzaSECRET"},
            "GEMINI_API_KEYS entry 1 (free1): no key after '='",
        ),
        ("gemini", {"GEMINI_API_KEYS": "=AIzaSECRET"}, "GEMINI_API_KEYS entry 1: no key name before '='"),
        ("groq", {"GROQ_API_KEYS": "a=gsk_SECRET,b="}, "GROQ_API_KEYS entry 2 (b): no key after '='"),
        ("anthropic", {"ANTHROPIC_API_KEYS": "=SECRET"}, "ANTHROPIC_API_KEYS entry 1: no key name"),
        (
            "openai",
            {"OPENAI_BASE_URL": "http://127.0.0.1:1/v1", "OPENAI_API_KEYS": "a=SECRET,b="},
            "OPENAI_API_KEYS entry 2 (b)",
        ),
        ("groq", {"GROQ_API_KEY": "gsk_SECRET\nmore"}, "GROQ_API_KEY (key-"),
        (
            "groq",
            {"GROQ_API_KEYS": "paid=gsk_SE CRET"},
            "GROQ_API_KEYS entry 1 (paid): the key holds whitespace",
        ),
        ("gemini", {"GEMINI_API_KEY": "AIzaSECRET\t"}, "GEMINI_API_KEY (key-"),
        (
            "groq",
            {"GROQ_API_KEY": "gsk_SECRET", "GROQ_BASE_URL": "::::"},
            "GROQ_BASE_URL: not an http(s) URL",
        ),
        (
            "gemini",
            {"GEMINI_API_KEY": "AIzaSECRET", "GOOGLE_GEMINI_BASE_URL": "::::"},
            "GOOGLE_GEMINI_BASE_URL: not",
        ),
        (
            "anthropic",
            {"ANTHROPIC_API_KEY": "SECRET", "ANTHROPIC_BASE_URL": "http://h:99999"},
            "ANTHROPIC_BASE_URL: not",
        ),
        ("openai", {"OPENAI_BASE_URL": "::::"}, "OPENAI_BASE_URL: not an http(s) URL"),
    ],
)
def test_a_bad_provider_key_or_base_url_is_one_clear_line(
    nats_server: NatsServer, provider: str, env: dict[str, str], says: str
) -> None:
    result = hive_cli(["worker", provider, "--nats", nats_server.url], env=env, timeout_s=20)
    assert says in _one_clear_line(result)
    assert "SECRET" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("HIVE_WEBHOOK_QUEUE_MAX_BYTES", "99999999999999999999"),
        ("HIVE_WEBHOOK_LOG_MAX_MSGS", str(2**63)),
        ("HIVE_WEBHOOK_LOG_MAX_AGE_S", "1e300"),
        ("HIVE_WEBHOOK_RETRY_S", "1,1e300"),
    ],
)
def test_a_webhook_size_or_duration_too_large_is_one_clear_line(
    nats_server: NatsServer, setting: str, value: str
) -> None:
    result = hive_cli(
        ["gateway", "--port", "0", "--nats", nats_server.url], env={setting: value}, timeout_s=15
    )
    assert _one_clear_line(result).startswith(f"Error: {setting}: {value.split(',')[-1]!r} is more than")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            '[models."gpt-4.1"]\ninput_per_mtok = -1\noutput_per_mtok = 1\n',
            'line 2, key models."gpt-4.1".input_per_mtok: Expected `float` >= 0.0',
        ),
        (
            "[models.m]\ninput_per_mtok = 1\noutput_per_mtok = nan\n",
            "line 3, key models.m.output_per_mtok: Expected `float` >= 0.0",
        ),
        (
            "[models.m]\ninput_per_mtok = inf\noutput_per_mtok = 1\n",
            "line 2, key models.m.input_per_mtok: Expected `float` <= 1000000.0",
        ),
        (
            "[models.m]\ninput_per_mtok = 1e308\noutput_per_mtok = 1\n",
            "line 2, key models.m.input_per_mtok: Expected `float` <= 1000000.0",
        ),
    ],
)
def test_a_price_that_is_negative_or_not_finite_is_named_with_its_line(
    nats_server: NatsServer, tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    result = hive_cli(
        ["worker", "echo", "--nats", nats_server.url], env={"HIVE_PRICES_FILE": str(path)}, timeout_s=15
    )
    assert _one_clear_line(result) == f"Error: HIVE_PRICES_FILE {path}: {says}"


def test_a_budgets_file_error_is_one_line_naming_the_file_and_line(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    path = tmp_path / "budgets.toml"
    path.write_text("[echo]\nrpm = 99999999999999999999\n")
    result = hive_cli(
        ["worker", "echo", "--nats", nats_server.url], env={"HIVE_BUDGETS_FILE": str(path)}, timeout_s=15
    )
    assert _one_clear_line(result) == (
        f"Error: HIVE_BUDGETS_FILE {path}: line 2, key echo.rpm: Expected `int` <= 9223372036854775807"
    )


def test_usage_errors_say_which_option_is_wrong(nats_server: NatsServer) -> None:
    result = hive_cli(["submit", "echo", "hi", "--payload", "{nope", "--nats", nats_server.url])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("Error: Invalid value for --payload: not valid JSON")
    )


def test_a_misspelt_setting_is_refused_naming_the_one_meant(nats_server: NatsServer) -> None:
    result = hive_cli(["workers", "--nats", nats_server.url], env={"HIVE_ACK_WAIT": "5"})
    assert _one_clear_line(result) == "Error: unknown setting(s) HIVE_ACK_WAIT: did you mean HIVE_ACK_WAIT_S?"


def test_another_programs_hive_variables_are_a_warning_not_an_error(nats_server: NatsServer) -> None:
    apache_hive = {"HIVE_HOME": "/opt/hive", "HIVE_CONF_DIR": "/opt/hive/conf"}
    result = hive_cli(["workers", "--nats", nats_server.url], env=apache_hive)
    assert result.returncode == 0, result.stderr
    assert "HIVE_CONF_DIR is not a hive-bus setting; ignored" in result.stderr
    assert "HIVE_HOME is not a hive-bus setting; ignored" in result.stderr
    # a short line each, on every command they run: not a list of every setting
    assert all(len(line) < 200 for line in result.stderr.splitlines()), result.stderr


def test_the_command_is_installed_as_hive_bus_too() -> None:
    result = subprocess.run(
        [Path(HIVE).with_name("hive-bus"), "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "up" in result.stdout, result.stderr


def test_make_run_passes_its_args_to_hive_up() -> None:
    dry = subprocess.run(
        ["make", "-n", "run", 'ARGS=--port 9090 --data /srv/hive'], cwd=REPO, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert ".venv/bin/hive up --port 9090 --data /srv/hive" in dry.stdout


def test_a_second_hive_up_on_a_data_directory_in_use_stops_with_a_clear_error(up: Up, tmp_path: Path) -> None:
    data = Path(re.search(r"data (\S+)/,", up.log.read_text()).group(1))  # type: ignore[union-attr]
    second = hive_cli(["up", "--port", "0", "--nats-port", "0", "--data", str(data)], timeout_s=60)
    line = _one_clear_line(second)
    assert f"another nats-server (started by pid {up.proc.pid}) is using the store {data / 'nats'}" in line
    assert "--data" in line
    # the first one is untouched and serves on
    r = httpx.post(
        f"{up.gateway}/v1/tasks", json={"provider": "echo", "prompt": "sigo aquí"}, params={"wait": 10}
    )
    assert r.status_code in (200, 202), r.text


def test_hive_up_prints_the_lines_that_point_other_terminals_at_it(up: Up) -> None:
    line = f"  export HIVE_NATS_URL={up.nats}"
    wait_until(lambda: line in up.log.read_text().splitlines(), 10, "the export line")
    exported = {"HIVE_NATS_URL": up.nats}
    assert hive_cli(["workers"], env=exported).returncode == 0


def test_setting_of_the_wrong_kind_is_named(nats_server: NatsServer) -> None:
    result = hive_cli(["workers", "--nats", nats_server.url], env={"HIVE_ACK_WAIT_S": "soon"})
    assert "HIVE_ACK_WAIT_S" in _one_clear_line(result)


def test_hive_up_starts_the_providers_that_have_credentials(tmp_path: Path) -> None:
    from .fakes import ProviderFakes

    with ProviderFakes() as fakes:
        env = {"GROQ_API_KEY": "gsk_cli_test_key_123", "GROQ_BASE_URL": fakes.groq_base_url}
        for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL"):
            env[name] = ""
        log = tmp_path / "up.log"
        proc = spawn(
            ["up", "--port", "0", "--nats-port", "0", "--data", str(tmp_path / "d")], env=env, log=log
        )
        try:
            wait_until(lambda: _banner(log) is not None or proc.poll() is not None, 30, "hive up to start")
            text = log.read_text()
            match = _banner(log)
            assert match is not None, text
            assert "workers: echo, groq." in text
            assert (
                "not started: gemini: none of GEMINI_API_KEY, GOOGLE_API_KEY, GEMINI_API_KEYS is set" in text
            )
            assert "not started: anthropic: none of ANTHROPIC_API_KEY, ANTHROPIC_API_KEYS is set" in text
            assert "not started: openai: OPENAI_BASE_URL is not set" in text
            r = httpx.post(f"{match.group(1)}/v1/tasks", json={"provider": "groq", "prompt": "un tuit"})
            done = httpx.get(
                f"{match.group(1)}/v1/tasks/{r.json()['id']}", params={"wait": 10}, timeout=15
            ).json()
            assert (done["status"], done["output"]) == ("completed", "reply: un tuit")
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(20)
        assert "gsk_cli_test_key_123" not in log.read_text()


def test_submit_a_file_of_tasks_then_stats_and_watch(up: Up, tmp_path: Path) -> None:
    watch_log = tmp_path / "watch.log"
    watcher = spawn(["watch", "--nats", up.nats], log=watch_log)
    try:
        tasks = tmp_path / "tasks.jsonl"
        lines = [{"provider": "echo", "prompt": f"tuit {i}"} for i in range(3)] + [
            {"provider": "nobody", "prompt": "x"}
        ]
        tasks.write_text("\n".join(json.dumps(t) for t in lines) + "\n\n")
        time.sleep(1.0)  # let the watcher subscribe
        result = hive_cli(["submit", "--file", str(tasks), "--nats", up.nats])
        assert result.returncode == 0, result.stderr
        ids = [json.loads(line) for line in result.stdout.splitlines()]
        assert [i["line"] for i in ids] == [1, 2, 3, 4]
        assert "4 accepted, 0 not accepted, of 4 tasks" in result.stderr
        for item in ids[:3]:
            assert '"completed"' in hive_cli(["status", item["id"], "--wait", "10", "--nats", up.nats]).stdout
        wait_until(
            lambda: watch_log.read_text().count(" completed ") >= 3, 10, "the watcher to see the completions"
        )
    finally:
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(15) == 0
    assert ids[0]["id"] in watch_log.read_text()
    stats = hive_cli(["stats", "--nats", up.nats]).stdout
    echo = next(line.split() for line in stats.splitlines() if line.startswith("echo"))
    nobody = next(line.split() for line in stats.splitlines() if line.startswith("nobody"))
    assert echo[1:6] == ["0", "0", "0", "3", "0"]  # queued, in flight, retrying, done, failed
    assert nobody[1] == "1" and nobody[6] == "0"  # one queued, no worker


def test_watch_shows_an_output_a_terminal_would_act_on_as_one_line_of_escapes(up: Up, tmp_path: Path) -> None:
    # a model's output (or a provider's error) with a newline, a carriage return and escape sequences
    # (colour, the window's title, erase the line) was written as it was: a line broken in two, a
    # retitled terminal, a line the output rewrote
    watch_log = tmp_path / "watch.log"
    watcher = spawn(["watch", "--provider", "echo", "--nats", up.nats], log=watch_log)
    prompt = "one\ntwo\x1b]0;pwned\x07\r\x1b[2Kfake\u202e"
    sent: list[str] = []

    def seen() -> bool:
        # the watcher shows what happens from when it has subscribed, which a loaded machine makes
        # late: a task a second until one is seen
        if " completed " in watch_log.read_text():
            return True
        if len(sent) <= time.monotonic() - started:
            r = httpx.post(f"{up.gateway}/v1/tasks", json={"provider": "echo", "prompt": prompt})
            sent.append(r.json()["id"])
        return False

    try:
        started = time.monotonic()
        wait_until(seen, 20, "the watcher to see a completion")
    finally:
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(15) == 0
    text = watch_log.read_text()
    lines = [line for line in text.splitlines() if " completed " in line]
    assert lines
    for line in lines:
        task_id = line.split()[1]
        assert task_id in sent, line
        assert line.endswith(
            f"{task_id} echo       completed one\\ntwo\\x1b]0;pwned\\x07\\r\\x1b[2Kfake\\u202e"
        )
    assert not any(c in text for c in "\x1b\x07\r\u202e")


@pytest.mark.parametrize("provider", ["a b", "*", "a.b"])
def test_watch_of_a_provider_that_is_not_a_name_is_one_clear_line(up: Up, provider: str) -> None:
    # it watched for ever, showing nothing: no provider has such a name
    result = hive_cli(["watch", "--provider", provider, "--nats", up.nats], timeout_s=15)
    assert result.returncode == 1
    line = _one_clear_line(result)
    assert line == f"Error: provider {provider!r} must be 1-64 letters, digits, '_' or '-'"


def test_a_bad_line_in_the_file_is_named_and_nothing_is_queued(up: Up, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"provider": "nobody", "prompt": "fine"}\n{"provider": "nobody", "prompt": ""}\n')
    line = _one_clear_line(hive_cli(["submit", "--file", str(tasks), "--nats", up.nats]))
    assert "line 2: prompt must be a string with at least one non-blank character" in line
    stats = hive_cli(["stats", "--nats", up.nats]).stdout
    assert "nobody" not in stats


@pytest.mark.anyio
async def test_keys_clear_puts_a_refused_key_back(nats_server: NatsServer) -> None:
    from hive_bus._cooldown import KeyCooldowns
    from hive_bus.bus import open_bus

    from .conftest import make_settings

    settings = make_settings(nats_server.url)
    # the CLI declares the same bus as the test's settings
    env = {f"HIVE_{name.upper()}": str(getattr(settings, name)) for name in _BUS_SHAPE}
    env |= {"HIVE_NATS_URL": nats_server.url, "HIVE_PREFIX": settings.prefix}
    async with open_bus(settings) as bus:
        cooldowns = KeyCooldowns(bus.nc, bus.providers_kv, bus.names.providers_bucket, "groq", ["k2"])
        await cooldowns.refuse("k2", "401 from the provider", "w1")
        listed = hive_cli(["keys"], env=env)
        assert "groq" in listed.stdout and "refused" in listed.stdout, listed
        cleared = hive_cli(["keys", "--clear", "groq", "k2"], env=env)
        assert (cleared.returncode, cleared.stdout.strip()) == (0, "groq key k2 cleared"), cleared
        assert hive_cli(["keys"], env=env).stdout.strip() == "every key is usable"


@pytest.mark.anyio
async def test_stats_and_keys_show_a_providers_words_as_one_line_of_escapes(nats_server: NatsServer) -> None:
    # a cooldown's reason is what the provider (or a proxy before it) said in its 429: a newline and
    # escape sequences in it went to the operator's terminal as they were, as in hive watch
    from hive_bus._bus import ensure_consumers
    from hive_bus._cooldown import KeyCooldowns

    from .conftest import make_settings

    settings = make_settings(nats_server.url)
    env = {f"HIVE_{name.upper()}": str(getattr(settings, name)) for name in _BUS_SHAPE}
    env |= {"HIVE_NATS_URL": nats_server.url, "HIVE_PREFIX": settings.prefix}
    said = "429 from the proxy\n\x1b]0;pwned\x07\x1b[2K"
    async with open_bus(settings) as bus:
        await ensure_consumers(bus.js, settings, "groq")  # a provider hive stats lists: one served
        await Hive(bus).submit("groq", "un tuit")
        cooldowns = KeyCooldowns(bus.nc, bus.providers_kv, bus.names.providers_bucket, "groq", ["default"])
        await cooldowns.impose("default", now_ms() + 600_000, said, "minute", "w1")
        stats = hive_cli(["stats"], env=env)
        keys = hive_cli(["keys"], env=env)
    escaped = "429 from the proxy\\n\\x1b]0;pwned\\x07\\x1b[2K"
    for listed in (stats, keys):
        assert listed.returncode == 0, listed
        (line,) = [line for line in listed.stdout.splitlines() if line.startswith("groq")]
        assert line.endswith(escaped), line
        assert not any(c in listed.stdout for c in "\x1b\x07")


_BUS_SHAPE = (
    "heartbeat_interval_s",
    "heartbeat_ttl_s",
    "tasks_max_bytes",
    "events_max_bytes",
    "blobs_max_bytes",
)


def test_exit_statuses_say_how_tasks_ended(up: Up, tmp_path: Path) -> None:
    """0: every task completed; 1: one failed; 2: one had not ended when the wait ran out."""
    worker = spawn(["worker", "refuse", "--handler", "tests.handlers:refuse", "--nats", up.nats])
    try:
        done = hive_cli(["submit", "echo", "vale", "--wait", "10", "--nats", up.nats])
        assert done.returncode == 0, done.stderr
        failed = hive_cli(["submit", "refuse", "no", "--wait", "20", "--nats", up.nats], timeout_s=40)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert json.loads(failed.stdout)["status"] == "failed"
        waiting = hive_cli(["submit", "nobody", "espera", "--wait", "0.5", "--nats", up.nats])
        assert waiting.returncode == 2, waiting.stdout + waiting.stderr
        assert json.loads(waiting.stdout)["status"] == "queued"

        # hive status takes many ids, prints one document each in order, and exits for the worst of them
        ids = [json.loads(r.stdout)["id"] for r in (done, failed, waiting)]
        both = hive_cli(["status", ids[0], ids[2], "--nats", up.nats])
        assert both.returncode == 2, both.stderr
        decoder = json.JSONDecoder()
        text, views = both.stdout.strip(), []
        while text:
            view, end = decoder.raw_decode(text)
            views.append(view)
            text = text[end:].strip()
        assert [(v["id"], v["status"]) for v in views] == [(ids[0], "completed"), (ids[2], "queued")]
        assert hive_cli(["status", *ids, "--nats", up.nats]).returncode == 1
        assert hive_cli(["status", ids[0], "--nats", up.nats]).returncode == 0
        # an unknown id among them: the others still printed, then one line naming it, exit 1
        unknown = "01M98Q98WEWYTKN54HM30JNKEQ"
        mixed = hive_cli(["status", ids[0], unknown, "--nats", up.nats])
        assert mixed.returncode == 1 and json.loads(mixed.stdout)["id"] == ids[0], mixed.stdout + mixed.stderr
        assert mixed.stderr.strip().splitlines() == [f"Error: no task {unknown} on the bus"], mixed.stderr
    finally:
        worker.terminate()
        worker.wait(20)


@pytest.mark.anyio
async def test_submit_takes_the_task_policy_flags(up: Up) -> None:
    submitted = hive_cli(
        ["submit", "nobody", "hola", "--priority", "high", "--fallback", "echo", "--fallback", "groq:llama-3.1-8b-instant",
         "--route", "in_order", "--deadline", "600", "--nats", up.nats],
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    async with open_bus(load_settings({}, nats_url=up.nats)) as bus:
        queued = (await events_of(bus, submitted.stdout.strip()))[0]
        task = await task_of(bus, submitted.stdout.strip())
    assert isinstance(queued, Queued)
    assert (task.priority, task.fallback, task.route, task.deadline_s) == (
        "high", ["echo", "groq:llama-3.1-8b-instant"], "in_order", 600.0,
    )  # fmt: skip
    bad = hive_cli(["submit", "echo", "hola", "--priority", "urgent", "--nats", up.nats])
    assert bad.returncode == 2 and "Invalid value for '--priority'" in bad.stderr
    bad = hive_cli(["submit", "echo", "hola", "--fallback", "no such", "--nats", up.nats])
    assert bad.returncode == 1 and "fallback" in bad.stderr, bad.stderr


@pytest.mark.parametrize(
    "command", [["submit", "nobody", "un tuit", "--wait", "60"], ["chat", "nobody", "un tuit"]]
)
def test_ctrl_c_while_waiting_names_the_task_that_goes_on(settings: Settings, command: list[str]) -> None:
    """The task was accepted, and its id is printed only with its end: Ctrl-C on `hive submit --wait` or
    `hive chat` ended the command with status 130 and nothing said, the task queued and its id lost."""
    bus = ["--nats", settings.nats_url, "--prefix", settings.prefix]

    def queued() -> list[str]:
        listed = hive_cli(["list", "--provider", "nobody", *bus]).stdout.splitlines()
        return [json.loads(line)["id"] for line in listed]

    proc = subprocess.Popen(
        [HIVE, *command, *bus],
        cwd=REPO,
        env={**SMALL_BUS_ENV, **os.environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal starts it
    )
    try:
        wait_until(lambda: bool(queued()), 20, "the task to be queued")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    [task_id] = queued()
    assert f"interrupted: task {task_id} goes on (hive status {task_id} --wait S reads its end)" in err
