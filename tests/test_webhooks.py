"""Webhooks end to end: a real nats-server, real gateways in this process, real workers, and a receiver on
loopback that checks every signature with the reference ``standardwebhooks`` library."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import httpx
import msgspec
import nats.aio.msg
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from prometheus_client import CollectorRegistry
from standardwebhooks import Webhook

from hive_bus import FunctionProvider, Hive, Settings, TaskRequest
from hive_bus._bus import ensure_events
from hive_bus._messages import Completed, WebhookSpec, encoder, now_ms
from hive_bus._served import NO_WEBHOOKS
from hive_bus.bus import Bus, open_bus
from hive_bus.services.gateway import Gateway, GatewayError, GatewayOptions
from hive_bus.services.webhooks import (
    WebhookConfigError,
    WebhookSettings,
    dispatch,
    load_webhook_settings,
    records,
    urls,
)
from hive_bus.services.webhooks.dispatch import Webhooks
from hive_bus.services.webhooks.records import Delivery
from hive_bus.workers.echo import EchoProvider

from . import handlers
from .helpers import eventually, hive_cli, running_worker

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
LOOPBACK = "127.0.0.0/8"


# the receiver ----------------------------------------------------------------------------------------


@dataclass
class Call:
    headers: dict[str, str]
    body: bytes
    verified: Any  # the payload Webhook.verify returned, or the error it raised


@dataclass
class Receiver:
    """An HTTP server on loopback that answers 500 to its first ``fail_first`` calls, then 204."""

    fail_first: int = 0
    fail_status: int = 500
    location: str | None = None  # sent with a failing answer (a redirect's target)
    calls: list[Call] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/hive?token=abc"

    def answered(self) -> list[Call]:
        return [c for c in self.calls if not isinstance(c.verified, Exception)]

    def ids(self) -> list[str]:
        return [c.headers["webhook-id"] for c in self.calls]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                verified: Any = Webhook(SECRET).verify(body, headers)
            except Exception as exc:
                verified = exc
            receiver.calls.append(Call(headers=headers, body=body, verified=verified))
            failing = len(receiver.calls) <= receiver.fail_first
            self.send_response(receiver.fail_status if failing else 204)
            if failing and receiver.location:
                self.send_header("location", receiver.location)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from _serve_receiver(Receiver())


def _serve_receiver(receiver: Receiver) -> Iterator[Receiver]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    receiver.server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


# the gateway -----------------------------------------------------------------------------------------


def hooks(**env: str) -> WebhookSettings:
    """Webhook settings as the gateway reads them from its environment; fast retries for tests."""
    values = {
        "HIVE_WEBHOOK_SECRET": SECRET,
        "HIVE_WEBHOOK_RETRY_S": "0.3,0.5,0.8,1,1",
        "HIVE_WEBHOOK_QUEUE_MAX_BYTES": str(1024**2),
        "HIVE_WEBHOOK_LOG_MAX_MSGS": "500",
        **env,
    }
    return load_webhook_settings(values)


@dataclass
class Stack:
    bus: Bus
    http: httpx.AsyncClient
    gateway: Gateway


@asynccontextmanager
async def serving(settings: Settings, webhooks: WebhookSettings) -> AsyncIterator[Stack]:
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0, webhooks=webhooks))
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=15) as http:
                yield Stack(bus, http, gateway)
            gateway.stop()


async def deliveries(stack: Stack, **params: str) -> list[dict[str, Any]]:
    r = await stack.http.get("/v1/webhooks/deliveries", params=params)
    assert r.status_code == 200, r.text
    listed: list[dict[str, Any]] = r.json()["deliveries"]
    return listed


async def delivery_in(stack: Stack, status: str, timeout_s: float = 20) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        found = await deliveries(stack, status=status)
        return found[0] if found else None

    return await eventually(probe, timeout_s, f"a delivery {status}")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} is not in the metrics")


# tests -----------------------------------------------------------------------------------------------


async def test_a_failing_receiver_gets_the_same_signed_delivery_until_it_answers(
    settings: Settings, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.fail_first = 3
    async with (
        serving(settings, hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK)) as stack,
        running_worker(stack.bus, "echo", EchoProvider()),
    ):
        r = await stack.http.post(
            "/v1/tasks",
            json={
                "provider": "echo",
                "prompt": "Un tuit sobre NATS",
                "metadata": {"campaign": "winter"},
                "webhook": {"url": receiver.url},
            },
        )
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        # a receiver that fails holds nothing up: the task is completed before it ever answers 2xx
        done = await stack.http.get(f"/v1/tasks/{task_id}", params={"wait": 10})
        assert done.json()["status"] == "completed"
        record = await delivery_in(stack, "delivered")
        metrics = (await stack.http.get("/metrics")).text
        listed = (await stack.http.get("/v1/webhooks/deliveries")).text

    assert len(receiver.calls) == 4
    assert [type(c.verified) for c in receiver.calls] == [dict] * 4  # each verified by the reference code
    assert len(set(receiver.ids())) == 1  # one webhook-id on every retry
    last = receiver.calls[-1]
    assert last.verified["type"] == "task.completed"
    data = last.verified["data"]
    assert (data["id"], data["status"], data["output"]) == (task_id, "completed", "Un tuit sobre NATS")
    assert data["metadata"] == {"campaign": "winter"}
    # the spec's own words, by hand: v1,<base64 HMAC-SHA256 of "id.timestamp.body"> with the secret's bytes
    h = last.headers
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + last.body
    assert (
        h["webhook-signature"]
        == "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    )

    assert record["id"] == h["webhook-id"]
    assert (record["task_id"], record["event"], record["attempts"]) == (task_id, "task.completed", 4)
    assert record["last_status_code"] == 204
    assert "token" not in record["url"]  # the query, where tokens live, is not shown
    assert metric(metrics, 'hive_webhook_deliveries_total{result="retrying"}') == 3
    assert metric(metrics, 'hive_webhook_deliveries_total{result="delivered"}') == 1
    assert metric(metrics, "hive_webhook_deliveries_pending") >= 0
    secret_body = SECRET.removeprefix("whsec_")
    assert all(secret_body not in text for text in (metrics, listed, caplog.text))


async def test_a_retry_lists_its_error_and_next_try(settings: Settings, receiver: Receiver) -> None:
    receiver.fail_first = 100
    async with (
        serving(
            settings, hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK, HIVE_WEBHOOK_RETRY_S="0.2,0.2")
        ) as stack,
        running_worker(stack.bus, "echo", EchoProvider()),
    ):
        r = await stack.http.post(
            "/v1/tasks", json={"provider": "echo", "prompt": "x", "webhook": {"url": receiver.url}}
        )
        retrying = await delivery_in(stack, "retrying")
        failed = await delivery_in(stack, "failed")
        problems = (await stack.http.get("/v1/problems")).json()  # the strip names it, linked
        # the dashboard's list of what is failing: either state, in one read
        either = await stack.http.get("/v1/webhooks/deliveries", params={"status": ["retrying", "failed"]})
        neither = await stack.http.get("/v1/webhooks/deliveries", params={"status": ["delivered", "pending"]})
        wrong = await stack.http.get("/v1/webhooks/deliveries", params={"status": ["failed", "lost"]})
    assert [d["id"] for d in either.json()["deliveries"]] == [failed["id"]]
    assert neither.json()["deliveries"] == []
    assert wrong.status_code == 400 and "status" in wrong.text, wrong.text
    [failing] = [p for p in problems if p["kind"] == "webhooks_failing"]
    assert failing["message"] == (
        "Webhook deliveries are failing: 1 given up in the last day (last: answered 500)."
    ), failing
    assert failing["link"] == "#webhooks"
    assert retrying["last_error"] == "answered 500"
    assert retrying["next_try_at_ms"] > retrying["updated_at_ms"]
    # given up after the last retry: three attempts for two delays
    assert (failed["task_id"], failed["attempts"], failed["status"]) == (r.json()["id"], 3, "failed")
    assert len(receiver.calls) == 3


async def test_a_redirect_is_not_followed(settings: Settings, receiver: Receiver) -> None:
    # a redirect could lead anywhere, a private address too: it is a failed attempt, never followed
    for elsewhere in _serve_receiver(Receiver()):
        receiver.fail_first, receiver.fail_status, receiver.location = 100, 307, elsewhere.url
        async with (
            serving(settings, hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK)) as stack,
            running_worker(stack.bus, "echo", EchoProvider()),
        ):
            await stack.http.post(
                "/v1/tasks", json={"provider": "echo", "prompt": "x", "webhook": {"url": receiver.url}}
            )
            record = await delivery_in(stack, "retrying")
        assert record["last_error"] == "answered 307, a redirect (not followed)"
        assert record["last_status_code"] == 307
        assert elsewhere.calls == []


SSRF = [
    ("http://127.0.0.1:9/hook", "is a loopback address"),
    ("http://10.1.2.3/hook", "is a private address"),
    ("http://169.254.169.254/latest/meta-data/", "is a link-local address"),
    ("http://localhost:8080/hook", "a loopback address"),
    ("http://[::ffff:127.0.0.1]/hook", "a loopback address"),
    ("http://2130706433/hook", "resolves to 127.0.0.1, a loopback address"),
]


@pytest.mark.parametrize(("url", "why"), SSRF)
async def test_private_addresses_are_refused_at_submission(settings: Settings, url: str, why: str) -> None:
    async with serving(settings, hooks()) as stack:
        one = await stack.http.post(
            "/v1/tasks", json={"provider": "echo", "prompt": "x", "webhook": {"url": url}}
        )
        batch = await stack.http.post(
            "/v1/tasks/batch",
            json={
                "tasks": [
                    {"provider": "echo", "prompt": "a"},
                    {"provider": "echo", "prompt": "b", "webhook": {"url": url}},
                ]
            },
        )
        queued = (await stack.bus.js.stream_info(stack.bus.names.tasks_stream)).state.messages
    assert one.status_code == 400
    error = one.json()["error"]
    assert error["field"] == "webhook.url"
    assert why in error["message"] and "HIVE_WEBHOOK_ALLOW_NETWORKS" in error["message"]
    assert batch.status_code == 400
    assert batch.json()["error"]["field"] == "tasks[1].webhook.url"
    assert queued == 0


async def test_what_is_not_an_http_url_or_without_a_secret_is_refused(settings: Settings) -> None:
    async with serving(settings, hooks()) as stack:
        ftp = await stack.http.post(
            "/v1/tasks", json={"provider": "echo", "prompt": "x", "webhook": {"url": "file:///etc/passwd"}}
        )
        unknown = await stack.http.post(
            "/v1/tasks",
            json={
                "provider": "echo",
                "prompt": "x",
                "webhook": {"url": "https://example.com", "events": ["task.done"]},
            },
        )
    assert ftp.status_code == 400
    assert ftp.json()["error"]["field"] == "webhook.url"
    assert "http:// or https://" in ftp.json()["error"]["message"]
    assert unknown.status_code == 400
    assert unknown.json()["error"]["field"] == "webhook.events[0]"
    async with serving(settings, WebhookSettings()) as stack:
        r = await stack.http.post(
            "/v1/tasks", json={"provider": "echo", "prompt": "x", "webhook": {"url": "https://example.com/h"}}
        )
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "webhook"
    assert "HIVE_WEBHOOK_SECRET" in r.json()["error"]["message"]


async def test_the_address_is_checked_again_at_delivery(
    settings: Settings, receiver: Receiver, hive: Hive
) -> None:
    # A task that reached the bus with a loopback webhook (from a bus client, or a name that resolved
    # elsewhere when it was submitted): the gateway that delivers it checks the address again.
    async with (
        serving(settings, hooks()) as stack,
        running_worker(stack.bus, "echo", EchoProvider()),
    ):
        by_name = receiver.url.replace("127.0.0.1", "localhost")
        accepted = await hive.submit_request(
            TaskRequest(provider="echo", prompt="x", webhook=WebhookSpec(url=by_name))
        )
        record = await delivery_in(stack, "refused")
        metrics = (await stack.http.get("/metrics")).text
    assert record["task_id"] == accepted.id
    assert record["attempts"] == 1
    # localhost may resolve to ::1 first: either is loopback
    assert "host localhost resolves to " in record["last_error"]
    assert ", a loopback address" in record["last_error"]
    assert receiver.calls == []
    assert metric(metrics, 'hive_webhook_deliveries_total{result="refused"}') == 1


async def test_a_url_with_a_control_character_is_refused_and_the_gateway_serves_on(
    settings: Settings, receiver: Receiver, hive: Hive
) -> None:
    # A bus client's task (no gateway checks it on the way in) whose webhook URL held a NUL or a DEL:
    # the delivery raised httpx.InvalidURL out of the webhooks' task group, which stopped the gateway,
    # and every gateway started after it, once the delivery came back after AckWait.
    async with (
        serving(settings, hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK)) as stack,
        running_worker(stack.bus, "echo", EchoProvider()),
    ):
        for bad in (f"{receiver.url}\x00", f"{receiver.url}\x7f"):
            await hive.submit_request(TaskRequest(provider="echo", prompt="x", webhook=WebhookSpec(url=bad)))

        async def refused() -> list[dict[str, Any]] | None:
            found = await deliveries(stack, status="refused")
            return found if len(found) == 2 else None

        records = await eventually(refused, 20, "both deliveries refused")
        r = await stack.http.post(
            "/v1/tasks", json={"provider": "echo", "prompt": "x", "webhook": {"url": f"{receiver.url}\x00"}}
        )
        # the gateway serves on: a good webhook is delivered
        await stack.http.post(
            "/v1/tasks", json={"provider": "echo", "prompt": "x", "webhook": {"url": receiver.url}}
        )
        await delivery_in(stack, "delivered")
    assert all("not a valid URL (Invalid non-printable ASCII character" in d["last_error"] for d in records)
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "webhook.url"
    assert "not a valid URL" in r.json()["error"]["message"]
    assert len(receiver.calls) == 1


async def _one_delivery(bus: Bus, webhooks: Webhooks, url: str) -> nats.aio.msg.Msg:
    """A delivery to ``url`` queued as the gateway queues one, and fetched from its consumer."""
    await records.declare(bus, webhooks._settings)
    delivery = Delivery(
        id=f"msg_{secrets.token_hex(8)}", url=url, event="task.completed", task_id="t1",
        created_at_ms=now_ms(), body=msgspec.Raw(b'{"type":"task.completed"}'),
    )  # fmt: skip
    await bus.js.publish(bus.names.webhook_subject(delivery.id), records.encoder.encode(delivery))
    sub = await webhooks._deliveries()
    [msg] = await sub.fetch(1, timeout=5)
    return msg


async def test_a_webhook_to_an_internationalised_name_is_sent_with_its_ascii_name(
    bus: Bus, receiver: Receiver
) -> None:
    # A name such as bücher.example went into the Host header (and the TLS server name) as it was:
    # httpx refused the header ('ascii' codec can't encode), an error no delivery caught, which stopped
    # the gateway. This machine has no DNS for such a name: the address stands in for what it resolves to.
    assert receiver.server is not None
    port = receiver.server.server_address[1]
    url = f"http://bücher.localhost:{port}/hooks/hive"
    target = urls.Target(
        url=url,
        scheme="http",
        host="bücher.localhost",
        port=port,
        addresses=(ipaddress.ip_address("127.0.0.1"),),
    )
    webhooks = Webhooks(bus, hooks())
    delivery = records.delivery_decoder.decode((await _one_delivery(bus, webhooks, url)).data)
    async with httpx.AsyncHTTPTransport() as transport:
        error, code = await webhooks._post(transport, target, delivery)
    assert (error, code) == (None, 204)
    assert receiver.calls[0].headers["host"] == f"xn--bcher-kva.localhost:{port}"


class _Broken(httpx.AsyncBaseTransport):
    """A transport that fails as no HTTP error does: what a bug in a delivery raises."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise RuntimeError(f"bug while sending to {request.url} with {request.headers['webhook-signature']}")


