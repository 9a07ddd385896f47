"""Anthropic's Messages API (api.anthropic.com) as the anthropic SDK calls it: ``POST /v1/messages`` with
``x-api-key`` and ``anthropic-version``.

Reproduces:

* Success: ``{"id": "msg_...", "type": "message", "role": "assistant", "model", "content": [{"type":
  "text", "text"}], "stop_reason": "end_turn", "stop_sequence": null, "usage": {"input_tokens",
  "output_tokens", ...}}``.
* On every answer: ``request-id`` (``req_...``), ``anthropic-organization-id`` and the
  ``anthropic-ratelimit-{requests,input-tokens,output-tokens,tokens}-{limit,remaining,reset}`` headers,
  resets as RFC 3339 times (the window's when a limit is set).
* Streamed (``"stream": true``): the events ``message_start`` (the message with empty content and the
  input usage), ``content_block_start``, a ``ping``, one ``content_block_delta`` (``text_delta``) per
  piece of text, ``content_block_stop``, ``message_delta`` (``stop_reason`` and the output usage) and
  ``message_stop``, each as ``event: NAME`` and ``data: {...}``. Errors (a 429) come before the stream.
* Errors in ``{"type": "error", "error": {"type", "message"}, "request_id"}``: 429 ``rate_limit_error``
  with ``retry-after`` (whole seconds, rounded up), 401 ``authentication_error`` ("invalid x-api-key"),
  400 ``invalid_request_error`` (also for a missing ``anthropic-version``), 403 ``permission_error``,
  404 ``not_found_error``, 413 ``request_too_large``, 500 ``api_error``, 504 ``timeout_error``,
  529 ``overloaded_error``; ``x-should-retry: true`` on the ones worth retrying.
* Roles ``user`` and ``assistant`` only (a ``system`` message is a 400: the system prompt is the
  top-level ``system``); an unknown top-level field is a 400; ``tools`` each need a ``name`` and an
  ``input_schema`` of type object, and a ``tool_choice`` of ``{"type": "tool", "name"}`` forces one: the
  answer is then a ``tool_use`` block whose ``input`` is the reply parsed as JSON, ``stop_reason:
  "tool_use"``.
* Anthropic has no per-day request limit; the fake's daily quota answers its 429 with a per-day wording
  and the long ``retry-after``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping

from ._api import ProviderApi, Route, StreamReply
from ._common import (
    BadRequest,
    ChatRequest,
    JsonObject,
    Reply,
    non_empty,
    phrase,
    pieces,
    random_id,
    require_list,
    require_object,
    rfc3339_in,
    sse,
    texts_of,
    whole_seconds,
    words,
)
from ._state import RateLimited, Snapshot

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
NOMINAL_RPM = 4_000
NOMINAL_TOKENS_PM = 400_000

_ERRORS = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    500: ("api_error", "Internal server error"),
    503: ("api_error", "Service unavailable"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}


# What the Messages API reads; any other name is a 400 ("Extra inputs are not permitted").
_REQUEST_FIELDS = {
    "model", "messages", "max_tokens", "system", "temperature", "top_p", "top_k", "stop_sequences",
    "stream", "metadata", "tools", "tool_choice", "thinking", "service_tier", "container", "mcp_servers",
}  # fmt: skip


def _forced_tool(body: JsonObject) -> str | None:
    """The tool ``tool_choice`` forces (``{"type": "tool", "name": ...}``), checked as the API checks
    ``tools``: each with a name and an ``input_schema`` of type object."""
    tools = body.get("tools")
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list):
            raise BadRequest("tools: Input should be a valid list")
        for i, tool in enumerate(tools):
            tool = require_object(tool, f"tools.{i}")
            if not isinstance(tool.get("name"), str):
                raise BadRequest(f"tools.{i}.custom.name: Field required")
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise BadRequest(f"tools.{i}.custom.input_schema: Field required")
            if schema.get("type") != "object":
                raise BadRequest(f"tools.{i}.custom.input_schema.type: Input should be 'object'")
            names.append(tool["name"])
    choice = body.get("tool_choice")
    if choice is None:
        return None
    choice = require_object(choice, "tool_choice")
    if choice.get("type") != "tool":
        return None
    if choice.get("name") not in names:
        raise BadRequest(f"tool_choice.name: the tool {choice.get('name')!r} is not in tools")
    return str(choice["name"])


def _request_id() -> str:
    return "req_011C" + random_id(20, _BASE58)


class AnthropicApi(ProviderApi):
    name = "anthropic"
    server_header = "cloudflare"
    nominal_rpm = 50

    def __init__(self) -> None:
        self.organization = str(uuid.uuid4())

    def route(self, method: str, path: str) -> Route | None:
        return Route() if path == "/v1/messages" else None

    def api_key(self, headers: Mapping[str, str], query: Mapping[str, list[str]]) -> str | None:
        if headers.get("x-api-key"):
            return headers["x-api-key"]
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None

    def precheck(self, headers: Mapping[str, str]) -> Reply | None:
        if not headers.get("anthropic-version"):
            return self._error(400, "anthropic-version: header is required", Snapshot(None, None))
        return None

    def parse(self, body: JsonObject, route: Route) -> ChatRequest:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model: Field required")
        if not isinstance(body.get("max_tokens"), int):
            raise BadRequest("max_tokens: Field required")
        for name in body:
            if name not in _REQUEST_FIELDS:
                raise BadRequest(f"{name}: Extra inputs are not permitted")
        messages = require_list(body.get("messages"), "messages: Field required")
        texts = texts_of(body.get("system"))
        for i, message in enumerate(messages):
            message = require_object(message, f"messages.{i}")
            if message.get("role") not in ("user", "assistant"):
                raise BadRequest(
                    f"messages.{i}.role: Input should be 'user' or 'assistant'"
                    + (
                        " (the Messages API takes a top-level `system` parameter, not a system message)"
                        if message.get("role") == "system"
                        else ""
                    )
                )
            texts.extend(texts_of(message.get("content")))
        prompt = " ".join(texts_of(messages[-1].get("content")))
        tool = _forced_tool(body)
        return ChatRequest(
            model=model, prompt=prompt, input_texts=non_empty(texts), json_mode=tool is not None,
            forced_tool=tool, max_output_tokens=body["max_tokens"],
        )  # fmt: skip

    def _headers(self, snapshot: Snapshot, request_id: str | None = None) -> dict[str, str]:
        budget = snapshot.window or snapshot.daily
        limit, remaining, reset_s = (
            (budget.limit, budget.remaining, budget.reset_s)
            if budget
            else (NOMINAL_RPM, NOMINAL_RPM - 1, 60 / NOMINAL_RPM)
        )
        headers = {
            "request-id": request_id or _request_id(),
            "anthropic-organization-id": self.organization,
            "anthropic-ratelimit-requests-limit": str(limit),
            "anthropic-ratelimit-requests-remaining": str(remaining),
            "anthropic-ratelimit-requests-reset": rfc3339_in(reset_s),
        }
        for kind in ("input-tokens", "output-tokens", "tokens"):
            headers |= {
                f"anthropic-ratelimit-{kind}-limit": str(NOMINAL_TOKENS_PM),
                f"anthropic-ratelimit-{kind}-remaining": str(NOMINAL_TOKENS_PM),
                f"anthropic-ratelimit-{kind}-reset": rfc3339_in(0),
            }
        return headers

    def _error(
        self, status: int, message: str, snapshot: Snapshot, extra: Mapping[str, str] | None = None
    ) -> Reply:
        request_id = _request_id()
        type_ = _ERRORS.get(status, ("api_error" if status >= 500 else "invalid_request_error", ""))[0]
        body = {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}
        headers = self._headers(snapshot, request_id)
        if status in (408, 409, 429) or status >= 500:
            headers["x-should-retry"] = "true"
        return Reply(status, body, headers | dict(extra or {}))

    def success(self, request: ChatRequest, text: str, snapshot: Snapshot) -> Reply:
        content: list[JsonObject] = [{"type": "text", "text": text}]
        if request.forced_tool is not None:  # a forced tool answers with its input, an object
            try:
                given = json.loads(text)
            except ValueError:
                given = None
            tool_input = given if isinstance(given, dict) else {}
            content = [
                {"type": "tool_use", "id": "toolu_01" + random_id(22, _BASE58), "name": request.forced_tool,
                 "input": tool_input}
            ]  # fmt: skip
        body = {
            "id": "msg_01" + random_id(22, _BASE58),
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": content,
            "stop_reason": _stop_reason(request),
            "stop_sequence": None,
            "usage": {
                "input_tokens": request.input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": words(text),
                "service_tier": "standard",
            },
        }
        return Reply(200, body, self._headers(snapshot))

    def stream(self, request: ChatRequest, text: str, snapshot: Snapshot, body: JsonObject) -> StreamReply:
        message: JsonObject = {
            "id": "msg_01" + random_id(22, _BASE58), "type": "message", "role": "assistant",
            "model": request.model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {
                "input_tokens": request.input_tokens, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0, "output_tokens": 1, "service_tier": "standard",
            },
        }  # fmt: skip
        events = [
            sse({"type": "message_start", "message": message}, "message_start"),
            sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start"),
            sse({"type": "ping"}, "ping"),
        ]  # fmt: skip
        for piece in pieces(text):
            delta = {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            }
            events.append(sse(delta, "content_block_delta"))
        events += [
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse({"type": "message_delta", "delta": {"stop_reason": _stop_reason(request), "stop_sequence": None},
                 "usage": {"output_tokens": words(text)}}, "message_delta"),
            sse({"type": "message_stop"}, "message_stop"),
        ]  # fmt: skip
        return StreamReply(events, self._headers(snapshot))

    def stream_error(self, status: int) -> str:
        """``event: error`` with ``{"type": "error", "error": {"type", "message"}}`` (no request id)."""
        body = self.error(status, None, Route(), Snapshot(None, None)).body
        return sse({"type": "error", "error": body["error"]}, "error")

    def rate_limited(self, request: ChatRequest, hit: RateLimited) -> Reply:
        per = "day" if hit.daily else "minute"
        message = (
            f"This request would exceed the rate limit for your organization ({self.organization}) of "
            f"{hit.limit:,} requests per {per}. For details, refer to: "
            "https://docs.claude.com/en/api/rate-limits. You can see the response headers for current "
            "usage. Please reduce the prompt length or the maximum tokens requested, or try again later. "
            "You may also contact sales at https://www.anthropic.com/contact-sales to discuss your options "
            "for a rate limit increase."
        )
        retry_after = {"retry-after": str(whole_seconds(hit.retry_after_s))}
        return self._error(429, message, hit.snapshot, retry_after)

    def unauthorized(self, key: str | None, snapshot: Snapshot, headers: Mapping[str, str]) -> Reply:
        if key is None:
            message = "x-api-key header is required"
        elif headers.get("x-api-key"):
            message = "invalid x-api-key"
        else:
            message = "Invalid bearer token"
        return self._error(401, message, snapshot)

    def error(self, status: int, request: ChatRequest | None, route: Route, snapshot: Snapshot) -> Reply:
        if status == 404 and request is not None:
            return self._error(404, f"model: {request.model}", snapshot)
        message = _ERRORS[status][1] if status in _ERRORS else phrase(status)
        return self._error(status, message, snapshot)

    def invalid(self, message: str) -> Reply:
        return self._error(400, message, Snapshot(None, None))

    def not_found(self, method: str, path: str) -> Reply:
        return self._error(404, "Not found", Snapshot(None, None))


def _stop_reason(request: ChatRequest) -> str:
    if request.cut:
        return "max_tokens"
    return "end_turn" if request.forced_tool is None else "tool_use"
