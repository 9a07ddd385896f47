"""OpenAI's chat completions and models list on the gateway, driven by the real openai SDK: a real
nats-server, the gateway over real HTTP, workers with the real provider SDKs against the fakes."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import msgspec
import nats.js.errors
import openai
import pytest
from openai.types.chat import completion_create_params

from hive_bus import Completed, FunctionProvider, Hive, Output, Settings, Task, Usage
from hive_bus._cache import cache_key
from hive_bus._embedded import NatsServer
from hive_bus._messages import new_task_id, now_ms
from hive_bus._routes import Routes, RoutesError
from hive_bus.bus import Bus, open_bus
from hive_bus.services.auth import Tokens
from hive_bus.services.gateway import Gateway, GatewayOptions
from hive_bus.services.openai_chat import SUPPORTED_FIELDS, WORKERS_FRESH_S
from hive_bus.workers.echo import EchoProvider
from hive_bus.workers.gemini import GeminiProvider
from hive_bus.workers.groq import GroqProvider

from .conftest import make_settings
from .fakes import ProviderFakes
from .helpers import TcpRelay, events_of, eventually, hive_cli, openai_shaped, running_worker, task_of

pytestmark = pytest.mark.anyio

TOKEN = "chat-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEY = "gsk_chat_key_0123456789"
GROQ_MODEL = "groq/llama-3.3-70b-versatile"
ROUTES = f"""
[aliases.posts]
candidates = ["gemini/gemini-2.5-flash", "{GROQ_MODEL}"]
max_attempts = 2

[aliases.cached]
candidates = ["{GROQ_MODEL}"]
cache_ttl_s = 60