async def test_an_unexpected_error_in_a_delivery_is_logged_counted_and_retried(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing but a refused address or an HTTP error was caught in a delivery: anything else went up
    # through the webhooks' task group and stopped the gateway. Now such an attempt fails as a failed
    # POST does, and the log names it without the URL's credentials, its query or the signature.
    registry = CollectorRegistry()
    webhooks = Webhooks(bus, hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK), registry)
    msg = await _one_delivery(bus, webhooks, "http://user:hunter2@127.0.0.1:9/hook?token=abc")
    with caplog.at_level(logging.INFO, logger="hive_bus.webhooks"):
        await webhooks._deliver(_Broken(), msg)  # type: ignore[arg-type]
    [record] = await records.recent(bus)
    assert record.status == "retrying" and record.attempts == 1
    assert record.last_error == "unexpected error in the gateway (RuntimeError); see its log"
    assert registry.get_sample_value("hive_webhook_delivery_errors_total") == 1
    assert registry.get_sample_value("hive_webhook_deliveries_total", {"result": "retrying"}) == 1
    logged = caplog.text
    assert "unexpected RuntimeError at test_webhooks.py:" in logged and "http://127.0.0.1:9/hook?…" in logged
    assert "hunter2" not in logged and "token=abc" not in logged and "v1," not in logged
    again = await webhooks._deliveries()
    [back] = await again.fetch(1, timeout=5)  # after its first retry delay (0.3 s), as a failed POST
    assert back.metadata.num_delivered == 2


