"""The chat-completions call shared by the OpenAI-style adapters (groq, openai-compatible servers)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from hive_bus import FailNow, Output, Task, Usage

from . import _stainless


def chat_messages(task: Task) -> list[Any]:
    """System and user messages; ``Any`` because each SDK types them as its own TypedDicts."""
    messages: list[Any] = [{"role": "system", "content": task.system}] if task.system else []
    messages.append({"role": "user", "content": task.prompt})
    return messages


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
    choice = response.choices[0]
    return Output(
        value=choice.message.content or "",
        model=model,
        finish_reason=choice.finish_reason,  # OpenAI's words already
        usage=Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)
        if usage
        else None,
    )
