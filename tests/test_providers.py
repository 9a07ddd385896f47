"""The real provider SDKs (google-genai, groq, anthropic, openai) against fakes that answer as the real
APIs do, run by real workers on a real bus: rate limits are waited out, errors classified, keys kept secret."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import anyio
import msgspec
import pytest

from hive_bus import Hive, Provider, Retrying, TaskRequest, TaskView
from hive_bus._prices import Price, PriceTable
from hive_bus.bus import Bus
from hive_bus.workers.anthropic import AnthropicProvider
from hive_bus.workers.gemini import GeminiProvider
from hive_bus.workers.groq import GroqProvider
from hive_bus.workers.openai import OpenAICompatibleProvider

from .fakes import ProviderFakes
from .helpers import events_of, eventually, running_worker

pytestmark = pytest.mark.anyio

KEY = "sk-test-5ecret-k3y-0123456789"


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes() as f:
        yield f


def make(name: str, fakes: ProviderFakes, key: str = KEY) -> Provider:
    import anthropic

    makers: dict[str, Callable[[], Provider]] = {
        "gemini": lambda: GeminiProvider(api_key=key, base_url=fakes.gemini_base_url),
        "groq": lambda: GroqProvider(api_key=key, base_url=fakes.groq_base_url),
        "anthropic": lambda: AnthropicProvider(anthropic, api_key=key, base_url=fakes.anthropic_base_url),
        "openai": lambda: OpenAICompatibleProvider(
            base_url=fakes.openai_base_url, api_key=key, model="llama3.2"
        ),
    }
    return makers[name]()


PROVIDERS = ["gemini", "groq", "anthropic", "openai"]


@pytest.mark.parametrize("name", PROVIDERS)
async def test_a_burst_larger_than_the_limit_completes_entirely(
    bus: Bus, hive: Hive, fakes: ProviderFakes, name: str
) -> None:
    fake = getattr(fakes, name)
    fake.limit(4, 1.0)
    prompts = [f"post number {i} about coffee" for i in range(12)]
    ids = await hive.submit_many([TaskRequest(provider=name, prompt=p) for p in prompts])
    views: dict[str, TaskView] = {}
    async with running_worker(bus, name, make(name, fakes), concurrency=2):
        with anyio.fail_after(30):
            async for view in hive.results(ids):
                views[view.id] = view
    for task_id, prompt in zip(ids, prompts, strict=True):
        view = views[task_id]
        assert view.status == "completed", view
        assert view.output == f"reply: {prompt}"
        assert view.usage is not None and view.usage.input_tokens > 0 and view.usage.output_tokens > 0
    assert fake.rate_limited >= 1  # the limit was really hit, and waited out


async def test_the_cooldown_is_shared_by_three_workers(bus: Bus, hive: Hive, fakes: ProviderFakes) -> None:
    fakes.groq.limit(4, 1.0)
    ids = await hive.submit_many([TaskRequest(provider="groq", prompt=f"p{i}") for i in range(16)])
    started = anyio.current_time()
    async with (
        running_worker(bus, "groq", make("groq", fakes), concurrency=1),
        running_worker(bus, "groq", make("groq", fakes), concurrency=1),
        running_worker(bus, "groq", make("groq", fakes), concurrency=1),
    ):
        with anyio.fail_after(30):
            done = [view async for view in hive.results(ids)]
    assert sorted(v.output for v in done) == sorted(f"reply: p{i}" for i in range(16))
    windows = math.ceil(anyio.current_time() - started)  # 1 s windows
    # Once one worker is refused, none calls until the window has passed; the calls already in flight
    # then (one per worker here) are all that can be refused. Without the shared cooldown, every worker
    # keeps cycling tasks into 429s until the window opens: dozens per window.
    assert fakes.groq.rate_limited <= 3 * windows, f"{fakes.groq.rate_limited} 429s in {windows} windows"


async def test_a_per_day_quota_waits_for_the_reset_without_hammering(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    fakes.gemini.daily_quota(2)
    ids = [await hive.submit("gemini", f"p{i}", max_attempts=1) for i in range(4)]
    async with running_worker(bus, "gemini", make("gemini", fakes), concurrency=1) as worker:
        for task_id in ids[:2]:
            assert (await hive.wait(task_id, 10)).status == "completed"

        async def refused() -> TaskView | None:
            view = await hive.get(ids[2])
            return view if view.status == "retrying" else None

        view = await eventually(refused, 10, "the task over the daily quota to wait")
        assert worker.cooldowns.records["default"].quota == "day"
        assert worker.cooldowns.wait_s() > 60

        async def told_to_wait() -> TaskView | None:
            later = await hive.get(ids[3])
            return later if later.status == "retrying" else None

        # the next task is not called at all: it is told why it waits, and until when
        later = await eventually(told_to_wait, 10, "the task behind the spent quota to be told to wait")
        assert later.next_try_at_ms is not None and later.next_try_at_ms - later.updated_at_ms > 60_000
    assert fakes.gemini.rate_limited == 1  # one 429, not one per task or per retry
    assert view.reason == "rate_limit"
    assert "per-day" in (view.error or "")
    assert view.next_try_at_ms is not None and view.next_try_at_ms - view.updated_at_ms > 60_000
    retrying = [e for e in await events_of(bus, ids[2]) if isinstance(e, Retrying)]
    assert retrying[-1].quota == "day"


async def test_groq_daily_limit_waits_as_long_as_groq_says(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    fakes.groq.daily_quota(1)
    first, second = await hive.submit("groq", "one"), await hive.submit("groq", "two")
    async with running_worker(bus, "groq", make("groq", fakes), concurrency=1):
        assert (await hive.wait(first, 10)).status == "completed"

        async def waiting() -> TaskView | None:
            view = await hive.get(second)
            return view if view.status == "retrying" else None

        view = await eventually(waiting, 10, "the second task to wait")
    assert "per-day" in (view.error or "")
    assert view.next_try_at_ms is not None and view.next_try_at_ms - view.updated_at_ms > 60_000


@pytest.mark.parametrize("name", PROVIDERS)
async def test_a_server_error_is_retried_then_completes(
    bus: Bus, hive: Hive, fakes: ProviderFakes, name: str
) -> None:
    getattr(fakes, name).fail_next(500, 1)
    async with running_worker(bus, name, make(name, fakes), backoff_base_s=0.1):
        view = await hive.wait(await hive.submit(name, "hola"), 15)
    assert (view.status, view.output, view.attempt) == ("completed", "reply: hola", 2)


@pytest.mark.parametrize("name", PROVIDERS)
async def test_a_refused_key_fails_at_once_with_a_clear_error(
    bus: Bus, hive: Hive, fakes: ProviderFakes, name: str
) -> None:
    getattr(fakes, name).valid_keys = {"the-right-key-0000"}
    async with running_worker(bus, name, make(name, fakes)):
        view = await hive.wait(await hive.submit(name, "hola", max_attempts=5), 15)
    assert (view.status, view.reason, view.attempt) == ("failed", "permanent", 1)
    assert view.error is not None
    assert view.error.startswith(f"{name} refused the task (401, the API key was refused)")
    assert KEY not in view.error


async def test_usage_and_cost_reach_the_completed_event(bus: Bus, hive: Hive, fakes: ProviderFakes) -> None:
    prices = PriceTable({"llama-3.3-70b-versatile": Price(input_per_mtok=1.0, output_per_mtok=2.0)})
    async with running_worker(bus, "groq", make("groq", fakes), prices=prices):
        view = await hive.wait(await hive.submit("groq", "three words here"), 10)
    assert view.usage is not None
    assert view.model == "llama-3.3-70b-versatile"
    expected = (view.usage.input_tokens * 1.0 + view.usage.output_tokens * 2.0) / 1e6
    assert view.cost_usd == pytest.approx(expected)


async def test_no_api_key_appears_in_events_logs_or_errors(
    bus: Bus, hive: Hive, fakes: ProviderFakes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fakes.groq.limit(1, 0.5)
    fakes.groq.fail_next(500, 1)
    fakes.anthropic.valid_keys = {"another-key-entirely"}
    ids = [await hive.submit("groq", f"p{i}") for i in range(3)] + [await hive.submit("anthropic", "x")]
    async with (
        running_worker(bus, "groq", make("groq", fakes), backoff_base_s=0.1),
        running_worker(bus, "anthropic", make("anthropic", fakes)),
    ):
        with anyio.fail_after(20):
            finals = [view async for view in hive.results(ids)]
        beats = await hive.workers()
    assert len(finals) == 4
    recorded = [msgspec.json.encode(e) for task_id in ids for e in await events_of(bus, task_id)]
    assert any(b"rate_limit" in r for r in recorded) and any(b"401" in r for r in recorded)
    everything = b"\n".join(recorded).decode() + "\n".join(r.getMessage() for r in caplog.records)
    everything += "".join(str(msgspec.json.encode(b)) for b in beats)
    assert KEY not in everything


async def test_the_sdks_standard_base_url_variables_are_honoured(
    bus: Bus, hive: Hive, fakes: ProviderFakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hive_bus.workers import builtin

    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", fakes.gemini_base_url)
    monkeypatch.setenv("GROQ_BASE_URL", fakes.groq_base_url)
    import os

    for name, env in [("gemini", {"GEMINI_API_KEY": KEY}), ("groq", {"GROQ_API_KEY": KEY})]:
        keys = builtin(name, {**os.environ, **env})
        async with running_worker(bus, name, keys):
            view = await hive.wait(await hive.submit(name, "via env"), 10)
        assert view.output == "reply: via env"


@pytest.mark.parametrize("name", PROVIDERS)
async def test_no_answer_at_all_is_retried_later(name: str) -> None:
    from hive_bus import RetryLater, Task

    from .helpers import free_port

    provider = _adapter(name, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    task = Task(id="01JAAAAAAAAAAAAAAAAAAAAAAA", provider=name, prompt="hi", submitted_at_ms=0)
    with pytest.raises(RetryLater, match=f"^{name} did not answer") as caught:
        await provider.complete(task)
    assert KEY not in str(caught.value)
    await provider.aclose()  # type: ignore[attr-defined]


def _anthropic(base_url: str) -> Provider:
    import anthropic

    return AnthropicProvider(anthropic, api_key=KEY, base_url=base_url)


class _NotAnApi(BaseHTTPRequestHandler):
    """A server at the base URL that is not the provider's API: a web server's page, or JSON of
    another shape, or JSON cut short, all with 200."""

    bodies: ClassVar[dict[str, tuple[str, bytes]]] = {
        "html": ("text/html", b"<html><body>Welcome to nginx!</body></html>"),
        "other json": ("application/json", b'{"hello": "world"}'),
        "cut json": ("application/json", b'{"choices": [{"message": '),
    }

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        content_type, body = self.bodies[self.server.answer]  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ResetHeadersOnly(BaseHTTPRequestHandler):
    """An OpenAI-style server whose 429 says when to come back only in its x-ratelimit headers."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b'{"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}'
        self.send_response(429)
        self.send_header("content-type", "application/json")
        self.send_header("x-ratelimit-remaining-requests", "12")
        self.send_header("x-ratelimit-reset-requests", "2h0m0s")
        self.send_header("x-ratelimit-remaining-tokens", "0")
        self.send_header("x-ratelimit-reset-tokens", "41.5s")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _adapter(name: str, base: str) -> Provider:
    """``name``'s adapter with its base URL at ``base`` (an OpenAI-compatible server's under ``/v1``)."""
    makers: dict[str, Callable[[], Provider]] = {
        "gemini": lambda: GeminiProvider(api_key=KEY, base_url=base),
        "groq": lambda: GroqProvider(api_key=KEY, base_url=base),
        "anthropic": lambda: _anthropic(base),
        "openai": lambda: OpenAICompatibleProvider(base_url=base + "/v1", api_key=KEY, model="m"),
    }
    return makers[name]()


