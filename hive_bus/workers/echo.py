"""``echo``: returns the prompt (of a task of messages, its last user message). For trials, demos
and benchmarks; with a JSON ``response_format``, the worker checks what it returns like any provider's
output, so a prompt that is not the JSON asked for makes an invalid output.

It honours ``params.stop`` (the echo ends where a stop sequence begins); a ``seed`` changes nothing, as the echo is the same every time. A ``payload`` of
``{"delay_s": 2.5}`` makes it take that long, to try out draining and redelivery.
Streamed (a task with ``stream: true``), it sends the reply word by word (each word with the white
space before it); ``{"chunk_delay_s": 0.1}`` waits that long before each word, as a model would (and
an unstreamed reply as long in all, before the whole of it).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import anyio

from hive_bus import Output, Task, Usage

_WORDS = re.compile(r"\s*\S+|\s+$")


class EchoProvider:
    async def complete(self, task: Task) -> Output:
        # unstreamed, the same reply takes as long: the whole text comes once its last word is made
        delay_s = _seconds(task, "delay_s")
        if chunk_delay_s := _seconds(task, "chunk_delay_s"):  # words counted only when they take time
            delay_s += chunk_delay_s * len(_WORDS.findall(_text(task)))
        if delay_s > 0:
            await anyio.sleep(delay_s)
        return _output(task)

    async def stream(self, task: Task) -> AsyncIterator[str | Output]:
        delay_s, chunk_delay_s = _seconds(task, "delay_s"), _seconds(task, "chunk_delay_s")
        if delay_s > 0:
            await anyio.sleep(delay_s)
        for piece in _WORDS.findall(_text(task)):
            if chunk_delay_s > 0:
                await anyio.sleep(chunk_delay_s)
            yield piece
        yield _output(task)


def _seconds(task: Task, name: str) -> float:
    value = task.payload.get(name) if isinstance(task.payload, dict) else None
    return float(value) if isinstance(value, int | float) and value > 0 else 0.0


def _asked(task: Task) -> str:
    """The prompt, or for a task of chat messages its last user message."""
    users = [m.text for m in task.messages or [] if m.role == "user"]
    return task.prompt or (users[-1] if users else "")


def _text(task: Task) -> str:
    """The reply: what was asked, cut where a stop sequence begins (as a model stops there)."""
    text = _asked(task)
    stops = task.params.stop if task.params else None
    if stops:
        text = text[: min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))]
    return text


def _output(task: Task) -> Output:
    asked, text = _asked(task), _text(task)
    usage = Usage(input_tokens=len(asked.split()), output_tokens=len(text.split()))
    return Output(value=text, model="echo", usage=usage, finish_reason="stop")
