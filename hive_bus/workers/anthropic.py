"""``anthropic``: Claude through the anthropic SDK (optional extra ``hive-bus[anthropic]``), retries off.

Credentials from ``ANTHROPIC_API_KEY``; the SDK honours ``ANTHROPIC_BASE_URL``. A 429 carries
``retry-after``; 529 (overloaded) is retried later.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from types import ModuleType
from typing import Any

from hive_bus import (
    FailNow,
    InvalidOutput,
    JsonObjectFormat,
    JsonSchemaFormat,
    Output,
    ProviderKey,
    ResponseFormat,
    Task,
    Usage,
)

from . import _stainless
from ._chat import sampling
from ._classify import not_the_api

DEFAULT_MODEL = "claude-haiku-4-5"
DEFAULT_MAX_TOKENS = 1024  # the Messages API requires one
_TOOL_DESCRIPTION = "Give the answer as this tool's input."
_WRAPPED = "value"  # the property that carries a JSON output that is not an object
# Anthropic's stop_reason in OpenAI's words (end_turn, stop_sequence and the rest: "stop")
# Anthropic's stop reasons in OpenAI's words. The one tool a request has is the forced tool that carries
# a JSON output: its tool_use is the answer ending, "stop" (as OpenAI's response_format ends), not
# "tool_calls", which would send a client looking for tool calls the message does not have.
_FINISH = {"max_tokens": "length", "refusal": "content_filter", "tool_use": "stop"}


class AnthropicProvider:
    name = "anthropic"

    def __init__(
        self, sdk: ModuleType, *, api_key: str, model: str | None = None, base_url: str | None = None
    ):
        self._sdk = sdk
        self._key = api_key
        self._model = self.default_model = model or DEFAULT_MODEL
        self._client = sdk.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=0)

    async def complete(self, task: Task) -> Output:
        request = _request(task, task.model or self._model)
        try:
            response = await self._client.messages.create(**request)
        except Exception as exc:
            outcome = _stainless.classify("anthropic", exc, self._sdk, [self._key])
            if outcome is None:
                raise
            raise outcome from None
        try:  # a server that is not the API may answer 200 with anything: the SDK hands it on unchecked
            usage = Usage(
                input_tokens=response.usage.input_tokens, output_tokens=response.usage.output_tokens
            )
            finish = _FINISH.get(response.stop_reason or "", "stop")
            value = _output(task, response)
        except (AttributeError, TypeError):
            raise not_the_api("anthropic", response, [self._key]) from None
        return Output(value=value, model=request["model"], usage=usage, finish_reason=finish)

    async def stream(self, task: Task) -> AsyncIterator[str | Output]:
        """The Messages API with ``stream=True``: the text of each ``content_block_delta`` as it comes,
        then the whole :class:`Output`, its usage from ``message_start`` (input) and ``message_delta``
        (output). An ``error`` event in the stream is classified as the same error answered at once."""
        if _output_tool(task.response_format) is not None:
            # a JSON output comes as the forced tool's input, whole: nothing to show as it is made
            yield await self.complete(task)
            return
        request = _request(task, task.model or self._model)
        model = request["model"]
        pieces: list[str] = []
        input_tokens = output_tokens = 0
        stop_reason = ""
        try:
            events = await self._client.messages.create(**request, stream=True)
            async for event in events:
                kind = getattr(event, "type", "")
                if kind == "message_start":
                    input_tokens = event.message.usage.input_tokens
                    output_tokens = event.message.usage.output_tokens
                elif kind == "content_block_delta" and getattr(event.delta, "type", "") == "text_delta":
                    if event.delta.text:
                        pieces.append(event.delta.text)
                        yield event.delta.text
                elif kind == "message_delta":
                    output_tokens = event.usage.output_tokens
                    stop_reason = event.delta.stop_reason or stop_reason
        except Exception as exc:
            outcome = _stainless.classify("anthropic", exc, self._sdk, [self._key])
            if outcome is None:
                raise
            raise outcome from None
        usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
        finish = _FINISH.get(stop_reason, "stop")
        yield Output(value="".join(pieces), model=model, usage=usage, finish_reason=finish)

    async def aclose(self) -> None:
        await self._client.close()


def _request(task: Task, model: str) -> dict[str, Any]:
    """Every argument of ``messages.create`` for the task: the one place a request is built (the plain
    call and a streamed one share it).

    Anthropic takes the system prompt apart (``system``) and the turns as user and assistant; its
    consecutive turns of one role are merged here into one (their text joined by a blank line), so
    that what is sent alternates as the Messages API is built for. A JSON ``response_format`` becomes
    a forced tool whose ``input_schema`` is the schema: the tool's input is the output."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in task.conversation():
        if message.role == "system":
            system.append(message.text)
        elif turns and turns[-1]["role"] == message.role:
            turns[-1]["content"] += "\n\n" + message.text
        else:
            turns.append({"role": message.role, "content": message.text})
    if not turns:
        raise FailNow("anthropic: the task has only system messages; the Messages API needs a user turn")
    request: dict[str, Any] = {
        "model": model,
        "messages": turns,
        "max_tokens": DEFAULT_MAX_TOKENS,
        **sampling(task, max_tokens_name="max_tokens", stop_name="stop_sequences", seed_name=None),
    }
    if system:
        request["system"] = "\n\n".join(system)
    tool = _output_tool(task.response_format)
    if tool is not None:
        request["tools"] = [tool]
        request["tool_choice"] = {"type": "tool", "name": tool["name"]}
    return request


