"""Request pieces shared by the chat-completion style adapters."""

from __future__ import annotations

from typing import Any

from hive_bus import Task


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
