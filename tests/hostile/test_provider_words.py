"""Issue 12, point 10: what a provider sends back is not trusted. ``retry-after: inf`` raised
OverflowError in the settler and the task was stuck; idempotency keys that a header would alter
collided."""

from __future__ import annotations

import math

import pytest

from hive_bus import FunctionProvider, Hive, RetryAfter, Task, TaskView
from hive_bus._client import validate
from hive_bus._errors import MAX_RETRY_AFTER_S, UNKNOWN_RETRY_AFTER_S
from hive_bus.workers._classify import retry_after_header_s

from ..helpers import eventually, running_worker

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("given", "used"),
    [
        (math.inf, MAX_RETRY_AFTER_S),
        (1e300, MAX_RETRY_AFTER_S),
        (-5.0, 0.0),
        (math.nan, UNKNOWN_RETRY_AFTER_S),
        (47.0, 47.0),
    ],
)
def test_an_absurd_delay_is_made_usable(given: float, used: float) -> None:
    assert RetryAfter("429", retry_after_s=given).retry_after_s == used


@pytest.mark.parametrize("header", ["inf", "-inf", "nan", "Infinity", "1e400"])
def test_a_retry_after_header_that_is_not_a_delay_is_ignored(header: str) -> None:
    assert retry_after_header_s(header) is None


async def test_retry_after_inf_moves_the_task_instead_of_sticking(hive: Hive) -> None:
    async def limited(task: Task) -> str:
        raise RetryAfter("provider says retry-after: inf", retry_after_s=math.inf)

    bus = hive.bus
    async with running_worker(bus, "limited", FunctionProvider(limited)):
        task_id = await hive.submit("limited", "hola", fallback=["echo"])

        async def moved() -> TaskView | None:
            view = await hive.get(task_id)
            return view if view.reason == "moved" else None

        view = await eventually(moved, 10, "the task to move on")  # the router (in the gateway) queues it
    assert (view.status, view.provider) == ("queued", "echo")


@pytest.mark.parametrize(
    "keys",
    [("k\n", "k"), ("a\nb", "a b"), (" k", "k"), ("k\r\n", "k\n"), ("clé", "cl\u00e9 ")],
)
async def test_idempotency_keys_that_differ_are_different_work(hive: Hive, keys: tuple[str, str]) -> None:
    first, second = [
        await hive.submit_request(validate({"provider": "echo", "prompt": k, "idempotency_key": k}))
        for k in keys
    ]
    assert not first.duplicate
    assert not second.duplicate, f"{keys!r} taken for one key"
    assert first.id != second.id
    again = await hive.submit_request(
        validate({"provider": "echo", "prompt": "x", "idempotency_key": keys[0]})
    )
    assert (again.id, again.duplicate) == (first.id, True)  # the same key still is the same work