def _output_tool(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    """The forced tool that carries a JSON output, or None for free text. A tool's input is an object:
    a schema for anything else is wrapped as the property ``value`` (unwrapped by :func:`_output`)."""
    if isinstance(response_format, JsonObjectFormat):
        return {"name": "json_output", "description": _TOOL_DESCRIPTION, "input_schema": {"type": "object"}}
    if not isinstance(response_format, JsonSchemaFormat):
        return None
    spec = response_format.json_schema
    schema = spec.schema
    if schema.get("type") != "object":
        schema = {"type": "object", "properties": {_WRAPPED: schema}, "required": [_WRAPPED]}
    return {"name": spec.name, "description": spec.description or _TOOL_DESCRIPTION, "input_schema": schema}


def _output(task: Task, response: Any) -> Any:
    """The answer's text; for a JSON format, the forced tool's input (the worker checks it)."""
    if _output_tool(task.response_format) is None:
        return "".join(block.text for block in response.content if getattr(block, "type", "") == "text")
    used = next((block for block in response.content if getattr(block, "type", "") == "tool_use"), None)
    if used is None:
        raise InvalidOutput(
            f"anthropic answered without the output tool (stop reason {response.stop_reason})"
        )
    value = used.input
    wrapped = isinstance(task.response_format, JsonSchemaFormat) and (
        task.response_format.json_schema.schema.get("type") != "object"
    )
    if wrapped:
        if not isinstance(value, dict) or _WRAPPED not in value:
            raise InvalidOutput(f"anthropic's output tool input has no {_WRAPPED!r}: {str(value)[:300]}")
        return value[_WRAPPED]
    return value


def from_env(environ: Mapping[str, str], *, model: str | None = None) -> list[ProviderKey]:
    from . import ProviderUnavailable, api_keys, checked_base_url, keyed

    # the SDK first, as the other providers do: a missing extra is what to fix before any key
    try:
        import anthropic
    except ImportError:
        raise ProviderUnavailable(
            "anthropic: its SDK is not installed: pip install 'hive-bus[anthropic]'"
        ) from None
    if not api_keys(environ, ["ANTHROPIC_API_KEY"], "ANTHROPIC_API_KEYS"):
        raise ProviderUnavailable("anthropic: none of ANTHROPIC_API_KEY, ANTHROPIC_API_KEYS is set")
    base_url = checked_base_url(environ, "ANTHROPIC_BASE_URL")
    return keyed(
        "anthropic", environ, ["ANTHROPIC_API_KEY"], "ANTHROPIC_API_KEYS",
        lambda key: AnthropicProvider(anthropic, api_key=key, model=model, base_url=base_url),
    )  # fmt: skip
