"""The contract between the HTTP server and one provider's API: which paths it serves, where its key is,
how its requests read, and how each answer (success, 429, auth error, other errors) is written."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ._common import ChatRequest, JsonObject, Reply
from ._state import RateLimited, Snapshot


@dataclass(frozen=True)
class Route:
    """A matched endpoint; ``model`` and ``version`` are set where the path carries them (Gemini)."""

    model: str | None = None
    version: str | None = None
    stream: bool = False  # Gemini's streamGenerateContent (the others say so in the body)


@dataclass(frozen=True)
class StreamReply:
    """A 200 whose body is Server-Sent Events, written one event at a time (chunked), as the real APIs
    stream: each item of ``events`` is one whole event, separators included."""

    events: Sequence[str]
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "text/event-stream"
    prompt: str = ""  # counted as completed once the last event went out


class ProviderApi(ABC):
    name: str
    server_header: str
    nominal_rpm: int  # the limit a forced 429 reports when no window is set

    @abstractmethod
    def route(self, method: str, path: str) -> Route | None:
        """The endpoint ``path`` names, or None when it is not this API's."""

    @abstractmethod
    def api_key(self, headers: Mapping[str, str], query: Mapping[str, list[str]]) -> str | None:
        """The API key the request carries, if any (headers are lower-cased)."""

    def precheck(self, headers: Mapping[str, str]) -> Reply | None:
        """An answer for a request the API refuses before reading it (Anthropic's missing version)."""
        return None

    @abstractmethod
    def parse(self, body: JsonObject, route: Route) -> ChatRequest:
        """The request's model, prompt and input text; raises BadRequest."""

    @abstractmethod
    def success(self, request: ChatRequest, text: str, snapshot: Snapshot) -> Reply: ...

    @abstractmethod
    def stream(self, request: ChatRequest, text: str, snapshot: Snapshot, body: JsonObject) -> StreamReply:
        """The success answer of a streamed request, event by event as the API sends it."""

    @abstractmethod
    def stream_error(self, status: int) -> str:
        """The event by which the API ends a stream that failed after it began (status ``status``)."""

    @abstractmethod
    def rate_limited(self, request: ChatRequest, hit: RateLimited) -> Reply: ...

    @abstractmethod
    def unauthorized(self, key: str | None, snapshot: Snapshot, headers: Mapping[str, str]) -> Reply: ...

    @abstractmethod
    def error(self, status: int, request: ChatRequest | None, route: Route, snapshot: Snapshot) -> Reply:
        """The API's answer for an error status other than 429."""

    @abstractmethod
    def invalid(self, message: str) -> Reply:
        """The API's 400 for a body it cannot read."""

    @abstractmethod
    def not_found(self, method: str, path: str) -> Reply:
        """The answer for a path under this API that the fake does not serve."""

    def forced_rate_limit(self, request: ChatRequest, retry_after_s: float, snapshot: Snapshot) -> Reply:
        """``fail_next(429)``: the per-minute 429, reporting the window's limit (or a nominal one)."""
        limit = snapshot.window.limit if snapshot.window else self.nominal_rpm
        hit = RateLimited(
            daily=False, limit=limit, used=limit, retry_after_s=retry_after_s, snapshot=snapshot
        )
        return self.rate_limited(request, hit)
