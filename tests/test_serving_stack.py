"""The serving stack that bench/gateway.py chose (issue 18, point 2): ``hive gateway`` parses HTTP with
httptools and runs on uvloop where they are installed, every ``hive`` command runs on uvloop, and where
either is missing (Windows, a base install, an exotic platform) it falls back to h11 and asyncio's own
loop by itself, saying so once at debug. Asking for a missing one by name is one clear line.

"Not installed" is stood for by a child interpreter in which the module cannot be imported
(``sys.modules[name] = None``, as tests/test_packaging.py does for the extras)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest

from hive_bus import Hive, Settings
from hive_bus.bus import open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.services.limits import ConnectionLimits

from .helpers import free_port, hive_cli, spawn, wait_until

pytestmark = pytest.mark.anyio


def blocking(tmp_path: Path, *modules: str) -> dict[str, str]:
    """The environment of a child whose Python cannot import ``modules``."""
    site = tmp_path / "blocked"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor name in {modules!r}:\n    sys.modules[name] = None\n"
    )
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}


def serve_a_task(settings: Settings, log: Path, env: dict[str, str], *hive_args: str) -> str:
    """Start ``hive [hive_args] gateway``, submit a task over HTTP (202), start a wait for it, stop the
    gateway with SIGTERM while the wait is in flight (the wait still gets its answer, the process ends
    with status 0), and return what it logged."""
    bus = ["--nats", settings.nats_url, "--prefix", settings.prefix]
    proc = spawn([*hive_args, "gateway", "--port", "0", *bus], env=env, log=log)
    try:
        wait_until(lambda: "Ctrl-C stops it" in log.read_text() or proc.poll() is not None, 30, "the gateway")
        found = re.search(r"gateway on (http://\S+),", log.read_text())
        assert found is not None, log.read_text()
        url = found.group(1)
        accepted = httpx.post(f"{url}/v1/tasks", json={"provider": "nobody", "prompt": "hola"})
        assert accepted.status_code == 202, accepted.text
        answers: list[httpx.Response] = []
        task_url = f"{url}/v1/tasks/{accepted.json()['id']}"
        waiting = threading.Thread(
            target=lambda: answers.append(httpx.get(task_url, params={"wait": 2}, timeout=20))
        )
        waiting.start()
        time.sleep(0.5)  # the wait is in flight
        proc.send_signal(signal.SIGTERM)
        waiting.join(20)
        assert [(a.status_code, a.json()["status"]) for a in answers] == [(200, "queued")]
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text, text
    return text


def test_the_gateway_serves_on_httptools_and_uvloop_where_they_are_installed(
    settings: Settings, tmp_path: Path
) -> None:
    text = serve_a_task(settings, tmp_path / "gateway.log", {})
    assert "(uvicorn, httptools, uvloop)" in text, text


def test_without_httptools_and_uvloop_the_gateway_falls_back_and_says_so_once(
    settings: Settings, tmp_path: Path
) -> None:
    env = blocking(tmp_path, "uvloop", "httptools")
    text = serve_a_task(settings, tmp_path / "gateway.log", env, "--log-level", "DEBUG")
    assert "(uvicorn, h11, asyncio)" in text, text
    assert text.count("uvloop is not installed") == 1, text
    assert text.count("httptools is not installed") == 1, text


def test_a_client_command_runs_on_uvloop_and_without_it_on_asyncio(tmp_path: Path) -> None:
    down = ["--nats", f"nats://127.0.0.1:{free_port()}"]
    submit = ["--log-level", "DEBUG", "submit", "echo", "hola", *down]
    on_uvloop = hive_cli(submit)
    assert "event loop: uvloop" in on_uvloop.stderr, on_uvloop.stderr
    on_asyncio = hive_cli(submit, env=blocking(tmp_path, "uvloop"))
    assert "event loop: asyncio" in on_asyncio.stderr, on_asyncio.stderr
    for result in (on_uvloop, on_asyncio):  # the same clear error either way
        assert result.returncode == 1 and "cannot reach NATS" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_asking_by_name_for_what_is_not_installed_is_one_clear_line(tmp_path: Path) -> None:
    env = blocking(tmp_path, "uvloop", "httptools")
    for args, expected in [
        (["--loop", "uvloop", "gateway", "--port", "0"], "Error: --loop uvloop: uvloop is not installed"),
        (
            ["gateway", "--http", "httptools", "--port", "0"],
            "Error: --http httptools: httptools is not installed",
        ),
    ]:
        result = hive_cli([*args, "--nats", f"nats://127.0.0.1:{free_port()}"], env=env)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), result.stderr


def test_the_loop_can_be_chosen_by_environment_variable(tmp_path: Path) -> None:
    down = ["--nats", f"nats://127.0.0.1:{free_port()}"]
    result = hive_cli(["--log-level", "DEBUG", "submit", "echo", "x", *down], env={"HIVE_LOOP": "asyncio"})
    assert "event loop: asyncio" in result.stderr, result.stderr


# the connection limits hold with either parser ----------------------------------------------------


async def _answer_until_closed(port: int, data: bytes, timeout_s: float) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        received = b""
        with anyio.fail_after(timeout_s):
            try:
                await stream.send(data)
                while True:
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_request_head_past_the_limit_is_refused_at_once(settings: Settings, http: str) -> None:
    # a head that never ends, sent faster than its timer (30 s here) could ever stop it
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * (256 * 1024)
    limits = ConnectionLimits(header_timeout_s=30)
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0, limits=limits, http=http))  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            answer = await _answer_until_closed(gateway.port, head, 5)
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
            assert b"request_header_fields_too_large" in answer
            # a large request that is not a head is taken: a POST of 300 kB
            async with httpx.AsyncClient(base_url=gateway.url) as http_client:
                big = {"provider": "nobody", "prompt": "x" * 300_000}
                assert (await http_client.post("/v1/tasks", json=big)).status_code == 202
            gateway.stop()


LIMIT = ConnectionLimits().max_head_bytes


def _head(size: int, *, header_bytes: int = 0, target: str = "/healthz") -> bytes:
    """A GET whose head (line, headers, blank line) is ``size`` bytes: padded by one header, or by as
    many headers of ``header_bytes`` as it takes."""
    line = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
    room = size - len(line) - 2
    if header_bytes:
        count, last = divmod(room, header_bytes)
        fillers = [b"X-%06d: %s\r\n" % (i, b"a" * (header_bytes - 12)) for i in range(count)]
        padding = b"".join(fillers) + (b"X-Last: " + b"a" * (last - 10) + b"\r\n" if last else b"")
    else:
        padding = b"X-Padding: " + b"a" * (room - 13) + b"\r\n"
    head = line + padding + b"\r\n"
    assert len(head) == size, (len(head), size)
    return head


async def _exchange(port: int, pieces: list[bytes], pause_s: float = 0.0) -> bytes:
    """Send ``pieces`` one write each (``pause_s`` apart, so that each is a read of its own), then read
    until the gateway closes the connection; a gateway that closes early ends the writing."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        received = b""
        with anyio.fail_after(10):
            try:
                for piece in pieces:
                    await stream.send(piece)
                    if pause_s:
                        await anyio.sleep(pause_s)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            try:
                while True:
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _too_large(answer: bytes) -> bool:
    """Whether ``answer`` is the gateway's JSON 431, naming the limit."""
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 431 ") or b"content-type: application/json" not in head.lower():
        return False
    error: dict[str, str] = msgspec.json.decode(body)["error"]
    return error == {
        "code": "request_header_fields_too_large",
        "message": f"the request's line and headers are larger than the gateway takes ({LIMIT} bytes)",
    }


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_head_over_the_limit_is_refused_however_its_bytes_arrive(
    settings: Settings, http: str
) -> None:
    over = LIMIT + 4 * 1024
    cases = {
        "one large header, one write": ([_head(70_000)], 0.0),
        "2000 headers of 40 bytes": ([_head(2000 * 40 + 200, header_bytes=40)], 0.0),
        "many small writes": (_pieces(_head(over, header_bytes=40), 1024), 0.002),
        # then a byte at a time across the limit, the head not yet ended: the 431 comes before its end
        "a byte at a time at the end": (
            [_head(over)[: LIMIT - 64], *_pieces(_head(over)[LIMIT - 64 : LIMIT + 64], 1)],
            0.001,
        ),
        "a 100 kB URL": ([_head(100_000 + 200, target="/healthz?q=" + "a" * 100_000)], 0.0),
        "just one byte over": ([_head(LIMIT + 1)], 0.0),
    }
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0, http=http))  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            answers = {case: await _exchange(gateway.port, *sent) for case, sent in cases.items()}
            gateway.stop()
    assert {case: answer[:40] for case, answer in answers.items() if not _too_large(answer)} == {}


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_head_at_the_limit_is_served_however_its_bytes_arrive(settings: Settings, http: str) -> None:
    cases = {
        "one large header, one write": ([_head(LIMIT)], 0.0),
        "small headers, many small writes": (_pieces(_head(LIMIT, header_bytes=40), 1024), 0.002),
        "a byte at a time at the end": ([_head(LIMIT)[:-64], *_pieces(_head(LIMIT)[-64:], 1)], 0.0005),
    }
    if http == "httptools":  # which skips blank lines before a request line (h11 refuses them): no head's end
        cases["after blank lines"] = ([b"\r\n\r\n" + _head(LIMIT)], 0.0)
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0, http=http))  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            answers = {case: await _exchange(gateway.port, *sent) for case, sent in cases.items()}
            assert {case: a[:40] for case, a in answers.items() if not a.startswith(b"HTTP/1.1 200 ")} == {}
            # kept alive: a second head as large as the first, after a first request, is served too
            first = _head(200).replace(b"Connection: close", b"Connection: keep-alive")
            answer = await _exchange(gateway.port, [first, _head(LIMIT)], 0.2)
            assert answer.count(b"HTTP/1.1 200 ") == 2, answer[:300]
            gateway.stop()
