"""Fallback on more than quota (issue 16, point 3): a task with ``fallback_on`` moves on instead of dying
when its provider is unavailable or fails, never on the user's own bad request, and its history says
each move and why. The groq SDK talks to its fake, which answers with the statuses it is told."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import pytest

from hive_bus import Hive
from hive_bus._messages import Moved
from hive_bus._router import Router
from hive_bus.bus import Bus
from hive_bus.workers.echo import EchoProvider
from hive_bus.workers.groq import GroqProvider

from .fakes import ProviderFakes
from .helpers import events_of, running_worker

pytestmark = pytest.mark.anyio


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes() as running:
        yield running


@asynccontextmanager
async def groq_then_echo(bus: Bus, fakes: ProviderFakes) -> AsyncIterator[None]:
    groq = GroqProvider(api_key="gsk_fallback_test_0123456789", base_url=fakes.groq_base_url)
    async with (
        anyio.create_task_group() as tg,
        running_worker(bus, "groq", groq, backoff_base_s=0.05, backoff_cap_s=0.1),
        running_worker(bus, "echo", EchoProvider()),
    ):
        await tg.start(Router(bus).run)
        yield
        tg.cancel_scope.cancel()


async def _moves(bus: Bus, task_id: str) -> list[str]:
    return [e.reason for e in await events_of(bus, task_id) if isinstance(e, Moved)]


async def test_unavailable_moves_on_once_the_attempts_are_used_up(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    fakes.groq.fail_next(503, 4)
    async with groq_then_echo(bus, fakes):
        moved = await hive.submit(
            "groq", "hola", fallback=["echo"], fallback_on="unavailable", max_attempts=2
        )
        stays = await hive.submit("groq", "adiós", fallback=["echo"], max_attempts=2)  # quota: the default
        view, failed = await hive.wait(moved, 20), await hive.wait(stays, 20)
    assert (view.status, view.provider, view.output) == ("completed", "echo", "hola")
    (why,) = await _moves(bus, moved)
    assert why.startswith("groq unavailable: out of attempts (2); last error: groq answered 503")
    assert (failed.status, failed.reason, failed.provider) == ("failed", "out_of_attempts", "groq")
    assert fakes.groq.requests == 4


async def test_failed_moves_on_after_any_failure_but_a_bad_request(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    async with groq_then_echo(bus, fakes):
        fakes.groq.fail_next(404, 1)  # the model is not there: another provider may have one
        moved = await hive.submit("groq", "hola", fallback=["echo"], fallback_on="failed")
        view = await hive.wait(moved, 20)
        fakes.groq.fail_next(400, 1)  # the request itself is wrong: no provider would take it
        bad = await hive.wait(await hive.submit("groq", "mal", fallback=["echo"], fallback_on="failed"), 20)
        fakes.groq.fail_next(404, 1)
        unavailable_only = await hive.submit("groq", "x", fallback=["echo"], fallback_on="unavailable")
        kept = await hive.wait(unavailable_only, 20)
    assert (view.status, view.provider) == ("completed", "echo")
    (why,) = await _moves(bus, moved)
    assert why.startswith("groq failed: groq refused the task (404, not found (is the model name right?))")
    assert (bad.status, bad.reason, bad.provider) == ("failed", "permanent", "groq")
    assert bad.error is not None and "(400, bad request)" in bad.error
    assert (kept.status, kept.provider) == ("failed", "groq")


async def test_an_unknown_fallback_on_is_a_clear_error(hive: Hive) -> None:
    from hive_bus._client import validate

    with pytest.raises(Exception, match=r"Invalid enum value 'sometimes' - at `\$.fallback_on`"):
        validate({"provider": "groq", "prompt": "x", "fallback_on": "sometimes"})
