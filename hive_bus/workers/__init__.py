"""Provider adapters. Each turns a task into an output through one provider, or raises one of the
three outcomes of :mod:`hive_bus` (retry after a delay, retry later, fail now), decided in one place
per provider.

:func:`builtin` resolves a provider name given to ``hive worker NAME``; :func:`available` tells
``hive up`` which providers have credentials here, and why the others do not.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

from hive_bus import Provider, ProviderKey, register_secret

from .echo import EchoProvider

__all__ = [
    "BUILTIN_NAMES",
    "EchoProvider",
    "ProviderUnavailable",
    "api_keys",
    "available",
    "builtin",
    "checked_base_url",
    "keyed",
]

BUILTIN_NAMES = ("echo", "gemini", "groq", "anthropic", "openai")


class ProviderUnavailable(LookupError):
    """A built-in provider that cannot run here (unknown name, missing credentials or SDK); says why."""


_KEY_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def api_keys(environ: Mapping[str, str], singular: Sequence[str], plural: str) -> list[tuple[str, str]]:
    """The provider's API keys as (name, key): those in ``plural`` (comma-separated, each ``key`` or
    ``name=key``), else the first of the ``singular`` variables that is set. A key without a name is
    known by a fingerprint (``key-`` and 8 hex digits of its SHA-256), never by the key itself.

    A ``name=`` with no key, an ``=key`` with no name, or a key holding whitespace or control characters
    (a pasted newline: every call would fail as a connection error) is refused naming the variable and
    the entry, never the key."""
    keys: list[tuple[str, str]] = []
    listed = [item.strip() for item in environ.get(plural, "").split(",") if item.strip()]
    if listed:
        items = [(f"{plural} entry {i}", item) for i, item in enumerate(listed, 1)]
    else:
        items = [(v, environ[v]) for v in singular if environ.get(v)][:1]
    for where, item in items:
        name, sep, key = item.partition("=")
        if sep and not name:
            raise ProviderUnavailable(f"{where}: no key name before '=' (write NAME=KEY, or the key alone)")
        if not sep or not _KEY_NAME.match(name):
            name, key = "key-" + hashlib.sha256(item.encode()).hexdigest()[:8], item
        elif not key:
            raise ProviderUnavailable(f"{where} ({name}): no key after '='")
        if any(c.isspace() or not c.isprintable() for c in key):
            raise ProviderUnavailable(f"{where} ({name}): the key holds whitespace or control characters")
        if any(n == name for n, _ in keys):
            raise ProviderUnavailable(f"{plural}: the key name {name!r} is used twice")
        keys.append((name, key))
    return keys


def checked_base_url(environ: Mapping[str, str], variable: str) -> str | None:
    """``variable`` (a provider's ``*_BASE_URL``) when set: an http or https URL with a host, checked
    here so that a bad one is one line naming it, not the SDK's InvalidURL traceback."""
    url = environ.get(variable)
    if not url:
        return None
    try:
        parts = urlsplit(url)
        good = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port past 65535, or not a number; a bracket left open
        good = False
    if not good:
        raise ProviderUnavailable(f"{variable}: not an http(s) URL with a host (and a port 1-65535)")
    return url


def keyed(
    name: str,
    environ: Mapping[str, str],
    singular: Sequence[str],
    plural: str,
    make: Callable[[str], Provider],
) -> list[ProviderKey]:
    """One adapter per API key of the provider, or :class:`ProviderUnavailable` naming the variables."""
    keys = api_keys(environ, singular, plural)
    if not keys:
        raise ProviderUnavailable(f"{name}: none of {', '.join([*singular, plural])} is set")
    for _, key in keys:
        register_secret(key)  # out of every provider text and log line
    return [ProviderKey(key_name, make(key)) for key_name, key in keys]


def builtin(name: str, environ: Mapping[str, str], *, model: str | None = None) -> list[ProviderKey]:
    """The built-in provider called ``name``, one adapter per API key, configured from ``environ``."""
    if name == "echo":
        return [ProviderKey("default", EchoProvider())]
    if name not in BUILTIN_NAMES:
        raise ProviderUnavailable(
            f"no built-in provider {name!r} (built in: {', '.join(BUILTIN_NAMES)}); "
            f"for your own, use --handler package.module:function --provider {name}"
        )
    try:
        module = importlib.import_module(f"hive_bus.workers.{name}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] == "hive_bus":
            raise  # our own module missing is a broken install, not a missing extra
        raise ProviderUnavailable(
            f"{name}: its SDK is not installed: pip install 'hive-bus[{name}]'"
        ) from None
    keys: list[ProviderKey] = module.from_env(environ, model=model)
    return keys


def available(environ: Mapping[str, str]) -> tuple[dict[str, list[ProviderKey]], dict[str, str]]:
    """The built-in providers that can run with this environment, and why the others cannot."""
    providers: dict[str, list[ProviderKey]] = {}
    skipped: dict[str, str] = {}
    for name in BUILTIN_NAMES:
        try:
            providers[name] = builtin(name, environ)
        except ProviderUnavailable as exc:
            skipped[name] = str(exc)
    return providers, skipped