[aliases.once]
candidates = ["{GROQ_MODEL}"]
max_attempts = 1
"""


@dataclass
class Stack:
    bus: Bus
    hive: Hive
    url: str
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient


@asynccontextmanager
async def serving(settings: Settings, routes: Routes) -> AsyncIterator[Stack]:
    options = GatewayOptions(port=0, tokens=Tokens(api=frozenset({TOKEN})), routes=routes)
    async with open_bus(settings) as bus:
        hive = Hive(bus)
        gateway = Gateway(hive, options)
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with (
                openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=TOKEN, max_retries=0) as client,
                httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=30) as http,
            ):
                yield Stack(bus, hive, gateway.url, client, http)
            gateway.stop()


@pytest.fixture
def routes(tmp_path: Path) -> Routes:
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES)
    return Routes.load(path)


@pytest.fixture
async def stack(settings: Settings, routes: Routes) -> AsyncIterator[Stack]:
    async with serving(settings, routes) as s:
        yield s


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes() as f:
        yield f


def groq(fakes: ProviderFakes) -> GroqProvider:
    return GroqProvider(api_key=KEY, base_url=fakes.groq_base_url)


async def test_a_chat_completion_answers_as_openai_does(stack: Stack) -> None:
    async with running_worker(stack.bus, "echo", EchoProvider()):
        raw = await stack.client.chat.completions.with_raw_response.create(
            model="echo",
            messages=[
                {"role": "system", "content": "Eres breve."},
                {"role": "user", "content": "Un tuit sobre NATS. Fin del tuit"},
            ],
            stop=[". Fin"],
            temperature=0.2,
            seed=7,
            user="ana",
            metadata={"campaign": "launch"},
        )
    completion = raw.parse()
    task_id = raw.headers["x-hive-task-id"]
    assert completion.object == "chat.completion"
    assert completion.id == f"chatcmpl-{task_id}"
    assert completion.model == "echo/echo"  # the provider/model that really answered
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Un tuit sobre NATS"  # cut at the stop sequence
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 4)
    assert completion.usage.total_tokens == 11
    assert (raw.headers["x-hive-provider"], raw.headers["x-hive-attempts"]) == ("echo", "1")
    assert raw.headers["x-hive-cost-usd"] == "0"
    task = await task_of(stack.bus, task_id)
    assert task.params is not None and (task.params.seed, task.params.stop) == (7, [". Fin"])
    assert task.metadata == {"campaign": "launch", "user": "ana"}


async def test_a_conversation_goes_to_the_task_as_messages(stack: Stack) -> None:
    async with running_worker(stack.bus, "echo", EchoProvider()):
        raw = await stack.client.chat.completions.with_raw_response.create(
            model="echo",
            messages=[
                {"role": "developer", "content": "Answer in Spanish."},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hola"},
                {"role": "user", "content": [{"type": "text", "text": "bye"}]},
            ],
        )
    assert raw.parse().choices[0].message.content == "bye"
    task = await task_of(stack.bus, raw.headers["x-hive-task-id"])
    assert task.prompt == "" and task.messages is not None
    assert [m.role for m in task.messages] == ["system", "user", "assistant", "user"]


@pytest.mark.slow
async def test_a_429_storm_behind_chat_completions_is_waited_out_in_the_queue(
    stack: Stack, fakes: ProviderFakes
) -> None:
    fakes.groq.limit(1, window_s=1.0)  # four requests at once: three 429s, then more
    async with running_worker(stack.bus, "groq", groq(fakes), concurrency=4):

        async def ask(i: int) -> None:
            completion = await stack.client.chat.completions.create(
                model=GROQ_MODEL, messages=[{"role": "user", "content": f"post {i}"}]
            )
            answers[i] = completion.choices[0].message.content

        answers: dict[int, str | None] = {}
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(ask, i)
    assert answers == {i: f"reply: post {i}" for i in range(4)}  # every client saw 200
    assert fakes.groq.rate_limited >= 3  # the storm was real; the queue took it


async def test_a_spent_gemini_key_fails_over_to_groq_inside_one_request(
    stack: Stack, fakes: ProviderFakes
) -> None:
    fakes.gemini.daily_quota(0)  # the key's daily quota is spent
    gemini = GeminiProvider(api_key="AIza-chat-0123456789", base_url=fakes.gemini_base_url)
    async with (
        running_worker(stack.bus, "gemini", gemini),
        running_worker(stack.bus, "groq", groq(fakes)),
    ):
        raw = await stack.client.chat.completions.with_raw_response.create(
            model="posts", messages=[{"role": "user", "content": "un post para LinkedIn"}]
        )
    completion = raw.parse()
    assert completion.model == GROQ_MODEL
    assert completion.choices[0].message.content == "reply: un post para LinkedIn"
    assert raw.headers["x-hive-provider"] == "groq"
    assert fakes.gemini.rate_limited == 1 and fakes.groq.completed == 1


async def test_past_x_hive_wait_a_504_carries_the_task_id_and_the_result_comes_later(stack: Stack) -> None:
    calls: list[str] = []

    async def slow(task: Task) -> str:
        calls.append(task.id)
        await anyio.sleep(1.0)
        return "tarde pero llega"

    async with running_worker(stack.bus, "slow", FunctionProvider(slow)):
        patient = stack.client.with_options(max_retries=2)  # the SDK's default retries
        with pytest.raises(openai.InternalServerError) as caught:
            await patient.chat.completions.create(
                model="slow",
                messages=[{"role": "user", "content": "x"}],
                extra_headers={"X-Hive-Wait": "0.2"},
            )
        error = caught.value
        assert error.status_code == 504
        task_id = error.response.headers["x-hive-task-id"]
        assert error.code == "wait_exceeded" and task_id in error.message
        assert error.response.headers["x-should-retry"] == "false"
        later = await stack.http.get(f"/v1/tasks/{task_id}", params={"wait": 10})
    assert later.json()["status"] == "completed" and later.json()["output"] == "tarde pero llega"
    assert calls == [task_id]  # the SDK did not send it again: one task, one call


UNSUPPORTED = sorted(
    set(typing.get_type_hints(completion_create_params.CompletionCreateParamsBase)) - set(SUPPORTED_FIELDS)
)


async def test_every_field_the_gateway_does_not_support_is_a_400_naming_it(stack: Stack) -> None:
    assert {"tools", "logprobs", "frequency_penalty", "audio"} <= set(UNSUPPORTED)  # the SDK's own list
    async with running_worker(stack.bus, "echo", EchoProvider()):
        for field in [*UNSUPPORTED, "not_an_openai_field"]:
            with pytest.raises(openai.BadRequestError) as caught:
                await stack.client.chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": "x"}], extra_body={field: 1}
                )
            assert (caught.value.param, caught.value.code) == (field, "unsupported_parameter"), field
            assert f"`{field}` is not supported" in caught.value.message
        with pytest.raises(openai.BadRequestError) as n:
            await stack.client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "x"}], n=2
            )
        with pytest.raises(openai.BadRequestError) as role:
            await stack.client.chat.completions.create(
                model="echo",
                messages=[{"role": "tool", "content": "x", "tool_call_id": "c1"}],
            )
        # a field sent as null asks for nothing: not refused
        fine = await stack.client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}], extra_body={"logprobs": None}
        )
    assert n.value.param == "n"
    assert role.value.param is not None and role.value.param.startswith("messages[0]")
    assert fine.choices[0].message.content == "x"


async def test_an_unknown_model_is_a_404_listing_the_models_there_are(stack: Stack) -> None:
    async with running_worker(stack.bus, "echo", EchoProvider()):
        with pytest.raises(openai.NotFoundError) as caught:
            await stack.client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(openai.NotFoundError):  # a provider no worker serves
            await stack.client.chat.completions.create(
                model="nobody/some-model", messages=[{"role": "user", "content": "x"}]
            )
    assert caught.value.code == "model_not_found"
    for name in ("posts", "cached", "echo"):  # echo reports no default model: its bare name
        assert name in caught.value.message


async def test_models_lists_every_alias_and_every_live_provider_model(
    stack: Stack, fakes: ProviderFakes
) -> None:
    async with (
        running_worker(stack.bus, "echo", EchoProvider()),
        running_worker(stack.bus, "groq", groq(fakes)),
    ):
        page = await stack.client.models.list()
    ids = [m.id for m in page.data]
    assert sorted(ids) == sorted(["posts", "cached", "once", "echo", GROQ_MODEL])
    assert {m.object for m in page.data} == {"model"}


async def test_a_model_is_retrieved_by_its_id_as_the_sdk_asks_for_it(
    stack: Stack, fakes: ProviderFakes
) -> None:
    """``client.models.retrieve``: ``GET /v1/models/{model}``, the id's ``/`` sent as ``%2F``. It was a
    404 "Not Found" for every model, the listed ones too."""
    async with (
        running_worker(stack.bus, "echo", EchoProvider()),
        running_worker(stack.bus, "groq", groq(fakes)),
    ):
        listed = {m.id: m for m in (await stack.client.models.list()).data}
        alias = await stack.client.models.retrieve("posts")
        served = await stack.client.models.retrieve(GROQ_MODEL)
        echo = await stack.client.models.retrieve("echo")
        # a built-in provider's model with no worker now: chat completions queue it, so it is a model
        queued_for = await stack.client.models.retrieve("gemini/gemini-2.5-flash")
        with pytest.raises(openai.NotFoundError) as caught:
            await stack.client.models.retrieve("nobody/some-model")
    assert alias == listed["posts"] and served == listed[GROQ_MODEL] and echo == listed["echo"]
    assert (queued_for.id, queued_for.owned_by) == ("gemini/gemini-2.5-flash", "gemini")
    assert caught.value.code == "model_not_found" and "nobody/some-model" in caught.value.message


async def test_a_cache_hit_makes_no_provider_call_and_spends_nothing(
    stack: Stack, fakes: ProviderFakes
) -> None:
    ask = [{"role": "user", "content": "hashtags para un lanzamiento"}]
    async with running_worker(stack.bus, "groq", groq(fakes)):
        first = await stack.client.chat.completions.with_raw_response.create(model="cached", messages=ask)  # type: ignore[arg-type]
        again = await stack.client.chat.completions.with_raw_response.create(model="cached", messages=ask)  # type: ignore[arg-type]
        other = await stack.client.chat.completions.create(model="cached", messages=ask, temperature=0.1)  # type: ignore[arg-type]
        metrics = await stack.http.get("/metrics")
    assert fakes.groq.requests == 2  # the first and the one with other parameters; not the twin
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert other.choices[0].message.content == "reply: hashtags para un lanzamiento"
    assert again.headers["x-hive-cache"] == "hit" and "x-hive-cache" not in first.headers
    assert again.headers["x-hive-cost-usd"] == "0"
    assert again.headers["x-hive-task-id"] != first.headers["x-hive-task-id"]
    [done] = [
        e for e in await events_of(stack.bus, again.headers["x-hive-task-id"]) if isinstance(e, Completed)
    ]
    assert done.cached and done.cost_usd == 0
    assert 'hive_cache_hits_total{model="llama-3.3-70b-versatile",provider="groq"} 1.0' in metrics.text


@pytest.mark.parametrize(
    ("status", "error", "http", "code"),
    [
        (400, openai.BadRequestError, 400, "provider_bad_request"),
        (404, openai.NotFoundError, 404, "model_not_found"),
        (503, openai.InternalServerError, 502, "provider_unavailable"),
    ],
)
async def test_a_task_failed_for_good_is_the_openai_error_its_cause_deserves(
    stack: Stack, fakes: ProviderFakes, status: int, error: type[openai.APIStatusError], http: int, code: str
) -> None:
    fakes.groq.fail_next(status)
    async with running_worker(stack.bus, "groq", groq(fakes)):
        with pytest.raises(error) as caught:
            await stack.client.chat.completions.create(
                model="once", messages=[{"role": "user", "content": "x"}]
            )
    assert (caught.value.status_code, caught.value.code) == (http, code)
    assert caught.value.response.headers["x-hive-task-id"] in caught.value.message


async def test_an_idempotency_key_makes_one_task_of_two_requests(stack: Stack, fakes: ProviderFakes) -> None:
    async with running_worker(stack.bus, "groq", groq(fakes)):
        answers = [
            await stack.client.chat.completions.with_raw_response.create(
                model=GROQ_MODEL,
                messages=[{"role": "user", "content": "una vez"}],
                extra_headers={"Idempotency-Key": "pedido-42"},
            )
            for _ in range(2)
        ]
    assert answers[0].headers["x-hive-task-id"] == answers[1].headers["x-hive-task-id"]
    assert fakes.groq.requests == 1


async def test_a_bus_that_does_not_answer_is_a_503_the_sdk_retries_on_the_chat_and_models_routes(
    nats_server: NatsServer, routes: Routes
) -> None:
    """The workers' heartbeats, which every chat completion and model read looks up, not read in time: a
    503 ``bus_unavailable`` with ``Retry-After`` (which the SDK waits out and retries), not a 500 of a
    bare ``TimeoutError`` (which it retried at once) with its traceback in the log."""
    relay = TcpRelay(int(nats_server.url.rsplit(":", 1)[1]))
    async with serving(make_settings(relay.url, request_timeout_s=1.0), routes) as stack:
        try:
            assert (await stack.client.models.list()).data
            relay.stall()
            await anyio.sleep(WORKERS_FRESH_S)  # the catalog's last reading of the workers is stale
            answers = {
                "chat": await stack.http.post(
                    "/v1/chat/completions",
                    json={"model": "echo", "messages": [{"role": "user", "content": "x"}]},
                ),
                "models": await stack.http.get("/v1/models"),
                "model": await stack.http.get("/v1/models/echo"),
                "workers": await stack.http.get("/v1/workers"),
            }
        finally:
            relay.cut()
    assert {name: (r.status_code, r.headers.get("retry-after")) for name, r in answers.items()} == {
        name: (503, "5") for name in answers
    }
    for name in ("chat", "models", "model"):
        error = answers[name].json()["error"]
        assert error["code"] == "bus_unavailable", error
        assert error["message"] == "reading the workers' heartbeats timed out after 1 s", error


async def test_requests_behind_a_reading_of_the_workers_that_timed_out_are_answered_at_once(
    nats_server: NatsServer, routes: Routes
) -> None:
    """Chat completions arriving while the bus does not answer: the first waits out the reading of the
    heartbeats, the others get its 503 at once. They waited in turn, one timeout each: the eighth of
    eight answered after eight timeouts."""
    relay = TcpRelay(int(nats_server.url.rsplit(":", 1)[1]))
    body = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
    async with serving(make_settings(relay.url, request_timeout_s=1.0), routes) as stack:
        answers: list[tuple[float, int]] = []

        async def ask() -> None:
            started = anyio.current_time()
            r = await stack.http.post("/v1/chat/completions", json=body)
            answers.append((anyio.current_time() - started, r.status_code))

        try:
            relay.stall()
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(ask)
        finally:
            relay.cut()
    assert [status for _, status in answers] == [503] * 8
    assert max(took for took, _ in answers) < 3, answers  # one timeout of 1 s, and some slack


async def test_a_chat_completion_whose_task_is_cancelled_is_a_409_saying_so(stack: Stack) -> None:
    """A task cancelled while its request waits: a 409 ``task_cancelled`` naming it, at once. It was a 504
    ``wait_exceeded`` saying the task "has not ended ... (it is cancelled); it goes on"."""
    caught: list[openai.APIStatusError] = []

    async def ask() -> None:
        with pytest.raises(openai.ConflictError) as raised:  # no gemini worker: the task waits
            await stack.client.chat.completions.create(
                model="gemini",
                messages=[{"role": "user", "content": "no llegará"}],
                extra_headers={"X-Hive-Wait": "30"},
            )
        caught.append(raised.value)

    async def queued() -> str | None:
        return next((v.id for v in await stack.hive.recent(provider="gemini", status="queued")), None)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask)
        task_id = await eventually(queued, 10, "the chat completion's task")
        await stack.hive.cancel(task_id, reason="no longer wanted")
        cancelled_at = anyio.current_time()
    assert anyio.current_time() - cancelled_at < 5  # answered as the task ended, not after the 30 s wait
    [error] = caught
    assert (error.status_code, error.code) == (409, "task_cancelled")
    assert task_id in error.message and "no longer wanted" in error.message
    assert error.response.headers["x-should-retry"] == "false"


async def test_a_bad_schema_is_a_400_whose_param_names_it(stack: Stack) -> None:
    """A ``response_format`` schema that is no JSON Schema: 400 with ``param`` naming where, as every
    other bad field's has (and as ``POST /v1/tasks`` names its ``field``); it had none."""
    bad: typing.Any = {"type": "json_schema", "json_schema": {"name": "post", "schema": {"type": "objeto"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        await stack.client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "{}"}],
            response_format=bad,
        )
    assert caught.value.param == "response_format.json_schema"
    assert "'objeto' is not valid under any of the given schemas" in caught.value.message


