"""Groq's API (api.groq.com) as the groq SDK calls it: ``POST /openai/v1/chat/completions``.

Reproduces:

* Success: OpenAI's ``chat.completion`` plus Groq's extras: ``usage`` with ``queue_time``/
  ``prompt_time``/``completion_time``/``total_time``, ``system_fingerprint``, ``x_groq.id`` (also sent as
  ``x-request-id``), ``service_tier: on_demand``.
* On every answer: ``x-ratelimit-limit-requests``/``-remaining-requests``/``-reset-requests`` (Groq's
  "requests" headers describe the per-day limit, so the daily quota when set, else the window) and
  ``x-ratelimit-limit-tokens``/``-remaining-tokens``/``-reset-tokens`` (per minute); resets are Go
  durations such as ``2m59.56s`` and ``7.66s``.
* 429: ``retry-after`` in whole seconds (rounded up) and
  ``{"error": {"message": "Rate limit reached for model `M` in organization `org_...` service tier
  `on_demand` on requests per minute (RPM): Limit 30, Used 30, Requested 1. Please try again in 6.78s.
  ...", "type": "requests", "code": "rate_limit_exceeded"}}``; the daily one says
  ``requests per day (RPD)``.
* 401 ``{"error": {"message": "Invalid API Key", "type": "invalid_request_error", "code":
  "invalid_api_key"}}``; 404 ``model_not_found``; 5xx with type ``internal_server_error``. Groq's error
  objects carry no ``param``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._api import Route, StreamReply
from ._common import ChatRequest, JsonObject, Reply, go_duration, phrase, random_id, ulid_like, whole_seconds
from ._state import RateLimited, Snapshot
from .openai_api import ChatCompletionsApi

NOMINAL_RPD = 14_400
TOKENS_PER_MINUTE = 6_000


def _error(message: str, type_: str, code: str | None = None) -> JsonObject:
    error: JsonObject = {"message": message, "type": type_}
    if code is not None:
        error["code"] = code
    return {"error": error}


class GroqApi(ChatCompletionsApi):
    name = "groq"
    server_header = "cloudflare"
    nominal_rpm = 30
    path = "/openai/v1/chat/completions"

    def __init__(self) -> None:
        self.organization = "org_" + ulid_like()

    def _headers(
        self, snapshot: Snapshot, input_tokens: int = 0, request_id: str | None = None
    ) -> dict[str, str]:
        budget = snapshot.daily or snapshot.window
        limit, remaining, reset_s = (
            (budget.limit, budget.remaining, budget.reset_s)
            if budget
            else (NOMINAL_RPD, NOMINAL_RPD - 1, 6.0)
        )
        tokens_left = max(0, TOKENS_PER_MINUTE - input_tokens)
        return {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-limit-tokens": str(TOKENS_PER_MINUTE),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-remaining-tokens": str(tokens_left),
            "x-ratelimit-reset-requests": go_duration(reset_s),
            "x-ratelimit-reset-tokens": go_duration(60.0 * input_tokens / TOKENS_PER_MINUTE),
            "x-request-id": request_id or "req_" + ulid_like(),
            "x-groq-region": "us-west-1",
        }

    def success(self, request: ChatRequest, text: str, snapshot: Snapshot) -> Reply:
        request_id = "req_" + ulid_like()
        body = self.completion(request, text, "chatcmpl-" + random_id(36, "0123456789abcdef-"))
        body["usage"] |= {
            "queue_time": 0.01,
            "prompt_time": 0.001,
            "completion_time": 0.01,
            "total_time": 0.011,
        }
        body["system_fingerprint"] = "fp_" + random_id(10, "0123456789abcdef")
        body["x_groq"] = {"id": request_id}
        body["service_tier"] = "on_demand"
        return Reply(200, body, self._headers(snapshot, request.input_tokens, request_id))

    def stream(self, request: ChatRequest, text: str, snapshot: Snapshot, body: JsonObject) -> StreamReply:
        """Groq's stream: OpenAI's chunks, ``x_groq.id`` on the first and ``x_groq.usage`` (with its
        timings) on the one that finishes."""
        request_id = "req_" + ulid_like()
        base = {
            "id": "chatcmpl-" + random_id(36, "0123456789abcdef-"),
            "system_fingerprint": "fp_" + random_id(10, "0123456789abcdef"),
        }
        usage = self.usage(request, text) | {
            "queue_time": 0.01,
            "prompt_time": 0.001,
            "completion_time": 0.01,
        }
        events = self.chunks(
            request, text, body, base,
            first_extra={"x_groq": {"id": request_id}},
            last_extra={"x_groq": {"id": request_id, "usage": usage}},
        )  # fmt: skip
        return StreamReply(events, self._headers(snapshot, request.input_tokens, request_id))

    def rate_limited(self, request: ChatRequest, hit: RateLimited) -> Reply:
        scope = "requests per day (RPD)" if hit.daily else "requests per minute (RPM)"
        message = (
            f"Rate limit reached for model `{request.model}` in organization `{self.organization}` service "
            f"tier `on_demand` on {scope}: Limit {hit.limit}, Used {hit.used}, Requested 1. Please try again "
            f"in {go_duration(hit.retry_after_s)}. Need more tokens? Upgrade to Dev Tier today at "
            "https://console.groq.com/settings/billing"
        )
        headers = self._headers(hit.snapshot, request.input_tokens)
        headers["retry-after"] = str(whole_seconds(hit.retry_after_s))
        return Reply(429, _error(message, "requests", "rate_limit_exceeded"), headers)

    def unauthorized(self, key: str | None, snapshot: Snapshot, headers: Mapping[str, str]) -> Reply:
        return Reply(
            401,
            _error("Invalid API Key", "invalid_request_error", "invalid_api_key"),
            self._headers(snapshot),
        )

    def error(self, status: int, request: ChatRequest | None, route: Route, snapshot: Snapshot) -> Reply:
        model = request.model if request else ""
        body = {
            400: _error("Invalid request.", "invalid_request_error"),
            403: _error("Forbidden", "permission_error"),
            404: _error(
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            ),
            503: _error(
                f"{model} is currently over capacity. Please try again and back off exponentially. Visit "
                "https://groqstatus.com to see if there is an active incident.",
                "internal_server_error",
            ),
        }.get(status) or _error(
            phrase(status), "internal_server_error" if status >= 500 else "invalid_request_error"
        )
        return Reply(status, body, self._headers(snapshot))

    def invalid(self, message: str) -> Reply:
        return Reply(400, _error(message, "invalid_request_error"))

    def not_found(self, method: str, path: str) -> Reply:
        return Reply(404, _error("Unknown request URL", "invalid_request_error", "unknown_url"))
