"""Fixtures of the fault-injection suite. Every case's ledger figures go into its report's
``user_properties``; tests/conftest.py lists them at the end of the run (``fault ledger`` section)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from ..fakes import ProviderFakes
from .ledger import Figures, Ledger


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