async def test_without_the_gateway_token_the_sdk_gets_an_authentication_error(stack: Stack) -> None:
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="wrong-token", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            await client.models.list()
    assert raised.value.type == "invalid_request_error" and "token" in raised.value.message


async def test_the_gateways_own_refusals_on_the_chat_paths_are_in_openais_shape(stack: Stack) -> None:
    """The edge's and the framework's answers on ``/v1/chat/completions`` and ``/v1/models`` (a token
    missing, a method or a path they do not take, a body that is not JSON) are in OpenAI's shape, as the
    route's own are: they were in the gateway's."""
    async with httpx.AsyncClient(base_url=f"{stack.url}/v1") as http:
        answers = {
            "no token": await http.get("models"),
            "a method it does not take": await http.get("chat/completions", headers=AUTH),
            "a path under it that is no route": await http.get("models/x/y", headers=AUTH),
            "a body that is not JSON": await http.post(
                "chat/completions", content=b"x", headers={**AUTH, "content-type": "text/plain"}
            ),
        }
    assert {case: r.status_code for case, r in answers.items()} == {
        "no token": 401,
        "a method it does not take": 405,
        "a path under it that is no route": 404,
        "a body that is not JSON": 415,
    }
    assert {case: r.text for case, r in answers.items() if not openai_shaped(r)} == {}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[aliases.a]\ncandidates = []\n", "line 2, key aliases.a.candidates"),
        ('[aliases.a]\ncandidates = ["groq"]\nmax_attempts = 0\n', "line 3, key aliases.a.max_attempts"),
        (
            '[aliases.a]\ncandidates = ["groq"]\nrout = "cheapest"\n',
            "key aliases.a: Object contains unknown field `rout`",
        ),
        ('[aliases.a]\ncandidates = ["gro q/x"]\n', "key aliases.a.candidates[0]"),
        ('[aliases.a]\ncandidates = ["groq", "groq"]\n', "a candidate is listed twice"),
        ("[aliases.a\n", "not valid TOML"),
    ],
)
def test_a_bad_routes_file_is_one_line_naming_the_file_and_where(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(text)
    with pytest.raises(RoutesError) as caught:
        Routes.load(path)
    assert str(caught.value).startswith(f"routes file {path}: ") and says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_gateway_does_not_start_with_a_bad_routes_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text('[aliases.fast]\ncandidates = ["groq"]\nmax_wait_s = -1\n')
    done = hive_cli(["gateway", "--port", "0", "--routes", str(path), "--nats", "nats://127.0.0.1:1"])
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"Error: routes file {path}: line 3, key aliases.fast.max_wait_s: Expected `float` > 0.0"
    )


