"""Which key may call now (``hive_bus._keys.KeyRing``): its rules on their own, with injected clocks and
no server, then the one case where the worker's fetch gate (``blocked_now``) and its per-task choice
(``pick``) used to disagree, on a real worker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import pytest

from hive_bus import Hive, ProviderKey
from hive_bus._budget import Denied, Reservation
from hive_bus._cooldown import CooldownRecord
from hive_bus._errors import Quota
from hive_bus._keys import NO_QUOTA_RECHECK_S, PROBE_HOLD_S, PROBE_WAIT_S, Blocked, KeyRing
from hive_bus._messages import Retrying, Running, now_ms
from hive_bus.bus import Bus
from hive_bus.workers.gemini import GeminiProvider

from .fakes import ProviderFakes
from .helpers import events_of, eventually, running_worker

pytestmark = pytest.mark.anyio
T0_MS = 1_800_000_000_000


@dataclass
class Clock:
    """Both clocks the ring reads, moved by hand."""

    s: float = 1000.0
    ms: int = T0_MS

    def advance(self, seconds: float) -> None:
        self.s += seconds
        self.ms += int(seconds * 1000)


@dataclass
class Book:
    """A budget book with set answers: ``denied`` per key for reservations, ``known_s`` per key for the
    wait this worker last saw. Records what was reserved."""

    denied: dict[str, Denied] = field(default_factory=dict)
    known_s: dict[str, float] = field(default_factory=dict)
    reserved: list[tuple[str, str | None, int]] = field(default_factory=list)

    def known_wait_s(self, key: str, model: str | None) -> float:
        return self.known_s.get(key, 0.0)

    async def reserve(self, key: str, model: str | None, tokens: int) -> Reservation | Denied | None:
        if key in self.denied:
            return self.denied[key]
        self.reserved.append((key, model, tokens))
        return Reservation(key, model, len(self.reserved), tokens)


def ring_of(
    keys: list[str], clock: Clock, records: dict[str, CooldownRecord] | None = None, book: Book | None = None
) -> KeyRing:
    return KeyRing(
        "groq", keys, records if records is not None else {}, book or Book(),
        monotonic=lambda: clock.s, wall_ms=lambda: clock.ms,
    )  # fmt: skip


def cooling(key: str, clock: Clock, seconds: float, quota: Quota = "minute") -> CooldownRecord:
    return CooldownRecord(
        provider="groq", key=key, until_ms=clock.ms + int(seconds * 1000), reason="429 from groq", quota=quota
    )


def refused(key: str) -> CooldownRecord:
    return CooldownRecord(provider="groq", key=key, until_ms=0, reason="401 invalid api key", refused=True)


async def proven_pick(ring: KeyRing, model: str | None = "m") -> str:
    """Pick a key and let its call answer well, so that it has proved itself."""
    got = await ring.pick(model, 10)
    assert isinstance(got, tuple), got
    ring.answered(got[0], rate_limited=False)
    ring.released(got[0])
    return got[0]


async def test_keys_are_taken_in_turn() -> None:
    clock = Clock()
    ring = ring_of(["a", "b", "c"], clock)
    assert [await proven_pick(ring) for _ in range(4)] == ["a", "b", "c", "a"]


async def test_a_cooling_key_waits_until_its_cooldown_ends_on_the_wall_clock() -> None:
    clock = Clock()
    records = {"a": cooling("a", clock, 30)}
    ring = ring_of(["a"], clock, records)
    got = await ring.pick("m", 10)
    assert isinstance(got, Blocked)
    assert (got.wait_s, got.reason, got.quota) == (30.0, "rate_limit", "minute")
    assert "429 from groq" in got.why
    assert ring.blocked_now("m") == got
    clock.advance(29.5)
    assert ring.blocked_now("m") == Blocked(0.5, got.why, "minute", "rate_limit")
    clock.advance(0.5)
    assert ring.blocked_now("m") is None
    assert isinstance(await ring.pick("m", 10), tuple)


async def test_a_refused_key_is_set_aside_not_waited_for() -> None:
    clock = Clock()
    records = {"a": refused("a")}
    ring = ring_of(["a", "b"], clock, records)
    assert ring.check("a", "m") == "401 invalid api key"
    assert [await proven_pick(ring) for _ in range(3)] == ["b", "b", "b"]
    # b cooling: the wait is b's, not the refused key's infinity
    records["b"] = cooling("b", clock, 12)
    got = await ring.pick("m", 10)
    assert isinstance(got, Blocked) and got.wait_s == 12.0
    assert ring.blocked_now("m") == got


async def test_every_key_refused_lets_the_gate_fetch_and_pick_answer_none() -> None:
    clock = Clock()
    ring = ring_of(["a", "b"], clock, {"a": refused("a"), "b": refused("b")})
    assert await ring.pick("m", 10) is None
    assert ring.blocked_now("m") is None  # fetch, so the tasks fail with the provider's word
    assert ring.set_aside_reasons("m") == ["401 invalid api key"]


async def test_no_quota_for_one_model_sets_the_key_aside_for_that_model_only_until_the_recheck() -> None:
    clock = Clock()
    ring = ring_of(["a"], clock)
    ring.set_aside("a", "big", "limit 0 for big on the free tier")
    assert ring.check("a", "big") == "limit 0 for big on the free tier"
    assert await ring.pick("big", 10) is None
    assert ring.set_aside_reasons("big") == ["limit 0 for big on the free tier"]
    assert ring.check("a", "small") is None
    assert isinstance(await ring.pick("small", 10), tuple)
    clock.advance(NO_QUOTA_RECHECK_S - 1)
    assert ring.no_quota_for("a", "big") is not None
    clock.advance(1)
    assert ring.no_quota_for("a", "big") is None
    assert ring.set_aside_reasons("big") == []


async def test_the_gate_and_the_choice_agree_on_a_key_without_quota() -> None:
    """Key a has no quota for the worker's model and b cools down for 30 s: no key can serve that model
    for 30 s. The fetch gate used to count a as usable and fetch tasks only to hand them back."""
    clock = Clock()
    ring = ring_of(["a", "b"], clock, {"b": cooling("b", clock, 30)})
    ring.set_aside("a", "m", "no quota for m")
    picked = await ring.pick("m", 10)
    assert isinstance(picked, Blocked) and picked.wait_s == 30.0
    assert ring.blocked_now("m") == picked
    # a model a has quota for is served by a at once, and the gate says so
    assert ring.blocked_now("other") is None


async def test_a_probe_holds_other_calls_on_its_key_for_at_most_a_second() -> None:
    clock = Clock()
    ring = ring_of(["a"], clock)
    first = await ring.pick("m", 10)
    assert isinstance(first, tuple)
    second = await ring.pick("m", 10)
    assert isinstance(second, Blocked)
    assert (second.wait_s, second.reason) == (PROBE_WAIT_S, "rate_limit")
    assert "first call on key a" in second.why
    assert ring.blocked_now("m") is None  # the gate fetches on: the lane waits for the probe
    clock.advance(PROBE_HOLD_S - 0.02)
    third = await ring.pick("m", 10)
    assert isinstance(third, Blocked) and third.wait_s == pytest.approx(0.02)
    clock.advance(0.02)
    assert isinstance(await ring.pick("m", 10), tuple)  # a call still running after 1 s is a real one


async def test_a_probe_ends_when_its_call_answers_and_a_429_starts_another() -> None:
    clock = Clock()
    ring = ring_of(["a"], clock)
    assert isinstance(await ring.pick("m", 10), tuple)
    ring.answered("a", rate_limited=False)
    assert isinstance(await ring.pick("m", 10), tuple)  # proven: no hold
    assert isinstance(await ring.pick("m", 10), tuple)
    ring.answered("a", rate_limited=True)  # a 429: the next call goes alone again
    assert ring.probe_left_s("a") == 0  # it was not probing; the cooldown holds it now
    assert isinstance(await ring.pick("m", 10), tuple)
    assert isinstance(await ring.pick("m", 10), Blocked)
    ring.released("a")  # a cancelled or settled call ends its probe
    assert isinstance(await ring.pick("m", 10), tuple)


async def test_all_keys_blocked_gives_the_earliest_any_becomes_usable() -> None:
    clock = Clock()
    records = {"a": cooling("a", clock, 40), "b": cooling("b", clock, 8), "c": cooling("c", clock, 90, "day")}
    book = Book(denied={"d": Denied(20, "rpm")}, known_s={"d": 20})
    ring = ring_of(["a", "b", "c", "d"], clock, records, book)
    got = await ring.pick("m", 10)
    assert isinstance(got, Blocked) and got.wait_s == 8.0
    gate = ring.blocked_now("m")
    assert gate is not None and gate.wait_s == 8.0
    clock.advance(8)
    assert ring.blocked_now("m") is None
    assert await proven_pick(ring) == "b"


async def test_a_spent_budget_blocks_with_its_window_and_a_daily_one_says_so() -> None:
    clock = Clock()
    book = Book(denied={"a": Denied(5, "rpm"), "b": Denied(3600, "rpd")}, known_s={"a": 5, "b": 3600})
    ring = ring_of(["a", "b"], clock, book=book)
    got = await ring.pick("m", 10)
    assert got == Blocked(5, "groq budget spent (rpm of key a)", "minute", "budget")
    assert ring.blocked_now("m") == Blocked(5, "groq budget spent", "minute", "budget")
    del book.denied["a"]
    assert await ring.pick("m", 42) == ("a", Reservation("a", "m", 1, 42))
    ring.answered("a", rate_limited=False)
    book.denied["a"] = Denied(7200, "rpd")
    daily = await ring.pick("m", 10)
    assert isinstance(daily, Blocked) and (daily.wait_s, daily.quota) == (3600, "day")


async def test_the_gate_waits_for_the_longer_of_a_cooldown_and_a_spent_budget() -> None:
    clock = Clock()
    book = Book(known_s={"a": 50})
    ring = ring_of(["a"], clock, {"a": cooling("a", clock, 10)}, book)
    assert ring.blocked_now("m") == Blocked(50, "groq budget spent", "minute", "budget")
    book.known_s["a"] = 5
    gate = ring.blocked_now("m")
    assert gate is not None and (gate.wait_s, gate.reason) == (10.0, "rate_limit")


async def test_a_ring_needs_a_key() -> None:
    with pytest.raises(ValueError, match="at least one provider key"):
        ring_of([], Clock())


# a worker's fetch gate, end to end -------------------------------------------------------------------


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes() as f:
        yield f


async def test_a_worker_does_not_fetch_while_its_only_key_with_quota_cools_down(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    """Key free has no quota for the worker's model and key paid cools down for a minute: the worker
    says it waits out the cooldown and leaves new tasks queued, instead of fetching each one only to
    hand it back (the gate used to count the free key as usable)."""
    model = "gemini-2.5-pro"
    free, paid = "AIza_free_key_0123456789", "AIza_paid_key_0123456789"
    fakes.gemini.no_quota(free, model)
    keys = [
        ProviderKey(name, GeminiProvider(api_key=key, model=model, base_url=fakes.gemini_base_url))
        for name, key in (("free", free), ("paid", paid))
    ]
    async with running_worker(bus, "gemini", keys, concurrency=2) as worker:
        first = await hive.wait(await hive.submit("gemini", "learn the keys", max_attempts=1), 15)
        assert (first.status, fakes.gemini.rate_limited_by_key) == ("completed", {free: 1})
        until_ms = now_ms() + 60_000
        await worker.cooldowns.impose("paid", until_ms, "429 from gemini", "minute", "test")

        async def cooling_down() -> bool:
            return worker.beat().waiting == "cooldown"

        await eventually(cooling_down, 5, "the worker to say it waits out the cooldown")
        assert worker.beat().waiting_until_ms >= until_ms - 2000
        later = await hive.submit("gemini", "wait for the paid key")
        await anyio.sleep(2 * 0.5 + 1)  # two fetch waits and more
        events = await events_of(bus, later)
        assert not [e for e in events if isinstance(e, Retrying | Running)], events
        assert fakes.gemini.requests_by_key.get(paid) == 1
