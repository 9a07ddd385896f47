"""OpenAI's Files API on the gateway (issue 15, point 2), driven by the real ``openai`` SDK: files are
kept in JetStream's Object Store, so a second gateway on the bus sees them, and an upload is checked
line by line as it streams in."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import openai
import pytest

from hive_bus import Hive, Settings
from hive_bus._files import BOM, BadFile, JsonLines
from hive_bus.bus import open_bus
from hive_bus.services.gateway import Gateway, GatewayOptions

from .helpers import openai_shaped

pytestmark = pytest.mark.anyio

LINES = [
    b'{"custom_id": "post-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "echo", "messages": [{"role": "user", "content": "Un tuit sobre caf\xc3\xa9"}]}}',
    b'{"custom_id": "post-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "echo", "messages": [{"role": "user", "content": "Otro"}]}}',
]
JSONL = b"\n".join(LINES) + b"\n"


@asynccontextmanager
async def gateway_client(settings: Settings) -> AsyncIterator[openai.AsyncOpenAI]:
    async with open_bus(settings) as bus:
        gateway = Gateway(Hive(bus), GatewayOptions(port=0))
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.serve)
            async with openai.AsyncOpenAI(
                base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0
            ) as client:
                yield client
            gateway.stop()


async def test_upload_list_show_read_and_delete_with_the_openai_sdk(settings: Settings) -> None:
    async with gateway_client(settings) as client:
        uploaded = await client.files.create(file=("posts.jsonl", io.BytesIO(JSONL)), purpose="batch")
        assert uploaded.id.startswith("file-")
        assert (uploaded.filename, uploaded.bytes, uploaded.purpose, uploaded.object) == (
            "posts.jsonl", len(JSONL), "batch", "file",
        )  # fmt: skip
        second = await client.files.create(file=("more.jsonl", io.BytesIO(LINES[0])), purpose="batch")

        listed = await client.files.list()
        assert [f.id for f in listed.data] == [second.id, uploaded.id]  # newest first
        shown = await client.files.retrieve(uploaded.id)
        assert shown.model_dump() == uploaded.model_dump()
        content = await client.files.content(uploaded.id)
        assert content.read() == JSONL

        deleted = await client.files.delete(second.id)
        assert (deleted.id, deleted.deleted) == (second.id, True)
        assert [f.id for f in (await client.files.list()).data] == [uploaded.id]
        with pytest.raises(openai.NotFoundError, match=f"no file '{second.id}'"):
            await client.files.retrieve(second.id)

    # the files are the bus's: another gateway (or this one restarted) has them
    async with gateway_client(settings) as other:
        assert (await other.files.content(uploaded.id)).read() == JSONL


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"custom_id": "a"}\n{"custom_id": \n', "line 2: not valid JSON"),
        (b'{"custom_id": "a"}\n\n[1, 2]\n', "line 3: a line must be a JSON object, not list"),
        (b"\n  \n", "the file holds no line"),
        # was a 500: msgspec recursed on the line before any check
        (
            b'{"custom_id": "a"}\n{"body": ' + b"[" * 5000 + b"]" * 5000 + b"}\n",
            r"line 2: body\[0\]\[0\]\[0\]: nested deeper than 32 levels",
        ),
        (BOM[:2], "line 1: not valid JSON"),
    ],
)
async def test_a_file_that_is_not_json_lines_is_refused_naming_the_line(
    settings: Settings, body: bytes, message: str
) -> None:
    async with gateway_client(settings) as client:
        with pytest.raises(openai.BadRequestError, match=message):
            await client.files.create(file=("bad.jsonl", io.BytesIO(body)), purpose="batch")
        assert (await client.files.list()).data == []


async def test_a_byte_order_mark_at_the_start_is_left_out(settings: Settings) -> None:
    """Once refused: "line 1: not valid JSON (invalid character (byte 0))"."""
    async with gateway_client(settings) as client:
        uploaded = await client.files.create(file=("bom.jsonl", io.BytesIO(BOM + JSONL)), purpose="batch")
        assert uploaded.bytes == len(JSONL)
        assert (await client.files.content(uploaded.id)).read() == JSONL
    check = JsonLines()
    kept = b"".join(check.feed(BOM[i : i + 1]) for i in range(len(BOM)))  # split inside the mark too
    kept += check.feed(JSONL)
    check.end()
    assert (kept, check.lines, check.size_bytes) == (JSONL, 2, len(JSONL))


async def test_a_purpose_other_than_batch_is_refused(settings: Settings) -> None:
    async with gateway_client(settings) as client:
        with pytest.raises(openai.BadRequestError, match="purpose 'fine-tune' is not one this gateway takes"):
            await client.files.create(file=("x.jsonl", io.BytesIO(JSONL)), purpose="fine-tune")


async def test_more_than_fifty_thousand_lines_is_refused(settings: Settings) -> None:
    body = b'{"custom_id": "x"}\n' * 50_001
    async with gateway_client(settings) as client:
        with pytest.raises(openai.BadRequestError, match="line 50001: the file has more than 50000 lines"):
            await client.files.create(file=("big.jsonl", io.BytesIO(body)), purpose="batch")


async def test_an_upload_that_is_not_multipart_is_a_clear_415(settings: Settings) -> None:
    async with gateway_client(settings) as client:
        url = str(client.base_url).rstrip("/") + "/files"
        async with httpx.AsyncClient() as http:
            r = await http.post(url, content=JSONL, headers={"content-type": "application/jsonl"})
    assert r.status_code == 415
    assert r.json()["error"]["message"].startswith("a file is uploaded as multipart/form-data")


async def test_a_form_with_two_file_parts_is_refused_as_such(settings: Settings) -> None:
    form = {"purpose": (None, b"batch"), "file": ("a.jsonl", JSONL)}
    second = [("file", ("b.jsonl", JSONL))]
    async with gateway_client(settings) as client:
        url = str(client.base_url).rstrip("/") + "/files"
        async with httpx.AsyncClient() as http:
            request = http.build_request("POST", url, files=[*form.items(), *second])
            r = await http.send(request)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["message"] == "an upload takes exactly one part named file; this form has more than one"
        assert "malformed" not in r.text
        assert (await client.files.list()).data == []


async def test_every_error_of_the_file_routes_is_in_openais_shape(settings: Settings) -> None:
    async with gateway_client(settings) as client:
        with pytest.raises(openai.BadRequestError, match="query parameter 'limit'") as raised:
            await client.files.list(limit=0)
        error = raised.value
        assert (error.status_code, error.type, error.param, error.code) == (
            400, "invalid_request_error", "limit", "invalid_request",
        )  # fmt: skip
        with pytest.raises(openai.BadRequestError, match="exactly one part named file") as raised:
            await client.post(
                "/files",
                cast_to=httpx.Response,
                body={"purpose": "batch"},
                files=[("file", ("a.jsonl", JSONL)), ("file", ("b.jsonl", JSONL))],
                options={"headers": {"Content-Type": "multipart/form-data"}},
            )
        assert raised.value.param == "file"
        async with httpx.AsyncClient(base_url=str(client.base_url)) as http:
            answers = {
                "limit 0": await http.get("files", params={"limit": 0}),
                "an order it does not know": await http.get("files", params={"order": "sideways"}),
                "a path under it that is no route": await http.get("files/file-x/content/nope"),
                "a method it does not take": await http.put("files"),
                "not multipart": await http.post(
                    "files", content=JSONL, headers={"content-type": "text/plain"}
                ),
                "no boundary": await http.post(
                    "files", content=b"x", headers={"content-type": "multipart/form-data"}
                ),
                "no purpose": await http.post("files", files={"file": ("a.jsonl", JSONL)}),
                "no such file": await http.get("files/file-nope"),
                "no such file's content": await http.get("files/file-nope/content"),
            }
    assert {case: r.status_code for case, r in answers.items()} == {
        "limit 0": 400,
        "an order it does not know": 400,
        "a path under it that is no route": 404,
        "a method it does not take": 405,
        "not multipart": 415,
        "no boundary": 400,
        "no purpose": 400,
        "no such file": 404,
        "no such file's content": 404,
    }
    assert {case: r.text for case, r in answers.items() if not openai_shaped(r)} == {}
    assert answers["no purpose"].json()["error"]["param"] == "purpose"


def test_lines_are_checked_across_chunk_boundaries_and_size_is_bounded() -> None:
    check = JsonLines(max_bytes=len(JSONL))
    for i in range(0, len(JSONL), 7):  # split anywhere, even inside a UTF-8 character
        check.feed(JSONL[i : i + 7])
    check.end()
    assert (check.lines, check.size_bytes) == (2, len(JSONL))
    too_big = JsonLines(max_bytes=10)
    with pytest.raises(BadFile, match="larger than 10 bytes") as raised:
        too_big.feed(JSONL)
    assert raised.value.too_large