async def test_a_gateway_wide_webhook_to_a_private_address_stops_the_start(settings: Settings) -> None:
    webhooks = hooks(HIVE_WEBHOOKS='[[webhook]]\nurl = "http://192.168.1.10/hook"')
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0, webhooks=webhooks))
        with pytest.raises(GatewayError, match=r"192\.168\.1\.10 is a private address"):
            await gateway.serve()


async def test_gateway_wide_webhooks_get_the_events_they_ask_for(
    settings: Settings, receiver: Receiver
) -> None:
    inline = f'[[webhook]]\nurl = "{receiver.url}"\nevents = ["task.failed"]'
    async with (
        serving(settings, hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK, HIVE_WEBHOOKS=inline)) as stack,
        running_worker(stack.bus, "echo", EchoProvider()),
        running_worker(stack.bus, "refuser", FunctionProvider(handlers.refuse)),
    ):
        # its own webhook wants failures only: a completion is announced to no one
        only_failures = {"url": receiver.url, "events": ["task.failed"]}
        ok = await stack.http.post(
            "/v1/tasks", json={"provider": "echo", "prompt": "fine", "webhook": only_failures}
        )
        bad = await stack.http.post("/v1/tasks", json={"provider": "refuser", "prompt": "not allowed"})
        await stack.http.get(f"/v1/tasks/{ok.json()['id']}", params={"wait": 10})
        record = await delivery_in(stack, "delivered")
    assert record["task_id"] == bad.json()["id"]
    assert [c.verified["type"] for c in receiver.calls] == ["task.failed"]
    data = receiver.calls[0].verified["data"]
    assert (data["id"], data["status"], data["reason"]) == (bad.json()["id"], "failed", "permanent")
    assert "the prompt is not allowed" in data["error"]


