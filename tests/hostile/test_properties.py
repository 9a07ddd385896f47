"""Issue 12: hypothesis-generated hostile input over every HTTP route of the gateway and every bus subject
a worker credential may publish on, each run held to the fault suite's ledger.

One hub per test (a gateway with its router, store audit and metrics, an in-process echo worker) serves
from a thread of its own (an anyio portal), so that hypothesis drives it from plain synchronous code.
Every example sends one hostile request (or bus message) and one ordinary task beside it; at the end:

- the ledger of the ordinary tasks (``tests/faults/ledger.py``): lost = 0, duplicates = 0;
- the hub still serves: ``/healthz`` is 200 and a fresh task completes;
- no answer is a 5xx other than 503, and no secret (the gateway's API and metrics tokens) is in any
  answer, log line or event.

Bounded: a fixed number of examples, no shrinking database, a derandomized seed, a deadline each.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import anyio
import anyio.from_thread
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import nats
from hive_bus import Hive, Settings
from hive_bus._bus import event_providers
from hive_bus._embedded import NatsServer
from hive_bus._messages import Completed, encoder, new_task_id, now_ms
from hive_bus.bus import Bus, open_bus
from hive_bus.services.auth import Tokens
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.workers.echo import EchoProvider

from ..conftest import make_settings
from ..faults.ledger import Ledger
from ..helpers import running_worker

pytestmark = pytest.mark.slow

API_TOKEN = "hostile-api-token-5f1e0c2a9b7d4e63"
METRICS_TOKEN = "hostile-metrics-token-8c3d1a7e2f904b55"
SECRETS = (API_TOKEN, METRICS_TOKEN)
HTTP_EXAMPLES, BUS_EXAMPLES = 150, 200
PROPERTY = settings(
    max_examples=HTTP_EXAMPLES,
    deadline=timedelta(seconds=20),
    derandomize=True,  # the same examples on every run: CI stays stable
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: report the first failing example as drawn
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


@dataclass
class Hub:
    portal: anyio.from_thread.BlockingPortal
    settings: Settings
    url: str
    bus: Bus


@pytest.fixture
def hub(nats_server: NatsServer) -> Iterator[Hub]:
    config = make_settings(nats_server.url, events_max_bytes=32 * 1024**2)
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        started: dict[str, Any] = {}

        async def serve(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            async with open_bus(config) as bus:
                tokens = Tokens(api=frozenset({API_TOKEN}), metrics=METRICS_TOKEN)
                gateway = Gateway(Hive(bus), GatewayOptions(port=0, tokens=tokens))
                done = anyio.Event()
                started["done"] = done
                async with anyio.create_task_group() as tg:
                    await tg.start(gateway.serve)
                    async with running_worker(bus, "echo", EchoProvider(), concurrency=8):
                        started["url"], started["bus"] = gateway.url, bus
                        task_status.started()
                        await done.wait()
                    gateway.stop()

        future, _ = portal.start_task(serve)
        yield Hub(portal, config, started["url"], started["bus"])
        portal.call(started["done"].set)
        future.result(timeout=30)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}"}


def ordinary_task(http: httpx.Client, ledger: Ledger, n: int) -> None:
    """A task submitted beside the hostile input: it must be completed, once."""
    prompt = f"ordinary task {n}"
    r = http.post("/v1/tasks", json={"provider": "echo", "prompt": prompt}, headers=auth())
    ledger.answer(r.status_code, r.json(), prompt)


def assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret appears in {where}: {text[:300]!r}"


def held(hub: Hub, http: httpx.Client, ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    """The promise after all the examples: the ledger, the hub serving, no secret anywhere."""
    assert http.get("/healthz").status_code == 200
    r = http.post("/v1/tasks", json={"provider": "echo", "prompt": "fresh"}, headers=auth())
    assert r.status_code == 202, r.text
    done = http.get(f"/v1/tasks/{r.json()['id']}", params={"wait": 20}, headers=auth())
    assert done.status_code == 200 and done.json()["status"] == "completed", done.text

    async def check() -> None:
        async with open_bus(hub.settings, name="ledger") as bus:
            left = await ledger.wait_final(Hive(bus), 30)
            await ledger.check(bus, notes=f"{left} not final")
            await no_secret_in_events(bus)

    hub.portal.call(check)
    for record in caplog.records:
        assert_no_secret(f"log line of {record.name}", record.getMessage())


async def no_secret_in_events(bus: Bus) -> None:
    names = bus.names
    for provider in await event_providers(bus):
        stream = names.events_stream_of(provider)
        sub = await bus.js.subscribe(names.events_under(provider), stream=stream, ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except TimeoutError:
                    break
                assert_no_secret(f"event {msg.subject}", msg.data.decode("utf-8", "replace"))
        finally:
            await sub.unsubscribe()


# what hostile HTTP looks like -------------------------------------------------------------------------

TASK_ID = st.one_of(
    st.builds(new_task_id),
    st.text(min_size=0, max_size=40),
    st.sampled_from(["01JAAAAAAAAAAAAAAAAAAAAAAA", "..", "%2e%2e", "a\nb", "*", ">", "x" * 300, "ü" * 26]),
)
ROUTES = [
    ("POST", "/v1/tasks"), ("POST", "/v1/tasks/batch"), ("GET", "/v1/tasks/{id}"),
    ("GET", "/v1/tasks/{id}/events"), ("GET", "/v1/tasks"), ("GET", "/v1/events"), ("GET", "/v1/stats"),
    ("GET", "/v1/workers"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
    ("GET", "/v1/usage"), ("GET", "/v1/audit"), ("GET", "/openapi.json"), ("GET", "/"),
    ("GET", "/v1/dlq"), ("GET", "/v1/dlq/{id}"), ("POST", "/v1/dlq/{id}/replay"),
    ("DELETE", "/v1/dlq/{id}"), ("DELETE", "/v1/dlq"),
]  # fmt: skip
JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=50),
    st.sampled_from(["\x00", "\u202e", "\ud7ff", "x" * 20_000, "\n\r\t", API_TOKEN[:8]]),
)  # fmt: skip
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
TASK_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "provider": st.one_of(st.just("echo"), st.text(max_size=70), JSON_LEAF),
        "prompt": st.one_of(st.text(max_size=200), JSON_LEAF),
        "idempotency_key": st.one_of(st.text(max_size=300), st.sampled_from(["k", "k\n", "a b", "a\nb"])),
        "payload": JSON,
        "max_attempts": st.one_of(st.integers(-5, 200), JSON_LEAF),
        "fallback": st.one_of(st.lists(st.text(max_size=20), max_size=3), JSON_LEAF),
        "priority": st.one_of(st.sampled_from(["high", "normal", "low"]), JSON_LEAF),
        "unknown_field": JSON_LEAF,
    },
)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BODY = st.one_of(
    TASK_FIELDS.map(json.dumps),
    st.lists(TASK_FIELDS, max_size=5).map(lambda tasks: json.dumps({"tasks": tasks})),
    JSON.map(json.dumps),
    st.integers(1, 20_000).map(nested),
    st.integers(1, 20_000).map(lambda d: '{"provider":"echo","prompt":"p","payload":' + nested(d) + "}"),
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
)
CONTENT_TYPE = st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
     "application/json; charset=utf-16", "", "application/json\x7f"]
)  # fmt: skip
QUERY = st.dictionaries(
    st.sampled_from(["wait", "limit", "status", "provider", "since", "x"]),
    st.one_of(
        st.sampled_from(["0", "-1", "1e309", "nan", "inf", "0.01", "99999999", ""]), st.text(max_size=20)
    ),
    max_size=3,
)
HEADER_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60)
AUTH = st.sampled_from(["good", "good", "good", "none", "wrong", "metrics"])  # mostly past the token check


@st.composite
def hostile_requests(draw: st.DrawFn) -> dict[str, Any]:
    method, path = draw(st.sampled_from(ROUTES))
    if draw(st.booleans()):
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    task_id = draw(TASK_ID)
    headers = {"Content-Type": draw(CONTENT_TYPE), "X-Odd": draw(HEADER_VALUE)}
    who = draw(AUTH)
    if who != "none":
        token = {"good": API_TOKEN, "wrong": "not-the-token", "metrics": METRICS_TOKEN}[who]
        headers["Authorization"] = f"Bearer {token}"
    if draw(st.booleans()):
        headers["Host"] = draw(st.sampled_from(["evil.example", "localhost", "127.0.0.1:1", "[::1]"]))
    return {
        "method": method,
        "url": path.replace("{id}", quote(task_id, safe="") or "x"),
        "params": draw(QUERY),
        "headers": {k: v for k, v in headers.items() if v.isascii()},
        "content": draw(BODY).encode("utf-8", "surrogatepass")
        if method in ("POST", "PUT", "PATCH")
        else None,
    }


def test_hostile_http_never_harms_the_hub(hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for client_side in ("httpx", "httpcore", "hpack"):  # this test's own HTTP client, not the hub
        caplog.set_level(logging.WARNING, logger=client_side)
    ledger = Ledger("hostile HTTP properties")
    seen: list[int] = []
    tries: Counter[str] = Counter()
    with httpx.Client(base_url=hub.url, timeout=10) as http:

        @PROPERTY
        @given(request=hostile_requests())
        def one(request: dict[str, Any]) -> None:
            try:
                r = http.request(**request, timeout=3)
            except httpx.LocalProtocolError:
                return  # our own client would not send it: nothing reached the hub
            except httpx.ReadTimeout:
                return  # a stream (SSE) or a long wait: answered in time is all we ask of it
            except httpx.TransportError as exc:
                raise AssertionError(f"no answer at all: {exc!r}") from None
            assert r.status_code < 500 or r.status_code == 503, f"{r.status_code}: {r.text[:300]}"
            assert_no_secret("an answer", r.text + json.dumps(dict(r.headers)))
            seen.append(r.status_code)
            tries[f"{request['method']} {request['url'].split('?')[0][:30]} -> {r.status_code}"] += 1
            ordinary_task(http, ledger, len(seen))

        one()
        logging.getLogger("tests.hostile").warning("HTTP examples: %s", dict(sorted(tries.items())))
        held(hub, http, ledger, caplog)


# what a hostile worker credential may publish ------------------------------------------------------------

ROGUE = "rogue"  # a provider of the attacker's own: its credential may publish these subjects
STATUSES = ["running", "retrying", "moved", "completed", "failed"]


@st.composite
def event_bodies(draw: st.DrawFn, task_id: str) -> tuple[str, bytes]:
    shape = draw(st.sampled_from(["forged", "deep_moved", "typed", "json", "nested", "bytes", "huge"]))
    if shape == "forged":  # a well-formed end of someone's task, from the rogue provider
        forged = Completed(
            task_id=task_id, provider=ROGUE, at_ms=now_ms(), attempt=1, worker="rogue", output="forged"
        )
        return shape, encoder.encode(forged)
    if shape == "deep_moved":  # issue 12 point 4: a small event nested thousands deep
        depth = draw(st.integers(500, 5_000))
        moved = f'{{"type":"moved.v1","task_id":"{task_id}","task":{nested(depth)}}}'
        return shape, moved.encode()
    if shape == "typed":  # an event's own shape with hostile values
        tag = draw(st.sampled_from(["running.v1", "retrying.v1", "moved.v1", "completed.v1", "failed.v1"]))
        body = {
            "type": tag, "task_id": draw(st.one_of(st.just(task_id), st.text(max_size=30))),
            "provider": draw(st.sampled_from([ROGUE, "echo", "gemini", ""])), "at_ms": draw(st.integers()),
            "attempt": draw(st.one_of(st.integers(), JSON_LEAF)), "worker": draw(st.text(max_size=20)),
            "output": draw(JSON), "reason": draw(st.text(max_size=20)), "error": draw(st.text(max_size=50)),
            "retry_in_s": draw(st.one_of(st.floats(), JSON_LEAF)), "next_try_at_ms": draw(st.integers()),
            "task": draw(st.one_of(JSON, st.just({"id": task_id, "provider": "echo", "prompt": "planted"}))),
        }  # fmt: skip
        return shape, json.dumps(body, allow_nan=True).encode()
    if shape == "json":
        return shape, json.dumps(draw(JSON)).encode()
    if shape == "nested":
        return shape, nested(draw(st.integers(100, 50_000))).encode()
    if shape == "huge":
        return shape, b'{"type":"completed.v1","output":"' + b"x" * draw(st.integers(1, 900_000)) + b'"}'
    return shape, draw(st.binary(max_size=500))


@st.composite
def bus_messages(draw: st.DrawFn, ledger_ids: list[str]) -> tuple[str, str, bytes, dict[str, str]]:
    task_id = draw(st.one_of(st.builds(new_task_id), st.sampled_from(ledger_ids or [new_task_id()])))
    where = draw(st.sampled_from(["event", "duplicate", "dlq", "heartbeat", "provider_kv", "budget_kv"]))
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        headers["Nats-Msg-Id"] = draw(st.sampled_from([f"{task_id}:final", task_id, "x", "k\n"]))
    shape, body = draw(event_bodies(task_id))
    return where + ":" + task_id + ":" + draw(st.sampled_from(STATUSES)), shape, body, headers


def subject_of(settings: Settings, spec: str) -> str:
    where, task_id, status = spec.split(":")
    names = settings.names
    return {
        "event": names.event_subject(ROGUE, task_id, status),
        "duplicate": names.duplicate_subject(ROGUE, task_id, status),
        "dlq": names.dlq_subject(ROGUE, task_id),
        "heartbeat": f"$KV.{names.workers_bucket}.rogue-worker.{task_id}",
        "provider_kv": f"$KV.{names.providers_bucket}.{ROGUE}.{task_id}",
        "budget_kv": f"$KV.{names.budgets_bucket}.{ROGUE}.{task_id}",
    }[where]


def test_hostile_bus_messages_never_harm_the_hub(
    hub: Hub, caplog: pytest.LogCaptureFixture, record_property: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    for client_side in ("httpx", "httpcore", "hpack"):  # this test's own HTTP client, not the hub
        caplog.set_level(logging.WARNING, logger=client_side)
    ledger = Ledger("hostile bus properties")
    tries: Counter[str] = Counter()
    with httpx.Client(base_url=hub.url, timeout=10) as http:
        for n in range(5):
            ordinary_task(http, ledger, n)
        targets = ledger.accepted  # fixed before the examples: hypothesis draws from the same list each time
        rogue = hub.portal.call(nats.connect, hub.settings.nats_url)
        try:

            @settings(PROPERTY, max_examples=BUS_EXAMPLES)
            @given(data=st.data())
            def one(data: st.DataObject) -> None:
                spec, shape, body, headers = data.draw(bus_messages(targets))
                where, task_id, _ = spec.split(":")
                tries[f"{where} {shape}{' (a ledger task)' if task_id in targets else ''}"] += 1
                subject = subject_of(hub.settings, spec)

                async def send() -> None:
                    try:
                        await rogue.publish(subject, body, headers=headers or None)
                        await rogue.flush()
                    except nats.errors.Error:
                        pass  # refused by the server (too large): the hub's business is untouched

                hub.portal.call(send)
                ordinary_task(http, ledger, len(ledger.accepted))
                assert http.get("/healthz").status_code == 200

            one()
        finally:
            hub.portal.call(rogue.close)
        record_property("tries", dict(tries))
        logging.getLogger("tests.hostile").warning("bus examples: %s", dict(sorted(tries.items())))
        held(hub, http, ledger, caplog)
