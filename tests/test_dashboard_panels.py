"""The dashboard's panels and the API reference in a real browser (Debian's Chromium through Playwright)
against a real gateway, nats-server and workers: what an operator sees.

Fixtures and the browser come from tests/test_dashboard.py. Every test blocks the browser from any
host but the gateway's: the Pi and this machine have no internet, so nothing may load from elsewhere.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Page, Route

from hive_bus import Settings
from hive_bus.services.auth import Tokens

from .test_dashboard import CHROMIUM, TOKEN, WAIT_MS, chromium, gateway, page_of

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is not installed at {CHROMIUM}"),
]


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
