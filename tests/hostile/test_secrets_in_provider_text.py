"""Issue 12, point 10: a provider's text that echoes the key (Gemini's ``quotaId`` may hold it) reached
events, dead letters and logs; at DEBUG the SDKs log request and response headers verbatim."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from hive_bus import FailNow, FunctionProvider, Hive, ProviderKey, Task, _redact
from hive_bus.workers import keyed
from hive_bus.workers.gemini import GeminiProvider

from ..fakes import ProviderFakes
from ..faults.dead_letters import assert_dead_lettered
from ..helpers import events_of, running_worker

pytestmark = pytest.mark.anyio

KEY = "AIzaSy-poison-test-k3y-0123456789"


def echoing_provider(key: str) -> FunctionProvider:
    async def refuse(task: Task) -> str:
        # what a provider's 429 or 400 body may say: the quota id with the key in it
        raise FailNow(f"gemini quota exhausted (quotaId: GenerateRequestsPerDay-{key})")

    return FunctionProvider(refuse)


async def test_a_key_a_provider_echoes_reaches_no_event_dead_letter_or_log(
    hive: Hive, caplog: pytest.LogCaptureFixture
) -> None:
    keys: list[ProviderKey] = keyed(
        "echoing", {"ECHOING_KEY": KEY}, ["ECHOING_KEY"], "ECHOING_KEYS", echoing_provider
    )
    caplog.set_level(logging.DEBUG)
    async with running_worker(hive.bus, "echoing", keys):
        task_id = await hive.submit("echoing", "hola")
        view = await hive.wait(task_id, 15)
    assert view.status == "failed"
    assert "quotaId: GenerateRequestsPerDay-***" in (view.error or "")
    for event in await events_of(hive.bus, task_id):
        assert KEY not in repr(event)
    await assert_dead_lettered(hive.bus, "echoing", task_id, "permanent")
    letters = await hive.dead_letters()
    assert letters and all(KEY not in letter.failed.error for letter in letters)
    assert KEY not in caplog.text


@pytest.fixture
def root_log() -> Iterator[io.StringIO]:
    """The root logger at DEBUG as ``hive --log-level DEBUG`` sets it up, written to a buffer."""
    root = logging.getLogger()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    saved = root.level, {n: logging.getLogger(n).level for n in _redact.SDK_LOGGERS}
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    _redact.keep_secrets_out_of_logs()
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes() as f:
        yield f


async def test_no_key_in_the_logs_at_debug(root_log: io.StringIO, fakes: ProviderFakes, hive: Hive) -> None:
    keys = keyed(
        "gemini", {"GEMINI_API_KEY": KEY}, ["GEMINI_API_KEY"], "GEMINI_API_KEYS",
        lambda key: GeminiProvider(api_key=key, base_url=fakes.gemini_base_url),
    )  # fmt: skip
    async with running_worker(hive.bus, "gemini", keys):
        task_id = await hive.submit("gemini", "hola")
        assert (await hive.wait(task_id, 20)).status == "completed"
    logging.getLogger("hive_bus.test").debug("a line that carries the key %s", KEY)  # the filter's net
    text = root_log.getvalue()
    assert "a line that carries the key ***" in text  # it did log at DEBUG, scrubbed
    assert KEY not in text
