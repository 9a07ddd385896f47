"""Token prices, per model and per million tokens, that turn a task's usage into its cost.

The built-in table holds list prices in USD for common models. Users override or extend it with a TOML
file (``HIVE_PRICES_FILE``); a price of 0 marks a free tier::

    [models."gemini-2.5-flash"]     # on a free-tier key
    input_per_mtok = 0
    output_per_mtok = 0

    [models."deepseek-r1:32b"]      # your own GPU box
    input_per_mtok = 0
    output_per_mtok = 0

A model missing from the table has an unknown cost (``None``), never a made-up one.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from ._messages import Usage
from ._textfile import UnreadableFile, read_text


class Price(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    input_per_mtok: float
    output_per_mtok: float


class _PriceFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    models: dict[str, Price] = {}


# List prices (USD per million tokens) as published by each provider; paid tier, short prompts.
BUILTIN_PRICES: dict[str, Price] = {
    "gemini-2.5-pro": Price(1.25, 10.0),
    "gemini-2.5-flash": Price(0.30, 2.50),
    "gemini-2.5-flash-lite": Price(0.10, 0.40),
    "gemini-2.0-flash": Price(0.10, 0.40),
    "gemini-2.0-flash-lite": Price(0.075, 0.30),
    "llama-3.3-70b-versatile": Price(0.59, 0.79),
    "llama-3.1-8b-instant": Price(0.05, 0.08),
    "openai/gpt-oss-120b": Price(0.15, 0.75),
    "openai/gpt-oss-20b": Price(0.10, 0.50),
    "claude-opus-4-1": Price(15.0, 75.0),
    "claude-sonnet-4-5": Price(3.0, 15.0),
    "claude-haiku-4-5": Price(1.0, 5.0),
    "claude-3-5-haiku-latest": Price(0.80, 4.0),
    "echo": Price(0.0, 0.0),
}


class PriceFileError(ValueError):
    """The prices file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class PriceTable:
    prices: Mapping[str, Price] = field(default_factory=lambda: dict(BUILTIN_PRICES))

    @classmethod
    def load(cls, path: str | Path | None) -> PriceTable:
        """The built-in table, with the file's models (if any) on top."""
        prices = dict(BUILTIN_PRICES)
        if path:
            try:
                raw = tomllib.loads(read_text(path))
                prices.update(msgspec.convert(raw, _PriceFile).models)
            except UnreadableFile as exc:
                raise PriceFileError(f"cannot read HIVE_PRICES_FILE {path}: {exc}") from None
            except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
                raise PriceFileError(f"HIVE_PRICES_FILE {path} is not valid: {exc}") from None
        return cls(prices)

    def cost_usd(self, model: str | None, usage: Usage | None) -> float | None:
        if model is None or usage is None:
            return None
        price = self.prices.get(model) or self.prices.get(model.removeprefix("models/"))
        if price is None:
            return None
        cost = usage.input_tokens * price.input_per_mtok + usage.output_tokens * price.output_per_mtok
        return round(cost / 1_000_000, 10)
