"""How a process logs in to NATS: connect options from :class:`Settings`, and why a server refused.

A hub reached over the internet wants TLS (a CA to trust, often a client certificate too) and a
login: a user and password, an nkey seed file, or a creds file (user JWT and seed, for servers in
operator mode). Everything comes from settings (``HIVE_NATS_*`` or flags); files are checked here,
before a connection is tried, with errors that name the setting and the path but never a secret.
"""

from __future__ import annotations

import importlib.util
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client as NATS

from ._nats import Client
from ._settings import Settings, SettingsError

_FIX_CA = "set HIVE_NATS_TLS_CA_FILE (--nats-tls-ca) to the CA that signed it (the hub's ca.pem)"
_FIX_CERT = "set HIVE_NATS_TLS_CERT_FILE and HIVE_NATS_TLS_KEY_FILE (--nats-tls-cert, --nats-tls-key)"


def server_urls(settings: Settings) -> list[str]:
    """``HIVE_NATS_URL`` may list several servers (a cluster), separated by commas."""
    return [u.strip() for u in settings.nats_url.split(",") if u.strip()]


def connect_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``nats.aio.client.Client.connect``: login, TLS and inbox prefix."""
    options: dict[str, Any] = {}
    if settings.nats_user:
        options["user"] = settings.nats_user
        if settings.nats_password is not None:
            options["password"] = settings.nats_password
        elif settings.nats_password_file:
            options["password"] = _first_line(settings.nats_password_file, "HIVE_NATS_PASSWORD_FILE")
    if settings.nats_nkey_seed_file:
        _need_nkeys("HIVE_NATS_NKEY_SEED_FILE")
        options["nkeys_seed"] = _seed_file(settings.nats_nkey_seed_file, "HIVE_NATS_NKEY_SEED_FILE")
    if settings.nats_creds_file:
        _need_nkeys("HIVE_NATS_CREDS_FILE")
        options["user_credentials"] = _readable(settings.nats_creds_file, "HIVE_NATS_CREDS_FILE")
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
    if settings.worker_name:
        # Replies (JetStream API answers, fetched tasks) come to inboxes under the credential's name,
        # the only ones its permissions let it subscribe to: no worker can read another's.
        options["inbox_prefix"] = f"_INBOX.{settings.worker_name}"
    return options


class NoTlsOffered(nats.errors.Error):
    """A TLS connection was wanted and the server offered none; nothing was sent to it."""

    def __str__(self) -> str:
        return (
            "TLS is wanted (a tls:// URL or a TLS file is set) but the server offers no TLS: the login "
            "was not sent (is this the hub's port, or is something in between?)"
        )


class _TlsOnlyClient(Client):
    """A nats-py client that takes every connection to TLS, or drops it before CONNECT.

    nats-py starts TLS only when the server's INFO says ``tls_required``, even with a TLS context
    and a ``tls://`` URL: a server (or anyone in the way) that says otherwise would get the login
    in plain text.
    """

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        scheme = self._current_server.uri.scheme if self._current_server else ""
        if initial_connection and scheme != "wss" and not info.get("tls_required"):
            if scheme == "ws" or not info.get("tls_available"):
                raise NoTlsOffered
            # allow_non_tls: the server takes TLS if the client starts it; nats-py decides on this
            # very dict (it is the connection's server info) right after this call
            info["tls_required"] = True
        await super()._process_info(info, initial_connection=initial_connection)


def nats_client(settings: Settings) -> NATS:
    """A client for ``settings``: one that never logs in without TLS when TLS is wanted."""
    return _TlsOnlyClient() if tls_context_wanted(settings) else Client()


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """A TLS context when a TLS file is set or a URL is ``tls://``; None for plain connections."""
    if not tls_context_wanted(settings):
        return None
    ca = settings.nats_tls_ca_file
    try:
        context = ssl.create_default_context(cafile=_readable(ca, "HIVE_NATS_TLS_CA_FILE") if ca else None)
    except ssl.SSLError as exc:
        raise SettingsError(f"HIVE_NATS_TLS_CA_FILE {ca}: not a PEM certificate ({exc.reason})") from None
    cert, key = settings.nats_tls_cert_file, settings.nats_tls_key_file
    if cert and key:
        cert_path = _readable(cert, "HIVE_NATS_TLS_CERT_FILE")
        key_path = _readable(key, "HIVE_NATS_TLS_KEY_FILE")
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise SettingsError(
                f"HIVE_NATS_TLS_CERT_FILE {cert} and HIVE_NATS_TLS_KEY_FILE {key} do not load as a "
                f"certificate and its key ({exc.reason})"
            ) from None
    return context