def test_an_alias_becomes_a_task_with_its_candidates_and_policies(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(
        '[aliases.a]\ncandidates = ["gemini", "groq/openai/gpt-oss-120b"]\nroute = "cheapest"\n'
        "time_budget_s = 60\nmax_wait_s = 5\n"
    )
    target = Routes.load(path).target("a", [])
    assert target is not None
    assert (target.provider, target.model, target.fallback) == ("gemini", None, ["groq:openai/gpt-oss-120b"])
    assert (target.route, target.deadline_s, target.max_wait_s) == ("cheapest", 60, 5)
    assert Routes().target("groq/openai/gpt-oss-120b", ["groq"]) is not None
    assert Routes().target("groq/x", []) is None  # no live worker serves groq


def test_cache_twins_share_a_key_and_other_asks_do_not() -> None:
    def task(**fields: object) -> Task:
        base = {"provider": "groq", "id": new_task_id(), "submitted_at_ms": now_ms()}
        return msgspec.convert({**base, **fields}, Task)

    key = cache_key(task(prompt="hola"), "m")
    assert cache_key(task(messages=[{"role": "user", "content": "hola"}]), "m") == key  # the same ask
    assert cache_key(task(prompt="hola"), "other") != key
    assert cache_key(task(prompt="hola", params={"temperature": 0.5}), "m") != key
    assert cache_key(task(prompt="hola", system="s"), "m") != key
    assert cache_key(task(prompt="hola", payload={"a": 1}), "m") != key


async def test_a_client_that_goes_away_ends_its_wait_and_the_task_goes_on(stack: Stack) -> None:
    release = anyio.Event()

    async def held(task: Task) -> str:
        await release.wait()
        return "done anyway"

    async def waits_ended() -> bool:
        return stack.hive.waiting == 0

    async with running_worker(stack.bus, "held", FunctionProvider(held)):
        body = {"model": "held", "messages": [{"role": "user", "content": "x"}]}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            await stack.http.post(
                "/v1/chat/completions", json=body, headers={"X-Hive-Wait": "60"}, timeout=1.5
            )
        # the gateway's wait ends with the connection, not after 60 s
        await eventually(waits_ended, 10, "the wait to end with its client")
        release.set()
        [task] = (await stack.http.get("/v1/tasks", params={"provider": "held"})).json()
        done = await stack.http.get(f"/v1/tasks/{task['id']}", params={"wait": 10})
    assert done.json()["output"] == "done anyway"


async def test_the_finish_reason_is_the_one_the_provider_gave(stack: Stack) -> None:
    async def capped(task: Task) -> Output:
        return Output(
            "cut sh", model="tiny", usage=Usage(input_tokens=3, output_tokens=2), finish_reason="length"
        )

    async with running_worker(stack.bus, "capped", FunctionProvider(capped)):
        completion = await stack.client.chat.completions.create(
            model="capped", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    assert completion.choices[0].finish_reason == "length"
    assert completion.model == "capped/tiny"


async def test_a_response_format_travels_with_the_task_and_a_json_output_is_its_text(stack: Stack) -> None:
    async def structured(task: Task) -> object:
        return {"ok": True, "tags": ["#nats"]}

    schema: dict[str, object] = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["ok", "tags"],
    }
    async with running_worker(stack.bus, "structured", FunctionProvider(structured)):
        raw = await stack.client.chat.completions.with_raw_response.create(
            model="structured",
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "post", "schema": schema}},
        )
    content = raw.parse().choices[0].message.content
    assert content is not None and msgspec.json.decode(content) == {"ok": True, "tags": ["#nats"]}
    task = await task_of(stack.bus, raw.headers["x-hive-task-id"])
    assert task.response_format is not None
    assert msgspec.to_builtins(task.response_format)["json_schema"]["schema"] == schema


