"""The chat-completions call shared by the OpenAI-style adapters (groq, openai-compatible servers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import msgspec

from hive_bus import FailNow, JsonObjectFormat, Output, Task, Usage

from . import _stainless
from ._classify import not_the_api

# Said to the model when a task asks for a JSON object without saying "json" anywhere itself.
JSON_HINT = "Answer with a JSON object."


def chat_messages(task: Task) -> list[Any]:
    """The task's conversation as the API takes it (its roles and content as they are; a prompt task is
    a system and a user message); ``Any`` because each SDK types them as its own TypedDicts."""
    return [msgspec.to_builtins(message) for message in task.conversation()]


def sampling(
    task: Task, *, max_tokens_name: str, stop_name: str = "stop", seed_name: str | None = "seed"
) -> dict[str, Any]:
    """The task's sampling parameters under the SDK's names; unset ones are left out. A provider
    without a seed (``seed_name`` None) fails a task that sets one: never silently ignored."""
    params = task.params
    if params is None:
        return {}
    if params.seed is not None and seed_name is None:
        raise FailNow(
            f"{task.provider} cannot honour `seed`: its API takes no seed; leave it out", status=400
        )
    values = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        max_tokens_name: params.max_tokens,
        stop_name: params.stop,
        **({seed_name: params.seed} if seed_name else {}),
    }
    return {k: v for k, v in values.items() if v is not None}


def chat_request(task: Task, model: str) -> dict[str, Any]:
    """Every argument of ``chat.completions.create`` for the task: the one place a request is built (the
    plain call and a streamed one share it). ``response_format`` goes as OpenAI names it, which Groq
    and the OpenAI-compatible servers take as it is."""
    request: dict[str, Any] = {
        "model": model,
        "messages": chat_messages(task),
        **sampling(task, max_tokens_name="max_tokens"),
    }
    if task.response_format is not None:
        request["response_format"] = msgspec.to_builtins(task.response_format)
        if isinstance(task.response_format, JsonObjectFormat) and not any(
            "json" in message.text.lower() for message in task.conversation()
        ):
            # OpenAI and Groq refuse json_object unless a message says "json" (a 400 otherwise)
            request["messages"] = [{"role": "system", "content": JSON_HINT}, *request["messages"]]
    return request


async def chat_complete(
    provider: str, client: Any, sdk: ModuleType, key: str, model: str, task: Task
) -> Output:
    """One chat completion; the SDK's errors become the bus's three outcomes."""
    try:
        response = await client.chat.completions.create(**chat_request(task, model))
    except Exception as exc:
        outcome = _stainless.classify(provider, exc, sdk, [key])
        if outcome is None:
            raise
        raise outcome from None
    try:  # a server that is not the API may answer 200 with anything: the SDK hands it on unchecked
        usage = response.usage
        choice = response.choices[0]
        return Output(
            value=choice.message.content or "",
            model=model,
            finish_reason=choice.finish_reason,  # OpenAI's words already
            usage=Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)
            if usage
            else None,
        )
    except (AttributeError, IndexError, TypeError):
        raise not_the_api(provider, response, [key]) from None


async def chat_stream(
    provider: str, client: Any, sdk: ModuleType, key: str, model: str, task: Task
) -> AsyncIterator[str | Output]:
    """One chat completion with ``stream=True``: the content deltas as they come, then the whole
    :class:`Output` with the usage of the last chunk (asked for with ``stream_options.include_usage``)
    and the finish reason the stream gave.
    Errors, before the first chunk (a 429) or during the stream, are classified as in
    :func:`chat_complete`."""
    pieces: list[str] = []
    usage: Usage | None = None
    finish_reason: str | None = None
    try:
        chunks = await client.chat.completions.create(
            **chat_request(task, model),
            stream=True,
            # in the body, not as the keyword: the groq SDK (1.x) has no ``stream_options`` parameter,
            # though Groq's API takes it as OpenAI's does
            extra_body={"stream_options": {"include_usage": True}},
        )
        async for chunk in chunks:
            # the usage chunk (OpenAI, Groq); Groq also puts it in ``x_groq`` of its last content chunk
            counted = chunk.usage or getattr(getattr(chunk, "x_groq", None), "usage", None)
            if counted is not None:
                usage = Usage(input_tokens=counted.prompt_tokens, output_tokens=counted.completion_tokens)
            for choice in chunk.choices:
                finish_reason = choice.finish_reason or finish_reason  # on the last content chunk
                text = choice.delta.content
                if text:
                    pieces.append(text)
                    yield text
    except Exception as exc:
        outcome = _stainless.classify(provider, exc, sdk, [key])
        if outcome is None:
            raise
        raise outcome from None
    yield Output(value="".join(pieces), model=model, usage=usage, finish_reason=finish_reason)
