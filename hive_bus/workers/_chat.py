"""The chat-completions call shared by the OpenAI-style adapters (groq, openai-compatible servers)."""

from __future__ import annotations

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
