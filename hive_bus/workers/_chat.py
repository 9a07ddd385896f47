"""The chat-completions call shared by the OpenAI-style adapters (groq, openai-compatible servers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

from hive_bus import Output, Task, Usage

from . import _stainless


def chat_messages(task: Task) -> list[Any]:
    """System and user messages; ``Any`` because each SDK types them as its own TypedDicts."""
    messages: list[Any] = [{"role": "system", "content": task.system}] if task.system else []
    messages.append({"role": "user", "content": task.prompt})
    return messages


def sampling(task: Task, *, max_tokens_name: str) -> dict[str, Any]:
    """The task's sampling parameters under the SDK's names; unset ones are left out."""
    params = task.params
    if params is None:
        return {}
    values = {"temperature": params.temperature, "top_p": params.top_p, max_tokens_name: params.max_tokens}
    return {k: v for k, v in values.items() if v is not None}


async def chat_complete(
    provider: str, client: Any, sdk: ModuleType, key: str, model: str, task: Task
) -> Output:
    """One chat completion; the SDK's errors become the bus's three outcomes."""
    try:
        response = await client.chat.completions.create(
            model=model, messages=chat_messages(task), **sampling(task, max_tokens_name="max_tokens")
        )
    except Exception as exc:
        outcome = _stainless.classify(provider, exc, sdk, [key])
        if outcome is None:
            raise
        raise outcome from None
    usage = response.usage
    return Output(
        value=response.choices[0].message.content or "",
        model=model,
        usage=Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)
        if usage
        else None,
    )


async def chat_stream(
    provider: str, client: Any, sdk: ModuleType, key: str, model: str, task: Task
) -> AsyncIterator[str | Output]:
    """One chat completion with ``stream=True``: the content deltas as they come, then the whole
    :class:`Output` with the usage of the last chunk (asked for with ``stream_options.include_usage``).
    Errors, before the first chunk (a 429) or during the stream, are classified as in
    :func:`chat_complete`."""
    pieces: list[str] = []
    usage: Usage | None = None
    try:
        chunks = await client.chat.completions.create(
            model=model,
            messages=chat_messages(task),
            stream=True,
            # in the body, not as the keyword: the groq SDK (1.x) has no ``stream_options`` parameter,
            # though Groq's API takes it as OpenAI's does
            extra_body={"stream_options": {"include_usage": True}},
            **sampling(task, max_tokens_name="max_tokens"),
        )
        async for chunk in chunks:
            # the usage chunk (OpenAI, Groq); Groq also puts it in ``x_groq`` of its last content chunk
            counted = chunk.usage or getattr(getattr(chunk, "x_groq", None), "usage", None)
            if counted is not None:
                usage = Usage(input_tokens=counted.prompt_tokens, output_tokens=counted.completion_tokens)
            for choice in chunk.choices:
                text = choice.delta.content
                if text:
                    pieces.append(text)
                    yield text
    except Exception as exc:
        outcome = _stainless.classify(provider, exc, sdk, [key])
        if outcome is None:
            raise
        raise outcome from None
    yield Output(value="".join(pieces), model=model, usage=usage)
