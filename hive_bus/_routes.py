"""Model routes: what a ``model`` of an OpenAI-style request names, and the task it becomes.

A model is ``provider/model`` (``groq/llama-3.3-70b-versatile``; the model may hold a ``/`` of its own,
as ``groq/openai/gpt-oss-120b`` does), a bare provider (its workers' default model), or an alias from a
routes file, read once at start (``hive gateway --routes FILE``, ``hive up --routes FILE`` or
``HIVE_GATEWAY_ROUTES``)::

    [aliases.fast]                    # model="fast"
    candidates = ["groq/llama-3.3-70b-versatile", "gemini/gemini-2.5-flash", "openai/qwen3:8b"]
    route = "in_order"                # or "cheapest": the cheapest candidate with quota left first
    max_attempts = 3                  # retry policy: real attempts per provider
    max_wait_s = 30                   # ... and how long a rate limit may hold the task before it moves on
    time_budget_s = 120               # optional: past it the task fails (its deadline)
    cache_ttl_s = 600                 # optional: identical requests within it answer from the cache

Candidates are tried in order (or cheapest first), each the next when the one before has no quota left:
the task's ``fallback`` list. A file that cannot be used stops start-up with one line naming the file,
the line or key, and what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from ._messages import DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_WAIT_S, MaxAttempts, Route, Seconds
from ._names import PROVIDER_PATTERN
from ._textfile import read_toml

ENV_ROUTES = "HIVE_GATEWAY_ROUTES"
# provider, then "/" and a model (which may hold "/" and ":" of its own); no white space anywhere
CANDIDATE_PATTERN = PROVIDER_PATTERN.removesuffix("$") + r"(/\S+)?$"
# a task has at most 8 fallbacks beside its provider
MAX_CANDIDATES = 9

Candidate = Annotated[
    str, Meta(pattern=CANDIDATE_PATTERN, description="provider/model, or a provider (its default model)")
]
_ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class RoutesError(ValueError):
    """The routes file cannot be used; one line naming the file, where, and what is wrong."""


class Alias(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One alias of the routes file: ordered candidates, route policy, retry policy, time budget."""

    candidates: Annotated[list[Candidate], Meta(min_length=1, max_length=MAX_CANDIDATES)]
    route: Route = "in_order"
    max_attempts: MaxAttempts = DEFAULT_MAX_ATTEMPTS
    max_wait_s: Seconds = DEFAULT_MAX_WAIT_S
    time_budget_s: Seconds | None = None
    cache_ttl_s: Seconds | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """Where a model sends its task: the first provider (and model, None for its default), the
    fallbacks as a task lists them (``provider`` or ``provider:model``), and the alias's policies."""

    provider: str
    model: str | None
    fallback: list[str] = field(default_factory=list)
    route: Route = "in_order"
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    deadline_s: float | None = None
    cache_ttl_s: float | None = None
    alias: str | None = None


def split_candidate(candidate: str) -> tuple[str, str | None]:
    """``groq/llama-3.3-70b-versatile`` -> ``("groq", "llama-3.3-70b-versatile")``; ``groq`` -> ``("groq",
    None)``."""
    provider, _, model = candidate.partition("/")
    return provider, model or None


def _as_fallback(candidate: str) -> str:
    provider, model = split_candidate(candidate)
    return f"{provider}:{model}" if model else provider


@dataclass(frozen=True, slots=True)
class Routes:
    """The aliases of a routes file (none without one)."""

    aliases: dict[str, Alias] = field(default_factory=dict)
    source: str | None = None

    @classmethod
    def load(cls, path: str | Path | None) -> Routes:
        """The routes of ``path``, or none when no file is given. Raises :class:`RoutesError`."""
        if not path:
            return cls()
        try:
            raw, text = read_toml(
                path, f"routes file {path}", unreadable=f"routes file {path}: cannot read it"
            )
        except ValueError as exc:
            raise RoutesError(str(exc)) from None
        unknown = sorted(set(raw) - {"aliases"})
        if unknown:
            raise RoutesError(
                f"routes file {path}: key {unknown[0]}: unknown; the file holds [aliases.NAME] tables"
            )
        tables = raw.get("aliases", {})
        if not isinstance(tables, dict):
            raise RoutesError(f"routes file {path}: key aliases: expected tables [aliases.NAME]")
        aliases: dict[str, Alias] = {}
        for name, table in tables.items():
            where = f"aliases.{name}"
            if not _ALIAS_RE.fullmatch(name):
                raise RoutesError(
                    f"routes file {path}: {_at(text, where)}key {where}: an alias name is 1-128 letters, "
                    "digits, '.', '_', ':' or '-' (no '/': that is for provider/model)"
                )
            try:
                alias = msgspec.convert(table, Alias)
            except msgspec.ValidationError as exc:
                message, sep, inner = str(exc).rpartition(" - at `$")
                key = f"{where}{inner.rstrip('`')}" if sep else where
                raise RoutesError(
                    f"routes file {path}: {_at(text, key)}key {key}: {message or exc}"
                ) from None
            seen = [split_candidate(c) for c in alias.candidates]
            if len(set(seen)) != len(seen):
                key = f"{where}.candidates"
                raise RoutesError(
                    f"routes file {path}: {_at(text, key)}key {key}: a candidate is listed twice"
                )
            aliases[name] = alias
        return cls(aliases, str(path))

    def target(self, model: str, live: Iterable[str]) -> Target | None:
        """Where ``model`` goes: an alias (whatever serves it now), else ``provider/model`` or a bare
        provider that a live worker serves; None when it names neither."""
        alias = self.aliases.get(model)
        if alias is not None:
            provider, first = split_candidate(alias.candidates[0])
            return Target(
                provider=provider, model=first, fallback=[_as_fallback(c) for c in alias.candidates[1:]],
                route=alias.route, max_attempts=alias.max_attempts, max_wait_s=alias.max_wait_s,
                deadline_s=alias.time_budget_s, cache_ttl_s=alias.cache_ttl_s, alias=model,
            )  # fmt: skip
        if re.fullmatch(CANDIDATE_PATTERN, model) is None:
            return None
        provider, named = split_candidate(model)
        return Target(provider=provider, model=named) if provider in set(live) else None


def _at(text: str, key: str) -> str:
    line = _line_of(text, key)
    return f"line {line}, " if line else ""


def _line_of(text: str, key: str) -> int | None:
    """The line (1-based) where ``aliases.NAME.FIELD`` (or ``aliases.NAME``) is set in the file, as far
    as a plain reading finds it: the alias's table header, then the field's line under it."""
    parts = re.sub(r"\[\d+\]$", "", key).split(".")
    if len(parts) < 2 or parts[0] != "aliases":
        return None
    name, leaf = parts[1], parts[2] if len(parts) > 2 else None
    header = re.compile(
        r"\s*\[\s*aliases\s*\.\s*(?:\"" + re.escape(name) + r"\"|" + re.escape(name) + r")\s*\]"
    )
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if header.match(line):
            if leaf is None:
                return i + 1
            for j in range(i + 1, len(lines)):
                if lines[j].lstrip().startswith("["):
                    break
                if re.match(r"\s*" + re.escape(leaf) + r"\s*=", lines[j]):
                    return j + 1
            return i + 1
    return None
