"""The event loop that the ``hive`` command runs on: uvloop where it is installed, else asyncio's own.

uvloop (libuv under asyncio's interface) costs the gateway, a worker and a client less CPU per message
than asyncio's selector loop (``bench/gateway.py`` measures both in one run). It is in the ``gateway``
extra except on Windows, which it does not support; where it is missing, or with ``--loop asyncio``
(``HIVE_LOOP=asyncio``), the command runs on asyncio's default loop, as before. Code that uses the
library in its own program keeps whatever loop that program chose: only the ``hive`` command chooses.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Literal, get_args

log = logging.getLogger("hive_bus.cli")

LoopChoice = Literal["auto", "uvloop", "asyncio"]
LOOP_CHOICES: tuple[str, ...] = get_args(LoopChoice)
ENV_LOOP = "HIVE_LOOP"


class LoopUnavailable(RuntimeError):
    """``--loop uvloop`` was asked for where uvloop cannot run; the message says why."""


@functools.cache
def _uvloop_missing() -> str | None:
    """Why uvloop cannot be used here, or None when it can (looked at once per process)."""
    if sys.platform == "win32":
        return "uvloop does not run on Windows"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "uvloop is not installed (pip install 'hive-bus[gateway]' brings it)"
    return None


def backend_options(choice: LoopChoice = "auto") -> dict[str, Any]:
    """anyio's asyncio ``backend_options`` for ``choice``: uvloop for ``"auto"`` where it can run
    (else asyncio's loop, said once at debug), asyncio's loop for ``"asyncio"``, and uvloop or
    :class:`LoopUnavailable` for ``"uvloop"``."""
    if choice == "asyncio":
        return {}
    missing = _uvloop_missing()
    if missing is None:
        return {"use_uvloop": True}
    if choice == "uvloop":
        raise LoopUnavailable(f"--loop uvloop: {missing}")
    _say_once(f"{missing}; running on asyncio's own event loop")
    return {}


@functools.cache
def _say_once(message: str) -> None:
    log.debug(message)
