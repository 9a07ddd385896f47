"""``echo``: returns the prompt (of a task of messages, the last message's text). For trials, demos
and benchmarks; with a JSON ``response_format``, the worker checks what it returns like any provider's
output, so a prompt that is not the JSON asked for makes an invalid output.

A ``payload`` of ``{"delay_s": 2.5}`` makes it take that long, to try out draining and redelivery.
"""

from __future__ import annotations

import anyio

from hive_bus import Output, Task, Usage


class EchoProvider:
    async def complete(self, task: Task) -> Output:
        delay_s = task.payload.get("delay_s") if isinstance(task.payload, dict) else None
        if isinstance(delay_s, int | float) and delay_s > 0:
            await anyio.sleep(float(delay_s))
        text = task.messages[-1].text if task.messages else task.prompt
        words = len(text.split())
        return Output(value=text, model="echo", usage=Usage(input_tokens=words, output_tokens=words))