async def test_an_outcome_another_provider_wrote_announces_nothing(
    settings: Settings, receiver: Receiver
) -> None:
    # A worker credential may write events under its own provider for any task id; a "completed" for
    # a task queued on another provider is not that task's end, and no webhook says it is.
    async with serving(settings, hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK)) as stack:
        r = await stack.http.post(
            "/v1/tasks", json={"provider": "nobody", "prompt": "x", "webhook": {"url": receiver.url}}
        )
        task_id = r.json()["id"]
        names = stack.bus.names
        forged = Completed(
            task_id=task_id, provider="echo", at_ms=now_ms(), attempt=1, worker="w", output="forged"
        )
        await ensure_events(stack.bus, "echo")  # as serving echo makes it: its workers write there
        ack = await stack.bus.js.publish(
            names.event_subject("echo", task_id, "completed"),
            encoder.encode(forged),
            stream=names.events_stream_of("echo"),
        )

        async def read_past_it() -> bool | None:
            with contextlib.suppress(nats.js.errors.NotFoundError):  # until the gateway sees the stream
                info = await stack.bus.js.consumer_info(
                    names.events_stream_of("echo"), names.webhook_events_consumer
                )
                return True if info.ack_floor.stream_seq >= ack.seq else None
            return None
            return True if info.ack_floor.stream_seq >= ack.seq else None

        await eventually(read_past_it, 10, "the forged event handled")
        listed = await deliveries(stack, task_id=task_id)
    assert listed == []
    assert receiver.calls == []


