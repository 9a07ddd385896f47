"""The provider fakes answer the real SDKs as the real APIs do: each SDK is driven, unpatched, over a
loopback socket, and the tests check what the SDK exposes (text, usage, errors, headers)."""

from __future__ import annotations

import datetime as dt
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import anyio
import groq
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from .fakes import ProviderFakes, go_duration

pytestmark = pytest.mark.anyio

GEMINI_MODEL = "gemini-2.0-flash"
GROQ_MODEL = "llama-3.3-70b-versatile"
CLAUDE_MODEL = "claude-haiku-4-5"  # one the SDK does not warn about (warnings are errors)
LOCAL_MODEL = "llama3.2"


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes(max_lifetime_s=60) as running:
        yield running
        assert running.server_errors == []


@asynccontextmanager
async def gemini(fakes: ProviderFakes, key: str = "gemini-key") -> AsyncIterator[genai.client.AsyncClient]:
    client = genai.Client(api_key=key, http_options=genai_types.HttpOptions(base_url=fakes.gemini_base_url))
    try:
        yield client.aio
    finally:
        await client.aio.aclose()
        client.close()


def groq_client(fakes: ProviderFakes, key: str = "groq-key") -> groq.AsyncGroq:
    return groq.AsyncGroq(api_key=key, base_url=fakes.groq_base_url, max_retries=0)


def anthropic_client(fakes: ProviderFakes, key: str = "anthropic-key") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=key, base_url=fakes.anthropic_base_url, max_retries=0)


def openai_client(fakes: ProviderFakes, key: str = "openai-key") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=fakes.openai_base_url, max_retries=0)


def user(text: str) -> Any:
    return [{"role": "user", "content": text}]


def try_again_s(message: str) -> float:
    found = re.search(r"try again in ((?:\d+(?:\.\d+)?(?:ms|h|m|s))+)", message)
    assert found, message
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", found.group(1)))


def details_of(body: Any, kind: str) -> dict[str, Any]:
    found = [d for d in body["error"]["details"] if d["@type"].endswith(kind)]
    assert len(found) == 1, body
    detail: dict[str, Any] = found[0]
    return detail


# -- Gemini ------------------------------------------------------------------------------------------


async def test_gemini_answers_each_prompt_with_its_usage(fakes: ProviderFakes) -> None:
    async with gemini(fakes) as client:
        response = await client.models.generate_content(
            model=GEMINI_MODEL,
            contents="three little words",
            config=genai_types.GenerateContentConfig(system_instruction="be brief"),
        )
    assert response.text == "reply: three little words"
    assert response.candidates and response.candidates[0].finish_reason == genai_types.FinishReason.STOP
    meta = response.usage_metadata
    assert meta is not None
    assert (meta.prompt_token_count, meta.candidates_token_count, meta.total_token_count) == (5, 4, 9)
    assert response.model_version == GEMINI_MODEL
    assert (fakes.gemini.requests, fakes.gemini.completed) == (1, 1)
    assert fakes.gemini.prompts_seen == ["three little words"]


async def test_gemini_per_minute_429_carries_retry_info_and_quota(fakes: ProviderFakes) -> None:
    fakes.gemini.limit(2, window_s=30)
    async with gemini(fakes) as client:
        for i in range(2):
            await client.models.generate_content(model=GEMINI_MODEL, contents=f"p{i}")
        with pytest.raises(genai_errors.ClientError) as caught:
            await client.models.generate_content(model=GEMINI_MODEL, contents="one too many")
    exc = caught.value
    assert (exc.code, exc.status) == (429, "RESOURCE_EXHAUSTED")
    assert exc.message and exc.message.startswith("You exceeded your current quota")
    assert details_of(exc.details, "RetryInfo")["retryDelay"] == "30s"  # 29.99 s left, rounded up
    violation = details_of(exc.details, "QuotaFailure")["violations"][0]
    assert violation["quotaId"] == "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    assert violation["quotaValue"] == "2"
    assert violation["quotaDimensions"] == {"location": "global", "model": GEMINI_MODEL}
    details_of(exc.details, "Help")
    # google-genai does not retry by itself: the 429 was one request
    assert (fakes.gemini.requests, fakes.gemini.rate_limited) == (3, 1)
    assert fakes.gemini.rate_limited_by_key == {"gemini-key": 1}


