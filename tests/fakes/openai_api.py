"""OpenAI-style chat completions: the shared shape of Groq's API and of the OpenAI-compatible servers
(OpenAI itself, Ollama, vLLM, llama.cpp), and the OpenAI flavour of it.

Reproduces, for ``POST /v1/chat/completions`` with ``Authorization: Bearer KEY``:

* Success: a ``chat.completion`` object (``id``, ``object``, ``created``, ``model``,
  ``choices[{index, message{role, content}, finish_reason: "stop"}]`` (``"length"`` for an answer cut
  at ``max_tokens`` or ``max_completion_tokens``, a word a token),
  ``usage{prompt_tokens, completion_tokens, total_tokens}``).
* Errors in ``{"error": {"message", "type", "param", "code"}}``: a 429 with ``type: "requests"``,
  ``code: "rate_limit_exceeded"``, "Please try again in 6.78s." in the message and a ``retry-after``
  header in whole seconds; 401 ``invalid_api_key`` (the key masked in the message, as OpenAI does);
  404 ``model_not_found``; 500/503 ``server_error``.
* Roles ``system``, ``developer``, ``user``, ``assistant``, ``tool``; ``response_format`` of type
  ``text``, ``json_object`` (a message must then say "json", or it is a 400) or ``json_schema`` (with
  its ``name``): a JSON mode answers with JSON text.
* ``x-ratelimit-limit-requests``/``-remaining-requests``/``-reset-requests`` headers only while a limit
  is set (local servers send none).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from ._api import ProviderApi, Route, StreamReply
from ._common import (
    BadRequest,
    ChatRequest,
    JsonObject,
    Reply,
    go_duration,
    non_empty,
    phrase,
    pieces,
    random_id,
    require_list,
    require_object,
    sse,
    texts_of,
    whole_seconds,
    words,
)
from ._state import RateLimited, Snapshot

_ROLES = ("system", "developer", "user", "assistant", "tool")


def _json_mode(response_format: object, texts: list[str]) -> bool:
    """Whether ``response_format`` asks for JSON, refused as the API refuses it: an unknown type, a
    ``json_schema`` without its name, or ``json_object`` with no message saying "json"."""
    if response_format is None:
        return False
    fmt = require_object(response_format, "'response_format'")
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise BadRequest(
            f"Invalid value: '{kind}'. Supported values are: 'json_object', 'json_schema', and 'text'."
        )
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequest("Missing required parameter: 'response_format.json_schema.name'.")
        if "schema" in spec and not isinstance(spec["schema"], dict):
            raise BadRequest("Invalid type for 'response_format.json_schema.schema': expected an object.")
    if kind == "json_object" and not any("json" in text.lower() for text in texts):
        raise BadRequest(
            "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
            "'json_object'."
        )
    return bool(kind != "text")


class ChatCompletionsApi(ProviderApi):
    """What Groq and the OpenAI-compatible servers share: the request, the bearer key, the body shapes."""

    path = "/v1/chat/completions"

    def route(self, method: str, path: str) -> Route | None:
        return Route() if path == self.path else None

    def api_key(self, headers: Mapping[str, str], query: Mapping[str, list[str]]) -> str | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None

    def parse(self, body: JsonObject, route: Route) -> ChatRequest:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' : property 'model' is missing")
        messages = require_list(body.get("messages"), "'messages' : property 'messages' is missing")
        texts: list[str] = []
        for i, message in enumerate(messages):
            message = require_object(message, f"'messages.{i}'")
            if message.get("role") not in _ROLES:
                raise BadRequest(
                    f"Invalid value: '{message.get('role')}'. Supported values are: 'system', 'assistant', "
                    "'user', 'tool', and 'developer'."
                )
            texts.extend(texts_of(message.get("content")))
        # the text parts of a message are one text, read in order (as the model reads them)
        prompt = "".join(texts_of(messages[-1].get("content")))
        json_mode = _json_mode(body.get("response_format"), texts)
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        return ChatRequest(
            model=model, prompt=prompt, input_texts=non_empty(texts), json_mode=json_mode,
            max_output_tokens=cap if isinstance(cap, int) else None,
        )  # fmt: skip

    def completion(self, request: ChatRequest, text: str, completion_id: str) -> JsonObject:
        prompt_tokens, output_tokens = request.input_tokens, words(text)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "length" if request.cut else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": prompt_tokens + output_tokens,
            },
        }

    def chunks(
        self,
        request: ChatRequest,
        text: str,
        body: JsonObject,
        base: JsonObject,
        *,
        first_extra: JsonObject | None = None,
        last_extra: JsonObject | None = None,
    ) -> list[str]:
        """A streamed completion as OpenAI sends it: a first ``chat.completion.chunk`` whose delta holds
        the role, one per piece of content, one with ``finish_reason`` and an empty delta, with
        ``stream_options.include_usage`` one with no choices and the usage (every other chunk then has
        ``"usage": null``), and ``data: [DONE]``."""
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        base = {"object": "chat.completion.chunk", "created": int(time.time()), "model": request.model} | base

        def chunk(delta: JsonObject, finish_reason: str | None = None, **extra: object) -> JsonObject:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return base | {"choices": [choice]} | ({"usage": None} if include_usage else {}) | extra

        usage = self.usage(request, text)
        events = [sse(chunk({"role": "assistant", "content": ""}, **(first_extra or {})))]
        events += [sse(chunk({"content": piece})) for piece in pieces(text)]
        events.append(sse(chunk({}, "length" if request.cut else "stop", **(last_extra or {}))))
        if include_usage:
            events.append(sse(base | {"choices": [], "usage": usage}))
        events.append(sse("[DONE]"))
        return events

    def stream_error(self, status: int) -> str:
        """OpenAI-style servers end a failed stream with ``data: {"error": {...}}``, their error body."""
        return sse(self.error(status, None, Route(), Snapshot(None, None)).body)

    @staticmethod
    def usage(request: ChatRequest, text: str) -> JsonObject:
        prompt_tokens, output_tokens = request.input_tokens, words(text)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens,
        }

    @staticmethod
    def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> JsonObject:
        return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class OpenAIApi(ChatCompletionsApi):
    """OpenAI's own wording (``requests per min (RPM)``, ``Incorrect API key provided``)."""

    name = "openai"
    server_header = "uvicorn"
    nominal_rpm = 500

    def __init__(self) -> None:
        self.organization = "org-" + random_id(24)

    def _headers(self, snapshot: Snapshot, request_id: str | None = None) -> dict[str, str]:
        headers = {"x-request-id": request_id or "req_" + random_id(32, "0123456789abcdef")}
        budget = snapshot.window or snapshot.daily
        if budget is not None:
            headers |= {
                "x-ratelimit-limit-requests": str(budget.limit),
                "x-ratelimit-remaining-requests": str(budget.remaining),
                "x-ratelimit-reset-requests": go_duration(budget.reset_s),
            }
        return headers

    def success(self, request: ChatRequest, text: str, snapshot: Snapshot) -> Reply:
        body = self.completion(request, text, "chatcmpl-" + random_id(29))
        body["system_fingerprint"] = "fp_" + random_id(10, "0123456789abcdef")
        return Reply(200, body, self._headers(snapshot))

    def stream(self, request: ChatRequest, text: str, snapshot: Snapshot, body: JsonObject) -> StreamReply:
        base = {
            "id": "chatcmpl-" + random_id(29),
            "system_fingerprint": "fp_" + random_id(10, "0123456789abcdef"),
        }
        return StreamReply(self.chunks(request, text, body, base), self._headers(snapshot))

    def rate_limited(self, request: ChatRequest, hit: RateLimited) -> Reply:
        scope = "requests per day (RPD)" if hit.daily else "requests per min (RPM)"
        message = (
            f"Rate limit reached for {request.model} in organization {self.organization} on {scope}: "
            f"Limit {hit.limit}, Used {hit.used}, Requested 1. Please try again in "
            f"{go_duration(hit.retry_after_s)}. Visit https://platform.openai.com/account/rate-limits to "
            "learn more."
        )
        headers = self._headers(hit.snapshot) | {"retry-after": str(whole_seconds(hit.retry_after_s))}
        return Reply(429, self.error_body(message, "requests", "rate_limit_exceeded"), headers)

    def unauthorized(self, key: str | None, snapshot: Snapshot, headers: Mapping[str, str]) -> Reply:
        if key is None:
            message = (
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            return Reply(
                401, self.error_body(message, "invalid_request_error", None), self._headers(snapshot)
            )
        message = (
            f"Incorrect API key provided: {_masked(key)}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
        return Reply(
            401, self.error_body(message, "invalid_request_error", "invalid_api_key"), self._headers(snapshot)
        )

    def error(self, status: int, request: ChatRequest | None, route: Route, snapshot: Snapshot) -> Reply:
        model = request.model if request else ""
        body = {
            400: self.error_body("Invalid request.", "invalid_request_error", None),
            403: self.error_body(
                "Country, region, or territory not supported",
                "request_forbidden",
                "unsupported_country_region_territory",
            ),
            404: self.error_body(
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            ),
            500: self.error_body(
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
            ),
            503: self.error_body("The server is overloaded or not ready yet.", "server_error", None),
        }.get(status) or self.error_body(
            phrase(status), "server_error" if status >= 500 else "invalid_request_error", None
        )
        return Reply(status, body, self._headers(snapshot))

    def invalid(self, message: str) -> Reply:
        return Reply(400, self.error_body(message, "invalid_request_error", None))

    def not_found(self, method: str, path: str) -> Reply:
        return Reply(
            404,
            self.error_body(
                f"Unknown request URL: {method} {path}. Please check the URL for typos.",
                "invalid_request_error",
                "unknown_url",
            ),
        )


def _masked(key: str) -> str:
    """How OpenAI echoes a refused key: its first and last characters only."""
    if len(key) <= 8:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]
