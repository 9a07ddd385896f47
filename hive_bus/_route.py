"""The ``cheapest`` routing policy: of a task's provider and its fallbacks, the one with the lowest token
price that has quota left goes first, the others follow as fallbacks, cheapest first.

"Quota left" is read from the bus: a provider has it when a worker of it is online and not waiting for
budget or a cooldown, and not every one of its keys is cooling down or refused. A candidate's model is
the one it names (``groq:llama-3.1-8b-instant``), else the model its online workers report. Its price is
the price table's input plus output price per million tokens; a model without a price goes last.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import anyio
import msgspec

from ._bus import Bus, kv_entries
from ._cooldown import provider_cooldowns
from ._messages import Task, beat_of
from ._nats import BUS_ERRORS
from ._prices import PriceTable

log = logging.getLogger("hive_bus.client")

# How long one reading of the workers and cooldowns serves routing decisions.
FRESH_S = 2.0


@dataclass(frozen=True, slots=True)
class _Provider:
    model: str | None
    has_quota: bool


class CheapestRouter:
    def __init__(self, bus: Bus, prices: PriceTable) -> None:
        self._bus = bus
        self._prices = prices
        self._read_at = -math.inf
        self._state: dict[str, _Provider] = {}
        self._lock = anyio.Lock()

    async def route(self, task: Task) -> Task:
        """The task with its candidates put in order."""
        if task.route != "cheapest" or not task.fallback:
            return task
        try:
            state = await self._read()
        except BUS_ERRORS as exc:
            log.warning("could not read the providers' state (%s); task %s keeps its order", exc, task.id)
            return task
        first = f"{task.provider}:{task.model}" if task.model else task.provider
        candidates = [first, *task.fallback]

        def rank(item: tuple[int, str]) -> tuple[bool, float, int]:
            index, spec = item
            provider, _, model = spec.partition(":")
            known = state.get(provider)
            model = model or (known.model if known else None) or ""
            price = self._prices.prices.get(model)
            cost = math.inf if price is None else price.input_per_mtok + price.output_per_mtok
            return (not (known and known.has_quota), cost, index)

        ordered = [spec for _, spec in sorted(enumerate(candidates), key=rank)]
        provider, _, model = ordered[0].partition(":")
        return msgspec.structs.replace(task, provider=provider, model=model or None, fallback=ordered[1:])

    async def _read(self) -> dict[str, _Provider]:
        async with self._lock:
            if anyio.current_time() - self._read_at < FRESH_S:
                return self._state
            values = await kv_entries(self._bus.workers_kv)
            beats = [beat for key, raw in values.items() if (beat := beat_of(key, raw)) is not None]
            cooling = provider_cooldowns(await kv_entries(self._bus.providers_kv), beats)
            state: dict[str, _Provider] = {}
            for beat in beats:
                free = beat.provider not in cooling and not beat.waiting
                have = state.get(beat.provider)
                state[beat.provider] = _Provider(
                    model=(have.model if have else None) or beat.model,
                    has_quota=free or bool(have and have.has_quota),
                )
            self._state, self._read_at = state, anyio.current_time()
            return state
