"""A handler's retry policy (issue 16, point 6): a job with side effects runs as often as it says, and
never twice after a crash when it says never; the README's handler example runs as it stands."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from hive_bus import Failed, FunctionProvider, Hive, Retrying, RetryLater, Task, connect, retry_policy
from hive_bus._embedded import NatsServer
from hive_bus.bus import Bus

from . import handlers
from .conftest import make_settings
from .helpers import HIVE, REPO, SMALL_BUS_ENV, events_of, eventually, running_worker, spawn, wait_until

pytestmark = pytest.mark.anyio


async def test_never_runs_a_handler_twice_when_a_later_step_fails(
    bus: Bus, hive: Hive, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    async with running_worker(bus, "wallet", FunctionProvider(handlers.pay_once), backoff_base_s=0.05):
        task_id = await hive.submit("wallet", "payout", payload={"ledger": str(ledger), "then": "raise"})
        view = await hive.wait(task_id, 15)
    assert view.status == "failed" and view.reason == "permanent"
    assert (
        view.error
        == "RuntimeError: verify_tx: the node did not answer (not retried: the handler's retry policy is never)"
    )
    assert ledger.read_text().splitlines() == [task_id]  # paid once


async def test_signalled_retries_what_the_handler_asks_for_and_nothing_else(bus: Bus, hive: Hive) -> None:
    async with running_worker(bus, "strict", FunctionProvider(handlers.strict), backoff_base_s=0.05):
        later = await hive.submit("strict", "later")
        bug = await hive.submit("strict", "bug")
        assert (await hive.wait(later, 15)).output == "done after 2"
        failed = await hive.wait(bug, 15)
    assert (failed.status, failed.reason) == ("failed", "permanent")
    assert failed.error is not None and failed.error.startswith("KeyError: 'missing' (not retried")
    assert handlers.CALLS[bug] == 1


async def test_the_default_policy_retries_any_exception(bus: Bus, hive: Hive) -> None:
    async with running_worker(bus, "lenient", FunctionProvider(handlers.lenient), backoff_base_s=0.05):
        task_id = await hive.submit("lenient", "x")
        assert (await hive.wait(task_id, 15)).output == "done after 2"


async def test_never_with_retry_signals_fails_instead_of_retrying(bus: Bus, hive: Hive) -> None:
    @retry_policy("never")
    async def busy(task: Task) -> str:
        raise RetryLater("busy")

    async with running_worker(bus, "busy", FunctionProvider(busy)):
        view = await hive.wait(await hive.submit("busy", "x"), 15)
    assert (view.status, view.error) == ("failed", "busy (not retried: the handler's retry policy is never)")


def test_an_unknown_policy_is_refused_naming_the_ones_that_exist() -> None:
    with pytest.raises(ValueError, match="retry policy 'sometimes' is not one of any, signalled, never"):
        retry_policy("sometimes")  # type: ignore[arg-type]


@pytest.mark.slow
async def test_a_crash_mid_call_fails_a_never_task_as_interrupted_instead_of_calling_again(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = make_settings(nats_server.url, ack_wait_s=2.0)
    env = {
        "HIVE_PREFIX": settings.prefix,
        "HIVE_ACK_WAIT_S": "2",
        "HIVE_HEARTBEAT_INTERVAL_S": "0.5",
        "HIVE_HEARTBEAT_TTL_S": "1.5",
    }
    args = ["worker", "wallet", "--handler", "tests.handlers:pay_once", "--nats", nats_server.url]
    ledger = tmp_path / "ledger"
    first = spawn(args, env=env, log=tmp_path / "first.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        async with connect(settings=settings) as hive:
            task_id = await hive.submit("wallet", "payout", payload={"ledger": str(ledger)})
            try:
                await eventually(lambda: _paid(ledger), 20, "the first call to pay")
            except TimeoutError:
                raise AssertionError((tmp_path / "first.log").read_text()) from None
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            second = spawn(args, env=env)
            view = await hive.wait(task_id, 30)
            assert (view.status, view.reason) == ("failed", "interrupted"), view
            failed = [e for e in await events_of(hive.bus, task_id) if isinstance(e, Failed)]
            assert len(failed) == 1 and "not called again" in failed[0].error
        assert ledger.read_text().splitlines() == [task_id]  # the second worker did not pay again
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(20)


async def _paid(ledger: Path) -> bool:
    return await anyio.Path(ledger).exists() and bool(await anyio.Path(ledger).read_text())


@pytest.mark.slow
def test_the_readme_handler_example_runs_as_it_stands(nats_server: NatsServer, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Custom handlers") : readme.index("### Writing an adapter")]
    code = re.search(r"```python\n(# wallet\.py\n.*?)```", section, re.DOTALL)
    assert code is not None
    (tmp_path / "wallet.py").write_text(code.group(1))
    commands = [line.strip() for line in section.splitlines() if line.startswith("    hive ")]
    worker_cmd, submit_cmd = (c.replace("nats://pi.local:4222", nats_server.url) for c in commands)
    settings = make_settings(nats_server.url)
    env = {"HIVE_PREFIX": settings.prefix, "HIVE_NATS_URL": nats_server.url}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        worker = subprocess.Popen(
            ["sh", "-c", f"exec {Path(HIVE).parent}/{worker_cmd}"], cwd=tmp_path,
            env={**_env(), **env}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "serving wallet" in log.read_text() or worker.poll() is not None, 30, "the worker")
        done = subprocess.run(
            ["sh", "-c", f"{Path(HIVE).parent}/{submit_cmd}"], cwd=tmp_path,
            env={**_env(), **env}, capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr + log.read_text()
        assert '"output": {\n    "results": [\n      100,\n      10,\n      true\n    ]\n  }' in done.stdout
    finally:
        worker.terminate()
        worker.wait(20)


def _env() -> dict[str, str]:
    return {**SMALL_BUS_ENV, **os.environ}


async def test_a_handler_calling_sys_exit_fails_its_call_not_the_worker(bus: Bus, hive: Hive) -> None:
    calls: list[str] = []

    async def parses_arguments(task: Task) -> str:
        calls.append(task.prompt)
        if len(calls) == 1:
            sys.exit(2)  # what argparse does with arguments it cannot parse
        return task.prompt.upper()

    provider = FunctionProvider(parses_arguments)
    async with running_worker(bus, "script", provider, backoff_base_s=0.05, concurrency=1) as worker:
        view = await hive.wait(await hive.submit("script", "uno"), 15)
        assert not worker._stopping.is_set()
    assert (view.status, view.output, view.attempt) == ("completed", "UNO", 2)
    retried = [e for e in await events_of(bus, view.id) if isinstance(e, Retrying)]
    assert [e.error for e in retried] == ["RuntimeError: the handler called sys.exit(2)"]

    @retry_policy("never")
    async def once(task: Task) -> str:
        sys.exit("bad arguments")

    async with running_worker(bus, "script-once", FunctionProvider(once)):
        failed = await hive.wait(await hive.submit("script-once", "x"), 15)
    assert (failed.status, failed.reason, failed.error) == (
        "failed",
        "permanent",
        "RuntimeError: the handler called sys.exit('bad arguments') (not retried: the handler's retry policy is never)",
    )


async def test_a_timeout_of_the_handler_own_is_reported_as_it_said_not_as_the_call_limit(
    bus: Bus, hive: Hive
) -> None:
    async def queries(task: Task) -> str:
        raise TimeoutError("database at db.local:5432 did not answer in 5s")

    async with running_worker(bus, "report", FunctionProvider(queries), backoff_base_s=0.05):
        view = await hive.wait(await hive.submit("report", "x", max_attempts=1), 15)
    assert (view.status, view.reason) == ("failed", "out_of_attempts")
    assert (
        view.error
        == "out of attempts (1); last error: TimeoutError: database at db.local:5432 did not answer in 5s"
    )

    async def hangs(task: Task) -> str:  # the worker's own limit on a call still says so
        await anyio.sleep(60)
        return "late"

    async with running_worker(bus, "hangs", FunctionProvider(hangs), call_timeout_s=0.5):
        late = await hive.wait(await hive.submit("hangs", "x", max_attempts=1), 15)
    assert late.error == "out of attempts (1); last error: hangs gave no answer within 0.5s"


async def test_an_error_in_a_task_group_of_the_handler_says_what_failed(bus: Bus, hive: Hive) -> None:
    async def fans_out(task: Task) -> list[str]:
        async def fetch(url: str) -> str:
            if url.endswith("2"):
                raise ValueError(f"{url} answered 404")
            return url

        async with asyncio.TaskGroup() as tg:
            pages = [tg.create_task(fetch(f"https://shop.example/{i}")) for i in range(3)]
        return [page.result() for page in pages]

    @retry_policy("signalled")
    async def strict(task: Task) -> list[str]:
        return await fans_out(task)

    async with running_worker(bus, "fan", FunctionProvider(fans_out)):
        view = await hive.wait(await hive.submit("fan", "x", max_attempts=1), 15)
    async with running_worker(bus, "fan-strict", FunctionProvider(strict)):
        failed = await hive.wait(await hive.submit("fan-strict", "x"), 15)
    said = "ExceptionGroup: unhandled errors in a TaskGroup (1 sub-exception): ValueError: https://shop.example/2 answered 404"
    assert view.error == f"out of attempts (1); last error: {said}"
    assert failed.error == f"{said} (not retried: the handler's retry policy is signalled)"


async def test_a_cancelled_error_of_the_handler_own_is_its_failure_not_the_worker_stopping(
    bus: Bus, hive: Hive
) -> None:
    calls: list[str] = []

    async def awaits_a_cancelled_future(task: Task) -> str:
        calls.append(task.prompt)
        if len(calls) == 1:  # what awaiting a future someone else cancelled raises
            raise asyncio.CancelledError()
        return task.prompt.upper()

    provider = FunctionProvider(awaits_a_cancelled_future)
    async with running_worker(bus, "leaky", provider, backoff_base_s=0.05, concurrency=1) as worker:
        first = await hive.wait(await hive.submit("leaky", "uno"), 15)
        second = await hive.wait(await hive.submit("leaky", "dos"), 15)
        assert not worker._stopping.is_set()
    assert (first.status, first.output, first.attempt) == ("completed", "UNO", 2)
    assert (second.status, second.output) == ("completed", "DOS")

    @retry_policy("signalled")
    async def strict(task: Task) -> str:
        raise asyncio.CancelledError()

    async with running_worker(bus, "strict-leaky", FunctionProvider(strict)):
        failed = await hive.wait(await hive.submit("strict-leaky", "x"), 15)
    assert (failed.status, failed.reason, failed.attempt) == ("failed", "permanent", 1)
    assert failed.error == (
        "CancelledError while nothing cancelled the call (not retried: the handler's retry policy is signalled)"
    )