async def test_gemini_window_reopens_when_it_ends(fakes: ProviderFakes) -> None:
    fakes.gemini.limit(1, window_s=0.3)
    async with gemini(fakes) as client:
        await client.models.generate_content(model=GEMINI_MODEL, contents="first")
        with pytest.raises(genai_errors.ClientError) as caught:
            await client.models.generate_content(model=GEMINI_MODEL, contents="too soon")
        assert details_of(caught.value.details, "RetryInfo")["retryDelay"] == "1s"
        await anyio.sleep(0.35)
        response = await client.models.generate_content(model=GEMINI_MODEL, contents="next window")
    assert response.text == "reply: next window"
    assert fakes.gemini.prompts_completed == ["first", "next window"]


async def test_gemini_daily_quota_is_a_per_day_429(fakes: ProviderFakes) -> None:
    fakes.gemini.daily_quota(1)
    async with gemini(fakes) as client:
        await client.models.generate_content(model=GEMINI_MODEL, contents="today's one")
        for _ in range(2):
            with pytest.raises(genai_errors.ClientError) as caught:
                await client.models.generate_content(model=GEMINI_MODEL, contents="again")
    violation = details_of(caught.value.details, "QuotaFailure")["violations"][0]
    assert violation["quotaId"] == "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
    delay = details_of(caught.value.details, "RetryInfo")["retryDelay"]
    assert delay.endswith("s") and int(delay[:-1]) > 86_000
    assert fakes.gemini.rate_limited == 2


async def test_gemini_refuses_an_unknown_key_with_api_key_invalid(fakes: ProviderFakes) -> None:
    fakes.gemini.valid_keys = {"the-good-key"}
    async with gemini(fakes, key="a-bad-key") as client:
        with pytest.raises(genai_errors.ClientError) as caught:
            await client.models.generate_content(model=GEMINI_MODEL, contents="hello")
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    assert caught.value.message == "API key not valid. Please pass a valid API key."
    assert details_of(caught.value.details, "ErrorInfo")["reason"] == "API_KEY_INVALID"
    async with gemini(fakes, key="the-good-key") as client:
        assert (await client.models.generate_content(model=GEMINI_MODEL, contents="hi")).text == "reply: hi"


async def test_gemini_fail_next_gives_server_errors_then_recovers(fakes: ProviderFakes) -> None:
    fakes.gemini.fail_next(503)
    fakes.gemini.fail_next(404)
    async with gemini(fakes) as client:
        with pytest.raises(genai_errors.ServerError) as server_error:
            await client.models.generate_content(model=GEMINI_MODEL, contents="a")
        with pytest.raises(genai_errors.ClientError) as not_found:
            await client.models.generate_content(model=GEMINI_MODEL, contents="b")
        response = await client.models.generate_content(model=GEMINI_MODEL, contents="c")
    assert (server_error.value.code, server_error.value.status) == (503, "UNAVAILABLE")
    assert (not_found.value.code, not_found.value.status) == (404, "NOT_FOUND")
    assert not_found.value.message and f"models/{GEMINI_MODEL} is not found for API version v1" in (
        not_found.value.message
    )
    assert response.text == "reply: c"
    assert (fakes.gemini.requests, fakes.gemini.completed, fakes.gemini.rate_limited) == (3, 1, 0)


