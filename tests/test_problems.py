"""The problem strip's list (GET /v1/problems), from the metrics' last read of the bus: each kind of
trouble named, in words a person acts on, linked to the part of the page that says more."""

from __future__ import annotations

from hive_bus.services.metrics import Snapshot
from hive_bus.services.problems import problems_of, webhook_trouble
from hive_bus.services.webhooks.records import DeliveryRecord, DeliveryStatus

NOW_S = 1_800_000_000.0


def test_each_kind_of_trouble_is_named_and_linked() -> None:
    snap = Snapshot(
        pending={"gemini": 4, "groq": 2, "echo": 0},
        ack_pending={"gemini": 1, "groq": 0, "echo": 0},
        workers={"gemini": 0, "groq": 2, "echo": 1},
        cooldown_s={"groq": 42.0, "gemini": 0.0, "echo": 0.0},
        key_refused={("groq", "personal"): 1.0, ("groq", "team"): 0.0},
        lost={"HIVE_TASKS": 3, "HIVE_EVENTS": 0},
        dead_letters=7,
        at_s=NOW_S - 1,
    )
    found = {(p.kind, p.provider): p for p in problems_of(snap, now_s=NOW_S, refresh_s=5)}
    assert set(found) == {
        ("no_worker", "gemini"),
        ("key_refused", "groq"),
        ("cooling_down", "groq"),
        ("dead_letters", None),
        ("stream_lost", None),
    }
    stuck = found["no_worker", "gemini"]
    assert (stuck.count, stuck.link) == (5, "#provider-gemini")
    assert stuck.message == "5 task(s) wait for gemini and no gemini worker is online."
    assert (
        "'personal'" in found["key_refused", "groq"].message
        and "team" not in found["key_refused", "groq"].message
    )
    assert found["cooling_down", "groq"].until_ms == int((NOW_S - 1 + 42) * 1000)
    assert (found["dead_letters", None].count, found["dead_letters", None].link) == (7, "#dlq")
    assert "HIVE_TASKS" in found["stream_lost", None].message


def test_a_read_of_the_bus_that_is_old_comes_first() -> None:
    fresh = Snapshot(pending={"echo": 0}, workers={"echo": 1}, at_s=NOW_S - 10)
    assert problems_of(fresh, now_s=NOW_S, refresh_s=5) == []
    old = Snapshot(pending={"echo": 3}, workers={"echo": 0}, at_s=NOW_S - 60)
    kinds = [p.kind for p in problems_of(old, now_s=NOW_S, refresh_s=5)]
    assert kinds == ["stale", "no_worker"]
    assert "60 s ago" in problems_of(old, now_s=NOW_S, refresh_s=5)[0].message
    never = problems_of(Snapshot(), now_s=NOW_S, refresh_s=5, since_s=NOW_S - 30)
    assert [p.kind for p in never] == ["stale"] and "has not read the bus yet" in never[0].message
    assert problems_of(Snapshot(), now_s=NOW_S, refresh_s=5, since_s=NOW_S - 2) == []  # its first read


def test_webhooks_failing_are_named_from_the_delivery_records() -> None:
    now_ms = int(NOW_S * 1000)

    def record(status: DeliveryStatus, age_ms: int, error: str | None = None) -> DeliveryRecord:
        return DeliveryRecord(
            id=f"msg_{status}_{age_ms}", url="https://example.com/hook", event="task.completed",
            task_id="01JB0000000000000000000000", status=status, created_at_ms=now_ms - age_ms,
            updated_at_ms=now_ms - age_ms, last_error=error,
        )  # fmt: skip

    found = [  # newest first, as the records are read
        record("retrying", 1_000, "answered 503"),
        record("delivered", 2_000),
        record("failed", 3_000, "timed out"),
        record("failed", 2 * 24 * 3600 * 1000, "answered 404"),  # given up two days ago: no longer news
    ]
    trouble = webhook_trouble(found, now_ms=now_ms)
    assert (trouble.retrying, trouble.failed, trouble.last_error) == (1, 1, "answered 503")
    [problem] = problems_of(Snapshot(at_s=NOW_S), now_s=NOW_S, refresh_s=5, webhooks=trouble)
    assert problem.kind == "webhooks_failing" and problem.count == 2
    assert problem.message == (
        "Webhook deliveries are failing: 1 retrying, 1 given up in the last day (last: answered 503)."
    )
    assert problem.link == "#webhooks"  # the dashboard's list, read with its token
    delivered = webhook_trouble([record("delivered", 1_000)], now_ms=now_ms)
    assert problems_of(Snapshot(at_s=NOW_S), now_s=NOW_S, refresh_s=5, webhooks=delivered) == []
    # a delivery the gateway would not make (its address is not allowed) is not sent: a problem too,
    # as the alert HiveWebhooksUndelivered has it, where the strip said nothing
    refusal = "host 10.1.2.3 is a private address; webhooks go to public addresses only"
    refused = webhook_trouble(
        [record("refused", 1_000, refusal), record("refused", 2 * 24 * 3600 * 1000, "old")], now_ms=now_ms
    )
    [problem] = problems_of(Snapshot(at_s=NOW_S), now_s=NOW_S, refresh_s=5, webhooks=refused)
    assert problem.kind == "webhooks_failing" and problem.count == 1
    assert problem.message == f"Webhook deliveries are failing: 1 refused in the last day (last: {refusal})."
