"""The dashboard's panels and the API reference in a real browser (Debian's Chromium through Playwright)
against a real gateway, nats-server and workers: what an operator sees.

Fixtures and the browser come from tests/test_dashboard.py. Every test blocks the browser from any
host but the gateway's: the Pi and this machine have no internet, so nothing may load from elsewhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from playwright.async_api import Dialog, Page, Route, expect

from hive_bus import FailNow, FunctionProvider, Hive, Provider, Settings, Task, TaskRequest
from hive_bus._messages import WebhookSpec
from hive_bus.bus import Bus, open_bus
from hive_bus.services.auth import Tokens
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider
from hive_bus.workers.gemini import GeminiProvider
from hive_bus.workers.groq import GroqProvider

from .fakes import ProviderFakes
from .helpers import running_worker
from .test_dashboard import CHROMIUM, TOKEN, WAIT_MS, chromium, gateway, page_of
from .test_webhooks import LOOPBACK, Receiver, _serve_receiver, hooks

KEY = "gsk_good_key_0123456789"

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is not installed at {CHROMIUM}"),
]


def artefact(name: str) -> Path:
    """Where a screenshot goes: ``$HIVE_TEST_ARTEFACTS`` (kept after the run), else a temporary directory."""
    where = Path(os.environ.get("HIVE_TEST_ARTEFACTS") or tempfile.gettempdir()) / "dashboard"
    where.mkdir(parents=True, exist_ok=True)
    return where / name


async def offline(page: Page, url: str) -> list[str]:
    """Abort every request of ``page`` to a host other than the gateway's; returns the aborted URLs."""
    own = urlsplit(url).netloc
    elsewhere: list[str] = []

    async def only_the_gateway(route: Route) -> None:
        target = route.request.url
        if urlsplit(target).scheme in ("data", "blob") or urlsplit(target).netloc == own:
            await route.continue_()
        else:
            elsewhere.append(target)
            await route.abort("internetdisconnected")

    await page.route("**/*", only_the_gateway)
    return elsewhere


