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

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from ._messages import Usage
from ._textfile import convert_at, read_toml

# USD per million tokens: 0 (free) up to a million; nan, inf or a negative price would make every cost
# wrong or none at all.
MAX_PRICE_PER_MTOK = 1_000_000.0
PerMtok = Annotated[float, Meta(ge=0, le=MAX_PRICE_PER_MTOK)]


class Price(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    input_per_mtok: PerMtok
    output_per_mtok: PerMtok


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
            prices.update(_read(str(path)))
        return cls(prices)

    def cost_usd(self, model: str | None, usage: Usage | None) -> float | None:
        if model is None or usage is None:
            return None
        price = self.prices.get(model) or self.prices.get(model.removeprefix("models/"))
        if price is None:
            return None
        cost = usage.input_tokens * price.input_per_mtok + usage.output_tokens * price.output_per_mtok
        return round(cost / 1_000_000, 10)


def _read(path: str) -> dict[str, Price]:
    """The file's prices; an error names the file, and the line and key where it can (as the routes
    file's do)."""
    where = f"HIVE_PRICES_FILE {path}"
    try:
        raw, text = read_toml(path, where)
    except ValueError as exc:
        raise PriceFileError(str(exc)) from None
    unknown = sorted(set(raw) - {"models"})
    if unknown:
        raise PriceFileError(f'{where}: key {unknown[0]}: unknown; the file holds [models."NAME"] tables')
    models = raw.get("models", {})
    if not isinstance(models, dict):
        raise PriceFileError(f'{where}: key models: expected tables [models."NAME"]')
    prices = {}
    for name, table in models.items():
        try:
            prices[name] = convert_at(table, Price, ["models", name], where, text)
        except ValueError as exc:
            raise PriceFileError(str(exc)) from None
    return prices
