"""Issue 12, points 4 and 7: deep nesting and poison, over HTTP, through the client and on the bus.

A value nested about a thousand levels makes msgspec raise ``RecursionError`` wherever the caller's
stack happens to be deep enough. Found: a 10 KB ``moved`` event nested 5,000 deep crash-looped ``hive
up`` on the same data directory; a payload of 969 levels accepted over HTTP made ``GET /v1/tasks`` a
500 for everyone; through the client such a task made the worker raise and it was never acked nor
dead-lettered. Each decoder now refuses nesting past ``MAX_NESTING`` first, and every reader sets such a
message aside.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import nats.js.errors
import pytest

from hive_bus import Failed, FunctionProvider, Hive, Settings, Task, load_settings
from hive_bus._bus import ensure_events
from hive_bus._duplicates import duplicate_decoder
from hive_bus._messages import beat_decoder, event_decoder, new_task_id, request_decoder, task_decoder
from hive_bus._nesting import MAX_NESTING, NestedTooDeep
from hive_bus.bus import Bus, open_bus
from hive_bus.workers.echo import EchoProvider

from ..faults.dead_letters import assert_dead_lettered
from ..helpers import eventually, running_worker, unacked
from ..test_cli import Up, hive_up
from ..test_gateway import serving

pytestmark = pytest.mark.anyio


def nested(levels: int) -> Any:
    """A list ``levels`` deep, built without recursion."""
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


def deep_json(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def _task_fields(task_id: str, payload: bytes) -> bytes:
    head = {"type": "task.v1", "id": task_id, "provider": "echo", "prompt": "hola", "submitted_at_ms": 1}
    return json.dumps(head).encode()[:-1] + b', "payload": ' + payload + b"}"


def deep_moved_event(task_id: str, levels: int) -> bytes:
    """A ``moved`` event as a worker credential may publish it, its task's payload ``levels`` deep."""
    head = {
        "type": "moved.v1",
        "task_id": task_id,
        "provider": "echo",
        "at_ms": 1,
        "worker": "w",
        "reason": "x",
    }
    return json.dumps(head).encode()[:-1] + b', "task": ' + _task_fields(task_id, deep_json(levels)) + b"}"


def deep_queued_event(task_id: str, levels: int) -> bytes:
    head = {"type": "queued.v1", "task_id": task_id, "provider": "echo", "at_ms": 1}
    return json.dumps(head).encode()[:-1] + b', "task": ' + _task_fields(task_id, deep_json(levels)) + b"}"


# -- every decoder --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "decoder", "data"),
    [
        ("task", task_decoder, _task_fields(new_task_id(), deep_json(5000))),
        ("event", event_decoder, deep_moved_event(new_task_id(), 5000)),
        (
            "request",
            request_decoder,
            b'{"provider": "echo", "prompt": "x", "payload": ' + deep_json(5000) + b"}",
        ),
        ("beat", beat_decoder, b'{"type": "worker.v1", "x": ' + deep_json(5000) + b"}"),
        ("duplicate report", duplicate_decoder, b'{"x": ' + deep_json(5000) + b"}"),
        ("bare", task_decoder, deep_json(100_000)),
    ],
)
def test_every_decoder_refuses_deep_nesting_without_recursing(name: str, decoder: Any, data: bytes) -> None:
    with pytest.raises(NestedTooDeep) as caught:
        decoder.decode(data)
    assert isinstance(caught.value, msgspec.ValidationError), name  # each reader's handling applies
    assert f"nested deeper than {MAX_NESTING} levels" in str(caught.value)


def test_nesting_up_to_the_limit_decodes_and_brackets_in_strings_do_not_count() -> None:
    at_limit = json.dumps({"provider": "echo", "prompt": "[[[{{{" * 50, "payload": nested(MAX_NESTING)})
    assert request_decoder.decode(at_limit).payload == nested(MAX_NESTING)
    with pytest.raises(NestedTooDeep):
        request_decoder.decode(
            json.dumps({"provider": "echo", "prompt": "x", "payload": nested(MAX_NESTING + 1)})
        )


