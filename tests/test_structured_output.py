"""Issue 14, point 5: structured output. A task's ``response_format`` (``json_object`` or ``json_schema``)
is asked of each provider in its own JSON mode (checked by the provider fakes, which record what they
got); the worker checks the output with jsonschema: an invalid one is a failed attempt (reason
``invalid_output``) tried again within ``max_attempts``, and the final failure names the first error; a
completed task's output is the parsed JSON value. A schema that is not JSON Schema is refused at
submission."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from hive_bus import (
    FailNow,
    FunctionProvider,
    Hive,
    InvalidOutput,
    JsonSchemaFormat,
    JsonSchemaSpec,
    Retrying,
    Settings,
    Task,
    TaskView,
)
from hive_bus._output import structured
from hive_bus.bus import Bus
from hive_bus.workers import EchoProvider

from .fakes import ProviderFakes
from .helpers import events_of, running_worker
from .test_metrics import following, samples, value
from .test_providers import make
from .test_submit_parity import answer, encoded, two_paths

pytestmark = pytest.mark.anyio

POST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "hashtags": {"type": "array", "items": {"type": "string"}}},
    "required": ["text", "hashtags"],
    "additionalProperties": False,
}
POST_FORMAT = {"type": "json_schema", "json_schema": {"name": "post", "schema": POST_SCHEMA, "strict": True}}
GOOD_POST = {"text": "Café de especialidad", "hashtags": ["#cafe", "#barista"]}


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes() as f:
        yield f


async def _run(bus: Bus, hive: Hive, name: str, fakes: ProviderFakes, **fields: Any) -> TaskView:
    task_id = await hive.submit(name, **fields)
    async with running_worker(bus, name, make(name, fakes), backoff_base_s=0.05):
        return await hive.wait(task_id, 20)


# each provider, asked in its own JSON mode ---------------------------------------------------------


async def test_gemini_is_asked_for_json_with_the_schema(bus: Bus, hive: Hive, fakes: ProviderFakes) -> None:
    fakes.gemini.reply_with(json.dumps(GOOD_POST))
    view = await _run(bus, hive, "gemini", fakes, prompt="un tuit", response_format=POST_FORMAT)
    assert (view.status, view.output) == ("completed", GOOD_POST)
    config = fakes.gemini.bodies_seen[0]["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"] == POST_SCHEMA


@pytest.mark.parametrize("name", ["groq", "openai"])
async def test_openai_style_apis_get_response_format_as_it_is(
    bus: Bus, hive: Hive, fakes: ProviderFakes, name: str
) -> None:
    getattr(fakes, name).reply_with(json.dumps(GOOD_POST))
    view = await _run(bus, hive, name, fakes, prompt="un tuit", response_format=POST_FORMAT)
    assert (view.status, view.output) == ("completed", GOOD_POST)
    assert getattr(fakes, name).bodies_seen[0]["response_format"] == POST_FORMAT


async def test_json_object_mode_says_json_where_openai_and_groq_insist(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    """Both APIs refuse json_object unless a message says "json": the adapter says it when the task
    does not (the fake answers 400 otherwise, as the real APIs do)."""
    view = await _run(bus, hive, "groq", fakes, prompt="un tuit", response_format={"type": "json_object"})
    assert (view.status, view.output) == ("completed", {"reply": "reply: un tuit"})
    sent = fakes.groq.bodies_seen[0]
    assert sent["response_format"] == {"type": "json_object"}
    assert "json" in sent["messages"][0]["content"].lower()


async def test_anthropic_is_forced_to_a_tool_whose_input_is_the_output(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    fakes.anthropic.reply_with(json.dumps(GOOD_POST))
    view = await _run(bus, hive, "anthropic", fakes, prompt="un tuit", response_format=POST_FORMAT)
    assert (view.status, view.output) == ("completed", GOOD_POST)
    # the forced tool's tool_use ends the answer as OpenAI's response_format does (not "tool_calls": the
    # chat completion then had a finish reason of tool calls and no tool_calls)
    assert view.finish_reason == "stop"
    body = fakes.anthropic.bodies_seen[0]
    assert body["tools"][0]["name"] == "post"
    assert body["tools"][0]["input_schema"] == POST_SCHEMA
    assert body["tool_choice"] == {"type": "tool", "name": "post"}


async def test_anthropic_carries_a_schema_that_is_not_an_object_inside_one(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    tags = {"type": "array", "items": {"type": "string"}, "minItems": 2}
    fakes.anthropic.reply_with(json.dumps({"value": ["#a", "#b"]}))
    fmt = {"type": "json_schema", "json_schema": {"name": "tags", "schema": tags}}
    view = await _run(bus, hive, "anthropic", fakes, prompt="hashtags", response_format=fmt)
    assert (view.status, view.output) == ("completed", ["#a", "#b"])
    schema = fakes.anthropic.bodies_seen[0]["tools"][0]["input_schema"]
    assert schema == {"type": "object", "properties": {"value": tags}, "required": ["value"]}


# invalid outputs: retried, then failed naming the error ---------------------------------------------


async def test_an_invalid_output_is_retried_and_the_valid_one_completes(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    fakes.groq.reply_with(json.dumps({"text": "sin hashtags"}), json.dumps(GOOD_POST))
    view = await _run(bus, hive, "groq", fakes, prompt="un tuit", response_format=POST_FORMAT)
    assert (view.status, view.output, view.attempt) == ("completed", GOOD_POST, 2)
    (retrying,) = [e for e in await events_of(bus, view.id) if isinstance(e, Retrying)]
    assert retrying.reason == "invalid_output"
    assert "'hashtags' is a required property" in retrying.error


async def test_out_of_attempts_the_failure_names_the_first_validation_error(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    bad = json.dumps({"text": "x", "hashtags": ["#ok", 7]})
    fakes.gemini.reply_with(bad, bad, bad)
    view = await _run(
        bus, hive, "gemini", fakes, prompt="un tuit", response_format=POST_FORMAT, max_attempts=3
    )
    assert (view.status, view.reason, view.attempt) == ("failed", "invalid_output", 3)
    assert "at $.hashtags[1]: 7 is not of type 'string'" in (view.error or "")
    assert fakes.gemini.requests == 3
    dead = await hive.dead_letter(view.id)
    assert dead.failed.reason == "invalid_output"
    assert (
        dead.failed.task is not None and dead.failed.task.response_format is not None
    )  # replayable as it was


async def test_echo_output_that_is_not_json_is_an_invalid_output(bus: Bus, hive: Hive) -> None:
    ids = [
        await hive.submit("echo", "no es JSON", response_format={"type": "json_object"}, max_attempts=2),
        await hive.submit("echo", "[1, 2]", response_format={"type": "json_object"}, max_attempts=1),
        await hive.submit("echo", '{"n": 1}', response_format={"type": "json_object"}),
    ]
    async with following(bus) as metrics, running_worker(bus, "echo", EchoProvider(), backoff_base_s=0.05):
        not_json, not_object, good = [await hive.wait(i, 10) for i in ids]
        await metrics.refresh()
        found = samples(metrics)
    assert (not_json.status, not_json.reason, not_json.attempt) == ("failed", "invalid_output", 2)
    assert "the output is not valid JSON" in (not_json.error or "")
    assert (not_object.reason, not_object.error) == (
        "invalid_output",
        "no valid output in 1 attempts; last: the output is JSON but not an object: [1, 2]",
    )
    assert (good.status, good.output) == ("completed", {"n": 1})
    assert value(found, "hive_task_retries_total", provider="echo", reason="invalid_output") == 1
    assert value(found, "hive_tasks_failed_total", provider="echo", reason="invalid_output") == 2


async def test_a_handler_value_is_checked_as_it_is(bus: Bus, hive: Hive) -> None:
    """A custom handler may return a value rather than text: it is checked without being parsed."""

    async def post(task: Task) -> Any:
        return GOOD_POST if task.prompt == "good" else {"text": 1, "hashtags": []}

    ids = [
        await hive.submit("posts", p, response_format=POST_FORMAT, max_attempts=1) for p in ("good", "bad")
    ]
    async with running_worker(bus, "posts", FunctionProvider(post)):
        good, bad = [await hive.wait(i, 10) for i in ids]
    assert good.output == GOOD_POST
    assert "at $.text: 1 is not of type 'string'" in (bad.error or "")


def test_structured_output_is_parsed_and_checked_where_it_fails() -> None:
    schema_format = msgspec.convert(POST_FORMAT, JsonSchemaFormat)
    assert structured(None, "texto libre") == "texto libre"  # no format: the text as it is
    assert structured(schema_format, json.dumps(GOOD_POST)) == GOOD_POST
    with pytest.raises(InvalidOutput, match=r"at \$: Additional properties are not allowed \('extra' was"):
        structured(schema_format, {**GOOD_POST, "extra": 1})
    built = JsonSchemaFormat(json_schema=JsonSchemaSpec(name="p", schema={"type": 5}))  # never checked
    with pytest.raises(FailNow, match="the schema 'p' is not a valid JSON Schema: 5 is not valid"):
        structured(built, "1")
    endless = msgspec.convert({"json_schema": {"name": "loop", "schema": {"$ref": "#"}}}, JsonSchemaFormat)
    with pytest.raises(FailNow, match="refers to itself without end"):  # not a worker's RecursionError
        structured(endless, "1")


# a schema that is not JSON Schema is refused when submitted -----------------------------------------


async def test_a_bad_schema_is_a_400_naming_the_schema_error(settings: Settings, hive: Hive) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "post", "schema": {"type": "objeto"}}}
    body = {"provider": "echo", "prompt": "x", "response_format": bad}
    async with two_paths(settings) as paths:
        fast, route = await paths.both("/v1/tasks", encoded(body))
        fast_batch, route_batch = await paths.both("/v1/tasks/batch", encoded({"tasks": [body]}))
    assert answer(fast) == answer(route)
    assert answer(fast_batch) == answer(route_batch)
    assert fast.status_code == fast_batch.status_code == 400
    error = fast.json()["error"]
    assert error["field"] == "response_format.json_schema"
    assert (
        "schema is not a valid JSON Schema: 'objeto' is not valid under any of the given schemas"
        in error["message"]
    )
    assert "at $.type of the schema" in error["message"]
    with pytest.raises(msgspec.ValidationError, match="schema is not a valid JSON Schema"):
        await hive.submit("echo", "x", response_format=bad)
    unknown = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"$schema": "https://x.test/s"}}}
    with pytest.raises(msgspec.ValidationError, match="not a JSON Schema dialect this hive knows"):
        await hive.submit("echo", "x", response_format=unknown)
