"""``echo``: returns the prompt (of a task of messages, the last message's text). For trials, demos
and benchmarks; with a JSON ``response_format``, the worker checks what it returns like any provider's
output, so a prompt that is not the JSON asked for makes an invalid output.

It honours ``params.stop`` (the echo ends where a stop sequence begins); a ``seed`` changes nothing, as
the echo is the same every time. A ``payload`` of ``{"delay_s": 2.5}`` makes it take that long, to try
out draining and redelivery.
"""

from __future__ import annotations

import anyio

from hive_bus import Output, Task, Usage


class EchoProvider:
    async def complete(self, task: Task) -> Output:
        delay_s = task.payload.get("delay_s") if isinstance(task.payload, dict) else None
        if isinstance(delay_s, int | float) and delay_s > 0:
            await anyio.sleep(float(delay_s))
        # a task of messages echoes its last user message
        users = [m.text for m in task.messages or [] if m.role == "user"]
        asked = task.prompt or (users[-1] if users else "")
        text = asked
        stops = task.params.stop if task.params else None
        if stops:  # cut where a stop sequence begins, as a model stops there (a seed changes nothing)
            text = text[: min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))]
        return Output(
            value=text,
            model="echo",
            usage=Usage(input_tokens=len(asked.split()), output_tokens=len(text.split())),
            finish_reason="stop",
        )
