"""Request and token budgets, counted before each call and shared by every worker of a provider.

Providers limit each key (project, organisation) per model: requests per minute, tokens per minute,
requests per day. A budget states those limits once (a TOML file, ``HIVE_BUDGETS_FILE``, and inline
TOML in ``HIVE_BUDGETS``)::

    [groq]                                # every key and model of groq
    rpm = 30
    rpd = 14400
    [groq.models."llama-3.3-70b-versatile"]
    tpm = 12000
    [groq.keys.paid]                      # one key (named in GROQ_API_KEYS as paid=...) has more
    rpm = 1000

and each (provider, key, model) gets a ledger in the budgets KV bucket: the calls of the last minute
(when each was made, and its tokens) and the requests of the last day (in slots of 1/288 day). A
worker reserves a call in the ledger with compare-and-set before it calls, and puts the call's real
tokens and end time in afterwards. Every window slides, so a provider that counts in fixed windows, or
with a token bucket, never sees more than its limit; the ledger lives on the server's disk, so the
count survives worker restarts.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from msgspec import Meta
from nats.js.kv import KeyValue

from ._bus import kv_entries
from ._messages import encoder, now_ms
from ._names import is_valid_token
from ._nesting import Guarded
from ._publish import refused_as_full
from ._settings import INT64_MAX, MAX_SECONDS
from ._textfile import convert_at, line_of, parse_toml, read_toml, toml_key

log = logging.getLogger("hive_bus.budget")

PositiveInt = Annotated[int, Meta(gt=0, le=INT64_MAX)]
PositiveSeconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS)]
DAY_SLOTS = 288
# a budget whose ledger a full bucket refuses is said at most this often (it is asked once a call)
FULL_SAID_EVERY_S = 60.0
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_=-]")


class BudgetError(ValueError):
    """A budget file or setting that cannot be used; the message says where and why."""


class Limits(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Limits of one key and model. ``window_s`` and ``day_s`` are the lengths of the "minute" and the
    "day" (shorter only in tests and benchmarks)."""

    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    rpd: PositiveInt | None = None
    window_s: PositiveSeconds | None = None
    day_s: PositiveSeconds | None = None

    def over(self, other: Limits) -> Limits:
        """These limits, with ``other``'s where ``other`` sets them."""
        mine = msgspec.structs.asdict(self)
        mine.update({k: v for k, v in msgspec.structs.asdict(other).items() if v is not None})
        return Limits(**mine)

    @property
    def window_ms(self) -> int:
        return int((self.window_s or 60.0) * 1000)

    @property
    def day_ms(self) -> int:
        return int((self.day_s or 86400.0) * 1000)

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.rpd))


