"""Custom handlers the tests run as providers (``hive worker --handler tests.handlers:NAME``)."""

from __future__ import annotations

import time
from typing import Any

import anyio

from hive_bus import FailNow, RetryAfter, RetryLater, Task, retry_policy

# attempts seen per task id, for handlers that behave differently on a later attempt
_seen: dict[str, int] = {}

LEDGER = {"balance": 100}


async def actions(task: Task) -> dict[str, Any]:
    """Runs a list of named actions, the way a remote machine runs a job sent as a task."""
    steps = task.payload if isinstance(task.payload, list) else []
    results: list[dict[str, Any]] = []
    for step in steps:
        if step == "check_balance":
            results.append({"action": step, "balance": LEDGER["balance"]})
        elif step == "send_coins":
            LEDGER["balance"] -= 10
            results.append({"action": step, "sent": 10})
        elif step == "verify_tx":
            results.append({"action": step, "ok": LEDGER["balance"] >= 0})
        else:
            raise FailNow(f"unknown action {step!r}")
    return {"results": results}


async def flaky(task: Task) -> str:
    """Fails with a transient error on its first attempt at each task, then answers."""
    _seen[task.id] = _seen.get(task.id, 0) + 1
    if _seen[task.id] == 1:
        raise RetryLater("upstream answered 503")
    return task.prompt.upper()


async def always_down(task: Task) -> str:
    raise RetryLater("upstream answered 503")


async def refuse(task: Task) -> str:
    raise FailNow("provider said 400: the prompt is not allowed")


async def not_json(task: Task) -> object:
    return object()


async def slow(task: Task) -> str:
    delay_s = task.payload.get("delay_s", 1.0) if isinstance(task.payload, dict) else 1.0
    await anyio.sleep(float(delay_s))
    return f"slept {delay_s}s"


async def quick(task: Task) -> str:
    return task.prompt


def not_async(task: Task) -> str:
    return task.prompt


class WindowLimit:
    """A provider's fixed-window rate limit, shared by every worker that calls it (as a real quota is)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.calls = 0
        self.rate_limited = 0
        self._window_start = time.monotonic()
        self._used = 0

    async def __call__(self, task: Task) -> str:
        self.calls += 1
        now = time.monotonic()
        if now - self._window_start >= self.window_s:
            self._window_start, self._used = now, 0
        if self._used >= self.limit:
            self.rate_limited += 1
            left_s = self.window_s - (now - self._window_start)
            raise RetryAfter(
                f"limit of {self.limit} per {self.window_s}s reached", retry_after_s=left_s, quota="minute"
            )
        self._used += 1
        return f"done: {task.prompt}"


@retry_policy("never")
async def pay_once(task: Task) -> str:
    """Records a payment in the file the payload names, then takes long (to be killed mid-call) or
    raises (a later step failing after the side effect)."""
    async with await anyio.open_file(task.payload["ledger"], "a") as ledger:
        await ledger.write(f"{task.id}\n")
    if task.payload.get("then") == "raise":
        raise RuntimeError("verify_tx: the node did not answer")
    await anyio.sleep(60)
    return "paid"


@retry_policy("signalled")
async def strict(task: Task) -> str:
    """Raises what the prompt names: `RetryLater` the first time for "later", a bug for "bug"."""
    CALLS[task.id] = CALLS.get(task.id, 0) + 1
    if task.prompt == "later" and CALLS[task.id] == 1:
        raise RetryLater("the service is busy")
    if task.prompt == "bug":
        raise KeyError("missing")
    return f"done after {CALLS[task.id]}"


async def lenient(task: Task) -> str:
    """The default policy: a bug is retried."""
    CALLS[task.id] = CALLS.get(task.id, 0) + 1
    if CALLS[task.id] == 1:
        raise KeyError("missing")
    return f"done after {CALLS[task.id]}"


CALLS: dict[str, int] = {}


STARTED: set[str] = set()
ABANDONED: set[str] = set()


async def until_cancelled(task: Task) -> str:
    """Runs until its call is abandoned (records that it started, and that it was abandoned)."""
    STARTED.add(task.id)
    try:
        await anyio.sleep(120)
    except anyio.get_cancelled_exc_class():
        ABANDONED.add(task.id)
        raise
    return "never"