async def test_gemini_follows_google_gemini_base_url(
    fakes: ProviderFakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", fakes.gemini_base_url)
    client = genai.Client(api_key="env-routed")
    try:
        response = await client.aio.models.generate_content(model=GEMINI_MODEL, contents="via env")
    finally:
        await client.aio.aclose()
        client.close()
    assert response.text == "reply: via env"
    assert fakes.gemini.requests_by_key == {"env-routed": 1}


async def test_gemini_serves_v1beta_too(fakes: ProviderFakes) -> None:
    options = genai_types.HttpOptions(base_url=fakes.gemini_base_url, api_version="v1beta")
    client = genai.Client(api_key="k", http_options=options)
    try:
        response = await client.aio.models.generate_content(model=GEMINI_MODEL, contents="beta")
    finally:
        await client.aio.aclose()
        client.close()
    assert response.text == "reply: beta"


# -- Groq --------------------------------------------------------------------------------------------


async def test_groq_answers_with_usage_and_rate_limit_headers(fakes: ProviderFakes) -> None:
    fakes.groq.daily_quota(1000)
    async with groq_client(fakes) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=GROQ_MODEL,
            messages=[{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello groq"}],
        )
        completion = await raw.parse()
    assert completion.choices[0].message.content == "reply: hello groq"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == GROQ_MODEL
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 3)
    assert completion.usage.total_tokens == 7
    assert completion.x_groq is not None and completion.x_groq.id == raw.headers["x-request-id"]
    assert raw.headers["x-ratelimit-limit-requests"] == "1000"
    assert raw.headers["x-ratelimit-remaining-requests"] == "999"
    assert raw.headers["x-ratelimit-limit-tokens"] == "6000"
    assert raw.headers["x-ratelimit-remaining-tokens"] == "5996"
    assert re.fullmatch(r"(\d+h)?(\d+m)?\d+(\.\d+)?s|\d+ms", raw.headers["x-ratelimit-reset-requests"])
    assert re.fullmatch(r"(\d+m)?\d+(\.\d+)?s|\d+ms", raw.headers["x-ratelimit-reset-tokens"])


async def test_groq_per_minute_429(fakes: ProviderFakes) -> None:
    fakes.groq.limit(1, window_s=6.78)
    async with groq_client(fakes) as client:
        await client.chat.completions.create(model=GROQ_MODEL, messages=user("first"))
        with pytest.raises(groq.RateLimitError) as caught:
            await client.chat.completions.create(model=GROQ_MODEL, messages=user("second"))
    exc = caught.value
    assert exc.status_code == 429
    assert exc.response.headers["retry-after"] == "7"
    assert exc.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert isinstance(exc.body, dict)  # groq keeps the whole body, "error" envelope included
    error = exc.body["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    message = error["message"]
    assert f"Rate limit reached for model `{GROQ_MODEL}` in organization `org_" in message
    assert "on requests per minute (RPM): Limit 1, Used 1, Requested 1." in message
    assert 6.0 < try_again_s(message) <= 6.78
    assert (fakes.groq.requests, fakes.groq.rate_limited) == (2, 1)


async def test_groq_daily_quota_says_rpd_and_a_long_delay(fakes: ProviderFakes) -> None:
    fakes.groq.daily_quota(1, retry_after_s=578.4)
    async with groq_client(fakes) as client:
        await client.chat.completions.create(model=GROQ_MODEL, messages=user("first"))
        with pytest.raises(groq.RateLimitError) as caught:
            await client.chat.completions.create(model=GROQ_MODEL, messages=user("second"))
    message = str(caught.value)
    assert "on requests per day (RPD): Limit 1, Used 1, Requested 1. Please try again in 9m38.4s." in message
    assert caught.value.response.headers["retry-after"] == "579"


async def test_groq_refuses_an_unknown_key(fakes: ProviderFakes) -> None:
    fakes.groq.valid_keys = {"gsk_good"}
    async with groq_client(fakes, key="gsk_bad") as client:
        with pytest.raises(groq.AuthenticationError) as caught:
            await client.chat.completions.create(model=GROQ_MODEL, messages=user("hi"))
    assert caught.value.status_code == 401
    assert caught.value.body == {
        "error": {"message": "Invalid API Key", "type": "invalid_request_error", "code": "invalid_api_key"}
    }
    assert fakes.groq.completed == 0


async def test_groq_follows_groq_base_url(fakes: ProviderFakes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROQ_BASE_URL", fakes.groq_base_url)
    async with groq.AsyncGroq(api_key="env-routed", max_retries=0) as client:
        completion = await client.chat.completions.create(model=GROQ_MODEL, messages=user("via env"))
    assert completion.choices[0].message.content == "reply: via env"
    assert fakes.groq.requests_by_key == {"env-routed": 1}


# -- Anthropic ---------------------------------------------------------------------------------------


async def test_anthropic_answers_with_usage_and_headers(fakes: ProviderFakes) -> None:
    fakes.anthropic.limit(50, window_s=60)
    async with anthropic_client(fakes) as client:
        raw = await client.messages.with_raw_response.create(
            model=CLAUDE_MODEL,
            max_tokens=64,
            system="you are terse",
            messages=[{"role": "user", "content": [{"type": "text", "text": "hello claude"}]}],
        )
        message = await raw.parse()
    assert [block.text for block in message.content if block.type == "text"] == ["reply: hello claude"]
    assert (message.stop_reason, message.model, message.role) == ("end_turn", CLAUDE_MODEL, "assistant")
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 3)
    assert message.id.startswith("msg_")
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "50"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "49"
    reset = dt.datetime.fromisoformat(raw.headers["anthropic-ratelimit-requests-reset"])
    assert reset.tzinfo is not None
    assert 0 <= (reset - dt.datetime.now(dt.UTC)).total_seconds() <= 61


async def test_anthropic_per_minute_429(fakes: ProviderFakes) -> None:
    fakes.anthropic.limit(1, window_s=20)
    async with anthropic_client(fakes) as client:
        await client.messages.create(model=CLAUDE_MODEL, max_tokens=8, messages=user("one"))
        with pytest.raises(anthropic.RateLimitError) as caught:
            await client.messages.create(model=CLAUDE_MODEL, max_tokens=8, messages=user("two"))
    exc = caught.value
    assert exc.status_code == 429
    assert exc.response.headers["retry-after"] == "20"
    assert exc.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert exc.request_id == exc.response.headers["request-id"]
    assert isinstance(exc.body, dict)
    assert exc.body["type"] == "error"
    assert exc.body["error"]["type"] == "rate_limit_error"
    assert "would exceed the rate limit for your organization" in exc.body["error"]["message"]
    assert "of 1 requests per minute" in exc.body["error"]["message"]


async def test_anthropic_daily_quota_and_overload(fakes: ProviderFakes) -> None:
    fakes.anthropic.daily_quota(0)
    fakes.anthropic.fail_next(529)
    async with anthropic_client(fakes) as client:
        with pytest.raises(anthropic.InternalServerError) as overloaded:
            await client.messages.create(model=CLAUDE_MODEL, max_tokens=8, messages=user("busy"))
        with pytest.raises(anthropic.RateLimitError) as daily:
            await client.messages.create(model=CLAUDE_MODEL, max_tokens=8, messages=user("quota"))
    assert overloaded.value.status_code == 529
    assert overloaded.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": overloaded.value.request_id,
    }
    assert overloaded.value.response.headers["x-should-retry"] == "true"
    assert int(daily.value.response.headers["retry-after"]) > 86_000
    assert "requests per day" in daily.value.message


async def test_anthropic_refuses_an_unknown_key(fakes: ProviderFakes) -> None:
    fakes.anthropic.valid_keys = {"sk-ant-good"}
    async with anthropic_client(fakes, key="sk-ant-bad") as client:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await client.messages.create(model=CLAUDE_MODEL, max_tokens=8, messages=user("hi"))
    assert caught.value.status_code == 401
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "authentication_error"
    # This SDK sends the key as "Authorization: Bearer"; with x-api-key the API words it differently.
    async with httpx.AsyncClient(base_url=fakes.anthropic_base_url) as http:
        answer = await http.post(
            "/v1/messages",
            headers={"x-api-key": "sk-ant-bad", "anthropic-version": "2023-06-01"},
            json={"model": CLAUDE_MODEL, "max_tokens": 8, "messages": user("hi")},
        )
        unversioned = await http.post(
            "/v1/messages",
            headers={"x-api-key": "sk-ant-good"},
            json={"model": CLAUDE_MODEL, "max_tokens": 8, "messages": user("hi")},
        )
    assert answer.status_code == 401
    assert answer.json()["error"] == {"type": "authentication_error", "message": "invalid x-api-key"}
    assert unversioned.status_code == 400
    assert unversioned.json()["error"]["message"] == "anthropic-version: header is required"


# -- OpenAI-compatible -------------------------------------------------------------------------------


async def test_openai_compatible_answers_and_rate_limits(fakes: ProviderFakes) -> None:
    fakes.openai.limit(1, window_s=10)
    async with openai_client(fakes) as client:
        completion = await client.chat.completions.create(model=LOCAL_MODEL, messages=user("local hello"))
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=LOCAL_MODEL, messages=user("again"))
    assert completion.choices[0].message.content == "reply: local hello"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 3)
    assert caught.value.response.headers["retry-after"] == "10"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "rate_limit_exceeded"
    assert 9.0 < try_again_s(caught.value.body["message"]) <= 10.0


