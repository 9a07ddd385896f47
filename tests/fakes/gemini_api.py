"""Gemini API (generativelanguage.googleapis.com) as google-genai calls it.

Reproduces:

* ``POST /{v1,v1beta,...}/models/{model}:generateContent`` (and ``:streamGenerateContent?alt=sse``) with the key in ``x-goog-api-key`` (or the
  ``key`` query parameter); google-genai 3.x defaults to ``v1``, older releases to ``v1beta``.
* Success: ``candidates[0].content.parts[0].text``, ``finishReason: STOP``, ``usageMetadata`` with
  ``promptTokenCount``/``candidatesTokenCount``/``totalTokenCount``, ``modelVersion``, ``responseId``.
* Streamed (``streamGenerateContent?alt=sse``): one ``data: {GenerateContentResponse}`` event per piece
  of text, separated by ``\r\n\r\n`` as Google's front end writes them; each has ``usageMetadata`` with
  the prompt's count, and the last also ``finishReason: STOP`` and the candidates' count. Errors (a 429)
  come before the stream, as a plain JSON answer.
* Errors in the ``google.rpc.Status`` envelope ``{"error": {"code", "message", "status", "details"}}``:
  a 429 ``RESOURCE_EXHAUSTED`` with a ``QuotaFailure`` (``quotaId``
  ``GenerateRequestsPerMinutePerProjectPerModel-FreeTier`` or ``...PerDay...``, ``quotaValue``), a
  ``Help`` link and a ``RetryInfo`` (``retryDelay: "47s"``, whole seconds rounded up); a bad key is a
  400 ``INVALID_ARGUMENT`` with ``ErrorInfo.reason: API_KEY_INVALID``; no key at all is a 403
  ``PERMISSION_DENIED``; 404 ``NOT_FOUND`` names the model and API version; 500 ``INTERNAL``;
  503 ``UNAVAILABLE`` ("The model is overloaded").
* Roles ``user`` and ``model`` only, ``systemInstruction`` beside ``contents``; JSON mode as
  ``generationConfig.responseMimeType: application/json`` with ``responseSchema`` or
  ``responseJsonSchema``; an unknown field is a 400 naming it, as the API's JSON parser answers.
* No rate-limit headers: Gemini sends none, and no ``Retry-After`` either.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import unquote

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
    seconds_text,
    sse,
    whole_seconds,
    words,
)
from ._state import RateLimited, Snapshot

CONTENT_TYPE = "application/json; charset=UTF-8"
_PATH = re.compile(r"^/(v1[a-z0-9]*)/models/([^/:]+):(generateContent|streamGenerateContent)$")
_RATE_LIMITS_DOC = "https://ai.google.dev/gemini-api/docs/rate-limits"
_REQUESTS_METRIC = "generativelanguage.googleapis.com/generate_content_free_tier_requests"

# google.rpc.Code names by HTTP status, as the Google APIs map them.
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MESSAGES = {
    400: "Request contains an invalid argument.",
    401: (
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
        "other valid authentication credential. See "
        "https://developers.google.com/identity/sign-in/web/devconsole-project."
    ),
    403: "The caller does not have permission",
    500: (
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting"
    ),
    503: "The model is overloaded. Please try again later.",
    504: "Deadline expired before operation could complete.",
}


def _status(code: int, message: str, details: list[JsonObject] | None = None) -> Reply:
    error: JsonObject = {"code": code, "message": message, "status": _STATUS_NAMES.get(code, "UNKNOWN")}
    if details:
        error["details"] = details
    return Reply(code, {"error": error}, content_type=CONTENT_TYPE)


class GeminiApi(ProviderApi):
    name = "gemini"
    server_header = "scaffolding on HTTPServer2"
    nominal_rpm = 15

    def route(self, method: str, path: str) -> Route | None:
        found = _PATH.match(path)
        if found is None:
            return None
        return Route(
            model=unquote(found.group(2)), version=found.group(1), stream=found.group(3) != "generateContent"
        )

    def api_key(self, headers: Mapping[str, str], query: Mapping[str, list[str]]) -> str | None:
        key = headers.get("x-goog-api-key") or next(iter(query.get("key", [])), None)
        return key or None

    def parse(self, body: JsonObject, route: Route) -> ChatRequest:
        _known(body, _REQUEST_FIELDS, "")
        contents = require_list(
            body.get("contents"), "* GenerateContentRequest.contents: contents is not specified"
        )
        texts: list[str] = []
        system = body.get("systemInstruction", body.get("system_instruction"))
        if system is not None:
            texts.extend(_part_texts(require_object(system, "system_instruction")))
        prompt = ""
        for content in contents:
            content = require_object(content, "contents[]")
            if content.get("role", "user") not in ("user", "model"):
                raise BadRequest("Please use a valid role: user, model.")
            texts.extend(_part_texts(content))
        last_parts = require_object(contents[-1], "contents[]").get("parts")
        if isinstance(last_parts, list) and last_parts and isinstance(last_parts[0], dict):
            prompt = str(last_parts[0].get("text", ""))
        config = body.get("generationConfig", body.get("generation_config"))
        json_mode = _json_mode(config)
        cap = (
            config.get("maxOutputTokens", config.get("max_output_tokens"))
            if isinstance(config, dict)
            else None
        )
        return ChatRequest(
            model=route.model or "", prompt=prompt, input_texts=non_empty(texts), json_mode=json_mode,
            max_output_tokens=cap if isinstance(cap, int) else None,
        )  # fmt: skip

    def success(self, request: ChatRequest, text: str, snapshot: Snapshot) -> Reply:
        prompt_tokens, output_tokens = request.input_tokens, words(text)
        body: JsonObject = {
            "candidates": [
                {
                    "content": {"parts": [{"text": text}], "role": "model"},
                    "finishReason": _finish(request),
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": output_tokens,
                "totalTokenCount": prompt_tokens + output_tokens,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
            },
            "modelVersion": request.model,
            "responseId": random_id(22),
        }
        return Reply(200, body, content_type=CONTENT_TYPE)

    def stream(self, request: ChatRequest, text: str, snapshot: Snapshot, body: JsonObject) -> StreamReply:
        prompt_tokens, response_id = request.input_tokens, random_id(22)
        parts = pieces(text) or [""]
        events = []
        for n, piece in enumerate(parts):
            last = n == len(parts) - 1
            candidate: JsonObject = {"content": {"parts": [{"text": piece}], "role": "model"}, "index": 0}
            usage: JsonObject = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
            if last:
                candidate["finishReason"] = _finish(request)
                usage = {
                    "promptTokenCount": prompt_tokens,
                    "candidatesTokenCount": words(text),
                    "totalTokenCount": prompt_tokens + words(text),
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
                }
            event = {
                "candidates": [candidate], "usageMetadata": usage, "modelVersion": request.model,
                "responseId": response_id,
            }  # fmt: skip
            events.append(sse(event, crlf=True))
        return StreamReply(events, content_type="text/event-stream")

    def stream_error(self, status: int) -> str:
        """A ``google.rpc.Status`` envelope as one more event of the stream."""
        return sse(self.error(status, None, Route(), Snapshot(None, None)).body, crlf=True)

    def rate_limited(self, request: ChatRequest, hit: RateLimited) -> Reply:
        per = "Day" if hit.daily else "Minute"
        message = (
            "You exceeded your current quota, please check your plan and billing details. For more "
            f"information on this error, head to: {_RATE_LIMITS_DOC}. To monitor your current usage, head "
            "to: https://ai.dev/rate-limit. \n"
            f"* Quota exceeded for metric: {_REQUESTS_METRIC}, limit: {hit.limit}, model: {request.model}\n"
            f"Please retry in {seconds_text(hit.retry_after_s)}."
        )
        details: list[JsonObject] = [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": _REQUESTS_METRIC,
                        "quotaId": f"GenerateRequestsPer{per}PerProjectPerModel-FreeTier",
                        "quotaDimensions": {"location": "global", "model": request.model},
                        "quotaValue": str(hit.limit),
                    }
                ],
            },
            {
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [{"description": "Learn more about Gemini API quotas", "url": _RATE_LIMITS_DOC}],
            },
            {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": f"{whole_seconds(hit.retry_after_s)}s",
            },
        ]
        return _status(429, message, details)

    def unauthorized(self, key: str | None, snapshot: Snapshot, headers: Mapping[str, str]) -> Reply:
        if key is None:
            return _status(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). Please "
                "use API Key or other form of API consumer identity to call this API.",
            )
        message = "API key not valid. Please pass a valid API key."
        details: list[JsonObject] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            },
            {
                "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                "locale": "en-US",
                "message": message,
            },
        ]
        return _status(400, message, details)

    def error(self, status: int, request: ChatRequest | None, route: Route, snapshot: Snapshot) -> Reply:
        if status == 404:
            model = request.model if request else route.model
            return _status(
                404,
                f"models/{model} is not found for API version {route.version or 'v1beta'}, or is not "
                "supported for generateContent. Call ListModels to see the list of available models and "
                "their supported methods.",
            )
        message = _MESSAGES.get(status) or phrase(status)
        return _status(status, message)

    def invalid(self, message: str) -> Reply:
        return _status(400, message)

    def not_found(self, method: str, path: str) -> Reply:
        return _status(404, f"Method not found: {method} {path}")


# What generateContent reads; any other name is a 400, as the API's JSON parser answers.
_REQUEST_FIELDS = {
    "contents", "systemInstruction", "system_instruction", "generationConfig", "generation_config",
    "safetySettings", "safety_settings", "tools", "toolConfig", "tool_config", "cachedContent",
    "cached_content",
}  # fmt: skip
_CONFIG_FIELDS = {
    "stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema", "_responseJsonSchema",
    "responseModalities", "candidateCount", "maxOutputTokens", "temperature", "topP", "topK", "seed",
    "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs", "enableEnhancedCivicAnswers",
    "speechConfig", "thinkingConfig", "imageConfig", "mediaResolution",
}  # fmt: skip
_MIME_TYPES = {"text/plain", "application/json", "application/xml", "application/yaml", "text/x.enum"}


def _known(body: JsonObject, fields: set[str], where: str) -> None:
    for name in body:
        if name not in fields and _camel(name) not in fields:
            at = f" at '{where}'" if where else ""
            raise BadRequest(f'Invalid JSON payload received. Unknown name "{name}"{at}: Cannot find field.')


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _json_mode(config: object) -> bool:
    """Whether ``generationConfig`` asks for JSON; refuses what the API refuses: an unknown field, an
    unknown MIME type, a schema without ``application/json``, both kinds of schema at once."""
    if config is None:
        return False
    config = {_camel(k): v for k, v in require_object(config, "generation_config").items()}
    _known(config, _CONFIG_FIELDS, "generation_config")
    mime = config.get("responseMimeType", "text/plain")
    if mime not in _MIME_TYPES:
        raise BadRequest(
            "* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes are "
            "`text/plain`, `application/json`, `application/xml`, `application/yaml` and `text/x.enum`."
        )
    schemas = [name for name in ("responseSchema", "responseJsonSchema") if config.get(name) is not None]
    if len(schemas) > 1:
        raise BadRequest(
            "* GenerateContentRequest.generation_config: response_schema and response_json_schema "
            "cannot both be set."
        )
    if schemas and mime != "application/json":
        raise BadRequest(
            "* GenerateContentRequest.generation_config.response_mime_type: it must be application/json "
            "when a response schema is set."
        )
    if config.get("responseJsonSchema") is not None:
        require_object(config["responseJsonSchema"], "generation_config.response_json_schema")
    return bool(mime == "application/json")


def _part_texts(content: JsonObject) -> list[str]:
    parts = content.get("parts")
    if not isinstance(parts, list):
        return []
    return [part["text"] for part in parts if isinstance(part, dict) and isinstance(part.get("text"), str)]


def _finish(request: ChatRequest) -> str:
    return "MAX_TOKENS" if request.cut else "STOP"
