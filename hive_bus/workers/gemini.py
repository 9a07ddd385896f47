"""``gemini``: Google's Gemini API through google-genai's async client (which does not retry by itself).

Credentials from ``GEMINI_API_KEY`` or ``GOOGLE_API_KEY``; the SDK honours ``GOOGLE_GEMINI_BASE_URL``.
A 429 is ``RESOURCE_EXHAUSTED`` whose ``details`` hold a ``google.rpc.RetryInfo`` (``retryDelay: "47s"``)
and a ``google.rpc.QuotaFailure`` whose ``quotaId`` says per minute or per day; a quota of 0 means the
model is not available to this key at all, which no waiting fixes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
from google import genai
from google.genai import errors, types

from hive_bus import (
    FailNow,
    JsonObjectFormat,
    JsonSchemaFormat,
    NoQuota,
    Output,
    ProviderError,
    ProviderKey,
    Quota,
    RetryAfter,
    RetryLater,
    Task,
    Usage,
)

from ._classify import by_status, not_the_api, parse_duration_s, scrub

DEFAULT_MODEL = "gemini-2.5-flash"
# google-genai runs on httpx2 where that is installed (the anthropic and openai SDKs bring it), else httpx.
NO_ANSWER: tuple[type[Exception], ...] = (httpx.TransportError, OSError, TimeoutError)
try:
    import httpx2

    NO_ANSWER += (httpx2.TransportError,)
except ImportError:  # pragma: no cover - depends on what else is installed
    pass


class GeminiProvider:
    name = "gemini"

    def __init__(self, *, api_key: str, model: str | None = None, base_url: str | None = None) -> None:
        self._key = api_key
        self._model = self.default_model = model or DEFAULT_MODEL
        options = types.HttpOptions(base_url=base_url) if base_url else None
        self._client = genai.Client(api_key=api_key, http_options=options)

    async def complete(self, task: Task) -> Output:
        request = _request(task, task.model or self._model)
        model = request["model"]
        try:
            response = await self._client.aio.models.generate_content(**request)
        except Exception as exc:
            raise _outcome(exc, self._key) from None
        text = response.text
        if text is None:
            reason = response.candidates[0].finish_reason if response.candidates else "no candidates"
            raise FailNow(
                f"gemini returned no text (finish reason {reason}); the prompt may be blocked", status=400
            )
        meta = response.usage_metadata
        usage = None
        if meta is not None:
            usage = Usage(
                input_tokens=meta.prompt_token_count or 0, output_tokens=meta.candidates_token_count or 0
            )
        reason = response.candidates[0].finish_reason if response.candidates else None
        return Output(value=text, model=model, usage=usage, finish_reason=_finish(reason))

    async def stream(self, task: Task) -> AsyncIterator[str | Output]:
        """The output as Gemini produces it (``streamGenerateContent?alt=sse``), then the whole
        :class:`Output`; errors are classified as :meth:`complete` classifies them."""
        request = _request(task, task.model or self._model)
        model = request["model"]
        pieces: list[str] = []
        meta: types.GenerateContentResponseUsageMetadata | None = None
        reason: object = "no candidates"
        try:
            responses = await self._client.aio.models.generate_content_stream(**request)
            async for response in responses:
                meta = response.usage_metadata or meta
                if response.candidates and response.candidates[0].finish_reason is not None:
                    reason = response.candidates[0].finish_reason
                text = response.text
                if text:
                    pieces.append(text)
                    yield text
        except Exception as exc:
            raise _outcome(exc, self._key) from None
        if not pieces:
            raise FailNow(
                f"gemini returned no text (finish reason {reason}); the prompt may be blocked", status=400
            )
        usage = None
        if meta is not None:
            usage = Usage(
                input_tokens=meta.prompt_token_count or 0, output_tokens=meta.candidates_token_count or 0
            )
        finish = _finish(reason) if isinstance(reason, types.FinishReason) else None
        yield Output(value="".join(pieces), model=model, usage=usage, finish_reason=finish)

    async def aclose(self) -> None:
        await self._client.aio.aclose()
        self._client.close()


_FILTERED = frozenset(
    {
        types.FinishReason.SAFETY, types.FinishReason.RECITATION, types.FinishReason.BLOCKLIST,
        types.FinishReason.PROHIBITED_CONTENT, types.FinishReason.SPII,
    }
)  # fmt: skip


def _finish(reason: types.FinishReason | None) -> str | None:
    """Gemini's finish reason in OpenAI's words."""
    if reason is None:
        return None
    if reason == types.FinishReason.MAX_TOKENS:
        return "length"
    return "content_filter" if reason in _FILTERED else "stop"


def _request(task: Task, model: str) -> dict[str, Any]:
    """Every argument of ``generate_content`` for the task: the one place a request is built (the plain
    call and a streamed one share it).

    Gemini's turns are ``contents`` of role ``user`` or ``model`` (an assistant's turn); system
    messages go to ``system_instruction``. A JSON ``response_format`` asks for
    ``response_mime_type="application/json"``, with the schema as ``response_json_schema`` (JSON
    Schema as it is, which google-genai sends as ``responseJsonSchema``)."""
    system: list[str] = []
    contents: list[types.Content] = []
    for message in task.conversation():
        if message.role == "system":
            system.append(message.text)
        else:
            role = "model" if message.role == "assistant" else "user"
            contents.append(types.Content(role=role, parts=[types.Part(text=message.text)]))
    if not contents:
        raise FailNow("gemini: the task has only system messages; generateContent needs a user turn")
    return {"model": model, "contents": contents, "config": _config(task, system)}


def _config(task: Task, system: list[str]) -> types.GenerateContentConfig | None:
    params = task.params
    values: dict[str, Any] = {"system_instruction": "\n\n".join(system) or None}
    if params is not None:
        values |= {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_output_tokens": params.max_tokens,
            "stop_sequences": params.stop,
            "seed": params.seed,
        }
    fmt = task.response_format
    if isinstance(fmt, JsonObjectFormat | JsonSchemaFormat):
        values["response_mime_type"] = "application/json"
    if isinstance(fmt, JsonSchemaFormat):
        values["response_json_schema"] = fmt.json_schema.schema
    values = {k: v for k, v in values.items() if v is not None}
    return types.GenerateContentConfig(**values) if values else None


def _outcome(exc: Exception, key: str) -> Exception:
    """What a failed call (or stream) means: the API's error classified, no answer at all a passing
    fault, anything else raised as it is."""
    if isinstance(exc, errors.APIError):
        return classify(exc, key)
    if isinstance(exc, NO_ANSWER):
        return RetryLater(f"gemini did not answer: {scrub(str(exc), [key]) or type(exc).__name__}")
    if isinstance(exc, json.JSONDecodeError):  # the SDK read a 200 whose body is not JSON
        return not_the_api("gemini", f"not JSON ({exc}): {exc.doc}", [key])
    return exc


def classify(exc: errors.APIError, key: str = "") -> ProviderError:
    """What a Gemini API error means for the task."""
    error = _error_body(exc.details)
    message = scrub(str(error.get("message") or exc.message or exc), [key])
    if exc.code == 429:
        return _rate_limited(error, message)
    if exc.code == 400 and "API_KEY_INVALID" in str(error.get("details", "")):
        return by_status("gemini", 401, message)
    return by_status("gemini", exc.code, message)


def _error_body(details: Any) -> dict[str, Any]:
    if isinstance(details, dict):
        inner = details.get("error", details)
        return inner if isinstance(inner, dict) else {}
    return {}


def _rate_limited(error: dict[str, Any], message: str) -> ProviderError:
    delay_s: float | None = None
    quota_ids: list[str] = []
    zero = False
    for detail in error.get("details") or []:
        kind = str(detail.get("@type", ""))
        if kind.endswith("RetryInfo"):
            delay_s = parse_duration_s(str(detail.get("retryDelay", "")))
        elif kind.endswith("QuotaFailure"):
            for violation in detail.get("violations") or []:
                quota_ids.append(str(violation.get("quotaId", "")))
                zero = zero or str(violation.get("quotaValue", "")) == "0"
    ids = ", ".join(q for q in quota_ids if q) or "unnamed quota"
    if zero:
        return NoQuota(f"gemini quota {ids} is 0 for this key: the model is not available on its tier")
    quota: Quota = "day" if "PerDay" in ids else "minute" if "PerMinute" in ids else "unknown"
    if quota == "day":
        # Daily quotas reset at midnight Pacific; a short retryDelay on a per-day 429 would only buy
        # more 429s until then.
        delay_s = max(delay_s or 0.0, _until_pacific_midnight_s())
    elif delay_s is None:
        delay_s = 60.0
    scope = {"minute": "per-minute", "day": "per-day"}.get(quota, "rate")
    return RetryAfter(
        f"gemini {scope} quota exhausted ({ids}): {message}", retry_after_s=delay_s, quota=quota
    )


def _until_pacific_midnight_s() -> float:
    """Gemini's daily quotas reset at midnight Pacific time."""
    try:
        zone: dt.tzinfo = ZoneInfo("America/Los_Angeles")
    except ZoneInfoNotFoundError:
        zone = dt.timezone(dt.timedelta(hours=-8))
    now = dt.datetime.now(zone)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), zone)
    return (midnight - now).total_seconds()


def from_env(environ: Mapping[str, str], *, model: str | None = None) -> list[ProviderKey]:
    from . import checked_base_url, keyed

    base_url = checked_base_url(environ, "GOOGLE_GEMINI_BASE_URL")
    return keyed(
        "gemini", environ, ["GEMINI_API_KEY", "GOOGLE_API_KEY"], "GEMINI_API_KEYS",
        lambda key: GeminiProvider(api_key=key, model=model, base_url=base_url),
    )  # fmt: skip