@asynccontextmanager
async def _provider_against(
    handler: type[BaseHTTPRequestHandler], name: str, **server_attrs: Any
) -> AsyncIterator[Provider]:
    """``name``'s adapter with its base URL at a loopback server of ``handler`` (``server_attrs`` set on
    the server, for the handler to read)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for attr, value in server_attrs.items():
        setattr(server, attr, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    provider = _adapter(name, f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield provider
    finally:
        await provider.aclose()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", ["groq", "anthropic", "openai"])
async def test_a_429_with_only_the_rate_limit_headers_waits_for_the_spent_limit_reset(name: str) -> None:
    from hive_bus import RetryAfter, Task

    task = Task(id="01JAAAAAAAAAAAAAAAAAAAAAAA", provider=name, prompt="hi", submitted_at_ms=0)
    async with _provider_against(_ResetHeadersOnly, name) as provider:
        with pytest.raises(RetryAfter) as caught:
            await provider.complete(task)
    assert caught.value.retry_after_s == 41.5  # the tokens' reset: the requests have some left
    assert caught.value.quota == "minute"


@pytest.mark.parametrize(
    ("name", "answer"),
    # to google-genai, JSON of another shape is an answer without candidates (a blocked prompt)
    [(n, a) for n in PROVIDERS for a in _NotAnApi.bodies if (n, a) != ("gemini", "other json")],
)
async def test_an_answer_that_is_not_the_api_says_so_and_where(name: str, answer: str) -> None:
    from hive_bus import ProviderError, RetryLater, Task

    task = Task(id="01JAAAAAAAAAAAAAAAAAAAAAAA", provider=name, prompt="hi", submitted_at_ms=0)
    async with _provider_against(_NotAnApi, name, answer=answer) as provider:
        with pytest.raises(ProviderError) as caught:
            await provider.complete(task)
    assert isinstance(caught.value, RetryLater)
    assert str(caught.value).startswith(f"{name} answered 200 with something that is not its API's answer")
    where = "GOOGLE_GEMINI_BASE_URL" if name == "gemini" else f"{name.upper()}_BASE_URL"
    assert str(caught.value).endswith(f"(does {where} point at the API?)")
    assert ("nginx" if answer == "html" else "{") in str(caught.value)
    assert KEY not in str(caught.value)