# -- over HTTP ------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [MAX_NESTING + 1, 969, 972, 5000])
async def test_a_payload_nested_too_deep_is_400_naming_the_field(settings: Settings, levels: int) -> None:
    async with serving(settings, max_body_bytes=64 * 1024) as stack:
        body = b'{"provider": "echo", "prompt": "hola", "payload": ' + deep_json(levels) + b"}"
        r = await stack.http.post("/v1/tasks", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["field"] == "payload"
        assert error["message"].startswith(f"payload: nested deeper than {MAX_NESTING} levels")
        ok = await stack.http.post(
            "/v1/tasks", json={"provider": "echo", "prompt": "x", "payload": nested(32)}
        )
        assert ok.status_code == 202, ok.text
        stored = (await stack.bus.js.stream_info(stack.bus.names.tasks_stream)).state.messages
        assert stored == 1  # the deep one was not queued


@pytest.mark.parametrize(
    ("path", "head", "field"),
    [
        (
            "/v1/schedules",
            b'{"every": "1h", "task": {"provider": "echo", "prompt": "x", "payload": ',
            "task.payload",
        ),
        ("/v1/tasks/cancel", b'{"provider": "echo", "metadata": {"a": ', "metadata"),
    ],
)
async def test_other_json_routes_refuse_deep_nesting_naming_the_field(
    settings: Settings, path: str, head: bytes, field: str
) -> None:
    """Once a 500 with a RecursionError in the log: the route's decoder recursed first."""
    async with serving(settings, max_body_bytes=64 * 1024) as stack:
        body = head + deep_json(5000) + b"}}"
        r = await stack.http.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["field"] == field
        assert error["message"].startswith(f"{field}: nested deeper than {MAX_NESTING} levels"), error


async def test_a_batch_names_the_task_whose_metadata_is_too_deep(settings: Settings) -> None:
    async with serving(settings, max_body_bytes=64 * 1024) as stack:
        tasks = [json.dumps({"provider": "echo", "prompt": f"p{i}"}).encode() for i in range(3)]
        tasks.append(b'{"provider": "echo", "prompt": "p3", "metadata": {"a": ' + deep_json(972) + b"}}")
        body = b'{"tasks": [' + b", ".join(tasks) + b"]}"
        r = await stack.http.post(
            "/v1/tasks/batch", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["field"] == "tasks[3].metadata"
        assert (await stack.bus.js.stream_info(stack.bus.names.tasks_stream)).state.messages == 0


async def test_deep_events_on_the_bus_leave_task_answers_serving(settings: Settings) -> None:
    """Poison written straight on the events stream (a worker credential may): ``GET /v1/tasks`` and
    ``GET /v1/tasks/{id}`` go on answering, each reading past it."""
    async with serving(settings) as stack, running_worker(stack.bus, "echo", EchoProvider()):
        names = stack.bus.names
        r = await stack.http.post("/v1/tasks", json={"provider": "echo", "prompt": "antes"})
        good = r.json()["id"]
        assert (await stack.http.get(f"/v1/tasks/{good}", params={"wait": 10})).json()[
            "status"
        ] == "completed"
        poisoned = new_task_id()
        for task_id in (poisoned, good):  # a task of its own, and the last event of a real one
            await stack.bus.js.publish(
                names.event_subject("echo", task_id, "queued"), deep_queued_event(task_id, 5000),
                stream=names.events_stream_of("echo"),
            )  # fmt: skip
        listed = await stack.http.get("/v1/tasks")
        assert listed.status_code == 200, listed.text
        assert good in [t["id"] for t in listed.json()]
        one = await stack.http.get(f"/v1/tasks/{good}")
        assert one.status_code == 200, one.text
        assert one.json()["status"] == "completed"  # its last readable event
        assert (await stack.http.get(f"/v1/tasks/{poisoned}")).status_code == 404
        assert (await stack.http.get(f"/v1/tasks/{good}/events")).status_code == 200


# -- the Python client and the worker --------------------------------------------------------------


async def test_the_client_refuses_a_payload_nested_too_deep(hive: Hive, bus: Bus) -> None:
    with pytest.raises(NestedTooDeep) as caught:
        await hive.submit("echo", "hola", payload=nested(969))
    assert caught.value.field == "payload"
    with pytest.raises(NestedTooDeep):
        await hive.submit("echo", "hola", metadata={"deep": nested(5000)})
    assert (await bus.js.stream_info(bus.names.tasks_stream)).state.messages == 0


async def test_the_worker_dead_letters_a_deep_task_and_goes_on(bus: Bus, hive: Hive) -> None:
    names = bus.names
    recorded_as: list[str] = []
    async with running_worker(bus, "echo", EchoProvider()):
        for levels in (969, 5000):
            data = _task_fields(new_task_id(), deep_json(levels))
            ack = await bus.js.publish(
                names.task_subject("echo", "normal", "poison"), data, stream=names.tasks_stream
            )
            recorded_as.append(f"undecodable-{ack.seq}")  # its id is not read from so deep a message
        after = await hive.submit("echo", "después")
        assert (await hive.wait(after, 15)).status == "completed"
        for task_id in recorded_as:

            async def failed(task_id: str = task_id) -> Failed | None:
                try:
                    raw = await bus.js.get_last_msg(
                        names.events_stream_of("echo"),
                        names.event_subject("echo", task_id, "failed"),
                        direct=True,
                    )
                except nats.js.errors.NotFoundError:
                    return None
                event = event_decoder.decode(raw.data or b"")
                return event if isinstance(event, Failed) else None

            event = await eventually(failed, 10, f"deep task {task_id} to be failed")
            assert event.reason == "undecodable"
            assert f"nested deeper than {MAX_NESTING} levels" in event.error
            await assert_dead_lettered(bus, "echo", task_id, "undecodable")
    assert await unacked(bus) == 0  # none left to come back


async def test_an_output_nested_too_deep_fails_the_task_with_the_reason(bus: Bus, hive: Hive) -> None:
    async def deep_output(task: Task) -> Any:
        return nested(5000)

    async with running_worker(bus, "deep", FunctionProvider(deep_output)):
        task_id = await hive.submit("deep", "hola")
        view = await hive.wait(task_id, 15)
    assert view.status == "failed"
    assert view.reason == "permanent"
    assert f"nested deeper than {MAX_NESTING} levels" in (view.error or "")


# -- the hub: hive up on the same data, twice ---------------------------------------------------


@contextmanager
def stack_on(data: Path, log: Path) -> Iterator[Up]:
    up = hive_up(data, log)
    try:
        yield up
    finally:
        if up.proc.poll() is None:
            up.proc.send_signal(signal.SIGINT)
            try:
                up.proc.wait(20)
            except subprocess.TimeoutExpired:
                up.proc.kill()
                up.proc.wait()


async def _poison_the_hub(nats_url: str) -> None:
    settings = load_settings(environ={}, nats_url=nats_url)  # hive up's own bus
    async with open_bus(settings) as bus:
        names = bus.names
        moved = deep_moved_event(new_task_id(), 5000)
        assert 10_000 <= len(moved) <= 11_000  # the 10 KB event of the report
        await ensure_events(bus, "echo")
        await bus.js.publish(
            names.event_subject("echo", new_task_id(), "moved"), moved, stream=names.events_stream_of("echo")
        )
        deep_task = _task_fields(new_task_id(), deep_json(5000))
        await bus.js.publish(
            names.task_subject("echo", "normal", "poison"), deep_task, stream=names.tasks_stream
        )


async def _serves(up: Up) -> None:
    async with httpx.AsyncClient(base_url=up.gateway, timeout=15) as http:
        r = await http.post("/v1/tasks", json={"provider": "echo", "prompt": "¿sigue vivo?"})
        assert r.status_code == 202, r.text
        done = (await http.get(f"/v1/tasks/{r.json()['id']}", params={"wait": 10})).json()
        assert done["status"] == "completed", done
        assert (await http.get("/v1/tasks")).status_code == 200


@pytest.mark.slow
async def test_a_deep_moved_event_does_not_crash_loop_hive_up(tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "up.log"
    with stack_on(data, log) as up:
        await _poison_the_hub(up.nats)
        await anyio.sleep(4)  # the router, the audit and the worker have each read the poison by now
        assert up.proc.poll() is None, log.read_text()[-3000:]
        await _serves(up)
    # the same --data again: the poison (if anything kept it) must not end it either
    with stack_on(data, tmp_path / "again.log") as again:
        await anyio.sleep(4)
        assert again.proc.poll() is None, (tmp_path / "again.log").read_text()[-3000:]
        await _serves(again)
    text = log.read_text()
    assert "RecursionError" not in text
    assert "terminated" in text  # the router and the worker each said what they set aside
