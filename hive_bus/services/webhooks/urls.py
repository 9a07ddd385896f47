"""Where a webhook may go: http(s) URLs whose every address is public, unless the operator allows its
network (``HIVE_WEBHOOK_ALLOW_NETWORKS``).

A webhook URL is a request the gateway makes on a user's behalf, from inside the operator's network (a
Pi on a home LAN, a VM beside a cloud's metadata service at 169.254.169.254). So the name is resolved
and each address checked at submission, and again at every delivery, where the request then goes to
the very address that was checked (:class:`Target`): a name that resolves to a public address when it
is submitted and to 127.0.0.1 when it is called (DNS rebinding) is refused at the call.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
RESOLVE_TIMEOUT_S = 5.0


class Refused(ValueError):
    """A webhook URL the gateway will not call; the message says why (naming the host, never the
    whole URL, whose path or query may hold a token)."""


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs (``127.0.0.0/8, 10.1.0.0/16``); raises ValueError naming a bad one."""
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a network (CIDR such as 10.0.0.0/8)") from None
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL and the addresses its host resolved to, all allowed: a request goes to
    ``addresses[0]`` and names ``host`` (``Host`` header, TLS server name)."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[Address, ...]


def shown(url: str) -> str:
    """The URL fit for logs, records and errors: no user, password or query (where tokens live)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(not a valid URL)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def _kind(address: Address) -> str:
    for word, flag in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if flag:
            return word
    return "non-public"


def _unmapped(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address


def _allowed(address: Address, allow: Iterable[Network]) -> bool:
    if any(address.version == net.version and address in net for net in allow):
        return True
    return address.is_global and not address.is_multicast


def split(url: str) -> tuple[str, str, int]:
    """The scheme, host and port of an http(s) URL; raises :class:`Refused` for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused(f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused(f"scheme {scheme or '(none)'!r} is not allowed; use http or https")
    if not parts.hostname:
        raise Refused("the URL has no host")
    try:  # what the request is made from: a control character (NUL, DEL) passes the checks above
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise Refused(f"not a valid URL ({exc})") from None
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80)


async def check(url: str, allow: Iterable[Network]) -> Target:
    """``url`` resolved, every address allowed; raises :class:`Refused` saying why not."""
    scheme, host, port = split(url)
    try:
        addresses: tuple[Address, ...] = (ipaddress.ip_address(host),)
        literal = True
    except ValueError:
        addresses, literal = await _resolve(host, port), False
    addresses = tuple(dict.fromkeys(_unmapped(a) for a in addresses))
    allow = tuple(allow)
    for address in addresses:
        if not _allowed(address, allow):
            said = "is" if literal and str(address) == host else f"resolves to {address},"
            raise Refused(
                f"host {host} {said} a {_kind(address)} address; webhooks go to public addresses "
                "only, unless HIVE_WEBHOOK_ALLOW_NETWORKS lists its network"
            )
    return Target(url=url, scheme=scheme, host=host, port=port, addresses=addresses)


async def _resolve(host: str, port: int) -> tuple[Address, ...]:
    try:
        with anyio.fail_after(RESOLVE_TIMEOUT_S):
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise Refused(f"host {host} did not resolve within {RESOLVE_TIMEOUT_S:g} s") from None
    except OSError as exc:
        raise Refused(f"host {host} does not resolve ({exc.strerror or exc})") from None
    found: list[Address] = []
    for info in infos:
        # the scope of a link-local IPv6 address ("fe80::1%eth0") is not part of the address
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise Refused(f"host {host} has no address")
    return tuple(found)
