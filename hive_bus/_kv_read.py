"""Every current value of a key-value bucket, read without leaving a consumer on the server.

A bucket that takes direct gets (the heartbeats, the providers' cooldowns, the budgets) is read by
batched direct gets (``multi_last``, nats-server 2.11 and later): the server answers on an inbox of
this read's own with each key's last message and an end-of-batch status, and keeps nothing. A read
through a consumer (nats-py's ``keys()`` and ``watch()``, or a pull consumer) costs the server one
consumer per read until it goes inactive: a dashboard polled by many clients made thousands, up to
the account's limit, after which nothing on the bus could make one. A bucket without direct gets
(batches, schedules) is read by a consumer deleted as soon as the read ends.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from ._nats import BUS_ERRORS, kv_direct, kv_parts, unsubscribe

# nats-server answers 413 to a multi_last get matching more subjects than it sends at once (1024):
# the keys are then listed and asked for this many at a time
_KEYS_AT_ONCE = 512

_encoder = msgspec.json.Encoder()

# a key's subject and its last message's data (none for a delete or purge marker)
_Entry = tuple[str, bytes]


class _TooMany(Exception):
    """More keys match than one batched get answers for."""


async def kv_entries(kv: KeyValue, pattern: str = ">", *, timeout_s: float = 5.0) -> dict[str, bytes]:
    """The current values of the keys matching ``pattern`` (deleted keys left out). Raises
    ``NotFoundError`` when the bucket does not exist, ``TimeoutError`` when the read takes longer
    than ``timeout_s``."""
    js, stream, prefix = kv_parts(kv)
    direct = kv_direct(kv)
    with anyio.fail_after(timeout_s):
        if direct is None:
            msgs = await _by_consumer(js, stream, prefix + pattern, timeout_s)
        else:
            msgs = await _by_direct_gets(js, stream, *direct, prefix + pattern)
    found: dict[str, bytes] = {}
    for subject, data in msgs:
        if data:  # a delete or purge marker has none
            found[subject[len(prefix) :]] = data
    return found


async def _by_direct_gets(
    js: JetStreamContext, stream: str, nc: NATS, api: str, subject: str
) -> list[_Entry]:
    try:
        return await _last_of(js, stream, nc, api, [subject], up_to_seq=None)
    except _TooMany:
        pass
    info = await js.stream_info(stream, subjects_filter=subject)
    keys = sorted(info.state.subjects or {})
    found: list[_Entry] = []
    for i in range(0, len(keys), _KEYS_AT_ONCE):
        # as of one sequence, so that the pieces are one moment's values
        found += await _last_of(
            js, stream, nc, api, keys[i : i + _KEYS_AT_ONCE], up_to_seq=info.state.last_seq
        )
    return found


async def _last_of(
    js: JetStreamContext, stream: str, nc: NATS, api: str, subjects: list[str], *, up_to_seq: int | None
) -> list[_Entry]:
    """The last message of each subject matching ``subjects``, page after page as the server sends
    them (a page ends with a 204 status saying how many are left)."""
    request: dict[str, Any] = {"multi_last": subjects}
    if up_to_seq:
        request["up_to_seq"] = up_to_seq
    found: list[_Entry] = []
    sub = await nc.subscribe(nc.new_inbox())
    try:
        while True:
            await nc.publish(api, _encoder.encode(request), reply=sub.subject)
            while (status := _status(msg := await sub.next_msg(timeout=None))) is None:
                found.append((msg.headers.get("Nats-Subject", "") if msg.headers else "", msg.data))
            headers = msg.headers or {}
            if status == "404":  # no key matches
                return found
            if status == "413":
                raise _TooMany
            if status == "503":  # no stream answers: say whether it is gone
                await js.stream_info(stream)
                raise nats.errors.NoRespondersError
            if status != "204":
                raise nats.js.errors.APIError(code=int(status), description=headers.get("Description", ""))
            if int(headers.get("Nats-Num-Pending", "0")) == 0:
                return found
            # the rest of the same moment's values, after the last one sent
            request["seq"] = int(headers.get("Nats-Last-Sequence", "0")) + 1
            request["up_to_seq"] = int(headers.get("Nats-UpTo-Sequence", "0"))
    finally:
        await unsubscribe(sub)


def _status(msg: Msg) -> str | None:
    return None if msg.data or not msg.headers else msg.headers.get("Status")


async def _by_consumer(js: JetStreamContext, stream: str, subject: str, timeout_s: float) -> list[_Entry]:
    """Through a consumer that delivers each key's last message, deleted when the read ends."""
    config = ConsumerConfig(
        filter_subject=subject,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        inactive_threshold=60.0,  # only if the deletion below does not reach the server
    )
    info = await js.add_consumer(stream, config)
    try:
        psub = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
        found: list[_Entry] = []
        try:
            remaining = info.num_pending or 0
            while remaining > 0:
                msgs = await psub.fetch(min(remaining, 1000), timeout=timeout_s)
                found += [(msg.subject, msg.data) for msg in msgs]
                remaining -= len(msgs)
        finally:
            await unsubscribe(psub)
        return found
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(3), contextlib.suppress(*BUS_ERRORS):
            await js.delete_consumer(stream, info.name)
