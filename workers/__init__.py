"""Provider adapters. Each turns a task into an output through one provider, or raises one of the
three outcomes of :mod:`hive_bus` (retry after a delay, retry later, fail now), decided in one place
per provider.

:func:`builtin` resolves a provider name given to ``hive worker NAME``; :func:`available` tells
``hive up`` which providers have credentials here, and why the others do not.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from hive_bus import Provider

from .echo import EchoProvider

BUILTIN_NAMES = ("echo", "gemini", "groq", "anthropic", "openai")


class ProviderUnavailable(LookupError):
    """A built-in provider that cannot run here (unknown name, missing credentials); says why."""


def builtin(name: str, environ: Mapping[str, str], *, model: str | None = None) -> Provider:
    """The built-in provider called ``name``, configured from ``environ``."""
    if name == "echo":
        return EchoProvider()
    if name not in BUILTIN_NAMES:
        raise ProviderUnavailable(
            f"no built-in provider {name!r} (built in: {', '.join(BUILTIN_NAMES)}); "
            f"for your own, use --handler package.module:function --provider {name}"
        )
    module = importlib.import_module(f"workers.{name}")
    provider: Provider = module.from_env(environ, model=model)
    return provider


def available(environ: Mapping[str, str]) -> tuple[dict[str, Provider], dict[str, str]]:
    """The built-in providers that can run with this environment, and why the others cannot."""
    providers: dict[str, Provider] = {}
    skipped: dict[str, str] = {}
    for name in BUILTIN_NAMES:
        try:
            providers[name] = builtin(name, environ)
        except ProviderUnavailable as exc:
            skipped[name] = str(exc)
    return providers, skipped