@pytest.mark.slow
async def test_a_gateway_restart_mid_retry_still_delivers(settings: Settings, receiver: Receiver) -> None:
    receiver.fail_first = 1
    webhooks = hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK, HIVE_WEBHOOK_RETRY_S="3,3")
    async with serving(settings, webhooks) as stack, running_worker(stack.bus, "echo", EchoProvider()):
        r = await stack.http.post(
            "/v1/tasks", json={"provider": "echo", "prompt": "x", "webhook": {"url": receiver.url}}
        )
        await delivery_in(stack, "retrying")
    # the first gateway is gone, its retry waiting in the server; a new one takes it up
    async with serving(settings, webhooks) as stack:
        record = await delivery_in(stack, "delivered")
    assert record["task_id"] == r.json()["id"]
    assert record["attempts"] == 2
    assert len(receiver.calls) == 2
    assert len(set(receiver.ids())) == 1


@pytest.mark.slow
async def test_two_gateways_on_one_bus_deliver_each_webhook_once(
    settings: Settings, receiver: Receiver
) -> None:
    webhooks = hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK)
    async with (
        serving(settings, webhooks) as one,
        serving(settings, webhooks) as two,
        running_worker(one.bus, "echo", EchoProvider()),
    ):
        ids = []
        for i in range(6):
            gateway = (one, two)[i % 2]
            r = await gateway.http.post(
                "/v1/tasks", json={"provider": "echo", "prompt": f"t{i}", "webhook": {"url": receiver.url}}
            )
            ids.append(r.json()["id"])

        async def all_delivered() -> list[dict[str, Any]] | None:
            found = await deliveries(two, status="delivered")
            return found if len(found) == 6 else None

        listed = await eventually(all_delivered, 30, "six deliveries")
    assert sorted(d["task_id"] for d in listed) == sorted(ids)
    assert len(receiver.calls) == 6
    assert sorted(json.loads(c.body)["data"]["id"] for c in receiver.calls) == sorted(ids)


