"""``echo``: returns the prompt. For trials, demos and benchmarks.

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
        words = len(task.prompt.split())
        return Output(value=task.prompt, model="echo", usage=Usage(input_tokens=words, output_tokens=words))
