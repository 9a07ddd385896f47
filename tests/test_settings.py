"""Settings and wire messages: clear errors for bad values, and old and new versions keep talking."""

from __future__ import annotations

import msgspec
import pytest

from hive_bus import Settings, SettingsError, Task, TaskView, load_settings
from hive_bus._messages import Completed, encoder, event_decoder, task_decoder
from hive_bus._settings import redact_url


def test_environment_then_flags() -> None:
    settings = load_settings(
        {"HIVE_NATS_URL": "nats://pi.local:4222", "HIVE_ACK_WAIT_S": "90"}, prefix="shop"
    )
    assert settings == Settings(nats_url="nats://pi.local:4222", ack_wait_s=90.0, prefix="shop")


def test_unknown_variable_is_named() -> None:
    with pytest.raises(SettingsError, match=r"unknown setting\(s\) HIVE_NAT_URL"):
        load_settings({"HIVE_NAT_URL": "nats://x"})


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"HIVE_ACK_WAIT_S": "soon"}, "HIVE_ACK_WAIT_S"),
        ({"HIVE_ACK_WAIT_S": "-1"}, "HIVE_ACK_WAIT_S"),
        ({"HIVE_MAX_ACK_PENDING": "1.5"}, "HIVE_MAX_ACK_PENDING"),
        ({"HIVE_PREFIX": "Bad.Prefix"}, "prefix"),
        ({"HIVE_HEARTBEAT_TTL_S": "6"}, "heartbeat_ttl_s"),
        ({"HIVE_AUDIT_GRACE_S": "8", "HIVE_REQUEST_TIMEOUT_S": "5"}, "audit_grace_s"),
        ({"HIVE_AUDIT_EVERY_S": "0"}, "HIVE_AUDIT_EVERY_S"),
        ({"HIVE_ACK_WAIT_S": "inf"}, "HIVE_ACK_WAIT_S"),
        ({"HIVE_ACK_WAIT_S": "nan"}, "HIVE_ACK_WAIT_S"),
        ({"HIVE_EVENTS_MAX_AGE_S": "1e300"}, "HIVE_EVENTS_MAX_AGE_S"),
        ({"HIVE_TASKS_MAX_BYTES": "99999999999999999999"}, "HIVE_TASKS_MAX_BYTES"),
        ({"HIVE_TASKS_MAX_MSGS": str(2**63)}, "HIVE_TASKS_MAX_MSGS"),
        ({"HIVE_NATS_URL": ""}, "HIVE_NATS_URL"),
        ({"HIVE_NATS_URL": " "}, "HIVE_NATS_URL"),
        ({"HIVE_NATS_URL": ","}, "HIVE_NATS_URL"),
        ({"HIVE_NATS_URL": "nats://"}, "HIVE_NATS_URL"),
        ({"HIVE_NATS_URL": "nats://:0"}, "HIVE_NATS_URL"),
        ({"HIVE_NATS_URL": "nats://127.0.0.1:0"}, "HIVE_NATS_URL"),
        ({"HIVE_NATS_URL": "nats://127.0.0.1:99999"}, "HIVE_NATS_URL"),
        ({"HIVE_NATS_URL": "http://127.0.0.1:4222"}, "HIVE_NATS_URL"),
        ({"HIVE_NATS_URL": "nats://a:4222,ws://b:8080"}, "HIVE_NATS_URL"),
    ],
)
def test_bad_values_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises((SettingsError, ValueError), match=named):
        load_settings(env)


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"HIVE_HEARTBEAT_TTL_S": "10s"}, "HIVE_HEARTBEAT_TTL_S (heartbeat_ttl_s): '10s' is not a number"),
        (
            {"HIVE_MAX_ACK_PENDING": "1.5"},
            "HIVE_MAX_ACK_PENDING (max_ack_pending): '1.5' is not a whole number",
        ),
        (
            {"HIVE_REJECT_UNSERVED": "yes"},
            "HIVE_REJECT_UNSERVED (reject_unserved): 'yes' is not true or false (give 1, true, 0 or false)",
        ),
    ],
)
def test_a_value_of_the_wrong_kind_is_said_in_words(env: dict[str, str], said: str) -> None:
    """Every variable is text, so msgspec's 'Expected `float`, got `str`' said nothing of what was wrong
    with HIVE_HEARTBEAT_TTL_S=10s, nor which values HIVE_REJECT_UNSERVED takes."""
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    assert str(caught.value) == f"invalid setting {said}"