async def test_the_api_reference_renders_from_the_gateway_alone_and_takes_a_bearer_token(
    settings: Settings,
) -> None:
    tokens = Tokens(api=frozenset({TOKEN}))
    async with gateway(settings, tokens) as url, chromium() as browser, page_of(browser) as (page, problems):
        elsewhere = await offline(page, url)
        await page.goto(f"{url}/schema")
        # the operations are listed, each one by its method and path
        submit = page.locator(".opblock-post .opblock-summary-path", has_text="/v1/tasks").first
        await submit.wait_for(timeout=WAIT_MS)
        assert await page.locator(".opblock").count() >= 10
        # "Authorize" offers the bearer scheme
        await page.click("button.authorize", timeout=WAIT_MS)
        await page.wait_for_selector(".auth-container input", timeout=WAIT_MS)
        assert "bearer" in (await page.locator(".auth-container").first.inner_text()).lower()
        await page.screenshot(path=artefact("api-reference.png"))
        assert elsewhere == []
        assert problems == []

    async with gateway(settings, tokens) as url, httpx.AsyncClient(base_url=url) as http:
        refused = await http.get("/schema/openapi.json")
        assert refused.status_code == 401  # the document as a route still needs the token
        doc = (await http.get("/schema/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})).json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    assert doc["security"] == [{"bearer": []}]


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes() as f:
        yield f


@asynccontextmanager
async def serving(bus: Bus) -> AsyncIterator[str]:
    """A gateway of ``bus`` on a free loopback port (with its metrics, history and router); its URL."""
    gw = Gateway(Hive(bus), GatewayOptions(port=0))
    async with anyio.create_task_group() as tg:
        await tg.start(gw.serve)
        yield gw.url
        gw.stop()


@asynccontextmanager
async def workers(bus: Bus, **providers: Provider) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        for name, provider in providers.items():
            await stack.enter_async_context(running_worker(bus, name, provider))
        yield


async def post(http: httpx.AsyncClient, **task: Any) -> str:
    r = await http.post("/v1/tasks", json=task)
    assert r.status_code == 202, r.text
    task_id: str = r.json()["id"]
    return task_id


async def finished(http: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    view: dict[str, Any] = (await http.get(f"/v1/tasks/{task_id}", params={"wait": 30}, timeout=40)).json()
    assert view["status"] in ("completed", "failed"), view
    return view


@pytest.mark.slow
async def test_a_fresh_gateway_charts_the_last_hour_and_a_task_tells_its_whole_story(
    settings: Settings, fakes: ProviderFakes
) -> None:
    # gemini answers a per-minute 429 first, then its daily quota is spent: the task waits, then moves
    fakes.gemini.fail_next(429, 1, retry_after_s=0.5)
    fakes.gemini.daily_quota(0)
    gemini = GeminiProvider(api_key=KEY, base_url=fakes.gemini_base_url)
    groq = GroqProvider(api_key=KEY, base_url=fakes.groq_base_url)
    prompt = "Un hilo sobre <b>colas</b> y límites"
    async with open_bus(settings) as bus, workers(bus, gemini=gemini, groq=groq):
        async with serving(bus) as first, httpx.AsyncClient(base_url=first) as http:
            moved = await post(
                http, provider="gemini", prompt=prompt, fallback=["groq"], metadata={"campaign": "otoño"}
            )
            others = [await post(http, provider="groq", prompt=f"tuit {i}") for i in range(3)]
            views = [await finished(http, t) for t in [moved, *others]]
        assert [(v["status"], v["provider"]) for v in views] == [("completed", "groq")] * 4

        # a gateway started afterwards reads the hour from the bus: its page shows the run at once
        async with serving(bus) as url, chromium() as browser, page_of(browser) as (page, problems):
            elsewhere = await offline(page, url)
            await page.goto(url)
            outcomes = page.locator("#chart-outcomes")
            await outcomes.locator("canvas").first.wait_for(timeout=WAIT_MS)
            # a locator's wait: a string for wait_for_function is eval'd in the page once it polls, which
            # the dashboard's policy (script-src 'self') refuses; it failed whenever the chart came late
            await expect(outcomes.locator(".summary")).to_have_text("4 completed, 0 failed", timeout=WAIT_MS)
            assert await page.locator("#chart-rate-limited .summary").inner_text() == "1 in the hour"
            for chart in ("#chart-depth", "#chart-e2e", "#chart-wait"):
                assert await page.locator(f"{chart} canvas").count() >= 1
            assert int(await outcomes.get_attribute("data-points") or 0) == 60
            await page.set_viewport_size({"width": 1400, "height": 900})
            await page.screenshot(path=artefact("board.png"), full_page=True)
            assert "p95 up to" in await page.locator("#chart-e2e .summary").inner_text()

            # the moved task's story: what it asked, each wait with the provider's words, the move, the end
            await page.click(f'#tasks tr[data-task-id="{moved}"] button', timeout=WAIT_MS)
            dialog = page.locator("#task-dialog")
            await dialog.locator('#timeline li[data-status="completed"]').wait_for(timeout=WAIT_MS)
            assert prompt in await dialog.locator("#task-input").inner_text()
            assert await dialog.locator("#task-input b").count() == 0  # text, never markup
            assert "otoño" in await dialog.locator("#task-facts").inner_text()  # its metadata
            steps = await dialog.locator("#timeline li").evaluate_all(
                "items => items.map(i => i.dataset.status)"
            )
            assert steps[0] == "queued" and steps[-1] == "completed"
            assert "retrying" in steps and "moved" in steps and steps.index("retrying") < steps.index("moved")
            wait = await dialog.locator('#timeline li[data-status="retrying"]').first.inner_text()
            assert "rate_limit" in wait and "the provider said:" in wait
            move = await dialog.locator('#timeline li[data-status="moved"]').inner_text()
            assert "moved from gemini to groq" in move and "PerDay" in move  # why, in the provider's words
            assert f"reply: {prompt}" in await dialog.locator("#task-output").inner_text()
            meta = await dialog.locator("#task-meta").inner_text()
            assert "tokens in / out" in meta and "cost" in meta
            assert await dialog.locator("#task-status").inner_text() == "completed"
            await page.screenshot(path=artefact("task-story.png"))
            await page.keyboard.press("Escape")
            await dialog.wait_for(state="hidden", timeout=WAIT_MS)
            assert elsewhere == []
        assert problems == []


@pytest.mark.slow
async def test_the_problem_strip_names_a_provider_without_workers_and_dead_letters_are_replayed(
    settings: Settings,
) -> None:
    async def picky(task: Task) -> dict[str, Any]:
        if task.run == 0:
            raise FailNow("the template is missing")
        return {"post": f"done on run {task.run}", "tags": ["nats"]}

    async with (
        open_bus(settings) as bus,
        workers(bus, picky=FunctionProvider(picky)),
        serving(bus) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        stuck = await post(
            http,
            provider="nobody",
            messages=[
                {"role": "system", "content": "Eres breve."},
                {"role": "user", "content": [{"type": "text", "text": "nadie me atiende <i>hoy</i>"}]},
            ],
        )
        dead = [await post(http, provider="picky", prompt=f"plantilla {i}") for i in range(2)]
        assert [(await finished(http, t))["status"] for t in dead] == ["failed", "failed"]
        async with chromium() as browser, page_of(browser) as (page, problems):
            elsewhere = await offline(page, url)
            await page.goto(url)
            # first on the page: the provider whose work waits for nobody, linked to its row
            entry = page.locator('#problems li[data-kind="no_worker"][data-provider="nobody"]')
            await entry.wait_for(timeout=WAIT_MS)
            assert "1 task(s) wait for nobody and no nobody worker is online" in await entry.inner_text()
            assert await entry.locator("a").get_attribute("href") == "#provider-nobody"
            await page.locator("#provider-nobody").wait_for(timeout=WAIT_MS)
            letters = page.locator('#problems li[data-kind="dead_letters"]')
            await letters.wait_for(timeout=WAIT_MS)
            assert "2 dead letter(s) wait" in await letters.inner_text()
            await page.set_viewport_size({"width": 390, "height": 844})  # a phone
            await page.screenshot(path=artefact("problems-phone.png"))
            await page.set_viewport_size({"width": 1400, "height": 900})
            await letters.locator("a").click()

            # the dead-letter panel: replay one, purge the other (after saying yes)
            await page.locator(f'#dlq-table tr[data-task-id="{dead[0]}"]').wait_for(timeout=WAIT_MS)
            assert (
                "the template is missing"
                in await page.locator(f'#dlq-table tr[data-task-id="{dead[0]}"]').inner_text()
            )
            await page.click(f'#dlq-table tr[data-task-id="{dead[0]}"] button:text("Replay")')
            await page.locator(f'#dlq-table tr[data-task-id="{dead[0]}"]').wait_for(
                state="detached", timeout=WAIT_MS
            )
            replayed = await finished(http, dead[0])
            assert (replayed["status"], replayed["output"]) == (
                "completed",
                {"post": "done on run 1", "tags": ["nats"]},
            )

            asked: list[str] = []

            async def answer(dialog: Dialog) -> None:
                asked.append(dialog.message)
                await dialog.accept()

            page.on("dialog", answer)
            await page.click(f'#dlq-table tr[data-task-id="{dead[1]}"] button:text("Purge…")')
            await page.locator(f'#dlq-table tr[data-task-id="{dead[1]}"]').wait_for(
                state="detached", timeout=WAIT_MS
            )
            assert asked and dead[1] in asked[0]
            await page.locator("#dlq").screenshot(path=artefact("dead-letters.png"))
            assert (await http.get("/v1/dlq")).json() == []

            # the replayed task's story shows both runs and its output as pretty JSON
            await page.click(f'#tasks tr[data-task-id="{dead[0]}"] button', timeout=WAIT_MS)
            timeline = page.locator("#task-dialog #timeline")
            await timeline.locator('li[data-status="completed"]').wait_for(timeout=WAIT_MS)
            steps = await timeline.locator("li").evaluate_all("items => items.map(i => i.dataset.status)")
            assert steps == ["queued", "failed", "queued", "completed"]
            assert '"post": "done on run 1"' in await page.locator("#task-output").inner_text()
            await page.keyboard.press("Escape")

            # a task still queued shows what it asks (here chat messages) before any worker has it
            await page.click(f'#tasks tr[data-task-id="{stuck}"] button', timeout=WAIT_MS)
            question = page.locator("#task-dialog #task-input")
            await question.locator(".message").nth(1).wait_for(timeout=WAIT_MS)
            assert await question.locator(".role").all_inner_texts() == ["system", "user"]
            assert "nadie me atiende <i>hoy</i>" in await question.inner_text()
            assert await page.locator("#task-dialog #timeline li").evaluate_all(
                "items => items.map(i => i.dataset.status)"
            ) == ["queued"]
            assert await page.locator("#task-output").inner_text() == "(not finished yet)"
            assert elsewhere == []
        assert problems == []


async def test_a_queued_task_is_cancelled_from_its_story_after_asking(settings: Settings) -> None:
    async with open_bus(settings) as bus, serving(bus) as url, httpx.AsyncClient(base_url=url) as http:
        waiting = await post(http, provider="nobody", prompt="cancélame")
        async with chromium() as browser, page_of(browser) as (page, problems):
            elsewhere = await offline(page, url)
            await page.goto(url)
            asked: list[str] = []

            async def answer(dialog: Dialog) -> None:
                asked.append(dialog.message)
                await dialog.accept()

            page.on("dialog", answer)
            await page.click(f'#tasks tr[data-task-id="{waiting}"] button', timeout=WAIT_MS)
            story = page.locator("#task-dialog")
            await story.locator('#task-actions button:text("Cancel")').click(timeout=WAIT_MS)
            await story.locator('#timeline li[data-status="cancelled"]').wait_for(timeout=WAIT_MS)
            assert await story.locator("#task-status").inner_text() == "cancelled"
            assert await story.locator('#task-actions button:text("Cancel")').count() == 0
            assert asked == [f"Cancel task {waiting}? A queued task will not run; a running one is stopped."]
            assert problems == [] and elsewhere == []
        view = (await http.get(f"/v1/tasks/{waiting}")).json()
        assert view["status"] == "cancelled"


async def test_batches_show_their_progress_and_one_is_cancelled_after_asking(settings: Settings) -> None:
    lines = "\n".join(
        json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "echo", "messages": [{"role": "user", "content": f"línea {i}"}]}})
        for i in range(3)
    )  # fmt: skip
    async with open_bus(settings) as bus, serving(bus) as url, httpx.AsyncClient(base_url=url) as http:
        uploaded = await http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", lines)})
        assert uploaded.status_code == 200, uploaded.text
        created = await http.post(
            "/v1/batches",
            json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        )  # fmt: skip
        batch_id = created.json()["id"]
        async with chromium() as browser, page_of(browser) as (page, problems):
            elsewhere = await offline(page, url)
            await page.goto(url)
            row = page.locator(f'#batch-table tr[data-batch-id="{batch_id}"][data-status="in_progress"]')
            await row.wait_for(timeout=WAIT_MS)  # no echo worker: its lines wait
            assert "0 / 3" in await row.locator("td.progress").inner_text()
            assert await row.locator("progress").get_attribute("max") == "3"
            asked: list[str] = []

            async def answer(dialog: Dialog) -> None:
                asked.append(dialog.message)
                await dialog.accept()

            page.on("dialog", answer)
            await row.locator('button:text("Cancel…")').click()
            ended = page.locator(f'#batch-table tr[data-batch-id="{batch_id}"][data-status="cancelled"]')
            await ended.wait_for(timeout=WAIT_MS)
            assert await ended.locator("button").count() == 0
            assert asked and asked[0].startswith(f"Cancel batch {batch_id}?")
            assert problems == [] and elsewhere == []


async def test_schedules_show_their_runs_and_are_paused_and_deleted_after_asking(settings: Settings) -> None:
    from hive_bus.workers.echo import EchoProvider

    async with (
        open_bus(settings) as bus,
        serving(bus) as url,
        httpx.AsyncClient(base_url=url) as http,
        workers(bus, echo=EchoProvider()),
    ):
        body = {"every_s": 1, "name": "boletín", "task": {"provider": "echo", "prompt": "cada segundo"}}
        made = await http.post("/v1/schedules", json=body)
        assert made.status_code == 201, made.text
        schedule_id = made.json()["id"]
        async with chromium() as browser, page_of(browser) as (page, problems):
            elsewhere = await offline(page, url)
            await page.goto(url)
            row = page.locator(f'#schedule-table tr[data-schedule-id="{schedule_id}"][data-paused="false"]')
            await row.locator("td.runs button").first.wait_for(timeout=WAIT_MS)  # it fired: a run to open
            assert "@every 1s" in await row.inner_text() and "boletín" in await row.inner_text()
            await page.screenshot(path=artefact("schedules.png"), full_page=True)
            await row.locator("td.runs button").first.click()
            story = page.locator("#task-dialog")
            await story.locator('#timeline li[data-status="completed"]').wait_for(timeout=WAIT_MS)
            assert "schedule_id" in await story.locator("#task-facts").inner_text()
            await page.keyboard.press("Escape")

            await row.locator('button:text("Pause")').click()
            paused = page.locator(f'#schedule-table tr[data-schedule-id="{schedule_id}"][data-paused="true"]')
            await paused.wait_for(timeout=WAIT_MS)
            assert (await http.get(f"/v1/schedules/{schedule_id}")).json()["paused"] is True
            asked: list[str] = []

            async def answer(dialog: Dialog) -> None:
                asked.append(dialog.message)
                await dialog.accept()

            page.on("dialog", answer)
            await paused.locator('button:text("Delete…")').click()
            await page.locator("#schedule-table td.empty").wait_for(timeout=WAIT_MS)
            assert asked and asked[0].startswith("Delete schedule boletín?")
            assert (await http.get(f"/v1/schedules/{schedule_id}")).status_code == 404
            assert problems == [] and elsewhere == []


async def test_failing_webhooks_are_listed_on_the_page_with_its_token(settings: Settings) -> None:
    # The strip's link opens the page's own list, read with the page's token: a link to the JSON route
    # would open in a tab without it (a 401).
    for receiver in _serve_receiver(Receiver(fail_first=100)):
        webhooks = hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK, HIVE_WEBHOOK_RETRY_S="0.2")
        options = GatewayOptions(port=0, tokens=Tokens(api=frozenset({TOKEN})), webhooks=webhooks)
        async with (
            open_bus(settings) as bus,
            running_worker(bus, "echo", EchoProvider()),
            anyio.create_task_group() as tg,
        ):
            gw = Gateway(Hive(bus), options)
            await tg.start(gw.serve)
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=gw.url, headers=auth) as http:
                task_id = await post(http, provider="echo", prompt="avísame", webhook={"url": receiver.url})
                # a bus client's task (no gateway checked it) to a private address: refused, not sent
                private = await Hive(bus).submit_request(
                    TaskRequest(provider="echo", prompt="x", webhook=WebhookSpec(url="http://10.1.2.3/hook"))
                )
                async with chromium() as browser, page_of(browser) as (page, problems):
                    elsewhere = await offline(page, gw.url)
                    await page.goto(gw.url)
                    await page.fill("#token", TOKEN)
                    await page.click("#token-form button")
                    entry = page.locator('#problems li[data-kind="webhooks_failing"]')
                    await expect(entry).to_contain_text("answered 500", timeout=WAIT_MS)
                    assert await entry.locator("a").get_attribute("href") == "#webhooks"
                    await entry.locator("a").click()
                    row = page.locator(
                        f'#webhook-table tr[data-status="failed"]:has(button:text("{task_id}"))'
                    )
                    await expect(row).to_be_visible(timeout=WAIT_MS)
                    cells = await row.locator("td").all_inner_texts()
                    assert cells[2] == "task.completed" and cells[4] == "failed" and cells[5] == "2"
                    assert cells[6] == "answered 500"
                    assert (
                        "/hooks/hive" in cells[3] and "abc" not in cells[3]
                    )  # its query (a token) not shown
                    # the strip counted it and the list showed it not: only retrying and given up
                    await expect(entry).to_contain_text("1 refused in the last day", timeout=WAIT_MS)
                    refused = page.locator(
                        f'#webhook-table tr[data-status="refused"]:has(button:text("{private.id}"))'
                    )
                    await expect(refused).to_be_visible(timeout=WAIT_MS)
                    cells = await refused.locator("td").all_inner_texts()
                    assert cells[3] == "http://10.1.2.3/hook" and cells[5] == "1"
                    assert cells[6].startswith("host 10.1.2.3 is a private address")
                    await page.locator("#webhooks").screenshot(path=artefact("webhooks-failing.png"))
                    assert elsewhere == []
                # the browser reports the first 401 (before the token) as a failed load; nothing else
                assert [p for p in problems if "401" not in p] == []
            gw.stop()
        assert len(receiver.calls) == 2  # the first attempt and its one retry