class _KeyConfig(Limits, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    models: dict[str, Limits] = {}


class ProviderBudget(Limits, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    models: dict[str, Limits] = {}
    keys: dict[str, _KeyConfig] = {}

    def limits(self, key: str, model: str | None) -> Limits:
        """The limits of one key and model: the provider's, then the model's, then the key's."""
        base = Limits(**{f: getattr(self, f) for f in Limits.__struct_fields__})
        if model is not None and model in self.models:
            base = base.over(self.models[model])
        if key in self.keys:
            key_config = self.keys[key]
            base = base.over(Limits(**{f: getattr(key_config, f) for f in Limits.__struct_fields__}))
            if model is not None and model in key_config.models:
                base = base.over(key_config.models[model])
        return base


def load_budgets(file: str | None, inline: str | None) -> dict[str, ProviderBudget]:
    """Budgets per provider from a TOML file and inline TOML (which wins, provider by provider). An
    error names the file (or ``HIVE_BUDGETS``), and the line and key where it can, as the routes file's."""
    raw: dict[str, tuple[Any, str, str]] = {}  # provider: (its table, where it was read, that text)
    if file:
        where = f"HIVE_BUDGETS_FILE {file}"
        try:
            tables, text = read_toml(file, where)
        except ValueError as exc:
            raise BudgetError(str(exc)) from None
        raw.update({p: (table, where, text) for p, table in tables.items()})
    if inline:
        raw.update(
            {p: (table, "HIVE_BUDGETS", inline) for p, table in _parse(inline, "HIVE_BUDGETS").items()}
        )
    budgets = {}
    for provider, (table, where, text) in raw.items():
        if not is_valid_token(provider):
            raise BudgetError(
                f"{where}: {_at(text, [provider])}key {toml_key([provider])}: not a provider name"
            )
        # each model's and key's table on its own first, so that an error names it
        for group in ("models", "keys"):
            entries = table.get(group, {}) if isinstance(table, dict) else {}
            for name, entry in entries.items() if isinstance(entries, dict) else ():
                kind = _KeyConfig if group == "keys" else Limits
                _convert(entry, kind, [provider, group, name], where, text)
        budgets[provider] = _convert(table, ProviderBudget, [provider], where, text)
    return budgets


def _convert(value: Any, kind: type[Any], table: list[str], where: str, text: str) -> Any:
    try:
        return convert_at(value, kind, table, where, text)
    except ValueError as exc:
        raise BudgetError(str(exc)) from None


def _at(text: str, table: list[str], key: str | None = None) -> str:
    line = line_of(text, table, key)
    return f"line {line}, " if line else ""


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        return parse_toml(text, where)
    except ValueError as exc:
        raise BudgetError(str(exc)) from None


class Ledger(msgspec.Struct, kw_only=True, tag="budget.v1", tag_field="type"):
    """One key and model's recent use, as stored in the budgets bucket."""

    # (when, tokens, id) of each call of the last window, oldest first
    calls: list[tuple[int, int, int]] = []
    # (slot start, requests) of the last day, oldest first
    day: list[tuple[int, int]] = []
    # the limits its last writer enforced: for stats and metrics
    limits: Limits | None = None

    def prune(self, limits: Limits, at_ms: int) -> None:
        self.calls = [c for c in self.calls if c[0] > at_ms - limits.window_ms]
        slot_ms = limits.day_ms // DAY_SLOTS
        self.day = [d for d in self.day if d[0] + slot_ms > at_ms - limits.day_ms]

    def wait_ms(self, limits: Limits, at_ms: int, tokens: int) -> tuple[int, str]:
        """How long until a call of ``tokens`` fits, and the limit that holds it (0 and "" if it fits)."""
        waits = [(0, "")]
        window_ms = limits.window_ms
        if limits.rpm is not None and len(self.calls) >= limits.rpm:
            waits.append((self.calls[len(self.calls) - limits.rpm][0] + window_ms - at_ms, "rpm"))
        if limits.tpm is not None and self.calls:
            used = sum(c[1] for c in self.calls)
            for when, spent, _ in self.calls:
                if used + tokens <= limits.tpm:
                    break
                used -= spent
                waits.append((when + window_ms - at_ms, "tpm"))
        if limits.rpd is not None:
            count = sum(n for _, n in self.day)
            slot_ms = limits.day_ms // DAY_SLOTS
            for start, n in self.day:
                if count < limits.rpd:
                    break
                count -= n
                waits.append((start + slot_ms + limits.day_ms - at_ms, "rpd"))
        wait, which = max(waits)
        return max(0, wait), which

    def add(self, limits: Limits, at_ms: int, tokens: int, call_id: int) -> None:
        self.calls.append((at_ms, tokens, call_id))
        slot = at_ms - at_ms % (limits.day_ms // DAY_SLOTS)
        if self.day and self.day[-1][0] == slot:
            self.day[-1] = (slot, self.day[-1][1] + 1)
        else:
            self.day.append((slot, 1))


_ledger = Guarded(msgspec.json.Decoder(Ledger), enclosing=1)


@dataclass(frozen=True, slots=True)
class Reservation:
    key: str
    model: str | None
    call_id: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Denied:
    wait_s: float
    limit: str  # rpm, tpm or rpd

    @property
    def daily(self) -> bool:
        return self.limit == "rpd"


class Budgets:
    """One worker's view of its provider's budgets (the same object serves all its keys)."""

    def __init__(self, kv: KeyValue, provider: str, config: ProviderBudget | None) -> None:
        self._kv = kv
        self._provider = provider
        self._config = config
        self._locks: dict[str, anyio.Lock] = {}
        self._seen: dict[str, tuple[Ledger, Limits]] = {}  # the last ledger read, per scope
        self._full_said_s: dict[str, float] = {}  # when a full bucket was last said, per scope

    def limits(self, key: str, model: str | None) -> Limits | None:
        if self._config is None:
            return None
        limits = self._config.limits(key, model)
        return limits if limits.any else None

    def scope(self, key: str, model: str | None) -> str:
        """The ledger's key in the bucket: ``<provider>.<key>.<model>``, each part one token."""
        return ".".join(_KEY_UNSAFE.sub("_", part) for part in (self._provider, key, model or "default"))

    def known_wait_s(self, key: str, model: str | None) -> float:
        """How long this worker last saw the budget hold (no bus round trip; others may have spent since)."""
        seen = self._seen.get(self.scope(key, model))
        if seen is None:
            return 0.0
        ledger, limits = seen
        at_ms = now_ms()
        ledger.prune(limits, at_ms)
        return ledger.wait_ms(limits, at_ms, 0)[0] / 1000

    async def reserve(self, key: str, model: str | None, tokens: int) -> Reservation | Denied | None:
        """Reserve one call; None when no budget applies, :class:`Denied` with the wait when spent."""
        limits = self.limits(key, model)
        if limits is None:
            return None
        call_id = secrets.randbits(31)

        def take(ledger: Ledger, at_ms: int) -> Denied | None:
            wait_ms, which = ledger.wait_ms(limits, at_ms, tokens)
            if wait_ms > 0:
                return Denied(wait_ms / 1000, which)
            ledger.add(limits, at_ms, tokens, call_id)
            return None

        try:
            denied = await self._change(key, model, limits, take)
        except nats.js.errors.APIError as exc:
            if not refused_as_full(exc):
                raise
            # the bucket is full (another provider's credential may have filled it): the call goes
            # ahead uncounted, as without a budget (a 429 still cools the key), rather than never
            self._say_full(self.scope(key, model), exc.description)
            return None
        return denied or Reservation(key, model, call_id, tokens)

    def _say_full(self, scope: str, why: str | None) -> None:
        at_s = time.monotonic()
        if at_s - self._full_said_s.get(scope, -FULL_SAID_EVERY_S) >= FULL_SAID_EVERY_S:
            self._full_said_s[scope] = at_s
            log.warning(
                "budget %s is not counted: the budgets bucket refused its ledger (%s); its calls go "
                "ahead as if it had no budget. hive_bucket_keys tells whose keys fill the bucket",
                scope, why,
            )  # fmt: skip

    async def settle(self, reservation: Reservation, tokens: int | None) -> None:
        """Record the end of a reserved call: from now, and with its real tokens where known. Counting
        the call from its end keeps the window safe even if the provider saw it late."""
        limits = self.limits(reservation.key, reservation.model)
        if limits is None:
            return

        def finish(ledger: Ledger, at_ms: int) -> None:
            for i, (_, spent, call_id) in enumerate(ledger.calls):
                if call_id == reservation.call_id:
                    del ledger.calls[i]
                    ledger.calls.append((at_ms, spent if tokens is None else tokens, call_id))
                    return

        await self._change(reservation.key, reservation.model, limits, finish)

    async def _change(self, key: str, model: str | None, limits: Limits, change: Any) -> Denied | None:
        scope = self.scope(key, model)
        lock = self._locks.setdefault(scope, anyio.Lock())
        async with lock:  # this worker's lanes take turns; other workers are kept out by the revision
            for _ in range(20):
                try:
                    entry = await self._kv.get(scope)
                    revision: int | None = entry.revision
                    ledger = _ledger.decode(entry.value) if entry.value else Ledger()
                except nats.js.errors.KeyNotFoundError:
                    revision, ledger = None, Ledger()
                except msgspec.DecodeError as exc:
                    log.warning("budget ledger %s is unreadable (%s); starting it afresh", scope, exc)
                    revision, ledger = entry.revision, Ledger()
                at_ms = now_ms()
                ledger.prune(limits, at_ms)
                ledger.limits = limits
                self._seen[scope] = (ledger, limits)
                denied: Denied | None = change(ledger, at_ms)
                if denied is not None:
                    return denied
                try:
                    if revision is None:
                        await self._kv.create(scope, encoder.encode(ledger))
                    else:
                        await self._kv.update(scope, encoder.encode(ledger), last=revision)
                    return None
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # another worker wrote in between: read again
                except nats.errors.Error as exc:
                    if "wrong last sequence" in str(exc):
                        continue
                    raise
        raise nats.errors.Error(f"budget ledger {scope} changed under 20 tries in a row")


async def ledgers(kv: KeyValue, provider: str | None = None) -> Mapping[str, Ledger]:
    """Every ledger in the budgets bucket (of one provider), by scope: for stats and metrics."""
    found: dict[str, Ledger] = {}
    for scope, value in (await kv_entries(kv, f"{provider}.>" if provider else ">")).items():
        try:
            found[scope] = _ledger.decode(value)
        except msgspec.DecodeError:
            continue
    return found
