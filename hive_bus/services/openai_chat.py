"""OpenAI's chat completions on the gateway: ``POST /v1/chat/completions``, ``GET /v1/models`` and
``GET /v1/models/{model}``.

A chat completion is a task whose HTTP request waits for its end (:meth:`Hive.wait`): a provider's 429
means waiting in the queue, not an error to the client, and the task is spread over every worker and
key, and failed over along its alias's candidates. The steps, each a function of its own so that the
streaming answer (``stream: true``) reuses them:

1. :func:`parse_request`: the body, checked; a field this gateway does not support is a 400 naming it;
2. :meth:`Catalog.target`: where ``model`` goes (``provider/model``, a bare provider, or an alias of the
   routes file; see :mod:`hive_bus._routes`); unknown: 404 listing what exists;
3. :func:`task_for`: the task it becomes;
4. :func:`completion_of` or :func:`failure_of`: the ``chat.completion`` or the OpenAI error of its end.

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so that the openai
SDK raises the right exception (``BadRequestError``, ``NotFoundError``...). Answers that sending again
cannot mend carry ``x-should-retry: false``, which the openai SDKs obey: a retry would queue the work
twice.

Why about 600 lines: OpenAI's request, response and error shapes are declared here as Structs beside
the four steps, so what the route accepts and answers can be held against OpenAI's reference in one
file.
"""

# No "from __future__ import annotations" here: Litestar reads the parameter markers at run time.
import logging
import math
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import msgspec
from litestar import MediaType, Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath
from msgspec import Meta

from hive_bus import BusUnavailable, Hive, HiveError, QueueFull, TaskRequest, TaskView, WorkerBeat
from hive_bus._client import validate
from hive_bus._errors import NoRoom, TooLarge, Unserved
from hive_bus._messages import (
    ChatMessage,
    IdempotencyKey,
    Messages,
    ResponseFormat,
    Seconds,
    explain_error,
    now_ms,
)
from hive_bus._nesting import NestedTooDeep, check_json
from hive_bus._routes import Routes, Target
from hive_bus.workers import BUILTIN_NAMES

from .openai_errors import OpenAIError, param_of
from .openai_stream import streamed_completion

log = logging.getLogger("hive_bus.gateway")

# How long a chat completion waits for its task by default, and the most X-Hive-Wait may ask.
DEFAULT_CHAT_WAIT_S = 300.0
MAX_CHAT_WAIT_S = 3600.0
# How long one reading of the live workers serves model lookups.
WORKERS_FRESH_S = 2.0
SUPPORTED_FIELDS = (
    "model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n",
    "response_format", "stream", "stream_options", "seed", "user", "metadata",
)  # fmt: skip
_SUPPORTED = frozenset(SUPPORTED_FIELDS)


# errors ------------------------------------------------------------------------------------------


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _of_bus_error(exc: HiveError) -> OpenAIError:
    """The OpenAI error of a submission the bus did not accept."""
    if isinstance(exc, TooLarge):
        return OpenAIError(413, str(exc), code="too_large", final=True)
    if isinstance(exc, Unserved):  # HIVE_REJECT_UNSERVED: a model no worker serves
        return OpenAIError(400, str(exc), param="model", code="model_not_served", final=True)
    if isinstance(exc, NoRoom):  # the operator's to fix (accounts.conf): not retried
        return OpenAIError(507, str(exc), type="server_error", code=exc.code, final=True)
    if isinstance(exc, QueueFull):
        retry = {"Retry-After": str(math.ceil(exc.retry_after_s))}
        return OpenAIError(503, str(exc), type="server_error", code="queue_full", headers=retry)
    return OpenAIError(
        503, str(exc), type="server_error", code="bus_unavailable", headers={"Retry-After": "5"}
    )


