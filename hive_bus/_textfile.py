"""A settings file's text, read one way for every file a setting names (routes, prices, budgets, tokens,
secrets, webhooks): UTF-8, and one reason in words when it cannot be read, never its content."""

from __future__ import annotations

from pathlib import Path


class UnreadableFile(ValueError):
    """Why a file cannot be read: the system's reason (no such file, permission denied), or that it is
    not UTF-8 text. The caller puts it after the setting's name and the path."""


def read_text(path: str | Path) -> str:
    """The file's text. Raises :class:`UnreadableFile`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UnreadableFile(exc.strerror or type(exc).__name__) from None
    except UnicodeDecodeError:
        raise UnreadableFile("it is not UTF-8 text") from None
