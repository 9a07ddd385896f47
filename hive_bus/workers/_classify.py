"""What a provider's error means for the task: retry after its delay, retry later, or fail now.

Shared by the adapters. Messages name the provider and the cause, and never carry a key: every text
that leaves an adapter goes through :func:`scrub`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from hive_bus import BadRequest, FailNow, KeyRejected, ProviderError, Quota, RetryAfter, RetryLater

# Statuses worth trying again: timeouts, conflicts, "too early", server faults, Anthropic's "overloaded".
TRANSIENT_STATUSES = frozenset({408, 409, 425, 500, 502, 503, 504, 529})
# When a 429 says nothing about when to come back.
DEFAULT_RATE_LIMIT_DELAY_S = 10.0

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_TRY_AGAIN = re.compile(r"try again in ((?:\d+(?:\.\d+)?(?:ms|h|m|s))+)", re.IGNORECASE)
_DAY = re.compile(r"per day|\(RPD\)|\(TPD\)|PerDay|daily", re.IGNORECASE)
_MINUTE = re.compile(r"per minute|\(RPM\)|\(TPM\)|PerMinute", re.IGNORECASE)


def parse_duration_s(text: str) -> float | None:
    """Go-style durations as providers write them: ``47s``, ``6.78s``, ``9m38.4s``, ``1h2m``, ``500ms``."""
    parts = _DURATION_PART.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def delay_in_message_s(message: str) -> float | None:
    """The delay in "Please try again in 6.78s." (Groq, OpenAI-compatible servers)."""
    found = _TRY_AGAIN.search(message)
    return parse_duration_s(found.group(1)) if found else None


def retry_after_header_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        delay_s = float(value)
    except ValueError:
        return None  # an HTTP date: rare from these APIs; the message or the default covers it
    # inf, nan: not a delay (inf overflowed the settler); the message or the default covers it
    return max(0.0, delay_s) if math.isfinite(delay_s) else None


def quota_in(text: str) -> Quota:
    if _DAY.search(text):
        return "day"
    if _MINUTE.search(text):
        return "minute"
    return "unknown"


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, "***")
    return text


def not_the_api(provider: str, answer: object, secrets: Iterable[str] = ()) -> RetryLater:
    """A 200 whose body is not the API's answer (a web server's page, JSON of another shape or cut
    short): what came, and where to look (a base URL pointing at something other than the API)."""
    dump = getattr(answer, "model_dump", None)
    if isinstance(answer, str):
        text = answer
    elif callable(dump):  # an SDK's model made of the body unchecked: the fields the body had
        text = str(dump(exclude_none=True))
    else:
        text = repr(answer)
    where = "GOOGLE_GEMINI_BASE_URL" if provider == "gemini" else f"{provider.upper()}_BASE_URL"
    return RetryLater(
        f"{provider} answered 200 with something that is not its API's answer: {scrub(text, secrets)[:200]!r} "
        f"(does {where} point at the API?)"
    )


def by_status(
    provider: str, status: int, message: str, *, retry_after_s: float | None = None, quota: Quota = "unknown"
) -> ProviderError:
    """The outcome of an HTTP error answer."""
    if status == 429:
        delay_s = DEFAULT_RATE_LIMIT_DELAY_S if retry_after_s is None else retry_after_s
        scope = {"minute": "per-minute", "day": "per-day"}.get(quota, "rate")
        return RetryAfter(f"{provider} {scope} limit reached: {message}", retry_after_s=delay_s, quota=quota)
    if status in TRANSIENT_STATUSES or status >= 500:
        return RetryLater(f"{provider} answered {status}: {message}", status=status)
    what = {
        401: "the API key was refused",
        403: "permission denied",
        404: "not found (is the model name right?)",
    }
    refused = f"{provider} refused the task ({status}, {what.get(status, 'bad request')}): {message}"
    # 401 and 403 are about the key (revoked, wrong project, leaked and blocked), not about the task;
    # 400, 413 and 422 about the task itself (the user's own bad request)
    if status in (401, 403):
        return KeyRejected(refused, status=status)
    if status in (400, 413, 422):
        return BadRequest(refused, status=status)
    return FailNow(refused, status=status)