# 1. the request ----------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False


Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(ge=0, le=1)]
MaxTokens = Annotated[int, Meta(ge=1)]
StopText = Annotated[str, Meta(min_length=1)]


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A chat completion request, as OpenAI's API takes it (the fields this gateway supports)."""

    model: str
    messages: Messages
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stop: StopText | Annotated[list[StopText], Meta(min_length=1, max_length=4)] | None = None
    n: int | None = None
    response_format: ResponseFormat | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    metadata: Annotated[dict[Annotated[str, Meta(max_length=64)], str], Meta(max_length=16)] | None = None

    @property
    def output_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(body: bytes) -> ChatRequest:
    """The request in ``body``, or :class:`OpenAIError` 400 naming what is wrong and where.

    A field that OpenAI's API has and this gateway does not support is refused by name; one sent as
    ``null`` asks for nothing and is let through. ``developer`` messages are read as ``system`` ones
    (OpenAI's newer name for them)."""
    try:
        check_json(body, enclosing=3)  # response_format.json_schema.schema sits three levels in
        raw = msgspec.json.decode(body)
    except NestedTooDeep as exc:
        raise invalid(explain_error(exc), param=exc.field) from None
    except msgspec.DecodeError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise invalid("the request body must be a JSON object")
    for name, value in raw.items():
        if name not in _SUPPORTED and value is not None:
            raise invalid(
                f"`{name}` is not supported by this gateway's chat completions (supported: "
                f"{', '.join(SUPPORTED_FIELDS)}); leave it out",
                param=name,
                code="unsupported_parameter",
            )
    fields = {k: v for k, v in raw.items() if v is not None and k in _SUPPORTED}
    messages = fields.get("messages")
    if isinstance(messages, list):
        fields["messages"] = [
            {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
            for m in messages
        ]
    try:
        request = msgspec.convert(fields, ChatRequest)
    except msgspec.ValidationError as exc:
        raise invalid(explain_error(exc), param=param_of(exc)) from None
    _check_combinations(request)
    return request


def _check_combinations(request: ChatRequest) -> None:
    if request.n is not None and request.n != 1:
        raise invalid("`n` must be 1: this gateway returns one choice", param="n", code="unsupported_value")
    if (
        request.max_tokens
        and request.max_completion_tokens
        and request.max_tokens != request.max_completion_tokens
    ):
        raise invalid(
            "`max_tokens` and `max_completion_tokens` differ; give one (max_tokens is its older name)",
            param="max_tokens",
        )
    if request.stream_options is not None and not request.stream:
        raise invalid("`stream_options` is only allowed when `stream` is true", param="stream_options")


# 2. the model ------------------------------------------------------------------------------------


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(msgspec.Struct, frozen=True, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class Catalog:
    """What ``model`` may name: the routes file's aliases, and the providers (with their default
    models) whose workers have a live heartbeat, read from the bus at most every
    :data:`WORKERS_FRESH_S`."""

    def __init__(self, hive: Hive, routes: Routes) -> None:
        self._hive = hive
        self.routes = routes
        self._beats: list[WorkerBeat] = []
        self._read_at = -math.inf
        # why the last reading failed: it stands for WORKERS_FRESH_S as a reading does, so that the
        # requests queued behind a reading that timed out are answered at once, not one timeout each
        self._failed: str | None = None
        self._lock = anyio.Lock()
        self._started_s = int(now_ms() / 1000)

    async def live(self) -> list[WorkerBeat]:
        """The workers' heartbeats as last read, or :class:`BusUnavailable` as the last reading failed."""
        async with self._lock:
            if anyio.current_time() - self._read_at >= WORKERS_FRESH_S:
                try:
                    self._beats, self._failed = await self._hive.workers(), None
                except BusUnavailable as exc:
                    self._failed = str(exc)
                self._read_at = anyio.current_time()
            if self._failed is not None:
                raise BusUnavailable(self._failed)
            return self._beats

    async def target(self, model: str) -> Target:
        """Where ``model`` goes, or :class:`OpenAIError` 404 listing the models there are."""
        beats = await self.live()
        # a built-in provider is always there to queue for (its workers may be restarting, or come
        # later: the task waits in the queue as any does); any other needs a live worker
        served = {b.provider for b in beats if b.state == "running"} | set(BUILTIN_NAMES)
        target = self.routes.target(model, served)
        if target is None:
            names = [card.id for card in self._cards(beats)]
            listed = ", ".join(names) if names else "none: no alias is configured and no worker is running"
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist: it is no alias, no built-in provider, and no worker "
                f"serves it now. Models: {listed}",
                param="model",
                code="model_not_found",
                final=True,
            )
        return target

    async def models(self) -> ModelList:
        return ModelList(data=self._cards(await self.live()))

    async def model(self, model: str) -> ModelCard:
        """One model as ``GET /v1/models/{model}`` answers it: its card in the list, or, for a model that
        chat completions take without listing it (``provider/model`` of a provider queued for, with no
        worker now), a card of that provider's; else :class:`OpenAIError` 404 as :meth:`target`."""
        for card in self._cards(await self.live()):
            if card.id == model:
                return card
        target = await self.target(model)
        return ModelCard(id=model, created=self._started_s, owned_by=target.provider)

    def _cards(self, beats: list[WorkerBeat]) -> list[ModelCard]:
        cards = {
            name: ModelCard(id=name, created=self._started_s, owned_by="hive-bus")
            for name in self.routes.aliases
        }
        for beat in beats:
            if beat.state != "running":
                continue
            name = f"{beat.provider}/{beat.model}" if beat.model else beat.provider
            created = int(beat.started_at_ms / 1000) or self._started_s
            if name not in cards:
                cards[name] = ModelCard(id=name, created=created, owned_by=beat.provider)
        return list(cards.values())


# 3. the task -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HiveHeaders:
    """The request headers of ours: how long to wait, the idempotency key, a cache TTL."""

    wait_s: float
    idempotency_key: str | None = None
    cache_ttl_s: float | None = None


def hive_headers(request: Request[Any, Any, Any], default_wait_s: float) -> HiveHeaders:
    """``X-Hive-Wait`` (seconds), ``Idempotency-Key``, ``X-Hive-Cache-TTL`` (seconds), checked."""

    def seconds(name: str, limit: float) -> float | None:
        value = request.headers.get(name)
        if value is None:
            return None
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (0 < number <= limit):
            raise invalid(f"header {name} must be a number of seconds above 0, at most {limit:g}", param=name)
        return number

    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 256:
        raise invalid("header Idempotency-Key must be 1 to 256 characters", param="Idempotency-Key")
    return HiveHeaders(
        wait_s=seconds("x-hive-wait", MAX_CHAT_WAIT_S) or default_wait_s,
        idempotency_key=key,
        cache_ttl_s=seconds("x-hive-cache-ttl", 30 * 86400.0),
    )


def task_for(
    request: ChatRequest,
    target: Target,
    *,
    idempotency_key: IdempotencyKey | None = None,
    cache_ttl_s: Seconds | None = None,
) -> TaskRequest:
    """The task a chat completion becomes.

    A conversation of one user message (with a system message before it, or not) is asked as a
    ``prompt`` and ``system``, which every worker, an older one too, takes; the response cache keys both
    forms alike (:meth:`Task.conversation`). ``user`` goes into the task's metadata under ``user``."""
    params = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.output_cap,
        "stop": [request.stop] if isinstance(request.stop, str) else request.stop,
        "seed": request.seed,
    }
    metadata: dict[str, Any] = dict(request.metadata or {})
    if request.user is not None:
        metadata["user"] = request.user
    fields: dict[str, Any] = {
        "provider": target.provider,
        "model": target.model,
        "fallback": target.fallback,
        "route": target.route,
        "max_attempts": target.max_attempts,
        "max_wait_s": target.max_wait_s,
        "deadline_s": target.deadline_s,
        "cache_ttl_s": cache_ttl_s or target.cache_ttl_s,
        "response_format": msgspec.to_builtins(request.response_format) if request.response_format else None,
        "idempotency_key": idempotency_key,
        "metadata": metadata,
        "params": {k: v for k, v in params.items() if v is not None} or None,
        **_asked(request.messages),
    }
    try:
        return validate({k: v for k, v in fields.items() if v is not None})
    except msgspec.ValidationError as exc:
        raise invalid(explain_error(exc), param=param_of(exc)) from None