@pytest.mark.parametrize("log_max_age_s", [7 * 86400.0, 60.0])
async def test_a_second_gateway_finds_the_webhook_streams_as_it_would_declare_them(
    bus: Bus, log_max_age_s: float, caplog: pytest.LogCaptureFixture
) -> None:
    """The delivery log's stream named no duplicate window, so the server kept its 120 s (or the age,
    when shorter) and every gateway start after the first logged 'stream ..._WEBHOOK_LOG keeps its own
    duplicate_window=120.0 (this process would have set 0)', a difference that was none."""
    webhooks = WebhookSettings(log_max_age_s=log_max_age_s)
    await records.declare(bus, webhooks)
    caplog.set_level(logging.INFO, logger="hive_bus.bus")
    caplog.clear()
    await records.declare(bus, webhooks)
    assert [r.getMessage() for r in caplog.records if "keeps its own" in r.getMessage()] == []


async def test_a_fetch_that_brings_more_than_was_free_is_handled_whole(bus: Bus) -> None:
    # nats-py's fetch first hands over all its subscription holds, also what earlier pull requests
    # brought after their fetch had ended (timed out; cancelled here, n of them, each left waiting on
    # the server for one message): under a burst of task ends more than the free slots came at once,
    # and the webhooks' loop raised WouldBlock, which stopped the gateway.
    stream, durable = f"{bus.names.prefix.upper()}_LEFTOVERS", "leftovers"
    n = dispatch.AT_ONCE + 6
    await bus.js.add_stream(
        StreamConfig(name=stream, subjects=[f"{stream}.>"], storage=StorageType.MEMORY, max_bytes=1024**2)
    )
    try:
        await bus.js.add_consumer(stream, ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT))
        sub = await bus.js.pull_subscribe_bind(durable, stream)
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(sub.fetch, 1, 10)
            await eventually(lambda: waiting(bus, stream, durable, n), 10, f"{n} pull requests")
            tg.cancel_scope.cancel()
        for i in range(n):
            await bus.js.publish(f"{stream}.{i}", str(i).encode())

        async def all_delivered() -> bool:
            return bool((await bus.js.consumer_info(stream, durable)).num_ack_pending == n)

        await eventually(all_delivered, 10, f"{n} messages in the subscription")
        handled: list[bytes] = []

        async def handle(msg: nats.aio.msg.Msg) -> None:
            handled.append(msg.data)
            await msg.ack()

        async def all_handled() -> bool:
            return len(handled) == n

        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatch.Webhooks(bus, hooks())._loop, sub, handle, "leftovers")
            await eventually(all_handled, 10, f"{n} handled")
            tg.cancel_scope.cancel()
        assert sorted(int(d) for d in handled) == list(range(n))
        await sub.unsubscribe()
    finally:
        await bus.js.delete_stream(stream)


