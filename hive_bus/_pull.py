"""Pulling tasks from a provider's three consumers (high, normal, low priority).

A worker takes from ``high`` before ``normal`` before ``low``. To do that without stalling, it needs a
pull that answers at once when a consumer is empty: JetStream's pull protocol has one (``no_wait``
without ``expires``), but nats-py's ``fetch`` always sends ``expires`` and so waits out its timeout on an
empty consumer. :class:`Puller` speaks the documented protocol (:mod:`hive_bus._nats`, which the
gateway's event follower uses too) directly over nats-py's core client: a
pull request to ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` with a reply subject of our own, then
the messages (ordinary JetStream messages, acked through their reply subjects) and, when fewer than
asked for came, a status message that ends the request (404 no messages, 408 request timeout).

An idle worker waits with ``expires`` (a task is delivered the moment it is stored) on several
consumers at once, and stops waiting on the others when one answers. A request it stopped waiting on
may still deliver a task later; such a task is kept (:attr:`Puller.spare`) and handed out first by the
next pull, never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from hive_bus._nats import END_STATUSES, PullInbox, pull_subject

log = logging.getLogger("hive_bus.worker")


class Puller:
    """Pull requests to one durable consumer, answered on reply subjects of its own.

    Every task delivered, whichever request it answers, lands in :attr:`spare` and is handed out by the
    next :meth:`pull` or :meth:`wait`. At most one waiting request is open at a time, so an idle worker
    that is woken up often does not pile requests up on the server.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        consumer: str,
        on_task: Callable[[], None] | None = None,
        *,
        domain: str | None = None,
    ) -> None:
        self._nc = nc
        self._on_task = on_task  # told when a waiting request brings a task
        self.consumer = consumer
        self._subject = pull_subject(stream, consumer, domain=domain)
        # no-wait requests are answered on one inbox, waiting requests on another: a task that comes on
        # the second is the one a waiting request (of one task) asked for, which ends it
        self._asked = PullInbox(nc, self._on_msg)
        self._waited = PullInbox(nc, self._on_waited)
        self._asking: str | None = None  # the reply subject of the open no-wait request
        self._waiting: str | None = None  # the reply subject of the open waiting request
        self._waiting_until = 0.0
        self._changed = anyio.Event()
        self.spare: list[Msg] = []

    async def start(self) -> None:
        await self._asked.start()
        await self._waited.start()

    async def stop(self) -> None:
        """Stop listening; spare tasks go back to the server at once."""
        spare, self.spare = self.spare, []
        for msg in spare:
            await _nak(msg)
        await self._asked.stop()
        await self._waited.stop()

    async def quiet(self) -> None:
        """Wait until no waiting request is open (it cannot be called back), so that a task handed back
        now is not delivered to this worker as it leaves."""
        with anyio.move_on_after(max(0.0, self._waiting_until - anyio.current_time()) + 1):
            while self._waiting is not None and anyio.current_time() <= self._waiting_until:
                await self._changed.wait()

    def take(self, batch: int) -> list[Msg]:
        got, self.spare = self.spare[:batch], self.spare[batch:]
        return got

    async def pull(self, batch: int) -> list[Msg]:
        """Up to ``batch`` tasks: the spare ones, then those waiting now; at once when there are none."""
        if len(self.spare) < batch:
            reply = self._asked.next_reply()
            self._asking = reply
            await self._asked.send(self._subject, reply, batch=batch - len(self.spare), no_wait=True)
            # the server ends the request itself; the local bound only covers a lost connection
            with anyio.move_on_after(5):
                while self._asking == reply and len(self.spare) < batch:
                    await self._changed.wait()
        return self.take(batch)

    async def ask(self, wait_s: float) -> None:
        """Open a waiting request for one task, unless one is open: the task is delivered the moment it
        is stored, into :attr:`spare`, and ``on_task`` is told."""
        if self._waiting is None or anyio.current_time() > self._waiting_until:
            reply = self._waited.next_reply()
            self._waiting, self._waiting_until = reply, anyio.current_time() + wait_s
            await self._waited.send(self._subject, reply, batch=1, expires_s=wait_s)

    async def wait(self, wait_s: float) -> list[Msg]:
        """The spare tasks, or else the first task to come within ``wait_s``; an empty list when none came."""
        if not self.spare:
            await self.ask(wait_s)
            with anyio.move_on_after(wait_s + 1):
                while not self.spare and self._waiting is not None:
                    await self._changed.wait()
        return self.take(len(self.spare))

    def _on_msg(self, msg: Msg, status: str | None) -> None:
        # JetStream delivers a task under its own subject, so only a status message names its request.
        if status is None:
            self.spare.append(msg)
        elif status in END_STATUSES and msg.subject == self._asking:
            self._asking = None
        else:
            return  # the end of an earlier request, or an idle heartbeat
        self._notify()

    def _on_waited(self, msg: Msg, status: str | None) -> None:
        if status is None:
            self.spare.append(msg)
            self._waiting = None  # it asked for one task
            if self._on_task is not None:
                self._on_task()
        elif status in END_STATUSES and msg.subject == self._waiting:
            self._waiting = None
        else:
            return
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


async def _nak(msg: Msg) -> None:
    try:
        await msg.nak()
    except nats.errors.Error as exc:
        log.debug("NAK of a spare task failed (%s); it returns after AckWait", exc)
