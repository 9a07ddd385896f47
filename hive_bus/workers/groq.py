"""``groq``: Groq's chat completions through the groq SDK (``AsyncGroq``, its own retries off).

Credentials from ``GROQ_API_KEY``; the SDK honours ``GROQ_BASE_URL``. A 429 comes with ``retry-after``
and "Please try again in 6.78s" (or "9m38s" for a daily limit) in its message; both are read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import groq

from hive_bus import Output, ProviderKey, Task

from ._chat import chat_complete, chat_stream

DEFAULT_MODEL = "llama-3.3-70b-versatile"


class GroqProvider:
    name = "groq"

    def __init__(self, *, api_key: str, model: str | None = None, base_url: str | None = None) -> None:
        self._key = api_key
        self._model = self.default_model = model or DEFAULT_MODEL
        self._client = groq.AsyncGroq(api_key=api_key, base_url=base_url, max_retries=0)

    async def complete(self, task: Task) -> Output:
        return await chat_complete("groq", self._client, groq, self._key, task.model or self._model, task)

    async def stream(self, task: Task) -> AsyncIterator[str | Output]:
        async for item in chat_stream("groq", self._client, groq, self._key, task.model or self._model, task):
            yield item

    async def aclose(self) -> None:
        await self._client.close()


def from_env(environ: Mapping[str, str], *, model: str | None = None) -> list[ProviderKey]:
    from . import checked_base_url, keyed

    base_url = checked_base_url(environ, "GROQ_BASE_URL")
    return keyed(
        "groq", environ, ["GROQ_API_KEY"], "GROQ_API_KEYS",
        lambda key: GroqProvider(api_key=key, model=model, base_url=base_url),
    )  # fmt: skip
