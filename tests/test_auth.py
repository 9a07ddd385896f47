"""Bearer tokens on the gateway: needed everywhere but the health routes, never echoed, and no open
gateway beyond loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from hive_bus import Hive, Settings
from hive_bus.bus import open_bus
from hive_bus.services.auth import AuthConfigError, Tokens, check_exposure
from hive_bus.services.gateway import Gateway, GatewayOptions

from .helpers import hive_cli

pytestmark = pytest.mark.anyio

TOKEN = "tok-0123456789abcdef-secret"
METRICS_TOKEN = "metrics-0123456789abcdef"


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    tokens = Tokens(api=frozenset({TOKEN, "another-token-0123456789"}), metrics=METRICS_TOKEN)
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0, tokens=tokens))
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            yield gateway.url
            gateway.stop()


async def test_every_route_but_health_needs_a_token(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        for method, path in [
            ("POST", "/v1/tasks"),
            ("GET", "/v1/workers"),
            ("GET", "/v1/tasks"),
            ("GET", "/openapi.json"),
        ]:
            r = await http.request(method, path, json={"provider": "echo", "prompt": "hi"})
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        wrong = await http.get("/v1/workers", headers={"Authorization": f"Bearer {TOKEN}x"})
        assert wrong.status_code == 401
        assert TOKEN not in wrong.text
        ok = await http.post(
            "/v1/tasks",
            json={"provider": "echo", "prompt": "hi"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert ok.status_code == 202
        other = await http.get("/v1/workers", headers={"Authorization": "Bearer another-token-0123456789"})
        assert other.status_code == 200


async def test_the_dashboard_page_is_open_and_the_data_it_reads_is_not(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        for path in ("/", "/dashboard/app.js", "/dashboard/style.css"):
            assert (await http.get(path)).status_code == 200, path
        docs = await http.get("/docs")  # where many servers keep their API reference: it sends there
        assert (docs.status_code, docs.headers["location"]) == (302, "/schema")
        assert (await http.get("/schema")).status_code == 200
        for path in (
            "/v1/events",
            "/v1/usage",
            "/v1/stats",
            "/dashboard/../v1/stats",
            "/dashboard/%2e%2e/v1/stats",
        ):
            assert (await http.get(path)).status_code == 401, path
        async with http.stream("GET", "/v1/events", headers={"Authorization": f"Bearer {TOKEN}"}) as feed:
            assert feed.status_code == 200
            assert feed.headers["content-type"].startswith("text/event-stream")


async def test_metrics_take_their_own_token(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 401
        r = await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert r.status_code == 200
        assert "hive_tasks_submitted_total" in r.text
        assert TOKEN not in r.text and METRICS_TOKEN not in r.text


def test_tokens_from_the_environment_and_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# gateway tokens\nfile-token-0123456789\n\n")
    tokens = Tokens.from_env({"HIVE_GATEWAY_TOKENS": f"{TOKEN}, ", "HIVE_GATEWAY_TOKENS_FILE": str(path)})
    assert tokens.api == {TOKEN, "file-token-0123456789"}
    assert TOKEN not in repr(tokens)
    with pytest.raises(AuthConfigError, match="shorter than 16"):
        Tokens.from_env({"HIVE_GATEWAY_TOKENS": "short"})
    for empty in (",", " , ,"):
        with pytest.raises(AuthConfigError, match="HIVE_GATEWAY_TOKENS holds no token"):
            Tokens.from_env({"HIVE_GATEWAY_TOKENS": empty})
    assert not Tokens.from_env({"HIVE_GATEWAY_TOKENS": ""}).enabled  # set empty: the same as unset
    with pytest.raises(AuthConfigError, match="cannot read HIVE_GATEWAY_TOKENS_FILE"):
        Tokens.from_env({"HIVE_GATEWAY_TOKENS_FILE": str(tmp_path / "missing")})
    with pytest.raises(AuthConfigError, match=r"unknown gateway setting.*HIVE_GATEWAY_TOKEN\b"):
        Tokens.from_env({"HIVE_GATEWAY_TOKEN": TOKEN})


def test_no_token_means_loopback_only() -> None:
    check_exposure("127.0.0.1", Tokens())
    check_exposure("::1", Tokens())
    check_exposure("0.0.0.0", Tokens(api=frozenset({TOKEN})))
    with pytest.raises(AuthConfigError, match=r"refusing to listen on 0\.0\.0\.0 without a token"):
        check_exposure("0.0.0.0", Tokens())
    result = hive_cli(["gateway", "--host", "0.0.0.0", "--port", "0"], env={"HIVE_GATEWAY_TOKENS": ""})
    assert result.returncode == 1
    assert "refusing to listen on 0.0.0.0 without a token" in result.stderr
    assert "Traceback" not in result.stderr