def _asked(messages: list[ChatMessage]) -> dict[str, Any]:
    *head, last = messages
    single = last.role == "user" and (not head or (len(head) == 1 and head[0].role == "system"))
    if single and last.text.strip():
        return {"prompt": last.text, "system": head[0].text if head and head[0].text else None}
    return {"messages": [msgspec.to_builtins(m) for m in messages]}


# 4. the answer -----------------------------------------------------------------------------------


class AssistantMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str = "assistant"
    content: str
    refusal: None = None


class Choice(msgspec.Struct, frozen=True, kw_only=True):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str = "stop"


class CompletionUsage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(msgspec.Struct, frozen=True, kw_only=True):
    """OpenAI's ``chat.completion`` object."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: None = None


def answered_by(view: TaskView) -> str:
    """``provider/model`` of the worker that really answered (the provider alone when no model is known)."""
    return f"{view.provider}/{view.model}" if view.model else view.provider


def completion_of(view: TaskView) -> ChatCompletion:
    """The ``chat.completion`` of a completed task. A structured output (a JSON value) is its JSON text,
    as OpenAI's ``message.content`` carries it."""
    output = view.output
    content = output if isinstance(output, str) else msgspec.json.encode(output).decode()
    usage = view.usage
    prompt_tokens, completion_tokens = (usage.input_tokens, usage.output_tokens) if usage else (0, 0)
    created_ms = view.submitted_at_ms or view.updated_at_ms
    return ChatCompletion(
        id=f"chatcmpl-{view.id}",
        created=created_ms // 1000,
        model=answered_by(view),
        choices=[
            Choice(message=AssistantMessage(content=content), finish_reason=view.finish_reason or "stop")
        ],
        usage=CompletionUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


def task_headers(view: TaskView) -> dict[str, str]:
    """``X-Hive-Task-Id``, ``X-Hive-Provider``, ``X-Hive-Attempts``, ``X-Hive-Cost-USD`` (when the price
    is known) and ``X-Hive-Cache: hit`` for an answer from the response cache."""
    headers = {
        "X-Hive-Task-Id": view.id,
        "X-Hive-Provider": view.provider,
        "X-Hive-Attempts": str(view.attempt),
    }
    if view.cost_usd is not None:
        headers["X-Hive-Cost-USD"] = f"{view.cost_usd:.10f}".rstrip("0").rstrip(".")
    if view.cached:
        headers["X-Hive-Cache"] = "hit"
    return headers


# reason -> (HTTP status, code), for a task that failed for good; see failure_of
_FAILURES: dict[str, tuple[int, str]] = {
    "out_of_attempts": (502, "provider_unavailable"),
    "deadline": (504, "deadline_exceeded"),
    "expired": (504, "deadline_exceeded"),
    "rejected": (503, "queue_full"),
    "lost": (502, "task_lost"),
    "undecodable": (502, "task_undecodable"),
}


def failure_of(view: TaskView) -> OpenAIError:
    """The OpenAI error of a task that failed for good (the table in the README):

    - ``permanent`` with the provider's 404: 404 ``model_not_found``; with another 4xx of the provider's
      (a bad request, a parameter its API does not take): 400 ``provider_bad_request``; with 401/403
      (every key refused) or none (an output that could not be recorded...): 502 ``provider_refused``;
    - ``out_of_attempts``: 502 ``provider_unavailable``; ``deadline``: 504 ``deadline_exceeded``;
      ``rejected``: 503 ``queue_full``; ``lost`` and ``undecodable``: 502; any other reason (an output
      that is not valid for its schema...): 502 with the reason as the code."""
    reason, status = view.reason or "permanent", view.provider_status
    message = f"task {view.id} failed ({reason}) on {view.provider}: {view.error or 'no error recorded'}"
    headers = {
        "X-Hive-Task-Id": view.id,
        "X-Hive-Provider": view.provider,
        "X-Hive-Attempts": str(view.attempt),
    }
    if reason == "permanent" and status == 404:
        return OpenAIError(404, message, code="model_not_found", param="model", final=True, headers=headers)
    if reason == "permanent" and status is not None and 400 <= status < 500 and status not in (401, 403, 429):
        return OpenAIError(400, message, code="provider_bad_request", final=True, headers=headers)
    http, code = _FAILURES.get(reason, (502, "provider_refused" if reason == "permanent" else reason))
    return OpenAIError(http, message, type="server_error", code=code, final=True, headers=headers)


def cancelled(view: TaskView) -> OpenAIError:
    """409 ``task_cancelled`` for a task cancelled before it ended (``POST /v1/tasks/{id}/cancel``): it
    will not answer, and sending the request again makes a new task."""
    return OpenAIError(
        409,
        f"task {view.id} was cancelled ({view.reason}): {view.error or 'no reason given'}",
        code="task_cancelled",
        final=True,
        headers={"X-Hive-Task-Id": view.id, "X-Hive-Provider": view.provider},
    )


def evicted(view: TaskView) -> OpenAIError:
    """410 ``task_evicted`` for a task that ended with its events evicted since (a repeated
    Idempotency-Key, long after): its answer is no longer kept, and a request without the key asks again."""
    return OpenAIError(
        410,
        f"task {view.id}: {view.error}; send the request without its Idempotency-Key to ask again",
        code="task_evicted",
        final=True,
        headers={"X-Hive-Task-Id": view.id, "X-Hive-Provider": view.provider},
    )


def still_running(view: TaskView, wait_s: float) -> OpenAIError:
    """504 once the wait is over: the task goes on, and ``GET /v1/tasks/{id}`` has its result later."""
    return OpenAIError(
        504,
        f"task {view.id} has not ended within {wait_s:g}s (it is {view.status}); it goes on: "
        f"GET /v1/tasks/{view.id} has its result later",
        type="server_error",
        code="wait_exceeded",
        final=True,
        headers={"X-Hive-Task-Id": view.id, "X-Hive-Provider": view.provider},
    )


# the routes ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    """A chat completion request made ready to run: the request, its task, its wait."""

    chat: ChatRequest
    task: TaskRequest
    wait_s: float


async def prepare(request: Request[Any, Any, Any], state: State) -> Prepared:
    """Steps 1 to 3: the request checked, its model resolved, its task built (not yet submitted)."""
    catalog: Catalog = state.catalog
    chat = parse_request(await request.body())
    headers = hive_headers(request, state.chat_wait_s)
    try:
        target = await catalog.target(chat.model)
    except BusUnavailable as exc:
        raise _of_bus_error(exc) from None
    task = task_for(chat, target, idempotency_key=headers.idempotency_key, cache_ttl_s=headers.cache_ttl_s)
    return Prepared(chat, task, headers.wait_s)


async def streamed(prepared: Prepared, state: State) -> Response[Any]:
    """``stream: true``: ``text/event-stream`` of ``chat.completion.chunk`` objects for the task, as its
    worker produces the text (:mod:`services.openai_stream`). A submission the bus refuses is an error
    answer before the stream starts."""
    options = prepared.chat.stream_options
    try:
        return await streamed_completion(
            state.hive,
            prepared.task,
            model=prepared.chat.model,
            include_usage=options is not None and options.include_usage,
            keepalive_s=state.stream_keepalive_s,
            wait_s=prepared.wait_s,
        )
    except (BusUnavailable, NoRoom, QueueFull, TooLarge, Unserved) as exc:
        raise _of_bus_error(exc) from None


@post(
    "/v1/chat/completions",
    summary="OpenAI chat completions, answered through the bus",
    status_code=200,
)
async def chat_completions(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    """A chat completion as OpenAI's API answers it; the task behind it waits out rate limits and fails
    over in the queue. Headers: ``X-Hive-Wait`` (seconds to wait, default 300), ``Idempotency-Key``,
    ``X-Hive-Cache-TTL``; the answer carries ``X-Hive-Task-Id``, ``X-Hive-Provider``,
    ``X-Hive-Attempts`` and ``X-Hive-Cost-USD``."""
    hive: Hive = state.hive
    try:
        prepared = await prepare(request, state)
        if prepared.chat.stream:
            return await streamed(prepared, state)
        try:
            accepted = await hive.submit_request(prepared.task)
            for warning in accepted.warnings:
                log.warning("chat completion %s: %s", accepted.id, warning)
            view = await hive.wait(accepted.id, prepared.wait_s)
        except (BusUnavailable, NoRoom, QueueFull, TooLarge, Unserved) as exc:
            raise _of_bus_error(exc) from None
        if view.status == "completed":
            return Response(completion_of(view), status_code=200, headers=task_headers(view))
        if view.status == "cancelled":
            raise cancelled(view)
        if view.status == "evicted":
            raise evicted(view)
        raise failure_of(view) if view.status == "failed" else still_running(view, prepared.wait_s)
    except OpenAIError as exc:
        return exc.response()


@get(
    "/v1/models",
    summary="OpenAI's list of models: every alias, and every provider/model a live worker serves",
)
async def list_models(state: State) -> Response[Any]:
    catalog: Catalog = state.catalog
    try:
        return Response(await catalog.models(), media_type=MediaType.JSON)
    except BusUnavailable as exc:
        return _of_bus_error(exc).response()


@get(
    "/v1/models/{model:path}",
    summary="OpenAI's model object: an alias, or a provider/model that chat completions take",
)
async def retrieve_model(state: State, model: FromPath[str]) -> Response[Any]:
    """The SDK sends a model id's ``/`` as ``%2F`` (``groq%2Fllama-3.3-70b-versatile``), which the server
    decodes before routing: hence a path parameter, leading ``/`` and all."""
    catalog: Catalog = state.catalog
    try:
        return Response(await catalog.model(model.removeprefix("/")), media_type=MediaType.JSON)
    except BusUnavailable as exc:
        return _of_bus_error(exc).response()
    except OpenAIError as exc:
        return exc.response()


CHAT_ROUTES = [chat_completions, list_models, retrieve_model]

__all__ = [
    "CHAT_ROUTES",
    "Catalog",
    "ChatCompletion",
    "ChatRequest",
    "OpenAIError",
    "Prepared",
    "completion_of",
    "failure_of",
    "parse_request",
    "prepare",
    "still_running",
    "task_for",
]
