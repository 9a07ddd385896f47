"""Pulling tasks from a provider's three consumers (high, normal, low priority).

A worker takes from ``high`` before ``normal`` before ``low``. To do that without stalling, it needs a
pull that answers at once when a consumer is empty: JetStream's pull protocol has one (``no_wait``
without ``expires``), but nats-py's ``fetch`` always sends ``expires`` and so waits out its timeout on an
empty consumer. :class:`Puller` speaks the documented protocol directly over nats-py's core client: a
pull request to ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` with a reply subject of our own, then
the messages (ordinary JetStream messages, acked through their reply subjects) and, when fewer than
asked for were waiting, a status message (404 no messages) that ends the request.

When every queue is empty the worker waits on :class:`Wakeup`: a core subscription on the provider's
task subjects, taken only while idle, so a task published then wakes it at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import anyio
import nats.errors
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("hive_bus.worker")

_END_STATUSES = frozenset({"404", "408", "409"})


class Puller:
    """Pull requests to one durable consumer, each answered on its own reply subject."""

    def __init__(self, nc: NATS, stream: str, consumer: str) -> None:
        self._nc = nc
        self.consumer = consumer
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._seq = 0
        self._current: str | None = None
        self._send: MemoryObjectSendStream[Msg] | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("unsubscribing %s failed: %s", self.consumer, exc)

    async def pull(self, batch: int) -> list[Msg]:
        """Up to ``batch`` of the tasks waiting now; an empty list at once when there are none."""
        self._seq += 1
        reply = f"{self._inbox}.{self._seq}"
        request = {"batch": batch, "no_wait": True}
        send, receive = anyio.create_memory_object_stream[Msg](max_buffer_size=batch + 2)
        self._current, self._send = reply, send
        got: list[Msg] = []
        try:
            await self._nc.publish(self._subject, json.dumps(request).encode(), reply=reply)
            # the server ends the request itself; the local bound only covers a lost connection
            with anyio.move_on_after(5):
                await _collect(receive, batch, got)
        finally:
            self._current, self._send = None, None
            send.close()
            extra = _drain(receive)  # tasks beyond the batch: stragglers of an earlier request
            receive.close()
        for msg in extra:
            await _nak(msg)
        return got

    async def _on_msg(self, msg: Msg) -> None:
        # JetStream delivers a task under its own subject, so only a status message names the request it
        # ends. One request is open at a time; a task that comes while one is open belongs to it.
        status = _status(msg)
        if self._send is not None and (status is None or msg.subject == self._current):
            try:
                self._send.send_nowait(msg)
                return
            except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
        if msg.reply and status is None:
            await _nak(msg)  # delivered to a request nobody waits for any more: hand it back at once


async def _nak(msg: Msg) -> None:
    try:
        await msg.nak()
    except nats.errors.Error as exc:
        log.debug("NAK of a late delivery failed (%s); it returns after AckWait", exc)


async def _collect(receive: MemoryObjectReceiveStream[Msg], batch: int, got: list[Msg]) -> None:
    async for msg in receive:
        status = _status(msg)
        if status is None:
            got.append(msg)
            if len(got) >= batch:
                return
        elif status in _END_STATUSES:
            if status == "409":
                log.debug("pull request ended: %s", (msg.headers or {}).get("Description"))
            return
        # 100 (idle heartbeat) and anything else: keep waiting


def _drain(receive: MemoryObjectReceiveStream[Msg]) -> list[Msg]:
    left: list[Msg] = []
    while True:
        try:
            msg = receive.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream):
            return left
        if _status(msg) is None:
            left.append(msg)


def _status(msg: Msg) -> str | None:
    if msg.data or not msg.headers:
        return None
    return msg.headers.get("Status")


class Wakeup:
    """Fires when a task is published on any of ``subjects`` while armed (a core subscription, held only
    while the worker is idle, so busy workers do not receive a copy of every task)."""

    def __init__(self, nc: NATS, subjects: Sequence[str]) -> None:
        self._nc = nc
        self._subjects = subjects
        self._subs: list[Subscription] = []
        self._event = anyio.Event()

    async def arm(self) -> None:
        """Subscribe; from the moment the server has the subscription, a new task fires it."""
        self._event = anyio.Event()
        for subject in self._subjects:
            self._subs.append(await self._nc.subscribe(subject, cb=self._fire))

    async def wait(self, timeout_s: float) -> None:
        with anyio.move_on_after(timeout_s):
            await self._event.wait()

    async def disarm(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("unsubscribing a wake-up failed: %s", exc)

    async def _fire(self, msg: Msg) -> None:
        self._event.set()
