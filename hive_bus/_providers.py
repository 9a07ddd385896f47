"""The provider seam: anything with ``async def complete(task) -> Output`` is a provider.

A provider returns an :class:`Output` or raises :class:`RetryAfter`, :class:`RetryLater` or
:class:`FailNow`. Custom jobs are plain async functions (``hive worker --handler pkg.mod:fn``) wrapped
in :class:`FunctionProvider`: they may return any JSON value, which becomes the task's output.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, get_args

from ._errors import FailNow, RetryAfter, RetryLater
from ._messages import Task, Usage


@dataclass(frozen=True, slots=True)
class Output:
    """What a provider produced: a value (text from an LLM, any JSON value from a handler)."""

    value: Any
    model: str | None = None
    usage: Usage | None = None
    # why the model stopped, in OpenAI's words: "stop" (done, or a stop sequence), "length" (the token
    # cap), "content_filter"; None where the provider does not say
    finish_reason: str | None = None


class Provider(Protocol):
    """A provider adapter: turns a task into an :class:`Output`, or raises :class:`RetryAfter` (the
    provider said when to come back), :class:`RetryLater` (a passing fault), :class:`FailNow` (retrying
    cannot help) or one of its kinds, :class:`KeyRejected` and :class:`NoQuota`. No base class to
    inherit: any object with this method is one."""

    async def complete(self, task: Task) -> Output: ...


Handler = Callable[[Task], Awaitable[Any]]
H = TypeVar("H", bound=Handler)

# What a handler's failures may lead to:
#   any        any exception is retried with backoff, up to the task's max_attempts (the default);
#   signalled  only RetryAfter and RetryLater retry; any other exception fails the task at once;
#   never      the handler runs at most once for a task: every exception (RetryAfter and RetryLater
#              too) fails the task, and so does a redelivery after a crash mid-call (`interrupted`).
RetryPolicy = Literal["any", "signalled", "never"]
_POLICY_ATTRIBUTE = "__hive_retry__"


def retry_policy(retry: RetryPolicy) -> Callable[[H], H]:
    """Declare what a handler's failures may lead to (``any``, ``signalled`` or ``never``, see
    :data:`RetryPolicy`)::

        @retry_policy("never")  # sends money: never twice
        async def payout(task: Task) -> dict: ...
    """
    if retry not in get_args(RetryPolicy):
        raise ValueError(f"retry policy {retry!r} is not one of {', '.join(get_args(RetryPolicy))}")

    def declare(fn: H) -> H:
        setattr(fn, _POLICY_ATTRIBUTE, retry)
        return fn

    return declare


class FunctionProvider:
    """Runs an async function as a provider; its return value is the output. Its failures are retried
    as its :func:`retry_policy` says."""

    def __init__(self, fn: Handler) -> None:
        self._fn = fn
        self.retry: RetryPolicy = getattr(fn, _POLICY_ATTRIBUTE, "any")

    @property
    def at_most_once(self) -> bool:
        """True when a redelivery after a crash mid-call must fail the task rather than call again."""
        return self.retry == "never"

    async def complete(self, task: Task) -> Output:
        try:
            try:
                result = await self._fn(task)
            except SystemExit as exc:
                # sys.exit() in a job (argparse does it on bad arguments) ends its call, not the worker: let
                # through, it stopped the process, and the task, delivered again, stopped the next one
                raise RuntimeError(f"the handler called sys.exit({exc.code!r})") from None
        except FailNow:
            raise
        except (RetryAfter, RetryLater) as exc:
            if self.retry == "never":
                raise FailNow(f"{exc} (not retried: the handler's retry policy is never)") from exc
            raise
        except asyncio.CancelledError as exc:
            if self.retry == "any" or being_cancelled():
                raise  # the worker retries a CancelledError that no cancel of the call explains
            raise FailNow(
                f"CancelledError while nothing cancelled the call (not retried: the handler's retry policy is "
                f"{self.retry})"
            ) from exc
        except Exception as exc:
            if self.retry == "any":
                raise
            raise FailNow(
                f"{describe(exc)} (not retried: the handler's retry policy is {self.retry})"
            ) from exc
        return result if isinstance(result, Output) else Output(value=result)


def describe(exc: BaseException) -> str:
    """``Type: message`` of an error a call raised; of an exception group (an ``asyncio.TaskGroup`` whose
    child failed, whose own message says only how many), its first errors too, which say what went wrong."""
    said = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, BaseExceptionGroup):
        inner = "; ".join(describe(e) for e in exc.exceptions[:3])
        more = f"; and {len(exc.exceptions) - 3} more" if len(exc.exceptions) > 3 else ""
        said = f"{said}: {inner}{more}"
    return said


def being_cancelled() -> bool:
    """Whether the running task has a cancel pending: anyio's cancel scopes (a call's time limit, a
    cancelled task, a stopping worker) cancel the asyncio task; a CancelledError raised without one
    came from something the call awaited (a future another task cancelled)."""
    current = asyncio.current_task()
    return current is None or current.cancelling() > 0


class HandlerError(ValueError):
    """A ``--handler`` spec that cannot be loaded; the message says why."""


def load_handler(spec: str) -> FunctionProvider:
    """Load ``package.module:function`` as a provider."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerError(f"handler {spec!r} is not of the form package.module:function")
    if os.getcwd() not in sys.path:
        # A handler in the directory the worker was started from imports, but last: a folder there
        # named like an installed package (a `services/` of the user's) must not take its place.
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"cannot import module {module_name!r} for handler {spec!r}: {exc}") from None
    except Exception as exc:  # the module's own code failed as it ran (or did not compile): say where
        raise HandlerError(
            f"cannot import module {module_name!r} for handler {spec!r}: {_where(exc)}"
            f"{type(exc).__name__}: {exc.msg if isinstance(exc, SyntaxError) else exc}"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        where = getattr(module, "__file__", None) or "a namespace package"
        raise HandlerError(f"module {module_name!r} ({where}) has no attribute {attr!r}")
    if not inspect.iscoroutinefunction(fn):
        raise HandlerError(f"handler {spec!r} must be an async function (async def {attr}(task): ...)")
    try:  # called with the task alone: a signature that cannot take it would fail every task
        inspect.signature(fn).bind(None)
    except TypeError as exc:
        raise HandlerError(
            f"handler {spec!r} must take the task as its one argument (async def {attr}(task): ...): {exc}"
        ) from None
    return FunctionProvider(fn)


def _where(exc: BaseException) -> str:
    """``file:line: `` of where a module's import failed: the line of a syntax error, else the last frame."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}: "
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
