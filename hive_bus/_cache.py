"""The response cache, opt in: a task with ``cache_ttl_s`` (set per task, or by its alias in the routes
file) whose twin completed within that many seconds completes from the cache, with no provider call and
no budget spent.

Twins ask the same provider and model for the same conversation with the same parameters, output shape
and payload: the key is a SHA-256 of those, under the provider (``<provider>.<digest>`` in the KV bucket
``<prefix>_cache``). Each answer is stored with a message TTL (``Nats-TTL``), so the server forgets it by
itself; a full bucket drops its oldest answers.

The lookup happens in the worker, just before it would pick a key and call, and not in the gateway,
because only the worker knows the model that will really answer (a task that names none gets its
worker's default, and a task that moved to a fallback asks another provider): the key holds that
model. It also serves every way a task arrives (``POST /v1/tasks``, the client, chat completions,
moves and replays) alike, and a cache hit leaves the budgets and the provider untouched since no key is
taken. A hit is recorded as an ordinary ``completed`` event with ``cached: true`` and no cost.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import anyio
import msgspec
import nats.js.errors

from ._bus import VALUE_MAX_BYTES, Bus, ensure_cache_stream
from ._errors import HiveError
from ._messages import Task, Usage, now_ms
from ._nats import BUS_ERRORS
from ._nesting import Guarded
from ._providers import Output

log = logging.getLogger("hive_bus.cache")

# After the bucket could not be declared or read (permissions, a server without message TTLs), the
# cache is left alone this long before it is tried again: tasks go to their provider meanwhile.
RETRY_S = 60.0


class CachedAnswer(msgspec.Struct, frozen=True, kw_only=True, tag="cache.v1", tag_field="type"):
    """One cached answer: what the provider said, and for which task, when."""

    output: Any
    model: str | None = None
    usage: Usage | None = None
    finish_reason: str | None = None
    task_id: str = ""
    at_ms: int = 0


_sorted = msgspec.json.Encoder(order="sorted")
_encoder = msgspec.json.Encoder()
_decoder = Guarded(msgspec.json.Decoder(CachedAnswer), enclosing=1)


def cache_key(task: Task, model: str | None) -> str:
    """The SHA-256 of what makes two tasks twins: provider, the model that answers, the conversation
    (a prompt and system read as the messages they stand for), parameters, output shape, payload."""
    material = {
        "provider": task.provider,
        "model": model or "",
        "messages": [[m.role, m.text] for m in task.conversation()],
        "params": task.params,
        "response_format": task.response_format,
        "payload": task.payload,
    }
    return hashlib.sha256(_sorted.encode(material)).hexdigest()


class ResponseCache:
    """The bucket of cached answers as a worker uses it. Every failure here is logged and leaves the
    task to its provider: the cache may forget, never break a task."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._ready = False
        self._failed_at = -math.inf
        self._lock = anyio.Lock()

    async def lookup(self, task: Task, model: str | None) -> CachedAnswer | None:
        """The answer of a twin of ``task`` that completed within its ``cache_ttl_s``, or None."""
        if task.cache_ttl_s is None or not await self._ensure():
            return None
        names = self._bus.names
        subject = names.cache_subject(task.provider, cache_key(task, model))
        try:
            raw = await self._bus.js.get_last_msg(names.cache_stream, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        except BUS_ERRORS as exc:
            log.warning("the response cache could not be read (%s); task %s calls its provider", exc, task.id)
            return None
        try:
            answer = _decoder.decode(raw.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning(
                "cached answer %s does not decode (%s); task %s calls its provider", raw.seq, exc, task.id
            )
            return None
        # The entry lives as long as the TTL of the task that wrote it; this task may want a fresher one.
        return answer if now_ms() - answer.at_ms <= task.cache_ttl_s * 1000 else None

    async def store(self, task: Task, model: str | None, output: Output) -> None:
        """Keep ``output`` for ``task.cache_ttl_s`` seconds (the server drops it then)."""
        if task.cache_ttl_s is None or not await self._ensure():
            return
        answer = CachedAnswer(
            output=output.value,
            model=output.model,
            usage=output.usage,
            finish_reason=output.finish_reason,
            task_id=task.id,
            at_ms=now_ms(),
        )
        try:
            data = _encoder.encode(answer)
        except (TypeError, msgspec.EncodeError):
            return  # not JSON: nothing a twin could be given either
        if len(data) > VALUE_MAX_BYTES:
            log.info("the answer of task %s is too large for the response cache; not kept", task.id)
            return
        names, settings = self._bus.names, self._bus.settings
        subject = names.cache_subject(task.provider, cache_key(task, model))
        if settings.js_domain:  # behind a leaf node: writes reach the hub through the domain's API
            subject = f"$JS.{settings.js_domain}.API.{subject}"
        headers = {"Nats-TTL": f"{max(1, math.ceil(task.cache_ttl_s))}s"}
        try:
            await self._bus.js.publish(subject, data, stream=names.cache_stream, headers=headers)
        except BUS_ERRORS as exc:
            log.warning("the answer of task %s was not kept in the response cache: %s", task.id, exc)

    async def _ensure(self) -> bool:
        if self._ready:
            return True
        async with self._lock:
            if self._ready or anyio.current_time() - self._failed_at < RETRY_S:
                return self._ready
            try:
                await ensure_cache_stream(self._bus.js, self._bus.settings)
            except (*BUS_ERRORS, HiveError) as exc:
                self._failed_at = anyio.current_time()
                log.warning(
                    "the response cache %s cannot be used (%s); tasks call their providers for %gs",
                    self._bus.names.cache_bucket, exc, RETRY_S,
                )  # fmt: skip
                return False
            self._ready = True
            return True
