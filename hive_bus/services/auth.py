"""Bearer tokens for the gateway, read once at start-up and checked in constant time.

With no token configured the gateway serves loopback only (see :func:`check_exposure`). With tokens,
every route but ``/healthz``, ``/readyz``, the dashboard's page and files and the API reference's pages
(which hold no data; the page asks for a token when the API does) needs ``Authorization: Bearer <token>``, whether or not the
route exists, so that no route can be found without one. ``/metrics`` takes its own token whenever one
is set, with or without gateway tokens (Prometheus then needs only that one). Every token is at least
16 characters. A token never appears in a log line or an answer.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from hive_bus._textfile import UnreadableFile, read_text

# health, the dashboard's page and the API reference's pages (see services.apidocs)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/schema", "/schema/swagger", "/docs"})
OPEN_PREFIX = "/dashboard/"  # the dashboard's static files
ENV_TOKENS = "HIVE_GATEWAY_TOKENS"
ENV_TOKENS_FILE = "HIVE_GATEWAY_TOKENS_FILE"
ENV_METRICS_TOKEN = "HIVE_METRICS_TOKEN"
ENV_METRICS_TOKEN_FILE = "HIVE_METRICS_TOKEN_FILE"
# HIVE_GATEWAY_ROUTES: the routes file of chat completions' models (hive_bus._routes), read by the CLI
KNOWN_ENV = frozenset(
    {ENV_TOKENS, ENV_TOKENS_FILE, ENV_METRICS_TOKEN, ENV_METRICS_TOKEN_FILE, "HIVE_GATEWAY_ROUTES"}
)
MIN_TOKEN_CHARS = 16
METRICS_PATH = "/metrics"


class AuthConfigError(ValueError):
    """The token settings cannot be used; the message says which and why (never the token)."""


@dataclass(frozen=True)
class Tokens:
    api: frozenset[str] = field(default_factory=frozenset)
    metrics: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.api)

    def __repr__(self) -> str:  # never print a token, even by accident
        return f"Tokens(api={len(self.api)} token(s), metrics={'set' if self.metrics else 'unset'})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Tokens:
        unknown = sorted(k for k in environ if k.startswith("HIVE_GATEWAY_") and k not in KNOWN_ENV)
        if unknown:
            raise AuthConfigError(
                f"unknown gateway setting(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_ENV))}"
            )
        given = environ.get(ENV_TOKENS, "")
        tokens = {t.strip() for t in given.split(",") if t.strip()}
        if given.strip() and not tokens:
            # "," would otherwise start the gateway open to all, as if no token had been asked for
            raise AuthConfigError(
                f"{ENV_TOKENS} holds no token: give tokens separated by commas, or unset it"
            )
        path = environ.get(ENV_TOKENS_FILE)
        if path:
            try:
                lines = read_text(path).splitlines()
            except UnreadableFile as exc:
                raise AuthConfigError(f"cannot read {ENV_TOKENS_FILE} {path}: {exc}") from None
            from_file = {ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}
            if not from_file:
                raise AuthConfigError(f"{ENV_TOKENS_FILE} {path} holds no token")
            tokens |= from_file
        short = [t for t in tokens if len(t) < MIN_TOKEN_CHARS]
        if short:
            raise AuthConfigError(
                f"{len(short)} gateway token(s) shorter than {MIN_TOKEN_CHARS} characters; "
                "use long random tokens"
            )
        metrics = _metrics_token(environ)
        if metrics is not None and len(metrics) < MIN_TOKEN_CHARS:
            raise AuthConfigError(
                f"the metrics token ({ENV_METRICS_TOKEN} or {ENV_METRICS_TOKEN_FILE}) is shorter than "
                f"{MIN_TOKEN_CHARS} characters; use a long random token"
            )
        return cls(api=frozenset(tokens), metrics=metrics)


def _metrics_token(environ: Mapping[str, str]) -> str | None:
    """``HIVE_METRICS_TOKEN``, or the first line of ``HIVE_METRICS_TOKEN_FILE`` (the file Prometheus's
    scrape job reads its bearer token from too)."""
    token = environ.get(ENV_METRICS_TOKEN) or None
    path = environ.get(ENV_METRICS_TOKEN_FILE)
    if not path:
        return token
    if token:
        raise AuthConfigError(f"{ENV_METRICS_TOKEN} and {ENV_METRICS_TOKEN_FILE} are both set; give one")
    try:
        lines = read_text(path).splitlines()
    except UnreadableFile as exc:
        raise AuthConfigError(f"cannot read {ENV_METRICS_TOKEN_FILE} {path}: {exc}") from None
    found = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not found:
        raise AuthConfigError(f"{ENV_METRICS_TOKEN_FILE} {path} holds no token")
    return found[0]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, tokens: Tokens) -> None:
    """Refuse to listen beyond loopback without a token: anyone who reaches it could spend your quotas."""
    if not tokens.enabled and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to listen on {host} without a token: set {ENV_TOKENS} or {ENV_TOKENS_FILE}, "
            "or listen on 127.0.0.1"
        )


def _matches(given: str, accepted: frozenset[str]) -> bool:
    # compare with every token, so the time taken says nothing about which or how much matched
    found = False
    for token in accepted:
        found |= hmac.compare_digest(given.encode(), token.encode())
    return found


def is_open(path: str) -> bool:
    """Whether a path is served without a token: health, and the dashboard's page and files."""
    # ".." never leads out of the files, but no path that holds it needs to be open either
    return path in OPEN_PATHS or (path.startswith(OPEN_PREFIX) and ".." not in path)


def authorized(tokens: Tokens, path: str, authorization: bytes) -> bool:
    """Whether a request for ``path`` with this ``Authorization`` header value may go on.

    Checked before routing: an unknown path needs a token as a known one does."""
    if path == METRICS_PATH and tokens.metrics:
        accepted = frozenset({tokens.metrics})  # set alone, it still guards /metrics
    elif not tokens.enabled or is_open(path):
        return True
    else:
        accepted = tokens.api
    scheme, _, given = authorization.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and bool(given) and _matches(given.strip(), accepted)