def test_a_bad_prefix_names_the_variable_and_the_flag() -> None:
    """It said 'bus prefix 'Shop' is not valid: ...', naming neither HIVE_PREFIX nor --prefix."""
    with pytest.raises(SettingsError) as caught:
        load_settings({"HIVE_PREFIX": "Shop"})
    assert str(caught.value) == (
        "invalid setting: HIVE_PREFIX (--prefix): bus prefix 'Shop' is not valid: use 1-32 lower-case "
        "letters, digits or '_', starting with a letter"
    )


@pytest.mark.parametrize(
    "url",
    [
        "localhost",
        "localhost:4222",
        "nats://pi.local",
        "tls://a:4222, tls://b:4222,",
        "wss://pi.local/nats",
        "nats://[::1]:4222",
    ],
)
def test_the_nats_urls_that_nats_py_takes_are_taken(url: str) -> None:
    assert load_settings({"HIVE_NATS_URL": url}).nats_url == url


def test_a_bad_nats_url_is_named_without_its_password() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({}, nats_url="nats://alice:s3cr3t@127.0.0.1:99999")
    assert "s3cr3t" not in str(caught.value)
    assert "HIVE_NATS_URL (--nats) 'nats://***@127.0.0.1:99999': the port must be" in str(caught.value)


def test_durations_and_sizes_up_to_their_bounds_are_taken() -> None:
    settings = load_settings(
        {"HIVE_EVENTS_MAX_AGE_S": str(10 * 365 * 86400), "HIVE_TASKS_MAX_BYTES": str(2**63 - 1)}
    )
    assert settings.tasks_max_bytes == 2**63 - 1


def test_secrets_are_redacted_from_urls() -> None:
    assert redact_url("nats://alice:pw@pi.local:4222") == "nats://***@pi.local:4222"
    assert redact_url("tls://token@pi.local") == "tls://***@pi.local"
    assert redact_url("nats://pi.local:4222") == "nats://pi.local:4222"
    assert redact_url("alice:pw@pi.local:4222") == "***@pi.local:4222"
    assert redact_url("nats://alice:pw@pi.local:99999") == "nats://***@pi.local:99999"


def test_a_newer_task_with_unknown_fields_still_decodes() -> None:
    newer = {
        "type": "task.v1", "id": "01JAAAAAAAAAAAAAAAAAAAAAAA", "provider": "echo", "prompt": "hi",
        "submitted_at_ms": 1, "priority": "high", "fallback": ["groq"],
    }  # fmt: skip
    task = task_decoder.decode(msgspec.json.encode(newer))
    assert (task.prompt, task.max_attempts) == ("hi", 5)


def test_an_older_completed_event_without_new_fields_still_decodes() -> None:
    older = {"type": "completed.v1", "task_id": "x", "provider": "echo", "at_ms": 1, "attempt": 1, "worker": "w",
             "output": "hi"}  # fmt: skip
    event = event_decoder.decode(msgspec.json.encode(older))
    assert isinstance(event, Completed)
    assert TaskView.of(event).status == "completed"


def test_task_round_trip() -> None:
    task = Task(id="01JAAAAAAAAAAAAAAAAAAAAAAA", provider="echo", prompt="¿Qué tal?", submitted_at_ms=5,
                payload=["check_balance"], metadata={"campaign": "otoño"})  # fmt: skip
    assert task_decoder.decode(encoder.encode(task)) == task
