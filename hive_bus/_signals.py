"""Waiting for Ctrl-C or SIGTERM, on Linux, macOS and Windows alike.

anyio's ``open_signal_receiver`` rests on the event loop's ``add_signal_handler``, which Windows' event
loops do not have (they raise ``NotImplementedError``). There the signals are caught with
``signal.signal`` instead, whose handler only wakes the loop: Windows' Proactor loop lets a signal
wake it (Python 3.8 and later), so Ctrl-C stops a service there as it does on Linux: a drain first,
and a second Ctrl-C interrupts the drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import anyio

log = logging.getLogger("hive_bus.cli")

# SIGBREAK is Ctrl-Break in a Windows console; SIGTERM is what a service manager sends elsewhere.
_SIGNALS = tuple(
    s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGBREAK", None)) if s is not None
)


async def until_stopped() -> None:
    """Return at the first Ctrl-C or SIGTERM (Ctrl-Break too on Windows). The handlers are put back
    on the way out, so a second Ctrl-C while the caller drains interrupts as usual."""
    try:
        with anyio.open_signal_receiver(*_SIGNALS) as signals:
            async for signum in signals:
                _stopping(signum)
                return
    except NotImplementedError:  # no add_signal_handler: Windows' event loops
        pass
    _stopping(await _by_signal_module())


async def _by_signal_module() -> int:
    loop = asyncio.get_running_loop()
    caught = anyio.Event()
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes, possibly inside the loop: only hand over.
        received.append(signum)
        loop.call_soon_threadsafe(caught.set)

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    try:
        await caught.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return received[0]


def _stopping(signum: int) -> None:
    log.info("%s received; stopping", signal.Signals(signum).name)