async def test_x_hive_cache_ttl_opts_one_request_into_the_cache(stack: Stack) -> None:
    calls: list[str] = []

    async def counted(task: Task) -> str:
        calls.append(task.id)
        return f"answer {len(calls)}"

    ask = {"model": "counted", "messages": [{"role": "user", "content": "same"}]}
    async with running_worker(stack.bus, "counted", FunctionProvider(counted)):
        plain = [(await stack.http.post("/v1/chat/completions", json=ask)).json() for _ in range(2)]
        cached = [
            await stack.http.post("/v1/chat/completions", json=ask, headers={"X-Hive-Cache-TTL": "60"})
            for _ in range(2)
        ]
    assert [p["choices"][0]["message"]["content"] for p in plain] == [
        "answer 1",
        "answer 2",
    ]  # off by default
    assert [c.json()["choices"][0]["message"]["content"] for c in cached] == ["answer 3", "answer 3"]
    assert len(calls) == 3 and cached[1].headers["x-hive-cache"] == "hit"


async def test_a_cached_answer_is_forgotten_by_the_server_after_its_ttl(bus: Bus, hive: Hive) -> None:
    calls: list[str] = []

    async def counted(task: Task) -> str:
        calls.append(task.id)
        return f"answer {len(calls)}"

    asked = msgspec.convert(
        {"provider": "ttl", "prompt": "same", "id": new_task_id(), "submitted_at_ms": 0}, Task
    )
    names = bus.names
    subject = names.cache_subject("ttl", cache_key(asked, None))  # a handler's worker has no model

    async def kept() -> bool:
        try:
            await bus.js.get_last_msg(names.cache_stream, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async with running_worker(bus, "ttl", FunctionProvider(counted)):
        first = await hive.wait(await hive.submit("ttl", "same", cache_ttl_s=3), 10)
        assert await kept()
        twin = await hive.wait(await hive.submit("ttl", "same", cache_ttl_s=3), 10)

        async def forgotten() -> bool:
            return not await kept()

        await eventually(forgotten, 15, "the server to drop the cached answer at its TTL")
        later = await hive.wait(await hive.submit("ttl", "same", cache_ttl_s=3), 10)
    assert (first.output, twin.output, later.output) == ("answer 1", "answer 1", "answer 2")
    assert (first.cached, twin.cached, later.cached) == (False, True, False)
    assert len(calls) == 2
