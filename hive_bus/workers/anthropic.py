"""``anthropic``: Claude through the anthropic SDK (optional extra ``hive-bus[anthropic]``), retries off.

Credentials from ``ANTHROPIC_API_KEY``; the SDK honours ``ANTHROPIC_BASE_URL``. A 429 carries
``retry-after``; 529 (overloaded) is retried later.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from types import ModuleType
from typing import Any

from hive_bus import Output, ProviderKey, Task, Usage

from . import _stainless
from ._chat import sampling

DEFAULT_MODEL = "claude-haiku-4-5"
DEFAULT_MAX_TOKENS = 1024  # the Messages API requires one


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
        model = task.model or self._model
        options: dict[str, Any] = {
            "max_tokens": DEFAULT_MAX_TOKENS,
            **sampling(task, max_tokens_name="max_tokens"),
        }
        if task.system:
            options["system"] = task.system
        try:
            response = await self._client.messages.create(
                model=model, messages=[{"role": "user", "content": task.prompt}], **options
            )
        except Exception as exc:
            outcome = _stainless.classify("anthropic", exc, self._sdk, [self._key])
            if outcome is None:
                raise
            raise outcome from None
        text = "".join(block.text for block in response.content if getattr(block, "type", "") == "text")
        usage = Usage(input_tokens=response.usage.input_tokens, output_tokens=response.usage.output_tokens)
        return Output(value=text, model=model, usage=usage)

    async def stream(self, task: Task) -> AsyncIterator[str | Output]:
        """The Messages API with ``stream=True``: the text of each ``content_block_delta`` as it comes,
        then the whole :class:`Output`, its usage from ``message_start`` (input) and ``message_delta``
        (output). An ``error`` event in the stream is classified as the same error answered at once."""
        model = task.model or self._model
        pieces: list[str] = []
        input_tokens = output_tokens = 0
        try:
            events = await self._client.messages.create(
                model=model,
                messages=[{"role": "user", "content": task.prompt}],
                stream=True,
                **_options(task),
            )
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
        except Exception as exc:
            outcome = _stainless.classify("anthropic", exc, self._sdk, [self._key])
            if outcome is None:
                raise
            raise outcome from None
        usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
        yield Output(value="".join(pieces), model=model, usage=usage)

    async def aclose(self) -> None:
        await self._client.close()


def _options(task: Task) -> dict[str, Any]:
    """What :meth:`AnthropicProvider.stream` asks besides the model and messages (as ``complete`` does)."""
    options: dict[str, Any] = {
        "max_tokens": DEFAULT_MAX_TOKENS,
        **sampling(task, max_tokens_name="max_tokens"),
    }
    if task.system:
        options["system"] = task.system
    return options


def from_env(environ: Mapping[str, str], *, model: str | None = None) -> list[ProviderKey]:
    from . import ProviderUnavailable, api_keys, keyed

    if not api_keys(environ, ["ANTHROPIC_API_KEY"], "ANTHROPIC_API_KEYS"):
        raise ProviderUnavailable("anthropic: none of ANTHROPIC_API_KEY, ANTHROPIC_API_KEYS is set")
    try:
        import anthropic
    except ImportError:
        raise ProviderUnavailable(
            "anthropic: its SDK is not installed: pip install 'hive-bus[anthropic]'"
        ) from None
    base_url = environ.get("ANTHROPIC_BASE_URL")
    return keyed(
        "anthropic", environ, ["ANTHROPIC_API_KEY"], "ANTHROPIC_API_KEYS",
        lambda key: AnthropicProvider(anthropic, api_key=key, model=model, base_url=base_url),
    )  # fmt: skip
