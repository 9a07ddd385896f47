"""Which of a worker's keys may call now: the one place that decides it.

A key is *set aside* for a model when the provider refused it (401/403, until ``hive keys --clear``) or
said it has no quota for that model (for ``NO_QUOTA_RECHECK_S``); a set-aside key is not waited for.
Otherwise it is *held* while it cools down after a 429, while its first call has not answered (the
probe: at start and after each 429 a key's first call goes alone for up to ``PROBE_HOLD_S``, so a spent
quota costs one 429, not one per lane), or while its budget is spent. The fetch gate
(:meth:`KeyRing.blocked_now`) and the per-task choice (:meth:`KeyRing.pick`) both ask
:meth:`KeyRing.check`, so they agree on every key. No I/O here but the budget reservation; both clocks
are injected, so the rules are tested without a server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ._budget import Denied, Reservation
from ._cooldown import CooldownRecord
from ._errors import Quota
from ._messages import RetryReason, now_ms

log = logging.getLogger("hive_bus.worker")

# A key's first call (at start, or after a 429) goes alone for at most this long: a spent quota answers
# 429 within milliseconds, so a call still running after it is a real one, and the other lanes go on.
PROBE_HOLD_S = 1.0
# How often a task waiting for a key's first call to answer looks again.
PROBE_WAIT_S = 0.05
# A key with no quota at all for a model (NoQuota: a free tier without it) is not used for that model
# again for this long; then one call finds out whether that changed (a tier upgraded).
NO_QUOTA_RECHECK_S = 600.0


@dataclass(frozen=True, slots=True)
class Blocked:
    """Why a key (or every key) cannot call yet, and for how long."""

    wait_s: float
    why: str
    quota: Quota
    reason: RetryReason


class BudgetBook(Protocol):
    """What the key choice needs of :class:`~hive_bus._budget.Budgets`."""

    def known_wait_s(self, key: str, model: str | None) -> float: ...

    async def reserve(self, key: str, model: str | None, tokens: int) -> Reservation | Denied | None: ...


class KeyRing:
    """One worker's keys of one provider: which may call now, taken in turn.

    ``cooldowns`` is the live map of cooldown records (:attr:`KeyCooldowns.records`); ``monotonic``
    returns seconds (probes, no-quota memory) and ``wall_ms`` epoch milliseconds (cooldowns are written
    in wall-clock time by any worker).
    """

    def __init__(
        self,
        provider: str,
        keys: Sequence[str],
        cooldowns: Mapping[str, CooldownRecord],
        budgets: BudgetBook,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = now_ms,
        owner: str = "",
    ) -> None:
        if not keys:
            raise ValueError("a worker needs at least one provider key")
        self.provider = provider
        self.keys = list(keys)
        self._cooldowns = cooldowns
        self._budgets = budgets
        self._monotonic = monotonic
        self._wall_ms = wall_ms
        self._owner = owner  # the worker, for logs
        self._next = 0
        # Keys whose last call was not refused by a rate limit; probing: key -> when its first call began.
        self._proven: set[str] = set()
        self._probing: dict[str, float] = {}
        # (key, model) -> (until when, monotonic; the provider's word): keys with no quota for a model
        self._no_quota: dict[tuple[str, str | None], tuple[float, str]] = {}

    # the one definition ----------------------------------------------------------------------------

    def set_aside_why(self, key: str, model: str | None) -> str | None:
        """The provider's word when ``key`` cannot serve ``model`` at all (refused, or no quota for the
        model until the recheck); None when it can, now or after a wait."""
        record = self._cooldowns.get(key)
        if record is not None and record.refused:
            return record.reason
        return self.no_quota_for(key, model)

    def check(self, key: str, model: str | None, *, probe: bool = True) -> str | Blocked | None:
        """``key`` for ``model``: set aside (the provider's word), held (:class:`Blocked`: a cooldown, or
        its first call not answered, unless ``probe`` is false), or None: it may call, within its budget."""
        if (why := self.set_aside_why(key, model)) is not None:
            return why
        record = self._cooldowns.get(key)
        if record is not None and (cooling_s := record.left_s(self._wall_ms())) > 0:
            return Blocked(
                cooling_s,
                f"waiting out the {self.provider} cooldown: {record.reason}",
                record.quota,
                "rate_limit",
            )
        if probe and (probe_left_s := self.probe_left_s(key)) > 0:
            # the key's first call (at start, or after a rate limit) has not answered yet: a second one
            # now would meet the same 429
            return Blocked(
                min(PROBE_WAIT_S, probe_left_s), f"the first call on key {key} has not answered", "minute",
                "rate_limit",
            )  # fmt: skip
        return None

    def blocked_now(self, model: str | None) -> Blocked | None:
        """For the fetch gate: why no key can serve ``model`` now and for how long, from what this
        worker knows (no round trip); None when one can, or when every key is set aside (then tasks are
        fetched so that they move on or fail with the provider's word instead of lingering). A probe
        does not hold fetching: it lasts at most ``PROBE_HOLD_S``, and the lane waits for it."""
        best: Blocked | None = None
        for key in self.keys:
            blocked = self.check(key, model, probe=False)
            if isinstance(blocked, str):
                continue
            budget_s = self._budgets.known_wait_s(key, model)
            if blocked is None and budget_s == 0:
                return None
            if blocked is None or budget_s > blocked.wait_s:
                blocked = Blocked(budget_s, f"{self.provider} budget spent", "minute", "budget")
            if best is None or blocked.wait_s < best.wait_s:
                best = blocked
        return best

    async def pick(self, model: str | None, tokens: int) -> tuple[str, Reservation | None] | Blocked | None:
        """One pass over the keys, each in turn: the first that may call, with its budget reserved (and
        its probe begun if it has not proved itself); else the shortest wait; None when every key is set
        aside for ``model``."""
        best: Blocked | None = None
        n = len(self.keys)
        for i in range(n):
            key = self.keys[(self._next + i) % n]
            state = self.check(key, model)
            if isinstance(state, str):
                continue
            if state is None:
                got = await self._budgets.reserve(key, model, tokens)
                if not isinstance(got, Denied):
                    self._next = (self._next + i + 1) % n
                    if key not in self._proven and key not in self._probing:
                        self._probing[key] = self._monotonic()
                    return key, got
                state = Blocked(
                    got.wait_s, f"{self.provider} budget spent ({got.limit} of key {key})",
                    "day" if got.daily else "minute", "budget",
                )  # fmt: skip
            if best is None or state.wait_s < best.wait_s:
                best = state
        return best

    # what calls tell ---------------------------------------------------------------------------------

    def probe_left_s(self, key: str) -> float:
        """How much longer calls on ``key`` wait for its first call to answer; 0 to go ahead."""
        began = self._probing.get(key)
        return 0.0 if began is None else max(0.0, PROBE_HOLD_S - (self._monotonic() - began))

    def answered(self, key: str, *, rate_limited: bool) -> None:
        """A call on ``key`` answered. After a 429 (or a refusal) its next call goes alone again; after
        anything else it has proved itself and the other lanes go on."""
        if rate_limited:
            self._proven.discard(key)
        else:
            self._proven.add(key)
            self._probing.pop(key, None)

    def released(self, key: str) -> None:
        """The call on ``key`` is over and settled (or cancelled): a probe it was ends here, once the
        key's cooldown, if any, is known."""
        self._probing.pop(key, None)

    def set_aside(self, key: str, model: str | None, why: str) -> None:
        """The provider said ``key`` has no quota for ``model``: not used for it until the recheck."""
        if self.no_quota_for(key, model) is None:
            log.warning(
                "worker %s: key %s has no %s quota for model %s; not used for it for %gs (%s)",
                self._owner, key, self.provider, model or "(default)", NO_QUOTA_RECHECK_S, why,
            )  # fmt: skip
        self._no_quota[key, model] = (self._monotonic() + NO_QUOTA_RECHECK_S, why)

    def no_quota_for(self, key: str, model: str | None) -> str | None:
        """The provider's word when ``key`` has no quota for ``model`` (until the recheck), else None."""
        found = self._no_quota.get((key, model))
        if found is None:
            return None
        until, why = found
        if self._monotonic() >= until:
            del self._no_quota[key, model]
            return None
        return why

    def set_aside_reasons(self, model: str | None) -> list[str]:
        """The provider's words for every key refused (by any worker) or without quota for ``model``."""
        reasons = {r.reason for r in self._cooldowns.values() if r.refused}
        reasons |= {why for k in self.keys if (why := self.no_quota_for(k, model)) is not None}
        return sorted(reasons)
