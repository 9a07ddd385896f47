"""``POST /v1/chat/completions`` with ``stream: true``: a task's output as OpenAI's
``text/event-stream`` of ``chat.completion.chunk`` objects, while the task runs through the bus.

:func:`completion_events` turns a :class:`TaskStream` into the events exactly as OpenAI sends them: a
first chunk whose delta holds ``role``, one chunk per piece of content, a last chunk with an empty delta
and ``finish_reason``, with ``stream_options.include_usage`` a chunk with no choices and the usage (every
other chunk then has ``"usage": null``), and ``data: [DONE]``. While the task waits (queued, a rate limit
waited out), an SSE comment ``: waiting`` goes out every ``keepalive_s``, so that proxies keep the
connection open; clients ignore comments.

What the client sees when it does not complete:

- the task failed for good: an error event ``data: {"error": {...}}`` (OpenAI's error object; the
  ``openai`` SDK raises ``APIError`` from the loop) naming the task, and no ``[DONE]``; cancelled (``POST
  /v1/tasks/{id}/cancel``): the same, of code ``task_cancelled``; ended with its events evicted since
  (a repeated Idempotency-Key, long after): of code ``task_evicted``;
- an attempt fails (or its worker is lost: its heartbeat expired) **after** some of its text went out: the task is retried on
  the bus, but a client cannot take back text it has shown, and OpenAI's protocol has no way to say
  "start over". The stream therefore ends with an error event of code ``stream_interrupted`` that names
  the task id, and no ``[DONE]``: the SDK raises, so the caller knows the text is incomplete, and the
  task goes on. Its whole output is then at ``GET /v1/tasks/{id}``, and repeating the request with the
  same ``Idempotency-Key`` streams the retried task (already completed: its whole output at once)
  without a new provider call. Text spliced after a marker would instead hand the caller a corrupt
  answer that looks complete;
- an attempt fails **before** any text went out (a 429, a transient error): nothing; the stream waits
  (with ``: waiting`` comments) and carries the attempt that succeeds;
- no end within the wait: an error event of code ``timeout`` naming the task, which goes on.

The chat completions route (:mod:`services.openai_chat`) checks the request and builds its task, then
hands a streamed one to :func:`streamed_completion`.
"""

# No "from __future__ import annotations" here: Litestar reads the parameter markers at run time.
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Response
from litestar.response import Stream

from hive_bus import (
    Hive,
    StreamEnded,
    StreamRestarted,
    StreamText,
    StreamWaiting,
    TaskRequest,
    TaskStream,
    TaskView,
)

SSE = "text/event-stream"
DEFAULT_STREAM_KEEPALIVE_S = 10.0
# A streamed answer that has not ended after this long ends with a ``timeout`` error event (the task
# goes on); the non-streamed route has its own bound.
DEFAULT_STREAM_WAIT_S = 600.0
_encoder = msgspec.json.Encoder()


def openai_error(
    status: int, message: str, type_: str, code: str | None, param: str | None = None
) -> Response[Any]:
    """An error answer in OpenAI's shape, which its SDKs read into ``APIStatusError``."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(content=body, status_code=status, media_type="application/json")


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + _encoder.encode(data) + b"\n\n"


def error_event(message: str, type_: str, code: str) -> bytes:
    """An error in the stream, as OpenAI sends one: the SDK raises ``APIError`` with its message."""
    return event({"error": {"message": message, "type": type_, "param": None, "code": code}})


async def completion_events(
    stream: TaskStream, *, model: str, include_usage: bool, created: int | None = None
) -> AsyncIterator[bytes]:
    """The task's stream as OpenAI's ``chat.completion.chunk`` events (see the module's docstring)."""
    base: dict[str, Any] = {
        "id": f"chatcmpl-{stream.task_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()) if created is None else created,
        "model": model,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return event(base | {"choices": [choice]} | ({"usage": None} if include_usage else {}))

    started = False
    async for item in stream:
        match item:
            case StreamWaiting():
                yield b": waiting\n\n"
            case StreamText(text=text):
                if not started:
                    started = True
                    yield chunk({"role": "assistant", "content": ""})
                yield chunk({"content": text})
            case StreamRestarted(attempt=attempt, why=why):
                yield error_event(
                    _interrupted(stream.task_id, attempt, why), "server_error", "stream_interrupted"
                )
                return
            case StreamEnded(view=view):
                if view.status == "completed":
                    if not started:
                        yield chunk({"role": "assistant", "content": ""})
                    yield chunk({}, view.finish_reason or "stop")
                    if include_usage:
                        yield event(base | {"choices": [], "usage": _usage(view)})
                    yield b"data: [DONE]\n\n"
                elif view.status == "failed":
                    message = f"task {view.id} failed ({view.reason}): {view.error}"
                    yield error_event(message, "server_error", "task_failed")
                elif view.status == "cancelled":
                    message = (
                        f"task {view.id} was cancelled ({view.reason}): {view.error or 'no reason given'}"
                    )
                    yield error_event(message, "invalid_request_error", "task_cancelled")
                elif view.status == "evicted":
                    yield error_event(
                        f"task {view.id}: {view.error}", "invalid_request_error", "task_evicted"
                    )
                else:
                    message = (
                        f"task {view.id} has not ended within this stream's wait; it goes on: "
                        f"GET /v1/tasks/{view.id} has its result later"
                    )
                    yield error_event(message, "timeout", "timeout")
                return


def _interrupted(task_id: str, attempt: int, why: str) -> str:
    return (
        f"attempt {attempt} of task {task_id} ended after part of its text was streamed ({why}); "
        f"the task is retried on the bus: GET /v1/tasks/{task_id} has its whole output once it completes, "
        "and repeating this request with the same Idempotency-Key streams it without a new call"
    )


def _usage(view: TaskView) -> dict[str, int]:
    usage = view.usage
    prompt, completion = (usage.input_tokens, usage.output_tokens) if usage else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def streamed_completion(
    hive: Hive,
    request: TaskRequest,
    *,
    model: str,
    include_usage: bool,
    keepalive_s: float = DEFAULT_STREAM_KEEPALIVE_S,
    wait_s: float = DEFAULT_STREAM_WAIT_S,
) -> Stream:
    """Submit ``request`` as a streamed task and answer with its event stream. Submission errors
    (queue full, bus down, too large) are raised before the answer starts, as HTTP errors."""
    opened = hive.stream(request, keepalive_s=keepalive_s, timeout_s=wait_s)
    stream = await opened.__aenter__()

    async def events() -> AsyncIterator[bytes]:
        try:
            async for data in completion_events(stream, model=model, include_usage=include_usage):
                yield data
        finally:
            await opened.__aexit__(None, None, None)

    headers = {
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # nginx: pass each event on at once
        "X-Hive-Task-Id": stream.task_id,
    }
    return Stream(events(), media_type=SSE, headers=headers)