async def waiting(bus: Bus, stream: str, durable: str, n: int) -> bool:
    return bool((await bus.js.consumer_info(stream, durable)).num_waiting == n)


# settings --------------------------------------------------------------------------------------------


def test_settings_name_what_is_wrong_and_never_show_the_secret() -> None:
    with pytest.raises(
        WebhookConfigError, match=r"HIVE_WEBHOOK_SECRT \(did you mean HIVE_WEBHOOK_SECRET\?\)"
    ):
        load_webhook_settings({"HIVE_WEBHOOK_SECRT": SECRET})
    plain = "not-a-whsec-secret-" + secrets.token_hex(16)
    with pytest.raises(WebhookConfigError, match="must start with whsec_") as caught:
        load_webhook_settings({"HIVE_WEBHOOK_SECRET": plain})
    assert plain not in str(caught.value)
    short = "whsec_" + base64.b64encode(b"short").decode()
    with pytest.raises(WebhookConfigError, match="holds 5 bytes") as caught:
        load_webhook_settings({"HIVE_WEBHOOK_SECRET": short})
    assert short not in str(caught.value)
    with pytest.raises(WebhookConfigError, match="HIVE_WEBHOOK_ALLOW_NETWORKS: 'ten' is not a network"):
        load_webhook_settings({"HIVE_WEBHOOK_ALLOW_NETWORKS": "10.0.0.0/8, ten"})
    with pytest.raises(WebhookConfigError, match="deliveries must be signed"):
        load_webhook_settings({"HIVE_WEBHOOKS": '[[webhook]]\nurl = "https://example.com/h"'})
    with pytest.raises(WebhookConfigError, match="events must list some of"):
        load_webhook_settings(
            {
                "HIVE_WEBHOOK_SECRET": SECRET,
                "HIVE_WEBHOOKS": '[[webhook]]\nurl = "https://e.com"\nevents = ["x"]',
            }
        )
    loaded = hooks(HIVE_WEBHOOKS='[[webhook]]\nurl = "https://example.com/h"\nevents = ["batch.completed"]')
    assert [(e.url, e.events) for e in loaded.endpoints] == [("https://example.com/h", ("batch.completed",))]
    assert SECRET.removeprefix("whsec_") not in repr(loaded)


