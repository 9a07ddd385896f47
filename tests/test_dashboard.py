"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright, against a real
gateway, nats-server and echo worker. The page must load without a console error, show a task submitted
while it is open reaching ``completed`` (its text as text, never as markup), and ask for a token when
the gateway wants one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Error, Page, Route, async_playwright

from hive_bus import Completed, Hive, Running, Settings, TaskRequest
from hive_bus._bus import ensure_events
from hive_bus._embedded import NatsServer
from hive_bus._messages import encoder, new_task_id, now_ms
from hive_bus.bus import open_bus
from hive_bus.services.auth import Tokens
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider

from .conftest import make_settings
from .helpers import running_worker

CHROMIUM = Path("/usr/bin/chromium")
# Flags that work in a container without a display, a GPU or the network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "dashboard-token-0123456789abcdef"
WAIT_MS = 20_000  # for the page to show something; generous, the machine is shared

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"Chromium is not installed at {CHROMIUM}: `make test` installs Debian's chromium with "
        "tests/setup/ensure-chromium.sh when it runs as root or with passwordless sudo, and says why not",
    ),
]


@asynccontextmanager
async def gateway(settings: Settings, tokens: Tokens | None = None) -> AsyncIterator[str]:
    """A gateway on a free loopback port with an echo worker behind it; yields its URL."""
    async with open_bus(settings) as bus, running_worker(bus, "echo", EchoProvider()):
        gw = Gateway(Hive(bus), GatewayOptions(port=0, tokens=tokens or Tokens()))
        async with anyio.create_task_group() as tg:
            await tg.start(gw.serve)
            yield gw.url
            gw.stop()


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    # Playwright launches the given executable with a fresh profile of its own; it downloads nothing.
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def page_of(browser: Browser) -> AsyncIterator[tuple[Page, list[str]]]:
    """A page, and the console errors and uncaught exceptions it shows."""
    page = await browser.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(f"console error: {message.text}")

    def on_page_error(error: Error) -> None:
        problems.append(f"uncaught: {error}")

    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    try:
        yield page, problems
    finally:
        await page.close()  # before the gateway stops: its feed would only be retried


async def submit(url: str, prompt: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=15) as http:
        r = await http.post("/v1/tasks", json={"provider": "echo", "prompt": prompt})
    assert r.status_code == 202, r.text
    task_id: str = r.json()["id"]
    return task_id


async def test_a_task_submitted_while_the_page_is_open_is_shown_completing(settings: Settings) -> None:
    prompt = "Un tuit <img src=x onerror=\"document.title='pwned'\"> sobre <b>NATS</b>"
    async with gateway(settings) as url, chromium() as browser, page_of(browser) as (page, problems):
        await page.goto(url)
        await page.wait_for_selector('body[data-feed="live"]', timeout=WAIT_MS)
        task_id = await submit(url, prompt)
        row = await page.wait_for_selector(
            f'#tasks tr[data-task-id="{task_id}"][data-status="completed"]', timeout=WAIT_MS
        )
        assert row is not None
        assert prompt in await row.inner_text()  # the output, shown as the text it is
        assert await page.locator("#tasks img, #tasks b").count() == 0
        assert await page.title() == "hive-bus"
        # the rest of the board, from the JSON API
        await page.wait_for_selector('#providers tr[data-provider="echo"]', timeout=WAIT_MS)
        worker = await page.wait_for_selector("#workers tr[data-worker]", timeout=WAIT_MS)
        assert worker is not None and "ago" in await worker.inner_text()
        assert await page.locator("#connection").inner_text() == "live"
    assert problems == []


async def test_the_page_asks_for_a_token_when_the_gateway_wants_one(settings: Settings) -> None:
    tokens = Tokens(api=frozenset({TOKEN}))
    async with gateway(settings, tokens) as url, chromium() as browser, page_of(browser) as (page, problems):
        await page.goto(url)
        await page.wait_for_selector("#token-form", state="visible", timeout=WAIT_MS)
        assert await page.locator("#token-refused").is_hidden()
        await page.fill("#token", "not-the-token-0123456789")
        await page.click("#token-form button")
        await page.wait_for_selector("#token-refused", state="visible", timeout=WAIT_MS)
        await page.fill("#token", TOKEN)
        await page.click("#token-form button")
        await page.wait_for_selector('body[data-feed="live"]', timeout=WAIT_MS)
        task_id = await submit(url, "con token", TOKEN)
        await page.wait_for_selector(
            f'#tasks tr[data-task-id="{task_id}"][data-status="completed"]', timeout=WAIT_MS
        )
        assert await page.evaluate("sessionStorage.getItem('hive-bus.token')") == TOKEN
    # the browser reports each 401 answer as a failed resource load; nothing else may go wrong
    assert [p for p in problems if "401" not in p] == []
    assert any("401" in p for p in problems)


@pytest.mark.slow
async def test_a_task_whose_events_were_evicted_shows_it_ended_with_its_output_gone(
    nats_server: NatsServer,
) -> None:
    settings = make_settings(nats_server.url, events_max_bytes=48 * 1024)
    async with gateway(settings) as url, chromium() as browser, page_of(browser) as (page, problems):
        await page.goto(url)
        await page.wait_for_selector('body[data-feed="live"]', timeout=WAIT_MS)
        first = await submit(url, "el primero")
        await page.wait_for_selector(
            f'#tasks tr[data-task-id="{first}"][data-status="completed"]', timeout=WAIT_MS
        )
        async with open_bus(settings) as bus:  # later tasks push its events out
            hive = Hive(bus)
            for _ in range(40):
                assert (await hive.wait(await hive.submit("echo", "x" * 2000), 10)).status == "completed"
            assert (await hive.get(first)).status == "evicted"
            await hive.close()
        await page.click(f'#tasks tr[data-task-id="{first}"] button', timeout=WAIT_MS)
        dialog = page.locator("#task-dialog")
        await dialog.locator('#task-status[data-status="evicted"]').wait_for(timeout=WAIT_MS)
        assert await dialog.locator("#task-output").inner_text() == "(ended; its output is no longer kept)"
        assert "HIVE_EVENTS_MAX_BYTES" in await dialog.locator("#task-meta").inner_text()
        assert await dialog.locator("#task-actions button").count() == 0  # nothing to cancel
        assert "el primero" in await dialog.locator("#task-input").inner_text()
    assert problems == []


