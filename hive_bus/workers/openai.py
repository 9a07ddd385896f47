"""``openai``: any OpenAI-compatible server (Ollama, llama.cpp's server, vLLM, LM Studio) through the
openai SDK, its own retries off.

The server from ``OPENAI_BASE_URL`` (for example ``http://gpu-box:11434/v1`` for Ollama), a key from
``OPENAI_API_KEY`` where the server wants one. There is no default model: set it per worker
(``hive worker openai --model deepseek-r1:32b``) or per task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import openai

from hive_bus import FailNow, Output, ProviderKey, Task

from ._chat import chat_complete, chat_stream


class OpenAICompatibleProvider:
    name = "openai"

    def __init__(self, *, base_url: str, api_key: str | None = None, model: str | None = None) -> None:
        self._key = api_key or ""
        self._model = self.default_model = model
        # Local servers ignore the key, but the SDK insists on one.
        self._client = openai.AsyncOpenAI(api_key=api_key or "unused", base_url=base_url, max_retries=0)

    async def complete(self, task: Task) -> Output:
        model = task.model or self._model
        if not model:
            raise FailNow(
                "openai: no model named; set the task's model or start the worker with --model", status=400
            )
        return await chat_complete("openai", self._client, openai, self._key, model, task)

    async def stream(self, task: Task) -> AsyncIterator[str | Output]:
        model = task.model or self._model
        if not model:
            raise FailNow("openai: no model named; set the task's model or start the worker with --model")
        async for item in chat_stream("openai", self._client, openai, self._key, model, task):
            yield item

    async def aclose(self) -> None:
        await self._client.close()


def from_env(environ: Mapping[str, str], *, model: str | None = None) -> list[ProviderKey]:
    from . import ProviderUnavailable, api_keys, checked_base_url

    base_url = checked_base_url(environ, "OPENAI_BASE_URL")
    if not base_url:
        raise ProviderUnavailable(
            "openai: OPENAI_BASE_URL is not set (e.g. http://gpu-box:11434/v1 for Ollama)"
        )
    # a local server needs no key; a hosted one may take several
    keys = api_keys(environ, ["OPENAI_API_KEY"], "OPENAI_API_KEYS") or [("default", "")]
    return [
        ProviderKey(name, OpenAICompatibleProvider(base_url=base_url, api_key=key or None, model=model))
        for name, key in keys
    ]
