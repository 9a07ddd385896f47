"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``: every error of the routes
that stand for OpenAI's API (chat completions build theirs, the files and batches routes theirs and
every other the gateway gives on their paths), so that its SDKs raise the right exception with the
message. Any other route answers in the gateway's own shape (:mod:`services.answers`)."""

from __future__ import annotations

from typing import Literal

import msgspec
from litestar import MediaType, Response

from hive_bus._messages import field_named

from .answers import Answer, ErrorBody

ErrorType = Literal["invalid_request_error", "server_error"]
# Paths (and what is under them) whose every error is OpenAI's shape, the edge's refusals and the
# framework's (an unknown sub-path, a bad query parameter, a body too large) included.
OPENAI_PATHS = ("/v1/chat/completions", "/v1/models", "/v1/files", "/v1/batches")


class OpenAIErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    error: OpenAIErrorDetail


class OpenAIError(Exception):
    """An answer in OpenAI's error shape. ``final``: sending the request again cannot mend it (the
    answer says so to the SDK, which would otherwise retry a 5xx)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: ErrorType = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        final: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = OpenAIErrorBody(
            error=OpenAIErrorDetail(message=message, type=type, param=param, code=code)
        )
        self.headers = {**(headers or {}), **({"x-should-retry": "false"} if final else {})}

    def response(self) -> Response[OpenAIErrorBody]:
        return Response(self.body, status_code=self.status, media_type=MediaType.JSON, headers=self.headers)


def param_of(exc: Exception) -> str | None:
    """The field a msgspec validation error names (``messages[0].role``, from its ``- at `$...```, or
    the one a type's own check names first, :func:`field_named`), as OpenAI's ``param``; None when it
    names none."""
    message, sep, where = str(exc).rpartition(" - at `$")
    if not sep:
        message, where = str(exc), ""
    return field_named(message, where.rstrip("`").lstrip(".")) or None


def speaks_openai(path: str) -> bool:
    """Whether a request to ``path`` is answered errors in OpenAI's shape."""
    return any(path == root or path.startswith(root + "/") for root in OPENAI_PATHS)


def of_answer(answer: Answer) -> OpenAIError:
    """An error answer of the gateway's own shape in OpenAI's: the same status, message and headers, its
    code as ``code``, its field as ``param``."""
    if not isinstance(answer.content, ErrorBody):
        raise TypeError(f"not an error answer: {answer.content!r}")
    detail = answer.content.error
    kind: ErrorType = "server_error" if answer.status >= 500 else "invalid_request_error"
    return OpenAIError(
        answer.status, detail.message, type=kind, param=detail.field, code=detail.code, headers=answer.headers
    )