async def test_ten_thousand_tasks_keep_the_page_to_a_window_of_rows_and_it_still_answers(
    settings: Settings,
) -> None:
    """Issue 17: the page stays usable with 10,000 recent tasks: it keeps a window of the newest rows
    (``MAX_TASK_ROWS`` in app.js), never all of them, and a click still opens a task's story."""
    async with gateway(settings) as url, chromium() as browser, page_of(browser) as (page, problems):
        await page.goto(url)
        await page.wait_for_selector('body[data-feed="live"]', timeout=WAIT_MS)
        async with open_bus(settings) as bus:
            hive = Hive(bus)
            ids = await hive.submit_many(
                [TaskRequest(provider="echo", prompt=f"post {i}") for i in range(10_000)]
            )
            assert (await hive.wait(ids[-1], timeout_s=60)).status == "completed"
            await hive.close()
        last = f'#tasks tr[data-task-id="{ids[-1]}"][data-status="completed"]'
        # the page reads 20,000 events: on a machine busy with other test processes that takes a while
        await page.wait_for_selector(last, timeout=150_000)
        rows = await page.locator("#tasks tr[data-task-id]").count()
        assert 50 <= rows <= 200, rows  # a window of the newest, not 10,000
        await page.click(f'#tasks tr[data-task-id="{ids[-1]}"] button', timeout=WAIT_MS)
        dialog = page.locator("#task-dialog")
        await dialog.locator('#timeline li[data-status="completed"]').wait_for(timeout=WAIT_MS)
        assert "post 9999" in await dialog.locator("#task-input").inner_text()
    assert problems == []


async def test_a_running_event_after_a_task_ended_leaves_its_row_ended(settings: Settings) -> None:
    """A worker's ``running`` event may be stored after the task's end (a call being abandoned for a
    cancel, a twin delivery whose run another worker completed): the task reads its end, and the page's
    row, which the feed moved to ``running`` again, says so too."""
    async with (
        open_bus(settings) as bus,
        chromium() as browser,
        page_of(browser) as (page, problems),
        anyio.create_task_group() as tg,
    ):
        hive = Hive(bus)
        gw = Gateway(hive, GatewayOptions(port=0))
        await tg.start(gw.serve)
        await page.goto(gw.url)
        await page.wait_for_selector('body[data-feed="live"]', timeout=WAIT_MS)
        names = bus.names
        task_id = await hive.submit("twin", "dos veces")
        done = Completed(
            task_id=task_id, provider="twin", at_ms=now_ms(), attempt=1, worker="w1", output="hecho"
        )
        await bus.js.publish(names.event_subject("twin", task_id, "completed"), encoder.encode(done))
        ended = f'#tasks tr[data-task-id="{task_id}"][data-status="completed"]'
        await page.wait_for_selector(ended, timeout=WAIT_MS)
        late = Running(task_id=task_id, provider="twin", at_ms=now_ms() + 5, attempt=1, worker="w2")
        await bus.js.publish(names.event_subject("twin", task_id, "running"), encoder.encode(late))
        after = await hive.submit("twin", "después")  # after the running event in the same stream
        await page.wait_for_selector(f'#tasks tr[data-task-id="{after}"]', timeout=WAIT_MS)
        assert await page.locator(ended).count() == 1
        assert (await hive.get(task_id)).status == "completed"
        gw.stop()
    assert problems == []


async def test_a_page_opened_while_the_gateway_reads_the_hour_shows_the_hour_once_read(
    settings: Settings,
) -> None:
    """A page whose first look at the hour came while the gateway was still reading it (its answer
    'backfilled': false, the page's '(still reading the hour ...)') updated the last minutes only: the
    note went once the gateway had read it, and the minutes before stayed empty until the page was
    reloaded."""
    async with open_bus(settings) as bus:
        await ensure_events(bus, "echo")
        for i in range(3):  # completed ten minutes ago, before any gateway ran
            done = Completed(
                task_id=new_task_id(),
                provider="echo",
                at_ms=now_ms() - 600_000,
                attempt=1,
                worker="w",
                output=i,
            )
            await bus.js.publish(
                bus.names.event_subject("echo", done.task_id, "completed"), encoder.encode(done)
            )
    first = True

    async def still_reading(route: Route) -> None:  # the page's first look: the gateway not done yet
        nonlocal first
        if not first or "since_ms" in route.request.url:
            await route.continue_()
            return
        first = False
        hour = await (await route.fetch()).json()
        hour["backfilled"], hour["completed"] = False, [0] * len(hour["completed"])
        await route.fulfill(json=hour)

    async with gateway(settings) as url, chromium() as browser, page_of(browser) as (page, problems):
        await page.route("**/v1/stats/history*", still_reading)
        await page.goto(url)
        caption = page.locator("#chart-outcomes figcaption .summary")
        await caption.filter(has_text="0 completed").wait_for(timeout=WAIT_MS)
        await caption.filter(has_text="3 completed").wait_for(timeout=WAIT_MS)
        assert await page.locator("#history-note").inner_text() == ""
    assert problems == []
