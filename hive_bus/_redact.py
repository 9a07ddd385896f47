"""Provider keys kept out of every text a provider sends back and every log line.

A provider may echo the key (Gemini's ``quotaId`` in a 429 body), and at DEBUG level the SDKs and their
HTTP clients log requests and response headers verbatim. Each key is registered once, where it is read
(:func:`workers.keyed`, or an adapter of a user's through :func:`hive_bus.register_secret`); :func:`scrub` takes every registered key out of a text, and
:func:`keep_secrets_out_of_logs` sets the SDKs' loggers to INFO at most and puts a filter on the root
handlers that scrubs whatever still carries a key.
"""

from __future__ import annotations

import logging

_secrets: set[str] = set()
# Loggers that write request or response headers (the API key among them) at DEBUG.
SDK_LOGGERS = ("httpx", "httpx2", "httpcore", "google_genai", "google.genai", "groq", "anthropic", "openai")
MIN_SECRET_CHARS = 6  # shorter is no key, and scrubbing it would maim ordinary text


def register(secret: str) -> None:
    """Keep ``secret`` out of every provider text and log line from now on: public as
    :func:`hive_bus.register_secret`, for an adapter to call once per API key it is given, before its
    first call. The worker then scrubs the key (as ``***``) from every message a provider's error
    carries before it is stored, published or logged, and ``hive worker`` from every log line. Secrets
    shorter than 6 characters are not registered: scrubbing them would maim ordinary text."""
    if len(secret) >= MIN_SECRET_CHARS:
        _secrets.add(secret)


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """Scrubs every registered secret from a record's message (and its traceback) before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _secrets:
            return True
        message = record.getMessage()
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, scrub(text)
        return True


def keep_secrets_out_of_logs() -> None:
    """Call after logging is configured: the SDKs' header logging stays off even at DEBUG, and every
    root handler scrubs registered secrets."""
    for name in SDK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
