"""Issue 14, point 1: a task asks with chat messages, end to end. The gateway (both paths), the client and
the CLI take them; each adapter maps them to its own API's shape, which the provider fakes check and
record; a task from before messages still runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from hive_bus import ChatMessage, Completed, FunctionProvider, Hive, Settings, Task, TaskRequest, TaskView
from hive_bus._messages import new_seal, new_task_id, now_ms
from hive_bus._worker import _estimate_tokens
from hive_bus.bus import Bus
from hive_bus.workers import EchoProvider

from .fakes import ProviderFakes
from .helpers import HIVE, events_of, eventually, hive_cli, running_worker
from .test_dashboard import CHROMIUM, WAIT_MS, chromium, gateway, page_of
from .test_providers import KEY, make
from .test_submit_parity import answer, encoded, two_paths

pytestmark = pytest.mark.anyio

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Eres un community manager."},
    {"role": "user", "content": "Un tuit sobre café."},
    {"role": "assistant", "content": "¿Con hashtags?"},
    {"role": "user", "content": [{"type": "text", "text": "Sí, "}, {"type": "text", "text": "dos."}]},
]


@pytest.fixture
def fakes() -> Iterator[ProviderFakes]:
    with ProviderFakes() as f:
        yield f


async def _run(bus: Bus, hive: Hive, name: str, fakes: ProviderFakes, **fields: Any) -> TaskView:
    task_id = await hive.submit(name, **fields)
    async with running_worker(bus, name, make(name, fakes)):
        view = await hive.wait(task_id, 20)
    assert view.status == "completed", view
    return view


# each adapter, in its API's shape -----------------------------------------------------------------


async def test_gemini_gets_contents_with_role_model_and_a_system_instruction(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    view = await _run(bus, hive, "gemini", fakes, messages=CONVERSATION)
    (body,) = fakes.gemini.bodies_seen
    assert body["systemInstruction"]["parts"] == [{"text": "Eres un community manager."}]
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert [c["parts"][0]["text"] for c in body["contents"]] == [
        "Un tuit sobre café.",
        "¿Con hashtags?",
        "Sí, dos.",
    ]
    assert view.output == "reply: Sí, dos."
    await _run(bus, hive, "gemini", fakes, prompt="hola", system="sé breve")  # a prompt task as before
    assert fakes.gemini.bodies_seen[1]["systemInstruction"]["parts"] == [{"text": "sé breve"}]
    assert fakes.gemini.bodies_seen[1]["contents"] == [{"role": "user", "parts": [{"text": "hola"}]}]


async def test_anthropic_gets_system_apart_and_one_turn_per_role(
    bus: Bus, hive: Hive, fakes: ProviderFakes
) -> None:
    messages = [
        {"role": "system", "content": "Sé breve."},
        {"role": "user", "content": "Primero esto."},
        {"role": "user", "content": "Y luego esto."},
        {"role": "assistant", "content": "Vale."},
        {"role": "user", "content": "¿Y ahora?"},
    ]
    view = await _run(bus, hive, "anthropic", fakes, messages=messages)
    (body,) = fakes.anthropic.bodies_seen
    assert body["system"] == "Sé breve."
    assert body["messages"] == [
        {"role": "user", "content": "Primero esto.\n\nY luego esto."},
        {"role": "assistant", "content": "Vale."},
        {"role": "user", "content": "¿Y ahora?"},
    ]
    assert view.output == "reply: ¿Y ahora?"
    await _run(bus, hive, "anthropic", fakes, prompt="hola", system="sé breve")  # a prompt task as before
    assert fakes.anthropic.bodies_seen[1]["system"] == "sé breve"
    assert fakes.anthropic.bodies_seen[1]["messages"] == [{"role": "user", "content": "hola"}]


@pytest.mark.parametrize("name", ["groq", "openai"])
async def test_openai_style_apis_get_the_messages_as_they_are(
    bus: Bus, hive: Hive, fakes: ProviderFakes, name: str
) -> None:
    view = await _run(bus, hive, name, fakes, messages=CONVERSATION)
    (body,) = getattr(fakes, name).bodies_seen
    assert body["messages"] == CONVERSATION
    assert view.output == "reply: Sí, dos."


async def test_the_fakes_refuse_what_the_real_apis_refuse(fakes: ProviderFakes) -> None:
    """The checks the adapters are held to: a system turn in Gemini's contents or Anthropic's messages."""
    import anthropic
    from google import genai
    from google.genai import errors, types

    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=fakes.gemini_base_url))
    with pytest.raises(errors.ClientError, match="valid role: user, model"):
        await client.aio.models.generate_content(
            model="gemini-2.5-flash", contents=[types.Content(role="system", parts=[types.Part(text="x")])]
        )
    await client.aio.aclose()
    claude = anthropic.AsyncAnthropic(api_key=KEY, base_url=fakes.anthropic_base_url, max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="top-level `system`"):
        await claude.messages.create(
            model="claude-haiku-4-5",
            max_tokens=10,
            messages=[{"role": "system", "content": "x"}],
        )
    await claude.close()


async def test_echo_answers_a_conversation_with_its_last_message(bus: Bus, hive: Hive) -> None:
    task_id = await hive.submit("echo", messages=[ChatMessage(role="user", content="eco")])
    async with running_worker(bus, "echo", EchoProvider()):
        view = await hive.wait(task_id, 10)
    assert (view.status, view.output) == ("completed", "eco")


# the client, the gateway, the CLI -----------------------------------------------------------------


async def test_the_client_refuses_a_prompt_and_messages_together(hive: Hive) -> None:
    with pytest.raises(msgspec.ValidationError, match="exactly one of `prompt` and `messages`"):
        await hive.submit("echo", "hola", messages=CONVERSATION)
    with pytest.raises(msgspec.ValidationError, match=r"messages\[0\].role"):
        await hive.submit("echo", messages=[{"role": "bot", "content": "x"}])


async def test_a_handler_reads_the_conversation(bus: Bus, hive: Hive) -> None:
    async def transcript(task: Task) -> Any:
        return [f"{m.role}: {m.text}" for m in task.conversation()]

    task_id = await hive.submit("transcript", messages=CONVERSATION)
    async with running_worker(bus, "transcript", FunctionProvider(transcript)):
        view = await hive.wait(task_id, 10)
    assert view.output == [
        "system: Eres un community manager.",
        "user: Un tuit sobre café.",
        "assistant: ¿Con hashtags?",
        "user: Sí, dos.",
    ]


async def test_the_gateway_takes_messages_on_both_paths_and_says_what_is_wrong(
    settings: Settings, bus: Bus
) -> None:
    good = {"provider": "echo", "messages": CONVERSATION}
    cases = {
        "both": {"provider": "echo", "prompt": "hola", "messages": CONVERSATION},
        "bad role": {"provider": "echo", "messages": [{"role": "bot", "content": "x"}]},
        "no messages": {"provider": "echo", "messages": []},
        "system beside": {"provider": "echo", "system": "s", "messages": CONVERSATION},
        "bad part": {"provider": "echo", "messages": [{"role": "user", "content": [{"type": "image"}]}]},
    }
    async with two_paths(settings) as paths:
        fast, route = await paths.both("/v1/tasks", encoded(good))
        assert (fast.status_code, route.status_code) == (202, 202)
        fast_batch, route_batch = await paths.both("/v1/tasks/batch", encoded({"tasks": [good, good]}))
        assert fast_batch.json()["accepted"] == route_batch.json()["accepted"] == 2
        document = (await paths.fast.get("/openapi.json")).json()
        errors = {}
        for what, body in cases.items():
            fast, route = await paths.both("/v1/tasks", encoded(body))
            assert answer(fast) == answer(route), what
            assert fast.status_code == 400, (what, fast.text)
            errors[what] = fast.json()["error"]
    assert "exactly one of `prompt` and `messages`" in errors["both"]["message"]
    assert errors["bad role"]["field"] == "messages[0].role"
    assert errors["no messages"]["field"] == "messages"
    assert "give a message of role system" in errors["system beside"]["message"]
    assert errors["bad part"]["field"].startswith("messages[0].content")
    schemas = document["components"]["schemas"]
    request = next(s for name, s in schemas.items() if name.endswith("TaskRequest"))
    assert {"messages", "response_format", "prompt"} <= set(request["properties"])
    async with running_worker(bus, "echo", EchoProvider()):
        hive = Hive(bus)
        view = await hive.wait(fast_batch.json()["tasks"][0]["id"], 10)
    assert view.output == "Sí, dos."


async def test_hive_submit_messages_from_a_file_or_stdin(
    settings: Settings, bus: Bus, tmp_path: Path
) -> None:
    env = {"HIVE_PREFIX": settings.prefix, "HIVE_HEARTBEAT_INTERVAL_S": "0.5", "HIVE_HEARTBEAT_TTL_S": "1.5"}
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(CONVERSATION))
    async with running_worker(bus, "echo", EchoProvider()):
        done = await anyio.to_thread.run_sync(
            lambda: hive_cli(
                ["submit", "echo", "--messages", str(path), "--wait", "10", "--nats", settings.nats_url],
                env=env,
            )
        )
    assert done.returncode == 0, done.stderr
    view = msgspec.json.decode(done.stdout)
    assert (view["status"], view["output"]) == ("completed", "Sí, dos.")

    path.write_text('[{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]')
    bad = hive_cli(["submit", "echo", "--messages", str(path), "--nats", settings.nats_url], env=env)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        f"Error: --messages {path}: message 2: role: Invalid enum value 'bot'"
    ]
    missing = hive_cli(["submit", "echo", "--messages", str(tmp_path / "none.json")], env=env)
    assert missing.stderr.strip().splitlines() == [
        f"Error: --messages {tmp_path / 'none.json'}: cannot read it: No such file or directory"
    ]
    both = hive_cli(["submit", "echo", "hola", "--messages", str(path)], env=env)
    assert "give either PROMPT or --messages FILE, not both" in both.stderr
    piped = await anyio.run_process([HIVE, "submit", "echo", "--messages", "-"], input=b"[]", check=False)
    assert piped.stderr.decode().strip().splitlines() == [
        "Error: --messages stdin: the array holds no message"
    ]


# old tasks, budgets --------------------------------------------------------------------------------


async def test_a_task_encoded_before_messages_still_runs(bus: Bus, hive: Hive) -> None:
    """The bytes of a task as a worker of yesterday's release published them: no messages, no format."""
    task_id = new_task_id()
    old = json.dumps(
        {"type": "task.v1", "provider": "echo", "prompt": "de antes", "system": "s", "id": task_id,
         "submitted_at_ms": now_ms(), "seal": new_seal()}
    ).encode()  # fmt: skip
    await bus.js.publish(bus.names.task_subject("echo", "normal", "old"), old, stream=bus.names.tasks_stream)

    async def completed() -> Completed | None:
        return next((e for e in await events_of(bus, task_id) if isinstance(e, Completed)), None)

    async with running_worker(bus, "echo", EchoProvider()):
        event = await eventually(completed, 15, "the old task's completed event")
    assert event.output == "de antes"