def refusal(exc: BaseException) -> str | None:
    """Why the server refused this client, in one line, when trying again cannot help; else None.

    Authorization violations and TLS failures come back the same on every try: a process should stop
    and say so instead of retrying until its timeout.
    """
    if isinstance(exc, NoTlsOffered):
        return str(exc)
    text = str(exc)
    if "authorization violation" in text.lower():
        return (
            "the server refused the login (authorization violation): check HIVE_NATS_USER and "
            "HIVE_NATS_PASSWORD, HIVE_NATS_NKEY_SEED_FILE or HIVE_NATS_CREDS_FILE"
        )
    if "tls required" in text.lower():
        return f"the server accepts TLS connections only: use a tls:// URL and {_FIX_CA}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate was not trusted ({exc.verify_message}): {_FIX_CA}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "CERTIFICATE_REQUIRED" in reason:
            return f"TLS: the server wants a client certificate: {_FIX_CERT}"
        if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_UNKNOWN" in reason:
            return "TLS: the server did not accept this client's certificate (signed by another CA?)"
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
            return "TLS: the server does not speak TLS on this port: use a nats:// URL, or its TLS port"
        return f"TLS handshake failed ({exc.reason or exc})"
    return None


def closed_hint(settings: Settings, last_error: str) -> str:
    """What a TLS connection the server closed at once may mean: a client certificate it did not take
    (the alert that says so can be lost when the server closes first)."""
    closed = ("connection lost", "broken pipe", "connection reset")  # as the client met the close
    if tls_context_wanted(settings) and any(word in last_error.lower() for word in closed):
        return (
            " (the server closed the TLS connection: if it wants client certificates, "
            f"{_FIX_CERT} to one signed by its CA)"
        )
    return ""


def tls_context_wanted(settings: Settings) -> bool:
    return bool(
        settings.nats_tls_ca_file
        or settings.nats_tls_cert_file
        or any(urlsplit(u).scheme == "tls" for u in server_urls(settings))
    )


def _readable(path: str, setting: str) -> str:
    p = Path(path).expanduser()
    try:
        with p.open("rb"):
            pass
    except OSError as exc:
        raise SettingsError(f"{setting} {path}: cannot read it ({exc.strerror})") from None
    return str(p)


def _seed_file(path: str, setting: str) -> str:
    """The seed file's path, once its content has read as an nkey seed (as nats-py will read it):
    nats-py's own error on a bad one is a binascii traceback. The seed itself is never shown."""
    import nkeys  # type: ignore[import-untyped]

    readable = _readable(path, setting)
    with open(readable, "rb") as f:
        seed = bytearray(f.read().strip())
    try:
        nkeys.from_seed(seed).wipe()
    except (ValueError, nkeys.NkeysError):
        raise SettingsError(
            f"{setting} {path}: not an nkey seed (the file holds one line, the seed, starting SU)"
        ) from None
    finally:
        seed[:] = bytes(len(seed))
    return readable


def _first_line(path: str, setting: str) -> str:
    try:
        text = Path(_readable(path, setting)).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SettingsError(f"{setting} {path}: not a text file") from None
    line = text.splitlines()[0].strip() if text.strip() else ""
    if not line:
        raise SettingsError(f"{setting} {path}: the file is empty")
    return line


def _need_nkeys(setting: str) -> None:
    if importlib.util.find_spec("nkeys") is None:
        raise SettingsError(f"{setting} needs the nkeys package: pip install 'nats-py[nkeys]'")
