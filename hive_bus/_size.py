"""How large a message is on the wire, checked against the server's real limit before it is sent.

nats-server refuses a message whose headers and payload together exceed its ``max_payload`` (from the
INFO it sends on connecting: 1 MB by default and on the hub), and it refuses by closing the
connection. nats-py checks the payload alone, so a message just under the limit with its headers over
it cost the whole connection. Every publish of the bus is checked here first, headers counted, and an
oversize one raises :class:`TooLarge` instead of going out.
"""

from __future__ import annotations

from collections.abc import Mapping

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck

from ._errors import TooLarge

_HEADER_LINE = len(b"NATS/1.0\r\n")


def header_bytes(headers: Mapping[str, str] | None) -> int:
    """The size of the header block nats-py writes for ``headers`` (0 for none)."""
    if not headers:
        return 0
    return _HEADER_LINE + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items()) + 2


def check_fits(
    nc: NATS, data: bytes, headers: Mapping[str, str] | None = None, *, what: str = "message"
) -> None:
    """Raise :class:`TooLarge` when ``data`` with ``headers`` is over the server's ``max_payload``."""
    size = len(data) + header_bytes(headers)
    limit = nc.max_payload
    if size > limit:
        raise TooLarge(
            f"the {what} is {size} bytes with its headers, over the NATS server's max_payload of {limit} bytes",
            size_bytes=size,
            limit_bytes=limit,
        )


async def js_publish(
    js: JetStreamContext,
    nc: NATS,
    subject: str,
    data: bytes,
    *,
    stream: str,
    headers: dict[str, str] | None = None,
    what: str = "message",
    expect: bool = True,
) -> PubAck:
    """``js.publish`` once :func:`check_fits` passed, counting the ``Nats-Expected-Stream`` header that
    nats-py adds. Raises :class:`TooLarge`, or what ``js.publish`` raises. ``expect`` False (a task
    message) sends no such header, as the tasks stream's RePublish would carry it to the events stream,
    which would refuse the copy; the ack must then name ``stream``."""
    check_fits(nc, data, {**(headers or {}), "Nats-Expected-Stream": stream}, what=what)
    if expect:
        return await js.publish(subject, data, headers=headers, stream=stream)
    ack = await js.publish(subject, data, headers=headers)
    if ack.stream != stream:
        raise nats.js.errors.Error(description=f"the {what} meant for {stream} was stored in {ack.stream}")
    return ack