async def test_a_providers_stream_made_while_no_gateway_ran_has_its_ends_announced(
    settings: Settings, receiver: Receiver, hive: Hive
) -> None:
    # each provider's events are a stream of their own, with a consumer of the webhooks' each: one made
    # while the gateways were down is read from its start (webhooks ran on this bus before it)
    loopback = hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK)
    async with serving(settings, loopback) as stack, running_worker(stack.bus, "echo", EchoProvider()):
        first = await hive.submit_request(
            TaskRequest(provider="echo", prompt="x", webhook=WebhookSpec(url=receiver.url))
        )
        await delivery_in(stack, "delivered")
    async with running_worker(hive.bus, "later", EchoProvider()):
        later = await hive.submit_request(
            TaskRequest(provider="later", prompt="y", webhook=WebhookSpec(url=receiver.url))
        )
        assert (await hive.wait(later.id, 10)).status == "completed"
    async with serving(settings, loopback) as stack:

        async def both() -> list[dict[str, Any]] | None:
            found = await deliveries(stack, status="delivered")
            return found if len(found) == 2 else None

        delivered = await eventually(both, 20, "the later provider's delivery")
    assert sorted(d["task_id"] for d in delivered) == sorted([first.id, later.id])


async def test_a_webhook_no_gateway_will_send_is_accepted_with_a_warning(
    settings: Settings, receiver: Receiver, hive: Hive
) -> None:
    # no gateway with webhooks has run on this bus: a webhook is sent only if one runs when its task ends
    spec = WebhookSpec(url=receiver.url)
    alone = await hive.submit_request(TaskRequest(provider="echo", prompt="x", webhook=spec))
    assert NO_WEBHOOKS in alone.warnings
    [batched] = await hive.submit_batch([TaskRequest(provider="echo", prompt="x", webhook=spec)])
    assert not isinstance(batched, Exception) and NO_WEBHOOKS in batched.warnings
    plain = await hive.submit_request(TaskRequest(provider="echo", prompt="x"))
    assert NO_WEBHOOKS not in plain.warnings
    where = ["--nats", settings.nats_url, "--prefix", settings.prefix]
    beats = {"HIVE_HEARTBEAT_INTERVAL_S": "0.5", "HIVE_HEARTBEAT_TTL_S": "1.5"}  # as the test bus has them
    done = hive_cli(["submit", "echo", "hola", "--webhook", receiver.url, *where], env=beats)
    assert done.returncode == 0 and f"warning: {NO_WEBHOOKS}" in done.stderr, done
    async with serving(settings, hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK)) as stack:
        client = Hive(stack.bus)  # one that asks now: from here on, every task's end is queued for delivery
        sent = await client.submit_request(TaskRequest(provider="echo", prompt="y", webhook=spec))
        await client.close()
        assert NO_WEBHOOKS not in sent.warnings
        answer = await stack.http.post(
            "/v1/tasks", json={"provider": "echo", "prompt": "z", "webhook": {"url": receiver.url}}
        )
        assert answer.status_code == 202 and NO_WEBHOOKS not in answer.json().get("warnings", []), answer.text


async def test_listing_the_deliveries_leaves_no_consumer_on_the_bus(
    settings: Settings, receiver: Receiver
) -> None:
    """Each read of the delivery log made a consumer and left it for the server to remove a minute
    later: a soak listing the deliveries every 10 s kept six of them, a client listing them every second
    would keep sixty."""
    async with (
        serving(settings, hooks(HIVE_WEBHOOK_ALLOW_NETWORKS=LOOPBACK)) as stack,
        running_worker(stack.bus, "echo", EchoProvider()),
    ):
        body = {"provider": "echo", "prompt": "hola", "webhook": {"url": receiver.url}}
        assert (await stack.http.post("/v1/tasks", json=body)).status_code == 202
        await delivery_in(stack, "delivered")
        for _ in range(3):
            assert len(await deliveries(stack)) == 1
        log = await stack.bus.js.stream_info(stack.bus.names.webhook_log_stream)
        assert log.state.consumer_count == 0
