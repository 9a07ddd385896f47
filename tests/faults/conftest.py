"""Fixtures of the fault-injection suite, and its report: every case's ledger figures are listed at the
end of the run (``fault ledger`` section), whatever pytest captured."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from ..fakes import ProviderFakes
from .ledger import Figures, Ledger

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
def new_ledger(request: pytest.FixtureRequest) -> Callable[[str], Ledger]:
    """A ledger whose figures go into this run's report, under ``case``."""

    def record(figures: Figures) -> None:
        request.node.user_properties.append(("ledger", figures.line()))

    def make(case: str) -> Ledger:
        return Ledger(case, on_figures=record)

    return make


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # long enough for a publish that waits out a dead server's request timeout
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes(max_lifetime_s=300) as running:
        yield running
        assert running.server_errors == []