async def test_openai_compatible_errors(fakes: ProviderFakes) -> None:
    fakes.openai.valid_keys = {"sk-good-key-123456"}
    async with openai_client(fakes, key="sk-wrong-key-987654") as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(model=LOCAL_MODEL, messages=user("hi"))
    fakes.openai.fail_next(500, count=2)
    async with openai_client(fakes, key="sk-good-key-123456") as client:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as failed:
                await client.chat.completions.create(model=LOCAL_MODEL, messages=user("hi"))
        await client.chat.completions.create(model=LOCAL_MODEL, messages=user("recovered"))
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["code"] == "invalid_api_key"
    assert "sk-wrong-key-987654" not in str(refused.value)  # echoed masked, as OpenAI does
    assert failed.value.status_code == 500
    assert fakes.openai.prompts_completed == ["recovered"]


# -- every fail_next status, in each API's own envelope ---------------------------------------------

ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}
GEMINI_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def raw_request(provider: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    chat = {"model": "m", "messages": user("hi")}
    return {
        "gemini": (
            "/v1beta/models/m:generateContent",
            {"x-goog-api-key": "k"},
            {"contents": [{"parts": [{"text": "hi"}]}]},
        ),
        "groq": ("/openai/v1/chat/completions", {"authorization": "Bearer k"}, chat),
        "anthropic": (
            "/v1/messages",
            {"x-api-key": "k", "anthropic-version": "2023-06-01"},
            chat | {"max_tokens": 8},
        ),
        "openai": ("/v1/chat/completions", {"authorization": "Bearer k"}, chat),
    }[provider]


@pytest.mark.parametrize("provider", ["gemini", "groq", "anthropic", "openai"])
async def test_fail_next_answers_each_status_in_the_apis_envelope(
    fakes: ProviderFakes, provider: str
) -> None:
    statuses = [400, 401, 403, 404, 500, 503, 529]
    state = getattr(fakes, provider)
    for status in statuses:
        state.fail_next(status)
    path, headers, body = raw_request(provider)
    async with httpx.AsyncClient(base_url=fakes.url) as http:
        answers = [await http.post(path, headers=headers, json=body) for _ in statuses]
        recovered = await http.post(path, headers=headers, json=body)
    assert [a.status_code for a in answers] == statuses
    assert recovered.status_code == 200
    for status, answer in zip(statuses, answers, strict=True):
        error = answer.json()["error"]
        assert error["message"]
        if provider == "gemini":
            assert error["code"] == status
            assert error["status"] == GEMINI_STATUSES.get(status, "UNKNOWN")
        elif provider == "anthropic":
            assert answer.json()["type"] == "error"
            assert error["type"] == ANTHROPIC_TYPES[status]
            assert answer.json()["request_id"] == answer.headers["request-id"]
        else:
            assert error["type"]
    assert state.completed == 1


# -- the server ----------------------------------------------------------------------------------------


async def test_delay_overlaps_and_each_reply_matches_its_prompt(fakes: ProviderFakes) -> None:
    fakes.openai.delay_s = 0.3
    prompts = [f"prompt number {i}" for i in range(8)]
    outputs: dict[str, str | None] = {}
    started = time.monotonic()
    async with openai_client(fakes) as client:

        async def ask(prompt: str) -> None:
            completion = await client.chat.completions.create(model=LOCAL_MODEL, messages=user(prompt))
            outputs[prompt] = completion.choices[0].message.content

        async with anyio.create_task_group() as tasks:
            for prompt in prompts:
                tasks.start_soon(ask, prompt)
    elapsed = time.monotonic() - started
    assert outputs == {prompt: "reply: " + prompt for prompt in prompts}
    assert 0.3 <= elapsed < 1.0  # side by side; a refused connect would have retried after 1 s
    assert sorted(fakes.openai.prompts_completed) == sorted(prompts)


async def test_windows_are_per_key_and_reset_clears_everything(fakes: ProviderFakes) -> None:
    fakes.groq.limit(1, window_s=30)
    async with groq_client(fakes, key="key-a") as a, groq_client(fakes, key="key-b") as b:
        await a.chat.completions.create(model=GROQ_MODEL, messages=user("a1"))
        await b.chat.completions.create(model=GROQ_MODEL, messages=user("b1"))
        with pytest.raises(groq.RateLimitError):
            await a.chat.completions.create(model=GROQ_MODEL, messages=user("a2"))
        assert fakes.groq.requests_by_key == {"key-a": 2, "key-b": 1}
        assert fakes.groq.rate_limited_by_key == {"key-a": 1}
        fakes.reset()
        assert (fakes.groq.requests, fakes.groq.rate_limited, fakes.groq.prompts_seen) == (0, 0, [])
        await a.chat.completions.create(model=GROQ_MODEL, messages=user("a3"))
        await a.chat.completions.create(model=GROQ_MODEL, messages=user("a4"))  # no limit any more
    assert fakes.groq.completed == 2


async def test_unknown_paths_and_bad_bodies_get_the_apis_errors(fakes: ProviderFakes) -> None:
    async with httpx.AsyncClient(base_url=fakes.url) as http:
        unknown = await http.post("/v1/embeddings", json={}, headers={"Authorization": "Bearer k"})
        broken = await http.post(
            "/openai/v1/chat/completions", content=b"{not json", headers={"Authorization": "Bearer k"}
        )
        empty = await http.post(
            "/v1beta/models/gemini-2.0-flash:generateContent", json={}, headers={"x-goog-api-key": "k"}
        )
        keyless = await http.post(
            "/v1beta/models/gemini-2.0-flash:generateContent", json={"contents": [{"parts": [{"text": "x"}]}]}
        )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    assert empty.status_code == 400 and empty.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert keyless.status_code == 403 and keyless.json()["error"]["status"] == "PERMISSION_DENIED"
    assert (fakes.groq.requests, fakes.gemini.requests, fakes.gemini.completed) == (1, 2, 0)


async def test_keys_are_never_logged(fakes: ProviderFakes, capfd: pytest.CaptureFixture[str]) -> None:
    async with httpx.AsyncClient(base_url=fakes.url) as http:
        await http.post(
            "/v1beta/models/m:generateContent?key=secret-in-query",
            json={"contents": [{"parts": [{"text": "x"}]}]},
        )
    captured = capfd.readouterr()
    assert "secret-in-query" not in captured.out + captured.err
    assert fakes.gemini.completed == 1


def test_stop_closes_the_port_and_the_server_stops_by_itself() -> None:
    fakes = ProviderFakes(max_lifetime_s=0.2).start()
    port = fakes.port
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            fakes.port  # noqa: B018  # raises once stopped
        except RuntimeError:
            break
        time.sleep(0.02)
    with pytest.raises(RuntimeError):
        fakes.url  # noqa: B018
    fakes.stop()  # idempotent, and returns once the timer's stop has closed the socket
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.665, "665ms"),
        (6.78, "6.78s"),
        (578.4, "9m38.4s"),
        (179.56, "2m59.56s"),
        (3600, "1h0m0s"),
        (0, "0s"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