def test_a_budget_counts_the_whole_conversation() -> None:
    def task(**fields: Any) -> Task:
        return Task.from_request(msgspec.convert({"provider": "groq", **fields}, TaskRequest))

    long_turn = "palabra " * 400
    short = _estimate_tokens(task(messages=[{"role": "user", "content": "hola"}]))
    long = _estimate_tokens(
        task(messages=[{"role": "user", "content": long_turn}, {"role": "user", "content": "hola"}])
    )
    assert long - short == len(long_turn) // 4


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is not installed at {CHROMIUM}")
async def test_the_dashboard_shows_what_a_queued_conversation_asks(settings: Settings) -> None:
    """A queued task's row shows what it asks: for a task of messages, its last message's text."""
    async with gateway(settings) as url, chromium() as browser, page_of(browser) as (page, problems):
        await page.goto(url)
        await page.wait_for_selector('body[data-feed="live"]', timeout=WAIT_MS)
        async with httpx.AsyncClient(base_url=url, timeout=15) as http:
            r = await http.post("/v1/tasks", json={"provider": "nobody", "messages": CONVERSATION})
        assert r.status_code == 202, r.text
        row = await page.wait_for_selector(f'#tasks tr[data-task-id="{r.json()["id"]}"]', timeout=WAIT_MS)
        assert row is not None
        assert "Sí, dos." in await row.inner_text()
    assert problems == []
