"""Provider adapters. Each turns a task into an output through one provider, or raises one of the
three outcomes of :mod:`hive_bus` (retry after a delay, retry later, fail now).

:func:`builtin` resolves a provider name given to ``hive worker NAME``.
"""

from __future__ import annotations

from collections.abc import Mapping

from hive_bus import Provider

from .echo import EchoProvider

BUILTIN_NAMES = ("echo",)


class ProviderUnavailable(LookupError):
    """A built-in provider that cannot run here (unknown name, missing credentials); says why."""


def builtin(name: str, environ: Mapping[str, str]) -> Provider:
    """The built-in provider called ``name``, configured from ``environ``."""
    if name == "echo":
        return EchoProvider()
    raise ProviderUnavailable(
        f"no built-in provider {name!r} (built in: {', '.join(BUILTIN_NAMES)}); "
        f"for your own, use --handler package.module:function --provider {name}"
    )


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
