"""Shared pieces of the provider fakes: what a parsed request and an answer look like, and the
formatting the real APIs use for delays and ids."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import secrets
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

JsonObject = dict[str, Any]


class BadRequest(Exception):
    """The request body is not what the API accepts; the provider answers its own 400."""


@dataclass(frozen=True)
class ChatRequest:
    """What a fake needs from a request, whatever the API: the model, the prompt it answers
    (the last user message), every piece of input text (for the usage counts), whether it asked for
    JSON (its API's JSON mode), the name of the tool it forces (Anthropic's structured output), and the
    most output tokens it takes (its API's ``max_tokens``): a longer answer is cut there, and ``cut``
    says so (each API's finish reason for it: ``length``, ``MAX_TOKENS``, ``max_tokens``)."""

    model: str
    prompt: str
    input_texts: tuple[str, ...]
    json_mode: bool = False
    forced_tool: str | None = None
    max_output_tokens: int | None = None
    cut: bool = False

    @property
    def input_tokens(self) -> int:
        return sum(words(text) for text in self.input_texts)


@dataclass(frozen=True)
class Reply:
    """One HTTP answer."""

    status: int
    body: JsonObject
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def encoded(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()


def phrase(status: int) -> str:
    """The HTTP reason phrase, or a generic one for statuses outside the standard (Anthropic's 529)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def words(text: str) -> int:
    """The fakes' token count: whitespace-separated words."""
    return len(text.split())


def reply_text(prompt: str) -> str:
    """Every successful answer: derived from the prompt, so a test can match outputs to prompts."""
    return "reply: " + prompt


def json_reply_text(prompt: str) -> str:
    """A successful answer in JSON mode (unless a test scripted one): an object holding the reply."""
    return json.dumps({"reply": reply_text(prompt)})


_PIECES = re.compile(r"\s*\S+|\s+$")


def pieces(text: str) -> list[str]:
    """How the fakes split a streamed answer: word by word, each word with the white space before it."""
    return _PIECES.findall(text)


def sse(data: JsonObject | str, event: str | None = None, *, crlf: bool = False) -> str:
    """One Server-Sent Event: ``event:`` when named, one ``data:`` line, and the blank line."""
    end = "\r\n" if crlf else "\n"
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}{end}" if event else ""
    return f"{head}data: {body}{end}{end}"


def whole_seconds(delay_s: float) -> int:
    """A delay rounded up to whole seconds, at least 1 (``retry-after``, ``retryDelay``)."""
    return max(1, math.ceil(delay_s - 1e-9))


def go_duration(delay_s: float) -> str:
    """A delay as Go's ``time.Duration`` prints it (Groq, OpenAI): ``665ms``, ``6.78s``, ``9m38.4s``,
    ``1h0m0s``; rounded up to the millisecond, so that waiting the delay out is always enough."""
    ms = math.ceil(delay_s * 1000 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    text = f"{hours}h" if hours else ""
    if hours or minutes:
        text += f"{minutes}m"
    fraction = f".{millis:03d}".rstrip("0") if millis else ""
    return f"{text}{seconds}{fraction}s"


def seconds_text(delay_s: float) -> str:
    """A delay as Google writes it in messages: ``25.465784708s``."""
    return f"{max(delay_s, 0.0):.9f}".rstrip("0").rstrip(".") + "s"


def rfc3339_in(delay_s: float) -> str:
    """The UTC time ``delay_s`` from now, to the second, as Anthropic's reset headers give it."""
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=math.ceil(max(delay_s, 0.0)))
    return at.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


_ALNUM = string.ascii_letters + string.digits
_BASE32 = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford, lower case, as in Groq's ulid-style ids


def random_id(length: int, alphabet: str = _ALNUM) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def ulid_like() -> str:
    """A ulid-shaped id such as Groq puts after ``req_`` and ``org_``: 26 lower-case base-32 chars."""
    return "01" + random_id(24, _BASE32)


def texts_of(content: Any) -> list[str]:
    """The text in a chat message's ``content``: a string, or a list of text blocks/parts."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        found: list[str] = []
        for block in content:
            if isinstance(block, str):
                found.append(block)
            elif isinstance(block, dict) and isinstance(block.get("text"), str):
                found.append(block["text"])
        return found
    return []


def require_object(value: Any, what: str) -> JsonObject:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be an object")
    return value


def require_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{what}: field required")
    return value


def non_empty(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(item for item in items if item)
